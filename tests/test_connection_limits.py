"""Slow, silent and too many clients (issue 12.1), against a real server whose descriptor limit is lowered to 256
(so its three listeners share 256 - 128 descriptors by weight, MQTT 8 : HTTPS 4 : AMQP 2, and HTTPS may hold
128 * 4 // 14 = 36 connections) and whose client timeout is 2 s.

Store-independent: one SQLite server for the module. Socket counts are bounded (a few hundred at most).
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import ssl
import struct
import time

import httpx
import pytest
from tests.conftest import _run_server, database
from tests.test_device_api import svc, sym_key

from opendps.transport import sas
from opendps.transport.mqtt.codec import Connack, Connect, Decoder, Publish, Subscribe, encode

LIMIT = (256 - 128) * 4 // 14  # the HTTPS listener's share
pytestmark = pytest.mark.timeout(120, func_only=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("limits")
    with database("sqlite", tmp_path) as db_url:
        # the plain-HTTP listener off: three listeners share the limit, as LIMIT says
        yield from _run_server(db_url, tmp_path, extra_args=("--client-timeout", "2", "--http-port", "0"),
                               max_open_files=256)


def _tls(server, port: int, *, timeout: float = 10) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=server.ca_file)
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=timeout), server_hostname="localhost")


def _https_port(server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _closed_within(sock: ssl.SSLSocket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except (ConnectionError, ssl.SSLError):
        return True
    except TimeoutError:
        return False


def _log(server) -> str:
    return (server.data_dir.parent / "server.log").read_text()


def _connack(server, rid: str, password: str | None, *, keepalive: int = 60) -> tuple[int, ssl.SSLSocket]:
    s = _tls(server, server.mqtt_port)
    username = f"{server.id_scope}/registrations/{rid}/api-version=2025-07-01-preview"
    s.sendall(encode(Connect(client_id=rid, username=username, keepalive=keepalive,
                             password=password.encode() if password else None)))
    decoder = Decoder()
    while True:
        packets = decoder.feed(s.recv(4096))
        if packets:
            assert isinstance(packets[0], Connack)
            return packets[0].return_code, s


def test_a_slow_request_header_is_cut_off(server):
    """Half a request header, then nothing: closed after the client timeout, not held forever."""
    s = _tls(server, _https_port(server))
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: local")
    started = time.monotonic()
    assert _closed_within(s, 8)
    assert 1.5 <= time.monotonic() - started <= 8
    s.close()
    idle = _tls(server, _https_port(server))  # a TLS session that never sends a request
    assert _closed_within(idle, 8)
    idle.close()


def test_connecting_is_bounded_by_the_client_timeout_too(server):
    """The deadline to connect (the TLS handshake, then the MQTT CONNECT or the AMQP SASL and open) is 10 s, or the
    client timeout when that is shorter: a client that never finishes connecting is silent too."""
    with contextlib.ExitStack() as stack:  # all five at once: their deadlines run side by side
        silent = [(port, time.monotonic(), stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10)))
                  for port in (_https_port(server), server.mqtt_port, server.amqp_port)]  # TCP, then no ClientHello
        silent += [(port, time.monotonic(), stack.enter_context(_tls(server, port)))  # a finished handshake, then
                   for port in (server.mqtt_port, server.amqp_port)]  # no CONNECT / no AMQP header
        for port, started, sock in silent:  # one closed before it is looked at is seen at once: its time stays
            assert _closed_within(sock, 8), port
            assert 1.5 <= time.monotonic() - started <= 6, port


def test_a_dps_session_without_keepalive_is_bounded(server):
    """keepalive 0 on a DPS MQTT session is bounded by the client timeout: silence ends it (1.5 x 2 s)."""
    with svc(server) as c:
        key = sym_key(c, "/enrollments/limits-dev", {"attestation": {"type": "symmetricKey"}})
    token = sas.generate(f"{server.id_scope}/registrations/limits-dev", key, "registration")
    code, s = _connack(server, "limits-dev", token, keepalive=0)
    assert code == 0
    started = time.monotonic()
    assert _closed_within(s, 10)
    assert 2.5 <= time.monotonic() - started <= 10
    s.close()


def test_a_flood_is_capped_per_listener_and_the_others_keep_serving(server):
    """More connections than a listener may hold, none of which ever sends a byte: the process never runs out of
    descriptors, the oldest of them are closed to make room, so a real client is served while the flood goes on (they
    were refused instead: one peer replacing its silent connections held a listener full for as long as it liked),
    the other listeners serve as usual, and one log line reports it."""
    https = _https_port(server)
    silent = [socket.create_connection(("127.0.0.1", https), timeout=5) for _ in range(LIMIT + 40)]
    try:
        with httpx.Client(verify=ssl.create_default_context(cafile=server.ca_file), timeout=5) as c:
            assert c.get(f"{server.url}/healthz").status_code == 200  # during the flood
        # the 40 oldest (and one more for the real client) made room; nothing answered was touched
        assert all(_cut_off_within(sock, 2) for sock in silent[:41])
        # the MQTT listener is untouched: a device still gets its CONNACK (5: no credential), i.e. is served
        code, s = _connack(server, "flood-probe", None)
        assert code == 5
        s.close()
    finally:
        for sock in silent:
            sock.close()
    log = _log(server)
    assert 1 <= log.count("HTTPS listener is at its limit of") <= 2, log[-3000:]
    assert "closed 1 that had not been answered or were idle to make room" in log
    assert "out of system resource" not in log and "Too many open files" not in log


def test_a_listener_full_of_idle_keep_alive_connections_makes_room_for_a_new_client(server):
    """One peer completing handshakes and sending one request each (then nothing) held the HTTPS listener full for
    the keep-alive timeout, as answered connections were never closed to make room: real clients were refused. The
    server's HTTPS gate now closes the oldest idle keep-alive connection (cleanly: close_notify, then FIN)."""
    https = _https_port(server)
    held: list[ssl.SSLSocket] = []
    try:
        started = time.monotonic()
        for _ in range(LIMIT):
            ctx = ssl.create_default_context(cafile=server.ca_file)
            s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", https), timeout=5), server_hostname="localhost",
                                suppress_ragged_eofs=False)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            held.append(s)
        with httpx.Client(verify=ssl.create_default_context(cafile=server.ca_file), timeout=5) as c:
            assert c.get(f"{server.url}/healthz").status_code == 200  # before: refused (reset at once)
        held[0].settimeout(2)
        assert held[0].recv(4096) == b""  # the oldest, closed cleanly (an SSLEOFError if it were a bare FIN)
        # within the 2 s keep-alive timeout, or the timer (not the gate) could have closed it
        assert time.monotonic() - started < 2, "filling the listener took longer than its keep-alive timeout"
        held[-1].sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")  # the others are kept
        assert held[-1].recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        for s in held:
            s.close()


