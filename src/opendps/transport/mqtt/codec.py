"""Sans-IO MQTT 3.1.1 codec (OASIS MQTT Version 3.1.1 Plus Errata 01): packets, encoder, incremental decoder.

Why hand-written: no maintained library fits the device plane. amqtt refuses client publishes to
``$`` topics since 0.11.2 (Azure devices publish to ``$dps/...`` and ``$iothub/...``) and needs
private APIs to answer one session; mqttproto and mqtt5 are MQTT 5 only, and every Azure SDK
speaks 3.1.1. Sans-IO so that the server (:mod:`.server`), the device SDK and tests share it, over
TCP, TLS or WebSockets alike.

The decoder is strict: every rule of the specification that can be checked on a single packet
raises :class:`MqttProtocolError` (the connection must then be closed), with a message that names
the problem and never quotes secrets. Rules that need session context are *not* checked here and
are enforced by :class:`opendps.transport.mqtt.server.MqttServer`: CONNECT must be the first packet
and may not repeat, and which packet types a server (or client) may receive at all.

CONNECT with a protocol level other than 4 still decodes (name, level, flags, keepalive; its
payload is not interpreted because MQTT 5 lays it out differently), so a server can answer with
CONNACK return code 1 as the specification requires.

One deliberate leniency: PUBACK with packet identifier 0 decodes (as ``Puback(0)``). The C# DPS client
(DotNetty) acknowledges every response it receives, QoS 0 ones with id 0; that acknowledges nothing, so the
receiver ignores it rather than dropping a device over it. It is never encoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

__all__ = [
    "CONNACK_ACCEPTED",
    "CONNACK_BAD_CREDENTIALS",
    "CONNACK_IDENTIFIER_REJECTED",
    "CONNACK_NOT_AUTHORIZED",
    "CONNACK_SERVER_UNAVAILABLE",
    "CONNACK_UNACCEPTABLE_PROTOCOL_VERSION",
    "MAX_REMAINING_LENGTH",
    "SUBACK_FAILURE",
    "Connack",
    "Connect",
    "Decoder",
    "Disconnect",
    "MqttProtocolError",
    "Packet",
    "PacketType",
    "Pingreq",
    "Pingresp",
    "Puback",
    "Pubcomp",
    "Publish",
    "Pubrec",
    "Pubrel",
    "Suback",
    "Subscribe",
    "Unsuback",
    "Unsubscribe",
    "Will",
    "encode",
    "encode_remaining_length",
    "is_valid_topic_filter",
    "is_valid_topic_name",
    "topic_matches",
]

MAX_REMAINING_LENGTH = 268_435_455  # four length bytes (0xFF 0xFF 0xFF 0x7F)

CONNACK_ACCEPTED = 0
CONNACK_UNACCEPTABLE_PROTOCOL_VERSION = 1
CONNACK_IDENTIFIER_REJECTED = 2
CONNACK_SERVER_UNAVAILABLE = 3
CONNACK_BAD_CREDENTIALS = 4
CONNACK_NOT_AUTHORIZED = 5

SUBACK_FAILURE = 0x80


class MqttProtocolError(Exception):
    """The peer broke the protocol; the message names the rule (no payloads, no credentials).

    ``packets``: what the same :meth:`Decoder.feed` call completed before the violation, so that a
    session layer can still honour, say, a DISCONNECT that preceded trailing garbage.
    """

    def __init__(self, message: str, packets: list[Packet] | None = None) -> None:
        super().__init__(message)
        self.packets: list[Packet] = packets or []


class PacketType(IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14


# --- packets ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Will:
    """Will message of a CONNECT (decoded and validated; the opendps server never publishes it)."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


@dataclass(frozen=True, slots=True)
class Connect:
    """CONNECT. ``protocol_level`` != 4 decodes with an empty client id and no payload fields."""

    client_id: str
    clean_session: bool = True
    keepalive: int = 60
    username: str | None = None
    password: bytes | None = field(default=None, repr=False)
    will: Will | None = None
    protocol_name: str = "MQTT"
    protocol_level: int = 4


@dataclass(frozen=True, slots=True)
class Connack:
    session_present: bool = False
    return_code: int = CONNACK_ACCEPTED


