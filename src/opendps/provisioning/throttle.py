"""Per-device request limits of the DPS device API, as in Azure: 5 polls or status lookups per 10 s per
registration id, then 429 with Retry-After. Kept per process in memory (a limit, not a record)."""

from __future__ import annotations

import threading
import time
from collections import deque

from opendps.errors import Throttled

POLL_LIMIT = 5
POLL_WINDOW = 10.0


class PollThrottle:
    """Sliding-window limit per registration id; safe to call from the domain's threads."""

    def __init__(self, limit: int = POLL_LIMIT, window: float = POLL_WINDOW, max_tracked: int = 100_000) -> None:
        self.limit, self.window, self.max_tracked = limit, window, max_tracked
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def check(self, registration_id: str, now: float | None = None) -> None:
        """Count one request; Throttled (with ``info["retryAfter"]``) when the window is full."""
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
                raise Throttled(f"too many requests for registration {registration_id!r}: at most {self.limit} per "
                                f"{self.window:g} s; retry after {retry} s", info={"retryAfter": str(retry)})
            hits.append(now)

    def _prune(self, now: float) -> None:
        for k in [k for k, h in self._hits.items() if not h or h[-1] <= now - self.window]:
            del self._hits[k]
