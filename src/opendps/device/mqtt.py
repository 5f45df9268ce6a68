"""A small asyncio MQTT 3.1.1 client on the project's sans-IO codec, for DPS and IoT hub device sessions.

Why hand-written: it shares :mod:`opendps.transport.mqtt.codec` with the server (one set of packet
rules, one set of tests), and it is a plain asyncio object with no thread of its own, so hundreds of
device clients run in one event loop (``device simulate``, benchmarks). paho-mqtt runs a network
thread per client and amqtt refuses client publishes to ``$`` topics, which Azure devices need.

Scope: what an Azure device does. TLS through stdlib :mod:`ssl` (client chain + key, the server's CA,
host name checked), CONNECT, SUBSCRIBE, PUBLISH at QoS 0 or 1 (QoS 1 waits for PUBACK with a
timeout), incoming PUBLISH dispatched in order to one callback (PUBACK for QoS 1 is sent after the
callback returns, even if it raised: MQTT has no way to refuse a message), PINGREQ when idle,
:class:`ConnectRefused` for a CONNACK code other than 0, clean DISCONNECT. No QoS 2, no will, no
in-flight retransmission: a lost connection fails every pending operation with
:class:`ConnectionLost` and the caller (the hub client) decides what to resend.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import parse_qs

from opendps.transport.mqtt.codec import (
    Connack,
    Connect,
    Decoder,
    MqttProtocolError,
    Packet,
    Pingreq,
    Pingresp,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Unsuback,
    encode,
)
from opendps.transport.mqtt.codec import Disconnect as DisconnectPacket

__all__ = [
    "AckTimeout",
    "ConnectRefused",
    "ConnectionLost",
    "MqttClient",
    "MqttError",
    "client_ssl_context",
    "response_status",
    "topic_query",
]


def topic_query(topic: str) -> dict[str, str]:
    """The ``?k=v&...`` part of an Azure response topic (``$rid``, ``$version``, ``retry-after``), URL-decoded."""
    _, _, qs = topic.partition("?")
    return {k: v[0] for k, v in parse_qs(qs, keep_blank_values=True).items()}


def response_status(topic: str, prefix: str) -> int:
    """The status in ``<prefix><status>/?...`` (a DPS, twin or credentials answer); 0 when it is not 1-3 ASCII digits
    (``str.isdigit`` alone passes "²", which ``int`` refuses)."""
    text = topic[len(prefix):].split("/", 1)[0]
    return int(text) if 0 < len(text) <= 3 and text.isascii() and text.isdigit() else 0


log = logging.getLogger("opendps.device.mqtt")

MessageCallback = Callable[[Publish], Awaitable[None] | None]
DisconnectCallback = Callable[[Exception | None], Awaitable[None] | None]

CONNACK_REASONS = {
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}


class MqttError(Exception):
    """Base class of the client's errors."""


class ConnectRefused(MqttError):
    """The server answered CONNECT with a non-zero return code (4 = bad credentials, 5 = not authorized)."""

    def __init__(self, return_code: int) -> None:
        self.return_code = return_code
        super().__init__(f"CONNECT refused with return code {return_code} "
                         f"({CONNACK_REASONS.get(return_code, 'unknown')})")


class ConnectionLost(MqttError, ConnectionError):
    """The connection is closed (or was never open); pending operations fail with this."""


class AckTimeout(MqttError, TimeoutError):
    """No CONNACK / PUBACK / SUBACK within the timeout."""


def client_ssl_context(ca_file: str | Path | None = None, cert_file: str | Path | None = None,
                       key_file: str | Path | None = None) -> ssl.SSLContext:
    """TLS ≥ 1.2 client context: trust ``ca_file`` (else the system store), check the host name, present a chain.

    Build it once and pass it to many clients: loading a CA file costs more than the handshake.
    """
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return ctx


async def _maybe_await(value: object) -> None:
    if inspect.isawaitable(value):
        await value


