"""Presence: which server process (node) holds each connected device's hub session.

A device's live session is a socket on one process. Everything else about the device is in the store; this table
is how another process or node finds that socket: a direct method, a C2D wake-up or a desired push made on node
B for a device connected to node A goes to A (``opendps.cluster`` carries it), and a device that connects to B
while an old session is still on A displaces it (MQTT's one-session rule, across nodes).

Rows are written by :class:`PresenceWriter` in batches after the CONNACK (a CONNECT does not wait for them) and
belong to the node's row in ``cluster_nodes``: when a node dies, its rows go with its row (foreign key cascade)
once another node has seen its heartbeat stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from opendps.hub.registry import Hubs
from opendps.store import HubConnection, HubDevice, LinkedHub, Store, table_of

log = logging.getLogger("opendps.hub")
# a recorded session said to begin later than this past our clock did not: the wall clock was stepped back since
# it was recorded (NTP), or that node's clock runs ahead; its time says nothing about which session is newer
CLOCK_TOLERANCE = timedelta(seconds=5)
_CONNECTIONS = table_of(HubConnection)
_DELETE = delete(_CONNECTIONS).where(
    _CONNECTIONS.c.hub_id == bindparam("h"), _CONNECTIONS.c.device_key == bindparam("d"),
    _CONNECTIONS.c.node_id == bindparam("n"), _CONNECTIONS.c.session == bindparam("s"))
_DEVICES = table_of(HubDevice)
_SEEN = update(_DEVICES).where(_DEVICES.c.hub_id == bindparam("h"), _DEVICES.c.device_key == bindparam("d")).values(
    last_seen_at=bindparam("t"))  # the dashboard's "last seen" (issue 19)


@dataclass(frozen=True, slots=True)
class Change:
    """One session attached to (``attached``) or detached from this node."""

    hub_id: int
    device_key: str  # lower-cased device id
    session: str
    attached: bool
    since: datetime | None = None  # when the session began (an attach); None: when it is written


@dataclass(frozen=True, slots=True)
class Displaced:
    """A session that a newer connection of the same device replaced: another node's, or this node's own when
    another node's newer session was recorded first."""

    node_id: str
    hub_id: int
    device_key: str
    session: str


class Presence:
    """The ``hub_connections`` table: one row per connected device, the newest connection's."""

    def __init__(self, store: Store, hubs: Hubs) -> None:
        self.store = store
        self.hubs = hubs
        module = postgresql if store.dialect == "postgresql" else sqlite
        insert: Any = module.insert(_CONNECTIONS)
        self._upsert = insert.on_conflict_do_update(
            index_elements=[_CONNECTIONS.c.hub_id, _CONNECTIONS.c.device_key],
            set_={"node_id": insert.excluded.node_id, "session": insert.excluded.session,
                  "connected_at": insert.excluded.connected_at})

    def record(self, node_id: str, changes: list[Change]) -> list[Displaced]:
        """:meth:`_record`; a batch refused because it names a hub unlinked meanwhile (its sessions are being dropped;
        their rows would have gone with the hub) is written without that hub's changes, so one unlinked hub does not
        hold up every other device's presence."""
        try:
            return self._record(node_id, changes)
        except IntegrityError:
            named = {c.hub_id for c in changes}
            with self.store.session() as s:
                linked = set(s.scalars(select(LinkedHub.id).where(LinkedHub.id.in_(sorted(named)))))
            if named <= linked:
                raise  # not a hub's doing (this node's row swept?): kept and retried by the writer
            return self._record(node_id, [c for c in changes if c.hub_id in linked])

    def _record(self, node_id: str, changes: list[Change]) -> list[Displaced]:
        """Apply ``changes`` (in order) for ``node_id`` in one transaction; the sessions that the attaches displaced.

        The newest session wins by when it began, not by when its row is written: two nodes write their batches in
        any order, so a node whose attach is older than another node's recorded session gets its own session back
        as displaced (its node closes it) and the row stays. The devices' ``last_seen_at`` update goes first, in
        key order: it is the lock (SQLite's write lock; PostgreSQL's row locks) under which the recorded sessions
        are read and replaced, so two nodes attaching one device are serialised. At most four statements whatever
        the batch size."""
        displaced: list[Displaced] = []
        # per session, not per device: a device's new session often attaches before its old one's detach arrives
        # (the MQTT core closes the old one after the new CONNECT), and both can be in one batch
        ended = {(c.hub_id, c.device_key, c.session) for c in changes if not c.attached}
        newest: dict[tuple[int, str], Change] = {}  # per device, its last attach in this batch
        for c in changes:
            if c.attached:
                newest[(c.hub_id, c.device_key)] = c
        now = datetime.now(UTC)
        with self.store.session() as s:
            conn = s.connection()
            final = sorted({(c.hub_id, c.device_key) for c in changes})
            if final:
                conn.execute(_SEEN, [{"h": h, "d": d, "t": now} for h, d in final])
            upserts: list[dict[str, Any]] = []
            recorded: dict[tuple[int, str], tuple[str, str, datetime]] = {}
            if newest:
                q = select(_CONNECTIONS.c.hub_id, _CONNECTIONS.c.device_key, _CONNECTIONS.c.node_id,
                           _CONNECTIONS.c.session, _CONNECTIONS.c.connected_at).where(
                    tuple_(_CONNECTIONS.c.hub_id, _CONNECTIONS.c.device_key).in_(list(newest)))
                if self.store.dialect == "postgresql":
                    q = q.with_for_update()  # a device without a hub_devices row has no lock above
                recorded = {(h, d): (n, session, at) for h, d, n, session, at in conn.execute(q)}
            # a session that attached and ended within the batch is never written; every ended session's row is
            # deleted if it is still there (the delete names the session, so a newer session's row stays)
            for key, c in newest.items():
                if (*key, c.session) in ended:
                    continue
                since = c.since or now
                row = recorded.get(key)
                if row is not None and row[0] != node_id:
                    # another node's newer session is recorded: ours is the one taken over; unless its time is in
                    # our future, where the row being written now is the newer (else, after a clock stepped back
                    # by an hour, each reconnect to another worker lost to the stale session for that hour)
                    if since < row[2] <= now + CLOCK_TOLERANCE:
                        displaced.append(Displaced(node_id, *key, c.session))
                        continue
                    displaced.append(Displaced(row[0], *key, row[1]))
                upserts.append({"hub_id": key[0], "device_key": key[1], "node_id": node_id, "session": c.session,
                                "connected_at": since})
            deletes = [{"h": h, "d": d, "n": node_id, "s": session} for h, d, session in sorted(ended)]
            if upserts:
                conn.execute(self._upsert, upserts)
            if deletes:
                conn.execute(_DELETE, deletes)
        return displaced

    def locate(self, hub_name: str, device_id: str) -> tuple[str, str] | None:
        """(node id, session) of the device's live session, if any node recorded one."""
        hub = self._hub_id(hub_name)
        if hub is None:
            return None
        with self.store.session() as s:
            row = s.connection().execute(
                select(_CONNECTIONS.c.node_id, _CONNECTIONS.c.session).where(
                    _CONNECTIONS.c.hub_id == hub, _CONNECTIONS.c.device_key == device_id.lower())).first()
        return (row[0], row[1]) if row else None

    def connected(self, hub_name: str, device_ids: Iterable[str] | None = None) -> frozenset[str]:
        """Lower-cased ids of the hub's devices connected to any node (of ``device_ids``, when given)."""
        hub = self._hub_id(hub_name)
        if hub is None:
            return frozenset()
        q = select(_CONNECTIONS.c.device_key).where(_CONNECTIONS.c.hub_id == hub)
        if device_ids is not None:
            wanted = sorted({d.lower() for d in device_ids})
            if not wanted:
                return frozenset()
            q = q.where(_CONNECTIONS.c.device_key.in_(wanted))
        with self.store.session() as s:
            return frozenset(s.connection().execute(q).scalars())

    def _hub_id(self, hub_name: str) -> int | None:
        return next((h.id for h in self.hubs.list() if h.name == hub_name), None)


