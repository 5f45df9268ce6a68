"""Logical IoT hubs: a host name plus a device registry with twins, and the CAs each hub trusts.

Trust ("CA sync") is derived, not copied: a hub trusts every issuing CA (active, or retired but not
yet expired) of every policy that an enrollment allocating to that hub links to. Because it is
computed from the store on each call, a policy created, linked or rotated is trusted at once, on
every node, with nothing to synchronise. Enrollments belong to provisioning, above this package:
the hub asks them through the :class:`EnrollmentLinks` the service wiring binds.

Owns ``linked_hubs``, ``hub_devices`` and ``hub_certificates``.
"""

from __future__ import annotations

import base64
import builtins
import copy
import json
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import ClientVerifier
from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from opendps.errors import Conflict, InvalidInput, NotFound, PayloadTooLarge, PreconditionFailed
from opendps.hub.query import continuation_token, parse_query, read_continuation
from opendps.ids import check_resource_name, etag_matches, new_etag, take_row
from opendps.pki import CaCertificates, KeyStore, device_chain_verifier
from opendps.pki.certificates import ValidatedPaths, subject_key_id
from opendps.registry import Registry
from opendps.store import (
    CloudToDeviceMessage,
    ConfigCache,
    HubCertificate,
    HubDevice,
    LinkedHub,
    Store,
    Transaction,
    conflicted,
    joined,
    table_of,
)
from opendps.transport import shown
from opendps.transport.wire import json_depth

# the registration path reads and writes identities with prepared SQL statements (bound parameters: SQLAlchemy
# compiles each once), not the ORM's unit of work
_DEVICES = table_of(HubDevice)
_DEVICE_BY_KEY = select(_DEVICES).where(_DEVICES.c.hub_id == bindparam("b_hub"),
                                        _DEVICES.c.device_key == bindparam("b_key"))
_DEVICE_ID_BY_KEY = select(_DEVICES.c.id).where(_DEVICES.c.hub_id == bindparam("b_hub"),
                                                _DEVICES.c.device_key == bindparam("b_key"))
_INSERT_DEVICE = insert(_DEVICES).returning(_DEVICES.c.id)
_DELETE_DEVICE = delete(_DEVICES).where(_DEVICES.c.id == bindparam("b_id"))
# a deleted identity's cloud-to-device queue goes with it (no foreign key ties them): a device created again with the
# id is a new device (a new generation id), and IoT Hub does not hand it the old one's messages
_C2D = table_of(CloudToDeviceMessage)
_DELETE_DEVICE_C2D = delete(_C2D).where(_C2D.c.hub_id == bindparam("b_hub"), _C2D.c.device_key == bindparam("b_key"))
_RESET_TWIN = update(_DEVICES).where(_DEVICES.c.id == bindparam("b_id")).values(
    twin_tags=bindparam("b_tags", type_=_DEVICES.c.twin_tags.type),
    twin_desired=bindparam("b_desired", type_=_DEVICES.c.twin_desired.type), twin_reported={},
    desired_version=_DEVICES.c.desired_version + 1, reported_version=_DEVICES.c.reported_version + 1)
_CONNECT_IDENTITY = select(_DEVICES.c.device_id, _DEVICES.c.device_key, _DEVICES.c.status, _DEVICES.c.auth_type,
                           _DEVICES.c.primary_thumbprint, _DEVICES.c.secondary_thumbprint, _DEVICES.c.secret,
                           _DEVICES.c.subscriptions).where(
    _DEVICES.c.hub_id == bindparam("b_hub"), _DEVICES.c.device_key == bindparam("b_key"))
_KEEP_SUBSCRIPTIONS = update(_DEVICES).where(_DEVICES.c.hub_id == bindparam("b_hub"),
                                             _DEVICES.c.device_key == bindparam("b_key"))
_UPDATE_DEVICE = update(_DEVICES).where(_DEVICES.c.id == bindparam("b_id"))

DEFAULT_HUB = "default"
_HOST = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
AUTH_TYPES = ("sas", "selfSigned", "certificateAuthority")
# IoT Hub device ids: up to 128 ASCII letters, digits and - : . + % _ # * ? ! ( ) , = @ ; $ '
_DEVICE_ID = re.compile(r"^[A-Za-z0-9\-:.+%_#*?!(),=@;$']{1,128}$")
TwinAction = Literal["keep", "reset", "migrate"]
QUERY_BATCH = 500  # twins read per transaction while a query scans a hub


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
    tags: dict[str, Any]
    desired: dict[str, Any]
    reported: dict[str, Any]
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
class QueryPage:
    """One page of a hub query: rows, the token for the next page (None: the last), Azure's item type."""

    items: list[dict[str, Any]]
    continuation: str | None
    item_type: str


@dataclass(frozen=True)
class DeviceSummary:
    """A device identity as the fleet dashboard lists it (no twin, no keys)."""

    hub_name: str
    device_id: str
    status: str
    auth_type: str
    created_at: datetime
    updated_at: datetime
    last_seen_at: datetime | None  # when a session of it last began or ended (None: never connected)


@dataclass(frozen=True)
class DevicePage:
    items: builtins.list[DeviceSummary]
    next_after: str | None  # the last device key of the page when more follow (the next page starts after it)


@dataclass(frozen=True)
class DeviceCredential:
    """How the hub authenticates a device: SAS keys, a self-signed certificate's thumbprints, or a chain to a CA
    the hub trusts (``certificateAuthority``, the operational certificates opendps issues)."""

    auth_type: str
    keys: tuple[str, str] | None = None
    thumbprints: tuple[str | None, str | None] = (None, None)