def test_a_websocket_message_larger_than_mqtt_holds_is_refused_as_it_arrives(server):
    """MQTT over WebSockets: a message is read whole before MQTT sees it, and the route read messages of any size, so
    one client without a CONNECT made the server hold a 300 MB message (RSS +580 MB). Now a message declaring more
    than the core holds on any connection (4 MiB + 257 KiB) is refused with 1009 on its frame header, before its
    payload is read; under that it is MQTT's to judge."""
    sock = _tls(server, _https_port(server))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /$iothub/websocket HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    declared = 8 << 20  # a binary frame of 8 MiB (a client's frames are masked); only its first KiB is sent
    mask = os.urandom(4)
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(b"\x30" + b"B" * 1023))
    sock.sendall(b"\x82\xff" + struct.pack(">Q", declared) + mask + payload)
    sock.settimeout(10)
    frame = head.split(b"\r\n\r\n", 1)[1]
    while len(frame) < 4:
        chunk = sock.recv(4096)
        assert chunk, "closed without a close frame"
        frame += chunk
    assert frame[0] == 0x88 and struct.unpack(">H", frame[2:4])[0] == 1009, frame[:8]  # close: message too big
    assert _closed_within(sock, 5)


def _cut_off_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server ended the connection (our side left ESTABLISHED: its RST or FIN arrived) within
    ``seconds``, found without reading a byte (Linux's TCP_INFO: the state is its first byte)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] != 1:  # 1: TCP_ESTABLISHED
            return True
        time.sleep(0.1)
    return False


def _unread_pipeline(sock: socket.socket, request: bytes, count: int) -> None:
    """Send ``count`` pipelined copies of ``request`` (as many as the server takes within 5 s) and read nothing."""
    sock.setblocking(False)
    payload, sent, until = request * count, 0, time.monotonic() + 5
    while sent < len(payload) and time.monotonic() < until:
        try:
            sent += sock.send(payload[sent:sent + 65536])
        except (ssl.SSLWantWriteError, BlockingIOError):
            time.sleep(0.01)


def _small_receive_buffer_tls(server, port: int) -> ssl.SSLSocket:
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: the window stays small
    raw.settimeout(10)
    raw.connect(("127.0.0.1", port))
    return ssl.create_default_context(cafile=server.ca_file).wrap_socket(raw, server_hostname="localhost")


def test_a_client_that_never_reads_its_answers_is_cut_off(server):
    """Answers asked for and never read (the dashboard's script, pipelined): the handler waits for the socket to
    drain and no keep-alive timer runs meanwhile, so the connection (its slot and megabytes of buffers) was held for
    as long as the client liked. Now a client that reads nothing we send for the client timeout (2 s) is cut off."""
    s = _small_receive_buffer_tls(server, _https_port(server))
    _unread_pipeline(s, b"GET /ui/dashboard.js HTTP/1.1\r\nHost: localhost\r\n\r\n", 3000)
    assert _cut_off_within(s, 15), "a client that reads nothing is held open"
    s.close()
    assert "read nothing we sent for 2 s" in _log(server)


def test_a_device_that_never_reads_does_not_hold_up_the_service(server):
    """A hub device subscribed to desired-property updates that reads nothing (its twin answers pile up unread): a
    service's twin update waited for the push to go out, so it hung for as long as the device stayed connected (and
    a server being stopped waited for it). Now the device is cut off after the client timeout, and the updates are
    answered (the pushes wait in the background: tests/unit/hub/test_presence.py, with their bound)."""

    with svc(server) as c:
        assert c.put("/devices/stalled-dev", json={"deviceId": "stalled-dev"}).status_code == 200
        key = c.get("/devices/stalled-dev").json()["authentication"]["symmetricKey"]["primaryKey"]
        assert c.patch("/twins/stalled-dev", json={"properties": {"desired": {"blob": "x" * 6000}}}).status_code == 200
    s = _small_receive_buffer_tls(server, server.mqtt_port)
    s.sendall(encode(Connect(client_id="stalled-dev", username="localhost/stalled-dev/?api-version=2021-04-12",
                             keepalive=60, password=sas.generate("localhost/devices/stalled-dev", key).encode())))
    s.sendall(encode(Subscribe(packet_id=1, topics=[("$iothub/twin/PATCH/properties/desired/#", 0),
                                                    ("$iothub/twin/res/#", 0)])))
    # ~3,000 full twins (6 KB each) asked for and never read: the server's buffers fill, its writes to it wait
    _unread_pipeline(s, b"".join(encode(Publish(f"$iothub/twin/GET/?$rid={i}", b"", 0)) for i in range(100)), 30)
    time.sleep(1.5)  # they are answered
    with svc(server) as c:
        c.timeout = httpx.Timeout(30)
        started = time.monotonic()
        for i in range(5):  # a few pushes past a full buffer
            r = c.patch("/twins/stalled-dev", json={"properties": {"desired": {"i": i}}})
            assert r.status_code == 200, r.text
        assert time.monotonic() - started < 15
    assert _cut_off_within(s, 5)
    s.close()


def test_a_plain_http_client_that_never_reads_is_cut_off():
    """The plain-HTTP listeners (CRLs and OCSP, metrics) are aiohttp's own TCP transport behind the gate: the same
    deadline for a client that leaves its answers unread."""
    import asyncio

    from aiohttp import web

    from opendps.server import GatedTCPSite
    from opendps.transport.tls import ConnectionGate

    async def big(_request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 1_000_000)

    async def main() -> bool:
        app = web.Application()
        app.router.add_get("/big", big)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        site = GatedTCPSite(runner, "127.0.0.1", 0, gate=ConnectionGate("HTTP", 4), write_timeout=1)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]

        def client() -> bool:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.connect(("127.0.0.1", port))
                _unread_pipeline(s, b"GET /big HTTP/1.1\r\nHost: localhost\r\n\r\n", 50)
                return _cut_off_within(s, 10)

        try:
            return await asyncio.to_thread(client)
        finally:
            await runner.cleanup()

    assert asyncio.run(main()), "a plain-HTTP client that reads nothing is held open"


