"""Slow, silent and too many clients (issue 12.1), against a real server whose descriptor limit is lowered to 256
(so its three listeners share 256 - 128 descriptors by weight, MQTT 8 : HTTPS 4 : AMQP 2, and HTTPS may hold
128 * 4 // 14 = 36 connections) and whose client timeout is 2 s.

Store-independent: one SQLite server for the module. Socket counts are bounded (a few hundred at most).
"""

from __future__ import annotations

import base64
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
from opendps.transport.mqtt.codec import Connack, Connect, Decoder, encode

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
    def closed_after(sock) -> float:
        started = time.monotonic()
        assert _closed_within(sock, 8)
        return time.monotonic() - started

    for port in (_https_port(server), server.mqtt_port, server.amqp_port):  # TCP, then no ClientHello
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            assert 1.5 <= closed_after(raw) <= 6, port
    for port in (server.mqtt_port, server.amqp_port):  # a finished handshake, then no CONNECT / no AMQP header
        with _tls(server, port) as s:
            assert 1.5 <= closed_after(s) <= 6, port


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
    """More connections than a listener may hold: the extra ones are closed at once, the process never runs out of
    descriptors, the other listeners serve as usual, one log line reports it, and the slots come back."""
    held, refused = [], 0
    for _ in range(LIMIT + 40):
        try:
            held.append(_tls(server, _https_port(server), timeout=5))
        except (ConnectionError, ssl.SSLError, TimeoutError):
            refused += 1
    assert len(held) <= LIMIT and refused >= 40
    # the MQTT listener is untouched: a device still gets its CONNACK (5: no credential), i.e. is served
    code, s = _connack(server, "flood-probe", None)
    assert code == 5
    s.close()
    for sock in held:
        sock.close()
    # the HTTPS listener serves again once the flood is gone
    deadline = time.time() + 10
    while True:
        try:
            with httpx.Client(verify=ssl.create_default_context(cafile=server.ca_file), timeout=5) as c:
                assert c.get(f"{server.url}/healthz").status_code == 200
            break
        except httpx.HTTPError:
            assert time.time() < deadline, "HTTPS did not recover after the flood"
            time.sleep(0.2)
    log = _log(server)
    assert 1 <= log.count("HTTPS listener is at its limit of") <= 2, log[-3000:]
    assert "out of system resource" not in log and "Too many open files" not in log


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


def test_the_server_log_stays_quiet(server):
    log = _log(server)
    assert "Traceback" not in log
    assert len(log.splitlines()) < 200, "a log storm"