class EnrollmentLinks(Protocol):
    """What the hub asks of the enrollments (owned by provisioning) that allocate devices to it."""

    def enrollments_using_hub(self, host_name: str) -> list[str]:
        """Ids of the enrollments that name the hub (they block unlinking it)."""
        ...

    def policies_for_hub(self, host_name: str, apply_allocation_policy: bool) -> dict[int, list[str]]:
        """Credential policy id -> the enrollments that allocate to this hub with that policy."""
        ...


class _Unbound:
    def enrollments_using_hub(self, host_name: str) -> list[str]:
        raise RuntimeError("Hubs.enrollments is not bound: build the services with opendps.services.wire")

    def policies_for_hub(self, host_name: str, apply_allocation_policy: bool) -> dict[int, list[str]]:
        raise RuntimeError("Hubs.enrollments is not bound: build the services with opendps.services.wire")


@dataclass(frozen=True)
class TrustedCa:
    certificate: x509.Certificate
    namespace: str
    policy: str
    status: str  # active | retired
    enrollments: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ConnectIdentity:
    """What a CONNECT needs of a device identity: no twin, the SAS keys unwrapped only for SAS devices."""

    device_id: str
    status: str
    auth_type: str
    thumbprints: frozenset[str]
    keys: tuple[str, str] | None
    subscriptions: int = 0  # what its last clean-session-0 session subscribed to (frontends.mqtt.hub.KEPT_FILTERS)


class HubTrust:
    """The CAs one hub trusts (issuing CAs of the policies its enrollments use, and the owner's uploaded, proven
    CAs), parsed once per configuration change, with a chain verifier rebuilt at most once a second and the paths
    it validated remembered (:meth:`validate`): a new trust (a configuration change) is a new object, so nothing
    validated under the old one is taken for validated under the new."""

    def __init__(self, synced: builtins.list[x509.Certificate], uploaded: builtins.list[x509.Certificate]) -> None:
        self.synced = synced
        self.uploaded = uploaded
        self._uploaded_der = frozenset(c.public_bytes(Encoding.DER) for c in uploaded)
        self._synced_by_key: dict[str, builtins.list[x509.Certificate]] = {}
        for ca in synced:
            key_id = subject_key_id(ca)
            if key_id is not None:
                self._synced_by_key.setdefault(key_id, []).append(ca)
        self._verifier: tuple[int, ClientVerifier | None] = (-1, None)
        self._lock = threading.Lock()
        self._validated = ValidatedPaths()

    def verifier(self, now: datetime) -> ClientVerifier | None:
        """A verifier over the CAs still valid at ``now`` (None: no CA at all), its time truncated to the second."""
        second = int(now.timestamp())
        with self._lock:
            at, verifier = self._verifier
            if at == second:
                return verifier
        moment = datetime.fromtimestamp(second, UTC)
        anchors = [c for c in (*self.synced, *self.uploaded) if c.not_valid_after_utc > moment]
        verifier = device_chain_verifier(anchors, moment) if anchors else None
        with self._lock:
            self._verifier = (second, verifier)
        return verifier

    def validate(self, leaf: x509.Certificate, intermediates: builtins.list[x509.Certificate],
                 now: datetime) -> x509.Certificate | None:
        """The trust anchor ``leaf`` validates to through ``intermediates`` (None: the hub trusts no CA at all);
        VerificationError when it does not. A device reconnecting with the same chain is answered from memory
        (the path's validity window permitting): a P-384 path validation per owner-CA CONNECT saved."""
        key = ValidatedPaths.key((leaf, *intermediates))
        anchor: x509.Certificate | None = self._validated.get(key, now)
        if anchor is not None:
            return anchor
        verifier = self.verifier(now)
        if verifier is None:
            return None
        chain = verifier.verify(leaf, intermediates).chain
        anchor = chain[-1]
        self._validated.add(key, chain, anchor)
        return anchor

    def issuing_ca(self, key_id: str | None, now: datetime) -> x509.Certificate | None:
        """The synced issuing CA (one of ours) with this key identifier, valid at ``now``, if the hub trusts one:
        a certificate naming it as its authority may be one this service issued (its issuance record decides)."""
        for ca in self._synced_by_key.get(key_id, ()) if key_id is not None else ():
            if ca.not_valid_before_utc <= now < ca.not_valid_after_utc:
                return ca
        return None

    def is_uploaded(self, certificate: x509.Certificate) -> bool:
        return certificate.public_bytes(Encoding.DER) in self._uploaded_der


def hub_row(s: Session, name: str) -> LinkedHub:
    """The linked hub named ``name`` in the caller's transaction (NotFound otherwise)."""
    row = s.scalars(select(LinkedHub).where(LinkedHub.name == name)).first()
    if row is None:
        raise NotFound(f"linked hub {name!r} does not exist")
    return row


def check_device_id(value: object) -> str:
    """A device id IoT Hub would accept (ids are matched case-insensitively here)."""
    if not isinstance(value, str) or not _DEVICE_ID.fullmatch(value):
        raise InvalidInput(f"device id {shown(value)} is invalid: use 1-128 ASCII letters, digits and "
                           "- : . + % _ # * ? ! ( ) , = @ ; $ '")
    return value


def check_host_name(value: str) -> str:
    if not isinstance(value, str) or not _HOST.fullmatch(value):
        raise InvalidInput(f"hub host name {shown(value)} is not a valid DNS name")
    return value.lower()


def _view(h: LinkedHub) -> HubView:
    return HubView(h.id, h.name, h.host_name, h.allocation_weight, h.apply_allocation_policy, h.etag, h.created_at)


def _identity(hub: LinkedHub, d: HubDevice) -> DeviceIdentity:
    return _identity_of(hub.name, hub.host_name, d)


