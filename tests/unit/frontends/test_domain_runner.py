"""The bridge to domain code (``DomainRunner``): a burst runs on the few core threads; a slow call does not hold the
others up; a call whose caller went away before it started never runs."""

from __future__ import annotations

import asyncio
import threading
import time

from opendps.frontends.runtime import DomainRunner


def _thread() -> str:
    time.sleep(0.001)  # some work that lets go of the GIL, as a store call does
    return threading.current_thread().name


def test_a_burst_queues_on_the_core_threads():
    async def main() -> set[str]:
        runner = DomainRunner(workers=8, core=2, stall=0.5)
        try:
            return set(await asyncio.gather(*(runner.run(_thread) for _ in range(64))))
        finally:
            runner.close()

    names = asyncio.run(main())
    assert 1 <= len(names) <= 2 and all(not n.startswith("opendps-domain-spare") for n in names), names


def test_a_call_behind_stuck_core_threads_moves_to_a_spare_one():
    release = threading.Event()

    async def main() -> tuple[str, float, bool]:
        runner = DomainRunner(workers=3, core=1, stall=0.05)
        try:
            stuck = asyncio.ensure_future(runner.run(release.wait, 30))  # a webhook that does not answer
            await asyncio.sleep(0.05)
            started = time.monotonic()
            name = await asyncio.wait_for(runner.run(_thread), 5)
            waited = time.monotonic() - started
            still_stuck = not stuck.done()
            release.set()
            assert await stuck is True
            assert runner.waiting == 0
            return name, waited, still_stuck
        finally:
            release.set()
            runner.close()

    name, waited, still_stuck = asyncio.run(main())
    assert name.startswith("opendps-domain-spare") and still_stuck
    assert waited < 2  # about one stall period, not the stuck call's 30 s


def test_a_call_whose_caller_left_before_it_started_never_runs():
    release = threading.Event()
    ran: list[int] = []

    async def main() -> int:
        runner = DomainRunner(workers=2, core=1, stall=10)  # no spare thread within the test
        try:
            stuck = asyncio.ensure_future(runner.run(release.wait, 30))
            await asyncio.sleep(0.05)
            queued = asyncio.ensure_future(runner.run(ran.append, 1))
            await asyncio.sleep(0.05)
            queued.cancel()
            await asyncio.gather(queued, return_exceptions=True)
            release.set()
            await stuck
            await runner.run(time.sleep, 0.05)  # the core thread is free again and took nothing else
            return runner.waiting
        finally:
            release.set()
            runner.close()

    assert asyncio.run(main()) == 0
    assert ran == []
