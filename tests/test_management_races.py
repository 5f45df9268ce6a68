"""Management operations racing live device traffic: what a change leaves behind while devices provision and
send.

A hub unlinked while its devices are connected: their sessions close on every worker (they stayed open, and each
next PUBLISH was a traceback and a refused transaction); one hub's telemetry refused by its foreign key no longer
fails the other hubs' messages of the same group commit; presence goes on for the other hubs. A CONNECT checked
before a drop or revocation and attached after it is closed at its attach. The server part runs one
``opendps serve --workers 2`` on PostgreSQL (the drop crosses workers); the rest runs in-process on both stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import select
from tests.conftest import _run_server, database
from tests.test_device_api import svc
from tests.test_mqtt_hub import HUB, Client, hub_username
from tests.unit.hub.test_presence import _nodes_and_presence

from opendps.hub import AuthenticatedDevice, LiveSessions
from opendps.hub.presence import Change
from opendps.hub.telemetry import GroupCommit, HubsGone, TelemetrySink
from opendps.store import TelemetryEvent
from opendps.transport import sas

pytestmark = pytest.mark.timeout(300, func_only=True)


# ---- in-process, SQLite and PostgreSQL ----
def test_telemetry_of_an_unlinked_hub_does_not_fail_the_other_hubs_messages(services):
    """A batch naming a hub unlinked meanwhile was refused whole (foreign key): every device in it lost its PUBACK and
    its connection. Now the others' messages are stored; the gone hub's ``append`` caller is refused (NotFound), and a
    pipelined future is refused only when none of its transaction's messages is stored."""
    store, hubs = services.store, services.hubs
    kept, gone = hubs.create("kept-hub", "kept.hubs.test"), hubs.create("gone-hub", "gone.hubs.test")
    hubs.delete("gone-hub")
    sink = TelemetrySink(store)

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        writer = GroupCommit(sink, lambda fn, *a: loop.run_in_executor(None, fn, *a))
        shared_gone = writer.submit(gone.id, "g2", {}, {}, b"pipelined-gone")
        shared_kept = writer.submit(kept.id, "k2", {}, {}, b"pipelined-kept")
        assert shared_gone is shared_kept  # one future for the transaction's pipelined messages, of both hubs
        first = await asyncio.gather(writer.append(kept.id, "k1", {}, {}, b"kept"),
                                     writer.append(gone.id, "g1", {}, {}, b"gone"), shared_kept,
                                     return_exceptions=True)
        alone = writer.submit(gone.id, "g3", {}, {}, b"nothing else in its transaction")
        return [*first, *await asyncio.gather(alone, return_exceptions=True)]

    position, refused, pipelined, alone = asyncio.run(main())
    assert isinstance(position, int), position
    assert isinstance(refused, HubsGone) and refused.status == 404 and "no longer linked" in refused.message
    assert pipelined is None  # done with the kept hub's message it shares its transaction with
    assert isinstance(alone, HubsGone)  # nothing of it stored: no PUBACK
    with store.session() as s:
        assert sorted(s.scalars(select(TelemetryEvent.body))) == [b"kept", b"pipelined-kept"]


def test_presence_of_an_unlinked_hub_does_not_hold_up_the_others(services):
    """A session of a hub unlinked before its attach was written failed the whole presence batch (foreign key),
    retried forever while the session lived: no other device's presence was recorded meanwhile."""
    hub, _nodes, a, _b, presence = _nodes_and_presence(services)
    gone = services.hubs.create("gone-presence", "gone-presence.hubs.test")
    services.hubs.delete("gone-presence")
    assert presence.record(a.id, [Change(gone.id, "g1", "s1", True), Change(hub.id, "d1", "s2", True)]) == []
    assert presence.locate(hub.name, "d1") == (a.id, "s2")


class _Link:
    def __init__(self, device: AuthenticatedDevice) -> None:
        self.device, self.closed = device, None

    def subscribed(self, feature: str) -> bool:
        return False

    async def send_method(self, method: str, request_id: str, payload: Any) -> None:
        raise AssertionError

    async def send_desired(self, desired: dict[str, Any], version: int) -> None:
        raise AssertionError

    def wake_c2d(self) -> None:
        pass

    def close(self, reason: str) -> None:
        self.closed = reason


