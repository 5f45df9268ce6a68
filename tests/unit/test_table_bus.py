"""The SQLite table bus: live messages read on the event loop through a connection that never waits."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest
from tests.conftest import migrated_store

from opendps.cluster.bus import TableBus
from opendps.cluster.nodes import MessageReader, Nodes
from opendps.store import Store


@pytest.fixture
def sqlite_store(tmp_path):
    store = migrated_store(f"sqlite:///{tmp_path}/bus.db")
    yield store
    store.dispose()


def test_messages_are_read_without_a_domain_call_per_tick(sqlite_store):
    """One domain call (the last id, at start) and then none, however many ticks: the reads are the loop's own."""
    nodes = Nodes(sqlite_store)
    calls: list[str] = []

    async def run(fn, *args, **kwargs):
        calls.append(fn.__name__)
        return fn(*args, **kwargs)

    async def main() -> list[dict]:
        nodes.post(None, '{"to":null,"m":{"n":0}}')  # before the start: not for this node
        bus = TableBus(nodes, run, interval=0.01)
        got: list[dict] = []
        await bus.start("node-a", got.append)
        try:
            await asyncio.sleep(0.1)  # ten ticks with nothing new
            await bus.publish({"n": 1})  # broadcast
            nodes.post("node-b", '{"to":"node-b","m":{"n":2}}')  # another node's
            await bus.publish({"n": 3}, to="node-a")
            deadline = time.monotonic() + 5
            while len(got) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
        finally:
            await bus.close()
        return got

    got = asyncio.run(main())
    assert got == [{"n": 1}, {"n": 3}]
    assert calls == ["last_message", "post", "post"], calls  # no fetch through the domain threads


def test_a_locked_database_is_skipped_at_once_not_waited_for(sqlite_store):
    nodes = Nodes(sqlite_store)
    first = nodes.post(None, "one")
    sqlite_store.engine.dispose()  # WAL connections share the file: only a lone connection can lock it for reading
    holder = sqlite3.connect(sqlite_store.engine.url.database, timeout=0, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("SELECT count(*) FROM live_messages").fetchall()  # takes the lock and keeps it
        reader = MessageReader.open(sqlite_store)
        assert reader is not None
        started = time.monotonic()
        assert reader.fetch("node-a", 0) is None
        assert time.monotonic() - started < 1  # the store's own connections would wait up to 10 s
        holder.execute("COMMIT")
    finally:
        holder.close()
    assert reader.fetch("node-a", 0) == [(first, "one")]
    assert reader.fetch("node-a", first) == []
    reader.close()
    with pytest.raises(RuntimeError, match="closed"):
        reader.fetch("node-a", 0)


def test_only_sqlite_files_get_a_reader(store):
    memory = Store("sqlite://")
    try:
        assert MessageReader.open(memory) is None
    finally:
        memory.dispose()
    reader = MessageReader.open(store)  # the suite's store: a SQLite file, or PostgreSQL (which has its own bus)
    assert (reader is not None) == (store.dialect == "sqlite")
    if reader is not None:
        reader.close()


def test_a_node_alone_reads_seldom_and_at_once_when_another_joins(sqlite_store):
    """A single server (no other node alive) has nothing to read: it reads at the long interval instead of 20 times a
    second (most of an idle server's CPU); a heartbeat that sees another node wakes the reader at once."""
    nodes = Nodes(sqlite_store)

    async def run(fn, *args, **kwargs):
        return fn(*args, **kwargs)

    async def delivered_within(got: list, count: int, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while len(got) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return len(got) >= count

    async def main() -> None:
        bus = TableBus(nodes, run, interval=0.01, alone_interval=30)
        got: list[dict] = []
        await bus.start("node-a", got.append)
        try:
            bus.peers(0)
            await asyncio.sleep(0.05)  # the tick that was already due
            nodes.post("node-a", '{"to":"node-a","m":{"n":1}}')
            assert not await delivered_within(got, 1, 0.3)  # alone: the next read is 30 s away
            bus.peers(1)
            assert await delivered_within(got, 1, 1)  # woken at once
            nodes.post("node-a", '{"to":"node-a","m":{"n":2}}')
            assert await delivered_within(got, 2, 1)  # and reading at the short interval again
        finally:
            await bus.close()
        assert got == [{"n": 1}, {"n": 2}]

    asyncio.run(main())


def test_the_heartbeat_tells_the_bus_how_many_other_nodes_are_alive(sqlite_store):
    from opendps.cluster import Bus, Cluster

    class Counting(Bus):
        def __init__(self) -> None:
            self.told: list[int] = []

        def peers(self, count: int) -> None:
            self.told.append(count)

    async def run(fn, *args, **kwargs):
        return fn(*args, **kwargs)

    async def main() -> list[int]:
        bus = Counting()
        cluster = Cluster(sqlite_store, bus, run, heartbeat=60)
        await cluster.start(lambda _m: None)
        other = Cluster(sqlite_store, Counting(), run)
        Nodes(sqlite_store).join(other._info())
        assert await cluster.alive(other.node_id)  # a node not on the list: read again
        await cluster.stop()
        return bus.told

    assert asyncio.run(main()) == [0, 1]
