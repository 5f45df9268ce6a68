"""Device-plane TLS layer (opendps.transport.tls) over real loopback sockets.

The server runs in a background thread with its own event loop; clients are stdlib ``ssl`` +
``http.client`` and the real ``openssl s_client``. Certificates are throwaway ones made here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import logging
import os
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from opendps.logs import LineBudget
from opendps.transport.tls import TlsTransport, device_tls_context, start_aiohttp_site, start_tls_server

BIG_RESPONSE = hashlib.sha256(b"seed").digest() * (5 * 1024 * 1024 // 32)  # 5 MiB, not compressible to zero
BIG_REQUEST = bytes(range(256)) * (2 * 1024 * 1024 // 256)  # 2 MiB


# --- throwaway PKI ----------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, *, ca: bool, days: tuple[int, int] = (-1, 2),
          san: list[x509.GeneralName] | None = None) -> x509.Certificate:
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now + timedelta(days=days[0])).not_valid_after(now + timedelta(days=days[1]))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass
class Identity:
    """A client identity: PEM files for stdlib (leaf+chain in one file) and for s_client (split)."""

    subjects: list[str]  # what the server must report, leaf first
    bundle: Path  # leaf + intermediates
    leaf: Path
    chain: Path | None  # intermediates only
    key: Path


@dataclass
class Pki:
    server_root: Path
    server_chain: Path
    server_key: Path
    client_root: x509.Certificate
    ids: dict[str, Identity]


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("tls-pki")
    # server: P-256 root -> P-256 intermediate -> P-256 leaf (localhost, 127.0.0.1); file = leaf + intermediate
    s_root_key, s_ica_key, s_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    s_root = _cert("Test Server Root", s_root_key, "Test Server Root", s_root_key, ca=True)
    s_ica = _cert("Test Server ICA", s_ica_key, "Test Server Root", s_root_key, ca=True)
    s_leaf = _cert("localhost", s_key, "Test Server ICA", s_ica_key, ca=False,
                   san=[x509.DNSName("localhost"), x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))])
    (d / "server-root.pem").write_bytes(_pem(s_root))
    (d / "server.pem").write_bytes(_pem(s_leaf, s_ica))
    (d / "server.key").write_bytes(_key_pem(s_key))

    # clients: P-384 root -> P-384 intermediate -> leaves
    c_root_key, c_ica_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    c_root = _cert("Test Client Root", c_root_key, "Test Client Root", c_root_key, ca=True)
    c_ica = _cert("Test Client ICA", c_ica_key, "Test Client Root", c_root_key, ca=True)
    ids: dict[str, Identity] = {}

    def add(label: str, leaf: x509.Certificate, key, intermediates: list[x509.Certificate]) -> None:
        (d / f"{label}.bundle.pem").write_bytes(_pem(leaf, *intermediates))
        (d / f"{label}.leaf.pem").write_bytes(_pem(leaf))
        chain = None
        if intermediates:
            chain = d / f"{label}.chain.pem"
            chain.write_bytes(_pem(*intermediates))
        (d / f"{label}.key").write_bytes(_key_pem(key))
        subjects = [c.subject.rfc4514_string() for c in (leaf, *intermediates)]
        ids[label] = Identity(subjects, d / f"{label}.bundle.pem", d / f"{label}.leaf.pem", chain, d / f"{label}.key")

    k = ec.generate_private_key(ec.SECP384R1())
    add("chained", _cert("device-chained", k, "Test Client ICA", c_ica_key, ca=False), k, [c_ica])
    k = ec.generate_private_key(ec.SECP384R1())
    add("selfsigned", _cert("device-selfsigned", k, "device-selfsigned", k, ca=False), k, [])
    k = ec.generate_private_key(ec.SECP384R1())
    add("expired", _cert("device-expired", k, "Test Client ICA", c_ica_key, ca=False, days=(-30, -1)), k, [c_ica])
    k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    add("rsa", _cert("device-rsa", k, "Test Client ICA", c_ica_key, ca=False), k, [c_ica])
    return Pki(d / "server-root.pem", d / "server.pem", d / "server.key", c_root, ids)


# --- server in a background thread ------------------------------------------------------------


def _subjects(request: web.Request) -> list[str]:
    transport = request.transport
    assert isinstance(transport, TlsTransport)
    return [c.subject.rfc4514_string() for c in transport.get_extra_info("peer_certificate_chain")]


async def _whoami(request: web.Request) -> web.Response:
    t = request.transport
    assert t is not None
    return web.json_response({
        "chain": _subjects(request),
        "ca_objects": [id(c) for c in request.transport.get_extra_info("peer_certificate_chain")[1:]],  # type: ignore[union-attr]
        "tls_version": t.get_extra_info("tls_version"),
        "cipher": t.get_extra_info("cipher"),
        "alpn": t.get_extra_info("alpn_protocol"),
        "peer_port": t.get_extra_info("peername")[1],
        "scheme": request.scheme,
    })


async def _big(request: web.Request) -> web.Response:
    return web.Response(body=BIG_RESPONSE, content_type="application/octet-stream")


async def _upload(request: web.Request) -> web.Response:
    transport = request.transport
    assert transport is not None
    await asyncio.sleep(0.2)  # let the body pile up: aiohttp must pause reading on our transport
    paused = not transport.is_reading()
    body = await request.read()
    return web.json_response({"length": len(body), "sha256": hashlib.sha256(body).hexdigest(), "paused": paused})


class ServerThread:
    """An event loop in a daemon thread; ``call`` runs a coroutine there and waits for its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tls-test-loop", daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class AiohttpServer(ServerThread):
    def __init__(self, context: SSL.Context, **kw: Any) -> None:
        super().__init__()
        self.runner: web.AppRunner | None = None
        self.server: asyncio.Server | None = None
        self.port = self.call(self._start(context, kw))

    async def _start(self, context: SSL.Context, kw: dict) -> int:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_get("/whoami", _whoami)
        app.router.add_get("/big", _big)
        app.router.add_post("/upload", _upload)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        self.server = await start_aiohttp_site(self.runner, "127.0.0.1", 0, context, **kw)
        return self.server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self.runner is not None and self.server is not None
        await self.runner.cleanup()
        self.server.close()
        await self.server.wait_closed()

    def stop(self) -> float:
        """Graceful shutdown; returns how long it took."""
        start = time.monotonic()
        self.call(self._stop(), timeout=30)
        elapsed = time.monotonic() - start
        self.close()
        return elapsed


