"""Request limits of the DPS device API, as in Azure (429 + Retry-After).

- :class:`PollThrottle`: 5 polls or status lookups per 10 s per registration id;
- :class:`RegistrationLimit`: 10 *attested* registrations per minute per registration id — counted after the
  credential is proven, so nobody can use up a device's allowance without its credential, and a device that
  loops cannot get certificate after certificate;
- :class:`ServiceLimit`: every register request of this process, a token bucket sized far above a factory burst
  of distinct devices (default 1,000 per second) that keeps a flood from taking every core.

The two per-device limits are shared through the store (table ``request_limits``), so they hold across every
process and node of one database. One row per (limit, lower-cased registration id) holds the times of that id's
latest ``limit + 1`` arrivals (milliseconds since the epoch, 13 digits each, in arrival order), and one statement
counts a request: an upsert (``INSERT ... ON CONFLICT DO UPDATE ... RETURNING``) that appends the request's time,
keeps the last ``limit + 1`` and returns them. The request is over the limit when the ``limit`` arrivals before it
all lie within the window: an exact sliding window, and Retry-After is when the oldest of them leaves it. A refused
request raises :class:`Throttled`, which rolls back the transaction, so it leaves no trace. Atomic on both
backends: the upsert locks the row (PostgreSQL) or the database (SQLite) until its transaction ends, so concurrent
checks of one id wait for each other and each sees those before it; a first insert racing another is resolved by
``ON CONFLICT``. The log holds ``limit + 1`` times, which suits the small limits here. Times are the node's wall
clock (nodes keep time, as certificate validity already requires); skew between nodes shifts a window by the skew.

A check runs in the caller's transaction when given its connection (a registration counts in its own write
transaction: one statement more, no commit of its own), else in a short transaction of its own (a poll). Each process also
remembers the refusals it has seen until they end (:meth:`PollThrottle.check_known`, no statement): a refusal is
certain until then whatever other processes do, so a device that keeps trying is answered without the database.
Rows whose newest arrival has left the window are deleted by a sweep each process runs every few minutes
(one ``DELETE``), so the table holds only ids seen lately.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy import Integer, bindparam, case, delete, func
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import Insert

from opendps.errors import Throttled
from opendps.store import Store, Transaction, joined, table_of
from opendps.store.models import RequestLimit

log = logging.getLogger("opendps.provisioning")

POLL_LIMIT = 5
POLL_WINDOW = 10.0
REGISTRATION_LIMIT = 10
REGISTRATION_WINDOW = 60.0
SERVICE_RATE = 1000.0  # register requests per second, sustained
SERVICE_BURST = 1000
SWEEP_EVERY = 300.0  # seconds between one process's sweeps of the rows that count for nothing any more

_STAMP = 13  # digits of a time in ms since the epoch (until the year 2286)
_LIMITS = table_of(RequestLimit)
_SWEEP = delete(_LIMITS).where(_LIMITS.c.expires_at <= bindparam("b_now"))


def _upsert(dialect: str) -> Insert:
    """Append one arrival to (name, key)'s log after the last ``limit`` ones before it; return the log."""
    c = _LIMITS.c
    values: dict[str, Any] = {"name": bindparam("b_name"), "registration_key": bindparam("b_key"),
                              "arrivals": bindparam("b_stamp"), "expires_at": bindparam("b_expires")}
    if dialect == "sqlite":
        ins: sqlite.Insert | postgresql.Insert = sqlite.insert(_LIMITS).values(values)
    elif dialect == "postgresql":
        ins = postgresql.insert(_LIMITS).values(values)
    else:
        raise NotImplementedError(f"request limits need SQLite or PostgreSQL, not {dialect}")
    new, keep = ins.excluded, bindparam("b_keep", type_=Integer)  # keep: characters of the old log kept (limit times)
    # c.* is the stored row as it was (SET expressions see the old row), new.* the row this statement proposed
    kept = case((func.length(c.arrivals) > keep, func.substr(c.arrivals, func.length(c.arrivals) - keep + 1)),
                else_=c.arrivals)
    newest = case((new.expires_at > c.expires_at, new.expires_at), else_=c.expires_at)
    return ins.on_conflict_do_update(index_elements=[c.name, c.registration_key],
                                     set_={"arrivals": kept + new.arrivals, "expires_at": newest}).returning(c.arrivals)


_UPSERTS = {dialect: _upsert(dialect) for dialect in ("sqlite", "postgresql")}


