"""Background loops that retry while the store is away (the node's heartbeat, the presence writer) say so once when
it starts failing and once when it works again, not at every retry: an outage of a minute was dozens of warnings per
process, on top of the one the domain runner logs for the requests it refused."""

from __future__ import annotations

import asyncio
import logging

from opendps.cluster import Bus, Cluster
from opendps.hub.presence import Change, PresenceWriter

AWAY = 4  # failed attempts before the store answers again


def test_the_heartbeat_says_an_outage_once(caplog):
    failures = [AWAY]
    beaten = asyncio.Event()

    async def run(fn, *args):
        name = fn.__name__
        if name == "beat":
            if failures[0]:
                failures[0] -= 1
                raise OSError("the database is away")
            beaten.set()
            return True
        return [] if name == "alive" else None  # join, leave

    async def main() -> None:
        cluster = Cluster(None, Bus(), run, heartbeat=0.001)  # type: ignore[arg-type]
        await cluster.start(lambda _m: None)
        await asyncio.wait_for(beaten.wait(), 10)
        await cluster.stop()

    with caplog.at_level(logging.DEBUG, logger="opendps.cluster"):
        asyncio.run(main())
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "heartbeat" in r.getMessage()]
    assert [level for level, _ in said if level != "DEBUG"] == ["WARNING", "INFO"], said
    assert "failed" in said[0][1] and f"resumed after {AWAY} failed" in said[-1][1], said


def test_the_presence_writer_says_an_outage_once(caplog, monkeypatch):
    failures = [AWAY]
    written: list[list[Change]] = []

    class Recorder:
        def record(self, node_id: str, changes: list[Change]) -> list:
            if failures[0]:
                failures[0] -= 1
                raise OSError("the database is away")
            written.append(list(changes))
            return []

    async def run(fn, *args):
        return fn(*args)

    real_sleep = asyncio.sleep

    async def no_backoff(delay: float, *args):  # the writer's backoff (0.4 s, doubling) is not what is tested
        await real_sleep(0)

    async def main() -> None:
        writer = PresenceWriter(Recorder(), "node-a", run, linger=0)  # type: ignore[arg-type]
        writer.add(Change(1, "d1", "s1", True))
        await writer.flush()

    monkeypatch.setattr(asyncio, "sleep", no_backoff)
    with caplog.at_level(logging.DEBUG, logger="opendps.hub"):
        asyncio.run(main())
    assert len(written) == 1
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "presence" in r.getMessage()]
    assert [level for level, _ in said if level != "DEBUG"] == ["WARNING", "INFO"], said
    assert f"after {AWAY} failed" in said[-1][1], said
