"""Registration activity over time, from the RA's own rows (the fleet dashboard's registrations per minute, issue 19).

Every attested register request leaves an operation (``operations``, kept 24 hours, indexed by ``created_at``):
assigned, failed (a failed allocation) or still assigning (a slow custom-allocation webhook). A refused request
leaves none — nobody proved who they are, so nothing is written (refusals are counted by the front ends). The
aggregate is one ``GROUP BY`` over an index range of the window, however many devices and operations there are.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from opendps.errors import InvalidInput
from opendps.store import Operation, Store
from opendps.store.timebuckets import MINUTE_FORMAT, utc_minute

MAX_MINUTES = 24 * 60  # operations are swept after 24 hours


@dataclass(frozen=True)
class MinuteCount:
    """Register operations created in one UTC minute, by status."""

    minute: datetime  # its start
    assigned: int = 0
    failed: int = 0
    assigning: int = 0

    @property
    def total(self) -> int:
        return self.assigned + self.failed + self.assigning

    def to_wire(self) -> dict[str, Any]:
        return {"minute": self.minute.strftime("%Y-%m-%dT%H:%MZ"), "total": self.total, "assigned": self.assigned,
                "failed": self.failed, "assigning": self.assigning}


def registrations_per_minute(store: Store, minutes: int = 60, *, now: datetime | None = None) -> list[MinuteCount]:
    """The last ``minutes`` whole UTC minutes up to and including the current one, oldest first, zeros included."""
    if not 1 <= minutes <= MAX_MINUTES:
        raise InvalidInput(f"minutes must be 1-{MAX_MINUTES}")
    now = (now or datetime.now(UTC)).astimezone(UTC)
    last = now.replace(second=0, microsecond=0)
    first = last - timedelta(minutes=minutes - 1)
    bucket = utc_minute(Operation.created_at, store.dialect)
    q = (select(bucket, Operation.status, func.count()).where(Operation.created_at >= first)
         .group_by(bucket, Operation.status))
    counts: dict[str, dict[str, int]] = {}
    with store.session() as s:
        for minute, status, count in s.execute(q).all():
            counts.setdefault(str(minute), {})[str(status)] = int(count)
    series = []
    for n in range(minutes):
        start = first + timedelta(minutes=n)
        c = counts.get(start.strftime(MINUTE_FORMAT), {})
        series.append(MinuteCount(start, c.get("assigned", 0), c.get("failed", 0), c.get("assigning", 0)))
    return series
