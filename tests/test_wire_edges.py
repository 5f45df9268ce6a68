"""Wire edges of the HTTP listeners over real sockets, with one ``opendps serve`` (SQLite): what RFC 6455 says of a
WebSocket upgrade (HTTP/1.1 or later, a version the server speaks, subprotocols offered on several header lines),
aiohttp's own answers to requests it cannot parse (an Azure error body like every other refusal, on HTTPS and the
plain-HTTP listener), a NUL in a certificate-status path, and an OCSP request naming a negative serial.

Raw requests on a socket: no HTTP client sends these.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
from urllib.parse import quote

import httpx
import pytest
from cryptography.x509 import ocsp as x509_ocsp
from tests.conftest import _run_server, database

from opendps.pki import der

pytestmark = pytest.mark.timeout(120, func_only=True)
KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's sample key: its accept value is known
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("wire-edges")
    with database("sqlite", tmp_path) as db_url:
        yield from _run_server(db_url, tmp_path)


def _connect(server, *, tls: bool) -> socket.socket:
    if not tls:
        return socket.create_connection(("127.0.0.1", server.http_port), timeout=10)
    context = ssl.create_default_context(cafile=str(server.ca_file))
    port = int(server.url.rsplit(":", 1)[1])
    return context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost")


def _read_answer(sock: socket.socket) -> tuple[str, dict[str, str], bytes]:
    """One HTTP answer: its status line, headers (lower-cased names) and body (by Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return status, headers, body


def _exchange(server, request: bytes, *, tls: bool = True) -> tuple[str, dict[str, str], bytes, socket.socket]:
    sock = _connect(server, tls=tls)
    sock.sendall(request)
    return (*_read_answer(sock), sock)


def _closed(sock: socket.socket) -> bool:
    """The server closed the connection (what it does after refusing a request it could not parse)."""
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, ssl.SSLError):
        return True
    finally:
        sock.close()


def _azure_error(status_line: str, headers: dict[str, str], body: bytes, status: int, words: str) -> dict:
    assert status_line.split(" ")[1] == str(status), (status_line, body)
    assert headers["content-type"].startswith("application/json"), (headers, body)
    error = json.loads(body)
    assert error["errorCode"] // 1000 == status and headers["x-ms-error-code"] == str(error["errorCode"]), error
    assert {"trackingId", "timestampUtc"} <= set(error), error
    assert words.lower() in error["message"].lower(), error
    return error


def _upgrade(version: str = "HTTP/1.1", extra: str = "", ws_version: str = "13") -> bytes:
    return (f"GET /$iothub/websocket {version}\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: {ws_version}\r\n{extra}\r\n").encode()


