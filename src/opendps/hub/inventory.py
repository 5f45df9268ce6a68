"""The hubs counted (``GET /status``): linked hubs, device identities, and devices connected now on any node (presence,
``hub_connections``: one row per connected device, so a count of it is the fleet's, whichever node holds them)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select

from opendps.store import HubConnection, HubDevice, LinkedHub, Store


@dataclass(frozen=True)
class HubCounts:
    linked_hubs: int
    identities: int
    connected: int


class HubInventory:
    def __init__(self, store: Store) -> None:
        self.store = store

    def counts(self) -> HubCounts:
        with self.store.session() as s:
            hubs = s.scalar(select(func.count()).select_from(LinkedHub)) or 0
            identities = s.scalar(select(func.count()).select_from(HubDevice)) or 0
            connected = s.scalar(select(func.count()).select_from(HubConnection)) or 0
        return HubCounts(int(hubs), int(identities), int(connected))
