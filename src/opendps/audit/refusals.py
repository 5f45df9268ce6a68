"""The refusal log: device requests the service refused lately — DPS registrations and hub CONNECTs — with why
(``refusals``; ``GET /status`` and the dashboard show the newest).

Not the audit chain: a refused request changed nothing, and a flood of them must not take turns on the chain. It is
bounded instead: rows older than :data:`KEEP` and beyond the newest :data:`MAX_ROWS` are swept (at most once a
minute per process), and front ends hand rows over in batches, a bounded number per second
(``opendps.frontends.refusals``), so a flood costs one insert a second per process.

A row holds what the device was told (the message) and a bounded ``reason`` word (``OpenDPSError.reason``), the id
it sent (truncated) — never its credential.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, insert, select

from opendps.store import Store, table_of
from opendps.store.models import RefusalEntry

KEEP = timedelta(hours=24)
MAX_ROWS = 10_000
SWEEP_EVERY = timedelta(minutes=1)
REGISTRATION = "registration"
HUB_CONNECT = "hubConnect"
KINDS = (REGISTRATION, HUB_CONNECT)
_TABLE = table_of(RefusalEntry)
_INSERT = insert(_TABLE)


@dataclass(frozen=True)
class Refusal:
    time: datetime
    kind: str  # registration | hubConnect
    subject: str  # the registration id or device id as sent
    transport: str  # https | mqtt
    reason: str  # a bounded word (OpenDPSError.reason)
    error_code: int
    message: str  # what the device was told
    hub: str | None = None  # the hub host name (hub CONNECTs)

    def to_wire(self) -> dict[str, object]:
        wire: dict[str, object] = {"time": self.time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                                   "kind": self.kind, "id": self.subject}
        if self.hub is not None:
            wire["hub"] = self.hub
        wire.update(transport=self.transport, reason=self.reason, errorCode=self.error_code, message=self.message)
        return wire


class RefusalLog:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._swept_at: float | None = None  # time.monotonic(): a wall-clock step does not pause the sweeps

    def record(self, refusals: Sequence[Refusal], *, now: datetime | None = None) -> None:
        """Store a batch (one executemany insert); sweep old rows when a minute has passed."""
        if not refusals:
            return
        now = now or datetime.now(UTC)
        rows = [{"created_at": r.time, "kind": r.kind[:16], "subject": r.subject[:128], "hub": (r.hub or None) and r.hub[:255],
                 "transport": r.transport[:8], "reason": r.reason[:32], "error_code": int(r.error_code),
                 "message": r.message[:512]} for r in refusals]
        with self.store.session() as s:
            s.connection().execute(_INSERT, rows)
        if self._swept_at is None or time.monotonic() - self._swept_at >= SWEEP_EVERY.total_seconds():
            self.sweep(now)

    def sweep(self, now: datetime | None = None) -> int:
        """Delete rows older than :data:`KEEP` and beyond the newest :data:`MAX_ROWS`; how many went."""
        now = now or datetime.now(UTC)
        self._swept_at = time.monotonic()
        with self.store.session() as s:
            conn = s.connection()
            gone = conn.execute(delete(_TABLE).where(_TABLE.c.created_at < now - KEEP)).rowcount or 0
            cut = conn.execute(select(_TABLE.c.id).order_by(_TABLE.c.id.desc()).offset(MAX_ROWS).limit(1)).scalar()
            if cut is not None:
                gone += conn.execute(delete(_TABLE).where(_TABLE.c.id <= cut)).rowcount or 0
        return int(gone)

    def recent(self, limit: int = 10) -> list[Refusal]:
        """The newest ``limit`` refusals, newest first."""
        if limit <= 0:
            return []
        with self.store.session() as s:
            rows = s.connection().execute(select(_TABLE).order_by(_TABLE.c.id.desc()).limit(limit)).all()
        return [Refusal(r.created_at, r.kind, r.subject, r.transport, r.reason, r.error_code, r.message, r.hub)
                for r in rows]

    def count_since(self, since: datetime) -> int:
        """Refusals recorded since ``since`` (a range of the ``created_at`` index)."""
        with self.store.session() as s:
            return int(s.scalar(select(func.count()).select_from(_TABLE).where(_TABLE.c.created_at >= since)) or 0)
