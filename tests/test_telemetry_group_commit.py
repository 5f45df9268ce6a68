"""Telemetry group commit: concurrent publishes share transactions, each caller learns its own position only
after its message is stored, and one oversized message fails only its own caller (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from sqlalchemy import event, func, select

from opendps.errors import PayloadTooLarge
from opendps.hub.telemetry import MAX_MESSAGE_BYTES, GroupCommit, TelemetrySink
from opendps.store import LinkedHub, TelemetryEvent


def _hub(store) -> int:
    with store.session() as s:
        hub = LinkedHub(name="default", host_name="hub.example", etag="e", created_at=datetime.now(UTC))
        s.add(hub)
        s.flush()
        return hub.id


def test_concurrent_publishes_share_transactions_and_keep_their_positions(store):
    hub_id = _hub(store)
    sink = TelemetrySink(store)
    commits = []  # transactions: each is a connection taken from the pool (the sink commits on the driver's own)
    event.listen(store.engine, "checkout", lambda *_: commits.append(1))

    told: list[tuple[int, int]] = []  # on_stored: (messages in the batch, callers already answered)

    async def main() -> list[int | BaseException]:
        loop = asyncio.get_running_loop()
        answered: list[int] = []
        writer = GroupCommit(sink, lambda fn, *a: loop.run_in_executor(None, fn, *a), max_batch=64,
                             on_stored=lambda batch: told.append((len(batch), len(answered))))
        bodies = [f"m{i}".encode() for i in range(300)]
        bodies[17] = b"x" * (MAX_MESSAGE_BYTES + 1)

        async def append(i: int, body: bytes) -> int:
            position = await writer.append(hub_id, f"dev-{i % 7}", {"message-id": str(i)}, {"i": str(i)}, body)
            answered.append(i)
            return position
        return await asyncio.gather(*(append(i, b) for i, b in enumerate(bodies)), return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results[17], PayloadTooLarge)
    # told once per stored batch, of every message in it, before any of its callers heard
    assert sum(n for n, _ in told) == 299 and len(told) == len(commits)
    assert [before for _, before in told] == [sum(n for n, _ in told[:k]) for k in range(len(told))]
    positions = [r for i, r in enumerate(results) if i != 17]
    assert all(isinstance(p, int) for p in positions)
    assert positions == sorted(positions) and len(set(positions)) == 299  # publish order = position order
    assert len(commits) <= 10, len(commits)  # 299 messages in batches of at most 64, not one commit each
    with store.session() as s:
        stored = {r.id: r for r in s.scalars(select(TelemetryEvent))}
        assert s.scalar(select(func.count()).select_from(TelemetryEvent)) == 299
    for i, position in enumerate(results):
        if i != 17:  # each caller's position is its own message
            assert stored[position].body == f"m{i}".encode() and stored[position].properties == {"i": str(i)}


class _RefusingOnce(TelemetrySink):
    """A sink whose first transaction the store refuses after its INSERT (a lost connection, a failed commit)."""

    refused = False

    def append_many(self, messages):
        if self.refused:
            return super().append_many(messages)
        self.refused = True
        with self.store.driver_transaction() as conn:  # rolled back: nothing of it stays
            self._append_sqlite(conn, messages, datetime.now(UTC)) if self.store.dialect == "sqlite" else \
                self._append_postgresql(conn, messages, datetime.now(UTC))
            raise RuntimeError("the store refused the transaction")


def test_a_failed_transaction_fails_every_caller_in_it_and_the_writer_goes_on(store):
    hub_id = _hub(store)
    sink = _RefusingOnce(store)

    async def main() -> tuple[list, list]:
        loop = asyncio.get_running_loop()
        writer = GroupCommit(sink, lambda fn, *a: loop.run_in_executor(None, fn, *a))
        # the whole transaction is refused (a hub unlinked meanwhile is another matter: tests/test_management_races.py)
        bad = await asyncio.gather(writer.append(hub_id, "a", {}, {}, b"1"), writer.append(hub_id, "b", {}, {}, b"2"),
                                   return_exceptions=True)
        good = await asyncio.gather(*(writer.append(hub_id, "c", {}, {}, b"3") for _ in range(5)))
        return bad, good

    bad, good = asyncio.run(main())
    assert all(isinstance(r, Exception) for r in bad), bad
    assert len(set(good)) == 5
    with store.session() as s:
        assert s.scalars(select(TelemetryEvent.body)).all() == [b"3"] * 5  # nothing of the failed batch


@pytest.mark.parametrize("size", [0, MAX_MESSAGE_BYTES])
def test_sizes_at_the_limits_are_stored(store, size):
    hub_id = _hub(store)
    [position] = TelemetrySink(store).append_many([(hub_id, "d", {}, {}, b"y" * size)])
    assert position > 0


def test_an_oversized_message_stores_nothing_of_its_batch(store):
    hub_id = _hub(store)
    with pytest.raises(PayloadTooLarge):
        TelemetrySink(store).append_many([(hub_id, "d", {}, {}, b"ok"), (hub_id, "d", {}, {}, b"y" * (MAX_MESSAGE_BYTES + 1))])
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(TelemetryEvent)) == 0


def test_a_stalled_store_slows_publishers_instead_of_queueing_without_bound(store):
    """Issue 14: at most max_pending_bytes wait for the store; the next publisher waits for room, and goes on once
    the store has caught up — nothing is lost, nothing answered before it is stored."""
    hub_id = _hub(store)
    sink = TelemetrySink(store)
    body = b"z" * 100_000

    async def main() -> None:
        loop = asyncio.get_running_loop()
        gate = asyncio.Event()

        async def stalled(fn, *args):
            await gate.wait()  # the store is stuck until the gate opens
            return await loop.run_in_executor(None, fn, *args)

        writer = GroupCommit(sink, stalled, max_batch=4, max_pending_bytes=MAX_MESSAGE_BYTES + 100_000)
        tasks = [asyncio.create_task(writer.append(hub_id, f"dev-{i}", {}, {}, body)) for i in range(20)]
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert writer.pending_bytes <= writer.max_pending_bytes  # bounded, though 20 publishers wait
        assert writer.pending_bytes == 3 * len(body)  # 3 fit (358,144 bytes), the other 17 wait for room
        assert not any(t.done() for t in tasks)  # none acknowledged: nothing is stored yet
        gate.set()
        positions = await asyncio.gather(*tasks)
        assert len(set(positions)) == 20 and writer.pending_bytes == 0

    asyncio.run(main())
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(TelemetryEvent)) == 20


def test_a_lone_message_is_written_at_once_and_a_stream_lingers_into_larger_batches(store):
    """The writer's first batch after it was idle goes at once; a batch that arrived while a write ran waits
    ``linger`` for more, so a stream is stored in fewer, larger transactions."""
    hub_id = _hub(store)
    sink = TelemetrySink(store)

    async def main() -> list[list[bytes]]:
        loop = asyncio.get_running_loop()
        gate = asyncio.Event()
        batches: list[list[bytes]] = []

        async def run(fn, messages):
            batches.append([m[4] for m in messages])
            if len(batches) == 1:
                await gate.wait()  # the first write is still running while more arrive
            return await loop.run_in_executor(None, fn, messages)

        writer = GroupCommit(sink, run, linger=0.3)
        first = asyncio.create_task(writer.append(hub_id, "d", {}, {}, b"1"))
        await asyncio.sleep(0)  # the writer task starts
        await asyncio.sleep(0)
        assert batches == [[b"1"]]  # no wait before the first
        later = [asyncio.create_task(writer.append(hub_id, "d", {}, {}, b)) for b in (b"2", b"3")]
        await asyncio.sleep(0.05)
        gate.set()
        await first
        await asyncio.sleep(0.1)  # within the linger: arrives in time for the next batch
        later.append(asyncio.create_task(writer.append(hub_id, "d", {}, {}, b"4")))
        await asyncio.gather(*later)
        return batches

    assert asyncio.run(main()) == [[b"1"], [b"2", b"3", b"4"]]


def test_submitted_messages_share_one_future_done_when_all_of_them_are_stored(store):
    """``submit`` (the MQTT pipeline's way in): the messages queued for one transaction share one future; one that a
    larger queue spreads over several transactions is done only after the last of them; what is submitted after a
    transaction was cut waits for the next one, under a new future; a failed transaction fails its future."""
    hub_id = _hub(store)
    sink = TelemetrySink(store)

    async def main() -> dict[str, object]:
        loop = asyncio.get_running_loop()
        seen: list[tuple[int, bool]] = []  # per stored batch: its size, and whether the shared future was done
        futures: list[asyncio.Future] = []
        writer = GroupCommit(sink, lambda fn, *a: loop.run_in_executor(None, fn, *a), max_batch=4, linger=0,
                             on_stored=lambda batch: seen.append((len(batch), futures[0].done())))
        futures.extend(writer.submit(hub_id, "d", {}, {"i": str(i)}, b"%d" % i) for i in range(10))
        await asyncio.sleep(0)  # the writer cuts its first transaction (4 of the 10)
        late = writer.submit(hub_id, "d", {}, {}, b"late")
        await asyncio.gather(futures[0], late)
        stored_when_done = len(sink.read("default", limit=50))
        bad = writer.submit(hub_id + 999, "d", {}, {}, b"no such hub")  # fails its whole transaction
        problem = await asyncio.gather(bad, return_exceptions=True)
        after = writer.submit(hub_id, "d", {}, {}, b"after")
        await after
        return {"same": len({id(f) for f in futures}) == 1 and late is not futures[0] and after is not bad,
                "seen": seen, "stored_when_done": stored_when_done, "problem": problem[0]}

    outcome = asyncio.run(main())
    assert outcome["same"]
    # three transactions for the first 10 (+ "late" in the last); the future was not done after the first two
    assert outcome["seen"][:3] == [(4, False), (4, False), (3, False)] and len(outcome["seen"]) == 4
    assert outcome["stored_when_done"] == 11
    assert isinstance(outcome["problem"], Exception)
    with store.session() as s:
        assert s.scalars(select(TelemetryEvent.body).order_by(TelemetryEvent.id)).all() == [
            *(b"%d" % i for i in range(10)), b"late", b"after"]
