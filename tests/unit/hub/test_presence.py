"""Presence and the routing of live hub state between nodes, in-process: two nodes (``Cluster`` + ``LiveSessions``)
on one store — the real bus of that store (the live_messages table on SQLite, LISTEN/NOTIFY on PostgreSQL) — with a
device link that records what the front end would have sent. The MQTT front end over real processes is
tests/test_scale_out.py."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from opendps.cluster import Cluster, Nodes, choose_bus
from opendps.hub import AuthenticatedDevice, DeviceOffline, LiveSessions, MethodTimeout, Presence
from opendps.hub.live import C2D, DESIRED, METHODS
from opendps.hub.presence import Change, PresenceWriter


class Link:
    """What a connected device's front end does with the calls, recorded."""

    def __init__(self, live: LiveSessions, device: AuthenticatedDevice, answer: bool = True) -> None:
        self.live, self.device, self.answer = live, device, answer
        self.sent: list[tuple[str, Any]] = []
        self.closed: str | None = None

    def subscribed(self, feature: str) -> bool:
        return feature in (METHODS, DESIRED, C2D)

    async def send_method(self, method: str, request_id: str, payload: Any) -> None:
        self.sent.append(("method", method))
        if self.answer:
            asyncio.get_running_loop().call_soon(self.live.method_answered, self, request_id, 200, {"m": method})

    async def send_desired(self, desired: dict[str, Any], version: int) -> None:
        self.sent.append(("desired", (desired, version)))

    def wake_c2d(self) -> None:
        self.sent.append(("c2d", None))

    def close(self, reason: str) -> None:
        self.closed = reason
        self.live.detach(self)