@dataclass(slots=True)
class Publish:
    """PUBLISH; ``packet_id`` is None exactly when ``qos`` is 0. Not frozen, unlike the other packets: a frozen
    dataclass sets each field through ``object.__setattr__``, 0.9 µs against 0.2 µs per decoded PUBLISH here."""

    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None


@dataclass(frozen=True, slots=True)
class Puback:
    packet_id: int


@dataclass(frozen=True, slots=True)
class Pubrec:
    packet_id: int


@dataclass(frozen=True, slots=True)
class Pubrel:
    packet_id: int


@dataclass(frozen=True, slots=True)
class Pubcomp:
    packet_id: int


@dataclass(frozen=True, slots=True)
class Subscribe:
    """SUBSCRIBE: ``topics`` is a non-empty list of (topic filter, requested QoS)."""

    packet_id: int
    topics: list[tuple[str, int]]


@dataclass(frozen=True, slots=True)
class Suback:
    """SUBACK: one code per filter, 0/1/2 = granted QoS, 0x80 = refused."""

    packet_id: int
    return_codes: list[int]


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    packet_id: int
    topics: list[str]


@dataclass(frozen=True, slots=True)
class Unsuback:
    packet_id: int


@dataclass(frozen=True, slots=True)
class Pingreq:
    pass


@dataclass(frozen=True, slots=True)
class Pingresp:
    pass


@dataclass(frozen=True, slots=True)
class Disconnect:
    pass


Packet = (Connect | Connack | Publish | Puback | Pubrec | Pubrel | Pubcomp | Subscribe | Suback | Unsubscribe | Unsuback
          | Pingreq | Pingresp | Disconnect)

_PACKET_NAMES = {t.value: t.name for t in PacketType}


# --- topics -------------------------------------------------------------------------------------


def _topic_name_problem(topic: str) -> str | None:
    if not topic:
        return "empty topic name"
    if "+" in topic or "#" in topic:
        return "wildcard in topic name"
    return None


def _topic_filter_problem(topic_filter: str) -> str | None:
    if not topic_filter:
        return "empty topic filter"
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "invalid topic filter: '#' must be a whole level and the last one"
        if "+" in level and level != "+":
            return "invalid topic filter: '+' must be a whole level"
    return None


def is_valid_topic_name(topic: str) -> bool:
    """A PUBLISH topic: non-empty, no wildcards (length and UTF-8 rules are the string codec's)."""
    return _topic_name_problem(topic) is None


def is_valid_topic_filter(topic_filter: str) -> bool:
    """A SUBSCRIBE filter: non-empty; ``+`` is a whole level; ``#`` is a whole, last level."""
    return _topic_filter_problem(topic_filter) is None


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 §4.7 matching. ``sport/#`` matches ``sport``; ``+`` matches one (possibly empty)
    level; a filter starting with a wildcard does not match topics starting with ``$`` (§4.7.2)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(t_levels):
            return False
        if level != "+" and level != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


# --- encoding -----------------------------------------------------------------------------------


def encode_remaining_length(value: int) -> bytes:
    """Variable-length integer of the fixed header (1 to 4 bytes)."""
    if not 0 <= value <= MAX_REMAINING_LENGTH:
        raise ValueError(f"remaining length {value} out of range 0..{MAX_REMAINING_LENGTH}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _str(value: str, what: str) -> bytes:
    if "\x00" in value:
        raise ValueError(f"{what} contains U+0000")
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not encodable as UTF-8") from exc
    if len(raw) > 0xFFFF:
        raise ValueError(f"{what} longer than 65535 bytes")
    return len(raw).to_bytes(2, "big") + raw


def _bin(value: bytes, what: str) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"{what} longer than 65535 bytes")
    return len(value).to_bytes(2, "big") + bytes(value)


def _pid(packet_id: int | None) -> bytes:
    if packet_id is None or not 1 <= packet_id <= 0xFFFF:
        raise ValueError(f"packet identifier must be 1..65535, got {packet_id!r}")
    return packet_id.to_bytes(2, "big")


def _qos(qos: int) -> int:
    if qos not in (0, 1, 2):
        raise ValueError(f"QoS must be 0, 1 or 2, got {qos!r}")
    return qos