def test_a_full_plain_http_listener_closes_its_oldest_connection_for_a_new_one():
    """The plain-HTTP listeners never mark a connection answered (aiohttp writes to the socket's transport): when
    full, the oldest connection makes room, so silent connections cannot hold it (they were refused new ones)."""
    import asyncio

    from aiohttp import web

    from opendps.server import GatedTCPSite
    from opendps.transport.tls import ConnectionGate

    async def ok(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def main() -> tuple[str, bool, bool]:
        app = web.Application()
        app.router.add_get("/ok", ok)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        site = GatedTCPSite(runner, "127.0.0.1", 0, gate=ConnectionGate("HTTP", 2))
        await site.start()
        port = site._server.sockets[0].getsockname()[1]

        def client() -> tuple[str, bool, bool]:
            with socket.create_connection(("127.0.0.1", port)) as oldest, \
                    socket.create_connection(("127.0.0.1", port)) as newer:
                time.sleep(0.2)  # both admitted, silent: the listener is full
                with socket.create_connection(("127.0.0.1", port), timeout=5) as real:
                    real.sendall(b"GET /ok HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    answer = b""
                    while chunk := real.recv(4096):
                        answer += chunk
                return answer.decode().split("\r\n", 1)[0], _cut_off_within(oldest, 2), _cut_off_within(newer, 0.3)

        try:
            return await asyncio.to_thread(client)
        finally:
            await runner.cleanup()

    status, oldest_closed, newer_closed = asyncio.run(main())
    assert status == "HTTP/1.1 200 OK" and oldest_closed and not newer_closed


def test_the_server_log_stays_quiet(server):
    log = _log(server)
    assert "Traceback" not in log
    assert len(log.splitlines()) < 200, "a log storm"
