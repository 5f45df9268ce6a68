"""Provisioning scenarios: registrations over HTTPS and MQTT, symmetric key and X.509 bootstrap, each with a CSR.

Each device opens its own TLS connection (a real fleet does not share sessions) and sends a fresh P-384
CSR. Set-up outside the timing: the enrollment group (symmetric key; or X.509 on a CA certificate
proven by its verification code), derived device keys or RSA-2048 bootstrap certificates as in the
seed, and the CSRs. Bootstrap certificates are one per device; their RSA-2048 keys come from a small
pool, because the server's cost does not depend on key uniqueness and 8,000 fresh RSA keys would
dominate the run's set-up time.

Per transport and attestation: one closed-loop row per concurrency level, then (full runs) one open-loop
row offering 50 % of the best measured throughput, whose p99 is the latency under a sustainable burst.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opendps.bench._harness import (
    BenchError,
    Options,
    Result,
    Server,
    load_row,
    put_all,
    run_load,
    running_server,
    service_client,
    warm_up_count,
)

NAMESPACE, POLICY = "bench", "bench-policy"
SYMMETRIC_GROUP, X509_GROUP, X509_CA = "bench-fleet", "bench-x509-fleet", "bench-owner-ca"
RSA_POOL = 16


def create_symmetric_group(server: Server) -> str:
    """Namespace + credential policy and a symmetric-key enrollment group; returns the group key."""
    group_key = base64.b64encode(secrets.token_bytes(64)).decode()
    put_all(server, [
        (f"/namespaces/{NAMESPACE}", {"properties": {"policyName": POLICY}}),
        (f"/enrollmentGroups/{SYMMETRIC_GROUP}", {
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": group_key, "secondaryKey": group_key}},
            "credentialPolicyName": POLICY})])
    return group_key


class OwnerCa:
    """The device maker's RSA-4096 CA (as in the seed) that signs RSA-2048 bootstrap certificates."""

    def __init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.key = rsa.generate_private_key(65537, 4096)
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench device maker CA")])
        self.certificate = self._sign(self.name, self.key.public_key(), ca=True, days=30)
        self.pool = [rsa.generate_private_key(65537, 2048) for _ in range(RSA_POOL)]

    def _sign(self, subject: Any, public_key: Any, *, ca: bool, days: int) -> Any:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import ExtendedKeyUsageOID

        now = dt.datetime.now(dt.UTC)
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.name).public_key(public_key)
                   .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                                  critical=False))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                            critical=True)
        else:
            builder = builder.add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False),
                                            critical=True).add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def pem(self) -> str:
        from cryptography.hazmat.primitives import serialization

        return self.certificate.public_bytes(serialization.Encoding.PEM).decode()

    def device(self, rid: str, directory: Path, index: int) -> tuple[str, str]:
        """Write ``rid``'s bootstrap chain (leaf + CA) and key; returns (chain file, key file)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.x509.oid import NameOID

        key = self.pool[index % len(self.pool)]
        leaf = self._sign(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, rid)]), key.public_key(), ca=False, days=30)
        chain, key_file = directory / f"{rid}.pem", directory / f"{rid}.key"
        chain.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + self.certificate.public_bytes(
            serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_file.chmod(0o600)
        return str(chain), str(key_file)


def create_x509_group(server: Server, ca: OwnerCa | None = None) -> OwnerCa:
    """Upload the owner CA (``ca``, else a new one), prove possession with the verification code, and enroll a group
    on it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    ca = ca or OwnerCa()
    put_all(server, [(f"/namespaces/{NAMESPACE}", {"properties": {"policyName": POLICY}})])
    with service_client(server) as c:
        r = c.put(f"/certificates/{X509_CA}", json={"properties": {"certificate": ca.pem()}})
        if r.status_code != 201:
            raise BenchError(f"uploading the owner CA failed: {r.status_code} {r.text[:300]}")
        r = c.post(f"/certificates/{X509_CA}/generateVerificationCode", headers={"If-Match": r.json()["etag"]})
        code = r.json()["properties"]["verificationCode"]
        proof = ca._sign(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, code)]), ca.pool[0].public_key(), ca=False,
                         days=1)
        r = c.post(f"/certificates/{X509_CA}/verify", headers={"If-Match": r.json()["etag"]},
                   json={"certificate": proof.public_bytes(serialization.Encoding.PEM).decode()})
        if not r.json().get("properties", {}).get("isVerified"):
            raise BenchError(f"proving possession of the owner CA failed: {r.status_code} {r.text[:300]}")
    put_all(server, [(f"/enrollmentGroups/{X509_GROUP}", {
        "attestation": {"type": "x509", "x509": {"caReferences": {"primary": X509_CA}}},
        "credentialPolicyName": POLICY})])
    return ca


def prepare_devices(credential: Any, prefix: str, count: int, directory: Path) -> list[dict[str, Any]]:
    """Per device: registration id, credential (derived key, or bootstrap chain + key files) and a P-384 CSR."""
    from opendps.device.keys import derive_device_key, new_key_and_csr

    devices = []
    for i in range(count):
        rid = f"{prefix}-{i}"
        device: dict[str, Any] = {"rid": rid, "csr": new_key_and_csr(rid, "P-384")[1]}
        if isinstance(credential, str):
            device["symmetric_key"] = derive_device_key(credential, rid)
        else:
            device["x509"] = credential.device(rid, directory, i)
        devices.append(device)
    return devices


