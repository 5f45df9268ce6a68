"""The refusal log's writer in each process: front ends hand it the device requests they refused (a DPS
registration, a hub CONNECT), and it stores them in batches, off the event loop (``audit.refusals``).

Bounded: at most :data:`PER_SECOND` refusals a second per process are stored (a flood is counted —
``opendps_registration_refusals_total``, ``opendps_hub_connect_refusals_total`` — and the rest of it dropped from the
log: ``opendps_refusal_log_dropped_total``); a batch is written at most every :data:`FLUSH_DELAY` seconds, in one
insert, and a store error loses that batch only (logged once), never the request that was refused anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from opendps.audit.refusals import Refusal, RefusalLog
from opendps.errors import OpenDPSError, ServiceUnavailable
from opendps.frontends import metrics

log = logging.getLogger("opendps.refusals")
PER_SECOND = 100
FLUSH_DELAY = 0.2


class RefusalRecorder:
    def __init__(self, refusal_log: RefusalLog, run: Callable[..., Awaitable[Any]], *,
                 per_second: int = PER_SECOND) -> None:
        self.log = refusal_log
        self.run = run
        self.per_second = per_second
        self._pending: list[Refusal] = []
        self._second = 0
        self._this_second = 0
        self._writer: asyncio.Task[None] | None = None
        self._failed = False

    def add(self, kind: str, subject: str, transport: str, exc: OpenDPSError, *, hub: str | None = None) -> None:
        """Record one refusal (on the event loop; never blocks, never raises)."""
        second = int(time.monotonic())
        if second != self._second:
            self._second, self._this_second = second, 0
        self._this_second += 1
        if self._this_second > self.per_second:
            metrics.REFUSAL_LOG_DROPPED.inc()
            return
        self._pending.append(Refusal(datetime.now(UTC), kind, subject[:128], transport, exc.reason, exc.error_code,
                                     exc.message[:512], hub[:255] if hub else None))
        if self._writer is None or self._writer.done():
            with contextlib.suppress(RuntimeError):  # no running loop (in-process use): stays pending
                self._writer = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        while self._pending:
            await asyncio.sleep(FLUSH_DELAY)
            batch, self._pending = self._pending, []
            try:
                await self.run(self.log.record, batch)
                self._failed = False
            except Exception as exc:  # the refusal was answered; its log row is what is lost (logged once)
                if not self._failed:  # a database outage is told by the domain runner: no traceback for it here
                    log.warning("cannot write %d refusal(s) to the refusal log: %s", len(batch), exc,
                                exc_info=not isinstance(exc, ServiceUnavailable))
                self._failed = True

    async def flush(self) -> None:
        """Write what is pending now (at shutdown)."""
        if self._writer is not None and not self._writer.done():
            with contextlib.suppress(Exception):
                await self._writer
        if self._pending:
            batch, self._pending = self._pending, []
            with contextlib.suppress(Exception):
                await self.run(self.log.record, batch)
