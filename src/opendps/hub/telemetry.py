"""Device-to-cloud telemetry: a durable sink (the store) and a live wake-up for consumers.

The store is the only source of truth: every message gets a position (its row id) when it is
appended, and consumers read "everything after position N" — live consumers are woken by
:class:`TelemetryBus` instead of polling, a consumer started later reads from any position. A hub's positions
become visible in order, whatever the number of writing processes (see :meth:`TelemetrySink.append_many`).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

from sqlalchemy import func, insert, select
from sqlalchemy.engine.interfaces import DBAPIConnection

from opendps.errors import InvalidInput, NotFound, PayloadTooLarge
from opendps.store import LinkedHub, Store, TelemetryEvent, table_of
from opendps.transport.wire import iso8601, parse_json

MAX_MESSAGE_BYTES = 256 * 1024
Message = tuple[int, str, dict[str, Any], dict[str, Any], bytes]  # hub id, device id, system, application, body
log = logging.getLogger("opendps.hub")
_EVENTS = table_of(TelemetryEvent)
_APPEND = insert(_EVENTS).returning(_EVENTS.c.id, sort_by_parameter_order=True)
# SQLite: a batch is one or two multi-row INSERTs: its multiple of 16 rows (at most 160), then the rest (1-15 rows):
# 25 statement texts for the driver's statement cache; 160 rows are 960 parameters, under SQLite's smallest limit (999)
_SQLITE_ROWS_STEP, _SQLITE_ROWS_MAX = 16, 160
_SQLITE_APPEND = {size: "INSERT INTO telemetry_events (hub_id, device_id, system_properties, properties, body, "
                        "enqueued_at) VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?)"] * size)
                  for size in (*range(1, _SQLITE_ROWS_STEP), *range(_SQLITE_ROWS_STEP, _SQLITE_ROWS_MAX + 1,
                                                                     _SQLITE_ROWS_STEP))}
_PG_ROWS_MAX = 256  # rows per PostgreSQL statement: a whole group-commit batch (1,281 parameters of 65,535)
_JSON_TEXTS_MAX = 1024  # distinct property sets kept serialised (a device cannot grow it: cleared when full)
# PostgreSQL: a transaction appending to a hub holds the advisory lock (_LOCK_SPACE, hub id) until it ends. The
# two-int4 key space, with a constant of our own first, is apart from any single-bigint advisory lock. ORDER BY:
# locks are taken in hub order (a volatile function is evaluated after the sort), so two batches never deadlock.
_LOCK_SPACE = 0x0DD5_7E1E
_TAKE_TURNS = "SELECT pg_advisory_xact_lock($1, hub) FROM unnest($2::integer[]) AS hub ORDER BY hub"
# system property names of the MQTT property bag ($.x) and their names in an event
SYSTEM_PROPERTIES = {"$.mid": "message-id", "$.cid": "correlation-id", "$.uid": "user-id", "$.ct": "content-type",
                     "$.ce": "content-encoding", "$.exp": "absolute-expiry-time", "$.on": "output-name",
                     "$.ifid": "dt-interface-id", "$.sub": "dt-subject"}


@functools.lru_cache(maxsize=_PG_ROWS_MAX)
def _pg_append(rows: int) -> str:
    """The PostgreSQL INSERT of ``rows`` messages: $1 the time, then five parameters a row (hub id, device id, the two
    JSON columns as text, the body), fed in order (``n``) so ids follow the batch's order."""
    values = ", ".join(f"(${5 * i + 2}, ${5 * i + 3}, ${5 * i + 4}, ${5 * i + 5}, ${5 * i + 6}, {i})" for i in range(rows))
    return ("INSERT INTO telemetry_events (hub_id, device_id, system_properties, properties, body, enqueued_at) "
            f"SELECT h, d, s::json, p::json, b, $1 FROM (VALUES {values}) AS v(h, d, s, p, b, n) ORDER BY n RETURNING id")


def parse_property_bag(bag: str) -> tuple[dict[str, str], dict[str, str | None]]:
    """``k=v&$.mid=..`` (keys and values URL-encoded; ``k`` alone means null) → (system, application).

    A fleet sends the same few bags (the SDK's ``%24.ct=application%2Fjson&%24.ce=utf-8``) with every message:
    short ones are parsed once per process (fresh dicts each time: callers own them)."""
    if len(bag) > _CACHED_BAG_CHARS:
        return _parse_bag(bag)
    system, application = _parsed_bag(bag)
    return dict(system), dict(application)