def _device(name: str, hub_id: int = 1, serial: str | None = None, issuer: str | None = None) -> AuthenticatedDevice:
    return AuthenticatedDevice(hub_id, "default", "hub.test", name, name.lower(), "sas", serial, issuer)


def test_a_connect_checked_before_a_drop_and_attached_after_it_is_closed():
    """The CONNECT reads the identity (enabled), the service disables it and drops the device everywhere, then the
    CONNECT's session attaches: it found no session to drop, so the disabled device stayed connected. Now the drops
    and revocations heard since the CONNECT began to be checked close it at its attach; older ones do not."""
    live = LiveSessions()
    before = time.monotonic()
    live._drop_here("default", "Early", "disabled", None)
    live._revoke_here(set(), {"aa"})
    checked = time.monotonic()
    early = _Link(_device("early", issuer="aa"))  # checked after both: its check saw them
    live.attach(early, checked_since=checked)
    assert early.closed is None
    live._drop_here("default", "Late", "disabled", None)
    live._revoke_here({"0A"}, {"bb"})
    live._drop_hub_here(7, "unlinked")
    cases = {"late": _device("late"), "by-serial": _device("by-serial", serial="0A"),
             "by-issuer": _device("by-issuer", serial="01", issuer="bb"), "in-hub": _device("in-hub", hub_id=7)}
    for name, device in cases.items():
        link = _Link(device)
        live.attach(link, checked_since=checked)
        assert link.closed is not None, name
    other = _Link(_device("other", serial="02", issuer="cc"))
    live.attach(other, checked_since=checked)
    assert other.closed is None
    stale = _Link(_device("stale"))
    live.attach(stale, checked_since=before - 3600)  # checked longer ago than drops are remembered
    assert stale.closed is not None


# ---- one server: --workers 2 on PostgreSQL ----
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("management-races")
    with database("postgresql", tmp) as db_url, contextlib.ExitStack() as stack:
        yield stack.enter_context(contextlib.contextmanager(_run_server)(db_url, tmp, extra_args=("--workers", "2")))


def _log(server) -> str:
    return (server.data_dir.parent / "server.log").read_text()


def test_unlinking_a_hub_drops_its_connected_devices_on_every_worker(server):
    """Before: unlink answered 204 and the hub's devices stayed connected; each next PUBLISH was an ERROR with a
    traceback (foreign key) and presence failed for the whole worker. A device of another hub is not touched."""
    host = "racing.hubs.test"
    devices = [f"unlinked-{i}" for i in range(6)]  # spread over both workers by the kernel's hash
    with svc(server) as c:
        r = c.put("/linkedHubs/racing", json={"properties": {"hostName": host, "applyAllocationPolicy": False}})
        assert r.status_code == 201, r.text
        keys = {d: c.put(f"/devices/{d}", params={"hub": "racing"}, json={"deviceId": d}).json()
                ["authentication"]["symmetricKey"]["primaryKey"] for d in devices}
        stay_key = c.put("/devices/stays", json={"deviceId": "stays"}).json()["authentication"]["symmetricKey"][
            "primaryKey"]
    clients, dropped = [], []
    for d in devices:
        client = Client(server, d, f"{host}/{d}/?api-version=2021-04-12",
                        password=sas.generate(f"{host}/devices/{d}", keys[d]))
        assert client.rc == 0
        client.c.reconnect_delay_set(min_delay=600, max_delay=600)
        gone = threading.Event()
        client.c.on_disconnect = lambda *a, gone=gone: gone.set()
        client.publish(f"devices/{d}/messages/events/", b"before")
        clients.append(client)
        dropped.append(gone)
    stays = Client(server, "stays", hub_username("stays"), password=sas.generate(f"{HUB}/devices/stays", stay_key))
    try:
        assert stays.rc == 0
        with svc(server) as c:
            assert c.delete("/linkedHubs/racing").status_code == 204
        assert all(gone.wait(5) for gone in dropped), [d for d, g in zip(devices, dropped, strict=True) if not g.is_set()]
        stays.publish("devices/stays/messages/events/", b"after")  # PUBACKed: the other hub's device goes on
        assert stays.c.is_connected()
    finally:
        stays.close()
        with ThreadPoolExecutor(len(clients)) as pool:  # each stop waits out its thread's 1 s reconnect nap
            list(pool.map(lambda client: client.c.loop_stop(), clients))
    log = _log(server)
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
