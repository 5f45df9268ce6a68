"""MQTT session server (opendps.transport.mqtt.server) on real loopback listeners.

The server runs in a background thread with its own event loop (the project has no pytest-asyncio),
listening on plain TCP, on the device TLS layer and on an aiohttp WebSocket route. Clients are
paho-mqtt 2.x, the Debian mosquitto clients, and a raw socket client built on the codec for what
paho hides: exact CONNACK codes, DUP flags, not acknowledging, not reading, malformed bytes.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import gc
import ipaddress
import json
import logging
import queue
import random
import secrets
import select
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import paho.mqtt.client as mqtt
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import service_missing, wait_until
from opendps.transport.mqtt.codec import (
    Connack,
    Connect,
    Decoder,
    Disconnect,
    Packet,
    Pingreq,
    Pingresp,
    Puback,
    Publish,
    Pubrel,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
    encode,
    encode_remaining_length,
    topic_matches,
)
from opendps.transport.mqtt.server import ConnectRequest, MqttRefused, MqttServer, Session, SessionClosed
from opendps.transport.tls import device_tls_context, start_tls_server

MAX_PACKET = 256 * 1024 + 1024  # the server's default max_packet_size
HIGH_WATER = 256 * 1024  # the server's default write_high_water

# --- throwaway PKI ------------------------------------------------------------------------------


@dataclass
class Pki:
    ca: Path  # trust anchor for the server certificate
    server_chain: Path
    server_key: Path
    client_bundle: Path  # leaf + client CA
    client_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(cn: str, key: Any, issuer: str, issuer_key: Any, *, ca: bool, san: list | None = None) -> x509.Certificate:
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _key_pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("mqtt-pki")
    ca_key, server_key, client_ca_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    ca = _cert("MQTT Test Root", ca_key, "MQTT Test Root", ca_key, ca=True)
    server = _cert("localhost", server_key, "MQTT Test Root", ca_key, ca=False,
                   san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client_ca = _cert("MQTT Client CA", client_ca_key, "MQTT Client CA", client_ca_key, ca=True)
    client = _cert("device-tls", client_key, "MQTT Client CA", client_ca_key, ca=False)
    (d / "ca.pem").write_bytes(_pem(ca))
    (d / "server.pem").write_bytes(_pem(server))
    (d / "server.key").write_bytes(_key_pem(server_key))
    (d / "client.pem").write_bytes(_pem(client, client_ca))
    (d / "client.key").write_bytes(_key_pem(client_key))
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key")


# --- event loop in a thread ---------------------------------------------------------------------


class LoopThread:
    """An event loop in a daemon thread; records anything reaching the loop's exception handler."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.errors: list[dict] = []
        self.loop.set_exception_handler(lambda loop, context: self.errors.append(context))
        self.thread = threading.Thread(target=self.loop.run_forever, name="mqtt-test-loop", daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def sync(self, fn: Callable[[], Any]) -> Any:
        """Run a plain function on the loop (server state is only touched from there)."""

        async def run() -> Any:
            return fn()

        return self.call(run())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


# --- the test application -----------------------------------------------------------------------


CONNECTION_TAG: contextvars.ContextVar[str | None] = contextvars.ContextVar("connection_tag", default=None)

class App:
    """Authenticator + SessionHandler: echo, fan-out (broker-like) and command topics.

    * client ids starting with ``deny`` are refused with CONNACK 5;
    * ``echo/X`` is published back to the same client on ``reply/X`` with the same QoS;
    * ``fan/...`` goes to every session with a matching subscription (for mosquitto_pub/sub);
    * ``cmd/burst`` {"tag", "n", "qos", "size"} makes the server publish n messages ``burst/tag/i``;
    * ``cmd/slow`` sleeps ``payload`` seconds; ``cmd/refuse`` raises MqttRefused; ``cmd/crash`` a bug.
    """

    def __init__(self) -> None:
        self.server: MqttServer | None = None
        self.events: list[tuple] = []
        self.requests: dict[str, ConnectRequest] = {}
        self.acks: list[tuple[str, int]] = []
        self.progress: dict[str, int] = {}
        self.max_buffer: dict[str, int] = {}
        self.burst_errors: dict[str, str] = {}
        self.tasks: set[asyncio.Task] = set()
        self.kept: dict[str, ConnectRequest] = {}  # what each session keeps of its CONNECT
        self.tags: dict[str, str | None] = {}  # CONNECTION_TAG as each client's last PUBLISH saw it

    def of(self, kind: str, client_id: str) -> list[tuple]:
        return [e for e in self.events if e[0] == kind and e[1] == client_id]

    def acked(self, tag: str) -> list[int]:
        return sorted(i for t, i in self.acks if t == tag)

    async def authenticate(self, request: ConnectRequest) -> App | int:
        self.requests[request.client_id] = request
        if request.client_id.startswith("deny"):
            return 5
        return self

    async def on_connected(self, session: Session) -> None:
        self.events.append(("connected", session.client_id, session.request.peername))
        self.kept[session.client_id] = session.request
        CONNECTION_TAG.set(session.client_id)  # as the hub sets a connection's request id for its log lines

    async def on_subscribe(self, session: Session, topic_filter: str, qos: int) -> int:
        self.events.append(("subscribe", session.client_id, topic_filter, qos))
        return 0x80 if topic_filter.startswith("forbidden") else qos

    async def on_unsubscribe(self, session: Session, topic_filter: str) -> None:
        self.events.append(("unsubscribe", session.client_id, topic_filter, topic_filter in session.subscriptions))

    async def on_publish(self, session: Session, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        self.events.append(("publish", session.client_id, topic, payload, qos, retain))
        self.tags[session.client_id] = CONNECTION_TAG.get()
        if topic.startswith("echo/"):
            await session.publish("reply/" + topic[5:], payload, qos)
        elif topic.startswith("fan/"):
            assert self.server is not None
            for other in self.server.sessions():
                granted = [q for f, q in other.subscriptions.items() if topic_matches(f, topic)]
                if granted:
                    await other.publish(topic, payload, min(qos, max(granted)))
        elif topic == "cmd/burst":
            task = asyncio.create_task(self._burst(session, **json.loads(payload)))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        elif topic == "cmd/slow":
            await asyncio.sleep(float(payload))
            self.events.append(("slow-done", session.client_id))
        elif topic == "cmd/refuse":
            raise MqttRefused("publishing here is not allowed")
        elif topic == "cmd/crash":
            raise RuntimeError("handler bug")

    async def _async_ack(self, item: tuple[str, int]) -> None:
        await asyncio.sleep(0)
        self.acks.append(item)

    async def _burst(self, session: Session, tag: str, n: int, qos: int = 1, size: int = 0) -> None:
        self.progress[tag] = 0
        self.max_buffer[tag] = 0
        try:
            for i in range(n):
                payload = f"{tag}:{i}:".encode() + b"x" * size
                on_ack = None
                if qos:  # odd messages get an async callback, even ones a plain one
                    on_ack = functools.partial(self._async_ack if i % 2 else self.acks.append, (tag, i))
                await session.publish(f"burst/{tag}/{i}", payload, qos, on_ack=on_ack)
                self.progress[tag] = i + 1
                self.max_buffer[tag] = max(self.max_buffer[tag], session.write_buffer_size)
        except SessionClosed as exc:
            self.burst_errors[tag] = str(exc)

    async def on_disconnected(self, session: Session, reason: str) -> None:
        self.events.append(("disconnected", session.client_id, reason))


# --- environment --------------------------------------------------------------------------------


@dataclass
class Env:
    loop: LoopThread
    app: App
    server: MqttServer
    tcp_port: int
    tls_port: int
    ws_port: int
    pki: Pki

    def session(self, client_id: str) -> Session | None:
        return self.loop.sync(lambda: self.server.session(client_id))

    def subscriptions(self, client_id: str) -> dict[str, int] | None:
        session = self.session(client_id)
        return None if session is None else self.loop.sync(lambda: dict(session.subscriptions))


@pytest.fixture(scope="module")
def env(pki: Pki) -> Iterator[Env]:
    lt = LoopThread()
    app = App()

    async def start() -> tuple[MqttServer, int, int, int, web.AppRunner]:
        server = MqttServer(app.authenticate)
        app.server = server
        tcp = await asyncio.get_running_loop().create_server(server.protocol_factory, "127.0.0.1", 0)
        server.add_listener(tcp)
        context = device_tls_context(pki.server_chain, pki.server_key)
        tls = await start_tls_server(server.protocol_factory, "127.0.0.1", 0, context)
        server.add_listener(tls)

        async def websocket(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse(protocols=("mqtt",))
            await ws.prepare(request)
            transport = request.transport
            assert transport is not None
            await server.serve_websocket(ws, peer_certificate_chain=transport.get_extra_info("peer_certificate_chain"),
                                         peername=transport.get_extra_info("peername"))
            return ws

        web_app = web.Application()
        web_app.router.add_get("/$iothub/websocket", websocket)
        runner = web.AppRunner(web_app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return server, tcp.sockets[0].getsockname()[1], tls.sockets[0].getsockname()[1], runner.addresses[0][1], runner

    server, tcp_port, tls_port, ws_port, runner = lt.call(start())
    yield Env(lt, app, server, tcp_port, tls_port, ws_port, pki)
    lt.call(server.close(), timeout=15)
    lt.call(runner.cleanup(), timeout=15)
    lt.stop()


@pytest.fixture(autouse=True)
def _no_loop_errors(env: Env) -> Iterator[None]:
    del env.loop.errors[:]
    yield
    assert env.loop.errors == [], env.loop.errors


@pytest.fixture(autouse=True)
def _close_raw_clients() -> Iterator[None]:
    yield
    while Raw.opened:
        Raw.opened.pop().close()


@contextmanager
def extra_server(env: Env, **kw: Any) -> Iterator[tuple[App, MqttServer, int]]:
    """A second server (own App) with non-default settings on the same loop."""
    app = App()

    async def start() -> tuple[MqttServer, int]:
        server = MqttServer(app.authenticate, **kw)
        app.server = server
        listener = await server.listen("127.0.0.1", 0)
        return server, listener.sockets[0].getsockname()[1]

    server, port = env.loop.call(start())
    try:
        yield app, server, port
    finally:
        env.loop.call(server.close(), timeout=15)


def uid(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def mqtt_records(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "opendps.mqtt" and r.levelno >= level]


# --- clients ------------------------------------------------------------------------------------


class Closed(Exception):
    pass


class Raw:
    """Blocking socket client speaking through the codec; acknowledges nothing by itself."""

    opened: list[Raw] = []  # closed after each test by _close_raw_clients

    def __init__(self, port: int, *, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        Raw.opened.append(self)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(5)
        self.sock.connect(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        self.decoder = Decoder()
        self.packets: deque[Packet] = deque()

    def send(self, *items: Packet | bytes) -> None:
        self.sock.sendall(b"".join(i if isinstance(i, bytes) else encode(i) for i in items))

    def _read(self, timeout: float) -> bool:
        """Read once; False on timeout; raises Closed at EOF."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(262144)
        except TimeoutError:
            return False
        except ConnectionResetError as exc:
            raise Closed() from exc
        if not data:
            raise Closed()
        self.packets.extend(self.decoder.feed(data))
        return True

    def recv(self, timeout: float = 5.0) -> Packet:
        deadline = time.monotonic() + timeout
        while not self.packets:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._read(remaining):
                raise AssertionError("no packet within timeout")
        return self.packets.popleft()

    def nothing_for(self, seconds: float) -> bool:
        """True if no packet arrives (and the connection stays open) for ``seconds``."""
        deadline = time.monotonic() + seconds
        while not self.packets and (remaining := deadline - time.monotonic()) > 0:
            self._read(remaining)
        return not self.packets

    def closed_within(self, timeout: float) -> bool:
        """Read (discarding packets) until the server closes; False if it stays open."""
        deadline = time.monotonic() + timeout
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                self._read(remaining)
        except Closed:
            return True
        return False

    def connect(self, client_id: str, *, clean: bool = True, keepalive: int = 0, **kw: Any) -> Packet:
        self.send(Connect(client_id, clean, keepalive, **kw))
        return self.recv()

    def close(self) -> None:
        self.sock.close()


class Paho:
    """paho-mqtt 2.x client with its network loop in a thread and results in queues."""

    def __init__(self, client_id: str, *, clean: bool = True, transport: str = "tcp", protocol: int = mqtt.MQTTv311) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean,
                                  protocol=protocol, transport=transport, reconnect_on_failure=False)
        self.connacks: queue.Queue = queue.Queue()
        self.messages: queue.Queue = queue.Queue()
        self.subacks: queue.Queue = queue.Queue()
        self.disconnected = threading.Event()
        self.client.on_connect = lambda c, u, flags, rc, props: self.connacks.put((flags.session_present, str(rc)))
        self.client.on_message = lambda c, u, msg: self.messages.put(msg)
        self.client.on_subscribe = lambda c, u, mid, codes, props: self.subacks.put((mid, [int(r.value) for r in codes]))
        self.client.on_disconnect = lambda c, u, flags, rc, props: self.disconnected.set()

    def connect(self, port: int, *, keepalive: int = 60) -> tuple[bool, str]:
        self.client.connect("127.0.0.1", port, keepalive)
        self.client.loop_start()
        return self.connacks.get(timeout=5)

    def subscribe(self, *topics: tuple[str, int]) -> list[int]:
        result, mid = self.client.subscribe(list(topics))
        assert result == mqtt.MQTT_ERR_SUCCESS
        got_mid, codes = self.subacks.get(timeout=5)
        assert got_mid == mid
        return codes

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos, retain)
        info.wait_for_publish(5)  # for QoS 1: until the PUBACK arrived
        assert info.is_published()

    def message(self, timeout: float = 5.0) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def burst(tag: str, n: int, qos: int = 1, size: int = 0) -> Publish:
    return Publish("cmd/burst", json.dumps({"tag": tag, "n": n, "qos": qos, "size": size}).encode())


# --- CONNECT ------------------------------------------------------------------------------------


def test_connack_return_codes(env: Env) -> None:
    ok = Raw(env.tcp_port)
    assert ok.connect(uid("ok")) == Connack(False, 0)
    ok.send(Pingreq())
    assert ok.recv() == Pingresp()

    denied = Raw(env.tcp_port)
    assert denied.connect(uid("deny")) == Connack(False, 5)
    assert denied.closed_within(2)

    v31 = Raw(env.tcp_port)
    v31.send(Connect("old", protocol_name="MQIsdp", protocol_level=3))
    assert v31.recv() == Connack(False, 1)
    assert v31.closed_within(2)

    v5 = Raw(env.tcp_port)  # MQTT 5 CONNECT (properties after keepalive) gets rc 1 too
    v5.send(b"\x10\x11\x00\x04MQTT\x05\x02\x00\x3c\x03\x21\x00\x14\x00\x01c")
    assert v5.recv() == Connack(False, 1)
    assert v5.closed_within(2)

    empty = Raw(env.tcp_port)
    assert empty.connect("", clean=False) == Connack(False, 2)
    assert empty.closed_within(2)

    assigned = Raw(env.tcp_port)  # empty id with clean session: the server assigns one
    assert assigned.connect("") == Connack(False, 0)
    connected = wait_until(lambda: [e for e in env.app.events if e[0] == "connected" and e[2][1] == assigned.port])
    assert connected[0][1].startswith("auto-") and len(connected[0][1]) == 21
    assert env.app.requests[""].client_id == ""
    for c in (ok, assigned):
        c.close()


def test_lines_about_refused_connections_are_bounded_per_minute(env: Env, caplog: pytest.LogCaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Each refused CONNECT (and each connection closed or taken over) wrote its own line: a fleet retrying with a
    wrong credential, or one peer's garbage after cheap handshakes, wrote as many lines as it made connections. Now
    at most the budget a minute on ``opendps.mqtt`` (the refusal log keeps every refusal), and the next minute's
    first line says how many were left out."""
    from opendps.logs import LineBudget
    from opendps.transport.mqtt import server as mqtt_server

    caplog.set_level(logging.INFO, logger="opendps.mqtt")
    clock = [5000.0]
    monkeypatch.setattr(mqtt_server, "_connection_line", LineBudget(mqtt_server.log, mqtt_server.CONNECTION_LINES,
                                                                    per_minute=3))
    monkeypatch.setattr("opendps.logs.time.monotonic", lambda: clock[0])
    for _ in range(8):
        denied = Raw(env.tcp_port)
        assert denied.connect(uid("deny")) == Connack(False, 5)  # every one refused, as before
        assert denied.closed_within(2)
    refused = [r for r in mqtt_records(caplog) if "refused with CONNACK 5" in r.getMessage()]
    assert len(refused) == 3
    clock[0] += 61
    denied = Raw(env.tcp_port)
    assert denied.connect(uid("deny")) == Connack(False, 5)
    assert denied.closed_within(2)
    later = [r.getMessage() for r in mqtt_records(caplog)][-2:]
    assert later[0] == ("5 more lines about single MQTT connections (refused, closed, taken over) were not written "
                        "in the last minute")
    assert "refused with CONNACK 5" in later[1]


def test_connack_codes_with_paho(env: Env) -> None:
    ok = Paho(uid("paho"))
    assert ok.connect(env.tcp_port) == (False, "Success")
    ok.stop()
    denied = Paho(uid("deny"))
    assert denied.connect(env.tcp_port) == (False, "Not authorized")
    denied.stop()
    old = Paho(uid("v31"), protocol=mqtt.MQTTv31)
    assert old.connect(env.tcp_port) == (False, "Unsupported protocol version")
    old.stop()


def test_connect_request_carries_credentials_and_tls_chain(env: Env, pki: Pki) -> None:
    cid = uid("tls")
    client = Paho(cid)
    client.client.tls_set(ca_certs=str(pki.ca), certfile=str(pki.client_bundle), keyfile=str(pki.client_key))
    client.client.username_pw_set("hub/dev", "SharedAccessSignature sr=x")
    assert client.connect(env.tls_port, keepalive=30) == (False, "Success")
    request = env.app.requests[cid]
    assert [c.subject.rfc4514_string() for c in request.peer_certificate_chain] == ["CN=device-tls", "CN=MQTT Client CA"]
    assert (request.username, request.password, request.keepalive, request.clean_session) == \
        ("hub/dev", b"SharedAccessSignature sr=x", 30, True)
    assert request.peername[0] == "127.0.0.1"
    assert "SharedAccessSignature" not in repr(request)
    # the live session keeps no credentials (user name, SAS token, chain), only what the CONNECT asked for
    # (on_connected runs after the CONNACK is written: the client may read it first)
    kept = wait_until(lambda: env.app.kept.get(cid))
    assert (kept.username, kept.password, kept.peer_certificate_chain) == (None, None, [])
    assert (kept.client_id, kept.keepalive, kept.clean_session, kept.peername) == (cid, 30, True, request.peername)
    client.stop()

    plain = Raw(env.tcp_port)
    plain.connect(cid2 := uid("plain"))
    assert env.app.requests[cid2].peer_certificate_chain == []
    assert env.app.requests[cid2].peername == ("127.0.0.1", plain.port)
    plain.close()


def test_connect_timeout(env: Env) -> None:
    with extra_server(env, connect_timeout=0.3) as (_, _, port):
        silent = Raw(port)
        start = time.monotonic()
        assert silent.closed_within(3)
        assert 0.25 <= time.monotonic() - start < 2.0


# --- SUBSCRIBE / UNSUBSCRIBE --------------------------------------------------------------------


def test_subscribe_qos2_is_granted_as_1(env: Env) -> None:
    cid = uid("sub")
    client = Paho(cid)
    client.connect(env.tcp_port)
    assert client.subscribe(("a/#", 2), ("b", 0), ("forbidden/x", 1)) == [1, 0, 0x80]
    # the handler was asked with the capped QoS
    assert [e[2:] for e in env.app.of("subscribe", cid)] == [("a/#", 1), ("b", 0), ("forbidden/x", 1)]
    assert env.subscriptions(cid) == {"a/#": 1, "b": 0}
    client.stop()

    raw = Raw(env.tcp_port)
    raw.connect(uid("rawsub"))
    raw.send(Subscribe(9, [("x/#", 2)]))
    assert raw.recv() == Suback(9, [1])
    raw.close()


def test_max_subscriptions_and_unsubscribe(env: Env) -> None:
    cid = uid("many")
    raw = Raw(env.tcp_port)
    raw.connect(cid)
    raw.send(Subscribe(1, [(f"m/{i}", 1) for i in range(50)]))
    assert raw.recv() == Suback(1, [1] * 50)
    raw.send(Subscribe(2, [("m/extra", 1), ("m/0", 0)]))  # full: a new filter is refused, an existing one replaced
    assert raw.recv() == Suback(2, [0x80, 0])
    subs = env.subscriptions(cid)
    assert subs is not None and len(subs) == 50 and subs["m/0"] == 0 and "m/extra" not in subs
    raw.send(Unsubscribe(3, ["m/0", "not/there"]))
    assert raw.recv() == Unsuback(3)
    # the handler heard of each filter before the UNSUBACK, once it had left the session's subscriptions
    assert env.app.of("unsubscribe", cid) == [("unsubscribe", cid, "m/0", False), ("unsubscribe", cid, "not/there", False)]
    raw.send(Subscribe(4, [("m/extra", 1)]))
    assert raw.recv() == Suback(4, [1])
    assert len(env.subscriptions(cid) or {}) == 50
    raw.close()


# --- PUBLISH ------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "tls", "websockets"])
def test_qos0_and_qos1_both_ways_with_paho(env: Env, transport: str) -> None:
    cid = uid(f"rt-{transport}")
    client = Paho(cid, transport="websockets" if transport == "websockets" else "tcp")
    port = env.tcp_port
    if transport == "tls":
        client.client.tls_set(ca_certs=str(env.pki.ca))
        port = env.tls_port
    elif transport == "websockets":
        client.client.ws_set_options(path="/$iothub/websocket")
        port = env.ws_port
    assert client.connect(port) == (False, "Success")
    assert client.subscribe(("reply/#", 1)) == [1]
    big = bytes(range(256)) * 400  # 100 KiB: spans several TLS records / WebSocket reads
    client.publish("echo/zero", b"q0", 0)
    client.publish("echo/one", b"q1", 1)  # waits for the server's PUBACK
    client.publish("echo/big", big, 1, retain=True)
    got = {m.topic: (m.payload, m.qos) for m in (client.message() for _ in range(3))}
    assert got == {"reply/zero": (b"q0", 0), "reply/one": (b"q1", 1), "reply/big": (big, 1)}
    assert [e[2:] for e in env.app.of("publish", cid)] == [
        ("echo/zero", b"q0", 0, False), ("echo/one", b"q1", 1, False), ("echo/big", big, 1, True)]
    assert env.app.requests[cid].peername[0] == "127.0.0.1"
    client.stop()
    assert wait_until(lambda: env.app.of("disconnected", cid)) == [("disconnected", cid, "client disconnected")]


def test_publish_exact_packets_and_pipelining(env: Env) -> None:
    cid = uid("exact")
    raw = Raw(env.tcp_port)
    # CONNECT, SUBSCRIBE, PUBLISH in one write: answered in order
    raw.send(Connect(cid, keepalive=0), Subscribe(1, [("reply/#", 1)]), Publish("echo/raw", b"x", 1, packet_id=77))
    assert raw.recv() == Connack(False, 0)
    assert raw.recv() == Suback(1, [1])
    assert raw.recv() == Publish("reply/raw", b"x", 1, False, False, 1)  # sent by the handler ...
    assert raw.recv() == Puback(77)  # ... which returned before the PUBACK
    raw.send(Puback(1), Publish("echo/q0", b"y", 0))
    assert raw.recv() == Publish("reply/q0", b"y", 0)
    raw.send(Disconnect())
    assert raw.closed_within(2)


def test_an_idle_connection_holds_no_consumer_task(env: Env) -> None:
    """The consumer of a connection's packets runs while packets wait and ends when none do (an idle device holds no
    task, coroutine or future); the next packets start another, still handled in order."""
    cid = uid("idle")
    raw = Raw(env.tcp_port)

    def consumer() -> object:
        conns = [c for c in env.server._connections if c._client_id == cid]
        assert len(conns) == 1
        return conns[0]._task

    raw.connect(cid)
    assert wait_until(lambda: env.loop.sync(consumer) is None)
    for round_ in range(3):
        raw.send(Subscribe(1, [(f"reply/{round_}", 1)]), Publish(f"echo/{round_}", b"x", 1, packet_id=9), Pingreq())
        assert raw.recv() == Suback(1, [1])
        assert raw.recv() == Publish(f"reply/{round_}", b"x", 1, False, False, round_ + 1)
        assert raw.recv() == Puback(9)
        assert raw.recv() == Pingresp()
        raw.send(Puback(round_ + 1))
        assert wait_until(lambda: env.loop.sync(consumer) is None)
        assert env.app.tags[cid] == cid  # what on_connected set in the context holds for every later consumer
    raw.send(Disconnect())
    assert raw.closed_within(2)
    assert wait_until(lambda: not env.loop.sync(lambda: [c for c in env.server._connections if c._client_id == cid]))


def test_on_ack_called_after_puback(env: Env) -> None:
    cid, tag = uid("ack"), uid("t")
    raw = Raw(env.tcp_port)
    raw.connect(cid)
    raw.send(burst(tag, 3))
    msgs = [raw.recv() for _ in range(3)]
    assert [(m.topic, m.qos, m.packet_id, m.dup) for m in msgs] == [(f"burst/{tag}/{i}", 1, i + 1, False) for i in range(3)]
    assert raw.nothing_for(0.1) and env.app.acked(tag) == []
    raw.send(Puback(2))
    assert wait_until(lambda: env.app.acked(tag) == [1])  # async callback
    raw.send(Puback(1), Puback(3), Puback(3))  # a duplicate ack is an unknown id by then: ignored
    assert wait_until(lambda: env.app.acked(tag) == [0, 1, 2])
    time.sleep(0.05)
    assert env.app.acked(tag) == [0, 1, 2]
    raw.close()


def test_inflight_window_and_unknown_puback(env: Env) -> None:
    raw, tag = Raw(env.tcp_port), uid("win")
    raw.connect(uid("window"))
    raw.send(burst(tag, 70))
    first = [raw.recv() for _ in range(64)]
    assert [m.packet_id for m in first] == list(range(1, 65))
    assert raw.nothing_for(0.3)
    assert env.app.progress[tag] == 64  # the 65th publish() is waiting for a slot
    raw.send(Puback(60000))  # unknown id: ignored
    raw.send(b"\x40\x02\x00\x00")  # PUBACK 0, as the C# DPS client acknowledges a QoS 0 message: ignored, no close
    assert raw.nothing_for(0.2)
    raw.send(Puback(1))
    nxt = raw.recv()
    assert (nxt.topic, nxt.packet_id) == (f"burst/{tag}/64", 65)
    assert raw.nothing_for(0.1)
    raw.send(Pingreq())
    assert raw.recv() == Pingresp()
    raw.close()


def test_slow_handler_keeps_order_and_does_not_block_others(env: Env) -> None:
    slow = Raw(env.tcp_port)
    slow.connect(uid("slow"))
    start = time.monotonic()
    slow.send(Publish("cmd/slow", b"1.0", 1, packet_id=5), Pingreq())
    other = Paho(uid("fast"))
    other.connect(env.tcp_port)
    other.subscribe(("reply/#", 0))
    other.publish("echo/fast", b"f", 0)
    assert other.message().payload == b"f"
    assert time.monotonic() - start < 0.8  # served while the other session's handler sleeps
    other.stop()
    assert slow.recv() == Puback(5)
    assert time.monotonic() - start >= 0.95
    assert slow.recv() == Pingresp()  # handled only after the PUBLISH before it
    slow.close()


def test_qos2_publish_closes_the_connection(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="opendps.mqtt")
    cid = uid("qos2")
    raw = Raw(env.tcp_port)
    raw.connect(cid)
    caplog.clear()
    raw.send(Publish("echo/x", b"2", 2, packet_id=1))
    assert raw.closed_within(2)
    assert wait_until(lambda: env.app.of("disconnected", cid))
    records = mqtt_records(caplog)
    assert len(records) == 1 and "QoS 2 PUBLISH is not supported" in records[0].getMessage()
    assert env.app.of("publish", cid) == []


def test_handler_refusal_and_crash_close_without_puback(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="opendps.mqtt")
    refused = Raw(env.tcp_port)
    refused.connect(cid := uid("refuse"))
    caplog.clear()
    refused.send(Publish("cmd/refuse", b"", 1, packet_id=3))
    with pytest.raises(Closed):
        refused.recv()  # no PUBACK, just the close
    assert wait_until(lambda: env.app.of("disconnected", cid))
    (line,) = mqtt_records(caplog)
    assert "refused: publishing here is not allowed" in line.getMessage() and line.exc_info is None
    assert env.app.of("disconnected", cid)[0][2].endswith("publishing here is not allowed")

    crashed = Raw(env.tcp_port)
    crashed.connect(cid := uid("crash"))
    caplog.clear()
    crashed.send(Publish("cmd/crash", b"", 1, packet_id=4))
    with pytest.raises(Closed):
        crashed.recv()
    assert wait_until(lambda: env.app.of("disconnected", cid)) == [("disconnected", cid, "on_publish failed")]
    (line,) = mqtt_records(caplog)
    assert line.levelno == logging.ERROR and line.exc_info is not None and "closing without PUBACK" in line.getMessage()


class PipeApp(App):
    """A ``PipeliningHandler``: ``pipe/...`` PUBLISHes are begun with a future the test settles itself, in any order."""

    def __init__(self) -> None:
        super().__init__()
        self.begun: list[tuple[str, bytes, asyncio.Future[None]]] = []
        # per begun PUBLISH: the connection's CONNECTION_TAG as begin_publish saw it, and whether it ran in a task
        self.begun_in: list[tuple[str | None, bool]] = []

    def begin_publish(self, session: Session, topic: str, payload: bytes, qos: int,
                      retain: bool) -> asyncio.Future[None] | None:
        if not topic.startswith("pipe/"):
            return None  # on_publish handles it
        self.begun_in.append((CONNECTION_TAG.get(None), asyncio.current_task() is not None))
        if topic == "pipe/boom":
            raise RuntimeError("a bug in begin_publish")
        if topic.startswith("pipe/shared/") and self.begun and self.begun[-1][0].startswith("pipe/shared/") \
                and not self.begun[-1][2].done():  # a handler's batch: one future for several PUBLISHes
            future = self.begun[-1][2]
        else:
            future = asyncio.get_running_loop().create_future()
        self.begun.append((topic, payload, future))
        return future


@pytest.fixture()
def piped(env: Env) -> Iterator[tuple[PipeApp, int]]:
    app = PipeApp()

    async def start() -> tuple[MqttServer, int]:
        server = MqttServer(app.authenticate)
        app.server = server
        listener = await server.listen("127.0.0.1", 0)
        return server, listener.sockets[0].getsockname()[1]

    server, port = env.loop.call(start())
    try:
        yield app, port
    finally:
        for _, _, future in app.begun:  # the server's close waits for what a session began
            env.loop.loop.call_soon_threadsafe(lambda f=future: f.done() or f.set_result(None))
        env.loop.call(server.close(), timeout=15)


def _settle(env: Env, app: PipeApp, *indexes: int, error: BaseException | None = None) -> None:
    def settle() -> None:
        for i in indexes:
            future = app.begun[i][2]
            future.set_exception(error) if error is not None else future.set_result(None)
    env.loop.sync(settle)


def _count_writes(env: Env, app: PipeApp, client_id: str) -> list[bytes]:
    """Every write of the server's connection of ``client_id`` to its socket, from now on."""
    writes: list[bytes] = []

    def wrap() -> None:
        assert app.server is not None
        transport = app.server._live[client_id]._transport
        assert transport is not None
        original = transport.write

        def write(data: Any) -> None:
            writes.append(bytes(data))
            original(data)
        transport.write = write  # type: ignore[method-assign]
    env.loop.sync(wrap)
    return writes


def test_pipelined_publishes_are_begun_at_once_and_acknowledged_in_order_together(env: Env, piped: tuple[PipeApp, int]) -> None:
    """A PipeliningHandler's PUBLISHes are all begun before the first is accepted; the PUBACKs go out in the order of the
    PUBLISHes whatever order the futures finish in, and those that finish together in one write."""
    app, port = piped
    raw = Raw(port)
    raw.connect(cid := uid("pipe"))
    writes = _count_writes(env, app, cid)
    raw.send(*(Publish(f"pipe/{i}", b"m%d" % i, 1, packet_id=10 + i) for i in range(5)), Publish("pipe/q0", b"z", 0))
    assert wait_until(lambda: len(app.begun) == 6)  # all begun, none accepted yet
    assert [t for t, _, _ in app.begun] == [f"pipe/{i}" for i in range(5)] + ["pipe/q0"]
    _settle(env, app, 2, 3)
    assert raw.nothing_for(0.2)  # the first two are not accepted: nothing may be acknowledged out of order
    _settle(env, app, 0)
    assert raw.recv() == Puback(10) and raw.nothing_for(0.1)
    _settle(env, app, 1, 4, 5)  # finish together: 11, 12, 13, 14 in one write (the QoS 0 one has no PUBACK)
    assert [raw.recv() for _ in range(4)] == [Puback(11), Puback(12), Puback(13), Puback(14)]
    assert writes == [encode(Puback(10)), b"".join(encode(Puback(i)) for i in (11, 12, 13, 14))]
    assert not app.of("publish", cid)  # on_publish saw none of them


def test_publishes_sharing_one_future_are_acknowledged_together_in_order(env: Env, piped: tuple[PipeApp, int]) -> None:
    """A handler may answer several PUBLISHes with one future (the hub's group commit: one per transaction): the
    core waits on it once, and its PUBLISHes are acknowledged together, in order, after what was begun before them."""
    app, port = piped
    raw = Raw(port)
    raw.connect(cid := uid("shared"))
    writes = _count_writes(env, app, cid)
    raw.send(Publish("pipe/first", b"", 1, packet_id=1),
             *(Publish(f"pipe/shared/{i}", b"", 1, packet_id=2 + i) for i in range(3)))
    assert wait_until(lambda: len(app.begun) == 4)
    assert len({id(f) for _, _, f in app.begun[1:]}) == 1
    _settle(env, app, 1)  # the shared one first: nothing may go before PUBLISH 1's
    assert raw.nothing_for(0.2)
    _settle(env, app, 0)
    assert [raw.recv() for _ in range(4)] == [Puback(1), Puback(2), Puback(3), Puback(4)]
    assert writes == [b"".join(encode(Puback(i)) for i in (1, 2, 3, 4))]


def test_a_publish_arriving_alone_is_begun_at_once_in_the_connections_context(env: Env,
                                                                             piped: tuple[PipeApp, int]) -> None:
    """A PUBLISH with nothing of its connection waiting is begun where it was read, without a consumer task (one per
    message was most of the event loop's cost per telemetry message), and in the context the connection's CONNECT
    set, as the consumer would have run it."""
    app, port = piped
    raw = Raw(port)
    raw.connect(cid := uid("alone"))
    for i in range(3):
        raw.send(Publish(f"pipe/{i}", b"m", 1, packet_id=i + 1))
        assert wait_until(lambda n=i + 1: len(app.begun) == n)
        _settle(env, app, i)
        assert raw.recv() == Puback(i + 1)
    assert app.begun_in == [(cid, False)] * 3


def test_a_bug_in_begin_publish_closes_only_its_connection(env: Env, piped: tuple[PipeApp, int],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="opendps.mqtt")
    app, port = piped
    raw, other = Raw(port), Raw(port)
    raw.connect(cid := uid("boom"))
    other.connect(uid("calm"))
    raw.send(Publish("pipe/boom", b"", 1, packet_id=1))
    assert raw.closed_within(2)
    assert wait_until(lambda: app.of("disconnected", cid)) == [("disconnected", cid, "internal error")]
    assert any(r.exc_info is not None and "internal error" in r.getMessage() for r in mqtt_records(caplog))
    other.send(Publish("pipe/ok", b"", 1, packet_id=7))
    assert wait_until(lambda: len(app.begun) == 1)
    _settle(env, app, 0)
    assert other.recv() == Puback(7)


def test_a_packet_after_pipelined_publishes_takes_effect_after_them(env: Env, piped: tuple[PipeApp, int]) -> None:
    app, port = piped
    raw = Raw(port)
    raw.connect(cid := uid("order"))
    raw.send(Publish("pipe/a", b"1", 1, packet_id=1), Publish("other/b", b"2", 1, packet_id=2),
             Subscribe(3, [("reply/#", 1)]))
    assert wait_until(lambda: len(app.begun) == 1)
    assert raw.nothing_for(0.2) and not app.of("publish", cid) and not app.of("subscribe", cid)
    _settle(env, app, 0)
    assert [raw.recv() for _ in range(3)] == [Puback(1), Puback(2), Suback(3, [1])]
    assert [e[2] for e in app.of("publish", cid)] == ["other/b"]


def test_a_failed_pipelined_publish_closes_without_its_puback_or_later_ones(env: Env, piped: tuple[PipeApp, int],
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="opendps.mqtt")
    app, port = piped
    raw = Raw(port)
    raw.connect(cid := uid("fail"))
    raw.send(*(Publish("pipe/x", b"%d" % i, 1, packet_id=i) for i in (1, 2, 3)))
    assert wait_until(lambda: len(app.begun) == 3)
    _settle(env, app, 0)
    _settle(env, app, 1, error=MqttRefused("the store said no"))
    assert raw.recv() == Puback(1)
    _settle(env, app, 2, error=RuntimeError("its transaction failed too"))  # after the connection gave up on it
    assert raw.closed_within(2)  # no PUBACK for 2, nor for 3: the client sends both again
    assert wait_until(lambda: app.of("disconnected", cid))
    assert any("refused: the store said no" in r.getMessage() for r in mqtt_records(caplog))
    app.begun.clear()
    env.loop.sync(gc.collect)  # a failure nobody looked at would reach the loop's exception handler (_no_loop_errors)


def test_a_connection_begins_at_most_a_bounded_number_of_publishes(env: Env, piped: tuple[PipeApp, int]) -> None:
    app, port = piped
    raw = Raw(port)
    raw.connect(uid("depth"))
    raw.send(*(Publish("pipe/d", b"", 1, packet_id=i) for i in range(1, 41)))
    assert wait_until(lambda: len(app.begun) == 32) and raw.nothing_for(0.2) and len(app.begun) == 32
    _settle(env, app, 0)  # one accepted: room for exactly one more
    assert raw.recv() == Puback(1)
    assert wait_until(lambda: len(app.begun) == 33) and raw.nothing_for(0.2) and len(app.begun) == 33
    _settle(env, app, *range(1, 33))
    assert wait_until(lambda: len(app.begun) == 40)
    _settle(env, app, *range(33, 40))
    assert [raw.recv() for _ in range(39)] == [Puback(i) for i in range(2, 41)]


def test_max_packet_size(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="opendps.mqtt")
    client = Paho(uid("big"))
    client.connect(env.tcp_port)
    client.subscribe(("reply/#", 0))
    topic = "echo/max"
    exact = b"m" * (MAX_PACKET - 2 - len(topic) - 2)  # remaining length == max_packet_size
    client.publish(topic, exact, 1)
    assert client.message().payload == exact
    client.stop()

    header_only = Raw(env.tcp_port)
    header_only.connect(uid("huge"))
    caplog.clear()
    header_only.send(b"\x32" + encode_remaining_length(MAX_PACKET + 1))  # no body follows: refused on the header
    assert header_only.closed_within(2)
    (line,) = mqtt_records(caplog)
    assert f"packet too large: remaining length {MAX_PACKET + 1} exceeds {MAX_PACKET}" in line.getMessage()


def test_publishes_sent_before_leaving_are_still_handled(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="opendps.mqtt")
    cid = uid("leaving")
    raw = Raw(env.tcp_port)
    raw.connect(cid)
    raw.send(Publish("cmd/slow", b"0.2"), Publish("echo/late", b"z"), Disconnect(), b"\xff after DISCONNECT is ignored")
    raw.close()  # gone while the first handler still runs
    assert wait_until(lambda: env.app.of("disconnected", cid)) == [("disconnected", cid, "client disconnected")]
    assert [e[2] for e in env.app.of("publish", cid)] == ["cmd/slow", "echo/late"]
    assert mqtt_records(caplog) == []  # the echo's SessionClosed is routine, not an error


def _connected(env: Env, prefix: str) -> tuple[str, Raw, Any]:
    """A raw client connected under a fresh client id: the id, the client, the server's connection object for it."""
    cid = uid(prefix)
    raw = Raw(env.tcp_port)
    raw.connect(cid)
    session = env.session(cid)
    assert session is not None
    return cid, raw, session._conn


def test_reading_pauses_while_the_session_is_busy(env: Env) -> None:
    cid, raw, conn = _connected(env, "flood")
    body = b"f" * 60000
    flood = [Publish("cmd/slow", b"1.0"), *(Publish(f"sink/{i}", body) for i in range(40))]  # 2.4 MB behind a slow handler
    sender = threading.Thread(target=raw.send, args=flood)
    sender.start()
    assert wait_until(lambda: env.loop.sync(lambda: conn._reading_paused), timeout=0.8)
    time.sleep(0.1)
    paused, queued = env.loop.sync(lambda: (conn._reading_paused, conn._queued_bytes))
    limit = env.server._input_high_water
    assert paused and limit < queued <= limit + 256 * 1024 + 70000, (paused, queued)  # at most one read beyond the mark
    sender.join(5)
    assert wait_until(lambda: len(env.app.of("publish", cid)) == 41)
    assert [e[2] for e in env.app.of("publish", cid)] == ["cmd/slow", *(f"sink/{i}" for i in range(40))]
    raw.send(Pingreq())
    assert raw.recv() == Pingresp()
    assert env.loop.sync(lambda: (conn._reading_paused, conn._queued_bytes)) == (False, 0)
    raw.close()


@pytest.mark.parametrize("kind", [Subscribe, Unsubscribe])
def test_the_filters_of_waiting_subscribes_count_against_the_input_bound(env: Env, kind: type) -> None:
    """Found by fuzzing: a SUBSCRIBE or UNSUBSCRIBE of 240 KB (25,000 short filters) decodes to ~3 MB of objects but
    counted as 64 bytes of waiting input, so reading never paused behind a busy session: a client sending such packets
    held the server at 2.5 GB after 581 of them. Now each filter counts and reading pauses after the first one."""
    _, raw, conn = _connected(env, "filters")
    names = [f"f/{i}" for i in range(25000)]
    packet = Subscribe(1, [(f, 0) for f in names]) if kind is Subscribe else Unsubscribe(1, names)
    assert len(encode(packet)) < MAX_PACKET
    sender = threading.Thread(target=raw.send, args=[Publish("cmd/slow", b"2.0"), *[packet] * 10])  # 2.4 MB
    sender.start()
    # within the slow command's 2 s (it was 1 s, with 0.8 s to pause: too little on a loaded 2-core machine)
    assert wait_until(lambda: env.loop.sync(lambda: conn._reading_paused), timeout=1.8)
    time.sleep(0.1)
    waiting, queued = env.loop.sync(lambda: (len(conn._queue or ()), conn._queued_bytes))
    assert waiting <= 3 and queued <= env.server._input_hard_limit, (waiting, queued)
    for _ in range(10):
        answer = raw.recv()
        assert type(answer) is (Suback if kind is Subscribe else Unsuback), answer
    sender.join(5)
    raw.send(Pingreq())
    assert raw.recv() == Pingresp()
    assert env.loop.sync(lambda: (conn._reading_paused, conn._queued_bytes)) == (False, 0)
    raw.close()


# --- keepalive, take-over, application close ----------------------------------------------------


class _TagOfLine(logging.Handler):
    """Records, for each keepalive-timeout line, the connection tag in the context the line was written in."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.tags: dict[str, str | None] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if "keepalive" in record.getMessage():
            self.tags[record.getMessage()] = CONNECTION_TAG.get()


def test_keepalive_expiry(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    # silent: never sends anything; once: one PINGREQ at 0.8 s; pinging: every 0.4 s. keepalive=1 for all.
    caplog.set_level(logging.INFO, logger="opendps.mqtt")
    lines = _TagOfLine()
    logging.getLogger("opendps.mqtt").addHandler(lines)
    silent, once, pinging = Raw(env.tcp_port), Raw(env.tcp_port), Raw(env.tcp_port)
    silent_id, once_id = uid("silent"), uid("once")
    silent.connect(silent_id, keepalive=1)
    once.connect(once_id, keepalive=1)
    pinging.connect(uid("pinging"), keepalive=1)
    start = time.monotonic()
    closed_at: dict[str, float] = {}
    next_ping, once_pinged = start, False
    while time.monotonic() - start < 2.9:
        now = time.monotonic()
        if now >= next_ping:
            pinging.send(Pingreq())
            assert pinging.recv(1) == Pingresp()
            next_ping = now + 0.4
        if not once_pinged and now - start >= 0.8:
            once.send(Pingreq())
            once_pinged = True
        for name, raw in (("silent", silent), ("once", once)):
            if name not in closed_at:
                ready, _, _ = select.select([raw.sock], [], [], 0.01)
                if ready and raw.closed_within(0.02):
                    closed_at[name] = time.monotonic() - start
    assert 1.4 <= closed_at.get("silent", 0) <= 2.1, closed_at  # 1.5 x keepalive after the CONNECT
    assert 2.15 <= closed_at.get("once", 0) <= 2.85, closed_at  # 1.5 x keepalive after its last packet
    pinging.send(Pingreq())
    assert pinging.recv(1) == Pingresp()  # the active client outlived them
    for cid in (silent_id, once_id):
        assert wait_until(lambda cid=cid: env.app.of("disconnected", cid)) == [("disconnected", cid, "keepalive timeout")]
    pinging.close()
    logging.getLogger("opendps.mqtt").removeHandler(lines)
    # the timeout's line is written in the connection's context (for the hub: its request id), as its other lines
    for cid in (silent_id, once_id):
        assert [tag for line, tag in lines.tags.items() if cid in line] == [cid]


def test_session_take_over(env: Env) -> None:
    cid = uid("same")
    old = Raw(env.tcp_port)
    assert old.connect(cid, clean=False) == Connack(False, 0)
    old.send(Subscribe(1, [("t/#", 1)]))
    assert old.recv() == Suback(1, [1])
    new = Raw(env.tcp_port)
    assert new.connect(cid, clean=False) == Connack(True, 0)  # the taken-over session's state carries over
    assert old.closed_within(2)
    def events() -> list[tuple]:
        return [e[:3] for e in env.app.events if e[1] == cid and e[0] in ("connected", "disconnected")]

    assert wait_until(lambda: len(events()) == 3)
    assert events() == [("connected", cid, ("127.0.0.1", old.port)), ("disconnected", cid, "taken over"),
                      ("connected", cid, ("127.0.0.1", new.port))]
    session = env.session(cid)
    assert session is not None and session.request.peername == ("127.0.0.1", new.port)
    assert env.subscriptions(cid) == {"t/#": 1}
    new.send(Pingreq())
    assert new.recv() == Pingresp()

    fresh = Paho(cid)  # a clean take-over by paho
    assert fresh.connect(env.tcp_port) == (False, "Success")
    assert new.closed_within(2)
    assert wait_until(lambda: len(env.app.of("disconnected", cid)) == 2)
    assert env.app.of("disconnected", cid)[1][2] == "taken over"
    assert env.subscriptions(cid) == {}
    fresh.stop()


def test_application_close_and_publish_after_close(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="opendps.mqtt")
    cid = uid("disable")
    raw = Raw(env.tcp_port)
    raw.connect(cid)
    session = env.session(cid)
    assert session is not None
    caplog.clear()
    env.loop.sync(lambda: session.close("device disabled"))
    assert raw.closed_within(2)
    (line,) = mqtt_records(caplog)
    assert "device disabled" in line.getMessage() and cid in line.getMessage()
    assert wait_until(lambda: env.app.of("disconnected", cid)) == [("disconnected", cid, "device disabled")]
    assert session.closed and env.session(cid) is None
    with pytest.raises(SessionClosed):
        env.loop.call(session.publish("x", b"y", 1))
    with pytest.raises(ValueError):
        env.loop.call(session.publish("bad/+", b"y"))
    with pytest.raises(ValueError):
        env.loop.call(session.publish("x", b"y", 0, on_ack=lambda: None))


# --- persistent sessions ------------------------------------------------------------------------


def test_persistent_session_redelivers_unacked_messages(env: Env) -> None:
    cid, tag, tag2 = uid("persist"), uid("t"), uid("u")
    first = Raw(env.tcp_port)
    assert first.connect(cid, clean=False) == Connack(False, 0)
    first.send(Subscribe(1, [("burst/#", 1)]))
    assert first.recv() == Suback(1, [1])
    first.send(burst(tag, 5))
    sent = [first.recv() for _ in range(5)]
    assert [(m.packet_id, m.dup) for m in sent] == [(i, False) for i in range(1, 6)]
    first.send(Puback(2), Puback(4))
    assert wait_until(lambda: env.app.acked(tag) == [1, 3])
    first.send(Disconnect())
    assert first.closed_within(2)
    assert wait_until(lambda: env.app.of("disconnected", cid)) == [("disconnected", cid, "client disconnected")]

    second = Raw(env.tcp_port)
    assert second.connect(cid, clean=False) == Connack(True, 0)
    again = [second.recv() for _ in range(3)]
    assert again == [Publish(m.topic, m.payload, 1, False, True, m.packet_id) for m in (sent[0], sent[2], sent[4])]
    assert env.subscriptions(cid) == {"burst/#": 1}
    second.send(burst(tag2, 2))
    new = [second.recv() for _ in range(2)]  # after the redelivery, skipping packet ids still in use
    assert [(m.topic, m.packet_id, m.dup) for m in new] == [(f"burst/{tag2}/0", 2, False), (f"burst/{tag2}/1", 4, False)]
    second.send(Puback(1), Puback(3), Puback(5), Puback(2), Puback(4))
    assert wait_until(lambda: env.app.acked(tag) == [0, 1, 2, 3, 4] and env.app.acked(tag2) == [0, 1])
    assert second.nothing_for(0.1)
    second.close()


def test_clean_session_discards_state(env: Env) -> None:
    cid, tag = uid("clean"), uid("t")
    first = Raw(env.tcp_port)
    first.connect(cid, clean=False)
    first.send(Subscribe(1, [("burst/#", 1)]))
    first.recv()
    first.send(burst(tag, 2))
    assert [first.recv().packet_id for _ in range(2)] == [1, 2]
    first.close()  # abrupt, nothing acknowledged
    assert wait_until(lambda: env.app.of("disconnected", cid)) == [("disconnected", cid, "connection lost")]

    second = Raw(env.tcp_port)
    assert second.connect(cid, clean=True) == Connack(False, 0)
    assert second.nothing_for(0.3)
    assert env.subscriptions(cid) == {}
    second.send(Disconnect())
    assert second.closed_within(2)
    assert wait_until(lambda: len(env.app.of("disconnected", cid)) == 2)

    third = Raw(env.tcp_port)  # a clean session leaves nothing behind either
    assert third.connect(cid, clean=False) == Connack(False, 0)
    assert third.nothing_for(0.2)
    assert env.app.acked(tag) == []
    third.close()


def test_persistent_session_expires(env: Env) -> None:
    with extra_server(env, session_expiry=0.6) as (_, _, port):
        cid = uid("expiry")
        first = Raw(port)
        first.connect(cid, clean=False)
        first.send(Subscribe(1, [("a", 1)]))
        first.recv()
        first.close()
        kept = Raw(port)
        assert kept.connect(cid, clean=False) == Connack(True, 0)
        kept.close()
        time.sleep(0.9)
        expired = Raw(port)
        assert expired.connect(cid, clean=False) == Connack(False, 0)
        expired.close()


# --- protocol violations and fuzzing ------------------------------------------------------------

VIOLATIONS = [
    ("malformed PUBLISH", True, b"\x30\x07\x00\x05a/+/b", "protocol error: PUBLISH: wildcard in topic name"),
    ("second CONNECT", True, encode(Connect("again")), "protocol error: second CONNECT on one connection"),
    ("CONNACK from a client", True, encode(Connack()), "protocol error: CONNACK is not a packet a client may send here"),
    ("SUBACK from a client", True, encode(Suback(1, [0])), "protocol error: SUBACK is not a packet a client may send here"),
    ("PUBREL without QoS 2", True, encode(Pubrel(1)), "protocol error: PUBREL is not a packet a client may send here"),
    ("PINGRESP from a client", True, b"\xd0\x00", "protocol error: PINGRESP is not a packet a client may send here"),
    ("first packet not CONNECT", False, encode(Pingreq()), "protocol error: first packet is PINGREQ, not CONNECT"),
    ("garbage before CONNECT", False, b"\xff\xff\xff", "protocol error: reserved packet type 15"),
    ("bad flags", True, b"\x80\x06\x00\x01\x00\x01a\x00",
     "protocol error: SUBSCRIBE: reserved fixed-header flags must be 0b0010, got 0b0000"),
]


@pytest.mark.parametrize(("after_connect", "wire", "problem"), [v[1:] for v in VIOLATIONS], ids=[v[0] for v in VIOLATIONS])
def test_violation_closes_only_that_connection_with_one_line(env: Env, caplog: pytest.LogCaptureFixture,
                                                             after_connect: bool, wire: bytes, problem: str) -> None:
    caplog.set_level(logging.INFO, logger="opendps.mqtt")
    good = Paho(uid("good"))
    good.connect(env.tcp_port)
    good.subscribe(("reply/#", 1))
    bad_id = uid("bad")
    bad = Raw(env.tcp_port)
    if after_connect:
        assert bad.connect(bad_id, username="user", password=b"s3cret-pw") == Connack(False, 0)
    caplog.clear()
    bad.send(wire)
    assert bad.closed_within(2)
    time.sleep(0.05)
    records = mqtt_records(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    line = records[0].getMessage()
    assert problem in line and f"127.0.0.1:{bad.port}" in line and "s3cret" not in line and records[0].exc_info is None
    if after_connect:
        assert bad_id in line
        assert wait_until(lambda: env.app.of("disconnected", bad_id)) == [("disconnected", bad_id, problem)]
    good.publish("echo/still", b"alive", 1)
    assert good.message().payload == b"alive"
    good.stop()


def _fuzz_inputs(rng: random.Random, count: int) -> list[bytes]:
    valid = (encode(Connect("fz", False, 5, "u", b"p")) + encode(Subscribe(1, [("fuzz/#", 1)]))
             + encode(Publish("fuzz/a", b"payload", 1, packet_id=2)) + encode(Pingreq()) + encode(Unsubscribe(3, ["fuzz/#"])))
    out = []
    for i in range(count):
        kind = i % 3
        if kind == 0:  # pure noise
            out.append(rng.randbytes(rng.randint(1, 200)))
        elif kind == 1:  # a valid CONNECT, then noise
            out.append(encode(Connect(f"fz{i}", True, 0)) + rng.randbytes(rng.randint(1, 100)))
        else:  # a valid session with a few mutations
            data = bytearray(valid)
            for _ in range(rng.randint(1, 4)):
                pos = rng.randrange(len(data))
                choice = rng.random()
                if choice < 0.5:
                    data[pos] = rng.randrange(256)
                elif choice < 0.75:
                    data.insert(pos, rng.randrange(256))
                else:
                    del data[pos]
            out.append(bytes(data))
    return out


def test_fuzz_live_listener(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="opendps.mqtt")
    before = env.loop.sync(lambda: set(env.server._connections))
    inputs = _fuzz_inputs(random.Random(20240611), 300)

    def attack(data: bytes) -> bool:
        with socket.create_connection(("127.0.0.1", env.tcp_port), timeout=5) as sock:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(65536):
                    pass
            except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
                pass
            return True  # EOF or reset: the server closed it

    results: list[bool] = []
    threads = [threading.Thread(target=lambda chunk=inputs[k::4]: results.extend(attack(d) for d in chunk)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 300 and all(results)

    def leftover() -> list[str]:
        return env.loop.sync(lambda: [f"{c._peer} {c._client_id} {c._close_reason} lost={c._lost}"
                                      for c in env.server._connections - before])

    assert wait_until(lambda: leftover() == []), leftover()  # every connection ended and was forgotten
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []

    good = Paho(uid("after-fuzz"))
    assert good.connect(env.tcp_port) == (False, "Success")
    assert good.subscribe(("reply/#", 1)) == [1]
    good.publish("echo/ok", b"fine", 1)
    assert good.message().payload == b"fine"
    good.stop()


# --- backpressure -------------------------------------------------------------------------------


def test_backpressure_bounds_the_write_buffer(env: Env) -> None:
    cid, tag = uid("slowreader"), uid("bp")
    reader = Raw(env.tcp_port, rcvbuf=32 * 1024)
    reader.connect(cid)
    size, n = 256 * 1024 - 64, 80  # 20 MiB in QoS 0 messages
    reader.send(burst(tag, n, qos=0, size=size))
    time.sleep(0.6)  # the client does not read
    stalled_at = env.app.progress[tag]
    assert stalled_at < n // 2, stalled_at  # publish() waits instead of buffering 20 MiB
    bound = HIGH_WATER + size + 1024  # high-water mark plus one message
    assert 0 < env.app.max_buffer[tag] <= bound
    got = [reader.recv(10) for _ in range(n)]
    assert [(m.topic, m.qos, len(m.payload), m.payload.startswith(f"{tag}:{i}:".encode())) for i, m in enumerate(got)] == \
        [(f"burst/{tag}/{i}", 0, size + len(f"{tag}:{i}:"), True) for i in range(n)]
    assert wait_until(lambda: env.app.progress[tag] == n)
    assert env.app.max_buffer[tag] <= bound
    assert tag not in env.app.burst_errors
    reader.close()


# --- mosquitto clients --------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_mosquitto_pub_sub(env: Env, tls: bool) -> None:
    pub_bin, sub_bin = shutil.which("mosquitto_pub"), shutil.which("mosquitto_sub")
    if not pub_bin or not sub_bin:
        service_missing("mosquitto_pub/mosquitto_sub not installed (Debian package mosquitto-clients)")
    port = env.tls_port if tls else env.tcp_port
    tls_args = ["--cafile", str(env.pki.ca)] if tls else []
    common = ["-h", "127.0.0.1", "-p", str(port), "-V", "mqttv311", *tls_args]
    sub_id, pub_id, tag = uid("msub"), uid("mpub"), uid("m")
    sub = subprocess.Popen([sub_bin, *common, "-i", sub_id, "-t", f"fan/{tag}/#", "-q", "1", "-C", "2", "-v", "-W", "10"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: env.subscriptions(sub_id) == {f"fan/{tag}/#": 1}), sub.stderr
        cert_args = ["--cert", str(env.pki.client_bundle), "--key", str(env.pki.client_key)] if tls else []
        for topic, message, qos in ((f"fan/{tag}/a", "hello", "1"), (f"fan/{tag}/b", "world", "0")):
            done = subprocess.run([pub_bin, *common, *cert_args, "-i", pub_id, "-t", topic, "-m", message, "-q", qos],
                                  capture_output=True, text=True, timeout=10)
            assert done.returncode == 0, done.stderr
        out, err = sub.communicate(timeout=10)
    finally:
        sub.kill()
    assert sub.returncode == 0, err
    assert out.splitlines() == [f"fan/{tag}/a hello", f"fan/{tag}/b world"]
    assert [e[2:5] for e in env.app.of("publish", pub_id)] == [(f"fan/{tag}/a", b"hello", 1), (f"fan/{tag}/b", b"world", 0)]
    chain = env.app.requests[pub_id].peer_certificate_chain
    assert [c.subject.rfc4514_string() for c in chain] == (["CN=device-tls", "CN=MQTT Client CA"] if tls else [])


# --- WebSockets ---------------------------------------------------------------------------------


def test_websocket_packets_split_and_merged(env: Env) -> None:
    cid = uid("ws")

    async def scenario() -> tuple[list[Packet], str | None, aiohttp.WSMsgType]:
        async with aiohttp.ClientSession() as http, \
                http.ws_connect(f"http://127.0.0.1:{env.ws_port}/$iothub/websocket", protocols=("mqtt",)) as ws:
            wire = (encode(Connect(cid, keepalive=0)) + encode(Subscribe(1, [("reply/#", 1)]))
                    + encode(Publish("echo/ws", b"split", 1, packet_id=9)))
            for chunk in (wire[:3], wire[3:20], wire[20:]):  # packets split across and merged into messages
                await ws.send_bytes(chunk)
            decoder, got = Decoder(), []
            while len(got) < 4:
                msg = await ws.receive(timeout=5)
                assert msg.type is aiohttp.WSMsgType.BINARY
                got += decoder.feed(msg.data)
            await ws.send_bytes(encode(Puback(1)))
            await ws.send_str("text is not MQTT")
            end = await ws.receive(timeout=5)
            return got, ws.protocol, end.type

    got, protocol, end = env.loop.call(scenario())
    assert got == [Connack(False, 0), Suback(1, [1]), Publish("reply/ws", b"split", 1, packet_id=1), Puback(9)]
    assert protocol == "mqtt"
    assert end is aiohttp.WSMsgType.CLOSE
    assert wait_until(lambda: env.app.of("disconnected", cid)) == [
        ("disconnected", cid, "protocol error: text WebSocket message (MQTT needs binary messages)")]


# --- shutdown -----------------------------------------------------------------------------------


def test_clean_shutdown(env: Env) -> None:
    with extra_server(env) as (app, server, port):
        ids = [uid(f"shut{i}") for i in range(3)]
        clients = [Paho(cid) for cid in ids]
        for c in clients:
            assert c.connect(port) == (False, "Success")
        busy_id = uid("busy")
        busy = Raw(port)
        busy.connect(busy_id)
        busy.send(Publish("cmd/slow", b"0.3", 1, packet_id=1))
        half = Raw(port)  # connected, no CONNECT yet
        time.sleep(0.1)
        start = time.monotonic()
        env.loop.call(server.close(), timeout=10)
        elapsed = time.monotonic() - start
        assert elapsed < 2.0
        for cid in ids:
            assert app.of("disconnected", cid) == [("disconnected", cid, "server shutdown")]
        # the busy handler finished (and was acknowledged) before its session ended
        busy_events = [e[0] for e in app.events if e[1] == busy_id]
        assert busy_events[-2:] == ["slow-done", "disconnected"]
        assert busy.recv() == Puback(1)
        assert busy.closed_within(2) and half.closed_within(2)
        for c in clients:
            assert c.disconnected.wait(2)
            c.client.loop_stop()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2)
        assert server.sessions() == []


def test_tls_handshake_failure_does_not_reach_mqtt(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="opendps.mqtt")
    ctx = ssl.create_default_context()  # does not trust the test CA: the client aborts the handshake
    with socket.create_connection(("127.0.0.1", env.tls_port), timeout=5) as sock, pytest.raises(ssl.SSLError):
        ctx.wrap_socket(sock, server_hostname="localhost")
    time.sleep(0.05)
    assert mqtt_records(caplog) == []