def _identity_of(hub_name: str, hub_host: str, d: HubDevice) -> DeviceIdentity:
    return DeviceIdentity(hub_name, hub_host, d.device_id, d.auth_type, d.primary_thumbprint, d.secondary_thumbprint,
                          d.status, d.generation_id, d.etag, d.twin_tags, d.twin_desired, d.twin_reported,
                          d.desired_version, d.reported_version, d.created_at, d.updated_at)


class Hubs:
    """Linked hubs, their device identities and twins, and the CAs each trusts.

    ``domain``: new hubs without a host name get ``{name}.{domain}`` (the service's own host name).
    """

    def __init__(self, store: Store, keys: KeyStore, registry: Registry, *, domain: str = "localhost") -> None:
        self.store = store
        self.keys = keys
        self.registry = registry
        self.domain = domain
        self.enrollments: EnrollmentLinks = _Unbound()  # bound by opendps.services.wire
        self._linked: ConfigCache[str, builtins.list[HubView]] = ConfigCache(store, capacity=1)
        self._trust: ConfigCache[int, HubTrust] = ConfigCache(store)  # hub id -> what it trusts (CONNECT)
        self._byte_order: bool | None = None  # does the database order text by code point (device_page)
        self._connect_identity = store.prepare(_CONNECT_IDENTITY)

    # ---- hubs ----
    @staticmethod
    def _hub(s: Session, name: str) -> LinkedHub:
        return hub_row(s, name)

    def create(self, name: str, host_name: str | None = None, *, allocation_weight: int = 1,
               apply_allocation_policy: bool = True) -> HubView:
        """Link a hub; its host name defaults to ``{name}.{domain}``."""
        check_resource_name("linked hub", name)
        host = check_host_name(host_name or f"{name}.{self.domain}")
        if not isinstance(allocation_weight, int) or isinstance(allocation_weight, bool) or not 0 <= allocation_weight <= 1000:
            raise InvalidInput("allocationWeight must be an integer from 0 to 1000")
        if not isinstance(apply_allocation_policy, bool):
            raise InvalidInput("applyAllocationPolicy must be true or false")
        try:
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
                self._new_owner_keys(row)  # wrapped with the row's id as associated data
                return _view(row)
        except IntegrityError as exc:  # a concurrent link of the same name or host name won the insert
            raise Conflict(f"linked hub {name!r} (host name {host!r}) already exists") from exc

    # ---- the hub's own owner keys (iothubowner) ----
    @staticmethod
    def _owner_label(hub_id: int) -> str:
        return f"hub-owner:{hub_id}"

    def _new_owner_keys(self, hub: LinkedHub, keys: tuple[str, str] | None = None) -> tuple[str, str]:
        keys = keys or (_new_device_key(), _new_device_key())
        hub.owner_keys = self.keys.wrap(json.dumps(list(keys)).encode(), self._owner_label(hub.id))
        return keys

    def owner_keys(self, hub_name: str, *, initial: tuple[str, str] | None = None) -> tuple[str, str]:
        """The hub's (primary, secondary) ``iothubowner`` keys: its own, never another hub's. A hub made before
        hubs had their own gets a pair on first use (``initial``: the pair to adopt, e.g. the old shared one)."""
        with self.store.session() as s:
            hub = self._hub(s, hub_name)
            if hub.owner_keys is None:
                return self._new_owner_keys(hub, initial)
            primary, secondary = json.loads(self.keys.unwrap(hub.owner_keys, self._owner_label(hub.id)))
            return primary, secondary

    def renew_owner_key(self, hub_name: str, which: str) -> tuple[str, str]:
        """``az iot hub policy renew-key``: a new ``primary`` or ``secondary`` key, or ``swap`` the two."""
        if which not in ("primary", "secondary", "swap"):
            raise InvalidInput(f"renewKey must be primary, secondary or swap (got {which!r})")
        self.owner_keys(hub_name)  # a hub made before hubs had their own keys gets its pair first
        with self.store.session() as s:
            hub = self._hub(s, hub_name)
            # the keys as they are once the row is held (two renewals at once: each renews what the other left)
            take_row(s, hub, None, f"linked hub {hub_name!r}")
            if hub.owner_keys is None:
                raise NotFound(f"linked hub {hub_name!r} does not exist")
            primary, secondary = json.loads(self.keys.unwrap(hub.owner_keys, self._owner_label(hub.id)))
            renewed = {"primary": (_new_device_key(), secondary), "secondary": (primary, _new_device_key()),
                       "swap": (secondary, primary)}[which]
            self._new_owner_keys(hub, renewed)
        return renewed

    def ensure(self, name: str, host_name: str | None = None) -> HubView:
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

    def by_host(self, host_name: str, *, session: Session | None = None) -> HubView | None:
        """The hub with this host name; with ``session``, read in the caller's transaction, else from the
        configuration cache (:meth:`list`)."""
        if session is not None:
            row = session.scalars(select(LinkedHub).where(LinkedHub.host_name == host_name.lower())).first()
            return _view(row) if row else None
        host = host_name.lower()
        return next((h for h in self.list() if h.host_name == host), None)

    def list(self) -> builtins.list[HubView]:
        """The linked hubs by name (from the configuration cache: allocation reads them on every registration)."""
        return self._linked.get("all", self._load_list)

    def _load_list(self) -> builtins.list[HubView]:
        with self.store.session() as s:
            return [_view(h) for h in s.scalars(select(LinkedHub).order_by(LinkedHub.name))]

    def delete(self, name: str, *, if_match: str | None = None) -> None:
        """Unlink a hub (its device registry goes with it); refused while an enrollment names it."""
        hub = self.get(name)
        if not etag_matches(if_match, hub.etag):
            raise PreconditionFailed(f"ETag {if_match} does not match linked hub {name!r}, as per RFC7232")
        users = self.enrollments.enrollments_using_hub(hub.host_name)
        if users:
            raise Conflict(f"linked hub {name!r} is used by enrollment(s) {', '.join(sorted(users)[:5])}; "
                           "remove it from their iotHubs first", error_code=409002)
        for attempt in range(3):
            try:
                with self.store.session() as s:
                    row = self._hub(s, name)
                    take_row(s, row, if_match, f"linked hub {name!r}")  # of two deletes at once: one 204, one 404
                    s.delete(row)
                return
            except DBAPIError as exc:
                # PostgreSQL: the cascade over the hub's devices can deadlock with a device's session writing its
                # connection state (its row, then the hub's key), and the database aborts one of them; this one
                # wrote nothing and runs again
                if attempt == 2 or not conflicted(exc):
                    raise

    # ---- device identities (provisioning places devices inside its own transaction) ----
    def place_device(self, db: Session | Transaction, hub: HubView, device_id: str, credential: DeviceCredential, *,
                     initial_twin: dict[str, Any] | None = None, twin: TwinAction = "keep",
                     previous: tuple[HubView, str] | None = None) -> None:
        """Create or update ``device_id`` in ``hub`` within the caller's transaction, as a registration decided.

        ``previous`` = (hub, device id) of the device's last assignment. A new identity gets the initial twin,
        or with ``twin="migrate"`` the previous identity's twin; ``twin="reset"`` replaces an existing twin by the
        initial one. When the device moved to another hub, its previous identity is deleted.
        """
        check_device_id(device_id)
        # prepared statements on the transaction's driver cursor, not the ORM unit of work: this runs in every
        # registration. No read of the hub row: a hub unlinked meanwhile fails the insert on its foreign key
        # (IntegrityError), and the caller's transaction rolls back.
        tx = joined(db)
        old = None
        if previous is not None and (previous[0].id, previous[1].lower()) != (hub.id, device_id.lower()):
            old = tx.first(_DEVICE_BY_KEY, b_hub=previous[0].id, b_key=previous[1].lower())
        row_id = self._put_device(tx, hub.id, device_id, credential, initial_twin=initial_twin,
                                  reset_twin=twin == "reset", migrate_from=old if twin == "migrate" else None)
        if old is not None and previous is not None and previous[0].id != hub.id and old.id != row_id:
            tx.run(_DELETE_DEVICE, b_id=old.id)
            tx.run(_DELETE_DEVICE_C2D, b_hub=previous[0].id, b_key=previous[1].lower())

    def _put_device(self, db: Session | Transaction, hub_id: int, device_id: str, credential: DeviceCredential, *,
                    initial_twin: dict[str, Any] | None = None, reset_twin: bool = False,
                    migrate_from: Any = None, status: str | None = None) -> int:
        """Create or update the identity in the caller's transaction; its row id. ``status``: set it (a new
        identity is enabled unless told otherwise)."""
        tx = joined(db)
        now = datetime.now(UTC)
        key = device_id.lower()
        found = tx.first(_DEVICE_ID_BY_KEY, b_hub=hub_id, b_key=key)
        keys = credential.keys
        values: dict[str, Any] = {
            # ids match case-insensitively: the identity takes the spelling it is given now
            "device_id": device_id, "auth_type": credential.auth_type,
            "primary_thumbprint": credential.thumbprints[0], "secondary_thumbprint": credential.thumbprints[1],
            "secret": self.keys.wrap(json.dumps(list(keys)).encode(), f"hub-device:{hub_id}:{key}") if keys else None,
            "etag": new_etag(), "updated_at": now}
        if status is not None:
            values["status"] = status
        if found is not None:
            if reset_twin:  # rare (a reprovisioning policy that resets the twin): its own statement
                tags, desired = _initial(initial_twin)
                tx.run(_RESET_TWIN, b_id=found.id, b_tags=tags, b_desired=desired)
            if tx.run(_UPDATE_DEVICE, b_id=found.id, **values) == 1:
                return int(found.id)
            # deleted since the read (on PostgreSQL a delete can commit in between): created anew, as if the delete
            # had come first — updating nothing left a registration assigned to a hub without its device
        tags, desired = _initial(initial_twin)
        values.update(hub_id=hub_id, device_key=key, generation_id=secrets.token_hex(8), created_at=now,
                      twin_tags=tags, twin_desired=desired, twin_reported={}, desired_version=1,
                      reported_version=1)
        values.setdefault("status", "enabled")
        if migrate_from is not None:
            values.update(twin_tags=copy.deepcopy(migrate_from.twin_tags),
                          twin_desired=copy.deepcopy(migrate_from.twin_desired),
                          twin_reported=copy.deepcopy(migrate_from.twin_reported),
                          desired_version=migrate_from.desired_version,
                          reported_version=migrate_from.reported_version)
        inserted = tx.first(_INSERT_DEVICE, **values)
        assert inserted is not None
        return int(inserted.id)

    @staticmethod
    def _find(s: Session, hub_id: int, device_id: str) -> HubDevice | None:
        return s.scalars(select(HubDevice).where(HubDevice.hub_id == hub_id,
                                                 HubDevice.device_key == device_id.lower())).first()

    def _keys(self, hub_id: int, device: Any) -> tuple[str, str] | None:
        """The identity's SAS keys, unwrapped (an ORM row or a statement's row: both name ``secret``, ``device_key``)."""
        if device.secret is None:
            return None
        primary, secondary = json.loads(self.keys.unwrap(device.secret, f"hub-device:{hub_id}:{device.device_key}"))
        return primary, secondary

    def get_device(self, hub_name: str, device_id: str) -> DeviceIdentity:
        with self.store.session() as s:
            hub = self._hub(s, hub_name)
            row = self._find(s, hub.id, device_id)
            if row is None:
                raise NotFound(f"device {device_id!r} does not exist in hub {hub_name!r}")
            return _identity(hub, row)

    def device_credentials(self, hub_name: str, device_id: str) -> tuple[DeviceIdentity, tuple[str, str] | None]:
        """The identity and its SAS keys (the service API shows them, as IoT Hub's does)."""
        with self.store.session() as s:
            hub, row = self._device_row(s, hub_name, device_id)
            return _identity(hub, row), self._keys(hub.id, row)

    def list_devices(self, hub_name: str, *, top: int | None = None, after: str = "") -> builtins.list[DeviceIdentity]:
        """The hub's device identities in device key order; ``top``: at most that many (IoT Hub's ``GET /devices``);
        ``after``: those whose key comes after it (a keyset page on the unique index, never an offset)."""
        with self.store.session() as s:
            hub = self._hub(s, hub_name)
            q = select(HubDevice).where(HubDevice.hub_id == hub.id).order_by(HubDevice.device_key)
            if after:
                q = q.where(HubDevice.device_key > after.lower())
            rows = s.scalars(q.limit(top) if top is not None else q)
            return [_identity(hub, r) for r in rows]

    def device_page(self, hub_name: str, *, prefix: str = "", after: str = "", top: int = 100) -> DevicePage:
        """One page of the hub's devices in device key order (ids compare case-insensitively), after the key
        ``after``, whose ids start with ``prefix`` (any case): a keyset range on the unique index (hub_id,
        device_key), never a scan of the hub, for the fleet dashboard. Where the database compares text by code point
        (SQLite; PostgreSQL with the C collation) the prefix is a closed range; under a linguistic collation strings
        with the prefix need not be contiguous, so the range is only bounded below and the prefix filters."""
        if not 1 <= top <= 1000:
            raise InvalidInput("top must be 1-1000")
        key = prefix.lower()
        columns = (_DEVICES.c.device_id, _DEVICES.c.device_key, _DEVICES.c.status, _DEVICES.c.auth_type,
                   _DEVICES.c.created_at, _DEVICES.c.updated_at, _DEVICES.c.last_seen_at)
        with self.store.session() as s:
            hub = self._hub(s, hub_name)
            q = select(*columns).where(_DEVICES.c.hub_id == hub.id)
            if after:
                q = q.where(_DEVICES.c.device_key > after.lower())
            if key:
                q = q.where(_DEVICES.c.device_key >= key, func.substr(_DEVICES.c.device_key, 1, len(key)) == key)
                if self._code_point_order(s):
                    q = q.where(_DEVICES.c.device_key < key + "\U0010ffff")
            rows = s.connection().execute(q.order_by(_DEVICES.c.device_key).limit(top + 1)).all()
            name = hub.name
        items = [DeviceSummary(name, r.device_id, r.status, r.auth_type, r.created_at, r.updated_at, r.last_seen_at)
                 for r in rows[:top]]
        return DevicePage(items, rows[top - 1].device_key if len(rows) > top else None)

    def _code_point_order(self, s: Session) -> bool:
        """Whether the database orders text by code point (so strings with one prefix are contiguous): SQLite's
        BINARY, PostgreSQL's C collation. Asked once: ``'B' < 'a'`` and ``'a-c' < 'ab'`` hold only there."""
        if self._byte_order is None:
            self._byte_order = self.store.dialect == "sqlite" or bool(
                s.connection().exec_driver_sql("SELECT 'B' < 'a' AND 'a-c' < 'ab'").scalar())
        return self._byte_order

    def connect_identity(self, cursor: Any, hub: HubView, device_id: str) -> ConnectIdentity | None:
        """The identity a CONNECT checks, in one prepared statement on the cursor of the caller's
        :meth:`~opendps.store.Store.driver_transaction` (None: no such device); read on every CONNECT, so a disabled
        or deleted device is refused at once."""
        row = self._connect_identity.first(cursor, b_hub=hub.id, b_key=device_id.lower())
        if row is None:
            return None
        prints = frozenset(p for p in (row.primary_thumbprint, row.secondary_thumbprint) if p)
        return ConnectIdentity(row.device_id, row.status, row.auth_type, prints, self._keys(hub.id, row),
                               row.subscriptions)

    def keep_subscriptions(self, hub_id: int, device_id: str, mask: int) -> None:
        """Record what the device's MQTT session subscribes to (a bit mask the hub front end makes), for its next
        clean-session-0 connection, on whichever process or node that lands; one statement (a device that is gone
        meanwhile: nothing)."""
        with self.store.transaction() as tx:
            tx.run(_KEEP_SUBSCRIPTIONS, b_hub=hub_id, b_key=device_id.lower(), subscriptions=mask)

    def enabled(self, devices: builtins.list[tuple[int, str]]) -> set[tuple[int, str]]:
        """Of ``devices`` (hub id, lower-cased device id), those whose identity exists and is enabled: one statement
        per hub among them (a bus catching up after an outage re-checks a node's sessions)."""
        found: set[tuple[int, str]] = set()
        by_hub: dict[int, builtins.list[str]] = {}
        for hub_id, key in devices:
            by_hub.setdefault(hub_id, []).append(key)
        with self.store.session() as s:
            conn = s.connection()
            for hub_id, keys in by_hub.items():
                rows = conn.execute(select(_DEVICES.c.device_key).where(
                    _DEVICES.c.hub_id == hub_id, _DEVICES.c.device_key.in_(keys), _DEVICES.c.status == "enabled"))
                found.update((hub_id, row.device_key) for row in rows)
        return found

    def trust(self, hub: HubView) -> HubTrust:
        """What ``hub`` trusts for CA-signed devices, from the configuration cache: a CA synced, rotated, uploaded or
        removed on any node is in force at the next CONNECT everywhere."""
        return self._trust.get(hub.id, lambda: self._load_trust(hub))

    def _load_trust(self, hub: HubView) -> HubTrust:
        now = datetime.now(UTC)  # CAs expired now are left out; the verifier drops the others as they expire
        return HubTrust([t.certificate for t in self.trusted_cas(hub, now=now)], self.uploaded_cas(hub, now=now))

    def identity(self, hub: HubView, device_id: str) -> tuple[DeviceIdentity, tuple[str, str] | None] | None:
        """The device's identity in ``hub`` and its SAS keys (None: no such device); what CONNECT checks."""
        with self.store.session() as s:
            row = self._find(s, hub.id, device_id)
            if row is None:
                return None
            return _identity_of(hub.name, hub.host_name, row), self._keys(hub.id, row)

    # ---- twins ----
    def _device_row(self, s: Session, hub_name: str, device_id: str) -> tuple[LinkedHub, HubDevice]:
        hub = self._hub(s, hub_name)
        row = self._find(s, hub.id, device_id)
        if row is None:
            raise NotFound(f"device {device_id!r} does not exist in hub {hub_name!r}")
        return hub, row

    def patch_reported(self, hub_id: int, device_id: str, patch: object) -> int:
        """Device side: JSON merge patch of reported properties; returns the new reported version."""
        with self.store.session() as s:
            row = s.scalars(select(HubDevice).where(HubDevice.hub_id == hub_id,
                                                    HubDevice.device_key == device_id.lower())).first()
            gone = NotFound(f"device {device_id!r} no longer exists")
            if row is None:
                raise gone
            take_row(s, row, None, f"device {device_id!r}", gone=gone)  # a service change of the twin may be under way
            row.twin_reported = merge_patch(row.twin_reported, patch, "reported properties")
            row.reported_version += 1
            row.updated_at = datetime.now(UTC)
            return row.reported_version

    def update_twin(self, hub_name: str, device_id: str, *, desired: object = None, tags: object = None,
                    if_match: str | None = None) -> DeviceIdentity:
        """Service side: merge-patch desired properties and/or tags (twin PATCH)."""
        with self.store.session() as s:
            hub, row = self._claim(s, hub_name, device_id, if_match)
            if tags is not None:
                row.twin_tags = merge_patch(row.twin_tags, tags, "tags", limit=MAX_TAGS_BYTES)
            if desired is not None:
                row.twin_desired = merge_patch(row.twin_desired, desired, "desired properties")
                row.desired_version += 1
            row.updated_at = datetime.now(UTC)
            s.flush()
            return _identity(hub, row)

    def _claim(self, s: Session, hub_name: str, device_id: str, if_match: str | None,
               what: str = "the twin of") -> tuple[LinkedHub, HubDevice]:
        """The device's row, checked against ``If-Match`` and held to the end of the transaction with a new etag
        (:func:`~opendps.ids.take_row`): concurrent changes of one twin take turns, none lost."""
        hub, row = self._device_row(s, hub_name, device_id)
        take_row(s, row, if_match, f"{what} {device_id!r}",
                 gone=NotFound(f"device {device_id!r} does not exist in hub {hub_name!r}"))
        return hub, row

    def replace_twin(self, hub_name: str, device_id: str, *, tags: object = None, desired: object = None,
                     if_match: str | None = None) -> tuple[DeviceIdentity, dict[str, Any]]:
        """Service side: replace tags and desired properties wholesale (twin PUT; absent or null = empty).

        Returns the twin and the desired change as a merge patch from the old desired properties to the new
        ones (removed names are ``null``): what a connected device is sent, so it ends with exactly the new set.
        """
        new_tags = replacement(tags, "tags", limit=MAX_TAGS_BYTES)
        new_desired = replacement(desired, "desired properties")
        with self.store.session() as s:
            hub, row = self._claim(s, hub_name, device_id, if_match)
            change = merge_diff(row.twin_desired, new_desired)
            row.twin_tags, row.twin_desired = new_tags, new_desired
            row.desired_version += 1
            row.updated_at = datetime.now(UTC)
            s.flush()
            return _identity(hub, row), change

    # ---- queries ----
    def query(self, hub_name: str, text: str, document: Callable[[DeviceIdentity], dict[str, Any]], *,
              page_size: int, continuation: str | None = None) -> QueryPage:
        """One page of an IoT Hub query (:mod:`.query`) over the hub's twins, in device id order.

        ``document`` makes the twin document the query sees and returns (the front end's wire shape, with the
        connection state it knows). Twins are read in batches by device key (keyset), so memory stays bounded
        whatever the hub's size; the filter runs here, not in SQL, so a page with a rare match may scan far.
        """
        q = parse_query(text)
        after, returned = read_continuation(q, continuation) if continuation else ("", 0)
        if q.count is not None:
            total = sum(1 for d in self._scan(hub_name, "") if q.matches(document(d)))
            return QueryPage([{q.count: total}], None, q.item_type)
        limit = page_size if q.top is None else min(page_size, q.top - returned)
        items: builtins.list[dict[str, Any]] = []
        if limit <= 0:
            return QueryPage(items, None, q.item_type)
        last = after
        for ident in self._scan(hub_name, after):
            doc = document(ident)
            if not q.matches(doc):
                continue
            if len(items) == limit:  # the page is full and another match follows
                done = q.top is not None and returned + len(items) >= q.top
                return QueryPage(items, None if done else continuation_token(q, last, returned + len(items)),
                                 q.item_type)
            items.append(q.project(doc))
            last = ident.device_id.lower()
        return QueryPage(items, None, q.item_type)

    def _scan(self, hub_name: str, after: str) -> Iterator[DeviceIdentity]:
        """The hub's identities with a device key after ``after``, in key order, read :data:`QUERY_BATCH` at a time
        (one short transaction per batch)."""
        with self.store.session() as s:
            hub = self._hub(s, hub_name)
            hub_id, name, host = hub.id, hub.name, hub.host_name
        while True:
            with self.store.session() as s:
                rows = s.scalars(select(HubDevice).where(HubDevice.hub_id == hub_id, HubDevice.device_key > after)
                                 .order_by(HubDevice.device_key).limit(QUERY_BATCH)).all()
                batch = [_identity_of(name, host, r) for r in rows]
                after = rows[-1].device_key if rows else after
            yield from batch
            if len(batch) < QUERY_BATCH:
                return

    # ---- device identities (service side) ----
    def create_device(self, hub_name: str, device_id: str, *, auth_type: str = "sas", keys: tuple[str, str] | None = None,
                      thumbprints: tuple[str | None, str | None] = (None, None), status: str = "enabled",
                      if_match: str | None = None) -> tuple[DeviceIdentity, bool]:
        """Create or update a device identity (hub service API ``PUT /devices/{id}``); returns (identity, created)."""
        check_device_id(device_id)
        if auth_type not in AUTH_TYPES:
            raise InvalidInput("authentication.type must be sas, selfSigned or certificateAuthority")
        if status not in ("enabled", "disabled"):
            raise InvalidInput("status must be enabled or disabled")
        if auth_type == "selfSigned" and not thumbprints[0]:
            raise InvalidInput("a selfSigned device needs x509Thumbprint.primaryThumbprint")
        for name, value in zip(("primaryThumbprint", "secondaryThumbprint"), thumbprints, strict=True):
            if not isinstance(value, str | None) or (value and not _THUMBPRINT.fullmatch(value.replace(":", ""))):
                raise InvalidInput(f"x509Thumbprint.{name} must be 40 (SHA-1) or 64 (SHA-256) hex digits")
        if keys is not None:
            for name, value in zip(("primaryKey", "secondaryKey"), keys, strict=True):
                _check_device_key(value, f"symmetricKey.{name}")
        with self.store.session() as s:
            hub = self._hub(s, hub_name)
            existing = self._find(s, hub.id, device_id)
            if existing is not None:
                existing = self._claim(s, hub_name, device_id, if_match, "device")[1]
            if existing is None and if_match not in (None, "*"):
                raise PreconditionFailed(f"device {device_id!r} does not exist, so If-Match cannot match")
            if auth_type == "sas" and keys is None:
                keys = self._keys(hub.id, existing) if existing is not None else None
                keys = keys or (_new_device_key(), _new_device_key())
            credential = DeviceCredential(auth_type, keys if auth_type == "sas" else None,
                                          (_thumb(thumbprints[0]), _thumb(thumbprints[1])))
            try:
                row_id = self._put_device(s, hub.id, device_id, credential, status=status)
            except IntegrityError as exc:  # a concurrent create of the same id won the insert
                raise Conflict(f"device {device_id!r} was created concurrently; retry") from exc
            row = s.get(HubDevice, row_id, populate_existing=True)  # the row as written (the update bypassed the ORM)
            assert row is not None
            return _identity(hub, row), existing is None

    def delete_device(self, hub_name: str, device_id: str, *, if_match: str | None = None) -> None:
        with self.store.session() as s:
            _, row = self._claim(s, hub_name, device_id, if_match, "device")
            s.execute(delete(CloudToDeviceMessage).where(CloudToDeviceMessage.hub_id == row.hub_id,
                                                         CloudToDeviceMessage.device_key == row.device_key))
            s.delete(row)

    # ---- trust ----
    def certificates(self, hub_name: str) -> CaCertificates:
        """The CA certificates the owner uploaded to this hub (``az iot hub certificate``), proof of possession."""
        hub = self.get(hub_name)
        return CaCertificates(self.store, HubCertificate, {"hub_id": hub.id},
                              audit_scope={"service": "hub", "hub": hub.name})

    def uploaded_cas(self, hub: HubView, *, now: datetime | None = None) -> builtins.list[x509.Certificate]:
        """The owner's CA certificates uploaded to this hub, proven by proof of possession and still valid."""
        scoped = CaCertificates(self.store, HubCertificate, {"hub_id": hub.id})
        return [v.certificate for v in scoped.verified(now=now or datetime.now(UTC))]

    def trusted_cas(self, hub: str | HubView, *, now: datetime | None = None) -> builtins.list[TrustedCa]:
        """Issuing CAs this hub (a name or a view) trusts for operational certificates (see the module docstring)."""
        now = now or datetime.now(UTC)
        hub = self.get(hub) if isinstance(hub, str) else hub
        users = self.enrollments.policies_for_hub(hub.host_name, hub.apply_allocation_policy)
        return [TrustedCa(ca.certificate, ca.namespace, ca.policy, ca.status, sorted(users[ca.policy_id]))
                for ca in self.registry.issuing_cas(users, now=now)]


