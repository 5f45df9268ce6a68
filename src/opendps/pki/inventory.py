"""What the CA has out there, counted in SQL: valid certificates per policy and how many expire within a few horizons
(the ``opendps_certificates_*`` gauges and ``GET /status``).

One statement, one ``GROUP BY policy_id`` over the unrevoked certificates not yet expired — conditional sums give
every horizon at once — so the answer costs one pass over the valid certificates (100k rows: milliseconds), never a
row per certificate in Python; callers cache it for a few seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Integer, case, func, select
from sqlalchemy.sql.functions import coalesce

from opendps.store import IssuedCertificate, Store, table_of

_ISSUED = table_of(IssuedCertificate)
HORIZONS_DAYS = (1, 7, 14, 30, 60, 90)  # the expiry gauges' buckets


@dataclass(frozen=True)
class PolicyExpiry:
    """One policy's valid certificates (unrevoked, not expired) and how many of them expire within each horizon
    (``within[days]``, cumulative: the 30-day count includes the 7-day one). ``policy_id`` None: the policy was
    deleted (its certificates keep no policy)."""

    policy_id: int | None
    valid: int
    within: dict[int, int]


class CertificateInventory:
    def __init__(self, store: Store) -> None:
        self.store = store

    def expiry(self, *, now: datetime | None = None,
               horizons_days: Sequence[int] = HORIZONS_DAYS) -> list[PolicyExpiry]:
        """Per policy (those with valid certificates), in policy id order: one ``GROUP BY``."""
        now = now or datetime.now(UTC)
        horizons = sorted(set(horizons_days))
        sums = [func.sum(case((_ISSUED.c.not_after <= now + timedelta(days=d), 1), else_=0)).label(f"d{d}")
                for d in horizons]
        q = (select(_ISSUED.c.policy_id, func.count().label("valid"), *sums)
             .where(_ISSUED.c.revoked_at.is_(None), _ISSUED.c.not_after > now)
             .group_by(_ISSUED.c.policy_id).order_by(coalesce(_ISSUED.c.policy_id, -1).cast(Integer)))
        with self.store.session() as s:
            rows = s.connection().execute(q).all()
        return [PolicyExpiry(r.policy_id, int(r.valid), {d: int(getattr(r, f"d{d}") or 0) for d in horizons})
                for r in rows]
