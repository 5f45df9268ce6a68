"""The AMQP listener against hostile and odd clients: messages proton would decode as less than was sent, application
properties without a faithful text form, peer-chosen strings echoed whole, and misbehaving connections running while a
well-behaved client sends.

Each refusal is an AMQP error naming the problem, nothing is queued for it, no traceback reaches the server log, and a
good client is served throughout. Raw frames are encoded with proton's ``Data`` (``tests.test_amqp._perf``), messages
with proton's ``Message``: neither is opendps code. One server for the module (SQLite: the listener is the subject).
"""

from __future__ import annotations

import ssl
import threading
import time

import pytest
from proton import Data, Delivery, Described, Message, char, decimal64, float32, int32, symbol, timestamp, uint, ulong, ushort
from tests.test_amqp import (
    BEGIN,
    FLOW,
    OPEN,
    SAS_TYPE,
    TRANSFER,
    Amqp,
    _attach,
    _closed_within,
    _frames,
    _perf,
    _sasl_frame,
    _server_log,
    _tls,
    _transfer,
    c2d,
    hub_owner_token,
    queued,
    sas_device,
)

from opendps.errors import InvalidInput
from opendps.frontends.amqp import c2d_fields

SERVER_STORES = ("sqlite",)
# the SASL/open deadline is the client timeout when that is shorter than 10 s: the slowloris below is closed after
# 4 s instead of 10 (Runtime.connect_deadline); well-behaved clients here are never silent that long
SERVER_ARGS = ("--client-timeout", "4")

pytestmark = pytest.mark.timeout(300, func_only=True)
DETACH, CLOSE = 0x16, 0x18


def _decoded(message: Message, pairs: list[tuple[object, object]] | None = None) -> Message:
    """What the listener sees: the message as it is decoded from the wire; ``pairs`` are application properties encoded
    by hand (proton's Message refuses to encode a key that is not a string)."""
    encoded = bytes(message.encode())
    if pairs is not None:
        data = Data()
        data.put_described()
        data.enter()
        data.put_ulong(0x74)
        data.put_map()
        data.enter()
        for key, value in pairs:
            data.put_object(key)
            data.put_object(value)
        data.exit()
        data.exit()
        body = encoded.index(b"\x00\x53\x77")  # before the body (an amqp-value)
        encoded = encoded[:body] + bytes(data.encode()) + encoded[body:]
    out = Message()
    out.decode(encoded)
    return out


# --- application properties (in-process) -------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "text"), [
    (int32(5), "5"), (uint(7), "7"), (ulong(2**64 - 1), str(2**64 - 1)), (-3, "-3"), (timestamp(1700000000000), "1700000000000"),
    (float32(1.5), "1.5"), (0.1, "0.1"), (True, "True"), (symbol("sym"), "sym"), (char("c"), "c"), ("text", "text"),
    (b"utf-8 \xc3\xa9", "utf-8 \u00e9"), (None, None),
])
def test_application_property_values_reach_the_device_as_their_text(value, text):
    """Proton decodes AMQP's typed numbers as ``int32``, ``uint``, ``timestamp``... whose ``str`` is their repr: a
    Node client's ``count: 5`` (an AMQP int) was queued, and sent to the device, as ``count=int32(5)``."""
    _, system, properties, _ = c2d_fields(_decoded(Message(body=b"x", properties={"p": value, "iothub-ack": value})))
    assert properties == {"p": text}
    assert system.get("ack") == text


@pytest.mark.parametrize(("properties", "named"), [
    ({"l": [1, 2]}, "'l'"), ({"m": {"a": 1}}, "'m'"), ({"d": Described(symbol("x"), "y")}, "'d'"),
    ({"iothub-ack": [1]}, "'iothub-ack'"), ({"dec": decimal64(1)}, "'dec'"), ({"bin": b"\xff\x00"}, "'bin'"),
    ({None: "v"}, "None"), ({5: "v"}, "5"),
])
def test_application_properties_without_a_text_form_are_refused(properties, named):
    """A list, map or described value (AMQP allows simple types only) was queued as its Python repr (``[1, 2]``), binary
    that is not UTF-8 with replacement characters, a null or numeric key as the property "None" or "5"."""
    with pytest.raises(InvalidInput) as refused:
        c2d_fields(_decoded(Message(body=b"x"), list(properties.items())))
    assert named in refused.value.message, refused.value.message


