"""The registry counted: namespaces and policies (``GET /status``), and each policy's display name, ``namespace/policy``
(the ``policy`` label of the certificate metrics). Policies are few (configuration), so these are small reads."""

from __future__ import annotations

from sqlalchemy import func, select

from opendps.store import Namespace, Policy, Store


class RegistryInventory:
    def __init__(self, store: Store) -> None:
        self.store = store

    def counts(self) -> tuple[int, int]:
        """(namespaces, policies)."""
        with self.store.session() as s:
            namespaces = s.scalar(select(func.count()).select_from(Namespace)) or 0
            policies = s.scalar(select(func.count()).select_from(Policy)) or 0
        return int(namespaces), int(policies)

    def policy_names(self) -> dict[int, str]:
        """policy id -> ``namespace/policy``."""
        with self.store.session() as s:
            rows = s.execute(select(Policy.id, Namespace.name, Policy.name)
                             .join(Namespace, Policy.namespace_id == Namespace.id)).all()
        return {pid: f"{ns}/{name}" for pid, ns, name in rows}
