"""Reprovisioning (Azure's reprovisionPolicy): the pure decision, then what the hub does with it, in-process."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from tests.unit.conftest import creds, register, symmetric_group

from opendps.hub import HubView
from opendps.provisioning.reprovisioning import INITIAL, MIGRATED, RESET, place
from opendps.provisioning.throttle import PollThrottle
from opendps.transport.sas import derive_device_key


def _hub(n: int) -> HubView:
    return HubView(n, f"hub{n}", f"hub{n}.test", 1, True, "etag", datetime.now(UTC))


A, B = _hub(1), _hub(2)


@pytest.mark.parametrize(("previous", "policy", "expected"), [
    (None, {}, (A, INITIAL, "keep")),
    (None, {"updateHubAssignment": False, "migrateDeviceData": False}, (A, INITIAL, "keep")),
    (B, {"updateHubAssignment": False}, (B, INITIAL, "keep")),
    (B, {}, (A, MIGRATED, "migrate")),
    (B, {"updateHubAssignment": True, "migrateDeviceData": True}, (A, MIGRATED, "migrate")),
    (A, {}, (A, INITIAL, "keep")),
    (B, {"migrateDeviceData": False}, (A, RESET, "reset")),
    (A, {"migrateDeviceData": False}, (A, RESET, "reset")),
])
def test_placement_rules(previous, policy, expected):
    p = place(A, previous, policy)
    assert (p.hub, p.substatus, p.twin) == expected


@pytest.fixture
def two_hubs(services):
    services.provisioning.throttle = PollThrottle(services.store, limit=100)  # this test polls one id more than a device may
    services.hubs.create("east", "east.hubs.test")
    services.hubs.create("west", "west.hubs.test")
    return services


def _group(services, hubs: list[str], **reprovision: bool) -> str:
    return symmetric_group(services, "fleet", iotHubs=hubs, reprovisionPolicy=reprovision,
                           initialTwin={"tags": {"site": "lab"}, "properties": {"desired": {"interval": 10}}})


def _twin(services, hub: str, device: str) -> dict:
    return services.hubs.get_device(hub, device).twin()


def test_moving_hubs_migrates_the_twin_and_removes_the_old_identity(two_hubs):
    s, rid = two_hubs, "mover"
    key = derive_device_key(_group(s, ["east.hubs.test"]), rid)
    assert register(s, creds(rid, key=key))["registrationState"]["assignedHub"] == "east.hubs.test"
    s.hubs.patch_reported(s.hubs.get("east").id, rid, {"firmware": "1.0"})
    _group(s, ["west.hubs.test"])
    state = register(s, creds(rid, key=key))["registrationState"]
    assert (state["assignedHub"], state["substatus"]) == ("west.hubs.test", MIGRATED)
    twin = _twin(s, "west", rid)
    assert twin["properties"]["reported"]["firmware"] == "1.0" and twin["tags"] == {"site": "lab"}
    assert [d.device_id for d in s.hubs.list_devices("east")] == []


def test_without_migration_the_data_is_reset_to_the_initial_twin(two_hubs):
    s, rid = two_hubs, "resetter"
    key = derive_device_key(_group(s, ["east.hubs.test"], migrateDeviceData=False), rid)
    register(s, creds(rid, key=key))
    east = s.hubs.get("east")
    s.hubs.patch_reported(east.id, rid, {"firmware": "1.0"})
    s.hubs.update_twin("east", rid, tags={"site": "moved"})
    state = register(s, creds(rid, key=key))["registrationState"]  # same hub, data reset
    assert (state["assignedHub"], state["substatus"]) == ("east.hubs.test", RESET)
    twin = _twin(s, "east", rid)
    assert twin["properties"]["reported"]["$version"] > 1 and "firmware" not in twin["properties"]["reported"]
    assert twin["tags"] == {"site": "lab"} and twin["properties"]["desired"]["interval"] == 10


def test_without_hub_updates_the_device_stays_where_it_was(two_hubs):
    s, rid = two_hubs, "stayer"
    key = derive_device_key(_group(s, ["east.hubs.test"], updateHubAssignment=False), rid)
    register(s, creds(rid, key=key))
    _group(s, ["west.hubs.test"], updateHubAssignment=False)
    state = register(s, creds(rid, key=key))["registrationState"]
    assert (state["assignedHub"], state["substatus"]) == ("east.hubs.test", INITIAL)
    assert [d.device_id for d in s.hubs.list_devices("west")] == []


def test_a_deleted_previous_hub_counts_as_a_first_assignment(two_hubs):
    s, rid = two_hubs, "orphan"
    key = derive_device_key(_group(s, ["east.hubs.test", "west.hubs.test"], updateHubAssignment=False), rid)
    first = register(s, creds(rid, key=key))["registrationState"]["assignedHub"]
    gone, other = ("east", "west.hubs.test") if first == "east.hubs.test" else ("west", "east.hubs.test")
    _group(s, [other], updateHubAssignment=False)
    s.hubs.delete(gone)
    state = register(s, creds(rid, key=key))["registrationState"]
    assert (state["assignedHub"], state["substatus"]) == (other, INITIAL)
