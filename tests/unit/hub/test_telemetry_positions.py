"""Telemetry positions with several writers on one database (processes or nodes): a consumer that follows
"everything after position N" must see every message exactly once, in position order (SQLite and PostgreSQL).

Each writer thread has its own :class:`Store` (its own engine and connections, as another process would) and now
and then holds a transaction open longer before its commit, so that a later position commits before an earlier
one unless the sink prevents it (without the sink's per-hub lock, PostgreSQL fails this every time). Batches mix
two hubs in any order: their locks must not deadlock.
"""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime

import pytest
from sqlalchemy import event

from opendps.hub.telemetry import TelemetrySink
from opendps.store import LinkedHub, Store

WRITERS = 4
BATCHES = 25  # per writer
SLOW = 0.025  # seconds: one commit in five
HUBS = ("alpha", "beta")


def _hubs(store: Store) -> dict[str, int]:
    with store.session() as s:
        hubs = [LinkedHub(name=name, host_name=f"{name}.example", etag="e", created_at=datetime.now(UTC))
                for name in HUBS]
        s.add_all(hubs)
        s.flush()
        return {hub.name: hub.id for hub in hubs}


def test_a_reader_following_positions_sees_every_message_once_and_in_order(store):
    hub_ids = _hubs(store)
    appended: dict[str, dict[int, bytes]] = {name: {} for name in HUBS}  # hub → position → body
    errors: list[BaseException] = []
    done = threading.Event()

    def write(n: int) -> None:
        rnd = random.Random(n)
        own = Store(store.url)
        # inside the transaction, after the INSERT took its ids, now and then a slow commit (a busy disk, a far
        # database): the other writers commit later positions meanwhile, unless the sink makes them wait
        event.listen(own.engine, "commit", lambda _conn: time.sleep(SLOW) if rnd.random() < 0.2 else None)
        sink = TelemetrySink(own)
        try:
            for b in range(BATCHES):
                # a batch mixes both hubs in any order, as a group commit does
                names = [rnd.choice(HUBS) for _ in range(rnd.randint(1, 4))]
                messages = [(hub_ids[name], f"dev-{n}", {}, {}, f"{n}/{b}/{i}".encode()) for i, name in enumerate(names)]
                for name, message, position in zip(names, messages, sink.append_many(messages), strict=True):
                    appended[name][position] = message[4]
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)
        finally:
            own.dispose()

    seen: dict[str, list[tuple[int, bytes]]] = {name: [] for name in HUBS}

    def follow() -> None:
        own = Store(store.url)
        sink = TelemetrySink(own)
        positions = dict.fromkeys(HUBS, 0)
        try:
            while True:
                finished = done.is_set()  # the writers finished: everything is committed, read until the end
                read = 0
                for name in HUBS:
                    for e in sink.read(name, after=positions[name], limit=7):
                        seen[name].append((e.position, e.body))
                        positions[name] = e.position
                        read += 1
                if finished and not read:
                    return
                time.sleep(0.0005)  # a tight loop would slow SQLite's writers down a lot
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            own.dispose()

    reader = threading.Thread(target=follow)
    writers = [threading.Thread(target=write, args=(n,)) for n in range(WRITERS)]
    reader.start()
    for t in writers:
        t.start()
    for t in writers:
        t.join(30)
    done.set()
    reader.join(30)
    assert not errors, errors

    for name in HUBS:
        positions = [p for p, _ in seen[name]]
        assert positions == sorted(set(positions)), f"{name}: positions out of order or repeated"
        missed = sorted(appended[name].keys() - set(positions))
        assert not missed, f"{name}: the reader skipped {len(missed)} of {len(appended[name])} messages: {missed[:10]}"
        assert dict(seen[name]) == appended[name]  # every message once, at the position its writer was given


def test_what_a_batch_stores_reads_back_as_it_was_given(store):
    """Properties (a repeated set, a new one, one with a list value), bodies and the time come back as given; the
    positions returned are the rows' (SQLite takes them from the last row id, PostgreSQL from RETURNING)."""
    hub_ids = _hubs(store)
    sink = TelemetrySink(store)
    sdk = ({"content-type": "application/json", "content-encoding": "utf-8"}, {"unit": "C"})
    messages = [(hub_ids["alpha"], "dev-a", dict(sdk[0]), dict(sdk[1]), b"1"),
                (hub_ids["beta"], "dev-b", {}, {"k": None}, b"2"),
                (hub_ids["alpha"], "dev-a", dict(sdk[0]), dict(sdk[1]), b"3"),
                (hub_ids["alpha"], "dev-c", {}, {"tags": ["a", "b"]}, b"\x00\xff"),
                # equal as dict keys, not as JSON: each must be stored as given
                (hub_ids["beta"], "dev-d", {}, {"n": 1}, b"4"), (hub_ids["beta"], "dev-d", {}, {"n": True}, b"5"),
                (hub_ids["beta"], "dev-d", {}, {"n": 1.0}, b"6")]
    before = datetime.now(UTC)
    first = sink.append_many(messages)
    second = sink.append_many(messages[:1])
    assert first == sorted(first) and len(set(first)) == 7 and second[0] > first[-1]
    alpha = {e.position: e for e in sink.read("alpha", limit=10)}
    beta = {e.position: e for e in sink.read("beta", limit=10)}
    assert set(alpha) == {first[0], first[2], first[3], second[0]} and set(beta) == {first[1], *first[4:]}
    for position, (_, device, system, application, body) in zip(first, messages, strict=True):
        e = alpha.get(position) or beta[position]
        assert (e.device_id, e.system, e.application, e.body) == (device, system, application, body)
        assert [type(v) for v in e.application.values()] == [type(v) for v in application.values()]
        assert before <= e.enqueued_at <= datetime.now(UTC) and e.enqueued_at.tzinfo is not None


@pytest.mark.parametrize("size", [1, 3, 15, 16, 45, 77, 160, 161, 175, 256, 300])
def test_batches_of_any_size_store_each_message_at_its_position(store, size):
    """SQLite cuts a batch into multi-row statements of a multiple of 16 rows up to 160 and the rest (77 = 64 + 13,
    175 = 160 + 15, 300 = 160 + 128 + 12), PostgreSQL into
    statements of at most 256 rows (300 = 256 + 44): every message lands once, at the position returned for it, in
    order."""
    hub_ids = _hubs(store)
    sink = TelemetrySink(store)
    sink.append_many([(hub_ids["alpha"], "before", {}, {}, b"-")])
    messages = [(hub_ids["alpha" if i % 3 else "beta"], f"dev-{i}", {"message-id": str(i)}, {"i": str(i)}, b"%d" % i)
                for i in range(size)]
    positions = sink.append_many(messages)
    assert len(positions) == size and positions == sorted(positions) and len(set(positions)) == size
    events = {e.position: e for hub in ("alpha", "beta") for e in sink.read(hub, limit=1000) if e.device_id != "before"}
    assert sorted(events) == positions
    for position, (_, device, system, application, body) in zip(positions, messages, strict=True):
        e = events[position]
        assert (e.device_id, e.system, e.application, e.body) == (device, system, application, body)
