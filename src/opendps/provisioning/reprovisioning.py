"""Reprovisioning: where a device that registers again ends up, and what happens to its twin.

Azure's ``reprovisionPolicy`` rules, as a pure decision over the previous and the newly allocated hub;
the hub carries it out (:meth:`opendps.hub.Hubs.place_device`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opendps.hub import HubView, TwinAction

INITIAL = "initialAssignment"
MIGRATED = "deviceDataMigrated"
RESET = "deviceDataReset"


@dataclass(frozen=True)
class Placement:
    hub: HubView
    substatus: str  # registrationState.substatus
    twin: TwinAction  # keep the existing twin (a new identity gets the initial one), migrate it, or reset it


def place(allocated: HubView, previous: HubView | None, policy: dict[str, Any]) -> Placement:
    """Where the device goes. ``previous``: the hub of its last assignment, if it still exists.

    - first assignment: the allocated hub, the initial twin;
    - ``updateHubAssignment: false``: the device stays where it was, twin untouched;
    - ``migrateDeviceData: true`` (default): the allocated hub; moving, the twin comes along;
    - ``migrateDeviceData: false``: the allocated hub with the initial twin (the data is reset).
    """
    if previous is None:
        return Placement(allocated, INITIAL, "keep")
    if not policy.get("updateHubAssignment", True):
        return Placement(previous, INITIAL, "keep")
    if policy.get("migrateDeviceData", True):
        if previous.id != allocated.id:
            return Placement(allocated, MIGRATED, "migrate")
        return Placement(allocated, INITIAL, "keep")
    return Placement(allocated, RESET, "reset")