class PollThrottle:
    """Sliding-window limit per registration id, shared by every process on the store's database."""

    what = "requests"
    name = "poll"  # the limit's rows in request_limits
    sweep_every = SWEEP_EVERY

    def __init__(self, store: Store, limit: int = POLL_LIMIT, window: float = POLL_WINDOW,
                 max_tracked: int = 100_000) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("a request limit needs limit >= 1 and a window > 0")
        self.store, self.limit, self.window, self.max_tracked = store, limit, window, max_tracked
        self._window_ms = round(window * 1000)
        self._refused: dict[str, float] = {}  # key -> end of a refusal this process has seen (epoch seconds)
        self._lock = threading.Lock()
        self._last_sweep = time.monotonic()

    def check(self, registration_id: str, now: float | None = None, *,
              within: Session | Transaction | None = None) -> None:
        """Count one; Throttled (with ``info["retryAfter"]``) when the window is full. With ``within``, one
        statement in the caller's transaction, which must end with the exception (it does when it propagates out
        of :meth:`Store.session` or :meth:`Store.transaction`); without it, one statement in a transaction of its
        own. ``now``: epoch seconds."""
        key = registration_id.lower()
        now = time.time() if now is None else now
        self._known(key, registration_id, now)
        if within is not None:
            self._count(joined(within), key, registration_id, now)
            return
        self._maybe_sweep(now)
        with self.store.transaction() as tx:
            self._count(tx, key, registration_id, now)

    def check_known(self, registration_id: str, now: float | None = None) -> None:
        """Throttled if this process has seen the id refused and the refusal still holds — no statement; then the
        occasional sweep. Outside any transaction (the sweep takes a connection of its own)."""
        now = time.time() if now is None else now
        self._known(registration_id.lower(), registration_id, now)
        self._maybe_sweep(now)

    def sweep(self, now: float | None = None) -> int:
        """Delete the rows (of every limit) whose newest arrival has left its window; how many."""
        now = time.time() if now is None else now
        with self.store.engine.begin() as conn:
            return conn.execute(_SWEEP, {"b_now": int(now * 1000)}).rowcount or 0

    # ---- internals ----
    def _count(self, tx: Transaction, key: str, registration_id: str, now: float) -> None:
        now_ms = int(now * 1000)
        row = tx.first(_UPSERTS[tx.dialect.name], b_name=self.name, b_key=key, b_stamp=f"{now_ms:0{_STAMP}d}",
                       b_expires=now_ms + self._window_ms, b_keep=self.limit * _STAMP)
        assert row is not None, "an upsert ... RETURNING gives its row"
        arrivals: str = row.arrivals
        before = [int(arrivals[i:i + _STAMP]) for i in range(0, len(arrivals) - _STAMP, _STAMP)]  # all but this one
        # an arrival more than a window after now was stamped before the wall clock was stepped back (NTP): when it
        # came is unknown, and counting it refused the device until the clock caught up (the step's length, e.g. an
        # hour); it counts for nothing (a step back gives at most one window's allowance more); a node whose clock
        # runs a little ahead still counts
        before = [stamp for stamp in before if stamp <= now_ms + self._window_ms]
        if len(before) < self.limit:
            return
        oldest = min(before[-self.limit:])
        if oldest <= now_ms - self._window_ms:
            return
        until = (oldest + self._window_ms) / 1000
        self._remember(key, until, now)
        raise self._throttled(registration_id, until - now)

    def _known(self, key: str, registration_id: str, now: float) -> None:
        with self._lock:
            until = self._refused.get(key)
            if until is None:
                return
            if until <= now or until > now + 2 * self.window:  # over, or seen before the clock was stepped back
                del self._refused[key]
                return
        raise self._throttled(registration_id, until - now)

    def _remember(self, key: str, until: float, now: float) -> None:
        with self._lock:
            if len(self._refused) >= self.max_tracked:
                for k in [k for k, u in self._refused.items() if u <= now]:
                    del self._refused[k]
                if len(self._refused) >= self.max_tracked:
                    self._refused.clear()  # forgetting a refusal only costs the next request its statement
            self._refused[key] = until

    def _maybe_sweep(self, now: float) -> None:
        with self._lock:
            if time.monotonic() - self._last_sweep < self.sweep_every:
                return
            self._last_sweep = time.monotonic()
        try:
            swept = self.sweep(now)
        except SQLAlchemyError as exc:  # housekeeping: the request goes on, the next sweep tries again
            log.warning("sweeping the request limits failed: %s", exc)
            return
        log.debug("request limits: %d rows swept", swept)

    def _throttled(self, registration_id: str, wait: float) -> Throttled:
        retry = max(1, int(wait + 0.999))
        return Throttled(f"too many {self.what} for registration {registration_id!r}: at most {self.limit} per "
                         f"{self.window:g} s; retry after {retry} s", info={"retryAfter": str(retry)})


class RegistrationLimit(PollThrottle):
    """Attested registrations per registration id, shared by every process on the store's database. Counted in the
    registration's write transaction, so what counts is what writes: an assignment or a failed allocation; a request
    refused before anything is written (a bad CSR, no policy) is not counted, and a device over its limit is refused
    there, after its decision and before anything is kept — at once, by :meth:`check_known`, once this process has
    seen it refused."""

    what = "registrations"
    name = "register"

    def __init__(self, store: Store, limit: int = REGISTRATION_LIMIT, window: float = REGISTRATION_WINDOW) -> None:
        super().__init__(store, limit, window)


class ServiceLimit:
    """A token bucket over every register request of this process. Deliberately per process, not shared: it
    guards this process's CPU (attestation, CSR checks, signing), which another process's load does not use."""

    def __init__(self, rate: float = SERVICE_RATE, burst: int = SERVICE_BURST) -> None:
        self.rate, self.burst = rate, burst
        self._tokens = float(burst)
        self._at: float | None = None
        self._lock = threading.Lock()

    def take(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            elapsed = max(0.0, now - self._at) if self._at is not None else 0.0
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._at = now
            if self._tokens < 1:
                retry = max(1, int((1 - self._tokens) / self.rate + 0.999))
                raise Throttled(f"the service is taking more than {self.rate:g} registrations per second; retry after "
                                f"{retry} s", info={"retryAfter": str(retry)})
            self._tokens -= 1