_CACHED_BAG_CHARS = 256  # at most 1,024 bags of at most this size are kept: a device cannot grow the cache


@functools.lru_cache(maxsize=1024)
def _parsed_bag(bag: str) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str | None], ...]]:
    system, application = _parse_bag(bag)
    return tuple(system.items()), tuple(application.items())


def _parse_bag(bag: str) -> tuple[dict[str, str], dict[str, str | None]]:
    system: dict[str, str] = {}
    application: dict[str, str | None] = {}
    for part in bag.split("&"):
        if not part:
            continue
        name, sep, value = part.partition("=")
        key = unquote(name)
        val = unquote(value) if sep else None
        if key.startswith("$."):
            system[SYSTEM_PROPERTIES.get(key, key[2:])] = val if val is not None else ""
        else:
            application[key] = val
    return system, application


@dataclass(frozen=True)
class Event:
    position: int
    hub: str
    device_id: str
    system: dict[str, str]
    application: dict[str, Any]
    body: bytes
    enqueued_at: datetime

    def to_wire(self) -> dict[str, Any]:
        """Shaped like ``az iot hub monitor-events`` output (payload decoded as JSON or text when it can be)."""
        try:
            text = self.body.decode("utf-8")
            try:
                payload: Any = parse_json(text, "payload")
            except InvalidInput:
                payload = text  # not JSON (or too deep to decode): shown as the text it is
        except UnicodeDecodeError:
            payload = {"base64": base64.b64encode(self.body).decode()}
        system = {**self.system, "iothub-connection-device-id": self.device_id,
                  "iothub-enqueuedtime": iso8601(self.enqueued_at)}
        return {"event": {"origin": self.device_id, "module": "", "payload": payload,
                          "properties": {"system": system, "application": self.application}},
                "position": self.position, "hub": self.hub}


class TelemetryBus:
    """Wakes live consumers when something was appended (in this process)."""

    def __init__(self) -> None:
        self._waiters: set[asyncio.Event] = set()

    def notify(self) -> None:
        for event in list(self._waiters):
            event.set()

    async def wait(self, timeout: float) -> None:
        event = asyncio.Event()
        self._waiters.add(event)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self._waiters.discard(event)


def check_size(body: bytes) -> None:
    if len(body) > MAX_MESSAGE_BYTES:
        raise PayloadTooLarge(f"telemetry message is larger than {MAX_MESSAGE_BYTES} bytes")


class HubsGone(NotFound):
    """A batch named hubs unlinked meanwhile (their foreign key refused it, so nothing of it was stored): its other
    hubs' messages are written without them."""

    def __init__(self, hub_ids: frozenset[int]) -> None:
        super().__init__(f"hub {', '.join(map(str, sorted(hub_ids)))} is no longer linked", reason="hub_unlinked")
        self.hub_ids = hub_ids


