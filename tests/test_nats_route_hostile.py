"""Telemetry routes against NATS servers that misbehave: a hostile fake NATS on loopback (this module's, speaking just
enough of the protocol: INFO, CONNECT, PING, SUB, PUB/HPUB, and the JetStream acknowledgement as told) and a
nats-server of this module's own with a password (the shared one on 4222 is never touched)."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from tests.conftest import service_missing
from tests.test_nats_outage import NATS_BINARY, Nats

from opendps.errors import ServiceUnavailable
from opendps.hub import routing

# the NATS side is the subject: each test once, on SQLite
pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


class FakeNats:
    """A NATS server that tells what it is told to: its INFO (``info``), and ``ack`` as the answer to every publish
    that asks for one. ``received`` holds every byte a client sent; ``gone`` is set when a client's socket closes."""

    def __init__(self, *, info: dict | None = None, ack: bytes | None = None) -> None:
        self.info = {"server_id": "FAKE", "version": "2.10.0", "proto": 1, "headers": True, "max_payload": 1048576,
                     **(info or {})}
        self.ack = ack
        self.received = bytearray()
        self.gone = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []
        self.serving: set[asyncio.Task] = set()
        self.url = ""

    async def __aenter__(self) -> FakeNats:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"nats://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for writer in self.writers:
            writer.close()
        await asyncio.gather(*self.serving)  # each ends on its socket's close

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        self.serving.add(asyncio.current_task())  # type: ignore[arg-type]
        writer.write(b"INFO " + json.dumps(self.info).encode() + b"\r\n")
        subs: dict[str, str] = {}  # sid -> subject
        try:
            while line := await reader.readline():
                self.received += line
                op, *args = line.decode().split()
                if op == "PING":
                    writer.write(b"PONG\r\n")
                elif op == "SUB":
                    subs[args[-1]] = args[0]
                elif op in ("PUB", "HPUB"):
                    data = await reader.readexactly(int(args[-1]) + 2)
                    self.received += data
                    reply = args[1] if len(args) == (4 if op == "HPUB" else 3) else None
                    sid = next((sid for sid, s in subs.items() if reply and reply.startswith(s.rstrip("*"))), None)
                    if self.ack is not None and sid is not None:
                        writer.write(b"MSG %s %s %d\r\n%s\r\n" % (reply.encode(), sid.encode(), len(self.ack), self.ack))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.gone.set()
            writer.close()


async def _in_thread(fn, *args):
    return fn(*args)


def _route(services, url: str, *, durable: bool = True, name: str = "r") -> int:
    services.routes.put("default", name, {"properties": {"url": url, "subject": "fleet.t", "durable": durable}},
                        if_match="*")
    return services.hubs.list()[0].id


def test_a_tls_route_never_speaks_in_the_clear_to_a_server_that_offers_no_tls(services, monkeypatch):
    """nats-py upgrades to TLS only when the server's INFO says tls_required: a tls:// route to a plain server (or
    through anyone rewriting INFO) sent its CONNECT — credentials included — and every message in the clear, and
    the device got its PUBACK. Now the connection stops at INFO and the message is refused, naming why."""
    monkeypatch.setattr(routing, "PUBLISH_TIMEOUT", 2.0)

    async def scenario() -> None:
        async with FakeNats(ack=b'{"stream": "FLEET", "seq": 1}') as fake:
            hub_id = _route(services, fake.url.replace("nats://", "tls://user:secret@"))
            router = routing.NatsRouter(services.routes, _in_thread)
            with pytest.raises(ServiceUnavailable, match="secure connection not available: the URL asks for tls://"):
                await router.deliver(hub_id, "d1", {}, {}, b"confidential", 1)
            await router.close()
            assert b"secret" not in fake.received and b"confidential" not in fake.received, bytes(fake.received)
            assert b"CONNECT" not in fake.received

    asyncio.run(scenario())


@pytest.mark.parametrize("answer", [b'{"stream": null, "seq": null}', b"thanks", b"null", b'{"stream": "X"}'])
def test_an_answer_that_is_not_a_jetstream_acknowledgement_is_no_puback(services, monkeypatch, answer):
    """Something other than a stream answering a durable route's subject: ``{"stream": null, "seq": null}`` was
    taken for JetStream's acknowledgement (the device got its PUBACK, no stream had the message); the others were
    refused naming only a parse error (``JSONDecodeError: Expecting value``, ``TypeError: argument of type
    'NoneType'...``)."""
    monkeypatch.setattr(routing, "PUBLISH_TIMEOUT", 2.0)

    async def scenario() -> None:
        async with FakeNats(ack=answer) as fake:
            hub_id = _route(services, fake.url)
            router = routing.NatsRouter(services.routes, _in_thread)
            with pytest.raises(ServiceUnavailable, match="is not a JetStream acknowledgement"):
                await router.deliver(hub_id, "d1", {}, {}, b"x", 1)
            await router.close()

    asyncio.run(scenario())


