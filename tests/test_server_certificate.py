"""A hub linked while the server runs is served at once: its host name gets into the server certificate of every
process, new connections get the new certificate, open connections keep working (opendps.server_tls).

First in-process: the TLS layer's context replacement on a real loopback listener, ``ensure_server_certificate``
under the data directory's lock, and two keepers sharing one data directory (as ``serve --workers 2`` does). Then
end to end: a real ``opendps serve``, a hub linked through the CLI, clients verifying the hub's host name.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from tests.test_mqtt_hub import HUB, Client, hub_username

from opendps.instance import Instance, Settings, ensure_server_certificate, open_instance
from opendps.server_tls import keep_server_certificate
from opendps.transport import sas
from opendps.transport.tls import context_serving, device_tls_context, replace_context, start_tls_server

SERVER_STORES = ("sqlite",)  # the wire is the subject; the domain runs on both stores in tests/unit (tests/conftest.py)

pytestmark = pytest.mark.timeout(300, func_only=True)
LIVE_HOST = "hub-live.example.test"


def _sans(cert: x509.Certificate) -> set[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in ext.get_values_for_type(x509.DNSName)} | \
        {str(v) for v in ext.get_values_for_type(x509.IPAddress)}


def _client_context(ca_file: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file))  # verifies the chain and the host name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _served(port: int, ca_file: Path, server_hostname: str) -> x509.Certificate:
    """The certificate a verifying client gets from 127.0.0.1:port for ``server_hostname`` (raises if refused)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            _client_context(ca_file).wrap_socket(raw, server_hostname=server_hostname) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)


# --- the TLS layer: a listener's context replaced --------------------------------------------------


def _cert(cn: str, key, issuer: x509.Name, issuer_key, *, ca: bool, names: list[str] = ()) -> x509.Certificate:
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
               .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if names:
        sans = [x509.IPAddress(ipaddress.ip_address(n)) if n[0].isdigit() else x509.DNSName(n) for n in names]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


class Echo(asyncio.Protocol):
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


@pytest.fixture(scope="module")
def throwaway_pki(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("swap-pki")
    ca_key, old_key, new_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("swap test CA", ca_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "swap test CA")]), ca_key,
               ca=True)
    old = _cert("localhost", old_key, ca.subject, ca_key, ca=False, names=["localhost", "127.0.0.1"])
    new = _cert("localhost", new_key, ca.subject, ca_key, ca=False, names=["localhost", "127.0.0.1", "new.example.test"])
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "server.pem").write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (old, ca)))
    (d / "server.key").write_bytes(old_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return {"dir": d, "ca": ca, "old": old, "new": new, "new_key": new_key, "old_key": old_key}


def test_a_replaced_context_serves_new_connections_and_keeps_open_ones(throwaway_pki):
    pki = throwaway_pki
    d = pki["dir"]
    client = _client_context(d / "ca.pem")

    async def main() -> None:
        ctx = device_tls_context(d / "server.pem", d / "server.key", alpn=[b"mqtt"])
        server = await start_tls_server(Echo, "127.0.0.1", 0, ctx)
        port = server.sockets[0].getsockname()[1]
        try:
            before_r, before_w = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="localhost")
            assert x509.load_der_x509_certificate(before_w.get_extra_info("ssl_object").getpeercert(True)) == pki["old"]
            with pytest.raises(ssl.SSLCertVerificationError):
                await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="new.example.test")
            with pytest.raises(SSL.Error):  # a key that is not the leaf's is refused before any use
                context_serving(ctx, [pki["new"], pki["ca"]], pki["old_key"])

            replace_context(ctx, context_serving(ctx, [pki["new"], pki["ca"]], pki["new_key"]))

            r, w = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="new.example.test")
            ssl_object = w.get_extra_info("ssl_object")
            assert x509.load_der_x509_certificate(ssl_object.getpeercert(True)) == pki["new"]
            w.write(b"new")
            assert await asyncio.wait_for(r.readexactly(3), 5) == b"new"
            # the connection made before the swap keeps its certificate and keeps working
            before_w.write(b"still here")
            assert await asyncio.wait_for(before_r.readexactly(10), 5) == b"still here"
            for writer in (w, before_w):
                writer.close()
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_the_replacement_sends_the_chain_and_keeps_alpn(throwaway_pki):
    """The new context is made like the listener's: ALPN chosen the same way, [leaf, CA] sent as server.pem has it."""
    pki = throwaway_pki
    d = pki["dir"]
    ctx = device_tls_context(d / "server.pem", d / "server.key", alpn=[b"mqtt"])
    fresh = context_serving(ctx, [pki["new"], pki["ca"]], pki["new_key"])
    server = SSL.Connection(fresh, None)
    server.set_accept_state()
    client_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client_ctx.set_alpn_protos([b"mqtt"])
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    client.set_tlsext_host_name(b"new.example.test")
    for _ in range(10):
        for a, b in ((client, server), (server, client)):
            with contextlib.suppress(SSL.WantReadError):
                a.do_handshake()
            with contextlib.suppress(SSL.WantReadError):
                b.bio_write(a.bio_read(65536))
    chain = client.get_peer_cert_chain(as_cryptography=True)
    assert chain == [pki["new"], pki["ca"]]
    assert client.get_alpn_proto_negotiated() == b"mqtt"