@pytest.fixture(autouse=True)
def _fresh_line_budget(monkeypatch):
    """Each test sees its own lines: the TLS layer's per-minute budget of them is the process's (see
    test_lines_about_single_connections_are_bounded_per_minute)."""
    from opendps.transport import tls

    monkeypatch.setattr(tls, "_connection_line", LineBudget(tls.log, tls.CONNECTION_LINES))


@pytest.fixture(scope="module")
def server(pki) -> AiohttpServer:
    ctx = device_tls_context(pki.server_chain, pki.server_key, alpn=[b"http/1.1"])
    srv = AiohttpServer(ctx)
    yield srv
    srv.stop()


async def _close_server(server: asyncio.Server) -> None:
    server.close()
    await server.wait_closed()


# --- clients ----------------------------------------------------------------------------------


def _client_ctx(pki: Pki, identity: Identity | None = None, version: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.server_root))
    if identity is not None:
        ctx.load_cert_chain(str(identity.bundle), str(identity.key))
    if version == "1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    elif version == "1.3":
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


def _get_json(port: int, ctx: ssl.SSLContext, path: str = "/whoami") -> dict:
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 200
        return json.loads(resp.read())
    finally:
        conn.close()


def _s_client(port: int, pki: Pki, *args: str, identity: Identity | None = None, request: bytes | None = None,
              quiet: bool = True) -> bytes:
    """Run ``openssl s_client``; with ``request``, send it and read until the server closes."""
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
           "-CAfile", str(pki.server_root), "-verify_return_error", *args]
    if quiet:
        cmd.append("-quiet")
    if identity is not None:
        cmd += ["-cert", str(identity.leaf), "-key", str(identity.key)]
        if identity.chain is not None:
            cmd += ["-cert_chain", str(identity.chain)]
    with subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        killer = threading.Timer(10, proc.kill)
        killer.start()
        try:
            assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
            if request is not None:
                proc.stdin.write(request)
                proc.stdin.flush()
                out = proc.stdout.read()  # the server closes after the response (Connection: close)
                proc.stdin.close()
                err = proc.stderr.read()
            else:
                out, err = proc.communicate(b"")
            proc.wait(10)
        finally:
            killer.cancel()
    assert proc.returncode == 0, err
    return out


def _http_body(raw: bytes) -> dict:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw[:200]
    return json.loads(body)


def _wait_closed(sock: socket.socket, timeout: float = 5.0) -> float:
    """Read until the peer closes; returns the time that took."""
    start = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - start


# --- tests: chains --------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_no_client_certificate_gives_empty_chain(server, pki, version):
    got = _get_json(server.port, _client_ctx(pki, None, version))
    assert got["chain"] == []
    assert got["tls_version"] == f"TLSv{version}"
    assert got["scheme"] == "https"
    assert got["alpn"] == "http/1.1"  # server preference, though the client offered h2 first


@pytest.mark.parametrize("version", ["1.2", "1.3"])
@pytest.mark.parametrize("label", ["chained", "selfsigned", "expired", "rsa"])
def test_any_client_chain_is_accepted_and_reported_as_sent(server, pki, label, version):
    identity = pki.ids[label]
    got = _get_json(server.port, _client_ctx(pki, identity, version))
    assert got["chain"] == identity.subjects
    assert got["tls_version"] == f"TLSv{version}"
    name, proto, bits = got["cipher"]
    assert proto == f"TLSv{version}" and bits >= 128 and name


def test_openssl_checks_no_more_of_a_long_client_chain_than_the_leaf_and_its_issuer(pki, monkeypatch, tmp_path):
    """OpenSSL's verdict on the client chain is never used, yet it walked and checked up to 100 certificates of it in
    the handshake (a replayed chain of CA certificates: 10-70x a normal handshake's CPU, on the event loop). It now
    looks at the leaf and its issuer only; the whole chain still reaches the application as sent."""
    from tests.x509_helpers import make_ca, make_leaf

    import opendps.transport.tls as tls

    depths: list[int] = []

    def record(conn: SSL.Connection, cert: Any, errnum: int, depth: int, ok: int) -> bool:
        depths.append(depth)
        return True

    monkeypatch.setattr(tls, "_accept_any_chain", record)
    cas = [make_ca("chain-root")]
    for i in range(1, 21):
        cas.append(make_ca(f"chain-ca-{i}", cas[-1]))
    leaf, key = make_leaf("chain-device", cas[-1])
    sent = [leaf, *(ca.cert for ca in reversed(cas))]
    (tmp_path / "chain.pem").write_bytes(_pem(*sent))
    (tmp_path / "key.pem").write_bytes(_key_pem(key))
    ctx = _client_ctx(pki)
    ctx.load_cert_chain(str(tmp_path / "chain.pem"), str(tmp_path / "key.pem"))
    srv = AiohttpServer(device_tls_context(pki.server_chain, pki.server_key))
    try:
        got = _get_json(srv.port, ctx)
    finally:
        srv.stop()
    assert got["chain"] == [c.subject.rfc4514_string() for c in sent]
    assert depths and max(depths) <= 1, sorted(set(depths))


def _version_4(cert: x509.Certificate) -> bytes:
    """``cert`` as PEM with its version field set to 3 (v4): OpenSSL takes it, cryptography cannot load it."""
    der = cert.public_bytes(serialization.Encoding.DER)
    at = der.index(b"\xa0\x03\x02\x01\x02")  # [0] EXPLICIT Version v3 (2)
    patched = der[:at] + b"\xa0\x03\x02\x01\x03" + der[at + 5:]
    with pytest.raises(x509.InvalidVersion):
        x509.load_der_x509_certificate(patched)
    return b"-----BEGIN CERTIFICATE-----\n" + __import__("base64").encodebytes(patched) + b"-----END CERTIFICATE-----\n"


