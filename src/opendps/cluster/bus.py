"""Carriers of live-state messages between server processes and nodes: an existing engine each, no protocol of
our own.

- :class:`PostgresBus` — PostgreSQL ``LISTEN``/``NOTIFY`` when the store is PostgreSQL: no extra service. A body
  larger than a NOTIFY payload (8,000 bytes) is put in ``live_messages`` and the NOTIFY carries its id.
- :class:`TableBus` — SQLite with several workers on one host: messages are rows of ``live_messages``, and each
  worker reads the new ones every 50 ms (one indexed SELECT, on the event loop through a connection that never
  waits: :class:`opendps.cluster.nodes.MessageReader`); a node alone (the usual single ``opendps serve``) reads every
  0.5 s, as nothing can be sent to it until another node joins, and at 50 ms again as soon as a heartbeat sees one.
  SQLite's single writer takes ids in commit order, so "after the last id I read" misses nothing.
- :class:`NatsBus` — NATS core subjects, for operators who already run NATS (``--bus nats://...``).

A message is a JSON object; ``to`` is a node id or None for every node (the sender hears its own broadcasts too
on some carriers: receivers ignore what they sent). Delivery is at most once: these are live hints (a wake-up,
a method call with its own timeout, a drop that the store's state also enforces at the next CONNECT), never the
record of anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from opendps.cluster.nodes import MessageReader, Nodes
from opendps.transport import nats_client

log = logging.getLogger("opendps.cluster")
Deliver = Callable[[dict[str, Any]], None]
Run = Callable[..., Awaitable[Any]]
NOTIFY_LIMIT = 7900  # PostgreSQL refuses a NOTIFY payload of 8,000 bytes or more


class Bus:
    """What :class:`opendps.cluster.Cluster` needs from a carrier."""

    name = "none"

    async def start(self, node_id: str, deliver: Deliver) -> None:
        """Begin delivering messages for ``node_id`` (and broadcasts) to ``deliver``, on the event loop."""

    async def publish(self, message: dict[str, Any], to: str | None = None) -> None:
        """Send ``message`` to node ``to`` (None: every node)."""

    async def close(self) -> None:
        """Stop; undelivered messages are dropped."""

    def peers(self, count: int) -> None:
        """How many other nodes are alive, as each heartbeat reads it: a carrier that polls may poll less while alone."""

    # called when the carrier works again after an outage (messages sent meanwhile were lost): set by the Cluster
    on_resumed: Callable[[], Awaitable[None]] | None = None

    async def _resumed(self) -> None:
        if self.on_resumed is not None:
            try:
                await self.on_resumed()
            except Exception:  # a failed catch-up must not stop the carrier
                log.exception("live messages: the catch-up after the outage failed")


def _encode(message: dict[str, Any], to: str | None) -> str:
    return json.dumps({"to": to, "m": message}, separators=(",", ":"))


def _decode(text: str, node_id: str) -> dict[str, Any] | None:
    try:
        envelope = json.loads(text)
    except ValueError:
        log.warning("a live message that is not JSON was ignored")
        return None
    if not isinstance(envelope, dict) or envelope.get("to") not in (None, node_id):
        return None
    message = envelope.get("m")
    return message if isinstance(message, dict) else None


class TableBus(Bus):
    """Messages as rows of ``live_messages``, read every ``interval`` seconds (SQLite workers on one host)."""

    name = "sqlite"

    def __init__(self, nodes: Nodes, run: Run, interval: float = 0.05, alone_interval: float = 0.5) -> None:
        self.nodes = nodes
        self.run = run
        self.interval = interval
        self.alone_interval = alone_interval  # ~70 % of an idle server's CPU was the 20 reads a second
        self._task: asyncio.Task[None] | None = None
        self._reader: MessageReader | None = None
        self._alone = False  # until a heartbeat says so
        self._nap: asyncio.Future[None] | None = None

    def peers(self, count: int) -> None:
        was_alone, self._alone = self._alone, count == 0
        if was_alone and not self._alone and self._nap is not None and not self._nap.done():
            self._nap.set_result(None)  # a node joined: read now, then at the short interval

    async def _sleep(self) -> None:
        loop = asyncio.get_running_loop()
        self._nap = nap = loop.create_future()
        timer = loop.call_later(self.alone_interval if self._alone else self.interval,
                                lambda: nap.done() or nap.set_result(None))
        try:
            await nap
        finally:
            timer.cancel()

    async def start(self, node_id: str, deliver: Deliver) -> None:
        after = await self.run(self.nodes.last_message)
        self._reader = MessageReader.open(self.nodes.store)
        self._task = asyncio.get_running_loop().create_task(self._read(node_id, after, deliver))

    async def _fetch(self, node_id: str, after: int) -> list[tuple[int, str]] | None:
        if self._reader is not None:
            return self._reader.fetch(node_id, after)
        return await self.run(self.nodes.fetch, node_id, after)  # not a database file: through the domain threads

    async def _read(self, node_id: str, after: int, deliver: Deliver) -> None:
        while True:
            await self._sleep()
            try:
                rows = await self._fetch(node_id, after)
            except Exception as exc:  # noqa: BLE001 - the store is busy or away: try again at the next tick
                log.warning("live messages not read: %s", exc)
                continue
            if rows is None:  # locked for a moment: the next tick reads them
                continue
            for message_id, body in rows:
                after = message_id
                message = _decode(body, node_id)
                if message is not None:
                    deliver(message)

    async def publish(self, message: dict[str, Any], to: str | None = None) -> None:
        await self.run(self.nodes.post, to, _encode(message, to))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def psycopg_conninfo(sqlalchemy_url: str) -> str:
    """A libpq connection string from the store's SQLAlchemy URL (``postgresql+psycopg://...``), with the store's
    timeouts for a database that stops answering (:data:`opendps.store.PG_CONNECTION_DEFAULTS`)."""
    from opendps.store import with_connection_defaults

    url = with_connection_defaults(sqlalchemy_url)
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class PostgresBus(Bus):
    """LISTEN/NOTIFY on one channel: a listening connection read on the event loop, and a second one to notify.

    Channels are per database, not per schema: the channel is named after the installation (its ID scope), so
    installations sharing a database in separate schemas do not hear each other."""

    name = "postgresql"

    def __init__(self, url: str, nodes: Nodes, run: Run, channel: str) -> None:
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", channel):
            raise ValueError(f"channel {channel!r} is not a plain lower-case identifier")
        self.channel = channel
        self.conninfo = psycopg_conninfo(url)
        self.nodes = nodes
        self.run = run
        self._listen: Any = None
        self._notify: Any = None
        self._notify_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def _connect(self) -> Any:
        import psycopg

        return await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)

    async def start(self, node_id: str, deliver: Deliver) -> None:
        self._listen = await self._connect()
        await self._listen.execute(f"LISTEN {self.channel}")
        self._task = asyncio.get_running_loop().create_task(self._read(node_id, deliver))

    async def _read(self, node_id: str, deliver: Deliver) -> None:
        failures = 0
        while not self._closing:
            try:
                if self._listen is None or self._listen.closed:
                    self._listen = await self._connect()
                    await self._listen.execute(f"LISTEN {self.channel}")
                    log.info("live messages: listening again")
                    await self._resumed()
                failures = 0
                async for notice in self._listen.notifies():
                    text = notice.payload
                    if text.startswith("#"):  # the body is in the table: "#<id>"
                        text = await self.run(self.nodes.body, int(text[1:])) or ""
                    message = _decode(text, node_id)
                    if message is not None:
                        deliver(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - connection lost: reconnect with backoff, messages meanwhile are lost
                failures += 1  # said once; the reconnection attempts while the database is away are not
                (log.warning if failures == 1 else log.debug)(
                    "live messages: the listening connection failed (%s); reconnecting", exc)
                with contextlib.suppress(Exception):
                    await self._listen.close()
                self._listen = None
                await asyncio.sleep(min(5.0, 0.1 * 2 ** min(failures, 6)))

    async def publish(self, message: dict[str, Any], to: str | None = None) -> None:
        text = _encode(message, to)
        if len(text.encode()) > NOTIFY_LIMIT:
            text = f"#{await self.run(self.nodes.post, to, text)}"
        async with self._notify_lock:
            for attempt in (1, 2):
                try:
                    if self._notify is None or self._notify.closed:
                        self._notify = await self._connect()
                    await self._notify.execute("SELECT pg_notify(%s, %s)", (self.channel, text))
                    return
                except asyncio.CancelledError:
                    raise
                except Exception:
                    with contextlib.suppress(Exception):
                        await self._notify.close()
                    self._notify = None
                    if attempt == 2:
                        raise

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for conn in (self._listen, self._notify):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()


class NatsBus(Bus):
    """NATS core subjects: ``{prefix}.all`` for broadcasts, ``{prefix}.node.{id}`` for one node.

    NATS away never stops the server: it starts without it (the messages wait for nothing: they are lost until it
    answers, as they are hints) and connects in the background; while the connection is down a publish fails at
    once instead of waiting in nats-py's buffer, which sent it whenever NATS came back — a direct method whose caller
    had its 504 long before ran on the device after all. When the connection is back, :attr:`on_resumed` catches up
    (the sessions here look for the cloud-to-device messages whose wake-up was lost)."""

    name = "nats"
    connect_within = 10.0  # seconds each connection attempt may take (NATS starting beside opendps)

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        self._nc: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, node_id: str, deliver: Deliver) -> None:
        """Connect within ``connect_within`` s; NATS not there: one warning, and the attempts go on in the background."""
        try:
            await self._connect(node_id, deliver)
        except nats_client.NatsUnreachable as exc:
            log.warning("live bus: %s; serving without it (live messages between nodes are lost) and connecting in "
                        "the background", exc)
            self._task = asyncio.get_running_loop().create_task(self._keep_trying(node_id, deliver))

    async def _keep_trying(self, node_id: str, deliver: Deliver) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await self._connect(node_id, deliver)
            except nats_client.NatsUnreachable as exc:
                log.debug("live bus: %s", exc)
                continue
            log.info("live bus: connected to NATS %s", nats_client.shown_url(self.url))
            await self._resumed()
            return

    async def _connect(self, node_id: str, deliver: Deliver) -> None:
        nc = await nats_client.connect(self.url, name=f"opendps-{node_id}", within=self.connect_within, log=log,
                                       what="live bus", on_reconnected=self._resumed)

        async def on_message(msg: Any) -> None:
            message = _decode(msg.data.decode(), node_id)
            if message is not None:
                deliver(message)

        await nc.subscribe(f"{self.prefix}.all", cb=on_message)
        await nc.subscribe(f"{self.prefix}.node.{node_id}", cb=on_message)
        self._nc = nc

    async def publish(self, message: dict[str, Any], to: str | None = None) -> None:
        if self._nc is None or not self._nc.is_connected:
            raise nats_client.NatsUnreachable(f"the live bus's connection to NATS {nats_client.shown_url(self.url)} is "
                                              "down")
        subject = f"{self.prefix}.all" if to is None else f"{self.prefix}.node.{to}"
        await self._nc.publish(subject, _encode(message, to).encode())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()
