"""The store side of the cluster: node rows with heartbeats, and the message table.

Synchronous (SQLAlchemy Core on the store's engine); :class:`opendps.cluster.Cluster` calls it off the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, insert, or_, select, update

from opendps.store import ClusterNode, LiveMessage, Store, table_of

_NODES = table_of(ClusterNode)
_MESSAGES = table_of(LiveMessage)
MESSAGE_TTL = timedelta(seconds=60)  # a message nobody fetched within a minute is of no use to anyone


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
            return [(i, b) for i, b in s.connection().execute(
                select(_MESSAGES.c.id, _MESSAGES.c.body)
                .where(_MESSAGES.c.id > after, or_(_MESSAGES.c.target.is_(None), _MESSAGES.c.target == node_id))
                .order_by(_MESSAGES.c.id).limit(limit))]

    def body(self, message_id: int) -> str | None:
        with self.store.session() as s:
            return s.connection().execute(select(_MESSAGES.c.body).where(_MESSAGES.c.id == message_id)).scalar()
