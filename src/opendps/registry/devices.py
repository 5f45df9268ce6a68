"""The namespace's device registry (ADR): one record per provisioned device with its current certificate."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from opendps.errors import NotFound
from opendps.store import DeviceRecord, Namespace, Policy, Store


@dataclass(frozen=True)
class DeviceRecordView:
    namespace: str
    device_id: str
    registration_id: str
    hub_host_name: str
    policy: str | None
    certificate_serial: str | None
    certificate_sha256: str | None
    certificate_not_after: datetime | None
    etag: str
    created_at: datetime
    updated_at: datetime

    def to_wire(self) -> dict[str, Any]:
        def iso(dt: datetime | None) -> str | None:
            return dt.astimezone(UTC).isoformat().replace("+00:00", "Z") if dt else None
        cert = None
        if self.certificate_serial:
            cert = {"serialNumber": self.certificate_serial, "sha256Thumbprint": (self.certificate_sha256 or "").upper(),
                    "notAfter": iso(self.certificate_not_after), "policy": self.policy}
        return {"name": self.device_id, "etag": self.etag, "properties": {
            "registrationId": self.registration_id, "iotHubHostName": self.hub_host_name, "policy": self.policy,
            "operationalCertificate": cert, "createdAt": iso(self.created_at), "updatedAt": iso(self.updated_at)}}


class DeviceRegistry:
    def __init__(self, store: Store):
        self.store = store

    def _rows(self, s, namespace: str, device_id: str | None = None):  # noqa: ANN001, ANN202
        ns = s.scalars(select(Namespace).where(Namespace.name == namespace)).first()
        if ns is None:
            raise NotFound(f"namespace {namespace!r} does not exist", error_code=404001)
        q = (select(DeviceRecord, Policy.name).outerjoin(Policy, DeviceRecord.policy_id == Policy.id)
             .where(DeviceRecord.namespace_id == ns.id).order_by(DeviceRecord.device_key))
        if device_id is not None:
            q = q.where(DeviceRecord.device_key == device_id.lower())
        return [DeviceRecordView(namespace, r.device_id, r.registration_id, r.hub_host_name, p, r.certificate_serial,
                                 r.certificate_sha256, r.certificate_not_after, r.etag, r.created_at, r.updated_at)
                for r, p in s.execute(q).all()]

    def list(self, namespace: str) -> list[DeviceRecordView]:
        with self.store.session() as s:
            return self._rows(s, namespace)

    def get(self, namespace: str, device_id: str) -> DeviceRecordView:
        with self.store.session() as s:
            rows = self._rows(s, namespace, device_id)
            if not rows:
                raise NotFound(f"device {device_id!r} is not in the device registry of namespace {namespace!r}",
                               error_code=404001)
            return rows[0]