class TelemetrySink:
    def __init__(self, store: Store) -> None:
        self.store = store
        # SQLite: the time's and the JSON columns' bind processing, made at the first batch
        self._sqlite_binds: tuple[Callable[[datetime], Any], Callable[[Any], Any] | None] | None = None
        self._json_texts: dict[tuple[tuple[str, Any], ...], Any] = {}  # property sets as their JSON column values
        # (one cache for both backends: a sink writes to one store)

    def append_many(self, messages: list[tuple[int, str, dict[str, Any], dict[str, Any], bytes]]) -> list[int]:
        """Append (hub id, device id, system, application, body) messages in one transaction; their positions
        in the order given. Either all are stored or none. One statement of the driver per batch, no ORM object and no
        per-row bind processing per message (:meth:`_append_sqlite`, :meth:`_append_postgresql`; another driver gets
        SQLAlchemy Core's insertmanyvalues).

        A hub's positions become visible in order, also with several processes or nodes writing, so a reader
        that saw position N has seen every earlier one of that hub and "everything after N" skips nothing.
        SQLite: one writer at a time — the INSERT takes the write lock before it picks the ids and holds it
        until the commit, so ids already come in commit order. PostgreSQL: ids come from a sequence when the
        INSERT runs and transactions commit in any order (N+1 visible while N is not), so appends to one hub
        take turns: a transaction-level advisory lock per hub of the batch, before the INSERT, released after
        the commit is visible. Cost: one statement per transaction (~0.2 ms, shared by a group commit's whole
        batch); two nodes' appends to the same hub no longer overlap their INSERT and commit. Readers stopping before
        the oldest in-flight position instead would need each row's transaction id against the snapshot's
        xmin: subtler, and every reader held back by any long transaction in the database."""
        for message in messages:
            check_size(message[4])
        now = datetime.now(UTC)
        dialect = self.store.engine.dialect
        if dialect.name == "sqlite" or dialect.name == "postgresql" and dialect.driver == "psycopg":
            try:
                with self.store.driver_transaction() as conn:
                    if dialect.name == "sqlite":
                        return self._append_sqlite(conn, messages, now)
                    return self._append_postgresql(conn, messages, now)
            except dialect.loaded_dbapi.IntegrityError:
                self._hubs_gone(messages)
                raise
        with self.store.session() as s:
            rows = [{"hub_id": hub_id, "device_id": device_id, "system_properties": system, "properties": application,
                     "body": body, "enqueued_at": now} for hub_id, device_id, system, application, body in messages]
            return list(s.connection().execute(_APPEND, rows).scalars())

    def _hubs_gone(self, messages: list[Message]) -> None:
        """After a batch was refused on its foreign key: raise :class:`HubsGone` naming the batch's hubs that are no
        longer linked (a hub unlinked while its devices sent), else return (the caller re-raises what it got)."""
        wanted = {message[0] for message in messages}
        with self.store.session() as s:
            linked = set(s.scalars(select(LinkedHub.id).where(LinkedHub.id.in_(sorted(wanted)))))
        if wanted - linked:
            raise HubsGone(frozenset(wanted - linked))

    def _append_postgresql(self, conn: DBAPIConnection, messages: list[Message], now: datetime) -> list[int]:
        """PostgreSQL (psycopg 3): the per-hub turn (see :meth:`append_many`), then one INSERT ... SELECT FROM
        (VALUES ...) ORDER BY n of the batch's rows, with the JSON columns serialised once per distinct property set.

        Why not the Core statement: SQLAlchemy's insertmanyvalues processes every row's binds in Python (both JSON
        columns serialised per row) around its multi-row statement: most of a stored message's CPU on PostgreSQL.
        Why ``$n`` placeholders (psycopg's raw cursor): psycopg parses a ``%s`` query again on every call when it has
        more than 50 parameters, and the column arrays of an ``unnest`` form are escaped element by element in Python;
        either was most of a message's CPU here (in-process, 45 rows: unnest 25 µs a message, this 7 µs).
        Why the positions are right: ``ORDER BY n`` feeds the rows in the batch's order and each takes its id from
        the sequence as it is inserted, so the ids ascend in batch order (other transactions' rows may fall in
        between): sorted, they are the batch's positions in order, whatever order RETURNING uses."""
        if not messages:
            return []
        from psycopg import RawCursor

        text_of = self._json_text(json.dumps)
        cursor = RawCursor(conn.driver_connection)  # the pool's proxy holds the psycopg connection
        positions: list[int] = []
        try:
            cursor.execute(_TAKE_TURNS, (_LOCK_SPACE, sorted({message[0] for message in messages})))
            for start in range(0, len(messages), _PG_ROWS_MAX):
                chunk = messages[start:start + _PG_ROWS_MAX]
                values: list[Any] = [now]
                for hub_id, device_id, system, application, body in chunk:
                    values += (hub_id, device_id, text_of(system), text_of(application), body)
                cursor.execute(_pg_append(len(chunk)), values)
                positions += (row[0] for row in cursor.fetchall())
        finally:
            cursor.close()
        if len(positions) != len(messages):
            raise RuntimeError(f"telemetry batch of {len(messages)} stored {len(positions)} rows")
        return sorted(positions)

    def _json_text(self, serialise: Callable[[Any], Any] | None) -> Callable[[dict[str, Any]], Any]:
        """A JSON column's value for a property set: serialised once per distinct set (a fleet sends a few; the cache
        is bounded and cleared when full, so a device cannot grow it)."""
        texts = self._json_texts
        if len(texts) > _JSON_TEXTS_MAX:
            texts.clear()

        def text_of(value: dict[str, Any]) -> Any:
            key = tuple(value.items())
            try:
                found = texts.get(key)
            except TypeError:  # an unhashable value (a list): not cached
                found = None
            if found is not None:  # only text-or-null sets are stored, and no other value equals a str or None
                return found
            found = serialise(value) if serialise is not None else value
            # only text (or null) values are cached: 1, 1.0 and True are equal keys but not the same JSON
            if all(type(v) is str or v is None for _, v in key):
                texts[key] = found
            return found
        return text_of

    def _append_sqlite(self, conn: DBAPIConnection, messages: list[Message], now: datetime) -> list[int]:
        """SQLite: multi-row INSERTs of the driver (a batch of 45 is 32 + 13 rows), the columns' own bind
        processing done once per batch (the time) or once per distinct property set (a fleet sends a few), and the
        positions from the last row id.

        Why not the Core statement: SQLAlchemy runs an INSERT ... RETURNING per row on SQLite (no sentinel to sort a
        multi-row RETURNING by) and serialises both JSON columns of every row: most of a stored message's cost.
        Why not ``executemany``: sqlite3 lets go of the GIL around every row it steps, and the event loop's thread
        takes it each time, so a batch of 30 was 30 hand-overs between the threads (in a microbenchmark against a
        busy thread, 4 times the CPU of a multi-row statement per message and 8 times the time). For the same reason
        a batch is one or two statements (not one per power of two) and the last row id is the cursor's (sqlite3 reads
        it after every execute, letting go of the GIL for that too), not one more statement.
        Why the ids are right: the transaction holds SQLite's one write lock from its first INSERT to its commit and
        AUTOINCREMENT gives each new row the largest id ever used + 1, so the batch's ids are consecutive and end at
        ``last_insert_rowid()``."""
        if not messages:
            return []
        stamp_of, json_of = self._sqlite_processors()
        stamp = stamp_of(now)
        text_of = self._json_text(json_of)
        values: list[Any] = []
        for hub_id, device_id, system, application, body in messages:
            values += (hub_id, device_id, text_of(system), text_of(application), body, stamp)
        cursor = conn.cursor()
        try:
            done, total = 0, len(messages)
            while done < total:
                left = total - done
                size = left if left < _SQLITE_ROWS_STEP else min(left - left % _SQLITE_ROWS_STEP, _SQLITE_ROWS_MAX)
                cursor.execute(_SQLITE_APPEND[size], values[done * 6:(done + size) * 6])
                done += size
            last = cursor.lastrowid  # sqlite3 reads last_insert_rowid() after each execute
        finally:
            cursor.close()
        return list(range(last - total + 1, last + 1))

    def _sqlite_processors(self) -> tuple[Callable[[datetime], Any], Callable[[Any], Any] | None]:
        """The time's and the JSON columns' values as SQLAlchemy would bind them on this SQLite store: the time
        through its column type and then the adapter sqlite3 itself would apply to every row (its default
        ``isoformat(" ")`` for a datetime), done here once per batch; the JSON columns' serialiser."""
        found = self._sqlite_binds
        if found is None:
            dialect = self.store.engine.dialect
            column = _EVENTS.c.enqueued_at.type.bind_processor(dialect)

            def stamp_of(value: datetime) -> Any:
                bound = column(value) if column is not None else value
                adapt = getattr(sqlite3, "adapters", {}).get((type(bound), sqlite3.PrepareProtocol))
                return adapt(bound) if adapt is not None else bound

            found = self._sqlite_binds = (stamp_of, _EVENTS.c.properties.type.bind_processor(dialect))
        return found

    def read(self, hub_name: str, *, after: int = 0, device_id: str | None = None, limit: int = 100) -> list[Event]:
        with self.store.session() as s:
            hub = s.scalars(select(LinkedHub).where(LinkedHub.name == hub_name)).first()
            if hub is None:
                raise InvalidInput(f"linked hub {hub_name!r} does not exist")
            q = select(TelemetryEvent).where(TelemetryEvent.hub_id == hub.id, TelemetryEvent.id > after)
            if device_id is not None:
                q = q.where(TelemetryEvent.device_id == device_id)
            rows = s.scalars(q.order_by(TelemetryEvent.id).limit(limit)).all()
            return [Event(r.id, hub.name, r.device_id, r.system_properties, r.properties, r.body, r.enqueued_at)
                    for r in rows]

    def last_position(self, hub_name: str) -> int:
        with self.store.session() as s:
            hub = s.scalars(select(LinkedHub).where(LinkedHub.name == hub_name)).first()
            if hub is None:
                raise InvalidInput(f"linked hub {hub_name!r} does not exist")
            return s.scalar(select(func.max(TelemetryEvent.id)).where(TelemetryEvent.hub_id == hub.id)) or 0


