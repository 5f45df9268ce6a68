"""Peer CA in the same run: ``cfssl serve`` signing the same P-384 CSRs with a P-384 issuing CA (issue 7).

Why a peer: opendps' registrations per server-CPU-second mean little alone; cfssl is a widely used CA
server doing only the signing step, so opendps ÷ cfssl (``ratios["cfssl"]`` on provisioning rows, set by
:func:`opendps.bench._relate` at the same concurrency) says what attestation, storage and hub registration
cost on top of a bare sign.

Set-up outside the timing: a P-384 root and P-384 issuing CA made here with ``cryptography``, a cfssl
signing profile like opendps' leaf (ECDSA-SHA384, 30 days, digital signature, client auth), a P-256 TLS
certificate for cfssl's listener (opendps' server certificate is P-256 too) and the CSRs. Every request
opens its own TLS connection, as every opendps device does. cfssl's CPU is read from its own /proc entry.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from opendps.bench._harness import (
    Options,
    Result,
    free_port,
    load_row,
    run_load,
    skipped,
    stop_process,
    wait_listening,
)

SCENARIO = "peer-cfssl"
SKIPPED = "cfssl not installed (apt-get install golang-cfssl)"
SIGNING_CONFIG = {"signing": {
    "default": {"usages": ["digital signature", "client auth"], "expiry": "720h"},
    "profiles": {"client": {"usages": ["digital signature", "client auth"], "expiry": "720h"}}}}


def cfssl(opts: Options) -> list[Result]:
    """One row per concurrency level (``system="cfssl"``), or one skipped row if cfssl is not installed."""
    binary = shutil.which("cfssl")
    if binary is None:
        return [skipped_row()]
    rows: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="opendps-bench-cfssl-") as tmp:
        work = Path(tmp)
        issuing_pem = _write_material(work)
        port = free_port()
        with open(work / "cfssl.log", "wb") as log:
            proc = subprocess.Popen([binary, "serve", "-address", "127.0.0.1", "-port", str(port),
                                     "-ca", str(work / "issuing.pem"), "-ca-key", str(work / "issuing-key.pem"),
                                     "-config", str(work / "config.json"), "-tls-cert", str(work / "tls.pem"),
                                     "-tls-key", str(work / "tls-key.pem"), "-loglevel", "4"],
                                    stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_listening(proc, (port,), work / "cfssl.log", timeout=30)
            base = {"url": f"https://localhost:{port}/api/v1/cfssl/sign", "ca_file": str(work / "tls-ca.pem"),
                    "issuing_pem": issuing_pem}
            for level in opts.concurrency_levels:
                count = opts.count_at(level)
                csrs = _csrs(f"cfssl-c{level}", count)
                outcome, cpu = run_load(_sign_worker, {**base, "concurrency": level, "csrs": csrs}, proc.pid)
                rows.append(load_row(SCENARIO, "https", level, count, outcome, cpu, proc.pid, system="cfssl",
                                     version=_version(binary), tls="new TLS connection per request (P-256 server "
                                     "certificate), as opendps devices", csr="P-384", issuing_ca="P-384"))
        finally:
            stop_process(proc)
    return rows


def skipped_row() -> Result:
    """A zero row that says why: no ops, so :func:`opendps.bench._relate` ignores it and the report shows the note."""
    return skipped(SCENARIO, "cfssl", SKIPPED)


def _version(binary: str) -> str:
    out = subprocess.run([binary, "version"], capture_output=True, text=True, check=False).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Version")), "unknown")


def _csrs(prefix: str, count: int) -> list[str]:
    """PEM P-384 CSRs from the device SDK, the same as opendps' provisioning scenarios send (as base64 DER)."""
    from opendps.device.keys import new_key_and_csr

    return [_pem("CERTIFICATE REQUEST", new_key_and_csr(f"{prefix}-{i}", "P-384")[1]) for i in range(count)]


def _pem(label: str, b64: str) -> str:
    return f"-----BEGIN {label}-----\n" + "\n".join(textwrap.wrap(b64, 64)) + f"\n-----END {label}-----\n"