# --- ensure_server_certificate and the keeper, in process --------------------------------------------------


@pytest.fixture(scope="module")
def instances(tmp_path_factory) -> Iterator[tuple[Instance, Instance]]:
    """Two opened installations on one data directory and database: what two processes of ``--workers 2`` hold."""
    data = tmp_path_factory.mktemp("keeper") / "data"
    first = open_instance(Settings(data_dir=data, lint=False))
    second = open_instance(Settings.load(data, lint=False), create=False, migrate=False)
    yield first, second
    second.close()
    first.close()


def test_ensure_server_certificate_keeps_a_pair_that_serves_and_replaces_one_that_does_not(instances):
    inst, _ = instances
    ca = x509.load_pem_x509_certificate(inst.server_ca_path.read_bytes())
    current = ensure_server_certificate(inst, ["ensure-a.example.test"])
    assert ensure_server_certificate(inst, ["ensure-a.example.test"]).leaf == current.leaf  # not issued again
    assert {"localhost", "127.0.0.1", "ensure-a.example.test"} <= _sans(current.leaf)
    assert current.chain[1] == ca and current.leaf.issuer == ca.subject
    on_disk = x509.load_pem_x509_certificates(inst.server_cert_path.read_bytes())
    assert on_disk == list(current.chain)
    assert inst.server_key_path.stat().st_mode & 0o777 == 0o600
    # a key that is not the certificate's (a torn or foreign write) is never served: a new pair is issued
    inst.server_key_path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    repaired = ensure_server_certificate(inst, ["ensure-a.example.test"])
    assert repaired.leaf != current.leaf
    key = serialization.load_pem_private_key(inst.server_key_path.read_bytes(), None)
    assert key.public_key() == repaired.leaf.public_key() == repaired.key.public_key()
    assert "PRIVATE" not in repr(repaired)