_THUMBPRINT = re.compile(r"^(?:[0-9A-Fa-f]{40}|[0-9A-Fa-f]{64})$")
MAX_TWIN_BYTES = 32 * 1024
# IoT Hub's limit for tags, desired and reported properties: levels of objects below the section itself (its twin page's
# valid example: tags.one.two...ten holds {"property": "value"}, ten levels of objects under tags)
MAX_TWIN_DEPTH = 10


def _check_device_key(value: object, where: str) -> None:
    try:
        raw = base64.b64decode(value, validate=True) if isinstance(value, str) else b""
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"{where} is not valid base64") from exc
    if not 16 <= len(raw) <= 64:
        raise InvalidInput(f"{where} must be base64 of 16-64 bytes")
MAX_TAGS_BYTES = 8 * 1024


def merge_patch(target: dict[str, Any], patch: object, what: str, *, limit: int = MAX_TWIN_BYTES) -> dict[str, Any]:
    """RFC 7396 JSON merge patch (``null`` deletes); keys starting with ``$`` are reserved; at most
    :data:`MAX_TWIN_DEPTH` levels of objects, as in IoT Hub."""
    patch = _twin_object(patch, f"{what} patch")

    def merge(base: dict[str, Any], change: dict[Any, Any]) -> dict[str, Any]:
        out = dict(base)
        for key, value in change.items():
            _check_twin_key(key, what)  # values arrive through parse_json, which refuses what is not text
            if value is None:
                out.pop(key, None)
            elif isinstance(value, dict):
                current = out.get(key)
                out[key] = merge(current if isinstance(current, dict) else {}, value)
            else:
                out[key] = value
        return out

    result = merge(target or {}, patch)
    if twin_size(result) > limit:
        raise PayloadTooLarge(f"{what} would exceed {limit} bytes")
    return result


