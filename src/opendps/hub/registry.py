"""Logical IoT hubs: a host name plus a device registry with twins, and the CAs each hub trusts.

Trust ("CA sync") is derived, not copied: a hub trusts every issuing CA (active, or retired but not
yet expired) of every policy that an enrollment allocating to that hub links to. Because it is
computed from the store on each call, a policy created, linked or rotated is trusted at once, on
every node, with nothing to synchronise.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from sqlalchemy import func, select

from opendps.errors import Conflict, InvalidInput, NotFound, PayloadTooLarge, PreconditionFailed
from opendps.ids import check_resource_name, etag_matches, new_etag
from opendps.pki.keys import KeyStore
from opendps.store import CertificateAuthority, Enrollment, HubCertificate, HubDevice, LinkedHub, Namespace, Policy, Store

DEFAULT_HUB = "default"
_HOST = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


class HubNotFound(NotFound):
    error_code = 404001


@dataclass(frozen=True)
class HubView:
    id: int
    name: str
    host_name: str
    allocation_weight: int
    apply_allocation_policy: bool
    etag: str
    created_at: datetime


@dataclass(frozen=True)
class DeviceIdentity:
    hub_name: str
    hub_host_name: str
    device_id: str
    auth_type: str
    primary_thumbprint: str | None
    secondary_thumbprint: str | None
    status: str
    generation_id: str
    etag: str
    tags: dict
    desired: dict
    reported: dict
    desired_version: int
    reported_version: int
    created_at: datetime
    updated_at: datetime

    def twin(self) -> dict[str, Any]:
        """The twin document in Azure's shape."""
        return {
            "deviceId": self.device_id, "etag": self.etag, "status": self.status,
            "authenticationType": self.auth_type,
            "tags": self.tags,
            "properties": {"desired": {**self.desired, "$version": self.desired_version},
                           "reported": {**self.reported, "$version": self.reported_version}},
        }


@dataclass(frozen=True)
class TrustedCa:
    certificate: x509.Certificate
    namespace: str
    policy: str
    status: str  # active | retired
    enrollments: list[str] = field(default_factory=list)


def check_host_name(value: str) -> str:
    if not isinstance(value, str) or not _HOST.match(value):
        raise InvalidInput(f"hub host name {value!r} is not a valid DNS name")
    return value.lower()


def _view(h: LinkedHub) -> HubView:
    return HubView(h.id, h.name, h.host_name, h.allocation_weight, h.apply_allocation_policy, h.etag, h.created_at)


def _identity(hub: LinkedHub, d: HubDevice) -> DeviceIdentity:
    return DeviceIdentity(hub.name, hub.host_name, d.device_id, d.auth_type, d.primary_thumbprint, d.secondary_thumbprint,
                          d.status, d.generation_id, d.etag, d.twin_tags, d.twin_desired, d.twin_reported,
                          d.desired_version, d.reported_version, d.created_at, d.updated_at)


def enrollment_hubs(document: dict) -> list[str]:
    """Host names an enrollment allocates to (empty: every hub that applies allocation policy)."""
    hubs = document.get("iotHubs") or []
    if not hubs and document.get("iotHubHostName"):
        hubs = [document["iotHubHostName"]]
    return [h.lower() for h in hubs]


