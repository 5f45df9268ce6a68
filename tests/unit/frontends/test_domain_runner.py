"""The bridge to domain code (``DomainRunner``): a burst runs on the few core threads; a slow call does not hold the
others up; a call whose caller went away before it started never runs; results and errors reach their callers,
several with one wake-up of the loop."""

from __future__ import annotations

import asyncio
import gc
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


def test_results_and_errors_reach_their_callers_and_closing_cancels_what_did_not_start():
    release = threading.Event()

    def fail() -> None:
        raise KeyError("no such thing")

    def stop() -> None:
        raise StopIteration  # a future cannot hold it: the caller gets a RuntimeError that says so

    async def main() -> tuple[list[object], bool]:
        runner = DomainRunner(workers=1, core=1)
        try:
            answers = await asyncio.gather(runner.run(sum, [1, 2]), runner.run(fail), runner.run(stop),
                                           runner.run(dict, a=1), return_exceptions=True)
            stuck = asyncio.ensure_future(runner.run(release.wait, 30))
            queued = asyncio.ensure_future(runner.run(time.sleep, 0))
            await asyncio.sleep(0.05)
        finally:
            release.set()
            runner.close()  # waits for the running call; the queued one never runs
        await asyncio.gather(stuck, queued, return_exceptions=True)
        return answers, queued.cancelled()

    answers, cancelled = asyncio.run(main())
    assert answers[0] == 3 and answers[3] == {"a": 1}
    assert isinstance(answers[1], KeyError) and isinstance(answers[2], RuntimeError)
    assert "StopIteration" in str(answers[2]) and cancelled


def test_a_runner_nobody_closed_lets_its_threads_end_when_it_is_collected():
    async def main() -> list[threading.Thread]:
        runner = DomainRunner(workers=2, core=2)
        await runner.run(time.sleep, 0)
        return list(runner._threads)

    threads = asyncio.run(main())
    gc.collect()
    for thread in threads:
        thread.join(5)
    assert threads and not any(t.is_alive() for t in threads)


def test_calls_that_finish_together_come_back_with_one_wake_up_of_the_loop():
    """The hand-off back to the loop is where a thread pool spent its Python: results that finish while the loop is
    busy are delivered by one callback, not one each (here the loop is held busy while 16 calls finish)."""
    async def main() -> int:
        runner = DomainRunner(workers=4, core=4)
        loop = asyncio.get_running_loop()
        wakeups = 0
        original = loop.call_soon_threadsafe

        def counted(*args: object, **kwargs: object) -> object:
            nonlocal wakeups
            wakeups += 1
            return original(*args, **kwargs)  # type: ignore[arg-type]

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        try:
            calls = asyncio.gather(*(runner.run(time.sleep, 0.001) for _ in range(16)))
            await asyncio.sleep(0)  # submitted
            time.sleep(0.2)  # the loop is busy: every call finishes meanwhile
            await calls
            return wakeups
        finally:
            loop.call_soon_threadsafe = original  # type: ignore[method-assign]
            runner.close()

    assert asyncio.run(main()) == 1


def _lost_connection() -> None:
    """What SQLAlchemy raises when the PostgreSQL server went away mid-statement (psycopg's own error, wrapped)."""
    import psycopg
    from sqlalchemy.exc import OperationalError

    raise OperationalError("SELECT 1", {}, psycopg.OperationalError("consuming input failed: server closed the "
                                                                    "connection unexpectedly"))


def _integrity() -> None:
    import psycopg
    from sqlalchemy.exc import IntegrityError

    raise IntegrityError("INSERT", {}, psycopg.errors.UniqueViolation("duplicate key"))


def test_a_lost_database_is_a_retryable_refusal_told_once(caplog):
    """Every front end's domain calls go through the runner: a database outage reaches them as ServiceUnavailable (503
    with Retry-After, CONNACK 3), not as a driver error each turns into a 500 and a traceback; the log says once that
    the database went away and once that it is back, however many calls failed meanwhile."""
    from opendps.errors import ServiceUnavailable

    async def main() -> list[BaseException | str]:
        runner = DomainRunner(workers=2, core=2)
        try:
            failed = await asyncio.gather(*(runner.run(_lost_connection) for _ in range(20)), return_exceptions=True)
            answered = await runner.run(lambda: "ok")
            other = await asyncio.gather(runner.run(_integrity), return_exceptions=True)
            return [*failed, answered, *other]
        finally:
            runner.close()

    with caplog.at_level("INFO", logger="opendps.store"):
        outcomes = asyncio.run(main())
    refused, answered, other = outcomes[:20], outcomes[20], outcomes[21]
    assert all(isinstance(e, ServiceUnavailable) and e.status == 503 and e.info["retryAfter"] for e in refused), refused
    assert answered == "ok"
    assert type(other).__name__ == "IntegrityError"  # a statement's own error is the caller's to handle, as before
    lines = [r.getMessage() for r in caplog.records if r.name == "opendps.store"]
    assert len(lines) == 2 and "unavailable" in lines[0] and "server closed the connection" in lines[0], lines
    assert "answers again" in lines[1] and "20 call(s) refused" in lines[1], lines


def _disk_full() -> None:
    """What SQLAlchemy raises when SQLite finds no room for a write (SQLITE_FULL)."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    orig = sqlite3.OperationalError("database or disk is full")
    orig.sqlite_errorcode = sqlite3.SQLITE_FULL
    raise OperationalError("COMMIT", {}, orig)


def test_a_full_disk_is_a_retryable_refusal_told_once_though_reads_still_answer(caplog):
    """A full disk refuses writes while reads (and writes that fit in a reused WAL) still succeed: each such success
    told the outage over and the next refused write told it again, two lines per request. The outage is now over only
    once nothing was refused for ``quiet`` seconds; writes are refused as retryable (503) meanwhile, not as 500s."""
    from opendps.errors import ServiceUnavailable

    async def main(runner: DomainRunner) -> list[object]:
        outcomes: list[object] = []
        for _ in range(5):  # a write refused, a read answered, over and over
            outcomes += await asyncio.gather(runner.run(_disk_full), return_exceptions=True)
            outcomes.append(await runner.run(lambda: "read"))
        runner.outage.quiet = 0.0  # room again: nothing refused for the quiet time (not waited for here)
        outcomes.append(await runner.run(lambda: "write"))
        return outcomes

    runner = DomainRunner(workers=2, core=2)
    runner.outage.quiet = 3600.0
    try:
        with caplog.at_level("INFO", logger="opendps.store"):
            outcomes = asyncio.run(main(runner))
    finally:
        runner.close()
    refused = outcomes[0:10:2]
    assert all(isinstance(e, ServiceUnavailable) and e.status == 503 and e.info["retryAfter"] for e in refused), refused
    assert outcomes[1:10:2] == ["read"] * 5 and outcomes[-1] == "write"
    lines = [r.getMessage() for r in caplog.records if r.name == "opendps.store"]
    assert len(lines) == 2, lines
    assert "cannot store" in lines[0] and "database or disk is full" in lines[0], lines
    assert "stores again" in lines[1] and "5 call(s) refused" in lines[1], lines
