"""The crypto ceiling: what the libraries alone do per CPU second, measured in the bench process.

* ``csr-issue``: parse + verify a P-384 CSR and issue a P-384/SHA-384 leaf with ``cryptography``, the
  library the server signs with. opendps' registrations per server CPU second ÷ this = the share of the
  server's CPU that is the unavoidable signing work.
* ``mtls-handshake``: the server side of a TLS 1.3 handshake in which the client presents a P-384
  certificate, with the server's own TLS context (:func:`opendps.transport.tls.device_tls_context`) and
  a P-256 server certificate as ``opendps init`` makes; only the server side's CPU (thread time) counts.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from opendps.bench._harness import BenchError, Options, Result, latency_summary, proc_peak_rss

QUICK_CRYPTO, FULL_CRYPTO = 200, 2000


def _row(kind: str, n: int, cpu: float, wall: float, latencies: list[float]) -> Result:
    per_op = cpu / n
    return Result(scenario="crypto-ceiling", transport=kind, concurrency=1, count=n, ok=n, errors=0,
                  wall_seconds=round(wall, 3), throughput=round(n / wall, 2), latency=latency_summary(latencies),
                  server_cpu_seconds=None, cpu_seconds_per_op=round(per_op, 6), peak_rss_bytes=proc_peak_rss(os.getpid()),
                  ops_per_cpu_second=round(1 / per_op, 1) if per_op else 0.0, system="cryptography")


def _certificate(name: str, key: Any, issuer: Any, issuer_key: Any, *, ca: bool) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH,
                                                               ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA384())


def csr_issue(n: int) -> Result:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from opendps.device.keys import new_key_and_csr

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench issuing CA")])
    ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    csrs = [base64.b64decode(new_key_and_csr(f"crypto-{i}", "P-384")[1]) for i in range(n)]
    latencies = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for der in csrs:
        started = time.perf_counter()
        csr = x509.load_der_x509_csr(der)
        if not csr.is_signature_valid:
            raise BenchError("a freshly made CSR does not verify")
        now = dt.datetime.now(dt.UTC)
        (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(ca_name).public_key(csr.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + dt.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
         .sign(ca_key, hashes.SHA384()))
        latencies.append(time.perf_counter() - started)
    return _row("csr-issue", n, time.process_time() - cpu0, time.perf_counter() - wall0, latencies)


def mtls_handshake(n: int) -> Result:
    """Server-side CPU of full mutual-TLS handshakes over memory BIOs (no sockets, no session reuse)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from OpenSSL import SSL

    from opendps.transport.tls import device_tls_context

    root_key = ec.generate_private_key(ec.SECP384R1())
    root = _certificate("bench root", root_key, None, None, ca=True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP384R1())
    server_cert = _certificate("localhost", server_key, root.subject, root_key, ca=False)
    client_cert = _certificate("device-1", client_key, root.subject, root_key, ca=False)
    pem = serialization.Encoding.PEM

    def key_pem(k: Any) -> bytes:
        return k.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "server.pem").write_bytes(server_cert.public_bytes(pem) + root.public_bytes(pem))
        (d / "server.key").write_bytes(key_pem(server_key))
        (d / "client.pem").write_bytes(client_cert.public_bytes(pem) + root.public_bytes(pem))
        (d / "client.key").write_bytes(key_pem(client_key))
        (d / "root.pem").write_bytes(root.public_bytes(pem))
        server_ctx = device_tls_context(d / "server.pem", d / "server.key", alpn=[b"mqtt"])
        client_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        client_ctx.use_certificate_chain_file(str(d / "client.pem"))
        client_ctx.use_privatekey_file(str(d / "client.key"))
        client_ctx.load_verify_locations(str(d / "root.pem"))
        client_ctx.set_verify(SSL.VERIFY_PEER, lambda *_a: True)
        client_ctx.set_alpn_protos([b"mqtt"])

    latencies, server_cpu = [], 0.0
    wall0 = time.perf_counter()
    for _ in range(n):
        server, client = SSL.Connection(server_ctx), SSL.Connection(client_ctx)
        server.set_accept_state()
        client.set_connect_state()
        client.set_tlsext_host_name(b"localhost")
        started, done = time.perf_counter(), False
        for _round in range(10):
            with _suppress_want():
                client.do_handshake()
            _pump(client, server)
            t0 = time.thread_time()
            with _suppress_want():
                server.do_handshake()
                done = True
            server_cpu += time.thread_time() - t0
            _pump(server, client)
            if done:
                with _suppress_want():
                    client.do_handshake()
                break
        if not done or server.get_peer_certificate() is None:
            raise BenchError("the in-memory mutual-TLS handshake did not complete")
        latencies.append(time.perf_counter() - started)
    return _row("mtls-handshake", n, server_cpu, time.perf_counter() - wall0, latencies)


class _suppress_want:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        from OpenSSL import SSL

        return kind is not None and issubclass(kind, SSL.WantReadError)


def _pump(src: Any, dst: Any) -> None:
    from OpenSSL import SSL

    while True:
        try:
            data = src.bio_read(65536)
        except SSL.WantReadError:
            return
        dst.bio_write(data)


def crypto_ceiling(opts: Options) -> list[Result]:
    n = opts.count or (QUICK_CRYPTO if opts.quick else FULL_CRYPTO)
    return [csr_issue(n), mtls_handshake(n)]
