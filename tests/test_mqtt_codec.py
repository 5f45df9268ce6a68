"""MQTT 3.1.1 codec (opendps.transport.mqtt.codec): round trips, strictness, lengths, topic matching."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opendps.transport.mqtt.codec import (
    MAX_REMAINING_LENGTH,
    Connack,
    Connect,
    Decoder,
    Disconnect,
    MqttProtocolError,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
    Will,
    encode,
    encode_remaining_length,
    is_valid_topic_filter,
    is_valid_topic_name,
    topic_matches,
)

# --- strategies ---------------------------------------------------------------------------------

_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
_level_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00/+#")
text = st.text(_chars, max_size=12)
level = st.text(_level_chars, max_size=6)
topic_name = st.lists(level, min_size=1, max_size=4).map("/".join).filter(bool)
topic_filter = st.builds(
    lambda levels, tail: "/".join(levels + tail) or "#",
    st.lists(st.one_of(level, st.just("+")), max_size=4),
    st.sampled_from([[], ["#"]]),
).filter(bool)
pid = st.integers(1, 0xFFFF)
payload = st.one_of(st.binary(max_size=64), st.sampled_from([0, 1, 127, 128, 16383, 16384]).map(lambda n: b"\xa5" * n))
qos = st.integers(0, 2)

wills = st.builds(Will, topic_name, st.binary(max_size=32), qos, st.booleans())


@st.composite
def connects(draw: st.DrawFn) -> Connect:
    username = draw(st.none() | text)
    password = draw(st.none() | st.binary(max_size=32)) if username is not None else None
    return Connect(draw(text), draw(st.booleans()), draw(st.integers(0, 0xFFFF)), username, password, draw(st.none() | wills))


@st.composite
def publishes(draw: st.DrawFn) -> Publish:
    q = draw(qos)
    return Publish(draw(topic_name), draw(payload), q, draw(st.booleans()), draw(st.booleans()) if q else False,
                   draw(pid) if q else None)


packets = st.one_of(
    connects(),
    st.builds(lambda rc, sp: Connack(sp and rc == 0, rc), st.integers(0, 5), st.booleans()),
    publishes(),
    st.builds(Puback, pid),
    st.builds(Pubrec, pid),
    st.builds(Pubrel, pid),
    st.builds(Pubcomp, pid),
    st.builds(Subscribe, pid, st.lists(st.tuples(topic_filter, qos), min_size=1, max_size=4)),
    st.builds(Suback, pid, st.lists(st.sampled_from([0, 1, 2, 0x80]), min_size=1, max_size=4)),
    st.builds(Unsubscribe, pid, st.lists(topic_filter, min_size=1, max_size=4)),
    st.builds(Unsuback, pid),
    st.just(Pingreq()),
    st.just(Pingresp()),
    st.just(Disconnect()),
)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


# --- round trips ------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(packets, min_size=1, max_size=6), st.data())
def test_every_packet_round_trips_through_any_chunking(pkts, data):
    wire = b"".join(encode(p) for p in pkts)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=12))
    decoder = Decoder()
    out = []
    for chunk in _chunks(wire, cuts):
        out += decoder.feed(chunk)
    assert out == pkts
    assert decoder.buffered == 0


def test_each_packet_type_round_trips_byte_by_byte():
    pkts = [
        Connect("dev1", False, 60, "scope/registrations/dev1/api-version=2019-03-31", b"SharedAccessSignature sr=x",
                Will("w/t", b"bye", 1, True)),
        Connack(True, 0), Connack(False, 5),
        Publish("$dps/registrations/PUT/iotdps-register/?$rid=1", b'{"a":1}', 1, False, True, 7),
        Publish("t", b"", 0, True), Publish("t", b"x", 2, False, False, 65535),
        Puback(1), Pubrec(2), Pubrel(3), Pubcomp(4),
        Subscribe(5, [("$dps/registrations/res/#", 1), ("+/x", 0)]), Suback(5, [1, 0x80]),
        Unsubscribe(6, ["a/#"]), Unsuback(6), Pingreq(), Pingresp(), Disconnect(),
    ]
    wire = b"".join(encode(p) for p in pkts)
    decoder = Decoder()
    out = []
    for i in range(len(wire)):
        out += decoder.feed(wire[i : i + 1])
    assert out == pkts


def test_known_encodings():
    assert encode(Pingreq()) == b"\xc0\x00"
    assert encode(Puback(0x1234)) == b"\x40\x02\x12\x34"
    assert encode(Pubrel(1)) == b"\x62\x02\x00\x01"
    assert encode(Connack(True, 0)) == b"\x20\x02\x01\x00"
    assert encode(Publish("a/b", b"hi", 1, True, True, 10)) == b"\x3b\x09\x00\x03a/b\x00\x0ahi"
    assert encode(Subscribe(1, [("a", 2)])) == b"\x82\x06\x00\x01\x00\x01a\x02"
    assert encode(Connect("c", True, 30)) == b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x1e\x00\x01c"


def test_password_is_not_in_repr():
    assert "hunter2" not in repr(Connect("c", username="u", password=b"hunter2"))


def test_encode_refuses_what_decode_would_refuse():
    for bad in (Publish("a/+", b""), Publish("", b""), Publish("a", b"", 0, packet_id=1), Publish("a", b"", 0, dup=True),
                Publish("a", b"", 1), Publish("a", b"", 3, packet_id=1), Puback(0), Subscribe(1, []),
                Subscribe(1, [("a/#/b", 0)]), Suback(1, [3]), Connect("c", password=b"x"), Connect("a\x00b"),
                Connack(True, 5), Unsubscribe(1, [])):
        with pytest.raises(ValueError):
            encode(bad)
    with pytest.raises(TypeError):
        encode("not a packet")  # type: ignore[arg-type]


def test_other_protocol_levels_still_decode():
    # MQTT 3.1 (paho MQTTv31) and MQTT 5 (properties after keepalive): enough to answer CONNACK rc 1.
    v31 = encode(Connect("c", True, 60, protocol_name="MQIsdp", protocol_level=3))
    v5 = _frame(0x10, b"\x00\x04MQTT\x05\x02\x00\x3c\x03\x21\x00\x14\x00\x01c")
    d = Decoder()
    (c31,) = d.feed(v31)
    (c5,) = d.feed(v5)
    assert (c31.protocol_name, c31.protocol_level, c31.client_id) == ("MQIsdp", 3, "")
    assert (c5.protocol_name, c5.protocol_level, c5.keepalive) == ("MQTT", 5, 60)


def test_puback_with_packet_id_0_decodes_for_the_receiver_to_ignore():
    # The C# DPS client (DotNetty) PUBACKs every response, QoS 0 ones with id 0: not a reason to drop the device.
    assert Decoder().feed(b"\x40\x02\x00\x00" + encode(Pingreq())) == [Puback(0), Pingreq()]
    with pytest.raises(ValueError):
        encode(Puback(0))  # never sent


def test_second_connect_is_left_to_the_session_layer():
    # The decoder is stateless about sessions; MqttServer closes on the second CONNECT (tested there).
    wire = encode(Connect("a")) * 2
    assert Decoder().feed(wire) == [Connect("a"), Connect("a")]


# --- malformed input --------------------------------------------------------------------------


def _s(raw: bytes) -> bytes:
    return len(raw).to_bytes(2, "big") + raw


def _frame(first: int, body: bytes) -> bytes:
    return bytes((first,)) + encode_remaining_length(len(body)) + body


def _connect(flags: int, payload: bytes, name: bytes = b"MQTT", level: int = 4) -> bytes:
    return _frame(0x10, _s(name) + bytes((level, flags)) + b"\x00\x3c" + payload)


def _publish(topic: bytes, rest: bytes = b"", first: int = 0x30) -> bytes:
    return _frame(first, _s(topic) + rest)


def _subscribe(*entries: bytes, first: int = 0x82) -> bytes:
    return _frame(first, b"\x00\x01" + b"".join(entries))


MALFORMED = [
    ("5-byte remaining length", b"\x30\xff\xff\xff\xff\x01", "remaining length longer than 4 bytes"),
    ("reserved type 0", b"\x00\x00", "reserved packet type 0"),
    ("reserved type 15", b"\xf0\x00", "reserved packet type 15"),
    ("SUBSCRIBE flags 0", _subscribe(_s(b"a") + b"\x00", first=0x80), "SUBSCRIBE: reserved fixed-header flags must be 0b0010"),
    ("UNSUBSCRIBE flags 0", _frame(0xA0, b"\x00\x01" + _s(b"a")), "UNSUBSCRIBE: reserved fixed-header flags must be 0b0010"),
    ("PUBREL flags 0", b"\x60\x02\x00\x01", "PUBREL: reserved fixed-header flags must be 0b0010"),
    ("PUBACK flags 1", b"\x41\x02\x00\x01", "PUBACK: reserved fixed-header flags must be 0b0000"),
    ("CONNECT flags", b"\x12\x00", "CONNECT: reserved fixed-header flags"),
    ("PINGREQ flags", b"\xc8\x00", "PINGREQ: reserved fixed-header flags"),
    ("PUBLISH without a topic length", _frame(0x30, b"\x00"), "PUBLISH: truncated topic name length"),
    ("PUBLISH topic past its end", _frame(0x30, b"\x00\x05ab"), "PUBLISH: truncated topic name"),
    ("invalid UTF-8 topic", _publish(b"\xff\xfe"), "PUBLISH: invalid UTF-8 in topic name"),
    ("UTF-16 surrogate in topic", _publish(b"a\xed\xa0\x80"), "PUBLISH: invalid UTF-8 in topic name"),
    ("overlong UTF-8", _publish(b"\xc0\xaf"), "invalid UTF-8"),
    ("U+0000 in topic", _publish(b"a\x00b"), "PUBLISH: U+0000 in topic name"),
    ("U+0000 in client id", _connect(0x02, _s(b"c\x00")), "CONNECT: U+0000 in client id"),
    ("invalid UTF-8 user name", _connect(0x82, _s(b"c") + _s(b"\x80")), "CONNECT: invalid UTF-8 in user name"),
    ("+ in topic name", _publish(b"a/+/b"), "PUBLISH: wildcard in topic name"),
    ("# in topic name", _publish(b"a/#"), "PUBLISH: wildcard in topic name"),
    ("empty topic name", _publish(b""), "PUBLISH: empty topic name"),
    ("# not last", _subscribe(_s(b"a/#/b") + b"\x00"), "'#' must be a whole level and the last one"),
    ("# not a whole level", _subscribe(_s(b"a/b#") + b"\x00"), "'#' must be a whole level"),
    ("+ not a whole level", _subscribe(_s(b"a/b+/c") + b"\x01"), "'+' must be a whole level"),
    ("empty filter", _subscribe(_s(b"") + b"\x00"), "SUBSCRIBE: empty topic filter"),
    ("bad UNSUBSCRIBE filter", _frame(0xA2, b"\x00\x01" + _s(b"+a")), "UNSUBSCRIBE: invalid topic filter"),
    ("PUBLISH QoS 3", _publish(b"a", b"\x00\x01", first=0x36), "PUBLISH: QoS 3"),
    ("SUBSCRIBE QoS 3", _subscribe(_s(b"a") + b"\x03"), "SUBSCRIBE: requested QoS 3"),
    ("SUBSCRIBE reserved bits", _subscribe(_s(b"a") + b"\x04"), "SUBSCRIBE: reserved bits set in requested QoS"),
    ("QoS 1 without packet id", _publish(b"a", first=0x32), "PUBLISH: truncated packet identifier"),
    ("QoS 1 packet id 0", _publish(b"a", b"\x00\x00", first=0x32), "PUBLISH: packet identifier 0"),
    ("UNSUBACK packet id 0", b"\xb0\x02\x00\x00", "UNSUBACK: packet identifier 0"),
    ("PUBREC packet id 0", b"\x50\x02\x00\x00", "PUBREC: packet identifier 0"),
    ("SUBSCRIBE packet id 0", _frame(0x82, b"\x00\x00" + _s(b"a") + b"\x00"), "SUBSCRIBE: packet identifier 0"),
    ("DUP on QoS 0", _publish(b"a", first=0x38), "PUBLISH: DUP flag set on a QoS 0 message"),
    ("protocol name", _connect(0x02, _s(b"c"), name=b"MQTX"), "CONNECT: unsupported protocol name"),
    ("MQIsdp with level 4", _connect(0x02, _s(b"c"), name=b"MQIsdp"), "CONNECT: unsupported protocol name"),
    ("CONNECT reserved flag", _connect(0x03, _s(b"c")), "CONNECT: reserved connect flag is set"),
    ("will QoS without will", _connect(0x0A, _s(b"c")), "CONNECT: will QoS/retain set without the will flag"),
    ("will retain without will", _connect(0x22, _s(b"c")), "CONNECT: will QoS/retain set without the will flag"),
    ("will QoS 3", _connect(0x1E, _s(b"c") + _s(b"w") + _s(b"m")), "CONNECT: will QoS 3"),
    ("will topic wildcard", _connect(0x06, _s(b"c") + _s(b"w/#") + _s(b"m")), "CONNECT: will topic: wildcard"),
    ("password without user name", _connect(0x42, _s(b"c") + _s(b"pw")), "CONNECT: password flag without user name flag"),
    ("CONNECT truncated", _connect(0x82, _s(b"c")), "CONNECT: truncated user name length"),
    ("CONNECT trailing bytes", _connect(0x02, _s(b"c") + b"xy"), "CONNECT: 2 trailing bytes"),
    ("SUBSCRIBE without filters", _frame(0x82, b"\x00\x01"), "SUBSCRIBE: no topic filters"),
    ("UNSUBSCRIBE without filters", _frame(0xA2, b"\x00\x01"), "UNSUBSCRIBE: no topic filters"),
    ("SUBSCRIBE filter without QoS", _subscribe(_s(b"a")), "SUBSCRIBE: truncated requested QoS"),
    ("PUBACK trailing bytes", b"\x40\x03\x00\x01\x00", "PUBACK: 1 trailing bytes"),
    ("PUBACK too short", b"\x40\x01\x00", "PUBACK: truncated packet identifier"),
    ("PINGREQ with body", b"\xc0\x01\x00", "PINGREQ: 1 trailing bytes"),
    ("DISCONNECT with body", b"\xe0\x01\x00", "DISCONNECT: 1 trailing bytes"),
    ("CONNACK reserved flags", b"\x20\x02\x02\x00", "CONNACK: reserved acknowledge flags"),
    ("CONNACK reserved code", b"\x20\x02\x00\x06", "CONNACK: reserved return code 6"),
    ("CONNACK present with error", b"\x20\x02\x01\x05", "CONNACK: session present with a non-zero return code"),
    ("SUBACK reserved code", _frame(0x90, b"\x00\x01\x03"), "SUBACK: reserved return code"),
    ("string longer than packet", _publish(b"abc")[:2] + b"\x00\x09abc", "PUBLISH: truncated topic name"),
]


@pytest.mark.parametrize(("wire", "message"), [(w, m) for _, w, m in MALFORMED], ids=[n for n, _, _ in MALFORMED])
@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_malformed_packets_are_refused(wire, message, bytewise):
    decoder = Decoder()
    with pytest.raises(MqttProtocolError) as info:
        if bytewise:
            for i in range(len(wire)):
                decoder.feed(wire[i : i + 1])
        else:
            decoder.feed(wire)
    assert message in str(info.value)
    with pytest.raises(MqttProtocolError):  # stays failed: the stream cannot be resynchronised
        decoder.feed(encode(Pingreq()))


def test_error_after_good_packets_in_one_feed_still_raises_and_carries_them():
    decoder = Decoder()
    with pytest.raises(MqttProtocolError, match="wildcard") as info:
        decoder.feed(encode(Pingreq()) + encode(Disconnect()) + _publish(b"a/+"))
    assert info.value.packets == [Pingreq(), Disconnect()]
    with pytest.raises(MqttProtocolError, match="wildcard") as again:
        decoder.feed(b"")
    assert again.value.packets == []


def test_error_messages_never_quote_credentials():
    wire = _connect(0xC3, _s(b"c") + _s(b"user") + _s(b"hunter2"))  # reserved flag set
    with pytest.raises(MqttProtocolError) as info:
        Decoder().feed(wire)
    assert "hunter2" not in str(info.value) and "user" not in str(info.value).replace("user name", "")


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80))
def test_arbitrary_bytes_either_decode_or_raise_protocol_error(wire):
    decoder = Decoder(max_packet_size=1000)
    try:
        out = decoder.feed(wire)
    except MqttProtocolError:
        return
    for packet in out:  # whatever decodes is a valid packet: it encodes and decodes to itself
        assert Decoder().feed(encode(packet)) == [packet]


# --- remaining length -------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "size"), [(0, 1), (127, 1), (128, 2), (16383, 2), (16384, 3), (2097151, 3),
                                             (2097152, 4), (268435455, 4)])
def test_remaining_length_boundaries(value, size):
    encoded = encode_remaining_length(value)
    assert len(encoded) == size
    if value:
        decoder = Decoder(max_packet_size=MAX_REMAINING_LENGTH)
        header = b"\x30" + encoded
        assert decoder.feed(header) == []  # header accepted, body awaited
        assert decoder.buffered == len(header)
    if value <= 2097152 and value >= 3:
        packet = Publish("t", b"\x01" * (value - 3))  # 2 + 1 bytes of topic
        wire = encode(packet)
        assert wire[1 : 1 + size] == encoded and len(wire) == 1 + size + value
        assert Decoder(MAX_REMAINING_LENGTH).feed(wire) == [packet]


def test_remaining_length_limits():
    with pytest.raises(ValueError):
        encode_remaining_length(MAX_REMAINING_LENGTH + 1)
    with pytest.raises(ValueError):
        encode_remaining_length(-1)
    assert encode_remaining_length(MAX_REMAINING_LENGTH) == b"\xff\xff\xff\x7f"
    with pytest.raises(MqttProtocolError, match="longer than 4 bytes"):
        Decoder(MAX_REMAINING_LENGTH).feed(b"\x30\x80\x80\x80\x80")  # continuation on the 4th byte
    assert Decoder().feed(b"\xc0\x80\x00") == [Pingreq()]  # non-minimal length encodings are legal in 3.1.1


def test_max_packet_size_is_checked_before_the_body_arrives():
    decoder = Decoder(max_packet_size=1000)
    assert decoder.feed(b"\x30\xe9") == []  # length still incomplete
    with pytest.raises(MqttProtocolError, match="packet too large: remaining length 1001 exceeds 1000"):
        decoder.feed(b"\x07")  # 1001: refused with nothing of the body buffered
    ok = Decoder(max_packet_size=1000)
    assert ok.feed(b"\x30\xe8\x07") == []  # exactly 1000 is fine
    body = _s(b"t") + b"x" * 997
    assert ok.feed(body) == [Publish("t", b"x" * 997)]
    with pytest.raises(MqttProtocolError, match="too large"):
        Decoder(max_packet_size=10).feed(b"\x30\xff\xff\xff\x7f")


# --- topics ----------------------------------------------------------------------------------

MATCHES = [
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/#", "sport", True),
    ("#", "sport/tennis", True),
    ("#", "/", True),
    ("sport/tennis/#", "sport/tennis", True),
    ("sport/tennis/#", "sport/tennisx", False),
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("+", "finance", True),
    ("a/b", "a/b", True),
    ("a/b", "a/b/c", False),
    ("a/b/c", "a/b", False),
    ("A/b", "a/b", False),
    ("#", "$SYS/monitor", False),
    ("+/monitor", "$SYS/monitor", False),
    ("$SYS/#", "$SYS/monitor", True),
    ("$SYS/monitor/+", "$SYS/monitor/clients", True),
    ("$dps/registrations/res/#", "$dps/registrations/res/202/?$rid=1&retry-after=3", True),
    ("$iothub/twin/res/#", "$iothub/twin/res/204/?$rid=x&$version=2", True),
    ("devices/dev1/messages/devicebound/#", "devices/dev1/messages/devicebound/%24.mid=m1", True),
    ("devices/+/messages/devicebound/#", "devices/dev2/messages/devicebound", True),
    ("devices/dev1/messages/devicebound/#", "devices/dev2/messages/devicebound/x", False),
]


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), MATCHES)
def test_topic_matches(topic_filter, topic, expected):
    assert topic_matches(topic_filter, topic) is expected


def test_topic_validity_helpers():
    assert is_valid_topic_name("$iothub/twin/GET/?$rid=1")
    assert is_valid_topic_name("/")
    assert not is_valid_topic_name("")
    assert not is_valid_topic_name("a/+")
    assert not is_valid_topic_name("#")
    for good in ("#", "+", "+/+", "a/+/b/#", "/", "a//b", "$dps/registrations/res/#"):
        assert is_valid_topic_filter(good), good
    for bad in ("", "a#", "a/#/b", "a+", "+a/b", "a/b#", "##"):
        assert not is_valid_topic_filter(bad), bad