@pytest.mark.parametrize("bad", ["leaf", "ca"])
def test_a_client_certificate_cryptography_cannot_load_is_left_out_not_a_crash(server, pki, bad, tmp_path, caplog):
    """A leaf cryptography cannot load leaves the chain empty (no credential to check: the domain refuses as if none
    was sent); such a CA certificate after the leaf is left out. Both were an exception out of
    ``get_extra_info`` (InvalidVersion is not a ValueError): a 500, or an internal error at a hub CONNECT."""
    identity = pki.ids["chained"]
    leaf, ica = x509.load_pem_x509_certificates(identity.bundle.read_bytes())
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(_version_4(leaf) + _pem(ica) if bad == "leaf" else _pem(leaf) + _version_4(ica))
    ctx = ssl.create_default_context(cafile=str(pki.server_root))
    ctx.load_cert_chain(str(bundle), str(identity.key))
    with caplog.at_level(logging.INFO, logger="opendps.tls"):
        got = _get_json(server.port, ctx)
    assert got["chain"] == ([] if bad == "leaf" else ["CN=device-chained"])
    assert "cannot be read" in caplog.text


def test_chain_order_is_leaf_first(pki, server):
    got = _get_json(server.port, _client_ctx(pki, pki.ids["chained"], "1.3"))
    assert got["chain"] == ["CN=device-chained", "CN=Test Client ICA"]


def test_connections_sending_the_same_ca_share_one_parsed_copy(pki, server):
    """Each connection keeps its peer chain for its life; a fleet's devices send the same issuing CA, so the server keeps
    one parsed copy of it, not one per device (both connections stay open: neither copy could have been freed)."""
    ctx = _client_ctx(pki, pki.ids["chained"], "1.3")
    first = http.client.HTTPSConnection("localhost", server.port, context=ctx, timeout=10)
    second = http.client.HTTPSConnection("localhost", server.port, context=ctx, timeout=10)
    try:
        answers = []
        for conn in (first, second, first):
            conn.request("GET", "/whoami")
            response = conn.getresponse()
            assert response.status == 200
            answers.append(json.loads(response.read()))
    finally:
        first.close()
        second.close()
    assert answers[0]["peer_port"] == answers[2]["peer_port"] != answers[1]["peer_port"]  # two connections, one reused
    assert all(a["chain"] == pki.ids["chained"].subjects for a in answers)
    assert answers[0]["ca_objects"] == answers[1]["ca_objects"] == answers[2]["ca_objects"]