def test_a_plain_route_dropping_every_message_says_so_once_a_minute_not_once_a_message(services, caplog):
    """A device's every message larger than the server's max_payload (or a NATS too slow to take them) on a plain
    route: a log line per message. Now the first drop is told at once, the next ones counted."""

    async def scenario() -> None:
        async with FakeNats(info={"max_payload": 8}) as fake:
            hub_id = _route(services, fake.url, durable=False)
            router = routing.NatsRouter(services.routes, _in_thread)
            for position in range(20):
                await router.deliver(hub_id, "d1", {}, {}, b"longer than eight bytes", position)  # PUBACK: dropped
            router._drops = {k: (0.0, untold) for k, (_, untold) in router._drops.items()}  # the minute is over
            await router.deliver(hub_id, "d1", {}, {}, b"longer than eight bytes", 21)
            await router.close()

    with caplog.at_level(logging.INFO, logger="opendps.hub.routing"):
        asyncio.run(scenario())
    said = [r.getMessage() for r in caplog.records if r.name == "opendps.hub.routing"]
    assert len(said) == 2, said
    assert "dropped a message: nats: maximum payload exceeded" in said[0]
    assert "dropped 20 messages since its last such line (the last: nats: maximum payload exceeded)" in said[1]


def test_a_route_moved_to_another_nats_lets_go_of_the_old_connection(services, monkeypatch):
    """A route deleted or pointed at another server kept its connection for the life of the process: reconnecting
    every second, with a warning, to a NATS that may have been retired with the route."""
    monkeypatch.setattr(routing, "ROUTE_REFRESH", 0.0)

    async def scenario() -> None:
        async with FakeNats(ack=b'{"stream": "OLD", "seq": 1}') as old, \
                FakeNats(ack=b'{"stream": "NEW", "seq": 1}') as new:
            hub_id = _route(services, old.url)
            router = routing.NatsRouter(services.routes, _in_thread)
            await router.deliver(hub_id, "d1", {}, {}, b"to the old", 1)
            _route(services, new.url)
            await router.deliver(hub_id, "d1", {}, {}, b"to the new", 2)
            await asyncio.wait_for(old.gone.wait(), 5)
            assert b"to the new" in new.received and b"to the new" not in old.received
            await router.close()

    asyncio.run(scenario())


class PasswordNats(Nats):
    """This module's nats-server, with a user and password."""

    def arguments(self) -> list[str]:
        return ["-a", "127.0.0.1", "-p", str(self.port), "--user", "opendps", "--pass", "right"]


def test_a_route_with_bad_credentials_is_one_line_not_one_per_attempt(services, monkeypatch, caplog, tmp_path):
    """A route URL with a wrong password: nats-py tries every second within the first connection's deadline, and each
    refusal ('Authorization Violation') was a warning of its own, again at every RETRY_AFTER, for as long as devices
    send. Now one line names it, and the device is refused naming it too."""
    if NATS_BINARY is None:
        service_missing("nats-server is not installed")
    monkeypatch.setattr(routing, "PUBLISH_TIMEOUT", 2.5)  # room for two or three attempts
    nats = PasswordNats(tmp_path)
    nats.start()
    try:
        hub_id = _route(services, nats.url.replace("nats://", "nats://opendps:wrong@"))

        async def scenario() -> None:
            router = routing.NatsRouter(services.routes, _in_thread)
            with pytest.raises(ServiceUnavailable, match="Authorization Violation"):
                await router.deliver(hub_id, "d1", {}, {}, b"x", 1)
            await router.close()

        with caplog.at_level(logging.DEBUG, logger="opendps.hub.routing"):
            asyncio.run(scenario())
    finally:
        nats.kill()
    said = [r.getMessage() for r in caplog.records if r.name == "opendps.hub.routing" and r.levelno >= logging.INFO]
    assert len(said) == 1 and "Authorization Violation" in said[0] and "wrong" not in said[0], said
    assert [r for r in caplog.records if r.levelno == logging.DEBUG and "Authorization Violation" in r.getMessage()]


def _self_signed(directory) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nats test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "nats.pem", directory / "nats.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


class MixedTlsNats(PasswordNats):
    """This module's nats-server taking TLS and plain clients alike (``allow_non_tls``: its INFO says tls_available,
    not tls_required)."""

    def arguments(self) -> list[str]:
        cert, key = _self_signed(self.directory)
        config = self.directory / "nats.conf"
        config.write_text(f'listen: "127.0.0.1:{self.port}"\nallow_non_tls: true\n'
                          f'tls {{ cert_file: "{cert}", key_file: "{key}" }}\n')
        return ["-c", str(config)]


def test_a_tls_route_to_a_server_taking_both_speaks_tls(services, monkeypatch, tmp_path):
    """The other side of the tls:// rule: a server that offers TLS without requiring it is upgraded to (nats-py
    stayed plain), and the route's messages get through over TLS."""
    if NATS_BINARY is None:
        service_missing("nats-server is not installed")
    nats = MixedTlsNats(tmp_path)
    nats.start()
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "nats.pem"))  # what ssl.create_default_context trusts
    try:
        hub_id = _route(services, nats.url.replace("nats://", "tls://"), durable=False)

        async def scenario() -> None:
            router = routing.NatsRouter(services.routes, _in_thread)
            await router.deliver(hub_id, "d1", {}, {}, b"x", 1)
            nc = router._connections[nats.url.replace("nats://", "tls://")]
            assert nc._transport._io_writer.get_extra_info("ssl_object") is not None  # over TLS
            await router.close()

        asyncio.run(scenario())
    finally:
        nats.kill()