def _write_material(work: Path) -> str:
    """P-384 root → P-384 issuing CA (cfssl signs with it), a P-256 TLS chain, the signing config; the issuing PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def cert(subject: str, key: Any, issuer: Any, issuer_key: Any, *, ca: bool, path_length: int | None = None,
             san: str | None = None) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer.subject if issuer else name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=365))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                            critical=True)
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
        return builder.sign(issuer_key, hashes.SHA384())

    def write(name: str, value: Any) -> None:
        if isinstance(value, x509.Certificate):
            (work / name).write_bytes(value.public_bytes(serialization.Encoding.PEM))
        else:
            (work / name).write_bytes(value.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.TraditionalOpenSSL,
                                                          serialization.NoEncryption()))
            (work / name).chmod(0o600)

    root_key, issuing_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    root = cert("bench cfssl root CA", root_key, None, root_key, ca=True, path_length=1)
    issuing = cert("bench cfssl issuing CA", issuing_key, root, root_key, ca=True, path_length=0)
    tls_ca_key, tls_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP256R1())
    tls_ca = cert("bench cfssl TLS CA", tls_ca_key, None, tls_ca_key, ca=True, path_length=0)
    tls = cert("localhost", tls_key, tls_ca, tls_ca_key, ca=False, san="localhost")
    for name, value in (("issuing.pem", issuing), ("issuing-key.pem", issuing_key), ("tls-ca.pem", tls_ca),
                        ("tls.pem", tls), ("tls-key.pem", tls_key)):
        write(name, value)
    (work / "config.json").write_text(json.dumps(SIGNING_CONFIG))
    return issuing.public_bytes(serialization.Encoding.PEM).decode()


def _sign_worker(conn: Any, spec: dict[str, Any]) -> None:
    """Load-generator process: POST every CSR to cfssl's sign endpoint, a new TLS connection each, ``concurrency`` at a time.

    Each answer must be ``success`` with a certificate that parses and is signed by the issuing CA.
    """
    try:
        import ssl

        import httpx
        from cryptography import x509

        issuing = x509.load_pem_x509_certificate(spec["issuing_pem"].encode())
        context = ssl.create_default_context(cafile=spec["ca_file"])  # no session reuse: a full handshake each
        client = httpx.AsyncClient(verify=context, timeout=60, headers={"Connection": "close"},
                                   limits=httpx.Limits(max_keepalive_connections=0, max_connections=None))
    except Exception as exc:  # noqa: BLE001 - reported to the parent instead of "ready"
        conn.send(f"{type(exc).__name__}: {exc}")
        conn.close()
        return

    async def run() -> dict[str, Any]:
        slots = asyncio.Semaphore(spec["concurrency"])
        loop = asyncio.get_running_loop()

        async def one(csr: str) -> tuple[float | None, str | None]:
            async with slots:
                started = loop.time()
                try:
                    r = await client.post(spec["url"], json={"certificate_request": csr, "profile": "client"})
                    elapsed = loop.time() - started
                    body = r.json()
                    if r.status_code != 200 or not body.get("success"):
                        return None, f"HTTP {r.status_code}: {str(body.get('errors'))[:200]}"
                    leaf = x509.load_pem_x509_certificate(body["result"]["certificate"].encode())
                    leaf.verify_directly_issued_by(issuing)
                    return elapsed, None
                except Exception as exc:  # noqa: BLE001 - one request's failure is counted, not fatal
                    return None, f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"

        begin = time.perf_counter()
        outcomes = await asyncio.gather(*(one(csr) for csr in spec["csrs"]))
        wall = time.perf_counter() - begin
        await client.aclose()
        return {"wall": wall, "latencies": [t for t, _ in outcomes if t is not None],
                "errors": [e for _, e in outcomes if e is not None]}

    conn.send("ready")
    if conn.recv() == "go":
        conn.send(asyncio.run(run()))
    conn.close()


__all__ = ["cfssl", "skipped_row"]