# --- over the wire -----------------------------------------------------------------------------------------------------

def _send_encoded(client: Amqp, sender, payload: bytes) -> tuple[int, str | None, str | None]:
    """Send already-encoded message bytes (sections proton's Message cannot produce) and wait for the outcome."""
    link = sender.link
    delivery = link.delivery(str(time.monotonic()).encode())
    link.send(payload)
    link.advance()
    client.conn.wait(lambda: delivery.remote_state or delivery.settled, timeout=20, msg="no outcome")
    cond = delivery.remote.condition
    delivery.settle()
    return delivery.remote_state, cond.name if cond else None, cond.description if cond else None


DATA = b"\x00\x53\x75"  # a data section's descriptor (0x75), its binary follows


SECTION_CASES = {  # the sections after a properties section, and what the refusal says
    "two-data-sections": (DATA + b"\xa0\x02ab" + DATA + b"\xa0\x02cd", "more than one body section"),
    "data-and-value": (DATA + b"\xa0\x02ab" + b"\x00\x53\x77\xa0\x02cd", "more than one body section"),
    "symbolic-descriptor": (b"\x00\xa3\x10amqp:data:binary\xa0\x02ab", "no numeric descriptor"),
    "unknown-section": (b"\x00\x53\x99\xa0\x02ab", "not a message section"),
    "second-properties": (DATA + b"\xa0\x02ab" + b"\x00\x53\x73\xc0\x07\x03\x40\x40\xa1\x02/x", "more than one properties"),
    "trailing-bytes": (DATA + b"\xa0\x02ab" + b"\x40\x40", "does not start a message section"),
    "unreadable-value": (b"\x00\x53\x77" + b"\x00\xa3\x01x" * 3 + b"\x40", "cannot be read"),
}


@pytest.mark.parametrize("case", SECTION_CASES)
def test_a_message_proton_would_decode_as_less_than_was_sent_is_refused(server, case):
    """Proton's Message keeps the last of several body sections (``ab`` then ``cd`` was queued as ``cd``), ignores a
    section it does not know or whose descriptor is a symbol (the body read as absent: an empty message was queued),
    lets a second properties section replace the first, ignores bytes after the sections, and reads a body value it
    cannot convert as absent. Each was accepted; now each is rejected with ``amqp:decode-error`` naming the problem."""
    tail, reason = SECTION_CASES[case]
    device = f"amqp-sections-{case}"
    sas_device(server, device)
    head = Message(address=f"/devices/{device}/messages/devicebound").encode()
    before = len(_server_log(server))
    client = Amqp(server)
    try:
        assert client.put_token(hub_owner_token(server))[0] == 200
        sender = client.devicebound()
        state, cond, description = _send_encoded(client, sender, bytes(head) + tail)
        assert (state, cond) == (Delivery.REJECTED, "amqp:decode-error"), (state, cond, description)
        assert reason in (description or ""), description
        assert _send_encoded(client, sender, bytes(head) + DATA + b"\xa0\x02ok")[:2] == (Delivery.ACCEPTED, None)
    finally:
        client.close()
    assert [r.body for r in queued(server, device)] == [b"ok"]
    assert "Traceback" not in _server_log(server)[before:]