@pytest.mark.parametrize("flag", ["-tls1_2", "-tls1_3"])
@pytest.mark.parametrize("label", [None, "chained", "expired"])
def test_openssl_s_client(server, pki, flag, label):
    identity = pki.ids[label] if label else None
    raw = _s_client(server.port, pki, flag, identity=identity,
                    request=b"GET /whoami HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    got = _http_body(raw)
    assert got["chain"] == (identity.subjects if identity else [])
    assert got["tls_version"] == {"-tls1_2": "TLSv1.2", "-tls1_3": "TLSv1.3"}[flag]


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_no_session_resumption_so_every_connection_shows_its_chain(server, pki, version):
    ctx = _client_ctx(pki, pki.ids["chained"], version)
    ctx.set_alpn_protocols(["http/1.1"])
    session = None
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s:
            s.sendall(b"GET /whoami HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            assert not s.session_reused
            assert _http_body(data)["chain"] == pki.ids["chained"].subjects
            session = s.session
            assert session is not None
            # TLS 1.3: OpenSSL still issues (stateful) tickets with OP_NO_TICKET; the client offers one on the
            # second connection and the server, with its session cache off, must answer with a full handshake.
            assert session.has_ticket == (version == "1.3"), (session.has_ticket, session.id)


def test_acceptable_ca_names_empty_by_default_and_configurable(server, pki):
    out = _s_client(server.port, pki, "-tls1_2", quiet=False).decode()
    assert "No client certificate CA names sent" in out
    ctx = device_tls_context(pki.server_chain, pki.server_key, client_ca_certs=[pki.client_root])
    other = AiohttpServer(ctx)
    try:
        for flag in ("-tls1_2", "-tls1_3"):
            out = _s_client(other.port, pki, flag, quiet=False).decode()
            assert "Acceptable client certificate CA names\nCN = Test Client Root\n" in out, out
    finally:
        other.stop()


# --- tests: HTTP behaviour over the layer -------------------------------------------------------


def test_keep_alive_two_requests_on_one_connection(server, pki):
    conn = http.client.HTTPSConnection("localhost", server.port, context=_client_ctx(pki, pki.ids["rsa"]), timeout=10)
    try:
        answers = []
        for _ in range(2):
            conn.request("GET", "/whoami")
            resp = conn.getresponse()
            assert resp.status == 200
            answers.append(json.loads(resp.read()))
            sock = conn.sock
        assert conn.sock is sock  # http.client did not reconnect
        assert answers[0] == answers[1]
        assert answers[0]["peer_port"] == sock.getsockname()[1]
        assert answers[0]["chain"] == pki.ids["rsa"].subjects
    finally:
        conn.close()


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_large_bodies_arrive_intact(server, pki, version):
    conn = http.client.HTTPSConnection("localhost", server.port, context=_client_ctx(pki, pki.ids["chained"], version),
                                       timeout=10)
    try:
        conn.request("GET", "/big")
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200
        assert len(body) == len(BIG_RESPONSE)
        assert hashlib.sha256(body).digest() == hashlib.sha256(BIG_RESPONSE).digest()
        # same connection: a 2 MiB upload, read by the server through pause/resume_reading
        conn.request("POST", "/upload", body=BIG_REQUEST, headers={"Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        assert resp.status == 200
        assert json.loads(resp.read()) == {"length": len(BIG_REQUEST), "sha256": hashlib.sha256(BIG_REQUEST).hexdigest(),
                                           "paused": True}
    finally:
        conn.close()


# --- tests: failures ----------------------------------------------------------------------------


def _tls_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "opendps.tls"]


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"\x16\x03\x01\x00\x30" + bytes(range(0x30)),  # a handshake record holding nonsense
    b"\x16\x03\x01\x00\x05",  # a truncated record header, then EOF
], ids=["plain-http", "bad-clienthello", "truncated"])
def test_garbage_closes_only_that_connection_and_logs_one_line(server, pki, caplog, garbage):
    caplog.set_level(logging.DEBUG, logger="opendps.tls")
    good = http.client.HTTPSConnection("localhost", server.port, context=_client_ctx(pki, pki.ids["chained"]), timeout=10)
    try:
        good.request("GET", "/whoami")
        assert json.loads(good.getresponse().read())["chain"] == pki.ids["chained"].subjects
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as bad:
            bad_port = bad.getsockname()[1]
            bad.sendall(garbage)
            if garbage.endswith(b"\x00\x05"):
                bad.shutdown(socket.SHUT_WR)
            assert _wait_closed(bad) < 4
        # the connection opened before keeps working, and so does a new one
        good.request("GET", "/whoami")
        assert json.loads(good.getresponse().read())["chain"] == pki.ids["chained"].subjects
        assert _get_json(server.port, _client_ctx(pki, pki.ids["selfsigned"]))["chain"] == ["CN=device-selfsigned"]
    finally:
        good.close()
    time.sleep(0.1)  # let the server notice the closed bad socket (it must not log again)
    records = _tls_records(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    message = records[0].getMessage()
    assert f"127.0.0.1:{bad_port}" in message and "handshake" in message
    assert records[0].levelno in (logging.INFO, logging.WARNING)
    assert records[0].exc_info is None and "Traceback" not in message and "\n" not in message
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_corrupted_record_after_handshake_closes_with_one_line(server, pki, caplog):
    caplog.set_level(logging.DEBUG, logger="opendps.tls")
    ctx = _client_ctx(pki, pki.ids["chained"], "1.3")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        port = raw.getsockname()[1]
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            # bypass TLS: an application-data record whose authentication tag cannot be right
            socket.socket.sendall(s, b"\x17\x03\x03\x00\x40" + os.urandom(0x40))
            with pytest.raises((ssl.SSLError, ConnectionResetError)):
                while s.recv(65536):
                    pass
    time.sleep(0.1)
    records = _tls_records(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    assert f"127.0.0.1:{port}" in records[0].getMessage()
    assert _get_json(server.port, _client_ctx(pki))["chain"] == []


def test_silent_client_is_closed_after_handshake_timeout(pki, caplog):
    caplog.set_level(logging.DEBUG, logger="opendps.tls")
    srv = AiohttpServer(device_tls_context(pki.server_chain, pki.server_key), handshake_timeout=0.5)
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as idle:
            port = idle.getsockname()[1]
            waited = _wait_closed(idle)
        assert 0.4 <= waited < 3
        records = _tls_records(caplog)
        assert len(records) == 1
        assert f"127.0.0.1:{port}" in records[0].getMessage() and "timed out" in records[0].getMessage()
        # a client that completes the handshake in time is served
        assert _get_json(srv.port, _client_ctx(pki, pki.ids["expired"]))["chain"] == pki.ids["expired"].subjects
    finally:
        srv.stop()


def test_lines_about_single_connections_are_bounded_per_minute(monkeypatch, caplog):
    """A flood of silent connections wrote a line per timed-out handshake (7,900 in 35 s under a live flood): now at
    most the budget a minute, and the next minute's first line says how many were left out."""
    from opendps.transport import tls

    caplog.set_level(logging.INFO, logger="opendps.tls")
    clock = [1000.0]
    monkeypatch.setattr(tls.time, "monotonic", lambda: clock[0])
    budget = LineBudget(tls.log, tls.CONNECTION_LINES, per_minute=5)
    for i in range(12):
        budget(logging.INFO, "TLS handshake with %s failed: timed out", f"peer-{i}")
    assert [r.getMessage() for r in caplog.records] == [f"TLS handshake with peer-{i} failed: timed out" for i in range(5)]
    clock[0] += 61
    budget(logging.INFO, "TLS handshake with %s failed: timed out", "peer-next")
    assert [r.getMessage() for r in caplog.records[5:]] == [
        "7 more lines about single TLS connections (failed handshakes, connections cut) were not written in the last "
        "minute", "TLS handshake with peer-next failed: timed out"]
    caplog.clear()
    budget(logging.DEBUG, "not enabled: %s", "x")  # a level not logged costs nothing and counts nothing
    assert caplog.records == [] and budget._written == 1


def test_a_full_listener_closes_a_silent_connection_for_a_new_one_but_never_an_answered_one(pki):
    """The gate's "answered" is the TLS layer's first write: connections served a response stay when the listener
    is full (a new one is refused), one that never sent a byte makes room for a new one (it was refused instead)."""
    from opendps.transport.tls import ConnectionGate

    srv = AiohttpServer(device_tls_context(pki.server_chain, pki.server_key), gate=ConnectionGate("HTTPS", 3))
    ctx = _client_ctx(pki, pki.ids["chained"])
    served: list[ssl.SSLSocket] = []
    try:
        for _ in range(3):
            s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", srv.port), timeout=5), server_hostname="localhost")
            s.sendall(b"GET /whoami HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert _read_response(s)[0].startswith(b"HTTP/1.1 200")
            served.append(s)
        with pytest.raises((ConnectionError, ssl.SSLError, TimeoutError)):  # full of answered ones: refused
            _get_json(srv.port, ctx)
        served.pop().close()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as silent:
            time.sleep(0.2)  # admitted: the listener is full again, with one that never sent a byte
            assert _get_json(srv.port, ctx)["chain"] == pki.ids["chained"].subjects  # it made room
            assert _wait_closed(silent) < 1
        for s in served:  # the answered ones are still served
            s.sendall(b"GET /whoami HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert _read_response(s)[0].startswith(b"HTTP/1.1 200")
    finally:
        for s in served:
            s.close()
        srv.stop()


def test_a_full_https_listener_closes_its_oldest_idle_keep_alive_connection_cleanly(pki):
    """With the HTTPS gate's idle check (as the server's): answered keep-alive connections between requests make room
    for a new one, the oldest first, closed as a keep-alive timeout closes them (close_notify, then FIN); one whose
    request is still arriving (an upload's body) is kept and finishes; the others are still served."""
    from opendps.transport.tls import ConnectionGate, http_keepalive_idle

    srv = AiohttpServer(device_tls_context(pki.server_chain, pki.server_key),
                        gate=ConnectionGate("HTTPS", 3, idle=http_keepalive_idle))
    ctx = _client_ctx(pki, pki.ids["chained"])
    opened: list[ssl.SSLSocket] = []

    def connect() -> ssl.SSLSocket:
        s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", srv.port), timeout=5), server_hostname="localhost",
                            suppress_ragged_eofs=False)
        opened.append(s)
        return s

    def served(s: ssl.SSLSocket) -> bool:
        s.sendall(b"GET /whoami HTTP/1.1\r\nHost: localhost\r\n\r\n")
        return _read_response(s)[0].startswith(b"HTTP/1.1 200")

    try:
        uploading = connect()
        uploading.sendall(b"GET /whoami HTTP/1.1\r\nHost: localhost\r\n\r\n")  # answered first: the oldest
        _read_response(uploading)
        uploading.sendall(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\n12345")
        idle_one, idle_two = connect(), connect()
        assert served(idle_one) and served(idle_two)
        time.sleep(0.3)  # the upload's handler waits for the rest of its body
        newcomer = connect()
        assert served(newcomer)  # admitted: the oldest idle one made room
        assert idle_one.recv(65536) == b""  # close_notify then FIN (a bare FIN or a reset would raise here)
        uploading.sendall(b"67890")
        head, body = _read_response(uploading)
        assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["length"] == 10
        assert served(idle_two) and served(newcomer)
    finally:
        for s in opened:
            s.close()
        srv.stop()


def _read_response(s: ssl.SSLSocket) -> tuple[bytes, bytes]:
    """One HTTP/1.1 response with Content-Length from a keep-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += s.recv(65536)
    return head, body


def test_shutdown_with_idle_keep_alive_connection_is_prompt(pki):
    srv = AiohttpServer(device_tls_context(pki.server_chain, pki.server_key))
    stopped = False
    try:
        ctx = _client_ctx(pki, pki.ids["chained"])
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False) as s:
            s.sendall(b"GET /whoami HTTP/1.1\r\nHost: localhost\r\n\r\n")
            head, body = _read_response(s)
            assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" not in head  # kept alive, now idle
            assert json.loads(body)["chain"] == pki.ids["chained"].subjects
            with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as half:
                half.sendall(b"\x16\x03\x01")  # a handshake that has started but will not finish
                time.sleep(0.1)
                elapsed = srv.stop()
                stopped = True
                assert elapsed < 3
                assert _wait_closed(half) < 2  # aborted by the shutdown, not by the 10 s handshake timeout
            # close_notify, then FIN: a clean EOF (a bare FIN would raise SSLEOFError here)
            assert s.recv(65536) == b""
    finally:
        if not stopped:
            srv.stop()


# --- tests: the raw layer with a non-aiohttp inner protocol -----------------------------------


class Recorder(asyncio.Protocol):
    """Inner protocol that records what it sees and echoes data upper-cased."""

    def __init__(self, events: list, done: threading.Event) -> None:
        self.events, self.done = events, done
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        chain = transport.get_extra_info("peer_certificate_chain")
        self.events.append(("made", [c.subject.rfc4514_string() for c in chain], transport.get_extra_info("tls_version"),
                            transport.get_extra_info("socket") is not None, transport.can_write_eof()))

    def data_received(self, data: bytes) -> None:
        self.events.append(("data", data))
        assert self.transport is not None
        self.transport.write(data.upper())

    def eof_received(self) -> None:
        self.events.append(("eof",))

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append(("lost", exc))
        self.done.set()


def test_raw_layer_close_notify_reaches_inner_protocol(pki):
    loop_thread = ServerThread()
    events: list = []
    done = threading.Event()
    factory: Callable[[], asyncio.Protocol] = lambda: Recorder(events, done)  # noqa: E731
    ctx = device_tls_context(pki.server_chain, pki.server_key)
    server = loop_thread.call(start_tls_server(factory, "127.0.0.1", 0, ctx, handshake_timeout=2))
    try:
        port = server.sockets[0].getsockname()[1]
        client = _client_ctx(pki, pki.ids["selfsigned"], "1.3")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                client.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(b"hello")
            assert s.recv(100) == b"HELLO"
            s.unwrap().close()  # sends close_notify and waits for the server's: eof_received -> close
        assert done.wait(5)
        assert events == [("made", ["CN=device-selfsigned"], "TLSv1.3", True, False), ("data", b"hello"), ("eof",),
                          ("lost", None)]
    finally:
        loop_thread.call(_close_server(server))  # on its loop: asyncio.Server is not thread-safe
        loop_thread.close()


class FlowProbe(asyncio.Protocol):
    """Writes BIG_RESPONSE at once (the socket must push back), then pauses reading for a while."""

    def __init__(self, events: list, done: threading.Event) -> None:
        self.events, self.done = events, done
        self.transport: asyncio.Transport | None = None
        self.paused_reading = False
        self.received = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(BIG_RESPONSE)
        self.events.append(("wrote", transport.get_write_buffer_size() > 0))

    def pause_writing(self) -> None:
        self.events.append(("pause_writing",))

    def resume_writing(self) -> None:
        self.events.append(("resume_writing",))

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.paused_reading:
            self.events.append(("data while paused", len(data)))
        if not self.received:  # first bytes: hold the sender back for 0.3 s
            self.transport.pause_reading()
            self.paused_reading = True
            self.events.append(("pause_reading", self.transport.is_reading()))
            asyncio.get_running_loop().call_later(0.3, self._resume)
        self.received += data
        if len(self.received) == len(BIG_REQUEST):
            self.transport.write(hashlib.sha256(self.received).hexdigest().encode())

    def _resume(self) -> None:
        assert self.transport is not None
        self.paused_reading = False
        self.transport.resume_reading()
        self.events.append(("resume_reading", self.transport.is_reading()))

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append(("lost", exc))
        self.done.set()


def test_raw_layer_flow_control_both_directions(pki):
    loop_thread = ServerThread()
    events: list = []
    done = threading.Event()
    factory: Callable[[], asyncio.Protocol] = lambda: FlowProbe(events, done)  # noqa: E731
    server = loop_thread.call(start_tls_server(factory, "127.0.0.1", 0, device_tls_context(pki.server_chain, pki.server_key)))
    try:
        port = server.sockets[0].getsockname()[1]
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # a slow reader's small window
        raw.settimeout(10)
        raw.connect(("127.0.0.1", port))
        with _client_ctx(pki, None, "1.3").wrap_socket(raw, server_hostname="localhost") as s:
            time.sleep(0.3)  # not reading: the server's socket buffer fills up
            got = bytearray()
            while len(got) < len(BIG_RESPONSE):
                got += s.recv(1 << 20)
            assert got == BIG_RESPONSE
            s.sendall(BIG_REQUEST)  # blocks while the server holds reading paused
            assert s.recv(100) == hashlib.sha256(BIG_REQUEST).hexdigest().encode()
        assert done.wait(5)
        # pause_writing comes from inside write(): the socket transport's buffer passed its high-water mark
        assert events == [("pause_writing",), ("wrote", True), ("resume_writing",), ("pause_reading", False),
                          ("resume_reading", True), ("lost", None)]
    finally:
        loop_thread.call(_close_server(server))  # on its loop: asyncio.Server is not thread-safe
        loop_thread.close()


class Silent(asyncio.Protocol):
    """Inner protocol that never writes; shrinks the server socket's send buffer so that output backs up at once."""

    def __init__(self, made: list) -> None:
        self.made = made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.made.append(transport)


def _libssl() -> Any:
    """The libssl the stdlib ``ssl`` module links (its ``SSL_key_update``, which neither ``ssl`` nor pyOpenSSL offers)."""
    import _ssl
    import ctypes

    lib = ctypes.CDLL(_ssl.__file__)
    if not hasattr(lib, "SSL_key_update"):
        pytest.skip("the stdlib's libssl has no SSL_key_update")
    lib.TLS_client_method.restype = lib.SSL_CTX_new.restype = lib.SSL_new.restype = ctypes.c_void_p
    lib.SSL_CTX_new.argtypes = lib.SSL_new.argtypes = [ctypes.c_void_p]
    lib.SSL_set_fd.argtypes = lib.SSL_key_update.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.SSL_connect.argtypes = lib.SSL_do_handshake.argtypes = lib.SSL_free.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_free.argtypes = [ctypes.c_void_p]
    return lib


def test_a_key_update_storm_from_a_peer_that_reads_nothing_is_not_buffered(pki):
    """TLS 1.3 KeyUpdates asking for ours are answered by OpenSSL itself, out of the inner protocol's flow control:
    a peer sending them and reading nothing had every answer buffered (22 bytes per 22 received, 26 MB a minute at a
    core's pace). The layer stops reading from a peer that does not read what it is sent, so the sender is held back
    and the buffer stays near the transport's high-water mark."""
    lib = _libssl()
    loop_thread = ServerThread()
    made: list = []
    server = loop_thread.call(start_tls_server(lambda: Silent(made), "127.0.0.1", 0,
                                               device_tls_context(pki.server_chain, pki.server_key)))
    ctx = lib.SSL_CTX_new(lib.TLS_client_method())
    conn = None
    try:
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # reads nothing: the server's answers back up
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        raw.connect(("127.0.0.1", server.sockets[0].getsockname()[1]))
        conn = lib.SSL_new(ctx)
        lib.SSL_set_fd(conn, raw.fileno())
        assert lib.SSL_connect(conn) == 1
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 500_000))  # held back: 0.5 s, stop
        sent = 0
        while sent < 40_000 and lib.SSL_key_update(conn, 1) == 1 and lib.SSL_do_handshake(conn) == 1:
            sent += 1

        async def buffered() -> int:
            await asyncio.sleep(0.2)  # what arrived is read
            return made[0].get_write_buffer_size()

        assert sent < 40_000, "the server kept reading from a peer that reads nothing"
        assert loop_thread.call(buffered()) < 256 * 1024
    finally:
        if conn is not None:
            lib.SSL_free(conn)
        lib.SSL_CTX_free(ctx)
        raw.close()
        loop_thread.call(_close_server(server))
        loop_thread.close()


def test_an_aborted_connection_drops_what_the_kernel_still_holds_for_the_peer(pki):
    """``abort()`` (an MQTT session closed by the application: a device disabled, taken over, past its desired-push
    bound) dropped our buffer but closed the socket plainly: the kernel went on sending what it held, then a FIN, to a
    peer that may read slowly for minutes. Now the peer gets a reset at once (SO_LINGER 0), as after the write
    deadline."""
    loop_thread = ServerThread()
    made: list = []
    server = loop_thread.call(start_tls_server(lambda: Silent(made), "127.0.0.1", 0,
                                               device_tls_context(pki.server_chain, pki.server_key)))
    raw = socket.socket()
    try:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.connect(("127.0.0.1", server.sockets[0].getsockname()[1]))
        client = _client_ctx(pki).wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False)

        async def flood_then_abort() -> None:
            await asyncio.sleep(0.1)
            made[0].write(b"x" * 4_000_000)  # unread: our buffer and the kernel's fill
            await asyncio.sleep(0.3)
            made[0].abort()
            await asyncio.sleep(0.1)

        loop_thread.call(flood_then_abort())
        with socket.socket(fileno=os.dup(client.fileno())) as tcp:  # TCP itself: a reset, not the TLS layer's EOF
            tcp.settimeout(5)
            with pytest.raises(ConnectionResetError):  # a plain close: the kernel's bytes, then a FIN (b"")
                while tcp.recv(65536):
                    pass
        client.close()
    finally:
        raw.close()
        loop_thread.call(_close_server(server))
        loop_thread.close()


class Echo(asyncio.Protocol):
    """Answers ``big`` with 64 KB, anything else upper-cased."""

    def __init__(self, done: threading.Event) -> None:
        self.done = done
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(BIG_RESPONSE[:65536] if data == b"big" else data.upper())

    def connection_lost(self, exc: Exception | None) -> None:
        self.done.set()


def test_memory_bios_are_renewed_after_the_handshake_and_after_bursts(pki, monkeypatch):
    """An idle connection keeps no handshake-sized BIO buffers (OpenSSL's memory BIOs never shrink): fresh BIOs
    after the handshake and after a burst larger than the keep size, none for small records; data stays intact.
    (That a renewal replaces the BIOs: the next test.)"""
    import opendps.transport.tls as tls

    renewals: list[tuple[bool, bool, bool]] = []
    renew = tls._renew_bios
    assert renew is not None

    def spy(conn: SSL.Connection, inbound: bool, outbound: bool) -> bool:
        done = renew(conn, inbound, outbound)
        renewals.append((inbound, outbound, done))
        return done

    monkeypatch.setattr(tls, "_renew_bios", spy)
    loop_thread = ServerThread()
    done = threading.Event()
    server = loop_thread.call(start_tls_server(lambda: Echo(done), "127.0.0.1", 0,
                                               device_tls_context(pki.server_chain, pki.server_key)))
    seen: list[list[tuple[bool, bool, bool]]] = []
    try:
        port = server.sockets[0].getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                _client_ctx(pki, pki.ids["selfsigned"], "1.3").wrap_socket(raw, server_hostname="localhost") as s:
            for message, answer in ((b"a", b"A"), (b"b", b"B"), (b"big", BIG_RESPONSE[:65536]), (b"c", b"C"),
                                    (BIG_REQUEST[:8192], BIG_REQUEST[:8192].upper())):
                for sent, expected in ((message, answer), (b"sync", b"SYNC")):  # the server is done with message
                    s.sendall(sent)
                    got = b""
                    while len(got) < len(expected):
                        got += s.recv(1 << 20)
                    assert got == expected
                seen.append(list(renewals))
                renewals.clear()
        assert done.wait(5)
    finally:
        loop_thread.call(_close_server(server))
        loop_thread.close()
    after_a, after_b, after_big, after_c, after_upload = seen
    assert after_a == [(True, True, True)]  # the handshake's buffers: both sides, once
    assert after_b == [] and after_c == []  # small records: kept
    assert after_big and all(r == (False, True, True) for r in after_big)  # 64 KB out (per 16 KB record)
    assert (True, False, True) in after_upload and (False, True, True) in after_upload  # 8 KB in, 8 KB out


def test_a_memory_bio_holding_bytes_is_not_renewed(pki):
    from opendps.transport.tls import _renew_bios

    assert _renew_bios is not None, "pyOpenSSL no longer exposes what BIO renewal needs"
    conn = SSL.Connection(device_tls_context(pki.server_chain, pki.server_key), None)
    before = (conn._into_ssl, conn._from_ssl)
    assert _renew_bios(conn, True, True)  # empty: renewed
    renewed = (conn._into_ssl, conn._from_ssl)
    assert renewed[0] != before[0] and renewed[1] != before[1]
    conn.bio_write(b"\x16\x03\x01\x00")  # the start of a record OpenSSL has not read
    assert not _renew_bios(conn, True, False)
    assert (conn._into_ssl, conn._from_ssl) == renewed
    client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    client.set_connect_state()
    with pytest.raises(SSL.WantReadError):
        client.do_handshake()  # a ClientHello waits in the outgoing BIO
    out = client._from_ssl
    assert not _renew_bios(client, False, True)
    assert client._from_ssl == out


@contextlib.contextmanager
def _echo_connection(pki) -> Iterator[ssl.SSLSocket]:
    """A TLS 1.3 client connection to an :class:`Echo` server on a loop of its own; on leaving, the server's side of
    the connection has ended too."""
    loop_thread = ServerThread()
    done = threading.Event()
    server = loop_thread.call(start_tls_server(lambda: Echo(done), "127.0.0.1", 0,
                                               device_tls_context(pki.server_chain, pki.server_key)))
    try:
        port = server.sockets[0].getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                _client_ctx(pki, pki.ids["selfsigned"], "1.3").wrap_socket(raw, server_hostname="localhost") as s:
            yield s
        assert done.wait(5)
    finally:
        loop_thread.call(_close_server(server))
        loop_thread.close()


def _echo_one_by_one_and_corked(s: ssl.SSLSocket) -> None:
    """Against :class:`Echo`: three records answered one by one, then three sent in one TCP segment."""
    for word in (b"one", b"two", b"three"):
        s.sendall(word)
        assert s.recv(100) == word.upper()
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)  # three records, one segment
    for word in (b"x", b"y", b"z"):
        s.sendall(word)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
    got = b""
    while len(got) < 3:
        got += s.recv(100)
    assert got == b"XYZ"


@pytest.mark.parametrize("bio_sizes", [True, False], ids=["bio-sizes", "fallback"])
def test_records_are_read_and_flushed_without_waiting_for_want_read(pki, monkeypatch, bio_sizes):
    """After the handshake a record is read, and an answer flushed, by asking the memory BIOs what they hold: no
    recv or bio_read that ends in WantReadError (pyOpenSSL's exception path, three per device message before),
    and records arriving together (one TCP segment) are all delivered. Without the BIO sizes (a pyOpenSSL release
    that changed its binding) the loops read until WantReadError, and deliver the same."""
    import opendps.transport.tls as tls

    assert tls._bio_size is not None, "pyOpenSSL no longer exposes the memory BIOs"
    if not bio_sizes:
        monkeypatch.setattr(tls, "_bio_size", None)
    wanted: list[str] = []
    for name in ("recv", "bio_read"):
        real = getattr(SSL.Connection, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            try:
                return _real(self, *args, **kwargs)
            except SSL.WantReadError:
                wanted.append(_name)
                raise

        monkeypatch.setattr(SSL.Connection, name, spy)
    with _echo_connection(pki) as s:
        s.sendall(b"first")
        assert s.recv(100) == b"FIRST"
        wanted.clear()  # the handshake's flights end in WantReadError by nature
        _echo_one_by_one_and_corked(s)
        assert (wanted == []) is bio_sizes


@pytest.mark.parametrize("reader", [True, False], ids=["plaintext-reader", "recv-fallback"])
def test_records_are_read_by_one_ssl_read_and_recv_is_the_fallback(pki, monkeypatch, reader):
    """Records are read with one SSL_read into a kept buffer (pyOpenSSL's recv allocates 64 KiB and queries the
    error state on every call); recv is used only if a pyOpenSSL release changes the binding. Both deliver every
    record, one at a time or several in one segment, and the peer's close_notify."""
    import opendps.transport.tls as tls

    assert tls._read_plaintext is not None, "pyOpenSSL's binding no longer offers SSL_read"
    if not reader:
        monkeypatch.setattr(tls, "_read_plaintext", None)
    calls: list[int] = []
    real = SSL.Connection.recv

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SSL.Connection, "recv", counted)
    with _echo_connection(pki) as s:
        _echo_one_by_one_and_corked(s)
        s.unwrap()  # close_notify: the server side sees the end of the stream
    assert (calls == []) is reader


def _handshaken_in_memory(pki) -> tuple[SSL.Connection, SSL.Connection]:
    """A device-context server connection and a client one, handshaken over their memory BIOs (no sockets)."""
    server = SSL.Connection(device_tls_context(pki.server_chain, pki.server_key), None)
    server.set_accept_state()
    client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    client.set_connect_state()
    for _ in range(10):
        for conn in (client, server):
            with contextlib.suppress(SSL.WantReadError):
                conn.do_handshake()
        for source, sink in ((client, server), (server, client)):
            with contextlib.suppress(SSL.WantReadError):
                sink.bio_write(source.bio_read(1 << 20))
    return server, client


@pytest.mark.parametrize("writers", [True, False], ids=["c-calls", "pyopenssl-fallback"])
def test_records_are_written_by_the_c_calls_and_pyopenssl_is_the_fallback(pki, monkeypatch, writers):
    """Ciphertext goes into the BIO, plaintext is encrypted and the outgoing BIO emptied with one C call each
    (pyOpenSSL's bio_write, send and bio_read check, convert, allocate or query the error state on every call);
    pyOpenSSL's methods only if a release changes its
    binding. Both deliver records one by one, several in one segment, and a write larger than one chunk."""
    import opendps.transport.tls as tls

    assert tls._write_records is not None, "pyOpenSSL's binding no longer offers BIO_write and SSL_write"
    if not writers:
        monkeypatch.setattr(tls, "_write_records", None)
    monkeypatch.setattr(tls, "_SEND_CHUNK", 1000)  # the 64 KB answer to "big" goes in 66 chunks
    calls: list[str] = []
    for name in ("send", "bio_write", "bio_read"):
        real = getattr(SSL.Connection, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(SSL.Connection, name, counted)
    with _echo_connection(pki) as s:
        _echo_one_by_one_and_corked(s)
        s.sendall(b"big")
        got = b""
        while len(got) < 65536:
            got += s.recv(65536)
        assert got == BIG_RESPONSE[:65536]
    assert (calls == []) is writers


def test_the_c_record_writers_take_any_buffer_and_fail_as_pyopenssl_does(pki):
    """``send`` takes bytes, bytearray and memoryviews (what a transport's write is given) and the client reads what
    was sent; on a connection OpenSSL gave up on, ``feed``/``send`` raise what pyOpenSSL's methods raise."""
    import opendps.transport.tls as tls

    assert tls._write_records is not None
    feed, send, take = tls._write_records
    server, client = _handshaken_in_memory(pki)
    for data in (b"bytes", bytearray(b"bytearray"), memoryview(b"--memoryview--")[2:-2]):
        assert send(server, data) == len(data)
        size = tls._bio_size(server, True)
        client.bio_write(take(server, size))  # all the outgoing BIO held: the whole record
        assert tls._bio_size(server, True) == 0
        assert client.recv(100) == bytes(data)
    big = b"B" * (tls._TAKE_BUFFER + 1000)  # more than the kept buffer: pyOpenSSL's bio_read takes it
    sent = 0
    while sent < len(big):  # a record per call (pyOpenSSL's contexts enable partial writes)
        sent += send(server, big[sent:])
    received = b""
    client.bio_write(take(server, tls._bio_size(server, True)))
    while len(received) < len(big):
        received += client.recv(len(big))
    assert received == big
    with pytest.raises(SSL.WantReadError):  # nothing to take: as pyOpenSSL's bio_read
        take(server, 10)
    client.send(b"from the client")
    feed(server, client.bio_read(65536))
    assert server.recv(100) == b"from the client"

    errors = []
    for write in (send, SSL.Connection.send):  # a server fed a broken first flight: the handshake fails in SSL_write
        conn = SSL.Connection(device_tls_context(pki.server_chain, pki.server_key), None)
        conn.set_accept_state()
        feed(conn, b"\x16\x03\x01\x00\x08not a hello at all")
        with pytest.raises(SSL.Error) as failed:
            write(conn, b"x")
        errors.append((type(failed.value), str(failed.value)))
    assert errors[0] == errors[1]
    fresh = SSL.Connection(device_tls_context(pki.server_chain, pki.server_key), None)
    fresh.set_accept_state()
    with pytest.raises(SSL.WantReadError):  # nothing from the client yet: as pyOpenSSL's send
        send(fresh, b"x")