def test_processes_sharing_a_data_directory_issue_one_certificate_between_them(instances):
    """Concurrent checks for a new name, from two installations on one data directory: the lock lets one issue and
    the others take its pair, so the files always belong together and everyone serves the same certificate."""
    first, second = instances
    results: list = []

    def check(inst: Instance) -> None:
        results.append(ensure_server_certificate(inst, ["ensure-b.example.test"]))

    threads = [threading.Thread(target=check, args=(inst,)) for inst in (first, second, first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 4 and len({r.leaf.serial_number for r in results}) == 1
    on_disk = x509.load_pem_x509_certificates(first.server_cert_path.read_bytes())[0]
    key = serialization.load_pem_private_key(first.server_key_path.read_bytes(), None)
    assert on_disk == results[0].leaf and key.public_key() == on_disk.public_key()


def test_keepers_of_two_processes_serve_a_hub_linked_meanwhile(instances):
    first, second = instances
    host = "hub-keeper.example.test"

    async def main() -> None:
        listeners = []
        keepers = []
        for inst in (first, second):
            ctx = device_tls_context(inst.server_cert_path, inst.server_key_path, alpn=[b"mqtt"])
            server = await start_tls_server(Echo, "127.0.0.1", 0, ctx)
            listeners.append((server, server.sockets[0].getsockname()[1]))
            keepers.append(asyncio.create_task(keep_server_certificate(inst, [ctx], interval=0.2)))
        ca_file = first.server_ca_path
        try:
            for _, port in listeners:
                with pytest.raises(ssl.SSLCertVerificationError):
                    await asyncio.to_thread(_served, port, ca_file, host)
            await asyncio.to_thread(first.services.hubs.create, "hub-keeper", host)
            served = []
            for _, port in listeners:
                deadline = time.monotonic() + 10
                while True:
                    try:
                        served.append(await asyncio.to_thread(_served, port, ca_file, host))
                        break
                    except ssl.SSLCertVerificationError:
                        assert time.monotonic() < deadline, "the new host name was not served within 10 s"
                        await asyncio.sleep(0.1)
            assert served[0] == served[1]  # one certificate issued, both processes serve it
            assert host in _sans(served[0])
            assert all(not k.done() for k in keepers)
        finally:
            for k in keepers:
                k.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
            for server, _ in listeners:
                server.close()
                await server.wait_closed()

    asyncio.run(main())


def test_a_failing_check_is_logged_once_and_retried(instances, monkeypatch, caplog):
    """The database away for a moment: the keeper logs one line, keeps serving, and carries on when it is back."""
    import opendps.server_tls as server_tls

    inst, _ = instances
    monkeypatch.setattr(server_tls, "RETRY_AFTER_FAILURE", 0.05)
    real, calls = inst.store.config_generation, []

    def flaky() -> int:
        calls.append(1)
        if len(calls) <= 3:
            raise RuntimeError("database away")
        return real()

    monkeypatch.setattr(inst.store, "config_generation", flaky)

    async def main() -> None:
        ctx = device_tls_context(inst.server_cert_path, inst.server_key_path)
        keeper = asyncio.create_task(keep_server_certificate(inst, [ctx], interval=0.05))
        deadline = time.monotonic() + 10
        while len(calls) < 6 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not keeper.done()
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)

    with caplog.at_level("INFO", logger="opendps.tls"):
        asyncio.run(main())
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "database away" in warnings[0]
    assert any("work again" in r.getMessage() for r in caplog.records)


# --- end to end: opendps serve -------------------------------------------------------------------------------


def _wait_served(port: int, ca_file: Path, host: str, timeout: float = 10) -> tuple[x509.Certificate, float]:
    start = time.monotonic()
    while True:
        try:
            return _served(port, ca_file, host), time.monotonic() - start
        except ssl.SSLCertVerificationError:
            if time.monotonic() - start > timeout:
                raise
            time.sleep(0.1)


def test_a_hub_linked_while_serving_is_served_at_once_and_open_connections_stay(server):
    https_port = int(server.url.rsplit(":", 1)[1])
    ports = {"MQTT": server.mqtt_port, "HTTPS": https_port, "AMQP": server.amqp_port}
    for port in ports.values():  # before the link: the name is not in the certificate
        with pytest.raises(ssl.SSLCertVerificationError, match="match|mismatch"):
            _served(port, server.ca_file, LIVE_HOST)

    # connections open before the link: an HTTPS keep-alive connection and a device on MQTT
    web = http.client.HTTPSConnection("127.0.0.1", https_port, context=_client_context(server.ca_file), timeout=10)
    web.request("GET", "/healthz")
    answer = web.getresponse()
    assert answer.status == 200 and answer.read() is not None
    web_socket = web.sock
    created = server.cli("hub", "device-identity", "create", "--device-id", "cert-live-device", check=True)
    key = json.loads(created.stdout)["authentication"]["symmetricKey"]["primaryKey"]
    device = Client(server, "cert-live-device", hub_username("cert-live-device"),
                    password=sas.generate(f"{HUB}/devices/cert-live-device", key))
    assert device.rc == 0
    device.subscribe("$iothub/twin/res/#")

    server.cli("dps", "linked-hub", "create", "-n", "hub-live", "--hub-host-name", LIVE_HOST, check=True)
    leaf, waited = _wait_served(server.mqtt_port, server.ca_file, LIVE_HOST)
    assert waited < 10 and LIVE_HOST in _sans(leaf) and {"localhost", "127.0.0.1"} <= _sans(leaf)
    for name, port in ports.items():  # every listener serves it — of every worker (on PostgreSQL the server runs one
        for _ in range(6):  # per core; each switches within its keeper's second, to the one pair on disk)
            assert _wait_served(port, server.ca_file, LIVE_HOST, timeout=5)[0] == leaf, name
    # the files on disk are the same pair (the next start serves it too)
    on_disk = x509.load_pem_x509_certificates((server.data_dir / "tls" / "server.pem").read_bytes())
    disk_key = serialization.load_pem_private_key((server.data_dir / "tls" / "server.key").read_bytes(), None)
    assert on_disk[0] == leaf and disk_key.public_key() == leaf.public_key()

    # the connections made before are still the same and still work
    web.request("GET", "/healthz")
    answer = web.getresponse()
    assert answer.status == 200 and answer.read() is not None and web.sock is web_socket
    device.publish("$iothub/twin/GET/?$rid=after-swap")
    topic, _ = device.expect("$iothub/twin/res/")
    assert topic.startswith("$iothub/twin/res/200/") and device.c.is_connected()
    device.close()
    web.close()
    log = (server.data_dir.parent / "server.log").read_text()
    assert "serving a new TLS server certificate" in log and LIVE_HOST in log
    assert "PRIVATE KEY" not in log
