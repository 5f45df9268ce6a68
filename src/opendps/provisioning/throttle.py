"""Request limits of the DPS device API, as in Azure (429 + Retry-After). Kept per process in memory: limits,
not records; each is safe to call from the domain's threads.

- :class:`PollThrottle`: 5 polls or status lookups per 10 s per registration id;
- :class:`RegistrationLimit`: 10 *attested* registrations per minute per registration id — counted after the
  credential is proven, so nobody can use up a device's allowance without its credential, and a device that
  loops cannot get certificate after certificate;
- :class:`ServiceLimit`: every register request of the service, a token bucket sized far above a factory
  burst of distinct devices (default 1,000 per second) that keeps a flood from taking every core.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from opendps.errors import Throttled

POLL_LIMIT = 5
POLL_WINDOW = 10.0
REGISTRATION_LIMIT = 10
REGISTRATION_WINDOW = 60.0
SERVICE_RATE = 1000.0  # register requests per second, sustained
SERVICE_BURST = 1000


class PollThrottle:
    """Sliding-window limit per registration id."""

    what = "requests"

    def __init__(self, limit: int = POLL_LIMIT, window: float = POLL_WINDOW, max_tracked: int = 100_000) -> None:
        self.limit, self.window, self.max_tracked = limit, window, max_tracked
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def check(self, registration_id: str, now: float | None = None) -> None:
        """Count one; Throttled (with ``info["retryAfter"]``) when the window is full."""
        key = registration_id.lower()
        now = time.monotonic() if now is None else now
        with self._lock:
            hits = self._hits.get(key)
            if hits is None:
                if len(self._hits) >= self.max_tracked:
                    self._prune(now)
                hits = self._hits[key] = deque()
            while hits and hits[0] <= now - self.window:
                hits.popleft()
            if len(hits) >= self.limit:
                retry = max(1, int(hits[0] + self.window - now + 0.999))
                raise Throttled(f"too many {self.what} for registration {registration_id!r}: at most {self.limit} per "
                                f"{self.window:g} s; retry after {retry} s", info={"retryAfter": str(retry)})
            hits.append(now)

    def _prune(self, now: float) -> None:
        for k in [k for k, h in self._hits.items() if not h or h[-1] <= now - self.window]:
            del self._hits[k]


class RegistrationLimit(PollThrottle):
    """Attested registrations per registration id."""

    what = "registrations"

    def __init__(self, limit: int = REGISTRATION_LIMIT, window: float = REGISTRATION_WINDOW) -> None:
        super().__init__(limit, window)


class ServiceLimit:
    """A token bucket over every register request of this process."""

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