def _frame(first: int, *parts: bytes) -> bytes:
    length = sum(len(p) for p in parts)
    return b"".join((bytes((first,)), encode_remaining_length(length), *parts))


def _encode_connect(p: Connect) -> bytes:
    flags = 0x02 if p.clean_session else 0
    payload = [_str(p.client_id, "client id")]
    if p.will is not None:
        if (problem := _topic_name_problem(p.will.topic)) is not None:
            raise ValueError(f"will topic: {problem}")
        flags |= 0x04 | (_qos(p.will.qos) << 3) | (0x20 if p.will.retain else 0)
        payload += [_str(p.will.topic, "will topic"), _bin(p.will.payload, "will message")]
    if p.username is not None:
        flags |= 0x80
        payload.append(_str(p.username, "user name"))
    if p.password is not None:
        if p.username is None:
            raise ValueError("a password needs a user name in MQTT 3.1.1")
        flags |= 0x40
        payload.append(_bin(p.password, "password"))
    if not 0 <= p.keepalive <= 0xFFFF:
        raise ValueError("keepalive must be 0..65535")
    if not 0 <= p.protocol_level <= 0xFF:
        raise ValueError("protocol level must be 0..255")
    header = _str(p.protocol_name, "protocol name") + bytes((p.protocol_level, flags)) + p.keepalive.to_bytes(2, "big")
    return _frame(0x10, header, *payload)


def _encode_connack(p: Connack) -> bytes:
    if not 0 <= p.return_code <= 5:
        raise ValueError("CONNACK return code must be 0..5")
    if p.session_present and p.return_code:
        raise ValueError("session present must be 0 with a non-zero return code")
    return bytes((0x20, 2, 1 if p.session_present else 0, p.return_code))


def _encode_publish(p: Publish) -> bytes:
    qos = _qos(p.qos)
    if (problem := _topic_name_problem(p.topic)) is not None:
        raise ValueError(problem)
    if qos == 0 and (p.dup or p.packet_id is not None):
        raise ValueError("a QoS 0 PUBLISH has no packet identifier and no DUP flag")
    first = 0x30 | (0x08 if p.dup else 0) | (qos << 1) | (0x01 if p.retain else 0)
    pid = _pid(p.packet_id) if qos else b""
    return _frame(first, _str(p.topic, "topic name"), pid, p.payload)


def _encode_subscribe(p: Subscribe) -> bytes:
    if not p.topics:
        raise ValueError("SUBSCRIBE needs at least one topic filter")
    parts = [_pid(p.packet_id)]
    for topic_filter, qos in p.topics:
        if (problem := _topic_filter_problem(topic_filter)) is not None:
            raise ValueError(problem)
        parts += [_str(topic_filter, "topic filter"), bytes((_qos(qos),))]
    return _frame(0x82, *parts)


def _encode_suback(p: Suback) -> bytes:
    if not p.return_codes or any(c not in (0, 1, 2, SUBACK_FAILURE) for c in p.return_codes):
        raise ValueError("SUBACK needs return codes in 0, 1, 2, 0x80")
    return _frame(0x90, _pid(p.packet_id), bytes(p.return_codes))


def _encode_unsubscribe(p: Unsubscribe) -> bytes:
    if not p.topics:
        raise ValueError("UNSUBSCRIBE needs at least one topic filter")
    parts = [_pid(p.packet_id)]
    for topic_filter in p.topics:
        if (problem := _topic_filter_problem(topic_filter)) is not None:
            raise ValueError(problem)
        parts.append(_str(topic_filter, "topic filter"))
    return _frame(0xA2, *parts)


_ENCODERS = {
    Connect: _encode_connect,
    Connack: _encode_connack,
    Publish: _encode_publish,
    Puback: lambda p: b"\x40\x02" + _pid(p.packet_id),
    Pubrec: lambda p: b"\x50\x02" + _pid(p.packet_id),
    Pubrel: lambda p: b"\x62\x02" + _pid(p.packet_id),
    Pubcomp: lambda p: b"\x70\x02" + _pid(p.packet_id),
    Subscribe: _encode_subscribe,
    Suback: _encode_suback,
    Unsubscribe: _encode_unsubscribe,
    Unsuback: lambda p: b"\xb0\x02" + _pid(p.packet_id),
    Pingreq: lambda p: b"\xc0\x00",
    Pingresp: lambda p: b"\xd0\x00",
    Disconnect: lambda p: b"\xe0\x00",
}


