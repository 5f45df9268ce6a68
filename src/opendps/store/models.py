"""Tables. Names follow the domain (see docs/architecture.md, "Data model").

Every table has one owner: the package that decides about its rows and the only one that imports its
model (:data:`OWNERS`, checked by ``tests/test_architecture.py``). Other packages go through the owner's
typed calls; a registration that must write several owners' tables at once passes one SQLAlchemy
``Session`` (the transaction) to each owner's call, never a row.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    SQLite has no timezone type and hands back naive values; certificate validity and etag
    timestamps are compared across backends, so everything is stored and returned as UTC.
    Same DDL as ``DateTime(timezone=True)``, so no migration is involved.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use timezone-aware UTC values")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


def _ts(*, index: bool = False) -> Mapped[datetime]:
    return mapped_column(UtcDateTime(), nullable=False, index=index)


class InstanceSetting(Base):
    """Key/value facts of this installation shared by every node (ID scope, key check value)."""

    __tablename__ = "instance_settings"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text, nullable=False)


class AccessPolicy(Base):
    """DPS shared access policies (provisioningserviceowner and the owner's own): rights (Azure's names, comma-separated)
    and keys wrapped by the master key (``opendps.provisioning.access``)."""

    __tablename__ = "access_policies"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    rights: Mapped[str] = mapped_column(String(200), nullable=False)
    primary_key: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    secondary_key: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    created_at: Mapped[datetime] = _ts()


class WrappedKey(Base):
    """A CA private key: encrypted at rest (AES-256-GCM under a key derived from the master key), or, with backend
    "pkcs11", a reference to a key that never leaves an HSM token (no private material here)."""

    __tablename__ = "wrapped_keys"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    backend: Mapped[str] = mapped_column(String(32), nullable=False)  # "software" | "pkcs11"
    algorithm: Mapped[str] = mapped_column(String(32), nullable=False)  # e.g. "EC-P384"
    blob: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)  # nonce || ciphertext+tag
    public_key: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)  # SubjectPublicKeyInfo DER
    created_at: Mapped[datetime] = _ts()
    # backend "pkcs11": the key lives on a token and is only referenced here (blob empty, migration 0015)
    pkcs11_token: Mapped[str | None] = mapped_column(String(32), nullable=True)  # the token label (CK_TOKEN_INFO)
    pkcs11_label: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the key objects' CKA_LABEL
    pkcs11_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # their CKA_ID, hex


class Namespace(Base):
    """An ADR namespace: owns exactly one credential (root CA) and its policies."""

    __tablename__ = "namespaces"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    etag: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = _ts()


class CertificateAuthority(Base):
    """A managed CA certificate: a namespace root (credential) or a policy's issuing CA.

    Rotation adds a new active row and retires the old one, so history stays.
    """

    __tablename__ = "certificate_authorities"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    namespace_id: Mapped[int] = mapped_column(ForeignKey("namespaces.id", ondelete="CASCADE"), nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)  # "root" | "issuing"
    # the policy an issuing CA belongs to (None for the root); the active one signs
    policy_id: Mapped[int | None] = mapped_column(ForeignKey("policies.id", ondelete="SET NULL"), nullable=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("certificate_authorities.id"), nullable=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("wrapped_keys.id"), nullable=False)
    der: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    subject: Mapped[str] = mapped_column(String(512), nullable=False)
    serial: Mapped[str] = mapped_column(String(64), nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    not_before: Mapped[datetime] = _ts()
    not_after: Mapped[datetime] = _ts()
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="active")  # active | retired
    created_at: Mapped[datetime] = _ts()
    # an issuing CA revoked by its root (issue 17): listed on the root's CRL, no longer trusted by hubs
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    revocation_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)


class Policy(Base):
    """A credential policy: an issuing CA plus the leaf profile knobs (validity, allowed curves)."""

    __tablename__ = "policies"
    __table_args__ = (UniqueConstraint("namespace_id", "name", name="uq_policy_namespace_name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    namespace_id: Mapped[int] = mapped_column(ForeignKey("namespaces.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    validity_days: Mapped[int] = mapped_column(Integer, nullable=False)
    allow_p256: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    # a renewed certificate's first CONNECT revokes the device's older ones as superseded (off: Azure's behaviour)
    revoke_superseded: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    crl_validity_hours: Mapped[int] = mapped_column(Integer, nullable=False, default=24)
    etag: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = _ts()
    updated_at: Mapped[datetime] = _ts()


class IssuedCertificate(Base):
    """Every operational certificate, committed before it leaves the CA."""

    __tablename__ = "issued_certificates"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    serial: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)  # hex, lower
    sha256: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)  # hex, lower
    der: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    policy_id: Mapped[int | None] = mapped_column(ForeignKey("policies.id", ondelete="SET NULL"), nullable=True)
    issuing_ca_id: Mapped[int] = mapped_column(
        ForeignKey("certificate_authorities.id", ondelete="CASCADE"), nullable=False
    )
    registration_id: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    not_before: Mapped[datetime] = _ts()
    not_after: Mapped[datetime] = _ts()
    created_at: Mapped[datetime] = _ts()
    # revocation (issue 17): when and why (an RFC 5280 CRLReason name); read with the row on every hub CONNECT
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    revocation_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # the first hub CONNECT of a renewed certificate (older unrevoked ones of its registration existed then): the
    # superseding decision, made once; a certificate with nothing older is never written to on CONNECT
    first_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)


class ProvenCaCertificate:
    """Columns of an owner's CA certificate proven by proof of possession (DPS or one hub)."""

    name: Mapped[str] = mapped_column(String(256), nullable=False)
    der: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    subject: Mapped[str] = mapped_column(String(512), nullable=False)
    sha1: Mapped[str] = mapped_column(String(40), nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    not_after: Mapped[datetime] = _ts()
    is_verified: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    verification_code: Mapped[str | None] = mapped_column(String(128), nullable=True)
    etag: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = _ts()
    updated_at: Mapped[datetime] = _ts()

    if TYPE_CHECKING:
        # the mixin is only used with ``Base``, whose constructor takes the mapped columns as keywords
        def __init__(self, **kw: Any) -> None: ...


class DpsCertificate(ProvenCaCertificate, Base):
    """An owner's CA certificate uploaded to DPS, verified by proof of possession."""

    __tablename__ = "dps_certificates"
    name: Mapped[str] = mapped_column(String(256), primary_key=True)


class Enrollment(Base):
    """Individual enrollment or enrollment group; the full Azure document is in ``document``."""

    __tablename__ = "enrollments"
    # ids match case-insensitively (lower(enrollment_id)), so lookups need the expression index, not the constraint
    __table_args__ = (UniqueConstraint("kind", "enrollment_id", name="uq_enrollment_kind_id"),
                      Index("ix_enrollments_kind_lower_id", "kind", text("lower(enrollment_id)")))
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)  # "individual" | "group"
    enrollment_id: Mapped[str] = mapped_column(String(128), nullable=False)
    attestation_type: Mapped[str] = mapped_column(String(32), nullable=False)
    policy_id: Mapped[int | None] = mapped_column(ForeignKey("policies.id"), nullable=True)
    provisioning_status: Mapped[str] = mapped_column(String(16), nullable=False, default="enabled")
    document: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)  # never holds symmetric keys
    # symmetric keys {"primaryKey", "secondaryKey"} as JSON, wrapped by the master key
    secret: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    etag: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = _ts()
    updated_at: Mapped[datetime] = _ts()


