"""asyncio MQTT 3.1.1 session server: the connection/session layer the DPS and hub front ends plug into.

Why hand-written: no maintained library fits. amqtt refuses client publishes to ``$`` topics since
0.11.2 (Azure devices publish to ``$dps/...`` and ``$iothub/...``) and needs private APIs to answer a
single session; mqttproto and mqtt5 are MQTT 5 only, while the Azure SDKs speak 3.1.1. An IoT hub
is not a broker either: the application answers each session itself (a DPS response, a twin
document, a C2D message), so the core only runs sessions and hands packets to a per-session
:class:`SessionHandler`; there is no routing between clients and no retained-message store.

Transport-agnostic: :meth:`MqttServer.protocol_factory` serves any asyncio stream transport (plain
TCP, or :func:`opendps.transport.tls.start_tls_server`, whose transport exposes the client's
certificate chain as ``get_extra_info("peer_certificate_chain")``), and
:meth:`MqttServer.serve_websocket` adapts an aiohttp WebSocket (MQTT over WebSockets, binary frames).

Behaviour and the decisions behind it:

* The first packet must be CONNECT, within ``connect_timeout``; a second CONNECT is a protocol
  violation (enforced here, not in the stateless codec). Protocol level != 4 gets CONNACK 1, an
  empty client id with clean session 0 gets CONNACK 2 (with clean session 1 a unique id is
  assigned), then the application's authenticator decides: CONNACK 1..5 or a handler.
* One live session per client id: a new CONNECT takes over (the old connection is dropped and its
  ``on_disconnected`` runs with reason ``"taken over"`` before the new session's CONNACK).
* Inbound packets of a session are handled strictly in order by one task per connection, so a slow
  handler delays only its own session. PUBACKs from the client bypass that queue (a handler may
  be waiting for an in-flight slot that only a PUBACK frees).
* PUBACK for a QoS 1 PUBLISH is sent after ``on_publish`` returned. If the handler raises, the
  message is *not* acknowledged and the connection is closed: acknowledging would turn a server
  failure into silent message loss, while a closed connection makes the client redeliver (QoS 1 is
  at-least-once anyway). :class:`MqttRefused` is the deliberate form (one INFO line, no traceback);
  :class:`SessionClosed` escaping a handler (the client left while it was answered) is routine and
  only logged at DEBUG; any other exception is a bug (ERROR with traceback). IoT Hub likewise
  disconnects on a publish it will not take. QoS 2 PUBLISH closes the connection (IoT Hub behaviour).
* When the client ends the connection, PUBLISH packets it sent before are still handed to
  ``on_publish`` (a QoS 0 message followed by DISCONNECT must not be lost); when the server ends
  it, queued input is dropped.
* UNSUBSCRIBE removes the filters from the session and tells the handler (``on_unsubscribe``, optional)
  before the UNSUBACK. A PUBACK with packet id 0 (the C# DPS client acknowledges every message it gets,
  QoS 0 ones with id 0) acknowledges nothing: ignored, logged at DEBUG, not a protocol error.
* Wills are decoded and ignored: IoT Hub does not publish wills, and a hub has no other subscribers.
* Persistent sessions (clean session 0) keep their subscriptions and unacknowledged outbound QoS 1
  messages in memory for ``session_expiry`` seconds; a reconnect gets ``session_present=1`` and the
  messages again (DUP=1, same packet ids) before anything new. State does not survive a restart.
* Protocol violations close only that connection and log one INFO line on ``opendps.mqtt`` naming
  the peer, the client id and the problem (never a password or payload).
* Flow control both ways: :meth:`Session.publish` waits while the transport's write buffer is above
  ``write_high_water`` (``pause_writing``/``resume_writing``) and while ``max_inflight`` QoS 1
  messages are unacknowledged; reading from a client pauses while its unhandled input exceeds a
  bound, and the session handler is not fed while the client is not reading our answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from opendps.logs import LineBudget
from opendps.transport import format_peer, shown

from .codec import (
    CONNACK_IDENTIFIER_REJECTED,
    CONNACK_NOT_AUTHORIZED,
    CONNACK_SERVER_UNAVAILABLE,
    CONNACK_UNACCEPTABLE_PROTOCOL_VERSION,
    SUBACK_FAILURE,
    Connack,
    Connect,
    Decoder,
    Disconnect,
    MqttProtocolError,
    Packet,
    Pingreq,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
    encode,
)

if TYPE_CHECKING:
    from OpenSSL import SSL

__all__ = [
    "Authenticator",
    "ConnectRequest",
    "MqttRefused",
    "MqttServer",
    "Session",
    "SessionClosed",
    "SessionHandler",
]

log = logging.getLogger("opendps.mqtt")
# a peer's connections cost it next to nothing after the handshake: lines about single ones are budgeted
CONNECTION_LINES = "single MQTT connections (refused, closed, taken over)"
_connection_line = LineBudget(log, CONNECTION_LINES, per_minute=300)

_TAKEOVER_WAIT = 5.0  # how long a new connection waits for the old one's on_disconnected
_CLOSE_FLUSH_TIMEOUT = 5.0  # graceful close: abort if the peer does not take our last bytes
_PACKET_COST = 64  # bookkeeping estimate per queued packet (bounds floods of tiny packets)
_PINGRESP = b"\xd0\x00"
_PIPELINE_DEPTH = 32  # PUBLISHes of one connection begun and not yet accepted (PipeliningHandler), at most
_CONNACK_NAMES = {1: "unacceptable protocol version", 2: "identifier rejected", 3: "server unavailable",
                  4: "bad user name or password", 5: "not authorized"}


class SessionClosed(Exception):
    """The session's connection is gone (or going); nothing more can be sent on it."""


class MqttRefused(Exception):
    """Raised by a handler to refuse a client's packet: the server logs one line and closes the connection."""


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """What the application sees to authenticate a CONNECT (credentials as sent, TLS chain as presented)."""

    client_id: str  # as sent; may be "" with clean_session (the session then gets an assigned id)
    username: str | None
    password: bytes | None = field(repr=False)
    clean_session: bool
    keepalive: int
    peer_certificate_chain: list = field(repr=False)  # cryptography certificates, leaf first; [] if none
    peername: Any