def encode(packet: Packet) -> bytes:
    """Wire bytes of ``packet``; raises ValueError for a packet that the decoder would refuse."""
    try:
        encoder = _ENCODERS[type(packet)]
    except KeyError:
        raise TypeError(f"not an MQTT packet: {type(packet).__name__}") from None
    return encoder(packet)


# --- decoding -----------------------------------------------------------------------------------

# Required fixed-header flags per packet type (PUBLISH is checked separately).
_FLAGS = {1: 0, 2: 0, 4: 0, 5: 0, 6: 2, 7: 0, 8: 2, 9: 0, 10: 2, 11: 0, 12: 0, 13: 0, 14: 0}


class _Reader:
    """Cursor over one packet body; every read checks bounds."""

    __slots__ = ("_data", "_pos", "_name")

    def __init__(self, data: bytes, name: str) -> None:
        self._data = data
        self._pos = 0
        self._name = name

    def _take(self, n: int, what: str) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise MqttProtocolError(f"{self._name}: truncated {what}")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def u8(self, what: str) -> int:
        return self._take(1, what)[0]

    def u16(self, what: str) -> int:
        return int.from_bytes(self._take(2, what), "big")

    def binary(self, what: str) -> bytes:
        return self._take(self.u16(f"{what} length"), what)

    def string(self, what: str) -> str:
        raw = self.binary(what)
        try:
            value = raw.decode("utf-8")  # strict: also refuses encoded surrogates (U+D800..U+DFFF)
        except UnicodeDecodeError:
            raise MqttProtocolError(f"{self._name}: invalid UTF-8 in {what}") from None
        if "\x00" in value:
            raise MqttProtocolError(f"{self._name}: U+0000 in {what}")
        return value

    def packet_id(self, *, allow_zero: bool = False) -> int:
        pid = self.u16("packet identifier")
        if pid == 0 and not allow_zero:
            raise MqttProtocolError(f"{self._name}: packet identifier 0")
        return pid

    def remaining(self) -> int:
        return len(self._data) - self._pos

    def rest(self) -> bytes:
        chunk = self._data[self._pos :]
        self._pos = len(self._data)
        return chunk

    def end(self) -> None:
        if self._pos != len(self._data):
            raise MqttProtocolError(f"{self._name}: {len(self._data) - self._pos} trailing bytes")


def _decode_connect(r: _Reader) -> Connect:
    name = r.string("protocol name")
    level = r.u8("protocol level")
    if not (name == "MQTT" or (name == "MQIsdp" and level == 3)):
        raise MqttProtocolError("CONNECT: unsupported protocol name")
    flags = r.u8("connect flags")
    keepalive = r.u16("keepalive")
    clean = bool(flags & 0x02)
    if level != 4:
        # Not ours to interpret (MQTT 5 adds properties); enough to answer CONNACK rc 1.
        r.rest()
        return Connect(client_id="", clean_session=clean, keepalive=keepalive, protocol_name=name, protocol_level=level)
    if flags & 0x01:
        raise MqttProtocolError("CONNECT: reserved connect flag is set")
    will_flag = bool(flags & 0x04)
    will_qos = (flags >> 3) & 0x03
    will_retain = bool(flags & 0x20)
    if will_qos == 3:
        raise MqttProtocolError("CONNECT: will QoS 3")
    if not will_flag and (will_qos or will_retain):
        raise MqttProtocolError("CONNECT: will QoS/retain set without the will flag")
    has_password = bool(flags & 0x40)
    has_username = bool(flags & 0x80)
    if has_password and not has_username:
        raise MqttProtocolError("CONNECT: password flag without user name flag")
    client_id = r.string("client id")
    will = None
    if will_flag:
        topic = r.string("will topic")
        if (problem := _topic_name_problem(topic)) is not None:
            raise MqttProtocolError(f"CONNECT: will topic: {problem}")
        will = Will(topic, r.binary("will message"), will_qos, will_retain)
    username = r.string("user name") if has_username else None
    password = r.binary("password") if has_password else None
    r.end()
    return Connect(client_id, clean, keepalive, username, password, will, name, level)