# ---------------------------------------------------------------- WebSocket upgrades (RFC 6455)
def test_a_websocket_upgrade_needs_http_1_1_and_version_13(server):
    """RFC 6455 4.1: the handshake is an HTTP/1.1 (or later) GET — HTTP/1.0 was answered 101; 4.2.2: a version the
    server does not speak is answered with the one it does (426 and Sec-WebSocket-Version), not a bare 400."""
    status, headers, body, sock = _exchange(server, _upgrade("HTTP/1.0", "Sec-WebSocket-Protocol: mqtt\r\n"))
    sock.close()
    _azure_error(status, headers, body, 400, "needs HTTP/1.1 or later")
    status, headers, body, sock = _exchange(server, _upgrade(ws_version="12"))
    sock.close()
    _azure_error(status, headers, body, 426, "Sec-WebSocket-Version '12' is not supported")
    assert headers["sec-websocket-version"] == "13"
    # what aiohttp's handshake itself refuses is named too (it was the bare reason "Bad Request")
    status, headers, body, sock = _exchange(server, b"GET /$iothub/websocket HTTP/1.1\r\nHost: localhost\r\n"
                                                    b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n")
    sock.close()
    _azure_error(status, headers, body, 400, "No CONNECTION upgrade")


def test_subprotocols_offered_on_several_lines_are_one_list(server):
    """Two Sec-WebSocket-Protocol lines are one list (RFC 7230 3.2.2): ``mqtt`` on the second is chosen (aiohttp read
    only the first and chose none), and MQTT then runs on that WebSocket: a CONNECT naming no hub is refused with
    CONNACK 5 in a binary message."""
    status, headers, _, sock = _exchange(server, _upgrade(extra="Sec-WebSocket-Protocol: chat\r\n"
                                                                "Sec-WebSocket-Protocol: mqtt\r\n"))
    try:
        assert status.split(" ")[1] == "101", status
        assert headers["sec-websocket-accept"] == ACCEPT and headers["sec-websocket-protocol"] == "mqtt", headers
        username = b"nohub"
        variable = b"\x00\x04MQTT\x04\x82\x00\x3c"  # MQTT 3.1.1, clean session, username, keepalive 60
        payload = b"\x00\x01x" + len(username).to_bytes(2, "big") + username
        connect = bytes([0x10, len(variable) + len(payload)]) + variable + payload
        mask = b"\x01\x02\x03\x04"
        sock.sendall(bytes([0x82, 0x80 | len(connect)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(connect)))
        frame = b""
        while len(frame) < 6:
            chunk = sock.recv(64)
            assert chunk, frame
            frame += chunk
        assert frame[:6] == bytes([0x82, 0x04, 0x20, 0x02, 0x00, 0x05]), frame  # binary: CONNACK not authorized
    finally:
        sock.close()


# ---------------------------------------------------------------- what aiohttp's parser refuses
@pytest.mark.parametrize("tls", [True, False], ids=["https", "plain-http"])
@pytest.mark.parametrize(("request_bytes", "words"), [
    (b"GARBAGE\r\n\r\n", "Invalid method encountered"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n", "Invalid header token"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", "Got more than 8190 bytes"),
], ids=["request-line", "header", "oversized-header"])
def test_unparseable_requests_get_an_azure_error_body(server, tls, request_bytes, words):
    """aiohttp answers these before any middleware runs; they were plain text. Now the same Azure body as every other
    refusal (``malformed HTTP request: ...`` naming what the parser found), and the connection is closed."""
    status, headers, body, sock = _exchange(server, request_bytes, tls=tls)
    error = _azure_error(status, headers, body, 400, f"malformed HTTP request: {words}")
    assert error["errorCode"] == 400004 and "^" not in error["message"], error
    assert _closed(sock)


# ---------------------------------------------------------------- certificate status (plain HTTP and HTTPS)
def _ocsp_request(serial: bytes) -> bytes:
    """A DER OCSPRequest for one CertID (SHA-1, made-up issuer hashes) whose serial INTEGER has the octets
    ``serial`` as sent: DER INTEGERs are signed, so a leading bit set is a negative number."""
    sha1 = der.tlv(der.SEQUENCE, der.tlv(der.OBJECT_IDENTIFIER, bytes.fromhex("2b0e03021a")) + b"\x05\x00")
    cert_id = der.tlv(der.SEQUENCE, sha1 + der.tlv(der.OCTET_STRING, b"\x11" * 20)
                      + der.tlv(der.OCTET_STRING, b"\x22" * 20) + der.tlv(0x02, serial))  # INTEGER
    return der.tlv(der.SEQUENCE, der.tlv(der.SEQUENCE, der.tlv(der.SEQUENCE, der.tlv(der.SEQUENCE, cert_id))))


def test_status_requests_with_a_nul_or_a_negative_serial(server):
    """A NUL in a CRL path is the 400 naming it on the plain-HTTP listener too (it was a 404 "no CA publishes
    '\\x00'"); an OCSP GET with one is still OCSP's malformedRequest on both listeners, as is an OCSP request for
    a negative serial (it was ``unauthorized``, as if the CA were not this responder's)."""
    negative = _ocsp_request(b"\x85\x01")  # -31487
    assert x509_ocsp.load_der_ocsp_request(negative).serial_number < 0
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30) as plain, \
            httpx.Client(base_url=server.url, verify=ssl.create_default_context(cafile=server.ca_file),
                         timeout=30) as tls:
        for client in (plain, tls):
            r = client.get("/crl/%00.crl")
            _azure_error(f"HTTP/1.1 {r.status_code}", dict(r.headers), r.content, 400, "NUL character")
            for r in (client.get("/ocsp/%00"), client.post("/ocsp", content=negative),
                      client.get("/ocsp/" + quote(base64.b64encode(negative).decode(), safe=""))):
                assert r.status_code == 200 and r.headers["content-type"] == "application/ocsp-response", r.text
                status = x509_ocsp.load_der_ocsp_response(r.content).response_status
                assert status == x509_ocsp.OCSPResponseStatus.MALFORMED_REQUEST, (r.request.url, status)