class Hubs:
    def __init__(self, store: Store, keys: KeyStore):
        self.store = store
        self.keys = keys

    # ---- hubs ----
    @staticmethod
    def _hub(s, name: str) -> LinkedHub:  # noqa: ANN001
        row = s.scalars(select(LinkedHub).where(LinkedHub.name == name)).first()
        if row is None:
            raise HubNotFound(f"linked hub {name!r} does not exist")
        return row

    def create(self, name: str, host_name: str, *, allocation_weight: int = 1,
               apply_allocation_policy: bool = True) -> HubView:
        check_resource_name("linked hub", name)
        host = check_host_name(host_name)
        if not isinstance(allocation_weight, int) or isinstance(allocation_weight, bool) or not 0 <= allocation_weight <= 1000:
            raise InvalidInput("allocationWeight must be an integer from 0 to 1000")
        if not isinstance(apply_allocation_policy, bool):
            raise InvalidInput("applyAllocationPolicy must be true or false")
        with self.store.session() as s:
            if s.scalars(select(LinkedHub).where(LinkedHub.name == name)).first() is not None:
                raise Conflict(f"linked hub {name!r} already exists")
            if s.scalars(select(LinkedHub).where(LinkedHub.host_name == host)).first() is not None:
                raise Conflict(f"a linked hub with host name {host!r} already exists")
            row = LinkedHub(name=name, host_name=host, allocation_weight=allocation_weight,
                            apply_allocation_policy=apply_allocation_policy, etag=new_etag(),
                            created_at=datetime.now(UTC))
            s.add(row)
            s.flush()
            return _view(row)

    def ensure(self, name: str, host_name: str) -> HubView:
        """The hub ``name``, created if missing (the default hub made at init)."""
        with self.store.session() as s:
            row = s.scalars(select(LinkedHub).where(LinkedHub.name == name)).first()
            if row is not None:
                return _view(row)
        try:
            return self.create(name, host_name)
        except Conflict:  # another node created it first
            return self.get(name)

    def get(self, name: str) -> HubView:
        with self.store.session() as s:
            return _view(self._hub(s, name))

    def by_host(self, host_name: str) -> HubView | None:
        with self.store.session() as s:
            row = s.scalars(select(LinkedHub).where(LinkedHub.host_name == host_name.lower())).first()
            return _view(row) if row else None

    def list(self) -> list[HubView]:
        with self.store.session() as s:
            return [_view(h) for h in s.scalars(select(LinkedHub).order_by(LinkedHub.name))]

    def delete(self, name: str, *, if_match: str | None = None) -> None:
        """Unlink a hub (its device registry goes with it); refused while an enrollment names it."""
        with self.store.session() as s:
            row = self._hub(s, name)
            if not etag_matches(if_match, row.etag):
                raise PreconditionFailed(f"ETag {if_match} does not match linked hub {name!r}, as per RFC7232")
            users = [e.enrollment_id for e in s.scalars(select(Enrollment))
                     if row.host_name in enrollment_hubs(e.document)]
            if users:
                raise Conflict(f"linked hub {name!r} is used by enrollment(s) {', '.join(sorted(users)[:5])}; "
                               "remove it from their iotHubs first", error_code=409002)
            s.delete(row)

    # ---- device identities (provisioning calls these inside its own transaction) ----
    def put_device(self, s, hub: LinkedHub, device_id: str, *, auth_type: str,  # noqa: ANN001 - Session
                   thumbprints: tuple[str | None, str | None] = (None, None),
                   keys: tuple[str, str] | None = None, initial_twin: dict | None = None,
                   reset_twin: bool = False, migrate_from: HubDevice | None = None) -> HubDevice:
        """Create or update ``device_id`` in ``hub``; twin per reprovisioning rules.

        A new identity gets ``migrate_from``'s twin when data is migrated, else the initial twin.
        ``reset_twin`` replaces an existing twin by the initial twin (deviceDataReset).
        """
        now = datetime.now(UTC)
        key = device_id.lower()
        row = s.scalars(select(HubDevice).where(HubDevice.hub_id == hub.id, HubDevice.device_key == key)).first()
        tags, desired = _initial(initial_twin)
        if row is None:
            row = HubDevice(hub_id=hub.id, device_id=device_id, device_key=key, generation_id=secrets.token_hex(8),
                            status="enabled", created_at=now, twin_reported={}, desired_version=1, reported_version=1)
            if migrate_from is not None:
                row.twin_tags = copy.deepcopy(migrate_from.twin_tags)
                row.twin_desired = copy.deepcopy(migrate_from.twin_desired)
                row.twin_reported = copy.deepcopy(migrate_from.twin_reported)
                row.desired_version = migrate_from.desired_version
                row.reported_version = migrate_from.reported_version
            else:
                row.twin_tags, row.twin_desired = tags, desired
            s.add(row)
        elif reset_twin:
            row.twin_tags, row.twin_desired, row.twin_reported = tags, desired, {}
            row.desired_version += 1
            row.reported_version += 1
        row.auth_type = auth_type
        row.primary_thumbprint, row.secondary_thumbprint = thumbprints
        row.secret = self.keys.wrap(json.dumps(list(keys)).encode(), f"hub-device:{hub.id}:{key}") if keys else None
        row.etag = new_etag()
        row.updated_at = now
        s.flush()
        return row

    @staticmethod
    def find_device(s, hub: LinkedHub, device_id: str) -> HubDevice | None:  # noqa: ANN001
        return s.scalars(select(HubDevice).where(HubDevice.hub_id == hub.id,
                                                 HubDevice.device_key == device_id.lower())).first()

    def device_keys(self, hub_id: int, device: HubDevice) -> tuple[str, str] | None:
        if device.secret is None:
            return None
        primary, secondary = json.loads(self.keys.unwrap(device.secret, f"hub-device:{hub_id}:{device.device_key}"))
        return primary, secondary

    def get_device(self, hub_name: str, device_id: str) -> DeviceIdentity:
        with self.store.session() as s:
            hub = self._hub(s, hub_name)
            row = self.find_device(s, hub, device_id)
            if row is None:
                raise NotFound(f"device {device_id!r} does not exist in hub {hub_name!r}", error_code=404001)
            return _identity(hub, row)

    def device_credentials(self, hub_name: str, device_id: str) -> tuple[DeviceIdentity, tuple[str, str] | None]:
        """The identity and its SAS keys (the service API shows them, as IoT Hub's does)."""
        with self.store.session() as s:
            hub, row = self._device_row(s, hub_name, device_id)
            return _identity(hub, row), self.device_keys(hub.id, row)

    def list_devices(self, hub_name: str) -> list[DeviceIdentity]:
        with self.store.session() as s:
            hub = self._hub(s, hub_name)
            rows = s.scalars(select(HubDevice).where(HubDevice.hub_id == hub.id).order_by(HubDevice.device_key))
            return [_identity(hub, r) for r in rows]

    def count_devices(self, hub_name: str) -> int:
        with self.store.session() as s:
            hub = self._hub(s, hub_name)
            return s.scalar(select(func.count()).select_from(HubDevice).where(HubDevice.hub_id == hub.id)) or 0

    # ---- twins ----
    def _device_row(self, s, hub_name: str, device_id: str) -> tuple[LinkedHub, HubDevice]:  # noqa: ANN001
        hub = self._hub(s, hub_name)
        row = self.find_device(s, hub, device_id)
        if row is None:
            raise NotFound(f"device {device_id!r} does not exist in hub {hub_name!r}", error_code=404001)
        return hub, row

    def patch_reported(self, hub_id: int, device_id: str, patch: object) -> int:
        """Device side: JSON merge patch of reported properties; returns the new reported version."""
        with self.store.session() as s:
            row = s.scalars(select(HubDevice).where(HubDevice.hub_id == hub_id,
                                                    HubDevice.device_key == device_id.lower())).first()
            if row is None:
                raise NotFound(f"device {device_id!r} no longer exists", error_code=404001)
            row.twin_reported = merge_patch(row.twin_reported, patch, "reported properties")
            row.reported_version += 1
            row.etag = new_etag()
            row.updated_at = datetime.now(UTC)
            return row.reported_version

    def update_twin(self, hub_name: str, device_id: str, *, desired: object = None, tags: object = None,
                    if_match: str | None = None) -> DeviceIdentity:
        """Service side: merge-patch desired properties and/or tags (twin PATCH)."""
        with self.store.session() as s:
            hub, row = self._device_row(s, hub_name, device_id)
            if not etag_matches(if_match, row.etag):
                raise PreconditionFailed(f"ETag {if_match} does not match the twin of {device_id!r}, as per RFC7232")
            if tags is not None:
                row.twin_tags = merge_patch(row.twin_tags, tags, "tags", limit=MAX_TAGS_BYTES)
            if desired is not None:
                row.twin_desired = merge_patch(row.twin_desired, desired, "desired properties")
                row.desired_version += 1
            row.etag = new_etag()
            row.updated_at = datetime.now(UTC)
            s.flush()
            return _identity(hub, row)

    # ---- device identities (service side) ----
    def create_device(self, hub_name: str, device_id: str, *, auth_type: str = "sas", keys: tuple[str, str] | None = None,
                      thumbprints: tuple[str | None, str | None] = (None, None), status: str = "enabled",
                      if_match: str | None = None) -> tuple[DeviceIdentity, bool]:
        """Create or update a device identity (hub service API ``PUT /devices/{id}``); returns (identity, created)."""
        if auth_type not in ("sas", "selfSigned", "certificateAuthority"):
            raise InvalidInput("authentication.type must be sas, selfSigned or certificateAuthority")
        if status not in ("enabled", "disabled"):
            raise InvalidInput("status must be enabled or disabled")
        if auth_type == "selfSigned" and not thumbprints[0]:
            raise InvalidInput("a selfSigned device needs x509Thumbprint.primaryThumbprint")
        for name, value in zip(("primaryThumbprint", "secondaryThumbprint"), thumbprints, strict=True):
            if value and not _THUMBPRINT.match(value.replace(":", "")):
                raise InvalidInput(f"x509Thumbprint.{name} must be 40 (SHA-1) or 64 (SHA-256) hex digits")
        if keys is not None:
            for name, value in zip(("primaryKey", "secondaryKey"), keys, strict=True):
                _check_device_key(value, f"symmetricKey.{name}")
        with self.store.session() as s:
            hub = self._hub(s, hub_name)
            existing = self.find_device(s, hub, device_id)
            if existing is not None and not etag_matches(if_match, existing.etag):
                raise PreconditionFailed(f"ETag {if_match} does not match device {device_id!r}, as per RFC7232")
            if existing is None and if_match not in (None, "*"):
                raise PreconditionFailed(f"device {device_id!r} does not exist, so If-Match cannot match")
            if auth_type == "sas" and keys is None:
                keys = self.device_keys(hub.id, existing) if existing is not None else None
                keys = keys or (_new_device_key(), _new_device_key())
            row = self.put_device(s, hub, device_id, auth_type=auth_type, thumbprints=(
                _thumb(thumbprints[0]), _thumb(thumbprints[1])), keys=keys if auth_type == "sas" else None)
            row.status = status
            s.flush()
            return _identity(hub, row), existing is None

    def set_status(self, hub_name: str, device_id: str, status: str) -> DeviceIdentity:
        if status not in ("enabled", "disabled"):
            raise InvalidInput("status must be enabled or disabled")
        with self.store.session() as s:
            hub, row = self._device_row(s, hub_name, device_id)
            row.status = status
            row.etag = new_etag()
            row.updated_at = datetime.now(UTC)
            s.flush()
            return _identity(hub, row)

    def delete_device(self, hub_name: str, device_id: str, *, if_match: str | None = None) -> None:
        with self.store.session() as s:
            _, row = self._device_row(s, hub_name, device_id)
            if not etag_matches(if_match, row.etag):
                raise PreconditionFailed(f"ETag {if_match} does not match device {device_id!r}, as per RFC7232")
            s.delete(row)

    # ---- trust ----
    def uploaded_cas(self, hub_id: int, *, now: datetime | None = None) -> list[x509.Certificate]:
        """The owner's CA certificates uploaded to this hub and proven by proof of possession."""
        now = now or datetime.now(UTC)
        with self.store.session() as s:
            rows = s.scalars(select(HubCertificate).where(HubCertificate.hub_id == hub_id, HubCertificate.is_verified.is_(True),
                                                          HubCertificate.not_after > now).order_by(HubCertificate.name))
            return [x509.load_der_x509_certificate(r.der) for r in rows]

    def trusted_cas(self, hub_name: str, *, now: datetime | None = None) -> list[TrustedCa]:
        """Issuing CAs this hub trusts for operational certificates (see the module docstring)."""
        now = now or datetime.now(UTC)
        with self.store.session() as s:
            hub = self._hub(s, hub_name)
            users: dict[int, list[str]] = {}
            for e in s.scalars(select(Enrollment).where(Enrollment.policy_id.is_not(None))):
                hubs = enrollment_hubs(e.document)
                if (hubs and hub.host_name in hubs) or (not hubs and hub.apply_allocation_policy):
                    users.setdefault(e.policy_id, []).append(e.enrollment_id)
            if not users:
                return []
            rows = s.execute(
                select(CertificateAuthority, Policy.name, Namespace.name)
                .join(Policy, CertificateAuthority.policy_id == Policy.id)
                .join(Namespace, Policy.namespace_id == Namespace.id)
                .where(CertificateAuthority.kind == "issuing", CertificateAuthority.policy_id.in_(list(users)),
                       CertificateAuthority.not_after > now)
                .order_by(CertificateAuthority.id)
            ).all()
            return [TrustedCa(x509.load_der_x509_certificate(ca.der), ns, pol, ca.status, sorted(users[ca.policy_id]))
                    for ca, pol, ns in rows]