def twin_size(value: object) -> int:
    """The size IoT Hub holds tags and desired or reported properties to (its device twin page, "Device twin size"):
    every property's name and value, names and strings by their characters, a number 8, true or false 4, objects and
    arrays what they hold. Why not the JSON text's length: ``json.dumps`` writes each non-ASCII character as an escape
    (``é`` 6 bytes, an emoji 12), so a twin in any language but English was refused at a fraction of what IoT Hub
    takes. Two departures keep what is stored bounded by the measure: control characters count (IoT Hub leaves them
    out, and each is a 6-byte escape in the stored JSON), and null, ``""``, ``[]`` and ``{}`` count 1."""
    total, stack = 0, [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            total += sum(len(key) for key in node) if node else 1
            stack.extend(node.values())
        elif isinstance(node, list):
            total += 0 if node else 1
            stack.extend(node)
        elif isinstance(node, str):
            total += len(node) or 1
        elif isinstance(node, bool):
            total += 4
        elif isinstance(node, int | float):
            total += 8
        else:
            total += 1
    return total


MAX_TWIN_KEY_BYTES = 1024
_TWIN_KEY_REFUSED = frozenset(".$ ") | frozenset(map(chr, (*range(0x20), *range(0x7F, 0xA0))))


def _check_twin_key(key: object, what: str) -> None:
    """IoT Hub's rule for twin property names (tags, desired, reported): up to 1 KB of UTF-8, no '.', '$', space or
    C0/C1 control character. Why here: a name Azure refuses is one no Azure SDK sends and no service SDK can address
    (its queries split names at '.'); a lone surrogate is no UTF-8 at all and cannot even be stored."""
    try:
        size = len(key.encode()) if isinstance(key, str) else 0
    except UnicodeEncodeError:
        size = 0
    if not 0 < size <= MAX_TWIN_KEY_BYTES or not _TWIN_KEY_REFUSED.isdisjoint(key):  # type: ignore[arg-type]
        raise InvalidInput(f"{what}: property name {shown(key)} is reserved or invalid: 1-{MAX_TWIN_KEY_BYTES} bytes "
                           "of UTF-8 without '.', '$', spaces or control characters")


def _twin_object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    if json_depth(value) > MAX_TWIN_DEPTH + 1:  # the section's own object is not one of its levels
        raise InvalidInput(f"{what} is nested more than {MAX_TWIN_DEPTH} levels deep")
    return value


def replacement(value: object, what: str, *, limit: int = MAX_TWIN_BYTES) -> dict[str, Any]:
    """A whole new tags or desired-properties object (twin PUT): absent or null is empty; ``$metadata`` and
    ``$version`` at the top (as a twin read shows them) are ignored; the rules of :func:`merge_patch` hold
    (null members are dropped, other ``$`` names refused, depth and size limits)."""
    if value is None:
        return {}
    given = {k: v for k, v in _twin_object(value, what).items() if k not in ("$metadata", "$version")}
    return merge_patch({}, given, what, limit=limit)


def initial_twin(value: object, what: str = "initialTwin") -> dict[str, Any]:
    """An initial twin (an enrollment's, a custom allocation webhook's) ``{"tags", "properties": {"desired"}}``, held to
    the rules of a twin the service API writes (:func:`replacement`: property names, depth, the tags' and desired
    properties' sizes) and normalised: a device is never placed with a twin its hub refuses to change (every later
    PATCH was a 413) or whose names no query can address. InvalidInput or PayloadTooLarge naming ``what``."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    properties = value.get("properties")
    if properties is not None and not isinstance(properties, dict):
        raise InvalidInput(f"{what}.properties must be a JSON object")
    return {"tags": replacement(value.get("tags"), f"{what}.tags", limit=MAX_TAGS_BYTES),
            "properties": {"desired": replacement((properties or {}).get("desired"), f"{what}.properties.desired")}}


def merge_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7396) that turns ``old`` into ``new``: changed and added members, removed ones
    as ``null``, nested objects diffed member by member."""
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        before = old.get(key)
        if key in old and json.dumps(before, sort_keys=True) == json.dumps(value, sort_keys=True):
            continue
        if isinstance(value, dict) and isinstance(before, dict):
            patch[key] = merge_diff(before, value)
        else:
            patch[key] = copy.deepcopy(value)
    return patch


def _new_device_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def _thumb(value: str | None) -> str | None:
    return value.replace(":", "").upper() if value else None


def _initial(initial_twin: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    twin = initial_twin or {}
    tags = copy.deepcopy(twin.get("tags") or {})
    desired = copy.deepcopy(((twin.get("properties") or {}).get("desired")) or {})
    for meta in ("$metadata", "$version"):
        tags.pop(meta, None)
        desired.pop(meta, None)
    return tags, desired
