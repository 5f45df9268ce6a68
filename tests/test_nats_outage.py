"""NATS going away and coming back under a running server, in-process against a nats-server of this module's own
(killed and started again on the same port and store directory; the shared one on 4222 is never touched): the
telemetry router of a durable route, and the live bus with the hub's live sessions on it."""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from tests.conftest import free_port, service_missing
from tests.unit.hub.test_presence import Link, _until

from opendps.cluster import Cluster, NatsBus
from opendps.hub import AuthenticatedDevice, LiveSessions, Presence
from opendps.hub.live import NodeUnreachable

# NATS going away does not depend on the store: each test once, on SQLite (the suite's time is kept for what does)
pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)

NATS_BINARY = shutil.which("nats-server") or ("/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None)


class Nats:
    """A nats-server with JetStream on a free port, stopped (SIGKILL) and started again at will."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.directory = directory
        self.proc: subprocess.Popen | None = None

    def arguments(self) -> list[str]:
        """nats-server's command line after the binary (subclasses: other servers)."""
        return ["-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.directory)]

    def start(self) -> None:
        assert NATS_BINARY is not None
        self.proc = subprocess.Popen([NATS_BINARY, *self.arguments()], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "nats-server did not listen within 10 s"
                time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def nats(tmp_path_factory):
    if NATS_BINARY is None:
        service_missing("nats-server is not installed")
    server = Nats(tmp_path_factory.mktemp("nats-js"))
    server.start()
    yield server
    server.kill()


async def _stream(url: str, name: str, subjects: list[str]) -> None:
    import nats as nats_py

    nc = await nats_py.connect(url, allow_reconnect=False)
    try:
        await nc.jetstream().add_stream(name=name, subjects=subjects)
    finally:
        await nc.close()


async def _stored(url: str, stream: str) -> list[bytes]:
    import nats as nats_py
    from nats.js.api import AckPolicy, ConsumerConfig

    nc = await nats_py.connect(url, allow_reconnect=False)
    try:
        sub = await nc.jetstream().pull_subscribe(">", durable=None, stream=stream,
                                                  config=ConsumerConfig(ack_policy=AckPolicy.NONE))
        got: list[bytes] = []
        while True:
            try:
                got += [m.data for m in await sub.fetch(100, timeout=1)]
            except Exception:  # noqa: BLE001 - nats' TimeoutError: nothing more
                return got
    finally:
        await nc.close()


async def _in_thread(fn, *args):
    return fn(*args)


def test_a_durable_route_refused_while_nats_is_away_never_reaches_the_stream_and_the_outage_is_two_lines(
        nats, services, monkeypatch, caplog):
    """SIGKILLed NATS under a durable route: the message the device was refused (no PUBACK) sat in nats-py's
    buffer and reached the stream when NATS came back — then again with the device's retry; and each reconnection
    attempt (every 2 s) was a log line. Now it is refused without being buffered, after at most PUBLISH_TIMEOUT, and
    the outage is one warning and one info line."""
    from opendps.errors import ServiceUnavailable
    from opendps.hub import routing

    monkeypatch.setattr(routing, "PUBLISH_TIMEOUT", 0.5)
    prefix = f"outage{secrets.token_hex(4)}"  # the module's NATS keeps its streams across the store variants
    asyncio.run(_stream(nats.url, prefix.upper(), [f"{prefix}.>"]))
    services.routes.put("default", "durable", {"properties": {"url": nats.url, "subject": f"{prefix}.t"}})
    hub_id = services.hubs.list()[0].id

    async def scenario() -> None:
        router = routing.NatsRouter(services.routes, _in_thread)
        await router.deliver(hub_id, "d1", {}, {}, b"before", 1)
        nats.kill()
        await asyncio.sleep(2.5)  # several reconnection attempts
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="did not acknowledge"):
            await router.deliver(hub_id, "d1", {}, {}, b"refused", 2)
        assert time.monotonic() - started < 2
        nats.start()
        deadline = time.monotonic() + 15
        while True:  # the device's retry: accepted once NATS (and its JetStream) is back
            try:
                await router.deliver(hub_id, "d1", {}, {}, b"after", 3)
                break
            except ServiceUnavailable:
                assert time.monotonic() < deadline, "not accepted within 15 s of NATS coming back"
                await asyncio.sleep(0.2)
        await router.close()

    with caplog.at_level(logging.DEBUG, logger="opendps.hub.routing"):
        asyncio.run(scenario())
    assert asyncio.run(_stored(nats.url, prefix.upper())) == [b"before", b"after"]
    told = [(r.levelname, r.getMessage()) for r in caplog.records
            if r.name == "opendps.hub.routing" and r.levelno >= logging.INFO]
    assert [level for level, _ in told] == ["WARNING", "INFO"], told
    assert "was lost" in told[0][1] and "again after" in told[1][1]


def test_the_live_bus_drops_what_it_cannot_send_and_catches_up_when_nats_returns(nats, services):
    """Two nodes on a NATS bus; NATS killed. A direct method sent meanwhile waited in nats-py's buffer and ran on the
    device when NATS came back, long after its caller's 504; a C2D wake-up lost meanwhile left the message queued
    until the device reconnected; a device disabled meanwhile stayed connected on the other node. Now a send fails at
    once (one warning), and when the bus is back each node wakes its sessions that have messages waiting and closes
    those CONNECT would refuse now."""
    store, hub = services.store, services.hubs.list()[0]
    services.hubs.create_device(hub.name, "outage-dev")
    services.hubs.create_device(hub.name, "disabled-dev")
    pool = ThreadPoolExecutor(4)

    async def run(fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(pool, lambda: fn(*args, **kwargs))

    async def scenario() -> None:
        made: list[tuple[Cluster, LiveSessions]] = []
        for _ in range(2):
            live = LiveSessions()
            cluster = Cluster(store, NatsBus(nats.url, "opendps.outage.live"), run, heartbeat=0.2)
            live.join(cluster, Presence(store, services.hubs), run, services.c2d.waiting,  # as Runtime.join_cluster
                      recheck=services.hub_auth.no_longer_allowed)
            cluster.on_resumed = live.resumed
            await cluster.start(live.on_peer_message)
            made.append((cluster, live))
        [(_, live_a), (b, live_b)] = made
        link = Link(live_a, AuthenticatedDevice(hub.id, hub.name, hub.host_name, "outage-dev", "outage-dev", "sas"))
        live_a.attach(link)
        disabled = Link(live_a, AuthenticatedDevice(hub.id, hub.name, hub.host_name, "disabled-dev", "disabled-dev",
                                                    "sas"))
        live_a.attach(disabled)
        await live_a.flush()
        try:
            nats.kill()
            await asyncio.sleep(0.3)
            with pytest.raises(ConnectionError, match="down"):  # not buffered for later
                await b.bus.publish({"op": "method", "call": "x", "hub": hub.name, "device": "outage-dev",
                                     "method": "stale", "payload": None, "timeout": 1}, None)
            started = time.monotonic()  # a method for a device on the other node: refused at once, not a 504 later
            with pytest.raises(NodeUnreachable, match="live bus to it is down"):
                await live_b.invoke_method(hub.name, "outage-dev", "during", None, timeout=5)
            assert time.monotonic() - started < 3
            services.c2d.enqueue(hub.name, "outage-dev", b"queued while NATS was away")
            await live_b.notify_c2d(hub.name, "outage-dev")  # its wake-up is lost
            services.hubs.create_device(hub.name, "disabled-dev", status="disabled")
            await live_b.drop(hub.name, "disabled-dev", "device disabled by the service")  # lost too
            assert link.sent == [] and disabled.closed is None
            nats.start()
            await _until(lambda: ("c2d", None) in link.sent, timeout=10)
            await _until(lambda: disabled.closed is not None, timeout=5)
            assert disabled.closed == "disabled or deleted by the service while the live bus was away"
            await asyncio.sleep(0.3)
            assert ("method", "stale") not in link.sent and link.closed is None
        finally:
            for cluster, _ in made:
                await cluster.stop()

    try:
        asyncio.run(scenario())
    finally:
        pool.shutdown()


def test_a_node_starts_with_its_nats_bus_away_and_joins_it_when_it_comes(nats, services, monkeypatch, caplog):
    """`opendps serve --bus` with NATS not (yet) there exited after 10 s: NATS starting after opendps, or down while
    the supervisor restarts a worker, stopped the whole service over live hints. Now the node serves and connects in
    the background."""
    monkeypatch.setattr(NatsBus, "connect_within", 0.5)
    pool = ThreadPoolExecutor(2)

    async def run(fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(pool, lambda: fn(*args, **kwargs))

    async def scenario() -> None:
        nats.kill()
        bus = NatsBus(nats.url, "opendps.late.live")
        cluster = Cluster(services.store, bus, run, heartbeat=0.2)
        heard: list[dict] = []
        try:
            await cluster.start(heard.append)  # does not raise
            with pytest.raises(ConnectionError):
                await bus.publish({"op": "x"})
            nats.start()
            other = NatsBus(nats.url, "opendps.late.live")
            await other.start("other", lambda m: None)

            async def sent() -> bool:
                try:
                    await other.publish({"op": "hello"})
                except ConnectionError:
                    return False
                return True

            deadline = time.monotonic() + 10
            while not heard:
                assert time.monotonic() < deadline, "the bus did not connect within 10 s of NATS starting"
                await sent()
                await asyncio.sleep(0.1)
            assert heard[0]["op"] == "hello"
            await other.close()
        finally:
            await cluster.stop()

    with caplog.at_level(logging.INFO, logger="opendps.cluster"):
        try:
            asyncio.run(scenario())
        finally:
            pool.shutdown()
    said = [r.getMessage() for r in caplog.records if r.name == "opendps.cluster"]
    assert any("serving without it" in m for m in said) and any("connected to NATS" in m for m in said), said