class LinkedHub(Base):
    """A logical IoT hub served by this installation: a host name and its own device registry."""

    __tablename__ = "linked_hubs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    host_name: Mapped[str] = mapped_column(String(255), unique=True, nullable=False)
    allocation_weight: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    apply_allocation_policy: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    etag: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = _ts()
    # the hub's own iothubowner key pair, [primary, secondary] as JSON, wrapped by the master key
    owner_keys: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class HubDevice(Base):
    """A device identity in a hub's registry, with its twin."""

    __tablename__ = "hub_devices"
    __table_args__ = (UniqueConstraint("hub_id", "device_key", name="uq_hub_device"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    hub_id: Mapped[int] = mapped_column(ForeignKey("linked_hubs.id", ondelete="CASCADE"), nullable=False)
    device_id: Mapped[str] = mapped_column(String(128), nullable=False)
    device_key: Mapped[str] = mapped_column(String(128), nullable=False)  # device id lower-cased (ids are case-insensitive)
    auth_type: Mapped[str] = mapped_column(String(32), nullable=False)  # sas | selfSigned | certificateAuthority
    primary_thumbprint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    secondary_thumbprint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    secret: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # wrapped SAS keys
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="enabled")
    generation_id: Mapped[str] = mapped_column(String(32), nullable=False)
    etag: Mapped[str] = mapped_column(String(64), nullable=False)
    twin_tags: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    twin_desired: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    twin_reported: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    desired_version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    reported_version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    created_at: Mapped[datetime] = _ts()
    updated_at: Mapped[datetime] = _ts()
    # when a session of the device last began or ended (presence's batched write; None: never connected); issue 19
    last_seen_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    # the filters its last clean-session-0 MQTT session held (a bit mask: frontends.mqtt.hub.KEPT_FILTERS), restored
    # when it reconnects with clean session 0 (as IoT Hub does; the Node.js SDK's SAS renewal relies on it)
    subscriptions: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")


class DeviceRecord(Base):
    """A device in a namespace's device registry (ADR): where it lives and its current certificate."""

    __tablename__ = "device_records"
    __table_args__ = (UniqueConstraint("namespace_id", "device_key", name="uq_device_record"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    namespace_id: Mapped[int] = mapped_column(ForeignKey("namespaces.id", ondelete="CASCADE"), nullable=False)
    device_id: Mapped[str] = mapped_column(String(128), nullable=False)
    device_key: Mapped[str] = mapped_column(String(128), nullable=False)
    registration_id: Mapped[str] = mapped_column(String(128), nullable=False)
    hub_host_name: Mapped[str] = mapped_column(String(255), nullable=False)
    policy_id: Mapped[int | None] = mapped_column(ForeignKey("policies.id", ondelete="SET NULL"), nullable=True)
    certificate_serial: Mapped[str | None] = mapped_column(String(64), nullable=True)
    certificate_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    certificate_not_after: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    etag: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = _ts()
    updated_at: Mapped[datetime] = _ts()


class Registration(Base):
    """DPS registration state of one registration id (the latest outcome)."""

    __tablename__ = "registrations"
    # renewal through the hub finds the registration by (device id, hub) without a full scan
    __table_args__ = (Index("ix_registrations_device_hub", "device_id", "assigned_hub"),)
    registration_key: Mapped[str] = mapped_column(String(128), primary_key=True)  # lower-cased id
    registration_id: Mapped[str] = mapped_column(String(128), nullable=False)
    enrollment_kind: Mapped[str] = mapped_column(String(16), nullable=False)
    enrollment_id: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    attestation_type: Mapped[str] = mapped_column(String(32), nullable=False)
    device_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    assigned_hub: Mapped[str | None] = mapped_column(String(255), nullable=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    substatus: Mapped[str | None] = mapped_column(String(48), nullable=True)
    error_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    certificate_serial: Mapped[str | None] = mapped_column(String(64), nullable=True)
    etag: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = _ts()
    updated_at: Mapped[datetime] = _ts()


class Operation(Base):
    """A register operation and its final result, so polling survives a restart."""

    __tablename__ = "operations"
    operation_id: Mapped[str] = mapped_column(String(96), primary_key=True)
    registration_key: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    result: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)  # RegistrationOperationStatus as sent
    created_at: Mapped[datetime] = _ts(index=True)  # the 24 h sweep deletes by age


class RequestLimit(Base):
    """One registration id's latest arrivals under one DPS request limit (``opendps.provisioning.throttle``), shared
    by every process and node: the last ``limit + 1`` arrival times, so the limit is an exact sliding window."""

    __tablename__ = "request_limits"
    name: Mapped[str] = mapped_column(String(16), primary_key=True)  # which limit: "poll" | "register"
    registration_key: Mapped[str] = mapped_column(String(128), primary_key=True)  # lower-cased id
    arrivals: Mapped[str] = mapped_column(Text, nullable=False)  # ms since the epoch, 13 digits each, in arrival order
    expires_at: Mapped[int] = mapped_column(BigInteger, nullable=False)  # ms: the newest arrival + the window (sweep)


class TelemetryEvent(Base):
    """Device-to-cloud messages kept by the durable sink; ``id`` is the position consumers read from."""

    __tablename__ = "telemetry_events"
    # AUTOINCREMENT on SQLite: a position is never reused, even after rows are deleted
    __table_args__ = (Index("ix_telemetry_hub_position", "hub_id", "id"), {"sqlite_autoincrement": True})
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    hub_id: Mapped[int] = mapped_column(ForeignKey("linked_hubs.id", ondelete="CASCADE"), nullable=False)
    device_id: Mapped[str] = mapped_column(String(128), nullable=False)
    system_properties: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    properties: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    body: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    enqueued_at: Mapped[datetime] = _ts()


class CloudToDeviceMessage(Base):
    """A cloud-to-device message waiting for the device's PUBACK (bounded per device, with expiry)."""

    __tablename__ = "c2d_messages"
    __table_args__ = (Index("ix_c2d_device", "hub_id", "device_key", "id"), {"sqlite_autoincrement": True})
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    hub_id: Mapped[int] = mapped_column(ForeignKey("linked_hubs.id", ondelete="CASCADE"), nullable=False)
    device_key: Mapped[str] = mapped_column(String(128), nullable=False)
    message_id: Mapped[str] = mapped_column(String(128), nullable=False)
    system_properties: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    properties: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    body: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    expires_at: Mapped[datetime] = _ts()
    created_at: Mapped[datetime] = _ts()


class CloudToDeviceFeedback(Base):
    """A cloud-to-device message's outcome (Success, Expired, DeliveryCountExceeded, Purged) that its sender asked
    for (``iothub-ack``), waiting for a service's feedback receiver to complete it. Kept here, not in a process: any
    worker or node may serve the receiver. ``lock_token``/``locked_until``: claimed by one delivery until it is
    settled or the lock lapses (then delivered again)."""

    __tablename__ = "c2d_feedback"
    __table_args__ = (Index("ix_c2d_feedback_hub", "hub_id", "id"), {"sqlite_autoincrement": True})
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    hub_id: Mapped[int] = mapped_column(ForeignKey("linked_hubs.id", ondelete="CASCADE"), nullable=False)
    device_id: Mapped[str] = mapped_column(String(128), nullable=False)
    generation_id: Mapped[str] = mapped_column(String(32), nullable=False)
    message_id: Mapped[str] = mapped_column(String(128), nullable=False)
    status: Mapped[str] = mapped_column(String(32), nullable=False)
    enqueued_at: Mapped[datetime] = _ts()  # when the outcome happened
    expires_at: Mapped[datetime] = _ts()
    lock_token: Mapped[str | None] = mapped_column(String(32), nullable=True)
    locked_until: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)


class HubCertificate(ProvenCaCertificate, Base):
    """A CA certificate uploaded to one hub (``az iot hub certificate``), verified by proof of possession.

    Devices whose chains reach a verified hub CA authenticate as ``certificateAuthority`` devices;
    these are the owner's own CAs, next to the issuing CAs synced from linked policies.
    """

    __tablename__ = "hub_certificates"
    __table_args__ = (UniqueConstraint("hub_id", "name", name="uq_hub_certificate"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    hub_id: Mapped[int] = mapped_column(ForeignKey("linked_hubs.id", ondelete="CASCADE"), nullable=False)


class TelemetryRoute(Base):
    """Where a hub also sends its devices' telemetry (``opendps hub route``, in the spirit of IoT Hub message
    routing): a NATS subject, with JetStream's acknowledgement before the device's PUBACK when ``durable``."""

    __tablename__ = "telemetry_routes"
    __table_args__ = (UniqueConstraint("hub_id", "name", name="uq_telemetry_route"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    hub_id: Mapped[int] = mapped_column(ForeignKey("linked_hubs.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str] = mapped_column(String(128), nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)  # nats
    url: Mapped[str] = mapped_column(String(512), nullable=False)
    subject: Mapped[str] = mapped_column(String(255), nullable=False)  # prefix: {subject}.{hub}.{device}
    durable: Mapped[bool] = mapped_column(Boolean, nullable=False)
    enabled: Mapped[bool] = mapped_column(Boolean, nullable=False)
    etag: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = _ts()
    updated_at: Mapped[datetime] = _ts()


class ClusterNode(Base):
    """A running server process — one worker of one host — that live hub state can be routed to by id.

    Every node heartbeats its row; a node whose heartbeat is older than the cluster's timeout is dead, and
    whoever notices deletes its row (its presence rows go by cascade). ``opendps info`` lists them.
    """

    __tablename__ = "cluster_nodes"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    host: Mapped[str] = mapped_column(String(255), nullable=False)  # the machine's host name
    pid: Mapped[int] = mapped_column(Integer, nullable=False)
    worker: Mapped[int] = mapped_column(Integer, nullable=False)  # index among the host's workers (0 alone)
    endpoints: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)  # bind address and ports
    started_at: Mapped[datetime] = _ts()
    heartbeat_at: Mapped[datetime] = _ts(index=True)


class LiveMessage(Base):
    """A message between nodes carried by the store: every message where the bus is the table (SQLite with
    several workers), and on PostgreSQL the bodies too large for a NOTIFY payload (the NOTIFY carries the id).
    Deleted after a minute."""

    __tablename__ = "live_messages"
    __table_args__ = ({"sqlite_autoincrement": True},)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    target: Mapped[str | None] = mapped_column(String(36), nullable=True)  # a node id; NULL = every node
    body: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = _ts(index=True)


class HubConnection(Base):
    """Presence: which node holds a device's live hub session now (one row per device; the newest
    connection wins, as MQTT's one-session rule). Gone with the node's row when the node dies."""

    __tablename__ = "hub_connections"
    hub_id: Mapped[int] = mapped_column(ForeignKey("linked_hubs.id", ondelete="CASCADE"), primary_key=True)
    device_key: Mapped[str] = mapped_column(String(128), primary_key=True)  # lower-cased device id
    node_id: Mapped[str] = mapped_column(ForeignKey("cluster_nodes.id", ondelete="CASCADE"), nullable=False, index=True)
    session: Mapped[str] = mapped_column(String(36), nullable=False)
    connected_at: Mapped[datetime] = _ts()


#: model -> the package (or module) that owns its table; ``store`` itself owns only the installation settings
class ConfigGeneration(Base):
    """One counter, bumped in the same transaction as any change to the configuration rows below
    (:data:`CONFIG_MODELS`): processes cache what they derive from those rows and keep it while the counter
    they read is unchanged (:class:`opendps.store.ConfigCache`)."""

    __tablename__ = "config_generation"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, nullable=False)


class AuditEntry(Base):
    """One entry of the tamper-evident audit log (``opendps.audit``): what was done (``action``, e.g.
    ``certificate.issued``), by whom (``actor``: the service token's access policy, None for a device's own
    request), to what (``namespace``, ``device_id`` — the registration id, lower-cased — and ``subject``: a serial
    number, thumbprint or enrollment id), with ``details`` as canonical JSON. Entries form a hash chain: ``hash`` is
    SHA-256 over every other column and ``prev_hash``, the hash of entry ``seq - 1``. ``seq`` is given by the
    appender (1, 2, 3...: no gaps, so a deleted entry shows), never by a sequence; never updated or deleted."""

    __tablename__ = "audit_log"
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False)
    created_at: Mapped[datetime] = _ts(index=True)
    action: Mapped[str] = mapped_column(String(64), nullable=False)
    actor: Mapped[str | None] = mapped_column(String(128), nullable=True)
    namespace: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    device_id: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    subject: Mapped[str | None] = mapped_column(String(256), nullable=True)
    details: Mapped[str] = mapped_column(Text, nullable=False)  # canonical JSON: the very text the hash covers
    prev_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    hash: Mapped[str] = mapped_column(String(64), nullable=False)


class RefusalEntry(Base):
    """A device request the service refused lately (``opendps.audit.refusals``): a DPS registration or a hub CONNECT,
    the id it sent, the transport, a bounded ``reason`` word, the error code and message it was told. Not part of the
    audit chain; kept 24 hours and at most 10,000 rows."""

    __tablename__ = "refusals"
    __table_args__ = ({"sqlite_autoincrement": True},)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = _ts(index=True)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)  # registration | hubConnect
    subject: Mapped[str] = mapped_column(String(128), nullable=False)  # the registration or device id as sent
    hub: Mapped[str | None] = mapped_column(String(255), nullable=True)  # the hub host name (hub CONNECTs)
    transport: Mapped[str] = mapped_column(String(8), nullable=False)
    reason: Mapped[str] = mapped_column(String(32), nullable=False)
    error_code: Mapped[int] = mapped_column(Integer, nullable=False)
    message: Mapped[str] = mapped_column(String(512), nullable=False)


OWNERS: dict[type[Base], str] = {
    InstanceSetting: "opendps.store",
    ConfigGeneration: "opendps.store",
    AccessPolicy: "opendps.provisioning",
    WrappedKey: "opendps.pki",
    IssuedCertificate: "opendps.pki",
    Namespace: "opendps.registry",
    Policy: "opendps.registry",
    CertificateAuthority: "opendps.registry",
    DeviceRecord: "opendps.registry",
    DpsCertificate: "opendps.provisioning",
    Enrollment: "opendps.provisioning",
    Registration: "opendps.provisioning",
    Operation: "opendps.provisioning",
    RequestLimit: "opendps.provisioning",
    LinkedHub: "opendps.hub",
    HubDevice: "opendps.hub",
    HubCertificate: "opendps.hub",
    CloudToDeviceFeedback: "opendps.hub",
    TelemetryEvent: "opendps.hub",
    CloudToDeviceMessage: "opendps.hub",
    TelemetryRoute: "opendps.hub",
    HubConnection: "opendps.hub",
    ClusterNode: "opendps.cluster",
    LiveMessage: "opendps.cluster",
    AuditEntry: "opendps.audit",
    RefusalEntry: "opendps.audit",
}

# What a registration reads but rarely changes: a write to any of these bumps ConfigGeneration.
CONFIG_MODELS: frozenset[type[Base]] = frozenset({Namespace, Policy, CertificateAuthority, DpsCertificate, Enrollment,
                                                   LinkedHub, HubCertificate, TelemetryRoute})

# an issuing CA's revoked certificates (its CRL and revocation state, opendps.pki.status): revoked rows only, so
# issuance never maintains it (migration 0013)
Index("ix_issued_certificates_revoked", IssuedCertificate.issuing_ca_id, IssuedCertificate.revoked_at,
      postgresql_where=IssuedCertificate.revoked_at.is_not(None), sqlite_where=IssuedCertificate.revoked_at.is_not(None))

# unrevoked certificates by expiry (the fleet dashboard's expiry timeline, IssuanceEngine.expiry_timeline): revoked and,
# by the query's range, expired ones are not read (migration 0016)
Index("ix_issued_certificates_expiry", IssuedCertificate.not_after,
      postgresql_where=IssuedCertificate.revoked_at.is_(None), sqlite_where=IssuedCertificate.revoked_at.is_(None))