_THUMBPRINT = re.compile(r"^(?:[0-9A-Fa-f]{40}|[0-9A-Fa-f]{64})$")
MAX_TWIN_BYTES = 32 * 1024


def _check_device_key(value: object, where: str) -> None:
    try:
        raw = base64.b64decode(value, validate=True) if isinstance(value, str) else b""
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"{where} is not valid base64") from exc
    if not 16 <= len(raw) <= 64:
        raise InvalidInput(f"{where} must be base64 of 16-64 bytes")
MAX_TAGS_BYTES = 8 * 1024


def merge_patch(target: dict, patch: object, what: str, *, limit: int = MAX_TWIN_BYTES) -> dict:
    """RFC 7396 JSON merge patch (``null`` deletes); keys starting with ``$`` are reserved."""
    if not isinstance(patch, dict):
        raise InvalidInput(f"{what} patch must be a JSON object")

    def merge(base: dict, change: dict) -> dict:
        out = dict(base)
        for key, value in change.items():
            if not isinstance(key, str) or key.startswith("$"):
                raise InvalidInput(f"{what}: property name {key!r} is reserved or invalid")
            if value is None:
                out.pop(key, None)
            elif isinstance(value, dict):
                out[key] = merge(out.get(key) if isinstance(out.get(key), dict) else {}, value)
            else:
                out[key] = value
        return out

    result = merge(target or {}, patch)
    if len(json.dumps(result)) > limit:
        raise PayloadTooLarge(f"{what} would exceed {limit} bytes")
    return result


def _new_device_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def _thumb(value: str | None) -> str | None:
    return value.replace(":", "").upper() if value else None


def _initial(initial_twin: dict | None) -> tuple[dict, dict]:
    twin = initial_twin or {}
    tags = copy.deepcopy(twin.get("tags") or {})
    desired = copy.deepcopy(((twin.get("properties") or {}).get("desired")) or {})
    for meta in ("$metadata", "$version"):
        tags.pop(meta, None)
        desired.pop(meta, None)
    return tags, desired