def test_typed_and_compound_application_properties_over_the_wire(server):
    """End to end: an AMQP int property is queued as its number, a list-valued one is rejected with
    ``amqp:invalid-field`` naming the property, and nothing is queued for it."""
    sas_device(server, "amqp-typed-props")
    client = Amqp(server)
    try:
        assert client.put_token(hub_owner_token(server))[0] == 200
        sender = client.devicebound()
        assert client.send(sender, c2d("amqp-typed-props", properties={"count": int32(5), "at": timestamp(17)}))[:2] == (
            Delivery.ACCEPTED, None)
        state, cond, description = client.send(sender, c2d("amqp-typed-props", b"list", properties={"l": [1, 2]}))
        assert (state, cond) == (Delivery.REJECTED, "amqp:invalid-field") and "'l'" in description, description
    finally:
        client.close()
    assert [r.properties for r in queued(server, "amqp-typed-props")] == [{"count": "5", "at": "17"}]


def _read_until(sock: ssl.SSLSocket, done, seconds: float = 10) -> tuple[bytes, list[tuple[int, list]]]:
    """What the server sends until a performative satisfies ``done(code, fields)`` (or ``seconds`` pass, or it
    closes): the bytes and the performatives. A wait for the frame a step needs, not a fixed read of a few seconds."""
    raw, rest, frames, deadline = b"", b"", [], time.time() + seconds
    while time.time() < deadline:
        sock.settimeout(max(0.05, deadline - time.time()))
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ssl.SSLError, ConnectionResetError):
            break
        if not chunk:
            break
        raw += chunk
        rest += chunk
        while len(rest) >= 8:  # every complete frame so far
            if rest.startswith(b"AMQP"):
                rest = rest[8:]
                continue
            size = int.from_bytes(rest[:4], "big")
            if len(rest) < size:
                break
            body, rest = rest[rest[4] * 4:size], rest[size:]
            if body:
                data = Data()
                data.decode(body)
                data.rewind()
                data.next()
                performative = data.get_object()
                frames.append((int(performative.descriptor), list(performative.value)))
        if any(done(code, fields) for code, fields in frames):
            break
    return raw, frames


def _frames_until(sock: ssl.SSLSocket, done, seconds: float = 10) -> list[tuple[int, list]]:
    """The performatives the server sends until one satisfies ``done`` (see :func:`_read_until`)."""
    return _read_until(sock, done, seconds)[1]


def _open(max_frame: int) -> bytes:
    return (b"AMQP\x03\x01\x00\x00" + _sasl_frame(0x41, lambda d: d.put_symbol(symbol("ANONYMOUS")))
            + b"AMQP\x00\x01\x00\x00" + _perf(OPEN, ["edges", "localhost", uint(max_frame), ushort(7)]))


def _frame_sizes(raw: bytes) -> list[int]:
    sizes = []
    while len(raw) >= 8:
        if raw.startswith(b"AMQP"):
            raw = raw[8:]
            continue
        size = int.from_bytes(raw[:4], "big")
        sizes.append(size)
        raw = raw[size:]
    return sizes


def test_peer_chosen_strings_are_cut_short_in_answers_and_log_lines(server):
    """A refused attach's detach quoted the peer's whole address: with the 512-byte max-frame-size the peer asked for,
    a 3,000-character address made the server send a 3 KB frame (above the negotiated maximum). A put-token whose
    audience is 3,000 characters was answered, and logged, with all of it (up to a whole message per log line)."""
    long_address = "/nowhere/" + "a" * 3000
    with _tls(server) as s:
        s.sendall(_open(512))
        assert any(code == OPEN for code, _ in _frames_until(s, lambda code, _: code == OPEN))
        s.sendall(_perf(BEGIN, [None, uint(0), uint(1000), uint(1000)]) + _attach("x", 0, False, "me", long_address))
        raw, frames = _read_until(s, lambda code, _: code == DETACH)  # the refusal, read whole
    assert any(code == DETACH for code, _ in frames), frames
    assert raw and max(_frame_sizes(raw)) <= 512, _frame_sizes(raw)
    assert b"a" * 200 not in raw
    before = len(_server_log(server))
    client = Amqp(server)
    try:
        status, description = client.put_token(
            "SharedAccessSignature sr=" + "h" * 3000 + "&sig=abc&se=99999999999&skn=iothubowner")
    finally:
        client.close()
    assert status == 401 and "audience" in description and len(description) < 400, description
    log = _server_log(server)[before:]
    assert "h" * 200 not in log and "audience" in log, log[-1000:]


