"""The store side of the cluster: node rows with heartbeats, and the message table.

Synchronous (SQLAlchemy Core on the store's engine); :class:`opendps.cluster.Cluster` calls it off the event loop.
The one exception is :class:`MessageReader`, the SQLite table bus's reader, which never waits (its docstring says
why that is safe on the loop).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, or_, select, update

from opendps.store import ClusterNode, LiveMessage, Store, table_of
from opendps.store.prepared import prepared

_NODES = table_of(ClusterNode)
_MESSAGES = table_of(LiveMessage)
MESSAGE_TTL = timedelta(seconds=60)  # a message nobody fetched within a minute is of no use to anyone
# the messages for one node (or every node) after the last one it read, in id order
_FOR_NODE = (select(_MESSAGES.c.id, _MESSAGES.c.body)
             .where(_MESSAGES.c.id > bindparam("after"),
                    or_(_MESSAGES.c.target.is_(None), _MESSAGES.c.target == bindparam("node")))
             .order_by(_MESSAGES.c.id).limit(bindparam("limit")))


@dataclass(frozen=True)
class NodeInfo:
    id: str
    host: str
    pid: int
    worker: int
    endpoints: dict[str, Any]
    started_at: datetime
    heartbeat_at: datetime

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "host": self.host, "pid": self.pid, "worker": self.worker, "endpoints": self.endpoints,
                "startedAt": self.started_at.isoformat(), "heartbeatAt": self.heartbeat_at.isoformat()}


class Nodes:
    """``cluster_nodes`` and ``live_messages``."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def join(self, node: NodeInfo) -> None:
        with self.store.session() as s:
            s.connection().execute(insert(_NODES).values(
                id=node.id, host=node.host, pid=node.pid, worker=node.worker, endpoints=node.endpoints,
                started_at=node.started_at, heartbeat_at=node.heartbeat_at))

    def beat(self, node_id: str) -> bool:
        """Refresh the heartbeat; False when the row is gone (another node took this one for dead)."""
        with self.store.session() as s:
            result = s.connection().execute(
                update(_NODES).where(_NODES.c.id == node_id).values(heartbeat_at=datetime.now(UTC)))
            return bool(result.rowcount)

    def leave(self, node_id: str) -> None:
        with self.store.session() as s:
            s.connection().execute(delete(_NODES).where(_NODES.c.id == node_id))

    def alive(self, timeout: float) -> list[NodeInfo]:
        """Nodes whose heartbeat is younger than ``timeout`` seconds, oldest first."""
        since = datetime.now(UTC) - timedelta(seconds=timeout)
        with self.store.session() as s:
            rows = s.execute(select(ClusterNode).where(ClusterNode.heartbeat_at > since)
                             .order_by(ClusterNode.started_at, ClusterNode.id)).scalars().all()
            return [NodeInfo(r.id, r.host, r.pid, r.worker, r.endpoints, r.started_at, r.heartbeat_at) for r in rows]

    def sweep(self, timeout: float) -> int:
        """Delete the nodes silent for ``timeout`` seconds (their presence rows go by cascade) and the messages
        older than a minute; the number of nodes deleted."""
        now = datetime.now(UTC)
        with self.store.session() as s:
            conn = s.connection()
            gone = conn.execute(delete(_NODES).where(_NODES.c.heartbeat_at <= now - timedelta(seconds=timeout)))
            conn.execute(delete(_MESSAGES).where(_MESSAGES.c.created_at <= now - MESSAGE_TTL))
            return int(gone.rowcount or 0)

    # ---- messages kept in the store ----
    def post(self, target: str | None, body: str) -> int:
        with self.store.session() as s:
            return int(s.connection().execute(
                insert(_MESSAGES).values(target=target, body=body, created_at=datetime.now(UTC))
                .returning(_MESSAGES.c.id)).scalar_one())

    def last_message(self) -> int:
        with self.store.session() as s:
            return int(s.connection().execute(select(func.max(_MESSAGES.c.id))).scalar() or 0)

    def fetch(self, node_id: str, after: int, limit: int = 500) -> list[tuple[int, str]]:
        """(id, body) of the messages after ``after`` for ``node_id`` or everyone, in id order.

        Only sound where ids are taken in commit order: SQLite, whose single writer serialises the inserts (the
        table bus is used only there; PostgreSQL fetches one message by id, :meth:`body`)."""
        with self.store.session() as s:
            return [(i, b) for i, b in s.connection().execute(_FOR_NODE, {"after": after, "node": node_id,
                                                                            "limit": limit})]

    def body(self, message_id: int) -> str | None:
        with self.store.session() as s:
            return s.connection().execute(select(_MESSAGES.c.body).where(_MESSAGES.c.id == message_id)).scalar()


class MessageReader:
    """Reads a node's new ``live_messages`` on the event loop, through a SQLite connection of its own that never waits.

    Why on the loop: the table bus reads every 50 ms, and a read handed to a domain thread (a thread woken, a pool
    checkout, a session) was ~80 % of an idle server's CPU (3.4 % of a core; 0.7 % now). The read itself is one
    indexed SELECT on a table that keeps a minute of messages: ~7 microseconds. It cannot
    hold the loop up: the connection has no busy timeout, so a database that is locked for reading (WAL recovery,
    a truncating checkpoint) makes it give up at once (None: try at the next tick); and each read is a transaction
    of its own, ended before it returns (a read left open would keep checkpoints from finishing the WAL).

    SQLite files only (:meth:`open` says None otherwise): in-memory databases are not shared between connections.
    """

    def __init__(self, path: str, dialect: Any) -> None:
        self._for_node = prepared(_FOR_NODE, dialect)
        # autocommit (isolation_level None): the SELECT is its own transaction; timeout 0: no busy waiting
        self._conn: sqlite3.Connection | None = sqlite3.connect(path, timeout=0, isolation_level=None)
        self._conn.execute("PRAGMA query_only=ON")

    @classmethod
    def open(cls, store: Store) -> MessageReader | None:
        """A reader on ``store``'s database file, or None when it is not a SQLite file."""
        url = store.engine.url
        if store.dialect != "sqlite" or not url.database or url.database == ":memory:" or url.database.startswith("file:"):
            return None
        return cls(url.database, store.engine.dialect)

    def fetch(self, node_id: str, after: int, limit: int = 500) -> list[tuple[int, str]] | None:
        """What :meth:`Nodes.fetch` returns, read now; None when the database is locked (read again later)."""
        if self._conn is None:
            raise RuntimeError("the message reader is closed")
        try:
            cursor = self._conn.cursor()
            try:
                return [(int(i), str(b)) for i, b in self._for_node.all(cursor, after=after, node=node_id, limit=limit)]
            finally:
                cursor.close()
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):  # extended codes too
                return None
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