class PresenceWriter:
    """Batches presence changes, like the telemetry group commit: a transaction takes whatever changes arrived while
    the one before it was written, and each waits ``linger`` seconds before it starts (20 ms: the live bus itself
    polls every 50 ms), so a burst of connects shares transactions and a device that connects and leaves within it
    costs no row at all. A CONNECT never waits for it; a failed write is retried with the next batch (the changes
    are kept, in order), so presence catches up after a store outage.

    ``on_displaced`` hears of the sessions a newer connection replaced (see :meth:`Presence.record`), and
    ``on_recorded`` of each batch once it is written.
    """

    def __init__(self, presence: Presence, node_id: str, run: Callable[..., Awaitable[Any]],
                 on_displaced: Callable[[list[Displaced]], Awaitable[None]] | None = None, max_batch: int = 1000,
                 linger: float = 0.02, on_recorded: Callable[[list[Change]], Awaitable[None]] | None = None) -> None:
        self.presence = presence
        self.node_id = node_id
        self.run = run
        self.on_displaced = on_displaced
        self.on_recorded = on_recorded
        self.max_batch = max_batch
        self.linger = linger
        self._pending: list[Change] = []
        self._writer: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def add(self, change: Change) -> None:
        self._pending.append(change)
        self._idle.clear()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write())

    async def flush(self) -> None:
        """Wait until every change made so far is written (or failed once)."""
        await self._idle.wait()

    def _compact(self) -> None:
        """While the store is away: a session that attached and ended since is folded as one batch folds it (no row;
        its device's last detach is kept, for "last seen"), so what waits is bounded by the devices that came and
        went, not by how often they did."""
        began = {c.session for c in self._pending if c.attached}
        gone = began & {c.session for c in self._pending if not c.attached}
        if not gone:
            return
        last_detach: dict[tuple[int, str], Change] = {}
        for c in self._pending:
            if c.session in gone and not c.attached:
                last_detach[(c.hub_id, c.device_key)] = c
        kept = set(map(id, last_detach.values()))
        before = len(self._pending)
        self._pending = [c for c in self._pending if c.session not in gone or id(c) in kept]
        log.info("presence: %d waiting change(s) folded to %d while the store is away", before, len(self._pending))

    async def _write(self) -> None:
        failures = 0
        try:
            while self._pending:
                if self.linger > 0:
                    await asyncio.sleep(self.linger)  # let a burst's other changes join this transaction
                batch = self._pending[:self.max_batch]
                try:
                    displaced = await self.run(self.presence.record, self.node_id, batch)
                except Exception as exc:  # noqa: BLE001 - kept and retried: presence must catch up
                    failures += 1
                    # said once per outage (a retry every few seconds would repeat it until the store is back)
                    (log.warning if failures == 1 else log.debug)(
                        "presence of %d session(s) not recorded (%s); retrying", len(batch), exc)
                    await asyncio.sleep(min(5.0, 0.2 * 2 ** min(failures, 5)))
                    if len(self._pending) > self.max_batch:
                        self._compact()
                    continue
                if failures:
                    log.info("presence recorded again after %d failed attempt(s)", failures)
                failures = 0
                del self._pending[:len(batch)]
                if displaced and self.on_displaced is not None:
                    await self.on_displaced(displaced)
                if self.on_recorded is not None:
                    await self.on_recorded(batch)
        finally:
            if not self._pending:
                self._idle.set()