class MqttClient:
    """One MQTT 3.1.1 connection. ``connect()`` may be called again after the connection closed."""

    def __init__(self, host: str, port: int, client_id: str, *, username: str | None = None,
                 password: str | bytes | None = None, ssl_context: ssl.SSLContext | None = None,
                 server_hostname: str | None = None, address: str | None = None, keepalive: int = 60,
                 clean_session: bool = True, on_message: MessageCallback | None = None,
                 on_disconnect: DisconnectCallback | None = None, timeout: float = 30.0, auto_ack: bool = True,
                 max_packet_size: int = 1 << 20) -> None:
        """``host`` is the name TLS checks; ``address`` (default ``host``) is where to dial, for hub names DNS lacks.

        ``auto_ack=False``: QoS 1 messages are acknowledged only by :meth:`ack`, so an application can
        hand a message to slow code without holding up the dispatch of the messages behind it.
        ``max_packet_size`` bounds what a server may make the device buffer (IoT hub messages are ≤ 256 KB).
        """
        self.host = host
        self.port = port
        self.address = address or host
        self.client_id = client_id
        self.username = username
        self.password = password.encode() if isinstance(password, str) else password
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname or host
        self.keepalive = keepalive
        self.clean_session = clean_session
        self.on_message = on_message
        self.on_disconnect = on_disconnect
        self.timeout = timeout
        self.auto_ack = auto_ack
        self.max_packet_size = max_packet_size
        self.session_present = False
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task] = []
        self._pending: dict[int, asyncio.Future] = {}
        self._connack: asyncio.Future | None = None
        self._inbox: asyncio.Queue[Publish] = asyncio.Queue()
        self._next_pid = 0
        self._last_sent = 0.0
        self._ping_sent_at: float | None = None
        self._connected = False
        self._closed: asyncio.Event = asyncio.Event()
        self._closed.set()
        self.close_reason: Exception | None = None

    @property
    def connected(self) -> bool:
        return self._connected

    # ---- public API ----
    async def connect(self) -> bool:
        """Open TCP+TLS, send CONNECT, wait for CONNACK; returns session present. Raises ConnectRefused."""
        if not self._closed.is_set():
            raise MqttError("already connected or connecting")
        loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        self.close_reason = None
        self._inbox = asyncio.Queue()
        self._pending = {}
        self._ping_sent_at = None
        self._connack = loop.create_future()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                self.address, self.port, ssl=self.ssl_context,
                server_hostname=self.server_hostname if self.ssl_context else None), self.timeout)
        except BaseException:
            self._closed.set()
            raise
        self._writer = writer
        self._tasks = [loop.create_task(self._read_loop(reader), name=f"mqtt-read:{self.client_id}")]
        try:
            await self._send(Connect(self.client_id, self.clean_session, self.keepalive, self.username, self.password))
            connack: Connack = await asyncio.wait_for(asyncio.shield(self._connack), self.timeout)
        except TimeoutError:
            error = AckTimeout(f"no CONNACK from {self.address}:{self.port} within {self.timeout} s")
            await self._abort(error)
            raise error from None
        except BaseException as exc:
            await self._abort(exc if isinstance(exc, Exception) else ConnectionLost("connect cancelled"))
            raise
        if connack.return_code != 0:
            error = ConnectRefused(connack.return_code)
            await self._abort(error)
            raise error
        self.session_present = connack.session_present
        self._connected = True
        self._tasks.append(loop.create_task(self._dispatch_loop(), name=f"mqtt-dispatch:{self.client_id}"))
        if self.keepalive:
            self._tasks.append(loop.create_task(self._ping_loop(), name=f"mqtt-ping:{self.client_id}"))
        return connack.session_present

    async def subscribe(self, *filters: str | tuple[str, int], qos: int = 1) -> list[int]:
        """SUBSCRIBE and wait for SUBACK; returns the granted QoS per filter (0x80 = refused)."""
        topics = [(f, qos) if isinstance(f, str) else f for f in filters]
        pid = self._allocate()
        future = self._expect(pid)
        await self._send(Subscribe(pid, topics))
        ack: Suback = await self._wait(pid, future, "SUBACK")
        return ack.return_codes

    async def publish(self, topic: str, payload: bytes | str = b"", qos: int = 0, *, retain: bool = False,
                      timeout: float | None = None) -> None:
        """PUBLISH; for QoS 1 returns once the PUBACK arrived (AckTimeout after ``timeout``, default the client's)."""
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        if qos == 0:
            await self._send(Publish(topic, data, 0, retain))
            return
        if qos != 1:
            raise ValueError("only QoS 0 and 1 are supported")
        pid = self._allocate()
        future = self._expect(pid)
        await self._send(Publish(topic, data, 1, retain, False, pid))
        await self._wait(pid, future, "PUBACK", timeout)

    async def disconnect(self) -> None:
        """Send DISCONNECT and close; the on_disconnect callback gets None (a wanted close)."""
        if self._closed.is_set():
            return
        if self._connected:
            with contextlib.suppress(MqttError, OSError):
                await self._send(DisconnectPacket())
        await self._abort(None)

    async def ack(self, message: Publish) -> None:
        """PUBACK a QoS 1 message of the current connection (no-op for QoS 0 or once the connection closed)."""
        if message.qos == 1 and message.packet_id is not None and self._connected:
            with contextlib.suppress(ConnectionLost):
                await self._send(Puback(message.packet_id))

    async def close(self, error: Exception | None = None) -> None:
        """Drop the connection without DISCONNECT (e.g. after an ack timeout); on_disconnect gets ``error``."""
        await self._abort(error)

    async def wait_closed(self) -> Exception | None:
        """Wait until the connection is closed; returns why (None for a clean disconnect)."""
        await self._closed.wait()
        return self.close_reason

    # ---- internals ----
    def _allocate(self) -> int:
        for _ in range(0xFFFF):
            self._next_pid = self._next_pid % 0xFFFF + 1
            if self._next_pid not in self._pending:
                return self._next_pid
        raise MqttError("no free packet identifier (65535 operations in flight)")

    def _expect(self, pid: int) -> asyncio.Future:
        if not self._connected:
            raise ConnectionLost("not connected")
        future = asyncio.get_running_loop().create_future()
        self._pending[pid] = future
        return future

    async def _wait(self, pid: int, future: asyncio.Future, what: str, timeout: float | None = None) -> Packet:
        try:
            return await asyncio.wait_for(future, self.timeout if timeout is None else timeout)
        except TimeoutError:
            raise AckTimeout(f"no {what} for packet {pid} within {self.timeout if timeout is None else timeout} s") from None
        finally:
            self._pending.pop(pid, None)

    async def _send(self, packet: Packet) -> None:
        writer = self._writer
        if writer is None or self._closed.is_set() or writer.is_closing():
            raise ConnectionLost("not connected")
        writer.write(encode(packet))
        self._last_sent = asyncio.get_running_loop().time()
        try:
            await writer.drain()
        except (OSError, RuntimeError) as exc:
            raise ConnectionLost(f"connection lost while sending: {exc}") from exc

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        decoder = Decoder(self.max_packet_size)
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionLost("connection closed by the server")
                for packet in decoder.feed(data):
                    self._handle(packet)
        except asyncio.CancelledError:
            raise
        except MqttProtocolError as exc:
            await self._abort(ConnectionLost(f"protocol error from the server: {exc}"))
        except ConnectionLost as exc:
            await self._abort(exc)
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
            await self._abort(ConnectionLost(f"connection lost: {exc!r}"))

    def _handle(self, packet: Packet) -> None:
        if isinstance(packet, Publish):
            if packet.qos > 1:
                raise MqttProtocolError("QoS 2 PUBLISH received, but no subscription granted QoS 2")
            self._inbox.put_nowait(packet)
        elif isinstance(packet, Puback | Suback | Unsuback):
            future = self._pending.get(packet.packet_id)
            if future is not None and not future.done():
                future.set_result(packet)
        elif isinstance(packet, Pingresp):
            self._ping_sent_at = None
        elif isinstance(packet, Connack):
            if self._connack is None or self._connack.done():
                raise MqttProtocolError("unexpected CONNACK")
            self._connack.set_result(packet)
        else:
            raise MqttProtocolError(f"a server may not send {type(packet).__name__}")

    async def _dispatch_loop(self) -> None:
        inbox, closed = self._inbox, self._closed  # this connection's, even if a callback reconnects
        while not closed.is_set():
            message = await inbox.get()
            if self.on_message is not None:
                try:
                    await _maybe_await(self.on_message(message))
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("%s: message callback failed for %r", self.client_id, message.topic)
            if closed.is_set():
                return  # not acknowledged: the server redelivers it on the next connection
            if self.auto_ack:
                await self.ack(message)

    async def _ping_loop(self) -> None:
        loop = asyncio.get_running_loop()
        half = self.keepalive / 2
        while True:
            now = loop.time()
            if self._ping_sent_at is not None:
                if now - self._ping_sent_at >= half:
                    await self._abort(ConnectionLost(f"no PINGRESP within {half:g} s"))
                    return
                wait = self._ping_sent_at + half - now
            elif now - self._last_sent >= half:
                try:
                    await self._send(Pingreq())
                except ConnectionLost:
                    return
                self._ping_sent_at = now
                wait = half
            else:
                wait = self._last_sent + half - now
            await asyncio.sleep(max(wait, 0.01))

    async def _abort(self, error: Exception | None) -> None:
        """Close once: fail pending operations, stop the tasks, tell on_disconnect."""
        if self._closed.is_set():
            return
        was_connected = self._connected
        self._connected = False
        self.close_reason = error
        self._closed.set()
        lost = error if isinstance(error, ConnectionLost) else ConnectionLost(str(error) if error else "disconnected")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(lost)
        self._pending.clear()
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(lost)
            self._connack.exception()  # retrieved: nobody may be waiting any more
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        self._tasks = []
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)
        if was_connected and self.on_disconnect is not None:
            try:
                await _maybe_await(self.on_disconnect(error))
            except Exception:
                log.exception("%s: on_disconnect callback failed", self.client_id)