def test_hostile_clients_do_not_hold_up_a_good_one(server):
    """While a tiny-frame client (max-frame-size 8: proton takes 512), a slowloris stuck in the protocol header, a
    message begun with the more flag and never finished and a peer that never reads what it asked for all run, a good
    client completes a C2D send; the slow one is then closed by the SASL/open deadline, nothing half-sent is queued."""
    sas_device(server, "amqp-hostile-good")
    sas_device(server, "amqp-hostile-frag")
    before = len(_server_log(server))
    token = hub_owner_token(server)
    hostile: list[ssl.SSLSocket] = []
    stop = threading.Event()
    try:
        tiny = _tls(server)
        tiny.sendall(_open(8))
        hostile.append(tiny)
        slow = _tls(server)
        slow.sendall(b"AM")  # and nothing more
        hostile.append(slow)
        frag = _tls(server)  # a message begun and never finished
        frag.sendall(_open(65536) + _perf(BEGIN, [None, uint(0), uint(1000), uint(1000)])
                     + _attach("cs", 0, False, "me", "$cbs") + _attach("cr", 1, True, "$cbs", "me")
                     + _perf(FLOW, [uint(0), uint(1000), uint(0), uint(1000), uint(1), uint(0), uint(10)]))
        _frames_until(frag, lambda code, f: code == FLOW and f[4] == 0)  # credit on the put-token link
        frag.sendall(_transfer(0, 0, Message(id=ulong(1), body=token, properties={
            "operation": "put-token", "type": SAS_TYPE, "name": "x"}).encode()))
        assert any(code == TRANSFER for code, _ in _frames_until(frag, lambda code, _: code == TRANSFER))  # its answer
        frag.sendall(_attach("d", 2, False, "me", "/messages/devicebound"))
        assert any(code == FLOW and f[4] == 2  # credit on the devicebound link
                   for code, f in _frames_until(frag, lambda code, f: code == FLOW and f[4] == 2))
        frag.sendall(_transfer(2, 1, c2d("amqp-hostile-frag").encode()[:10], more=True))
        hostile.append(frag)
        deaf = _tls(server)
        deaf.sendall(_open(65536) + _perf(BEGIN, [None, uint(0), uint(1000), uint(1000)]))
        hostile.append(deaf)

        def flood() -> None:  # attaches whose echoes (30 KB each) the peer never reads, until the server stops reading
            name = "n" * 30000
            while not stop.is_set():
                try:
                    deaf.sendall(_attach(name, 3, False, "me", "/nowhere") + _perf(DETACH, [uint(3), True]))
                except (OSError, ssl.SSLError):
                    return

        worker = threading.Thread(target=flood, daemon=True)
        deaf.settimeout(5)
        worker.start()
        time.sleep(1)  # the flood under way
        started = time.monotonic()
        client = Amqp(server)
        try:
            assert client.put_token(token)[0] == 200
            assert client.send(client.devicebound(), c2d("amqp-hostile-good"))[:2] == (Delivery.ACCEPTED, None)
        finally:
            client.close()
        assert time.monotonic() - started < 10
        assert [r.body for r in queued(server, "amqp-hostile-good")] == [b"hello"]
        stop.set()
        worker.join(10)
        assert _closed_within(slow, 15)  # the SASL/open deadline
        frames = _frames(tiny, 0.5)
        assert [code for code, _ in frames if code == OPEN], frames  # the tiny-frame client was answered
    finally:
        stop.set()
        for sock in hostile:
            sock.close()
    assert queued(server, "amqp-hostile-frag") == []  # the unfinished message was never queued
    log = _server_log(server)[before:]
    assert "Traceback" not in log, log[-3000:]