async def _until(check, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "not within the time"
        await asyncio.sleep(0.01)


def _nodes_and_presence(services):
    """The default hub, two nodes' rows (a, b) joined on the test's store, and presence over it."""
    store, hubs = services.store, services.hubs
    nodes = Nodes(store)
    a, b = (Cluster(store, None, None)._info() for _ in range(2))  # type: ignore[arg-type]
    nodes.join(a)
    nodes.join(b)
    return hubs.list()[0], nodes, a, b, Presence(store, hubs)


def test_presence_records_in_order_and_reports_displaced_sessions(services):
    hub, nodes, a, b, presence = _nodes_and_presence(services)
    # attach then detach in one batch: nothing is left; attach twice: the last session wins
    assert presence.record(a.id, [Change(hub.id, "d1", "s1", True), Change(hub.id, "d1", "s1", False),
                                  Change(hub.id, "d2", "s2", True), Change(hub.id, "d2", "s3", True)]) == []
    assert presence.locate(hub.name, "D1") is None and presence.locate(hub.name, "d2") == (a.id, "s3")
    # node b takes d2 over: a's session is reported, b's row replaces it; a's late detach of s3 changes nothing
    [displaced] = presence.record(b.id, [Change(hub.id, "d2", "s4", True)])
    assert (displaced.node_id, displaced.device_key, displaced.session) == (a.id, "d2", "s3")
    presence.record(a.id, [Change(hub.id, "d2", "s3", False)])
    assert presence.locate(hub.name, "d2") == (b.id, "s4")
    assert presence.connected(hub.name) == {"d2"} and presence.connected(hub.name, ["D2", "x"]) == {"d2"}
    assert presence.connected(hub.name, []) == frozenset()
    # a node's rows go with its row (the sweep of a dead node)
    nodes.leave(b.id)
    assert presence.locate(hub.name, "d2") is None


def test_a_batch_keeps_the_newest_session_whatever_order_its_changes_came_in(services):
    """A device's new session may attach before its old one's detach arrives, in one batch: the new one stays; an
    old session that ended in a batch where a newer one came and went is gone too."""
    store, hubs = services.store, services.hubs
    hub = hubs.list()[0]
    node = Cluster(store, None, None)._info()  # type: ignore[arg-type]
    Nodes(store).join(node)
    presence = Presence(store, hubs)
    presence.record(node.id, [Change(hub.id, "d1", "s1", True), Change(hub.id, "d2", "t1", True)])
    presence.record(node.id, [Change(hub.id, "d1", "s2", True), Change(hub.id, "d1", "s1", False),
                              Change(hub.id, "d2", "t1", False), Change(hub.id, "d2", "t2", True),
                              Change(hub.id, "d2", "t2", False)])
    assert presence.locate(hub.name, "d1") == (node.id, "s2")
    assert presence.locate(hub.name, "d2") is None
    presence.record(node.id, [Change(hub.id, "d1", "s1", False)])  # a late detach of the old session
    assert presence.locate(hub.name, "d1") == (node.id, "s2")


def test_the_newest_session_wins_by_when_it_began_not_by_when_it_was_written(services):
    """Nodes write their batches in any order: an attach older than another node's recorded session comes back as
    this node's own displaced session and leaves the row alone; a newer one displaces the other node's."""
    hub, _nodes, a, b, presence = _nodes_and_presence(services)
    t0 = datetime.now(UTC)
    assert presence.record(a.id, [Change(hub.id, "d1", "new", True, t0 + timedelta(seconds=1))]) == []
    [mine] = presence.record(b.id, [Change(hub.id, "d1", "old", True, t0)])
    assert (mine.node_id, mine.device_key, mine.session) == (b.id, "d1", "old")
    assert presence.locate(hub.name, "d1") == (a.id, "new")
    presence.record(b.id, [Change(hub.id, "d1", "old", False)])  # b closed it: the row stays a's
    assert presence.locate(hub.name, "d1") == (a.id, "new")
    [theirs] = presence.record(b.id, [Change(hub.id, "d1", "newer", True, t0 + timedelta(seconds=2))])
    assert (theirs.node_id, theirs.session) == (a.id, "new") and presence.locate(hub.name, "d1") == (b.id, "newer")


def test_a_session_recorded_before_the_clock_stepped_back_does_not_outrank_a_new_one(services):
    """NTP steps the host's clock back an hour: the row of a session recorded before the step (worker a) begins an
    hour in the future. The device's reconnect to worker b is the newer one: it takes the row and a's session is
    displaced (b's own session was closed instead, at every reconnect to b, for the hour)."""
    hub, _nodes, a, b, presence = _nodes_and_presence(services)
    before_step = datetime.now(UTC) + timedelta(hours=1)  # the clock then, as the clock now reads it
    assert presence.record(a.id, [Change(hub.id, "d1", "stale", True, before_step)]) == []
    [displaced] = presence.record(b.id, [Change(hub.id, "d1", "reconnect", True, datetime.now(UTC))])
    assert (displaced.node_id, displaced.session) == (a.id, "stale")
    assert presence.locate(hub.name, "d1") == (b.id, "reconnect")


def test_two_nodes_attaching_one_device_at_once_are_serialised(services):
    """The recorded session is read under the write's lock: when both nodes attach a device at the same moment,
    exactly one of the two sessions is reported displaced, and it is the one the row does not hold."""
    hub, _nodes, a, b, presence = _nodes_and_presence(services)
    devices = [f"race-{i}" for i in range(40)]
    for d in devices:
        services.hubs.create_device(hub.name, d)
    t0 = datetime.now(UTC)
    reported: list = []

    def attach(start: threading.Barrier, node_id: str, device: str, session: str, since: datetime) -> None:
        start.wait()
        reported.extend(presence.record(node_id, [Change(hub.id, device, session, True, since)]))

    for i, d in enumerate(devices):
        start = threading.Barrier(2)
        # a's session began first in even rounds, b's in odd ones
        threads = [threading.Thread(target=attach, args=(start, a.id, d, f"a{i}", t0 + timedelta(seconds=i % 2))),
                   threading.Thread(target=attach, args=(start, b.id, d, f"b{i}", t0 + timedelta(seconds=1 - i % 2)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    by_device = {d.device_key: d for d in reported}
    assert len(reported) == len(by_device) == len(devices)
    for i, d in enumerate(devices):
        loser = by_device[d].session
        assert loser == (f"b{i}" if i % 2 else f"a{i}")
        assert presence.locate(hub.name, d)[1] == (f"a{i}" if i % 2 else f"b{i}")


def test_the_writer_lets_a_burst_share_one_transaction():
    """Changes made while a transaction waits its ``linger`` join it (a connect burst: one write, not one per
    connect); the next change after it gets a transaction of its own."""
    batches: list[list[Change]] = []

    class Recorder:
        def record(self, node_id: str, changes: list[Change]) -> list:
            batches.append(list(changes))
            return []

    async def run(fn, *args):
        return fn(*args)

    async def main() -> None:
        writer = PresenceWriter(Recorder(), "node-a", run, linger=0.05)  # type: ignore[arg-type]
        writer.add(Change(1, "d1", "s1", True))
        for _ in range(3):  # the loop turns: the writer has started and is waiting
            await asyncio.sleep(0)
        writer.add(Change(1, "d2", "s2", True))
        writer.add(Change(1, "d1", "s1", False))
        await writer.flush()
        writer.add(Change(1, "d3", "s3", True))
        await writer.flush()

    asyncio.run(main())
    assert [[(c.device_key, c.attached) for c in b] for b in batches] == [
        [("d1", True), ("d2", True), ("d1", False)], [("d3", True)]]


def test_what_waits_for_the_store_is_folded_not_grown_by_churn():
    """The store is away while three devices connect and leave 500 times each and two stay: after the failed write
    the writer keeps the two attaches and each device's last detach (for "last seen"), in order, and writes them
    when the store is back."""
    written: list[list[Change]] = []
    failing = [True]

    class Recorder:
        def record(self, node_id: str, changes: list[Change]) -> list:
            if failing[0]:
                failing[0] = False
                raise OSError("the store is away")
            written.append(list(changes))
            return []

    async def run(fn, *args):
        return fn(*args)

    async def main() -> PresenceWriter:
        writer = PresenceWriter(Recorder(), "node-a", run, max_batch=100, linger=0)  # type: ignore[arg-type]
        for i in range(500):
            for d in ("d1", "d2", "d3"):
                writer.add(Change(1, d, f"{d}-{i}", True))
                writer.add(Change(1, d, f"{d}-{i}", False))
        writer.add(Change(1, "d1", "stays-1", True))
        writer.add(Change(1, "d4", "stays-4", True))
        await writer.flush()
        return writer

    asyncio.run(main())
    assert [[(c.device_key, c.session, c.attached) for c in b] for b in written] == [[
        ("d1", "d1-499", False), ("d2", "d2-499", False), ("d3", "d3-499", False),
        ("d1", "stays-1", True), ("d4", "stays-4", True)]]


@pytest.fixture
def two_nodes(services):
    """Two nodes on the test's store, each with its own live sessions, started on one event loop."""
    store = services.store
    loop = asyncio.new_event_loop()
    pool = ThreadPoolExecutor(4)

    async def run(fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(pool, lambda: fn(*args, **kwargs))

    made: list[tuple[Cluster, LiveSessions]] = []

    async def start() -> None:
        for _ in range(2):
            live = LiveSessions()
            cluster = Cluster(store, choose_bus(store, run, "0neTEST"), run, heartbeat=0.2)
            live.join(cluster, Presence(store, services.hubs), run, services.c2d.waiting)  # as Runtime.join_cluster
            await cluster.start(live.on_peer_message)
            made.append((cluster, live))

    loop.run_until_complete(start())
    yield loop, made, services.hubs.list()[0]

    async def stop() -> None:
        for cluster, _ in made:
            await cluster.stop()

    loop.run_until_complete(stop())
    loop.close()
    pool.shutdown()


def test_calls_reach_a_device_on_the_other_node(two_nodes):
    loop, [(a, live_a), (b, live_b)], hub = two_nodes

    async def scenario() -> None:
        device = AuthenticatedDevice(hub.id, hub.name, hub.host_name, "Dev-1", "dev-1", "sas")
        link = Link(live_a, device)
        live_a.attach(link)
        await live_a.flush()
        assert await live_b.connected_anywhere(hub.name, ["dev-1"]) == {"dev-1"}
        # a method through b runs on a and comes back
        assert await live_b.invoke_method(hub.name, "DEV-1", "reboot", None, timeout=3) == (200, {"m": "reboot"})
        # a desired push and a C2D wake-up reach the link on a
        await live_b.push_desired(hub.name, "dev-1", {"fw": 2}, 7)
        await live_b.notify_c2d(hub.name, "dev-1")
        await _until(lambda: ("desired", ({"fw": 2}, 7)) in link.sent and ("c2d", None) in link.sent)
        # a device that does not answer: 504 on b
        link.answer = False
        with pytest.raises(MethodTimeout):
            await live_b.invoke_method(hub.name, "dev-1", "silent", None, timeout=0.3)
        # a drop on b closes the session on a
        await live_b.drop(hub.name, "dev-1", "device disabled by the service")
        await _until(lambda: link.closed == "device disabled by the service")
        await live_a.flush()
        with pytest.raises(DeviceOffline):
            await live_b.invoke_method(hub.name, "dev-1", "reboot", None, timeout=1)

    loop.run_until_complete(scenario())


def test_a_message_queued_before_the_session_is_recorded_wakes_it_once_it_is(two_nodes, services):
    """Found by a reconnect storm: a C2D message queued on b between a device's CONNECT on a and its presence write
    (the writer's linger, ~20 ms) found no row naming a, so nothing woke the session: the message stayed queued for
    as long as the device stayed connected (~1 in 3 sends right after a connect, over two workers)."""
    loop, [(a, live_a), (b, live_b)], hub = two_nodes
    for d in ("late-dev", "quiet-dev"):
        services.hubs.create_device(hub.name, d)

    async def scenario() -> None:
        assert live_a._writer is not None
        live_a._writer.linger = 0.3  # the window, made wide enough to queue a message in it every time
        link = Link(live_a, AuthenticatedDevice(hub.id, hub.name, hub.host_name, "Late-Dev", "late-dev", "sas"))
        quiet = Link(live_a, AuthenticatedDevice(hub.id, hub.name, hub.host_name, "quiet-dev", "quiet-dev", "sas"))
        live_a.attach(link)
        live_a.attach(quiet)
        services.c2d.enqueue(hub.name, "late-dev", b"queued in the window")
        await live_b.notify_c2d(hub.name, "late-dev")  # b finds no row yet: nothing to wake
        assert link.sent == []
        await live_a.flush()
        await _until(lambda: ("c2d", None) in link.sent)
        await asyncio.sleep(0.1)
        assert quiet.sent == []  # nothing waits for it: not woken

    loop.run_until_complete(scenario())


def test_a_desired_change_made_while_the_device_moves_to_the_other_node_reaches_its_new_session(two_nodes):
    """Found by a reconnect loop over two nodes (a device hopping between them, desired changes made on one): the
    device leaves b for a, reads its twin on a, and a desired change is made on b before a's presence write lands (the
    writer's linger). Presence still named b (or nothing), so b pushed the patch to its old session or to no one: the
    new session on a never heard of the change (~1 reconnect in 2 lost one). Each case: the old session on b closed
    (its detach not written yet) and still open (a half-open connection, closed only once a's write displaces it)."""
    loop, [(a, live_a), (b, live_b)], hub = two_nodes

    async def scenario() -> None:
        assert live_a._writer is not None and live_b._writer is not None
        await _until(lambda: not a.alone() and not b.alone())
        for n, old_closes in enumerate((True, False)):
            device = AuthenticatedDevice(hub.id, hub.name, hub.host_name, f"Mover-{n}", f"mover-{n}", "sas")
            old, new = Link(live_b, device), Link(live_a, device)
            live_b.attach(old)
            await live_b.flush()
            live_a._writer.linger = live_b._writer.linger = 0.3  # the window, made wide enough to patch in it
            if old_closes:
                live_b.detach(old)
            live_a.attach(new)
            await live_b.push_desired(hub.name, f"mover-{n}", {"fw": n}, 7 + n)
            pushed = ("desired", ({"fw": n}, 7 + n))
            await _until(lambda link=new, pushed=pushed: pushed in link.sent)
            await live_a.flush()
            await live_b.flush()
            live_a._writer.linger = live_b._writer.linger = 0.02
            assert new.closed is None

    loop.run_until_complete(scenario())


def test_a_connection_on_one_node_displaces_the_session_on_the_other(two_nodes):
    loop, [(a, live_a), (b, live_b)], hub = two_nodes

    async def scenario() -> None:
        device = AuthenticatedDevice(hub.id, hub.name, hub.host_name, "dev-2", "dev-2", "sas")
        old, new = Link(live_a, device), Link(live_b, device)
        live_a.attach(old)
        await live_a.flush()
        live_b.attach(new)
        await live_b.flush()
        await _until(lambda: old.closed is not None)
        assert "another node" in old.closed and new.closed is None
        assert await live_a.invoke_method(hub.name, "dev-2", "where", None, timeout=3) == (200, {"m": "where"})
        assert ("method", "where") in new.sent and ("method", "where") not in old.sent

    loop.run_until_complete(scenario())


def test_an_older_session_recorded_after_a_newer_one_on_the_other_node_is_closed(two_nodes):
    """The device connects to a, then to b; b's presence write lands first. The session on a is closed (on a,
    without a message), b's stays and is where calls go."""
    loop, [(a, live_a), (b, live_b)], hub = two_nodes

    async def scenario() -> None:
        device = AuthenticatedDevice(hub.id, hub.name, hub.host_name, "dev-4", "dev-4", "sas")
        old, new = Link(live_a, device), Link(live_b, device)
        live_a._writer.linger = 0.5  # a's write waits until after b's
        live_a.attach(old)
        live_b.attach(new)
        await live_b.flush()
        await live_a.flush()
        await _until(lambda: old.closed is not None)
        assert "another node" in old.closed and new.closed is None
        await live_a.flush()
        assert live_a.presence.locate(hub.name, "dev-4") == (b.node_id, live_b._links[(hub.name, "dev-4")].session)
        assert await live_a.invoke_method(hub.name, "dev-4", "where", None, timeout=3) == (200, {"m": "where"})
        assert ("method", "where") in new.sent

    loop.run_until_complete(scenario())


def test_a_dead_node_is_swept_with_its_presence(two_nodes):
    loop, [(a, live_a), (b, live_b)], hub = two_nodes

    async def scenario() -> None:
        device = AuthenticatedDevice(hub.id, hub.name, hub.host_name, "dev-3", "dev-3", "sas")
        live_a.attach(Link(live_a, device))
        await live_a.flush()
        a._task.cancel()  # a stops heartbeating (as a killed process would)
        b.timeout = 0.5
        await _until(lambda: a.node_id not in {n.id for n in Nodes(a.nodes.store).alive(60)}, timeout=10)
        assert await live_b.connected_anywhere(hub.name) == frozenset()
        with pytest.raises(DeviceOffline):
            await live_b.invoke_method(hub.name, "dev-3", "reboot", None, timeout=1)

    loop.run_until_complete(scenario())


def test_a_desired_push_to_a_device_that_reads_nothing_waits_in_the_background_and_is_bounded():
    """A twin update awaited its desired push, so a device that reads nothing held the service's PATCH until the
    write deadline cut the device off. Now push_desired returns at once; the pushes go out in the order given; past
    DESIRED_BACKLOG waiting ones the device is cut off with a reason (its pushes fail, nothing more is queued)."""
    from opendps.hub.live import DESIRED_BACKLOG

    class Stalled(Link):
        def __init__(self, live: LiveSessions, device: AuthenticatedDevice) -> None:
            super().__init__(live, device)
            self.gate = asyncio.Event()

        async def send_desired(self, desired, version) -> None:
            await self.gate.wait()  # the connection's buffer is full: the publish waits for the peer to read
            self.sent.append(("desired", version))

    async def main() -> None:
        live = LiveSessions()
        device = AuthenticatedDevice(1, "hub", "hub.example", "stalled", "stalled", "sas")
        link = Stalled(live, device)
        live.attach(link)
        for version in range(1, DESIRED_BACKLOG + 1):
            await asyncio.wait_for(live.push_desired("hub", "stalled", {"v": version}, version), 1)  # not waiting
        await asyncio.sleep(0)
        assert link.closed is None and link.sent == []
        link.gate.set()  # the device reads again: every push goes out, in order
        await _until(lambda: len(link.sent) == DESIRED_BACKLOG)
        assert link.sent == [("desired", v) for v in range(1, DESIRED_BACKLOG + 1)]
        link.gate.clear()
        for version in range(DESIRED_BACKLOG + 1, 2 * DESIRED_BACKLOG + 6):  # the next versions: none held back
            await asyncio.wait_for(live.push_desired("hub", "stalled", {"v": version}, version), 1)
        assert link.closed == f"does not read its desired property updates ({DESIRED_BACKLOG} waiting)"

    asyncio.run(main())


def test_the_catch_up_after_a_bus_outage_closes_the_session_it_checked_not_a_newer_one():
    """When the bus is back, sessions CONNECT would refuse now are closed; the check runs in a domain thread, and a
    device that reconnected meanwhile (a renewed certificate replacing a revoked one) has a new session then: it is
    the one checked that goes, not whichever holds the device's key."""
    class Peers:
        node_id = "node-a"

        async def alive(self, node_id: str) -> bool:
            return True

        async def send(self, message, to=None) -> bool:
            return True

    class Recorder:
        def record(self, node_id: str, changes: list[Change]) -> list:
            return []

    async def main() -> None:
        live = LiveSessions()
        hub = (1, "hub", "hub.example")
        old = Link(live, AuthenticatedDevice(*hub, "dev", "dev", "certificateAuthority", certificate_serial="01"))
        new = Link(live, AuthenticatedDevice(*hub, "dev", "dev", "certificateAuthority", certificate_serial="02"))
        other = Link(live, AuthenticatedDevice(*hub, "off", "off", "sas"))

        async def run(fn, *args):
            result = fn(*args)
            live.attach(new)  # the device reconnects while the check runs
            return result

        def recheck(devices):
            return [(d, "no longer allowed") for d in devices]  # everything checked: the old certificate, "off"

        live.join(Peers(), Recorder(), run, recheck=recheck)  # type: ignore[arg-type]
        live.attach(old)
        live.attach(other)
        await live.resumed()
        assert other.closed == "no longer allowed"
        assert new.closed is None and live.link("hub", "dev") is new
        assert old.closed == "taken over by a new connection of the same device"

    asyncio.run(main())


class Listening(Link):
    """A link that listens for methods only once told to (``methods``), and whose sends wait at ``gate`` (a connection
    whose buffer is full: the device reads nothing) when one is given."""

    def __init__(self, live: LiveSessions, device: AuthenticatedDevice, *, methods: bool = True,
                 gate: asyncio.Event | None = None) -> None:
        super().__init__(live, device)
        self.methods, self.gate = methods, gate

    def subscribed(self, feature: str) -> bool:
        return self.methods if feature == METHODS else super().subscribed(feature)

    async def send_method(self, method: str, request_id: str, payload: Any) -> None:
        if self.gate is not None:
            await self.gate.wait()
        await super().send_method(method, request_id, payload)


def test_a_method_for_a_device_that_reads_nothing_times_out_in_its_time_and_leaves_nothing_behind():
    """Found with a paho device that stopped reading and 60 calls of 120 KB: the request's publish waited for room in
    the device's buffer outside the response timeout, so callers asking for 5 s waited until the write deadline cut
    the device off (44 s) and were then told 404 (device offline) instead of 504."""
    async def main() -> None:
        live = LiveSessions()
        device = AuthenticatedDevice(1, "hub", "hub.example", "mute", "mute", "sas")
        link = Listening(live, device, gate=asyncio.Event())
        live.attach(link)
        started = asyncio.get_running_loop().time()
        with pytest.raises(MethodTimeout, match="did not answer method 'reboot' within 0.3 s"):
            await asyncio.wait_for(live.invoke_method("hub", "mute", "reboot", None, timeout=0.3), 3)
        assert asyncio.get_running_loop().time() - started < 1.5
        assert live._methods == {} and link.sent == []  # nothing pending; the request never went out
        link.gate.set()  # it reads again: a later call is answered
        assert await live.invoke_method("hub", "mute", "reboot", None, timeout=1) == (200, {"m": "reboot"})

    asyncio.run(main())


def test_a_method_waits_up_to_its_connect_timeout_for_the_device_to_connect_and_subscribe():
    """IoT Hub's connectTimeoutInSeconds: a device that is not connected, or not subscribed to methods, when the call
    is made gets it once it is (a subscription wakes the call at once); one that does not come in time is a 404103
    saying so; 0 (the default) does not wait."""
    from opendps.hub.live import NotListening

    async def main() -> None:
        loop = asyncio.get_running_loop()
        live = LiveSessions()
        device = AuthenticatedDevice(1, "hub", "hub.example", "Late", "late", "sas")
        with pytest.raises(NotListening, match="not connected"):
            await live.invoke_method("hub", "late", "ping", None, timeout=1)
        call = asyncio.ensure_future(live.invoke_method("hub", "LATE", "ping", None, timeout=1, connect_timeout=5))
        await asyncio.sleep(0.1)
        link = Listening(live, device, methods=False)
        live.attach(link)  # connected, not subscribed yet: the call waits on
        await asyncio.sleep(0.1)
        assert not call.done() and link.sent == []
        started = loop.time()
        link.methods = True
        live.listening(link)
        assert await asyncio.wait_for(call, 0.5) == (200, {"m": "ping"})
        assert loop.time() - started < 0.5  # woken by the subscription, not by the next look
        assert link.sent == [("method", "ping")] and live._awaited == {}
        started = loop.time()
        with pytest.raises(DeviceOffline, match="timed out waiting for device 'ghost' to connect") as refused:
            await live.invoke_method("hub", "ghost", "ping", None, timeout=1, connect_timeout=0.3)
        assert refused.value.error_code == 404103 and 0.3 <= loop.time() - started < 1.5
        assert live._awaited == {}

    asyncio.run(main())


def test_a_method_through_another_node_waits_for_the_device_to_subscribe_there_and_is_sent_once(two_nodes):
    loop, [(a, live_a), (b, live_b)], hub = two_nodes

    async def scenario() -> None:
        device = AuthenticatedDevice(hub.id, hub.name, hub.host_name, "sub-late", "sub-late", "sas")
        link = Listening(live_a, device, methods=False)
        live_a.attach(link)
        await live_a.flush()
        call = asyncio.ensure_future(live_b.invoke_method(hub.name, "sub-late", "ping", None, timeout=2,
                                                          connect_timeout=10))
        await asyncio.sleep(0.3)
        assert not call.done()
        link.methods = True  # subscribes on a: b looks again within DEVICE_LOOKUP_INTERVAL
        assert await asyncio.wait_for(call, 5) == (200, {"m": "ping"})
        assert link.sent == [("method", "ping")]

    loop.run_until_complete(scenario())


def test_writes_of_one_twin_take_turns_with_their_pushes_and_other_twins_do_not_wait():
    """Concurrent PATCHes of one twin commit one after the other, but each came back to the loop from its own domain
    thread: a later version's desired push went out before an earlier one's (about 1 in 80 with 80 concurrent
    PATCHes), and a device applying patches in the order received kept the older value. Each write and its push now
    take the device's turn."""
    async def main() -> None:
        live = LiveSessions()
        order: list[str] = []
        first_in = asyncio.Event()
        release = asyncio.Event()

        async def write(device: str, name: str, hold: bool = False) -> None:
            async with live.twin_turn("hub", device):
                order.append(f"{name} in")
                if hold:
                    first_in.set()
                    await release.wait()
                order.append(f"{name} out")

        first = asyncio.ensure_future(write("Dev", "first", hold=True))
        await asyncio.wait_for(first_in.wait(), 2)
        second = asyncio.ensure_future(write("dev", "second"))  # the same device (ids are case-insensitive)
        await write("other", "other")  # another device does not wait
        await asyncio.sleep(0.05)
        assert order == ["first in", "other in", "other out"]
        release.set()
        await asyncio.gather(first, second)
        assert order[3:] == ["first out", "second in", "second out"]
        assert live._twin_turns == {}

    asyncio.run(main())


def test_desired_pushes_from_other_processes_go_to_the_device_in_version_order():
    """Writes made by other processes or nodes reach the device's process over the bus in no set order: with two
    workers about one concurrent PATCH in 30 was pushed after a later version. A push past the next version waits
    for the ones before it; one whose predecessor never comes (a twin reset pushes nothing) goes out after
    DESIRED_REORDER_WAIT; an older version than one handed out goes out as it comes, never dropped."""
    from opendps.hub.live import DESIRED_REORDER_WAIT

    async def main() -> None:
        live = LiveSessions()
        link = Link(live, AuthenticatedDevice(1, "hub", "hub.example", "ord", "ord", "sas"))
        live.attach(link)

        def pushed() -> list[int]:
            return [version for kind, (_, version) in link.sent if kind == "desired"]

        for version in (5, 7, 8, 6):  # 7 and 8 arrive before 6
            live.on_peer_message({"op": "desired", "hub": "hub", "device": "ord", "desired": {"v": version},
                                  "version": version})
        await _until(lambda: len(pushed()) == 4)
        assert pushed() == [5, 6, 7, 8]
        started = asyncio.get_running_loop().time()
        await live.push_desired("hub", "ord", {"v": 11}, 11)  # 9 and 10 never come
        await asyncio.sleep(0.05)
        await live.push_desired("hub", "ord", {"v": 12}, 12)
        await _until(lambda: len(pushed()) == 6)
        assert pushed()[4:] == [11, 12] and asyncio.get_running_loop().time() - started >= DESIRED_REORDER_WAIT * 0.9
        await live.push_desired("hub", "ord", {"v": 10}, 10)  # too late to be in order: still handed over
        await live.push_desired("hub", "ord", {"v": 13}, 13)
        await _until(lambda: len(pushed()) == 8)
        assert pushed()[6:] == [10, 13]
        live.detach(link)
        assert live._desired_order == {} and live._desired_waiting == {}

    asyncio.run(main())