def _load_worker(conn: Any, spec: dict[str, Any]) -> None:
    """Load-generator process: build every client, report ready, register them all on "go".

    Closed loop (``concurrency``): at most that many registrations in flight. Open loop (``rate``): a new
    device starts every 1/rate seconds whatever the others are doing, as a factory line does.
    """
    try:
        from opendps.device.mqtt import client_ssl_context
        from opendps.device.provisioning import ProvisioningClient

        shared = client_ssl_context(spec["ca_file"])  # no session reuse: a full handshake per device
        clients = []
        for d in spec["devices"]:
            auth: dict[str, Any] = ({"symmetric_key": d["symmetric_key"], "ssl_context": shared}
                                    if "symmetric_key" in d else
                                    {"x509": tuple(d["x509"]), "ssl_context": client_ssl_context(spec["ca_file"],
                                                                                                 *d["x509"])})
            clients.append((ProvisioningClient("localhost", spec["id_scope"], d["rid"], https_port=spec["https_port"],
                                               mqtt_port=spec["mqtt_port"], transport=spec["transport"], max_retries=3,
                                               timeout=60, **auth), d["csr"]))
    except Exception as exc:  # noqa: BLE001 - reported to the parent instead of "ready"
        conn.send(f"{type(exc).__name__}: {exc}")
        conn.close()
        return

    async def run() -> dict[str, Any]:
        slots = asyncio.Semaphore(spec.get("concurrency") or len(clients) or 1)
        loop = asyncio.get_running_loop()

        async def one(client: ProvisioningClient, csr: str, delay: float) -> tuple[float | None, str | None]:
            if delay:
                await asyncio.sleep(delay)
            async with slots:
                started = loop.time()
                try:
                    result = await client.register(csr)
                    if not result.issued_chain:
                        return None, "assigned without an issued certificate"
                    return loop.time() - started, None
                except Exception as exc:  # noqa: BLE001 - one device's failure is counted, not fatal
                    return None, f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}".replace(
                        client.registration_id, "<id>")

        rate = spec.get("rate")
        begin = time.perf_counter()
        outcomes = await asyncio.gather(*(one(c, csr, i / rate if rate else 0.0) for i, (c, csr) in enumerate(clients)))
        return {"wall": time.perf_counter() - begin, "latencies": [t for t, _ in outcomes if t is not None],
                "errors": [e for _, e in outcomes if e is not None]}

    conn.send("ready")
    if conn.recv() == "go":
        conn.send(asyncio.run(run()))
    conn.close()


def provisioning(transport: str, attestation: str) -> Callable[[Options], list[Result]]:
    """Registration with a P-384 CSR over ``transport`` with ``attestation`` (``symmetric-key`` or ``x509``)."""
    name = f"provision-{transport}" + ("-x509" if attestation == "x509" else "")

    def scenario(opts: Options) -> list[Result]:
        import tempfile
        from concurrent.futures import ThreadPoolExecutor

        rows: list[Result] = []
        owner_ca = None
        if attestation == "x509":  # its RSA keys (~1.5 s) are made while the server starts (there; this one only polls)
            keygen = ThreadPoolExecutor(1)
            owner_ca = keygen.submit(OwnerCa)
            keygen.shutdown(wait=False)  # the key generation still runs; its thread ends after it
        with running_server(opts.db_url, opts.lint, profile=opts.profile(name), workers=opts.workers) as server, \
                tempfile.TemporaryDirectory() as tmp:
            credential: Any = create_symmetric_group(server) if owner_ca is None else create_x509_group(
                server, owner_ca.result())
            base = {"ca_file": str(server.ca_file), "id_scope": server.id_scope, "https_port": server.https_port,
                    "mqtt_port": server.mqtt_port, "transport": transport}

            def measure(label: str, count: int, **load: Any) -> Result:
                devices = prepare_devices(credential, f"{transport}-{label}", count, Path(tmp))
                outcome, cpu = run_load(_load_worker, {**base, **load, "devices": devices}, server.cpu_seconds)
                return load_row(name, transport, load.get("concurrency"), len(devices), outcome, cpu, server.pid,
                                attestation=attestation, **({"offered_rate": load["rate"]} if "rate" in load else {}))

            # warm-up, not recorded: first-use imports (pkilint), caches and the first operations sweep (every worker's)
            warm = warm_up_count(2, opts.workers)
            run_load(_load_worker, {**base, "concurrency": min(warm, 2 * opts.workers),
                                    "devices": prepare_devices(credential, f"{transport}-warm", warm, Path(tmp))},
                     server.pid)
            for level in opts.concurrency_levels:
                rows.append(measure(f"c{level}", opts.count_at(level), concurrency=level))
            best = max((r.throughput for r in rows), default=0.0)
            if not opts.quick and best > 0:  # open loop at half the best throughput, for about 30 s
                rate = round(best / 2, 3)
                rows.append(measure("half", opts.count or max(20, min(1000, int(rate * 30))), rate=rate))
        return rows

    return scenario


https_symmetric = provisioning("https", "symmetric-key")
mqtt_symmetric = provisioning("mqtt", "symmetric-key")
https_x509 = provisioning("https", "x509")
mqtt_x509 = provisioning("mqtt", "x509")
