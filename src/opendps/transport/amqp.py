"""AMQP 1.0 server engine: python-qpid-proton driven sans-IO under an asyncio protocol.

Why proton, and why sans-IO: AMQP 1.0 (framing, SASL, sessions, flow control, settlement) is too large
to hand-write like our MQTT codec, and python-qpid-proton is the one maintained AMQP 1.0 library we
keep. We use only its protocol engine (``Transport`` + ``Connection`` + ``Collector``): bytes are pushed
in and popped out by :class:`AmqpConnection`, an asyncio protocol that runs over our one TLS layer
(:func:`opendps.transport.tls.start_tls_server`). Proton's Container/reactor and its SSL are never used,
so there is one TLS implementation (with its handshake timeout and logging) and one event loop.

The engine decides nothing about messages: an application supplies a :class:`AmqpHandler` per
connection that accepts or refuses link attaches and accepts or rejects each message. Handler calls of
one connection run one at a time, in arrival order (a CBS ``put-token`` is answered before a later
attach is judged). Limits: frame size, sessions, links, message size, session window (bytes buffered),
link credit, a deadline to finish SASL and the AMQP open, and the AMQP idle timeout (proton's ``tick``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from proton import (
    Collector,
    Condition,
    Connection,
    Data,
    Delivery,
    Endpoint,
    Event,
    Link,
    Message,
    Transport,
    decimal32,
    decimal64,
    decimal128,
    int32,
    symbol,
    timestamp,
    ulong,
)
from proton import SessionException as _SessionException
from proton import TransportException as _TransportException

from opendps.transport import shown

__all__ = [
    "AmqpConnection",
    "AmqpError",
    "AmqpHandler",
    "AmqpLimits",
    "AmqpLink",
    "Message",
    "decimal32",
    "decimal64",
    "decimal128",
    "int32",
    "symbol",
    "timestamp",
    "ulong",
]

log = logging.getLogger("opendps.amqp")

ACCEPTED = Delivery.ACCEPTED  # the peer's outcome that completes a delivery (AmqpLink.send's on_outcome)

# AMQP 1.0 error conditions used by applications (spec part 2.8.15 and 2.8.16)
UNAUTHORIZED = "amqp:unauthorized-access"
NOT_FOUND = "amqp:not-found"
NOT_ALLOWED = "amqp:not-allowed"
INVALID_FIELD = "amqp:invalid-field"
DECODE_ERROR = "amqp:decode-error"
RESOURCE_LIMIT = "amqp:resource-limit-exceeded"
INTERNAL_ERROR = "amqp:internal-error"
MESSAGE_SIZE_EXCEEDED = "amqp:link:message-size-exceeded"
TRANSFER_LIMIT_EXCEEDED = "amqp:link:transfer-limit-exceeded"

SASL_HEADER = b"AMQP\x03\x01\x00\x00"
AMQP_HEADER = b"AMQP\x00\x01\x00\x00"  # no SASL layer: Microsoft's Node service SDK, authorised by CBS alone
# MSSBCBS: what uamqp (azure-iot-hub) asks for, ANONYMOUS: Java and proton clients; neither carries a credential.
# PLAIN: the C service SDK's (authcid ``{keyName}@sas.root.{hub}``, password = a SAS token), checked by the handler.
SASL_MECHANISMS = ("MSSBCBS", "PLAIN", "ANONYMOUS")
PLAIN = "PLAIN"
_MAX_SASL_FRAME = 4096
_SASL_INIT, _SASL_MECHANISMS_CODE, _SASL_OUTCOME = 0x41, 0x40, 0x44
# sasl-outcome codes (AMQP 1.0 part 5.3.3.6): ok, authentication failed, and a transient system error (the credential
# could not be judged for now, e.g. the database is away: the client retries, where ``auth`` would make it give up)
SASL_OK, SASL_AUTH, SASL_SYS_TEMP = 0, 1, 4


def _sasl_frame(code: int, fields: Callable[[Data], None]) -> bytes:
    """A SASL frame (type 1, channel 0) whose body is the described list ``code`` filled by ``fields``."""
    data = Data()
    data.put_described()
    data.enter()
    data.put_ulong(code)
    data.put_list()
    data.enter()
    fields(data)
    data.exit()
    data.exit()
    body = bytes(data.encode())
    return (8 + len(body)).to_bytes(4, "big") + b"\x02\x01\x00\x00" + body


def _put_mechanisms(data: Data) -> None:
    data.put_array(False, Data.SYMBOL)
    data.enter()
    for mech in SASL_MECHANISMS:
        data.put_symbol(symbol(mech))
    data.exit()


def sasl_outcome(code: int) -> bytes:
    """The sasl-outcome frame: ``SASL_OK`` or ``SASL_AUTH`` (authentication failed)."""
    return _sasl_frame(_SASL_OUTCOME, lambda d: d.put_ubyte(code))


@dataclass(frozen=True)
class PlainCredentials:
    """What a SASL PLAIN client sent (RFC 4616: ``[authzid] NUL authcid NUL passwd``). ``repr`` hides the
    password, so a log line or a traceback never carries it."""

    authcid: str
    password: str = field(repr=False)


class _SaslServer:
    """The SASL exchange before AMQP, done here because proton's built-in server SASL offers no MSSBCBS.

    MSSBCBS and ANONYMOUS authenticate no one (the application does, e.g. CBS): header, sasl-mechanisms,
    sasl-init, sasl-outcome. PLAIN carries a credential that only the application can judge, so the exchange
    stops at ``"verify"`` with :attr:`plain` set until the caller sends :func:`sasl_outcome`. Bytes after the
    sasl-init belong to AMQP proper. A client that opens with the plain AMQP header skips SASL altogether (as
    Azure's front end allows): it must then authorise by CBS like an ANONYMOUS one.
    """

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.header_seen = False
        self.mechanism: str | None = None
        self.plain: PlainCredentials | None = None

    def feed(self, data: bytes) -> tuple[bytes, str, bytes]:
        """→ (bytes to send, state, AMQP bytes left over); state: ``more`` (need more bytes), ``done``,
        ``refused`` (outcome sent if any, close), ``verify`` (PLAIN: the application decides)."""
        self.buffer += data
        out = b""
        if not self.header_seen:
            if len(self.buffer) < 8:
                known = SASL_HEADER.startswith(bytes(self.buffer)) or AMQP_HEADER.startswith(bytes(self.buffer))
                return out, ("more" if known else "refused"), b""
            if bytes(self.buffer[:8]) == AMQP_HEADER:
                return out, "done", bytes(self.buffer)  # no SASL: every byte, header included, is AMQP's
            if bytes(self.buffer[:8]) != SASL_HEADER:
                return SASL_HEADER, "refused", b""  # spec: answer with the header we speak, then close
            del self.buffer[:8]
            self.header_seen = True
            out = SASL_HEADER + _sasl_frame(_SASL_MECHANISMS_CODE, _put_mechanisms)
        if len(self.buffer) < 8:
            return out, "more", b""
        size = int.from_bytes(self.buffer[:4], "big")
        doff, ftype = self.buffer[4], self.buffer[5]
        if size > _MAX_SASL_FRAME or size < 8 or doff < 2 or ftype != 1:
            return out, "refused", b""
        if len(self.buffer) < size:
            return out, "more", b""
        body, rest = bytes(self.buffer[doff * 4:size]), bytes(self.buffer[size:])
        self.buffer.clear()
        try:
            frame = Data()
            frame.decode(body)
            frame.rewind()
            frame.next()
            init = frame.get_object()
            code, fields = int(init.descriptor), list(init.value)
        except Exception:  # noqa: BLE001 - any decoding failure is a refusal
            return out, "refused", b""
        mech = str(fields[0]) if code == _SASL_INIT and fields and fields[0] else None
        self.mechanism = mech
        if mech == PLAIN:
            self.plain = _plain(fields[1] if len(fields) > 1 else None)
            if self.plain is not None:
                return out, "verify", rest
        ok = mech in SASL_MECHANISMS and mech != PLAIN
        return out + sasl_outcome(SASL_OK if ok else SASL_AUTH), ("done" if ok else "refused"), rest


def _plain(response: Any) -> PlainCredentials | None:
    """The sasl-init initial-response of PLAIN → its credentials; None when it is not ``[authzid] NUL authcid NUL
    passwd`` in UTF-8."""
    if not isinstance(response, bytes | bytearray | memoryview):
        return None
    parts = bytes(response).split(b"\0")
    if len(parts) != 3:
        return None
    try:
        authcid, password = parts[1].decode(), parts[2].decode()
    except UnicodeDecodeError:
        return None
    return PlainCredentials(authcid, password)


@dataclass(frozen=True)
class AmqpError:
    """An AMQP error: a condition symbol (``amqp:not-found``) and a human-readable description."""

    condition: str
    description: str


@dataclass(frozen=True)
class AmqpLimits:
    idle_timeout: float = 60.0  # seconds without a frame from the peer before the connection closes
    open_timeout: float = 10.0  # seconds to finish SASL and the AMQP open after the TLS handshake
    max_frame_size: int = 65536
    channel_max: int = 7  # at most 8 sessions per connection
    max_links: int = 32  # links accepted at once; as many again refused and not yet detached by the peer, then it closes
    max_outbox: int = 64  # messages an outgoing link holds while the peer grants no credit (CBS answers)
    max_message_size: int = 256 * 1024  # one message, all its transfer frames together
    session_capacity: int = 1024 * 1024  # bytes one session may buffer (sets the incoming window)
    link_credit: int = 10  # deliveries one incoming link may have in flight
    min_peer_idle_timeout: float = 1.0  # a shorter idle-timeout in the peer's open (heartbeats we owe) is refused


Outcome = Callable[[int | None], None]  # told a delivery's outcome (AmqpLink.send)


class AmqpLink:
    """One attached link as the application sees it.

    ``incoming`` links carry messages from the peer to us (the peer's sender; ``address`` is the
    target it names); outgoing links carry messages to the peer (``address`` is the source it
    names). ``session`` identifies the session, so a request/response pair of links can be matched.
    """

    __slots__ = ("_conn", "_link", "_outbox", "_unsettled", "name", "incoming", "address", "source", "target",
                 "session")

    def __init__(self, conn: AmqpConnection, link: Link) -> None:
        self._conn = conn
        self._link = link
        self._outbox: deque[tuple[bytes, bytes | None, Outcome | None]] = deque()
        # sent, not settled here yet -> told the peer's outcome; keyed by the delivery (proton's wrappers hash by the C
        # object), not its tag: proton decodes a tag as UTF-8 when read, and a binary one (a GUID's bytes) would raise
        self._unsettled: dict[Delivery, Outcome | None] = {}
        self.name: str = link.name
        self.incoming = link.is_receiver
        self.source: str | None = link.remote_source.address
        self.target: str | None = link.remote_target.address
        self.address = self.target if self.incoming else self.source
        self.session = hash(link.session)  # proton wrappers hash by the C object

    @property
    def open(self) -> bool:
        return not (self._link.state & (Endpoint.LOCAL_CLOSED | Endpoint.REMOTE_CLOSED))

    @property
    def credit(self) -> int:
        """Deliveries the peer will take now (its link credit, less what waits here)."""
        return self._link.credit - len(self._outbox) if self.open else 0

    def send(self, message: Message, *, tag: bytes | None = None, on_outcome: Outcome | None = None) -> None:
        """Queue a message on an outgoing link; it leaves as the peer grants credit. ``on_outcome`` (with the
        delivery ``tag``, else a counter's) is called once, in the loop: with the peer's outcome
        (``Delivery.ACCEPTED``, ``RELEASED``...; 0 when it settled without one; ``ACCEPTED`` at once when the link is
        pre-settled: the peer chose at-most-once) or None when the link or connection ends first."""
        if self.incoming:
            raise ValueError("cannot send on an incoming link")
        if len(self._outbox) >= self._conn.limits.max_outbox:  # a peer that asks (put-token) but grants no credit
            self.close(AmqpError(RESOURCE_LIMIT, f"{len(self._outbox)} messages wait for link credit on this link"))
            if on_outcome is not None:
                _tell(on_outcome, None)
            return
        self._outbox.append((message.encode(), tag, on_outcome))
        # sent on the next loop turn: after the delivery being handled is settled (a CBS client wants the
        # disposition of its request before the response)
        self._conn._schedule_drain(self)

    def close(self, error: AmqpError | None = None) -> None:
        """Detach (closing) this link, with an error when given."""
        self._conn._close_link(self._link, error)
        self._conn._pump()

    def _ended(self) -> None:
        """The link is gone: deliveries without an outcome, and those never sent, are told None."""
        waiting = [cb for _, _, cb in self._outbox] + list(self._unsettled.values())
        self._outbox.clear()
        self._unsettled.clear()
        for callback in waiting:
            if callback is not None:
                _tell(callback, None)


def _tell(callback: Outcome, outcome: int | None) -> None:
    try:
        callback(outcome)
    except Exception:  # an application's bug must not break the connection's event handling
        log.exception("AMQP delivery outcome handler failed")


class AmqpHandler(Protocol):
    """What an application implements for one connection (one handler per connection)."""

    def attach(self, link: AmqpLink) -> AmqpError | None:
        """Accept (None) or refuse (an error: the link is attached then detached with it). Synchronous, so
        the attach is answered at once (uamqp transfers as soon as its attach is out); still in order with
        messages: an attach that arrives while a message is being handled waits for it."""

    async def message(self, link: AmqpLink, message: Message) -> AmqpError | None:
        """A complete message on an incoming link: accept (None) or reject with an error."""

    async def sasl_plain(self, credentials: PlainCredentials) -> int:
        """SASL PLAIN: the sasl-outcome code. ``SASL_OK`` authorises the connection, ``SASL_AUTH`` refuses the
        credential, ``SASL_SYS_TEMP`` says it cannot be judged for now (a client retries later); after either refusal
        the connection closes. Runs before any AMQP frame, in the same one-at-a-time order as the other calls."""

    def closed(self) -> None:
        """The connection is gone (called once)."""


def _condition(error: AmqpError) -> Condition:
    return Condition(error.condition, error.description)


def content_type(message: Message) -> tuple[str | None, str | None]:
    """A message's (content-type, content-encoding), None where absent: proton's ``Message.content_type`` makes an
    absent symbol the text ``'None'``."""
    from cproton import pn_message_get_content_encoding, pn_message_get_content_type  # proton's own C binding

    return pn_message_get_content_type(message._msg), pn_message_get_content_encoding(message._msg)


def _check_decoded(message: Message) -> None:
    """Raise ValueError unless every section a handler reads has its AMQP type: proton decodes the properties' strings
    only when read (invalid UTF-8 raises there) and takes application-properties of any type."""
    for name in ("address", "reply_to", "subject", "group_id", "reply_to_group_id", "content_type", "content_encoding"):
        getattr(message, name)
    if message.properties is not None and not isinstance(message.properties, dict):
        raise ValueError("application-properties is not a map")


# message sections (AMQP 1.0 part 3.2): header ... application-properties, the body (data, amqp-sequence, amqp-value), footer
_SECTIONS = {0x70: "header", 0x71: "delivery-annotations", 0x72: "message-annotations", 0x73: "properties",
             0x74: "application-properties", 0x75: "data", 0x76: "amqp-sequence", 0x77: "amqp-value", 0x78: "footer"}
_BODY = (0x75, 0x76, 0x77)
_FIXED_WIDTH = {0x4: 0, 0x5: 1, 0x6: 2, 0x7: 4, 0x8: 8, 0x9: 16}  # by a constructor's high nibble


def _skip(data: bytes, pos: int) -> int:
    """The end of the AMQP value encoded at ``pos``. Iterative (a described value is a descriptor and a value: one more
    to skip), so no nesting depth costs a stack frame; compound values are skipped whole by their size."""
    pending = 1
    while pending:
        if pos >= len(data):
            raise ValueError("a value is cut short")
        code = data[pos]
        pos += 1
        if code == 0x00:
            pending += 1
            continue
        pending -= 1
        width = _FIXED_WIDTH.get(code >> 4)
        if width is not None:
            pos += width
        elif code >> 4 in (0xA, 0xC, 0xE):
            pos += 1 + (data[pos] if pos < len(data) else 0)
        elif code >> 4 in (0xB, 0xD, 0xF):
            pos += 4 + int.from_bytes(data[pos:pos + 4], "big")
        else:
            raise ValueError(f"0x{code:02x} is not an AMQP type")
    if pos > len(data):
        raise ValueError("a value is cut short")
    return pos


def _check_sections(data: bytes, message: Message) -> None:
    """Raise ValueError unless the encoded message is what proton's ``Message`` holds whole. Proton keeps the last of
    several body sections (two data sections ``ab`` and ``cd`` decoded as ``cd``), ignores a section it does not know
    or whose descriptor is a symbol (``amqp:data:binary``: the body read as absent) and reads a body value it cannot
    convert as absent: each was accepted as a message missing some or all of what was sent."""
    seen: set[int] = set()
    pos = 0
    while pos < len(data):
        start = pos
        if data[pos] != 0x00 or pos + 1 >= len(data):
            raise ValueError(f"byte {pos} does not start a message section")
        if data[pos + 1] == 0x53 and pos + 2 < len(data):
            code, value = data[pos + 2], pos + 3
        elif data[pos + 1] == 0x80 and pos + 9 < len(data):
            code, value = int.from_bytes(data[pos + 2:pos + 10], "big"), pos + 10
        else:
            raise ValueError(f"the section at byte {pos} has no numeric descriptor (symbolic ones are not supported)")
        if code not in _SECTIONS:
            raise ValueError(f"0x{code:x} is not a message section")
        name = _SECTIONS[code]
        if code in seen or (code in _BODY and seen.intersection(_BODY)):
            raise ValueError("more than one body section: one data, amqp-sequence or amqp-value section is taken"
                             if code in _BODY else f"more than one {name} section")
        seen.add(code)
        pos = _skip(data, start)
        if code in _BODY and message.body is None and data[value:value + 1] != b"\x40":  # not an amqp-value null
            raise ValueError(f"the {name} body is of a type that cannot be read")


class AmqpConnection(asyncio.Protocol):
    """One AMQP 1.0 connection: socket bytes ↔ proton engine ↔ :class:`AmqpHandler` calls.

    ``handler_factory(connection)`` is called once the transport is up (after the TLS handshake when
    run under :func:`opendps.transport.tls.start_tls_server`). SASL offers MSSBCBS and ANONYMOUS, neither
    of which carries a credential (the application authenticates later; for IoT hub: claims-based security,
    a ``put-token`` on ``$cbs``), and PLAIN, whose credential goes to :meth:`AmqpHandler.sasl_plain` before
    the outcome is sent; bytes that arrive meanwhile wait.
    """

    def __init__(self, handler_factory: Callable[[AmqpConnection], AmqpHandler], limits: AmqpLimits | None = None,
                 tracker: set[AmqpConnection] | None = None) -> None:
        self.limits = limits or AmqpLimits()
        self._handler_factory = handler_factory
        self._tracker = tracker  # holds this connection from connection_made to connection_lost
        self._handler: AmqpHandler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._socket: asyncio.Transport | None = None
        self._peer = "unknown peer"
        self._transport = Transport(Transport.SERVER)
        self._transport.max_frame_size = self.limits.max_frame_size
        self._transport.channel_max = self.limits.channel_max
        self._transport.idle_timeout = self.limits.idle_timeout
        self._sasl: _SaslServer | None = _SaslServer()  # None once SASL succeeded; proton sees plain AMQP after it
        self._sasl_held: bytearray | None = None  # bytes received while the handler judges a PLAIN credential
        self._connection = Connection()
        self._connection.container = "opendps"
        self._collector = Collector()
        self._connection.collect(self._collector)
        self._transport.bind(self._connection)
        self._links: dict[Link, AmqpLink] = {}  # attached links (proton wrappers compare by the C object)
        # every link the peer attached and has not detached, refused ones and those waiting for the handler included:
        # proton keeps each until the peer's detach (or a second attach on a handle in use orphans one for good)
        self._held: set[Link] = set()
        self._work: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._tick_timer: asyncio.TimerHandle | None = None
        self._open_timer: asyncio.TimerHandle | None = None
        self._tags = itertools.count(1)
        self._opened = False
        self._gone = False
        self._gone_input = False
        self._busy = False  # a handler call is running
        self.close_reason: str | None = None

    # --- public ----------------------------------------------------------------------------------

    @property
    def peer(self) -> str:
        return self._peer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._socket.get_extra_info(name, default) if self._socket is not None else default

    def close(self, error: AmqpError | None = None) -> None:
        """Close the AMQP connection (with an error when given), then the socket."""
        if self._gone:
            return
        if self.close_reason is None:
            self.close_reason = error.description if error else "closed by the server"
        if self._sasl is not None or self._gone_input:  # no AMQP under way: nothing to close politely
            self.abort()
            return
        if error is not None and self._connection.condition is None:
            self._connection.condition = _condition(error)
        if not self._connection.state & Endpoint.LOCAL_CLOSED:
            self._connection.close()
        self._pump()
        # a peer that does not answer our close within a few seconds is cut off
        if self._loop is not None and self._socket is not None:
            self._loop.call_later(5.0, self.abort)

    def abort(self) -> None:
        """Drop the socket now (no AMQP close)."""
        if self._socket is not None and not self._gone:
            self._socket.abort()

    # --- asyncio protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._loop = asyncio.get_running_loop()
        self._socket = transport
        peer = transport.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
        if self._tracker is not None:
            self._tracker.add(self)
        self._handler = self._handler_factory(self)
        self._worker = self._loop.create_task(self._work_loop())
        self._open_timer = self._loop.call_later(self.limits.open_timeout, self._on_open_timeout)

    def data_received(self, data: bytes) -> None:
        if self._sasl_held is not None:
            if len(self._sasl_held) + len(data) > self.limits.max_frame_size:  # a client may pipeline its AMQP
                self._fail("too much data before the SASL outcome")  # header and open, not flood
                return
            self._sasl_held += data
            return
        if self._sasl is not None:
            if self._gone or self._socket is None:
                return
            out, state, data = self._sasl.feed(data)
            if out:
                self._socket.write(out)
            if state == "more":
                return
            if state == "verify":
                self._sasl_held = bytearray(data)
                self._work.put_nowait(("sasl", self._sasl.plain))
                return
            if state == "refused":
                self._sasl_refused()
                return
            self._sasl = None
        if self._gone_input:
            return
        view = memoryview(data)
        while view and not self._gone:
            try:
                capacity = self._transport.capacity()
            except _TransportException:
                capacity = -1
            if capacity < 0:
                break  # input closed (protocol error or close): the rest is irrelevant
            if capacity == 0:
                self._fail("input buffer full")
                return
            n = min(capacity, len(view))
            try:
                self._transport.push(bytes(view[:n]))
            except (_TransportException, _SessionException) as exc:
                log.info("AMQP connection from %s: %s", self._peer, exc)
            view = view[n:]
            self._process()
        self._pump()

    def eof_received(self) -> bool | None:
        if self._sasl is not None or self._sasl_held is not None or self._gone_input:
            return False  # nothing of AMQP started: close
        with contextlib.suppress(_TransportException):
            self._transport.close_tail()
        self._process()
        self._pump()
        return True  # we close the socket once our output is written

    def connection_lost(self, exc: Exception | None) -> None:
        if self._gone:
            return
        self._gone = True
        self._socket = None
        for timer in (self._tick_timer, self._open_timer):
            if timer is not None:
                timer.cancel()
        if self._worker is not None:
            self._worker.cancel()
        with contextlib.suppress(_TransportException):
            self._transport.close_tail()
        with contextlib.suppress(_TransportException):
            self._transport.close_head()
        for gone in self._links.values():
            gone._ended()
        self._links.clear()
        if self._handler is not None:
            try:
                self._handler.closed()
            except Exception:  # a handler bug must not break the loop (logged with its traceback)
                log.exception("AMQP handler failed on close")
        if self._tracker is not None:
            self._tracker.discard(self)

    # --- engine ----------------------------------------------------------------------------------

    def _process(self) -> None:
        """Dispatch every proton event collected so far."""
        while True:
            event = self._collector.peek()
            if event is None:
                break
            try:
                self._dispatch(event)
            finally:
                self._collector.pop()

    def _dispatch(self, event: Event) -> None:  # noqa: C901 - flat switch, one short branch per proton event type
        t = event.type
        if t == Event.CONNECTION_REMOTE_OPEN:
            self._opened = True
            if self._open_timer is not None:
                self._open_timer.cancel()
                self._open_timer = None
            if not self._connection.state & Endpoint.LOCAL_ACTIVE and not self._connection.state & Endpoint.LOCAL_CLOSED:
                self._connection.open()
            # the peer's idle-timeout sets how often we must send (half of it): 1 ms was 23,000 frames a second
            remote_idle = self._transport.remote_idle_timeout
            if 0 < remote_idle < self.limits.min_peer_idle_timeout:  # spec 2.4.5: close with an error explaining why
                self.close_reason = (f"idle-timeout {remote_idle * 1000:g} ms is below the "
                                     f"{self.limits.min_peer_idle_timeout * 1000:g} ms this server supports")
                log.info("AMQP connection from %s refused: %s", self._peer, self.close_reason)
                self._connection.condition = _condition(AmqpError(INVALID_FIELD, self.close_reason))
                self._connection.close()  # written by the _pump that follows every _process
        elif t == Event.SESSION_REMOTE_OPEN:
            session = event.session
            if self._sessions_held() > self.limits.channel_max + 1:
                # proton takes a begin on a channel in use as one more session (each one kept, unreachable): 10,000
                # begins on channel 0 held 36 MB and wedged the connection once its own channels ran out
                self._protocol_close(AmqpError(NOT_ALLOWED, f"more than {self.limits.channel_max + 1} sessions at "
                                                            "once: a begin on a channel already in use"))
                return
            if session.state & Endpoint.LOCAL_UNINIT:
                session.incoming_capacity = self.limits.session_capacity
                session.open()
        elif t == Event.LINK_REMOTE_OPEN:
            self._remote_attach(event.link)
        elif t == Event.LINK_FLOW:
            link = self._links.get(event.link)
            if link is not None and not link.incoming:
                self._drain(link)
        elif t == Event.DELIVERY:
            self._delivery(event.delivery)
        elif t == Event.LINK_REMOTE_CLOSE:
            link = event.link
            gone = self._links.pop(link, None)
            if gone is not None:
                gone._ended()
            self._held.discard(link)
            if not link.state & Endpoint.LOCAL_CLOSED:
                link.close()
        elif t == Event.SESSION_REMOTE_CLOSE:
            session = event.session
            for key, link in list(self._links.items()):
                if link.session == hash(session):
                    del self._links[key]
                    link._ended()
            self._held = {lk for lk in self._held if hash(lk.session) != hash(session)}
            if not session.state & Endpoint.LOCAL_CLOSED:
                session.close()
        elif t == Event.CONNECTION_REMOTE_CLOSE:
            if self.close_reason is None:
                self.close_reason = "closed by the peer"
            if not self._connection.state & Endpoint.LOCAL_CLOSED:
                self._connection.close()
        elif t == Event.TRANSPORT_ERROR:
            cond = self._transport.condition
            if self.close_reason is None:
                self.close_reason = f"{cond.name}: {cond.description}" if cond else "transport error"
            # a peer that just drops the socket (uamqp does) is routine; anything else is worth a line
            level = logging.DEBUG if cond is not None and cond.description == "connection aborted" else logging.INFO
            log.log(level, "AMQP connection from %s failed: %s", self._peer, self.close_reason)

    def _sessions_held(self) -> int:
        """Sessions the peer began and has not ended."""
        count, session = 0, self._connection.session_head(Endpoint.REMOTE_ACTIVE)
        while session is not None:
            count += 1
            session = session.next(Endpoint.REMOTE_ACTIVE)
        return count

    def _protocol_close(self, error: AmqpError) -> None:
        """Close the connection for what the peer did (one log line), from within event dispatch; a peer that does
        not answer the close within a few seconds is cut off."""
        if self._connection.state & Endpoint.LOCAL_CLOSED:
            return
        if self.close_reason is None:
            self.close_reason = error.description
        log.info("AMQP connection from %s closed: %s: %s", self._peer, error.condition, error.description)
        self._connection.condition = _condition(error)
        self._connection.close()  # written by the _pump that follows every _process
        if self._loop is not None and self._socket is not None:
            self._loop.call_later(5.0, self.abort)

    def _remote_attach(self, link: Link) -> None:
        if not link.state & Endpoint.LOCAL_UNINIT or self._connection.state & Endpoint.LOCAL_CLOSED:
            return
        self._held.add(link)
        if len(self._held) > 2 * self.limits.max_links:
            # refused links the peer never detaches (or attaches on a handle in use) piled up without bound: 10,000
            # held 29 MB and wrote 10,000 log lines on one connection
            self._protocol_close(AmqpError(RESOURCE_LIMIT, f"more than {2 * self.limits.max_links} links attached and "
                                                           f"not detached (at most {self.limits.max_links} are served)"))
            return
        if len(self._links) >= self.limits.max_links:
            self._refuse(link, AmqpError(RESOURCE_LIMIT, f"at most {self.limits.max_links} links per connection"))
            return
        if self._busy or not self._work.empty():
            self._work.put_nowait(("attach", link))
        else:
            self._run_attach(link)

    def _refuse(self, link: Link, error: AmqpError) -> None:
        """Attach with a null terminus then detach with ``error`` (AMQP 1.0 part 2.6.3)."""
        if link.state & Endpoint.LOCAL_UNINIT:
            link.open()
        self._close_link(link, error)

    def _close_link(self, link: Link, error: AmqpError | None) -> None:
        gone = self._links.pop(link, None)
        if gone is not None:
            gone._ended()
        if link.state & Endpoint.LOCAL_CLOSED:
            return
        if error is not None:
            link.condition = _condition(error)
        link.close()

    def _accept_attach(self, wrapped: AmqpLink) -> None:
        link = wrapped._link
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        link.snd_settle_mode = link.remote_snd_settle_mode
        link.rcv_settle_mode = Link.RCV_FIRST
        if link.is_receiver:
            link.max_message_size = self.limits.max_message_size
        link.open()
        if link.is_receiver:
            link.flow(self.limits.link_credit)
        self._links[link] = wrapped

    def _delivery(self, delivery: Delivery) -> None:
        link = delivery.link
        wrapped = self._links.get(link)
        if link.is_sender:
            if wrapped is not None and delivery in wrapped._unsettled:  # one of ours, not settled here yet
                if delivery.updated or delivery.settled:  # the peer set its outcome or settled: done with it
                    callback = wrapped._unsettled.pop(delivery)
                    outcome = delivery.remote_state or 0
                    delivery.settle()
                    if callback is not None:
                        _tell(callback, outcome)
            elif delivery.updated and not delivery.settled:
                delivery.settle()  # the link is gone: we are done with it
            return
        if wrapped is None or link.state & Endpoint.LOCAL_CLOSED:
            delivery.settle()
            return
        if delivery.aborted:  # the sender gave it up (recv would fail): drop it, give its credit back
            delivery.settle()
            link.flow(1)
            return
        if link.credit <= 0 and delivery == link.current:  # a transfer past our credit (proton takes it: each would
            # queue a handler call); credit is spent at advance, so the one arriving delivery sees at least 1
            self._close_link(link, AmqpError(TRANSFER_LIMIT_EXCEEDED, f"more than the {self.limits.link_credit} "
                                                                       "deliveries of link credit in flight"))
            delivery.settle()
            return
        if delivery.pending > self.limits.max_message_size:
            self._close_link(link, AmqpError(MESSAGE_SIZE_EXCEEDED,
                                             f"message larger than {self.limits.max_message_size} bytes"))
            return
        if not delivery.readable or delivery.partial:
            return  # more transfer frames to come
        data = link.recv(delivery.pending)
        link.advance()
        message = Message()
        try:
            message.decode(data or b"")
            _check_decoded(message)
            _check_sections(bytes(data or b""), message)
        except Exception as exc:  # noqa: BLE001 - proton raises its own MessageException and others
            self._settle(delivery, AmqpError(DECODE_ERROR, f"message does not decode: {exc}"))
            link.flow(1)
            return
        self._work.put_nowait(("message", (wrapped, delivery, message)))

    def _settle(self, delivery: Delivery, error: AmqpError | None) -> None:
        # ``settled`` is the peer's: a pre-settled delivery gets no outcome, but proton keeps every delivery (and its
        # buffer, the message's size) until it is settled here too: 2,000 pre-settled 50 KB messages held 110 MB
        if not delivery.settled and not delivery.remote_state and not delivery.link.state & Endpoint.LOCAL_CLOSED:
            if error is None:
                delivery.update(Delivery.ACCEPTED)
            else:
                delivery.local.condition = _condition(error)
                delivery.update(Delivery.REJECTED)
        delivery.settle()

    def _drain(self, link: AmqpLink) -> None:
        """Send queued messages of an outgoing link while the peer gives credit."""
        sender = link._link
        while link._outbox and sender.credit > 0 and link.open:
            data, tag, callback = link._outbox.popleft()
            tag = tag or str(next(self._tags)).encode()
            delivery = sender.delivery(tag)
            sender.send(data)
            sender.advance()
            if sender.snd_settle_mode == Link.SND_SETTLED:
                delivery.settle()
                if callback is not None:
                    _tell(callback, Delivery.ACCEPTED)
            else:
                link._unsettled[delivery] = callback

    # --- handler calls, one at a time ------------------------------------------------------------

    async def _work_loop(self) -> None:
        assert self._handler is not None
        while True:
            kind, item = await self._work.get()
            self._busy = True
            try:
                if kind == "attach":
                    self._run_attach(item)
                elif kind == "sasl":
                    await self._run_sasl(item)
                else:
                    await self._run_message(*item)
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad call closes this connection, not the server (logged with its traceback)
                log.exception("AMQP handler failed; closing the connection from %s", self._peer)
                self.close(AmqpError(INTERNAL_ERROR, "internal error"))
                return
            finally:
                self._busy = False
            self._process()
            self._pump()

    def _schedule_drain(self, link: AmqpLink) -> None:
        if self._loop is not None and not self._gone:
            self._loop.call_soon(self._drain_and_pump, link)

    def _drain_and_pump(self, link: AmqpLink) -> None:
        if not self._gone:
            self._drain(link)
            self._pump()

    def _sasl_refused(self) -> None:
        """The outcome (if any) is written: close without AMQP."""
        assert self._socket is not None and self._sasl is not None
        self.close_reason = "SASL refused"
        log.info("AMQP connection from %s: SASL refused (mechanism %r)", self._peer, self._sasl.mechanism)
        self._socket.close()
        self._sasl = None
        self._sasl_held = None
        self._gone_input = True

    async def _run_sasl(self, credentials: PlainCredentials) -> None:
        """Ask the handler about a PLAIN credential, send the outcome, then let the held bytes through."""
        assert self._handler is not None
        try:
            outcome = await self._handler.sasl_plain(credentials)
        except Exception:  # a refusal, not a broken server (logged with its traceback, which holds no password)
            log.exception("AMQP SASL PLAIN check failed for %s", self._peer)
            outcome = SASL_SYS_TEMP
        if self._gone or self._socket is None or self._sasl is None:
            return
        self._socket.write(sasl_outcome(outcome))
        if outcome != SASL_OK:
            self._sasl_refused()
            return
        held, self._sasl, self._sasl_held = bytes(self._sasl_held or b""), None, None
        if held:
            self.data_received(held)

    def _run_attach(self, link: Link) -> None:
        if self._gone or link.state & Endpoint.REMOTE_CLOSED:
            return
        assert self._handler is not None
        try:
            wrapped = AmqpLink(self, link)
        except UnicodeDecodeError:  # proton decodes the name and addresses only when read
            log.info("AMQP link from %s refused: its name or address is not UTF-8", self._peer)
            self._refuse(link, AmqpError(DECODE_ERROR, "the link name or address is not valid UTF-8"))
            return
        error = self._handler.attach(wrapped)
        if self._gone or link.state & Endpoint.REMOTE_CLOSED:
            return
        if error is not None:
            log.info("AMQP link %s on %s from %s refused: %s", shown(wrapped.name), shown(wrapped.address), self._peer,
                     error.condition)
            self._refuse(link, error)
        else:
            self._accept_attach(wrapped)
            self._drain(wrapped)

    async def _run_message(self, link: AmqpLink, delivery: Delivery, message: Message) -> None:
        assert self._handler is not None
        if self._gone or not link.open:
            return
        error = await self._handler.message(link, message)
        if self._gone:
            return
        self._settle(delivery, error)
        if link.open:
            link._link.flow(1)

    # --- output, timers, closing -----------------------------------------------------------------

    def _pump(self) -> None:
        """Write proton's output to the socket, re-arm the idle timer; close the socket at EOS."""
        if self._gone or self._socket is None or self._sasl is not None or self._gone_input:
            return  # proton has no say before SASL is done, nor after it failed
        if self._loop is not None:
            try:
                deadline = self._transport.tick(self._loop.time())
            except _TransportException:
                deadline = 0.0
            self._process()
            self._arm_tick(deadline)
        chunks: list[bytes] = []
        while True:
            try:
                pending = self._transport.pending()
            except _TransportException:
                pending = -1
            if pending > 0:
                chunk = self._transport.peek(pending)
                self._transport.pop(pending)
                if chunk:
                    chunks.append(chunk)
                continue
            break
        if chunks:
            self._socket.write(b"".join(chunks))
        if pending < 0:  # proton wrote its last frame (close or error): done with this socket
            self._socket.close()

    def _arm_tick(self, deadline: float) -> None:
        if self._tick_timer is not None:
            self._tick_timer.cancel()
            self._tick_timer = None
        if deadline and self._loop is not None:
            self._tick_timer = self._loop.call_at(deadline, self._on_tick)

    def _on_tick(self) -> None:
        self._tick_timer = None
        self._pump()  # proton sends heartbeats, or closes with resource-limit-exceeded after the idle timeout

    def _on_open_timeout(self) -> None:
        self._open_timer = None
        if not self._opened and not self._gone:
            log.info("AMQP connection from %s did not finish SASL and open within %g s", self._peer,
                     self.limits.open_timeout)
            self.close_reason = "no AMQP open in time"
            self.abort()

    def _fail(self, reason: str) -> None:
        log.info("AMQP connection from %s: %s", self._peer, reason)
        self.close_reason = reason
        self.abort()