def _decode_connack(r: _Reader) -> Connack:
    ack_flags = r.u8("acknowledge flags")
    code = r.u8("return code")
    r.end()
    if ack_flags & 0xFE:
        raise MqttProtocolError("CONNACK: reserved acknowledge flags are set")
    if code > 5:
        raise MqttProtocolError(f"CONNACK: reserved return code {code}")
    if code and ack_flags:
        raise MqttProtocolError("CONNACK: session present with a non-zero return code")
    return Connack(bool(ack_flags), code)


def _decode_publish(body: bytes, flags: int) -> Publish:
    """PUBLISH, the packet of every telemetry message: read with slices rather than a :class:`_Reader` (whose method
    per field was half of decoding one), with the same checks and the reader's messages."""
    size = len(body)
    if size < 2:
        raise MqttProtocolError("PUBLISH: truncated topic name length")
    end = 2 + ((body[0] << 8) | body[1])
    if end > size:
        raise MqttProtocolError("PUBLISH: truncated topic name")
    try:
        topic = body[2:end].decode("utf-8")  # strict: also refuses encoded surrogates (U+D800..U+DFFF)
    except UnicodeDecodeError:
        raise MqttProtocolError("PUBLISH: invalid UTF-8 in topic name") from None
    if "\x00" in topic:
        raise MqttProtocolError("PUBLISH: U+0000 in topic name")
    if not topic or "+" in topic or "#" in topic:  # _topic_name_problem's checks, inline on the hot path
        raise MqttProtocolError(f"PUBLISH: {_topic_name_problem(topic)}")
    qos = (flags >> 1) & 0x03  # 3 and DUP on QoS 0 were refused with the fixed header
    pid = None
    if qos:
        if end + 2 > size:
            raise MqttProtocolError("PUBLISH: truncated packet identifier")
        pid = (body[end] << 8) | body[end + 1]
        if pid == 0:
            raise MqttProtocolError("PUBLISH: packet identifier 0")
        end += 2
    return Publish(topic, body[end:], qos, bool(flags & 0x01), bool(flags & 0x08), pid)


def _decode_subscribe(r: _Reader) -> Subscribe:
    pid = r.packet_id()
    topics: list[tuple[str, int]] = []
    while r.remaining():
        topic_filter = r.string("topic filter")
        if (problem := _topic_filter_problem(topic_filter)) is not None:
            raise MqttProtocolError(f"SUBSCRIBE: {problem}")
        options = r.u8("requested QoS")
        if options & 0xFC:
            raise MqttProtocolError("SUBSCRIBE: reserved bits set in requested QoS byte")
        if options == 3:
            raise MqttProtocolError("SUBSCRIBE: requested QoS 3")
        topics.append((topic_filter, options))
    if not topics:
        raise MqttProtocolError("SUBSCRIBE: no topic filters")
    return Subscribe(pid, topics)


def _decode_suback(r: _Reader) -> Suback:
    pid = r.packet_id()
    codes = list(r.rest())
    if not codes:
        raise MqttProtocolError("SUBACK: no return codes")
    if any(c not in (0, 1, 2, SUBACK_FAILURE) for c in codes):
        raise MqttProtocolError("SUBACK: reserved return code")
    return Suback(pid, codes)


def _decode_unsubscribe(r: _Reader) -> Unsubscribe:
    pid = r.packet_id()
    topics: list[str] = []
    while r.remaining():
        topic_filter = r.string("topic filter")
        if (problem := _topic_filter_problem(topic_filter)) is not None:
            raise MqttProtocolError(f"UNSUBSCRIBE: {problem}")
        topics.append(topic_filter)
    if not topics:
        raise MqttProtocolError("UNSUBSCRIBE: no topic filters")
    return Unsubscribe(pid, topics)


def _id_only(cls: type, *, allow_zero: bool = False) -> object:
    def decode(r: _Reader) -> object:
        pid = r.packet_id(allow_zero=allow_zero)
        r.end()
        return cls(pid)

    return decode


def _empty(cls: type) -> object:
    def decode(r: _Reader) -> object:
        r.end()
        return cls()

    return decode