class GroupCommit:
    """Telemetry from many sessions shares transactions: the first message is written at once, and whatever
    arrives while a write is in progress goes in the next one (at most ``max_batch``).

    Why: a transaction per message made the commit, the thread hop and the ORM set-up the whole cost of a
    QoS 1 publish. Durability is unchanged — each caller's ``append`` returns (and its PUBACK goes out) only
    after the transaction holding its message committed; if that transaction fails, every caller in it
    gets the error, as it would have alone.

    Under a steady stream the writer lingers ``linger`` seconds before each further batch (not before the first
    after it was idle: a lone message is written at once), so a batch is what arrived in a write plus that time.
    Why: each transaction costs the same fixed part (a hand-over to a domain thread and back, the driver's
    statements, the commit) whatever its size, and batches of what arrived during one write alone were ~30
    messages under the benchmark's load; 1 ms more makes them larger (~45 there), for ~12 % of a stored message's
    CPU, and a PUBACK up to 1 ms later only when the store is busy anyway.

    Backpressure: at most ``max_pending_bytes`` of message bodies wait for the store. Beyond that ``append``
    waits for room before it queues its message, so a session whose PUBLISH is waiting reads nothing more
    (the MQTT core handles a session's packets in order and pauses the socket when its queue fills): when the
    store falls behind, devices are slowed down by TCP, and memory stays bounded.
    """

    def __init__(self, sink: TelemetrySink, run: Any, max_batch: int = 256,
                 max_pending_bytes: int = 16 * 1024 * 1024,
                 on_stored: Callable[[list[Message]], None] | None = None, linger: float = 0.001) -> None:
        self.sink = sink
        self.linger = linger
        self.run = run  # runs a blocking callable off the event loop (the domain's thread pool)
        # told of each stored batch once, on the loop, before its callers hear of it (live consumers, counters)
        self.on_stored = on_stored
        self.max_batch = max_batch
        self.max_pending_bytes = max(max_pending_bytes, MAX_MESSAGE_BYTES)  # one largest message always fits
        self._pending: list[tuple[Message, asyncio.Future[Any]]] = []
        self._pending_bytes = 0  # bodies queued or being written
        # submit()'s messages share one future per transaction: its messages not yet stored, by future (see submit)
        self._shared_left: dict[asyncio.Future[None], int] = {}
        self._shared: asyncio.Future[None] | None = None  # the one new submits join (None: the next makes one)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._room: asyncio.Condition | None = None
        self._writer: asyncio.Task[None] | None = None

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    @property
    def pending_messages(self) -> int:
        """Messages queued for the next transaction (the metrics' queue depth)."""
        return len(self._pending)

    async def append(self, hub_id: int, device_id: str, system: dict[str, Any], application: dict[str, Any], body: bytes) -> int:
        check_size(body)  # one oversized message must not fail the others' transaction
        size = len(body)
        if self._pending_bytes + size > self.max_pending_bytes:
            if self._room is None:
                self._room = asyncio.Condition()
            async with self._room:
                await self._room.wait_for(lambda: self._pending_bytes + size <= self.max_pending_bytes)
        return await self._queue(hub_id, device_id, system, application, body)

    def submit(self, hub_id: int, device_id: str, system: dict[str, Any], application: dict[str, Any],
               body: bytes) -> asyncio.Future[None] | None:
        """:meth:`append` without waiting: a future done when the message is stored (or failed with the reason), or
        None when it cannot be queued at once (the queue is full, or the message too large): the caller then uses
        :meth:`append`, which waits or says why. Lets a session queue several messages of its own for the same
        transaction (the MQTT core's pipeline).

        The future is shared by every message submitted for the same transaction, so its callers must not cancel it
        and learn no position. Why: a future per message, with its done callback scheduled on the loop, was a fifth
        of the loop's Python calls per stored message; one per transaction makes it one callback per connection."""
        if len(body) > MAX_MESSAGE_BYTES or self._pending_bytes + len(body) > self.max_pending_bytes:
            return None
        future = self._shared
        if future is None:
            future = self._shared = self._running_loop().create_future()
            self._shared_left[future] = 0
        self._shared_left[future] += 1
        self._enqueue((hub_id, device_id, system, application, body), future)
        return future

    def _queue(self, hub_id: int, device_id: str, system: dict[str, Any], application: dict[str, Any],
               body: bytes) -> asyncio.Future[int]:
        future: asyncio.Future[int] = self._running_loop().create_future()
        self._enqueue((hub_id, device_id, system, application, body), future)
        return future

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop, asked once per stream: on Python 3.11 ``get_running_loop`` is a getpid system call each time."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _enqueue(self, message: Message, future: asyncio.Future[Any]) -> None:
        self._pending_bytes += len(message[4])
        self._pending.append((message, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())

    async def _write(self) -> None:
        streaming = False  # the first batch goes at once; later ones arrived while a write ran: a stream
        while self._pending:
            if streaming and self.linger and len(self._pending) < self.max_batch:
                await asyncio.sleep(self.linger)
            streaming = True
            batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            self._shared = None  # what is submitted from now on waits for a later transaction
            try:
                positions = await self.run(self.sink.append_many, [message for message, _ in batch])
            except HubsGone as gone:  # a hub unlinked meanwhile: the others' messages go in the next transaction
                kept = self._without(batch, gone)
                self._pending = kept + self._pending
                self._pending_bytes += sum([len(message[4]) for message, _ in kept])  # still waiting: counted again
                positions = None
            except Exception as exc:  # noqa: BLE001 - handed to every caller of this batch
                for _, future in batch:
                    self._shared_left.pop(future, None)  # a shared one fails with its first failed part
                    if not future.done():
                        future.set_exception(exc)
                positions = None
            finally:
                await self._release(sum([len(message[4]) for message, _ in batch]))
            if positions is None:
                continue
            if self.on_stored is not None:
                try:
                    self.on_stored([message for message, _ in batch])
                except Exception:  # the batch is stored: its callers get their positions regardless
                    log.exception("telemetry: after a stored batch")
            shared = self._shared_left
            for (_, future), position in zip(batch, positions, strict=True):
                left = shared.get(future)
                if left is None:  # append()'s own future
                    if not future.done():  # the caller may have gone (cancelled) meanwhile
                        future.set_result(position)
                elif left > 1:  # more of its messages wait in a later batch (one larger than max_batch)
                    shared[future] = left - 1
                else:
                    del shared[future]
                    if not future.done():
                        future.set_result(None)
        self._loop = None  # asked again with the next message: the writer may outlive a loop (tests run several)

    def _without(self, batch: list[tuple[Message, asyncio.Future[Any]]],
                 gone: HubsGone) -> list[tuple[Message, asyncio.Future[Any]]]:
        """The batch's messages of hubs still linked. The others end here: an ``append`` caller gets ``gone`` (its
        device's connection closes without PUBACK), and so does a pipelined future none of whose messages is left to
        store; one shared with messages that are stored is done when they are (the gone hub's count as stored, as an
        instant earlier they would have been, and then deleted with their hub): failing it would cut off every
        device of the transaction."""
        kept = []
        shared = self._shared_left
        for message, future in batch:
            if message[0] not in gone.hub_ids:
                kept.append((message, future))
                continue
            left = shared.get(future)
            if left is not None and left > 1:
                shared[future] = left - 1
                continue
            shared.pop(future, None)
            if not future.done():
                future.set_exception(gone)
        return kept

    async def _release(self, size: int) -> None:
        self._pending_bytes -= size
        if self._room is not None:
            async with self._room:
                self._room.notify_all()