class SessionHandler(Protocol):
    """The application's per-session callbacks; all run on the server's event loop.

    Optional attributes: ``session_key`` (str) keys the session instead of the client id, so that two
    applications on one listener (DPS and a hub) can see the same client id without taking each other
    over; ``persistent = False`` treats every connection as clean (the application keeps its own state);
    ``kept_subscriptions`` (a mapping of filter to QoS, with ``persistent = False``): the subscriptions the
    application kept for this client from an earlier session, restored with ``session_present=1`` when the CONNECT
    asks for clean session 0 (the application keeps them where another process or node can read them);
    ``max_keepalive`` (seconds) bounds the client's keepalive, 0 ("none") included;
    ``async on_unsubscribe(session, topic_filter)`` hears of each filter of an UNSUBSCRIBE once it left
    ``session.subscriptions`` (also one that was not subscribed), before the UNSUBACK, so that an application
    which decides by its own record of subscriptions stops sending.
    """

    async def on_connected(self, session: Session) -> None:
        """After CONNACK (and any redelivery) was written; the session's packets wait until it returns."""

    async def on_subscribe(self, session: Session, topic_filter: str, qos: int) -> int:
        """Granted QoS (0 or 1; ``qos`` is already capped at 1) or 0x80 to refuse this filter."""

    async def on_publish(self, session: Session, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """A client PUBLISH (QoS 0/1); PUBACK follows its return.

        If it raises, there is no PUBACK and the connection is closed (the client redelivers on its
        next connection): MqttRefused for a deliberate refusal, anything else counts as a bug.
        """

    async def on_disconnected(self, session: Session, reason: str) -> None:
        """The last call for a session; ``reason`` e.g. "client disconnected", "connection lost", "taken over"."""


class PipeliningHandler(SessionHandler, Protocol):
    """A handler that can accept a PUBLISH without being awaited (optional; the hub's sessions do for telemetry).

    ``begin_publish`` returns a future that is done once the message is accepted (stored): the core then goes on to the
    connection's next PUBLISH at once, and writes the PUBACKs in order as their futures finish — those that finish
    together in one write (one TLS record, one send). A failed future closes the connection without PUBACK for it
    and for every later PUBLISH (``MqttRefused``: a deliberate refusal; anything else is logged). Returning None
    hands that PUBLISH to ``on_publish`` instead, after the PUBLISHes begun before it are accepted; so does any
    packet other than a PUBLISH: a device's effects stay in the order it sent them.
    """

    def begin_publish(self, session: Session, topic: str, payload: bytes, qos: int,
                      retain: bool) -> asyncio.Future[Any] | None:
        """A future done when the PUBLISH is accepted, or None to have ``on_publish`` handle it. Several PUBLISHes may
        share one future (accepted together); the core never cancels it."""


Authenticator = Callable[[ConnectRequest], Awaitable[SessionHandler | int]]
"""Returns the session's handler, or a CONNACK return code 1..5 to refuse the connection."""


@dataclass(slots=True)
class _Outbound:
    """An unacknowledged outbound QoS 1 message: its encoded PUBLISH (DUP=0) and the ack callback."""

    data: bytes
    on_ack: Callable[[], Any] | None


@dataclass(slots=True)
class _StoredSession:
    """State of a disconnected clean-session-0 client, kept until it reconnects or expires."""

    subscriptions: dict[str, int]
    inflight: dict[int, _Outbound]
    timer: asyncio.TimerHandle | None = None


def _cost(packet: Packet) -> int:
    """What a queued packet holds, for the input bounds. A SUBSCRIBE or UNSUBSCRIBE counts each of its filters: one of
    256 KiB decodes to ~40,000 objects (~4 MB); at a flat cost, thousands queued behind a busy session (gigabytes)."""
    if type(packet) is Publish:
        return _PACKET_COST + len(packet.payload) + len(packet.topic)
    if type(packet) is Subscribe:
        return _PACKET_COST * (1 + len(packet.topics)) + sum(len(f) for f, _ in packet.topics)
    if type(packet) is Unsubscribe:
        return _PACKET_COST * (1 + len(packet.topics)) + sum(len(f) for f in packet.topics)
    return _PACKET_COST


class Session:
    """One live client connection as handed to the application; a reconnect makes a new Session.

    ``request`` is the CONNECT without its credentials: the user name, the password and the certificate chain
    are the authenticator's to read, and are not kept for the session's life."""

    __slots__ = ("client_id", "request", "subscriptions", "_conn")

    def __init__(self, conn: _Connection, client_id: str, request: ConnectRequest) -> None:
        self.client_id = client_id
        self.request = request
        self.subscriptions: dict[str, int] = {}  # topic filter -> granted QoS
        self._conn = conn

    def __repr__(self) -> str:
        return f"<Session {self.client_id!r} {self._conn._peer}{' closed' if self.closed else ''}>"

    async def publish(self, topic: str, payload: bytes, qos: int = 0, *, on_ack: Callable[[], Any] | None = None) -> None:
        """Send a PUBLISH (QoS 0 or 1) to the client; returns once it is handed to the transport.

        Waits while the transport's buffer is above the high-water mark and, for QoS 1, while
        ``max_inflight`` messages are unacknowledged; publishes of one session go out in call order.
        ``on_ack`` (plain or async callable, QoS 1 only) runs when the client's PUBACK arrives, also
        if that happens on a later connection of a persistent session. Raises SessionClosed if the
        connection is gone, ValueError for an invalid topic or QoS.
        """
        await self._conn._publish(topic, payload, qos, on_ack)

    def close(self, reason: str) -> None:
        """Drop the connection now (e.g. the device was disabled); logs one line; idempotent."""
        self._conn._close_by_application(reason)

    @property
    def closed(self) -> bool:
        return self._conn._close_reason is not None

    @property
    def inflight(self) -> int:
        """Outbound QoS 1 messages sent and not yet acknowledged."""
        return len(self._conn._inflight)

    @property
    def write_buffer_size(self) -> int:
        """Bytes queued in the transport (for metrics and tests of backpressure)."""
        return self._conn._write_buffer_size()


class _Connection(asyncio.Protocol):
    """One client connection: decoding, the ordered packet queue, timers, session state."""

    # thousands live at once (one per connection): no per-object __dict__
    __slots__ = (
        "__weakref__",
        "_server", "_loop", "_transport", "_peername", "_decoder", "_queue", "_queued_bytes",
        "_task", "_context", "_connect_timer", "_keepalive_timer", "_close_timer", "_last_rx", "_keepalive", "_connect_seen",
        "_disconnect_seen", "_client_id", "_key", "_session", "_handler", "_clean", "_open", "_inflight",
        "_next_pid", "_publish_lock", "_slot_waiter", "_drain_waiters", "_write_paused", "_reading_paused",
        "_close_reason", "_peer_closed", "_lost", "_finished", "_closed_waiter", "_gone_waiter", "_begin", "_pipeline"
    )

    def __init__(self, server: MqttServer) -> None:
        self._server = server
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set in connection_made
        self._transport: asyncio.Transport | None = None
        self._peername: Any = None
        self._decoder = Decoder(server.max_packet_size)
        # packets decoded and not yet handled; None while there are none (an empty deque still holds a 64-slot block:
        # ~0.6 KB per idle connection)
        self._queue: deque[tuple[Packet, int]] | None = None
        self._queued_bytes = 0
        # the consumer of the queue: runs while packets wait or the connection ends, absent while the connection is
        # idle (an idle device holds no task, coroutine or future: ~1 KB each of thousands; see _wake)
        self._task: asyncio.Task[None] | None = None
        # the context every consumer and keepalive check of this connection runs in: what the handler set at CONNECT
        # (the connection's request id for its log lines) holds for the connection's life, as it did in one
        # long-lived task; entered by one of them at a time (the loop runs one callback or task step at once)
        self._context: contextvars.Context | None = None
        self._connect_timer: asyncio.TimerHandle | None = None
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._last_rx = 0.0
        self._keepalive = 0
        self._connect_seen = False
        self._disconnect_seen = False
        self._client_id: str | None = None
        self._key: str | None = None  # the session key: the handler's ``session_key``, else the client id
        self._session: Session | None = None
        self._handler: SessionHandler | None = None
        self._clean = True
        self._open = False  # CONNACK 0 written: the session exists (stays True after it ended)
        self._inflight: dict[int, _Outbound] = {}
        self._next_pid = 1
        self._publish_lock: asyncio.Lock | None = None  # made by the first publish to the client
        self._slot_waiter: asyncio.Future[None] | None = None
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._write_paused = False
        self._reading_paused = False
        self._close_reason: str | None = None
        self._peer_closed = False  # the client ended the connection (vs. the server deciding to)
        self._lost = False  # the transport is gone
        self._finished = False  # on_disconnected ran: the connection is over
        # futures for those two states, made only when someone waits (takeover, shutdown, WebSocket route)
        self._closed_waiter: asyncio.Future[None] | None = None
        self._gone_waiter: asyncio.Future[None] | None = None
        # the handler's begin_publish (PipeliningHandler), and the PUBLISHes begun with it and not yet acknowledged,
        # in order: (packet id, or None for QoS 0; the handler's future; the topic); None while there are none
        self._begin: Callable[[Session, str, bytes, int, bool], asyncio.Future[Any] | None] | None = None
        self._pipeline: deque[tuple[int | None, asyncio.Future[Any], str]] | None = None

    @property
    def _peer(self) -> str:
        """The client's address for log lines (formatted when one is written, not kept per connection)."""
        return format_peer(self._peername) if self._peername is not None else "unknown peer"

    def wait_closed(self) -> asyncio.Future[None]:
        """Done once the connection is over (``on_disconnected`` ran)."""
        self._closed_waiter = self._closed_waiter or self._waiter(self._finished)
        return self._closed_waiter

    def wait_gone(self) -> asyncio.Future[None]:
        """Done once the transport is gone."""
        self._gone_waiter = self._gone_waiter or self._waiter(self._lost)
        return self._gone_waiter

    def _waiter(self, done: bool) -> asyncio.Future[None]:
        waiter = self._loop.create_future()
        if done:
            waiter.set_result(None)
        return waiter

    @staticmethod
    def _settle(waiter: asyncio.Future[None] | None) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- transport callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._loop = loop = asyncio.get_running_loop()
        self._transport = transport
        self._peername = transport.get_extra_info("peername")
        server = self._server
        if server._closing:
            self._close_reason = "server shutdown"
            self._finished = True
            transport.abort()
            return
        with contextlib.suppress(NotImplementedError, AttributeError):
            transport.set_write_buffer_limits(high=server.write_high_water)
        server._connections.add(self)
        self._connect_timer = loop.call_later(server.connect_timeout, self._on_connect_timeout)

    def data_received(self, data: bytes) -> None:
        if self._close_reason is not None or self._disconnect_seen:
            return  # nothing after DISCONNECT counts (not even garbage)
        error: MqttProtocolError | None = None
        try:
            packets = self._decoder.feed(data)
        except MqttProtocolError as exc:
            packets, error = exc.packets, exc
        if packets:
            self._last_rx = self._loop.time()
        for packet in packets:
            if self._close_reason is not None or self._disconnect_seen:
                break
            kind = type(packet)
            if not self._connect_seen:
                if kind is not Connect:
                    self._fail(f"first packet is {kind.__name__.upper()}, not CONNECT")
                    return
                self._connect_seen = True
                if self._connect_timer is not None:
                    self._connect_timer.cancel()
                    self._connect_timer = None
            elif kind is Puback:
                self._on_puback(packet.packet_id)  # type: ignore[union-attr]
                continue
            elif kind is Connect:
                self._fail("second CONNECT on one connection")
                return
            elif kind not in (Publish, Subscribe, Unsubscribe, Pingreq, Disconnect):
                self._fail(f"{kind.__name__.upper()} is not a packet a client may send here")
                return
            elif kind is Disconnect:
                self._disconnect_seen = True
            elif kind is Publish and self._task is None and self._queue is None and self._begin_inline(packet):  # type: ignore[arg-type]
                continue
            cost = _cost(packet)
            if self._queue is None:
                self._queue = deque()
            self._queue.append((packet, cost))
            self._queued_bytes += cost
        self._after_input(error)

    def _after_input(self, error: MqttProtocolError | None) -> None:
        """End of one ``data_received``: fail on a decoding error or too much input, else wake the reader."""
        if error is not None and not self._disconnect_seen:
            self._fail(str(error))  # what came after a DISCONNECT does not count
        if self._close_reason is not None:
            return
        if self._queued_bytes > self._server._input_hard_limit:
            self._fail(f"more than {self._server._input_hard_limit} bytes of input waiting to be handled")
            return
        self._update_reading()
        if self._queue is not None:
            self._wake()

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        if self._close_reason is None:
            self._peer_closed = True
            if self._disconnect_seen:
                self._close_reason = "client disconnected"
            else:
                self._close_reason = "connection lost" + (f": {exc}" if exc else "")
            log.debug("MQTT connection from %s%s ended: %s", self._peer, self._who(), self._close_reason)
            self._end()
        self._settle(self._gone_waiter)
        self._wake()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._release_drain_waiters()

    # --- input ---------------------------------------------------------------------------------

    def _wake(self) -> None:
        """Input waits or the connection ends: start the consumer unless it runs (it takes all that waits, in order,
        and ends when nothing does, so one runs at a time; the one that sees the end finishes the connection)."""
        if self._task is None and not self._finished:
            if self._context is None:
                self._context = contextvars.copy_context()
            # one consumer at a time, so the context is never entered twice at once
            self._task = self._loop.create_task(self._run(), context=self._context)

    def _update_reading(self) -> None:
        """Pause reading while too much input waits, except when a publish waits for a PUBACK."""
        transport = self._transport
        if transport is None or self._lost or self._close_reason is not None:
            return
        limit = self._server._input_high_water
        if not self._reading_paused:
            if self._queued_bytes > limit and self._slot_waiter is None:
                self._reading_paused = True
                transport.pause_reading()
        elif self._queued_bytes <= limit // 4 or self._slot_waiter is not None:
            self._reading_paused = False
            self._last_rx = max(self._last_rx, self._loop.time())  # we were deaf, not the client silent
            transport.resume_reading()

    def _next_packet(self) -> Packet | None:
        """The next packet to handle; None when none waits (then the connection is idle, or ending if closed)."""
        while True:
            if self._close_reason is not None and not self._peer_closed:
                return None
            if self._queue:
                packet, cost = self._queue.popleft()
                if not self._queue:
                    self._queue = None
                self._queued_bytes -= cost
                if self._close_reason is not None:
                    # The client went away: still deliver what it published while the session was up.
                    if self._open and type(packet) is Publish:
                        return packet
                    continue
                self._update_reading()
                return packet
            return None

    async def _run(self) -> None:
        """The consumer (see :meth:`_wake`): handles the waiting packets in order; finishes an ended connection."""
        try:
            while (packet := self._next_packet()) is not None:
                if type(packet) is Publish and self._begin is not None:
                    if len(self._pipeline or ()) >= _PIPELINE_DEPTH:
                        await self._accepted(_PIPELINE_DEPTH - 1)  # room for one more
                    if self._began(packet):  # type: ignore[arg-type]
                        continue
                if self._pipeline:
                    await self._accepted(0)  # what the device sent before this packet takes effect first
                await self._dispatch(packet)
            if self._close_reason is None:
                self._task = None  # idle: the next input starts another (nothing runs between this and the return)
                return
        except asyncio.CancelledError:
            self._terminate("cancelled", abort=True)
            await self._finish()
            raise
        except Exception:
            log.exception("MQTT connection from %s%s: internal error", self._peer, self._who())
            self._terminate("internal error", abort=True)
        await self._finish()

    # --- pipelined PUBLISHes (PipeliningHandler) -----------------------------------------------

    def _began(self, publish: Publish) -> bool:
        """Offer a PUBLISH to the handler's ``begin_publish``: True if it took it (its PUBACK follows its future)."""
        if publish.qos == 2 or self._write_paused or self._close_reason is not None:
            return False  # _dispatch refuses QoS 2, waits for a client that does not read, or skips
        assert self._begin is not None and self._session is not None
        future = self._begin(self._session, publish.topic, publish.payload, publish.qos, publish.retain)
        if future is None:
            return False
        pipeline = self._pipeline
        if pipeline is None:
            pipeline = self._pipeline = deque()
        watched = bool(pipeline) and pipeline[-1][1] is future  # one future for several PUBLISHes: one callback
        pipeline.append((publish.packet_id if publish.qos == 1 else None, future, publish.topic))
        if not watched:
            future.add_done_callback(self._pipeline_step, context=self._context)  # the connection's (its request id)
        return True

    def _begin_inline(self, publish: Publish) -> bool:
        """A PUBLISH arriving while nothing of the connection waits or runs: begun here, without a consumer task.

        Why: a device with a few messages in flight sends them one TLS record at a time, so each arrived alone and
        cost a task (created, scheduled, stepped, finished) only to be handed to ``begin_publish``. Order holds: the
        consumer is absent and the queue empty, so nothing sent before it is unhandled; what comes after it waits in
        the queue, and the consumer lets this one take effect first (``_accepted``). The connection's context is
        entered as the consumer would enter it (nothing else holds it while no consumer exists)."""
        context = self._context
        if (self._begin is None or self._session is None or context is None
                or len(self._pipeline or ()) >= _PIPELINE_DEPTH):
            return False
        try:
            return context.run(self._began, publish)
        except Exception:
            log.exception("MQTT connection from %s%s: internal error", self._peer, self._who())
            self._terminate("internal error", abort=True)
            self._wake()  # the consumer finishes the connection
            return True

    def _pipeline_step(self, done: asyncio.Future[Any]) -> None:
        """A begun PUBLISH was accepted or failed: acknowledge, in order, every accepted one at the head, in one write."""
        if not done.cancelled():
            done.exception()  # seen here, also when an earlier failure already emptied the pipeline (no "never retrieved")
        pipeline = self._pipeline
        acks: list[bytes] = []
        while pipeline and pipeline[0][1].done():
            packet_id, future, topic = pipeline.popleft()
            problem = future.exception() if not future.cancelled() else asyncio.CancelledError()
            if problem is not None:
                pipeline.clear()  # no PUBACK for this one or any later one: the client sends them again
                if acks:
                    self._write(b"".join(acks))
                    acks = []
                if isinstance(problem, MqttRefused):
                    self._close_with_line(f"PUBLISH to {shown(topic)} refused: {problem}")
                elif self._close_reason is None:
                    _connection_line(logging.WARNING,
                                     "MQTT PUBLISH of client %s to %s not accepted (%s: %s); closing without PUBACK",
                                     shown(self._client_id or ""), shown(topic), type(problem).__name__, problem)
                    self._terminate("publish not accepted", abort=False)
                break
            if packet_id is not None:
                acks.append(b"\x40\x02" + packet_id.to_bytes(2, "big"))
        if acks:
            self._write(acks[0] if len(acks) == 1 else b"".join(acks))
        if not pipeline:
            self._pipeline = None

    async def _accepted(self, leave: int) -> None:
        """Wait until at most ``leave`` begun PUBLISHes are not yet accepted (acknowledged or failed)."""
        while self._pipeline is not None and len(self._pipeline) > leave:
            # our done callback was added first, so it has run (and acknowledged) when this wait returns
            await asyncio.wait((self._pipeline[0][1],))

    async def _dispatch(self, packet: Packet) -> None:
        kind = type(packet)
        if kind is Connect:
            await self._handle_connect(packet)  # type: ignore[arg-type]
            return
        if self._write_paused:
            await self._drain()  # do not produce answers for a client that does not read them
        if kind is Publish:
            await self._handle_publish(packet)  # type: ignore[arg-type]
        elif kind is Subscribe:
            await self._handle_subscribe(packet)  # type: ignore[arg-type]
        elif kind is Unsubscribe:
            await self._handle_unsubscribe(packet)  # type: ignore[arg-type]
        elif kind is Pingreq:
            self._write(_PINGRESP)
        elif kind is Disconnect:
            log.debug("MQTT client %s from %s disconnected", shown(self._client_id or ""), self._peer)
            self._terminate("client disconnected", abort=False)

    # --- CONNECT -------------------------------------------------------------------------------

    async def _handle_connect(self, connect: Connect) -> None:
        server = self._server
        if connect.protocol_level != 4:
            self._refuse(CONNACK_UNACCEPTABLE_PROTOCOL_VERSION, f"protocol level {connect.protocol_level}")
            return
        client_id = connect.client_id
        if not client_id:
            if not connect.clean_session:
                self._refuse(CONNACK_IDENTIFIER_REJECTED, "empty client id with clean session 0")
                return
            client_id = f"auto-{secrets.token_hex(8)}"
        self._client_id = client_id
        transport = self._transport
        assert transport is not None
        request = ConnectRequest(
            client_id=connect.client_id,
            username=connect.username,
            password=connect.password,
            clean_session=connect.clean_session,
            keepalive=connect.keepalive,
            peer_certificate_chain=list(transport.get_extra_info("peer_certificate_chain") or []),
            peername=self._peername,
        )
        try:
            result = await server._authenticate(request)
        except Exception:
            log.exception("MQTT authenticator failed for client %s from %s", shown(client_id), self._peer)
            self._refuse(CONNACK_SERVER_UNAVAILABLE, "authenticator failed")
            return
        if self._close_reason is not None:
            return
        handler = self._handler_or_refuse(result, client_id)
        if handler is None:
            return
        self._handler = handler
        self._begin = getattr(handler, "begin_publish", None)
        # A handler may key its sessions apart from others that share the client id (DPS and a hub do)
        # and may opt out of MQTT-level persistence when it keeps its own state (``persistent = False``).
        key = getattr(handler, "session_key", None) or client_id
        self._key = key
        self._clean = connect.clean_session or not getattr(handler, "persistent", True)
        # a handler may bound the keepalive (``max_keepalive``): a client asking for none (0) or for more gets
        # the bound, so a silent connection cannot hold its descriptor forever
        bound = getattr(handler, "max_keepalive", None)
        self._keepalive = connect.keepalive if not bound else min(connect.keepalive or bound, bound)

        old = server._live.get(key)
        server._live[key] = self
        if old is not None and old is not self:
            _connection_line(logging.INFO, "MQTT client %s connected from %s; dropping its connection from %s (taken over)",
                             shown(client_id), self._peer, old._peer)
            old._terminate("taken over", abort=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(old.wait_closed()), _TAKEOVER_WAIT)
            if self._close_reason is not None:
                return

        # From here to _open nothing awaits: the CONNACK, the redelivery and the state change are atomic.
        stored = self._take_stored(key)
        # the session keeps the CONNECT's client id, flags and peer, not its credentials: no password (a SAS token)
        # in memory for the session's life, no user name (for IoT Hub: the hub, device and SDK, ~150 bytes) and no
        # parsed certificate chain per idle connection (~1.5 KB; the TLS layer still has it)
        session = Session(self, client_id, replace(request, username=None, password=None, peer_certificate_chain=[]))
        self._session = session
        kept = None if stored is not None or connect.clean_session else getattr(handler, "kept_subscriptions", None)
        self._write(encode(Connack(stored is not None or bool(kept), 0)))
        if kept:
            session.subscriptions.update(kept)
        if stored is not None:
            session.subscriptions.update(stored.subscriptions)
            for pid, out in stored.inflight.items():
                self._inflight[pid] = out
                self._write(bytes((out.data[0] | 0x08,)) + out.data[1:])  # DUP=1, same packet id
        self._open = True
        self._last_rx = self._loop.time()  # the keepalive clock starts with the session
        self._arm_keepalive()
        log.debug("MQTT client %s connected from %s (clean session %d, keepalive %d, session present %d)",
                  shown(client_id), self._peer, connect.clean_session, connect.keepalive, stored is not None)
        try:
            await handler.on_connected(session)
        except MqttRefused as exc:
            self._close_with_line(f"refused after connect: {exc}")
        except SessionClosed:
            pass
        except Exception:
            log.exception("MQTT on_connected failed for client %s", shown(client_id))
            self._terminate("on_connected failed", abort=False)

    def _take_stored(self, key: str) -> _StoredSession | None:
        """The session stored for ``key``, taken out with its expiry cancelled; None with a clean session."""
        stored = self._server._stored.pop(key, None)
        if stored is not None and stored.timer is not None:
            stored.timer.cancel()
        if self._clean:
            stored = None
        return stored

    def _handler_or_refuse(self, result: SessionHandler | int | None, client_id: str) -> SessionHandler | None:
        """The authenticator's handler, or None once the connection is refused (a CONNACK code, or wrongly None)."""
        if isinstance(result, int):
            code = result
            if not 1 <= code <= 5:
                log.error("MQTT authenticator returned CONNACK code %r for client %s; refusing with 5",
                          code, shown(client_id))
                code = CONNACK_NOT_AUTHORIZED
            self._refuse(code, "refused by the authenticator")
            return None
        if result is None:
            log.error("MQTT authenticator returned None for client %s; refusing with 3", shown(client_id))
            self._refuse(CONNACK_SERVER_UNAVAILABLE, "no handler")
            return None
        return result

    def _refuse(self, code: int, why: str) -> None:
        _connection_line(logging.INFO, "MQTT connection from %s%s refused with CONNACK %d (%s): %s",
                         self._peer, self._who(), code, _CONNACK_NAMES.get(code, "?"), why)
        self._write(encode(Connack(False, code)))
        self._terminate(f"CONNACK {code}", abort=False)

    # --- packets of an open session ------------------------------------------------------------

    async def _handle_publish(self, publish: Publish) -> None:
        if publish.qos == 2:
            self._close_with_line("QoS 2 PUBLISH is not supported")
            return
        handler, session = self._handler, self._session
        assert handler is not None and session is not None
        try:
            await handler.on_publish(session, publish.topic, publish.payload, publish.qos, publish.retain)
        except MqttRefused as exc:
            self._close_with_line(f"PUBLISH to {shown(publish.topic)} refused: {exc}")
            return
        except SessionClosed:  # the client left while we answered: routine, nothing to acknowledge
            log.debug("MQTT client %s left while its PUBLISH was handled", shown(session.client_id))
            return
        except Exception:
            log.exception("MQTT on_publish failed for client %s, topic %s; closing without PUBACK",
                          shown(session.client_id), shown(publish.topic))
            self._terminate("on_publish failed", abort=False)
            return
        if publish.qos == 1:
            assert publish.packet_id is not None
            self._write(b"\x40\x02" + publish.packet_id.to_bytes(2, "big"))

    async def _handle_subscribe(self, subscribe: Subscribe) -> None:
        handler, session = self._handler, self._session
        assert handler is not None and session is not None
        subs = session.subscriptions
        codes: list[int] = []
        for topic_filter, requested in subscribe.topics:
            qos = min(requested, 1)  # QoS 2 is granted as 1, like IoT Hub and DPS
            if topic_filter not in subs and len(subs) >= self._server.max_subscriptions:
                codes.append(SUBACK_FAILURE)
                continue
            try:
                code = await handler.on_subscribe(session, topic_filter, qos)
            except MqttRefused as exc:
                self._close_with_line(f"SUBSCRIBE to {shown(topic_filter)} refused: {exc}")
                return
            except SessionClosed:
                return
            except Exception:
                log.exception("MQTT on_subscribe failed for client %s, filter %s; refusing it",
                              shown(session.client_id), shown(topic_filter))
                code = SUBACK_FAILURE
            if code not in (0, 1, SUBACK_FAILURE):
                log.error("MQTT on_subscribe returned %r for filter %s; refusing it", code, shown(topic_filter))
                code = SUBACK_FAILURE
            if self._close_reason is not None:
                return
            if code != SUBACK_FAILURE:
                subs[topic_filter] = code
            codes.append(code)
        self._write(encode(Suback(subscribe.packet_id, codes)))

    async def _handle_unsubscribe(self, unsubscribe: Unsubscribe) -> None:
        handler, session = self._handler, self._session
        assert handler is not None and session is not None
        hook = getattr(handler, "on_unsubscribe", None)
        for topic_filter in unsubscribe.topics:
            session.subscriptions.pop(topic_filter, None)
            if hook is None:
                continue
            try:
                await hook(session, topic_filter)
            except MqttRefused as exc:
                self._close_with_line(f"UNSUBSCRIBE from {shown(topic_filter)} refused: {exc}")
                return
            except SessionClosed:
                return
            except Exception:  # the filter is gone from the session either way; a bug, not the client's fault
                log.exception("MQTT on_unsubscribe failed for client %s, filter %s",
                              shown(session.client_id), shown(topic_filter))
            if self._close_reason is not None:
                return
        self._write(encode(Unsuback(unsubscribe.packet_id)))

    def _on_puback(self, packet_id: int) -> None:
        if packet_id == 0:  # the C# DPS client acknowledges QoS 0 messages with id 0: nothing to release
            log.debug("MQTT client %s sent PUBACK with packet id 0; ignored", shown(self._client_id or ""))
            return
        out = self._inflight.pop(packet_id, None)
        if out is None:
            log.debug("MQTT client %s acknowledged unknown packet id %d", shown(self._client_id or ""), packet_id)
            return
        if self._slot_waiter is not None and not self._slot_waiter.done():
            self._slot_waiter.set_result(None)
        if out.on_ack is not None:
            self._server._call_ack(out.on_ack, self._client_id or "")

    # --- output --------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not self._lost and not transport.is_closing():
            transport.write(data)

    def _write_buffer_size(self) -> int:
        transport = self._transport
        if transport is None or self._lost:
            return 0
        return transport.get_write_buffer_size()

    def _release_drain_waiters(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def _drain(self) -> None:
        """Wait until the transport takes more data or the connection ends."""
        while self._write_paused and self._close_reason is None:
            fut = self._loop.create_future()
            self._drain_waiters.append(fut)
            await fut

    def _alloc_pid(self) -> int:
        pid = self._next_pid
        while pid in self._inflight:
            pid = pid % 0xFFFF + 1
        self._next_pid = pid % 0xFFFF + 1
        return pid

    async def _publish(self, topic: str, payload: bytes, qos: int, on_ack: Callable[[], Any] | None) -> None:
        if qos not in (0, 1):
            raise ValueError(f"publish QoS must be 0 or 1, got {qos!r}")
        if on_ack is not None and qos != 1:
            raise ValueError("on_ack needs qos=1 (QoS 0 is never acknowledged)")
        data = encode(Publish(topic, payload, qos, packet_id=1 if qos else None))  # validates topic and sizes
        if self._publish_lock is None:
            self._publish_lock = asyncio.Lock()
        async with self._publish_lock:
            if self._close_reason is not None or not self._open:
                raise SessionClosed(f"session {self._client_id!r} is closed")
            while qos and len(self._inflight) >= self._server.max_inflight and self._close_reason is None:
                self._slot_waiter = self._loop.create_future()
                self._update_reading()  # PUBACKs must get through even if the input queue is full
                try:
                    await self._slot_waiter
                finally:
                    self._slot_waiter = None
                    self._update_reading()
            await self._drain()
            if self._close_reason is not None:
                raise SessionClosed(f"session {self._client_id!r} closed: {self._close_reason}")
            if qos:
                pid = self._alloc_pid()
                data = encode(Publish(topic, payload, 1, packet_id=pid))
                self._inflight[pid] = _Outbound(data, on_ack)
            self._write(data)

    # --- timers --------------------------------------------------------------------------------

    def _on_connect_timeout(self) -> None:
        self._connect_timer = None
        if self._close_reason is None and not self._connect_seen:
            log.info("MQTT connection from %s closed: no CONNECT within %g s", self._peer, self._server.connect_timeout)
            self._terminate("connect timeout", abort=True)

    def _arm_keepalive(self) -> None:
        if self._keepalive:
            # in the connection's context (its request id for the timeout's log line), not a copy per timer
            self._keepalive_timer = self._loop.call_at(self._last_rx + 1.5 * self._keepalive, self._check_keepalive,
                                                       context=self._context)

    def _check_keepalive(self) -> None:
        self._keepalive_timer = None
        if self._close_reason is not None:
            return
        now = self._loop.time()
        limit = 1.5 * self._keepalive
        if self._reading_paused:  # we are not listening; the client is not to blame
            self._keepalive_timer = self._loop.call_at(now + limit, self._check_keepalive, context=self._context)
            return
        deadline = self._last_rx + limit
        if now < deadline:
            self._keepalive_timer = self._loop.call_at(deadline, self._check_keepalive, context=self._context)
            return
        log.info("MQTT client %s from %s closed: nothing received for %g s (keepalive %d s)",
                 shown(self._client_id or ""), self._peer, limit, self._keepalive)
        self._terminate("keepalive timeout", abort=True)

    # --- ending --------------------------------------------------------------------------------

    def _who(self) -> str:
        return f" (client id {shown(self._client_id)})" if self._client_id is not None else ""

    def _fail(self, problem: str) -> None:
        """Protocol violation: one INFO line, close this connection."""
        if self._close_reason is not None:
            return
        log.info("MQTT connection from %s%s closed: protocol error: %s", self._peer, self._who(), problem)
        self._terminate(f"protocol error: {problem}", abort=False)

    def _close_with_line(self, why: str) -> None:
        if self._close_reason is not None:
            return
        _connection_line(logging.INFO, "MQTT connection from %s%s closed: %s", self._peer, self._who(), why)
        self._terminate(why, abort=False)

    def _close_by_application(self, reason: str) -> None:
        if self._close_reason is not None:
            return
        _connection_line(logging.INFO, "MQTT session %s from %s closed by the application: %s",
                         shown(self._client_id or ""), self._peer, reason)
        self._terminate(reason, abort=True)

    def _terminate(self, reason: str, *, abort: bool, after_handler: bool = False) -> None:
        """The server ends the connection: drop queued input, close (flush) or abort the transport.

        ``after_handler`` (server shutdown): stop reading but let the packet being handled finish
        and its answer (PUBACK, SUBACK) go out; the dispatcher then closes the transport.
        """
        if self._close_reason is not None:
            return
        self._close_reason = reason
        self._end()
        self._queue = None
        self._queued_bytes = 0
        transport = self._transport
        if transport is not None and not self._lost:
            if abort:
                transport.abort()
            elif after_handler:
                with contextlib.suppress(Exception):
                    transport.pause_reading()
            else:
                self._close_transport()
        self._wake()

    def _close_transport(self) -> None:
        transport = self._transport
        if transport is not None and not self._lost and not transport.is_closing():
            transport.close()
            self._close_timer = self._loop.call_later(_CLOSE_FLUSH_TIMEOUT, transport.abort)

    def _end(self) -> None:
        """Synchronous bookkeeping when the connection ends, however it ends."""
        for timer in (self._connect_timer, self._keepalive_timer):
            if timer is not None:
                timer.cancel()
        self._connect_timer = self._keepalive_timer = None
        server = self._server
        key = self._key
        if key is not None and server._live.get(key) is self:
            del server._live[key]
        if self._open and key is not None and self._session is not None:
            if not self._clean and server.session_expiry > 0:
                server._store(key, _StoredSession(dict(self._session.subscriptions), self._inflight))
            self._inflight = {}
        if self._slot_waiter is not None and not self._slot_waiter.done():
            self._slot_waiter.set_result(None)
        self._release_drain_waiters()

    async def _finish(self) -> None:
        if self._close_reason is None:
            self._terminate("internal error", abort=True)
        self._close_transport()  # after a deferred (shutdown) close
        session, handler = self._session, self._handler
        try:
            if self._pipeline:  # the session ends after what it began is settled (stored or failed), as before
                await self._accepted(0)
            if self._open and session is not None and handler is not None:
                try:
                    await handler.on_disconnected(session, self._close_reason or "")
                except Exception:
                    log.exception("MQTT on_disconnected failed for client %s", shown(session.client_id))
        finally:
            self._finished = True
            self._task = None
            self._server._connections.discard(self)
            self._settle(self._closed_waiter)


class _WebSocketTransport(asyncio.Transport):
    """Presents an aiohttp WebSocket as the stream transport a :class:`_Connection` expects.

    Writes are queued and sent by one task as binary messages (consecutive packets share a message,
    which MQTT over WebSockets allows); the queue size drives pause_writing/resume_writing, and
    ``ws.send_bytes`` itself waits for the socket to drain, so memory stays bounded.
    """

    def __init__(self, ws: Any, protocol: _Connection, extra: dict[str, Any]) -> None:
        super().__init__(extra)
        self._ws = ws
        self._protocol = protocol
        self._out: deque[bytes] = deque()
        self._size = 0
        self._high = 64 * 1024
        self._low = 16 * 1024
        self._writing_paused = False
        self._closing = False
        self.reading = asyncio.Event()
        self.reading.set()
        self._wakeup = asyncio.Event()
        self.sender = asyncio.get_running_loop().create_task(self._send_loop(), name="mqtt websocket sender")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        chunk = bytes(data)
        self._out.append(chunk)
        self._size += len(chunk)
        self._wakeup.set()
        if not self._writing_paused and self._size > self._high:
            self._writing_paused = True
            self._protocol.pause_writing()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = 64 * 1024 if high is None else high
        self._low = self._high // 4 if low is None else low

    def get_write_buffer_size(self) -> int:
        return self._size

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Send what is queued, then close the WebSocket."""
        self._closing = True
        self._wakeup.set()
        self.reading.set()

    def abort(self) -> None:
        self._out.clear()
        self._size = 0
        self.close()

    def pause_reading(self) -> None:
        self.reading.clear()

    def resume_reading(self) -> None:
        self.reading.set()

    def is_reading(self) -> bool:
        return self.reading.is_set()

    def _take(self, limit: int) -> bytes:
        parts = [self._out.popleft()]
        size = len(parts[0])
        while self._out and size + len(self._out[0]) <= limit:
            chunk = self._out.popleft()
            parts.append(chunk)
            size += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _send_loop(self) -> None:
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                while self._out:
                    chunk = self._take(65536)
                    await self._ws.send_bytes(chunk)
                    self._size = max(0, self._size - len(chunk))
                    if self._writing_paused and self._size <= self._low:
                        self._writing_paused = False
                        self._protocol.resume_writing()
                if self._closing:
                    break
        except Exception as exc:  # noqa: BLE001 - the peer went away under us (aiohttp raises several kinds)
            log.debug("MQTT WebSocket send failed: %s", exc)
        finally:
            self._closing = True
            self._out.clear()
            self._size = 0
            self.reading.set()
            with contextlib.suppress(Exception):
                await self._ws.close()


class MqttServer:
    """MQTT 3.1.1 session server: owns connections, the client-id table and persistent session state."""

    def __init__(
        self,
        authenticate: Authenticator,
        *,
        max_packet_size: int = 256 * 1024 + 1024,
        connect_timeout: float = 10.0,
        max_inflight: int = 64,
        write_high_water: int = 256 * 1024,
        session_expiry: float = 3600.0,
        max_subscriptions: int = 50,
    ) -> None:
        """``max_packet_size`` bounds the remaining length of a client packet (256 KiB payload +
        topic and headers by default, the IoT Hub message limit); ``session_expiry`` is how long a
        disconnected clean-session-0 client's state is kept (0 keeps none)."""
        if not 1 <= max_inflight <= 0xFFFF:
            raise ValueError("max_inflight must be 1..65535")
        if connect_timeout <= 0 or write_high_water <= 0 or max_packet_size <= 0 or max_subscriptions < 0:
            raise ValueError("limits must be positive")
        self._authenticate = authenticate
        self.max_packet_size = max_packet_size
        self.connect_timeout = connect_timeout
        self.max_inflight = max_inflight
        self.write_high_water = write_high_water
        self.session_expiry = session_expiry
        self.max_subscriptions = max_subscriptions
        self._input_high_water = max(1 << 20, 2 * max_packet_size)
        self._input_hard_limit = 4 * self._input_high_water + max_packet_size
        self._live: dict[str, _Connection] = {}
        self._stored: dict[str, _StoredSession] = {}
        self._connections: set[_Connection] = set()
        self._listeners: list[asyncio.AbstractServer] = []
        self._background: set[asyncio.Future[Any]] = set()
        self._closing = False

    # --- listeners -----------------------------------------------------------------------------

    def protocol_factory(self) -> asyncio.Protocol:
        """One protocol per connection, for ``loop.create_server`` or ``start_tls_server``."""
        return _Connection(self)

    def add_listener(self, listener: asyncio.AbstractServer) -> None:
        """Let :meth:`close` stop a listener created elsewhere with :meth:`protocol_factory`."""
        self._listeners.append(listener)

    async def listen(self, host: str, port: int, *, tls_context: SSL.Context | None = None, **kw: Any) -> asyncio.Server:
        """Open a TCP listener (TLS through :func:`opendps.transport.tls.start_tls_server` when
        ``tls_context`` is given; ``kw`` goes to that function) that :meth:`close` will stop."""
        if tls_context is not None:
            from opendps.transport.tls import start_tls_server

            listener = await start_tls_server(self.protocol_factory, host, port, tls_context, **kw)
        else:
            listener = await asyncio.get_running_loop().create_server(self.protocol_factory, host, port, **kw)
        self.add_listener(listener)
        return listener

    @property
    def max_websocket_message(self) -> int:
        """The largest WebSocket message a client may send (give it to ``WebSocketResponse(max_msg_size=...)``): what
        the core lets wait unhandled on any connection. Why: a message is read whole before the MQTT decoder sees it,
        so without a bound one message of any size was held in memory, before any CONNECT."""
        return self._input_hard_limit

    async def serve_websocket(self, ws: Any, *, peer_certificate_chain: list | None = None, peername: Any = None) -> None:
        """Run one MQTT connection over a prepared aiohttp ``WebSocketResponse``; returns when it ended.

        Binary messages carry MQTT bytes in any split (packets may span or share messages); a text
        message is a protocol error. aiohttp does not expose the TLS layer on the WebSocket, so the
        route passes ``request.transport.get_extra_info("peer_certificate_chain")`` and the peer
        address here.
        """
        from aiohttp import WSMsgType

        conn = _Connection(self)
        transport = _WebSocketTransport(ws, conn, {"peer_certificate_chain": list(peer_certificate_chain or []),
                                                   "peername": peername})
        conn.connection_made(transport)
        error: Exception | None = None
        try:
            while not transport.is_closing():
                await transport.reading.wait()
                if transport.is_closing():
                    break
                msg = await ws.receive()
                if msg.type is WSMsgType.BINARY:
                    conn.data_received(msg.data)
                elif msg.type is WSMsgType.TEXT:
                    conn._fail("text WebSocket message (MQTT needs binary messages)")
                elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    break
        except Exception as exc:  # noqa: BLE001 - any failure ends this connection; connection_lost gets the cause
            error = exc
        finally:
            transport.close()
            conn.connection_lost(error)
            await conn.wait_closed()
            await transport.sender

    # --- sessions ------------------------------------------------------------------------------

    def sessions(self) -> list[Session]:
        """Live sessions (CONNACK sent, not closed)."""
        return [c._session for c in self._live.values() if c._open and c._close_reason is None and c._session]

    def session(self, key: str) -> Session | None:
        """The live session with this key (the client id unless the handler set ``session_key``), if connected."""
        conn = self._live.get(key)
        if conn is None or not conn._open or conn._close_reason is not None:
            return None
        return conn._session

    def _store(self, client_id: str, stored: _StoredSession) -> None:
        previous = self._stored.pop(client_id, None)
        if previous is not None and previous.timer is not None:
            previous.timer.cancel()
        if self._closing:
            return
        stored.timer = asyncio.get_running_loop().call_later(self.session_expiry, self._expire, client_id, stored)
        self._stored[client_id] = stored

    def _expire(self, client_id: str, stored: _StoredSession) -> None:
        if self._stored.get(client_id) is stored:
            del self._stored[client_id]
            log.debug("MQTT session state of %s expired (%d unacknowledged messages dropped)",
                      shown(client_id), len(stored.inflight))

    def _call_ack(self, callback: Callable[[], Any], client_id: str) -> None:
        try:
            result = callback()
        except Exception:
            log.exception("MQTT on_ack callback failed for client %s", shown(client_id))
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._background.add(task)
            task.add_done_callback(self._ack_done)

    def _ack_done(self, task: asyncio.Future[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("MQTT on_ack callback failed", exc_info=task.exception())

    async def close(self, timeout: float = 5.0) -> None:
        """Stop the known listeners and end every session: pending output is flushed (no half-written
        packet), every ``on_disconnected`` runs; handlers still busy after ``timeout`` are cancelled."""
        self._closing = True
        for listener in self._listeners:
            listener.close()
        conns = list(self._connections)
        for conn in conns:
            conn._terminate("server shutdown", abort=False, after_handler=True)
        waits: list[asyncio.Future[Any]] = [c.wait_closed() for c in conns] + [c.wait_gone() for c in conns]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=timeout)
            if pending:
                log.warning("MQTT shutdown: %d connections still busy after %g s; cancelling them", len(pending), timeout)
                for conn in conns:
                    if conn._task is not None and not conn._task.done():
                        conn._task.cancel()
                    if conn._transport is not None and not conn._lost:
                        conn._transport.abort()
                await asyncio.wait(pending, timeout=1.0)
        if self._background:
            await asyncio.wait(list(self._background), timeout=1.0)
        for stored in self._stored.values():
            if stored.timer is not None:
                stored.timer.cancel()
        self._stored.clear()
        for listener in self._listeners:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(listener.wait_closed(), 1.0)
        self._listeners.clear()