_DECODERS = {
    1: _decode_connect,
    2: _decode_connack,
    4: _id_only(Puback, allow_zero=True),  # see the module docstring (C# PUBACK 0)
    5: _id_only(Pubrec),
    6: _id_only(Pubrel),
    7: _id_only(Pubcomp),
    8: _decode_subscribe,
    9: _decode_suback,
    10: _decode_unsubscribe,
    11: _id_only(Unsuback),
    12: _empty(Pingreq),
    13: _empty(Pingresp),
    14: _empty(Disconnect),
}


def _check_first_byte(first: int) -> None:
    ptype, flags = first >> 4, first & 0x0F
    if ptype == 0 or ptype == 15:
        raise MqttProtocolError(f"reserved packet type {ptype}")
    if ptype == PacketType.PUBLISH:
        qos = (flags >> 1) & 0x03
        if qos == 3:
            raise MqttProtocolError("PUBLISH: QoS 3")
        if qos == 0 and flags & 0x08:
            raise MqttProtocolError("PUBLISH: DUP flag set on a QoS 0 message")
        return
    if flags != _FLAGS[ptype]:
        raise MqttProtocolError(
            f"{_PACKET_NAMES[ptype]}: reserved fixed-header flags must be {_FLAGS[ptype]:#06b}, got {flags:#06b}")


def _passes(first: int) -> bool:
    try:
        _check_first_byte(first)
    except MqttProtocolError:
        return False
    return True


_GOOD_FIRST_BYTES = frozenset(b for b in range(256) if _passes(b))  # a set lookup per packet instead of a call


class Decoder:
    """Incremental decoder: ``feed`` bytes as they arrive, get the complete packets back.

    Checks the fixed header as soon as its bytes arrive: the packet type and flags with the first
    byte, and the remaining length against ``max_packet_size`` (the largest accepted *remaining
    length*, i.e. packet size minus the 2 to 5 header bytes) before any of the body is buffered.
    After a :class:`MqttProtocolError` the decoder stays failed (the stream cannot be resynchronised).
    """

    __slots__ = ("max_packet_size", "_buf", "_need", "_error")

    def __init__(self, max_packet_size: int = MAX_REMAINING_LENGTH) -> None:
        if not 0 <= max_packet_size <= MAX_REMAINING_LENGTH:
            raise ValueError(f"max_packet_size must be 0..{MAX_REMAINING_LENGTH}")
        self.max_packet_size = max_packet_size
        self._buf = bytearray()
        self._need = 0  # bytes the current packet needs in total, once its header is known
        self._error: MqttProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete packet."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Packet]:
        """Append ``data``; return every packet completed by it, in order."""
        if self._error is not None:
            raise self._error
        self._buf += data
        packets: list[Packet] = []
        try:
            while (packet := self._next()) is not None:
                packets.append(packet)
        except MqttProtocolError as exc:
            self._error = MqttProtocolError(str(exc))  # raised again by later calls, without packets
            self._buf.clear()
            exc.packets = packets
            raise
        return packets

    def _next(self) -> Packet | None:
        buf = self._buf
        have = len(buf)
        if self._need:
            if have < self._need:
                return None
        elif not have:
            return None
        first = buf[0]
        if first not in _GOOD_FIRST_BYTES:
            _check_first_byte(first)  # raises, naming what is wrong
        length = 0
        shift = 0
        pos = 1
        while True:
            if pos >= have:
                return None  # length incomplete
            byte = buf[pos]
            length |= (byte & 0x7F) << shift
            pos += 1
            if not byte & 0x80:
                break
            if pos == 5:
                raise MqttProtocolError("remaining length longer than 4 bytes")
            shift += 7
        if length > self.max_packet_size:
            raise MqttProtocolError(f"packet too large: remaining length {length} exceeds {self.max_packet_size}")
        total = pos + length
        if have < total:
            self._need = total
            return None
        self._need = 0
        with memoryview(buf) as view:
            body = view[pos:total].tobytes()
        del buf[:total]
        ptype = first >> 4
        if ptype == PacketType.PUBLISH:
            return _decode_publish(body, first & 0x0F)
        return _DECODERS[ptype](_Reader(body, _PACKET_NAMES[ptype]))  # type: ignore[return-value]
