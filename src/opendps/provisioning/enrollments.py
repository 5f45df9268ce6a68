"""Individual enrollments and enrollment groups, in the shapes of Azure's DPS service API.

The stored ``document`` is the normalised Azure document without symmetric keys; keys are wrapped
by the master key in ``secret``. PUT without If-Match upserts (what Azure's SDKs expect, see the
wire spec §5.3); with If-Match the etag must match. The ``attestation`` member is validated by the
mechanism of its type (:mod:`opendps.provisioning.attestation`); the rest here. Owns ``enrollments``,
and answers the registry and the hubs which enrollments name a policy or a hub.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import copy
import json
import re
import secrets
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import urlparse

from cryptography import x509
from sqlalchemy import CursorResult, bindparam, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from opendps import audit
from opendps.errors import Conflict, InvalidInput, NotFound, OpenDPSError, PreconditionFailed
from opendps.hub import Hubs, initial_twin
from opendps.ids import any_etag, etag_matches, new_etag, take_row
from opendps.pki import CaCertificates, KeyStore, serial_hex, thumbprint
from opendps.provisioning import attestation
from opendps.registry import Registry
from opendps.store import ConfigCache, Enrollment, Operation, Registration, Store, Transaction, count_change_first, joined
from opendps.transport import shown
from opendps.transport.wire import iso8601

INDIVIDUAL = "individual"
GROUP = "group"
ENROLLMENT_NOT_FOUND = 404201
ALLOCATION_POLICIES = ("hashed", "geoLatency", "static", "custom")
# Azure registration ids: alphanumerics and - . _ : ; last character alphanumeric or '-'; case-insensitive
REGISTRATION_ID = re.compile(r"^[A-Za-z0-9\-._:]{0,127}[A-Za-z0-9\-]$")
MAX_KEY_BYTES = 64
BULK_MODES = ("create", "update", "updateIfMatchETag", "delete")
MAX_BULK = 10  # Azure's limit per bulk operation
ID_INDEX_LIMIT = 200_000  # enrollment ids held in memory per process for attestation's "has it one?" question
# an enrollment read in a registration's transaction, kept to its commit (hold)
_HOLD = (select(Enrollment.id).where(Enrollment.kind == bindparam("b_kind"),
                                     func.lower(Enrollment.enrollment_id) == bindparam("b_id"))
         .with_for_update(read=True))


def check_registration_id(value: object, what: str = "registration id") -> str:
    if not isinstance(value, str) or not REGISTRATION_ID.fullmatch(value):
        raise InvalidInput(f"{what} {shown(value)} is invalid: use 1-128 characters from a-z, A-Z, 0-9, '-', '.', '_', ':' "
                           "ending with a letter, digit or '-'")
    return value


def certificate_info(cert: x509.Certificate) -> dict[str, Any]:
    """``X509CertificateInfo`` as Azure shows it."""
    return {
        "subjectName": cert.subject.rfc4514_string(),
        "sha1Thumbprint": thumbprint(cert, "sha1"),
        "sha256Thumbprint": thumbprint(cert),
        "issuerName": cert.issuer.rfc4514_string(),
        "notBeforeUtc": iso8601(cert.not_valid_before_utc),
        "notAfterUtc": iso8601(cert.not_valid_after_utc),
        "serialNumber": serial_hex(cert),
        "version": cert.version.value + 1,
    }


@dataclass(frozen=True)
class EnrollmentSummary:
    """An enrollment as the fleet dashboard lists it: what it is and where it sends devices, never keys."""

    kind: str
    enrollment_id: str
    attestation_type: str
    document: dict[str, Any]  # normalised, without keys
    created_at: datetime
    updated_at: datetime

    def to_wire(self) -> dict[str, Any]:
        d = self.document
        return {"id": self.enrollment_id, "kind": self.kind, "attestationType": self.attestation_type,
                "provisioningStatus": d.get("provisioningStatus", "enabled"), "deviceId": d.get("deviceId"),
                "allocationPolicy": d.get("allocationPolicy"), "iotHubs": d.get("iotHubs") or [],
                "credentialPolicyName": d.get("credentialPolicyName"), "namespaceName": d.get("namespaceName"),
                "createdDateTimeUtc": iso8601(self.created_at), "lastUpdatedDateTimeUtc": iso8601(self.updated_at)}


@dataclass(frozen=True)
class EnrollmentPage:
    items: builtins.list[EnrollmentSummary]
    next_after: str | None  # the last id of the page (lower-cased) when more follow


@dataclass(frozen=True)
class EnrollmentView:
    kind: str
    enrollment_id: str
    attestation_type: str
    document: dict[str, Any]  # normalised, without keys
    keys: tuple[str, str] | None
    policy_id: int | None
    etag: str
    created_at: datetime
    updated_at: datetime

    @property
    def enabled(self) -> bool:
        status: str = self.document.get("provisioningStatus", "enabled")  # "enabled" | "disabled" (_normalise)
        return status == "enabled"

    def to_wire(self, *, include_keys: bool = False) -> dict[str, Any]:
        doc = copy.deepcopy(self.document)
        # a TPM enrollment's keys are never shown: only the TPM the challenge was made for ever holds one
        if include_keys and self.keys and self.attestation_type == "symmetricKey":
            doc["attestation"]["symmetricKey"] = {"primaryKey": self.keys[0], "secondaryKey": self.keys[1]}
        doc["etag"] = self.etag
        doc["createdDateTimeUtc"] = iso8601(self.created_at)
        doc["lastUpdatedDateTimeUtc"] = iso8601(self.updated_at)
        return doc

    def attestation_mechanism(self) -> dict[str, Any]:
        mechanism: dict[str, Any] = self.to_wire(include_keys=True)["attestation"]  # a JSON object (_normalise)
        return mechanism


def hub_hosts(document: dict[str, Any]) -> list[str]:
    """Host names an enrollment allocates to (empty: every hub that applies allocation policy)."""
    hubs = document.get("iotHubs") or []
    if not hubs and document.get("iotHubHostName"):
        hubs = [document["iotHubHostName"]]
    return [h.lower() for h in hubs]


def json_object(value: object, where: str) -> dict[str, Any]:
    """A member that must be a JSON object (absent: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{where} must be a JSON object")
    return value


def json_bool(value: object, where: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidInput(f"{where} must be true or false")
    return value


def check_key(value: object, where: str) -> str:
    """A symmetric key: base64 of 16-64 bytes."""
    if not isinstance(value, str):
        raise InvalidInput(f"{where} must be a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"{where} is not valid base64") from exc
    if not 16 <= len(raw) <= MAX_KEY_BYTES:
        raise InvalidInput(f"{where} must decode to 16-{MAX_KEY_BYTES} bytes (got {len(raw)})")
    return value


def new_key() -> str:
    return base64.b64encode(secrets.token_bytes(MAX_KEY_BYTES)).decode()


@dataclass(frozen=True)
class BulkError:
    """One enrollment a bulk operation could not apply: Azure's ``{registrationId, errorCode, errorStatus}``."""

    enrollment_id: str
    error_code: int
    error_status: str


class Enrollments:
    def __init__(self, store: Store, keys: KeyStore, registry: Registry, hubs: Hubs,
                 ca_certificates: CaCertificates) -> None:
        self.store = store
        self.keys = keys
        self.registry = registry
        self.hubs = hubs
        self.ca_certificates = ca_certificates
        # attestation's reads (every register and poll): views with unwrapped keys, while the configuration is unchanged
        self._lookups: ConfigCache[tuple[str, str, str], Any] = ConfigCache(store, capacity=100_000)

    # ---- reading ----
    def _view(self, row: Enrollment) -> EnrollmentView:
        keys = None
        if row.secret is not None:
            keys = tuple(json.loads(self.keys.unwrap(row.secret, self._label(row.kind, row.enrollment_id))))
        return EnrollmentView(row.kind, row.enrollment_id, row.attestation_type, row.document, keys, row.policy_id,
                              row.etag, row.created_at, row.updated_at)

    @staticmethod
    def _label(kind: str, enrollment_id: str) -> str:
        return f"enrollment:{kind}:{enrollment_id.lower()}"

    @staticmethod
    def _row(s: Session, kind: str, enrollment_id: str) -> Enrollment | None:
        return s.scalars(select(Enrollment).where(Enrollment.kind == kind,
                                                  func.lower(Enrollment.enrollment_id) == enrollment_id.lower())).first()

    def get(self, kind: str, enrollment_id: str) -> EnrollmentView:
        with self.store.session() as s:
            row = self._row(s, kind, enrollment_id)
            if row is None:
                what = "enrollment group" if kind == GROUP else "enrollment"
                raise NotFound(f"{what} {enrollment_id!r} does not exist", error_code=ENROLLMENT_NOT_FOUND)
            return self._view(row)

    def find(self, kind: str, enrollment_id: str) -> EnrollmentView | None:
        with self.store.session() as s:
            row = self._row(s, kind, enrollment_id)
            return self._view(row) if row else None

    def list(self, kind: str, attestation_type: str | None = None) -> list[EnrollmentView]:
        """Enrollments of ``kind`` in creation order; ``attestation_type`` filters in SQL (attestation hot paths
        must not unwrap the keys of groups they cannot match)."""
        q = select(Enrollment).where(Enrollment.kind == kind)
        if attestation_type is not None:
            q = q.where(Enrollment.attestation_type == attestation_type)
        with self.store.session() as s:
            return [self._view(r) for r in s.scalars(q.order_by(Enrollment.id))]

    def window(self, kind: str, start: int, count: int) -> tuple[tuple[EnrollmentView, ...], bool]:
        """``count`` enrollments of ``kind`` from position ``start`` in creation order, and whether more follow (the
        Azure query route's pages: an offset continuation). Only the page's keys are unwrapped, not the fleet's."""
        q = select(Enrollment).where(Enrollment.kind == kind).order_by(Enrollment.id).offset(start).limit(count + 1)
        with self.store.session() as s:
            rows = list(s.scalars(q))
        return tuple(self._view(r) for r in rows[:count]), len(rows) > count

    def page(self, kind: str, *, after: str = "", top: int = 100) -> EnrollmentPage:
        """One page of the enrollments of ``kind`` in id order (case-insensitive), after the id ``after``: a keyset
        range on ``ix_enrollments_kind_lower_id``, no keys unwrapped (the fleet dashboard; the Azure query route
        uses :meth:`window`)."""
        if not 1 <= top <= 1000:
            raise InvalidInput("top must be 1-1000")
        key = func.lower(Enrollment.enrollment_id)
        q = select(Enrollment.enrollment_id, Enrollment.attestation_type, Enrollment.document, Enrollment.created_at,
                   Enrollment.updated_at, key.label("key")).where(Enrollment.kind == kind)
        if after:
            q = q.where(key > after.lower())
        with self.store.session() as s:
            rows = s.execute(q.order_by(key).limit(top + 1)).all()
        items = [EnrollmentSummary(kind, r.enrollment_id, r.attestation_type, r.document, r.created_at, r.updated_at)
                 for r in rows[:top]]
        return EnrollmentPage(items, rows[top - 1].key if len(rows) > top else None)

    def lookup(self, kind: str, enrollment_id: str) -> EnrollmentView | None:
        """:meth:`find` for attestation, from the configuration cache (a change on any node is seen at once).

        Most registrations are of devices without an individual enrollment (they come through a group): the ids
        that have one are kept as a set, so those cost no query at all (up to :data:`ID_INDEX_LIMIT` ids).
        """
        key = enrollment_id.lower()
        known: frozenset[str] | None = self._lookups.get(("ids", kind, ""), lambda: self._ids(kind))
        if known is not None and key not in known:
            return None
        view: EnrollmentView | None = self._lookups.get(("one", kind, key), lambda: self.find(kind, enrollment_id))
        return view

    @staticmethod
    def hold(db: Session | Transaction, kind: str, enrollment_id: str) -> bool:
        """In a registration's transaction, after its first write: whether the enrollment still exists, kept so to
        the commit — PostgreSQL: FOR SHARE, which a delete's first write (:meth:`delete` takes the row) waits on;
        SQLite: the write lock the transaction already holds, so this read sees the last committed delete."""
        return joined(db).first(_HOLD, b_kind=kind, b_id=enrollment_id.lower()) is not None

    def _ids(self, kind: str) -> frozenset[str] | None:
        """Lower-cased ids of every enrollment of ``kind``; None when there are more than the index holds."""
        with self.store.session() as s:
            ids = s.scalars(select(func.lower(Enrollment.enrollment_id)).where(Enrollment.kind == kind)
                            .limit(ID_INDEX_LIMIT + 1)).all()
        return frozenset(ids) if len(ids) <= ID_INDEX_LIMIT else None

    def lookup_all(self, kind: str, attestation_type: str) -> builtins.list[EnrollmentView]:
        """:meth:`list` for attestation, from the configuration cache."""
        views: builtins.list[EnrollmentView] = self._lookups.get(("all", kind, attestation_type),
                                                                 lambda: self.list(kind, attestation_type))
        return views

    def groups_on_certificate(self, dps_certificate_name: str) -> builtins.list[EnrollmentView]:
        """X.509 groups that reference ``dps_certificate_name`` (caReferences)."""
        return [v for v in self.list(GROUP, "x509") if dps_certificate_name in ca_names(v.document)]

    # ---- who names a policy or a hub (the registry's and the hubs' referential checks) ----
    def enrollments_using_policies(self, policy_ids: Collection[int]) -> tuple[int, builtins.list[str]]:
        if not policy_ids:
            return 0, []
        where = Enrollment.policy_id.in_(list(policy_ids))
        with self.store.session() as s:
            first = list(s.scalars(select(Enrollment.enrollment_id).where(where).order_by(Enrollment.id).limit(5)))
            count = s.scalar(select(func.count()).select_from(Enrollment).where(where)) if first else 0
        return count or 0, first

    def enrollments_using_hub(self, host_name: str) -> builtins.list[str]:
        with self.store.session() as s:
            rows = s.execute(select(Enrollment.enrollment_id, Enrollment.document)).all()
        return [eid for eid, doc in rows if host_name.lower() in hub_hosts(doc)]

    def policies_for_hub(self, host_name: str, apply_allocation_policy: bool) -> dict[int, builtins.list[str]]:
        with self.store.session() as s:
            rows = s.execute(select(Enrollment.policy_id, Enrollment.enrollment_id, Enrollment.document)
                             .where(Enrollment.policy_id.is_not(None))).all()
        users: dict[int, list[str]] = {}
        for policy_id, eid, doc in rows:
            hosts = hub_hosts(doc)
            if (hosts and host_name.lower() in hosts) or (not hosts and apply_allocation_policy):
                users.setdefault(policy_id, []).append(eid)
        return users

    # ---- writing ----
    def put(self, kind: str, enrollment_id: str, document: dict[str, Any], *,
            if_match: str | None = None) -> tuple[EnrollmentView, bool]:
        """Create or replace; returns (view, created)."""
        check_registration_id(enrollment_id, "enrollment group id" if kind == GROUP else "registration id")
        if not isinstance(document, dict):
            raise InvalidInput("request body must be a JSON object")
        previous = self.find(kind, enrollment_id)
        self._check_if_match(previous, enrollment_id, if_match)
        # validated before the write transaction opens: it asks the registry, the hubs and the mechanisms
        doc, att_type, keys, policy_id = self._normalise(kind, enrollment_id, document, previous)
        now = datetime.now(UTC)
        changed = f"enrollment {enrollment_id!r} was changed concurrently; retry"
        try:
            with self.store.session() as s:
                # enrollment changes take turns from here (the counter's row, held to the commit), so what is read
                # next is the last committed: of two writers that validated one state, one writes; and ids are unique
                # ignoring case, which the (kind, id) constraint is not
                count_change_first(s)
                row = self._row(s, kind, enrollment_id)
                if (row.etag if row else None) != (previous.etag if previous else None):
                    if not any_etag(if_match):
                        raise PreconditionFailed(f"ETag {if_match} does not match enrollment {enrollment_id!r}, "
                                                 "as per RFC7232")
                    raise Conflict(changed)
                created = row is None
                if row is None:
                    row = Enrollment(kind=kind, enrollment_id=enrollment_id, created_at=now)
                    s.add(row)
                row.attestation_type = att_type
                row.policy_id = policy_id
                row.provisioning_status = doc["provisioningStatus"]
                row.document = doc
                row.secret = self.keys.wrap(json.dumps(list(keys)).encode(),
                                            self._label(kind, enrollment_id)) if keys else None
                row.etag = new_etag()
                row.updated_at = now
                s.flush()
                _audit(s, audit.ENROLLMENT_CREATED if created else audit.ENROLLMENT_UPDATED, kind, enrollment_id, doc,
                       etag=row.etag)
                view = self._view(row)
        except IntegrityError as exc:  # created meanwhile (its id is unique), or its policy deleted (foreign key)
            raise Conflict(changed) from exc
        return view, created

    @staticmethod
    def _check_if_match(previous: EnrollmentView | None, enrollment_id: str, if_match: str | None) -> None:
        if previous is None and if_match not in (None, "*"):
            raise PreconditionFailed(f"enrollment {enrollment_id!r} does not exist, so If-Match cannot match")
        if previous is not None and not etag_matches(if_match, previous.etag):
            raise PreconditionFailed(f"ETag {if_match} does not match enrollment {enrollment_id!r}, as per RFC7232")

    def bulk(self, kind: str, mode: object, documents: object) -> builtins.list[BulkError]:
        """Azure's bulk enrollment operation: up to :data:`MAX_BULK` enrollments, each created, updated (created if
        missing), updated only if its ``etag`` matches, or deleted on its own — one refused item does not undo
        the others (as in Azure); the refusals come back per item."""
        if mode not in BULK_MODES:
            raise InvalidInput(f"mode must be one of {', '.join(BULK_MODES)}, not {mode!r}")
        what = "enrollmentGroups" if kind == GROUP else "enrollments"
        if not isinstance(documents, list) or not documents:
            raise InvalidInput(f"{what} must be a non-empty JSON array")
        if len(documents) > MAX_BULK:
            raise InvalidInput(f"a bulk operation takes at most {MAX_BULK} {what}, not {len(documents)}")
        id_field = "enrollmentGroupId" if kind == GROUP else "registrationId"
        errors: builtins.list[BulkError] = []
        for document in documents:
            enrollment_id = document.get(id_field) if isinstance(document, dict) else None
            try:
                if not isinstance(document, dict) or not isinstance(enrollment_id, str):
                    raise InvalidInput(f"each item must be a JSON object with a string {id_field}")
                check_registration_id(enrollment_id, id_field)  # before it is looked up (or deleted)
                self._bulk_one(kind, mode, enrollment_id, document)
            except OpenDPSError as exc:
                errors.append(BulkError(enrollment_id if isinstance(enrollment_id, str) else "", exc.error_code,
                                        exc.message))
        return errors

    def _bulk_one(self, kind: str, mode: str, enrollment_id: str, document: dict[str, Any]) -> None:
        etag = document.get("etag")
        if mode == "delete":
            self.delete(kind, enrollment_id, if_match=etag if isinstance(etag, str) else None)
        elif mode == "create":
            if self.find(kind, enrollment_id) is not None:
                what = "enrollment group" if kind == GROUP else "enrollment"
                raise Conflict(f"{what} {enrollment_id!r} already exists")
            self.put(kind, enrollment_id, document)
        elif mode == "updateIfMatchETag":
            if not isinstance(etag, str) or not etag:
                raise PreconditionFailed(f"mode updateIfMatchETag needs the etag of {enrollment_id!r}")
            self.put(kind, enrollment_id, document, if_match=etag)
        else:
            self.put(kind, enrollment_id, document)

    def delete(self, kind: str, enrollment_id: str, *, if_match: str | None = None) -> None:
        with self.store.session() as s:
            row = self._row(s, kind, enrollment_id)
            gone = NotFound(f"enrollment {enrollment_id!r} does not exist", error_code=ENROLLMENT_NOT_FOUND)
            if row is None:
                raise gone
            take_row(s, row, if_match, f"enrollment {enrollment_id!r}", gone=gone)  # of two deletes at once: one 204
            if kind == INDIVIDUAL:  # its registration state goes with it, as in Azure
                key = enrollment_id.lower()
                gone_state = cast(CursorResult[Any], s.execute(delete(Registration).where(
                    Registration.registration_key == key, Registration.enrollment_kind == INDIVIDUAL)))
                if gone_state.rowcount:  # and that state's operations (see Provisioning.delete_registration)
                    s.execute(delete(Operation).where(Operation.registration_key == key))
            s.delete(row)
            _audit(s, audit.ENROLLMENT_DELETED, kind, row.enrollment_id, row.document)

    # ---- validation ----
    def _normalise(self, kind: str, enrollment_id: str, body: dict[str, Any],
                   previous: EnrollmentView | None) -> tuple[dict[str, Any], str, tuple[str, str] | None, int | None]:
        id_field = "enrollmentGroupId" if kind == GROUP else "registrationId"
        given = body.get(id_field)
        if given is not None and str(given).lower() != enrollment_id.lower():
            raise InvalidInput(f"{id_field} {given!r} in the body does not match {enrollment_id!r} in the path")
        doc: dict[str, Any] = {id_field: enrollment_id}
        if kind == INDIVIDUAL:
            device_id = body.get("deviceId")
            if device_id is not None:
                doc["deviceId"] = check_registration_id(device_id, "deviceId")
        att = json_object(body.get("attestation"), "attestation")
        att_type = att.get("type")
        mechanisms = attestation.mechanisms()
        if not isinstance(att_type, str) or (mechanism := mechanisms.get(att_type)) is None:
            raise InvalidInput(f"attestation.type must be one of {', '.join(mechanisms)} (got {att_type!r})")
        # keys are kept only by a PUT that keeps the attestation type: a symmetric-key enrollment's keys (shown to the
        # service API, maybe chosen by the operator) never become a TPM's, nor a TPM's key a symmetric key to show
        old_keys = previous.keys if previous is not None and previous.attestation_type == att_type else None
        doc["attestation"], keys = mechanism.enrollment(kind, enrollment_id, att, old_keys,
                                                        attestation.Context(self, self.ca_certificates))
        status = body.get("provisioningStatus", "enabled")
        if status not in ("enabled", "disabled"):
            raise InvalidInput(f"provisioningStatus must be 'enabled' or 'disabled' (got {status!r})")
        doc["provisioningStatus"] = status
        policy_id = self._policy(body, doc)
        self._allocation(body, doc)
        rp = json_object(body.get("reprovisionPolicy"), "reprovisionPolicy")
        doc["reprovisionPolicy"] = {
            "updateHubAssignment": json_bool(rp.get("updateHubAssignment"), "reprovisionPolicy.updateHubAssignment", True),
            "migrateDeviceData": json_bool(rp.get("migrateDeviceData"), "reprovisionPolicy.migrateDeviceData", True)}
        twin = json_object(body.get("initialTwin"), "initialTwin")
        if twin:  # the hub's twin rules (names, depth, sizes): the device starts with a twin its hub would take
            doc["initialTwin"] = initial_twin(twin)
        caps = json_object(body.get("capabilities"), "capabilities")
        doc["capabilities"] = {"iotEdge": json_bool(caps.get("iotEdge"), "capabilities.iotEdge", False)}
        if kind == INDIVIDUAL and body.get("optionalDeviceInformation") is not None:
            doc["optionalDeviceInformation"] = json_object(body["optionalDeviceInformation"], "optionalDeviceInformation")
        return doc, att_type, keys, policy_id

    def _policy(self, body: dict[str, Any], doc: dict[str, Any]) -> int | None:
        name = body.get("credentialPolicyName")
        namespace = body.get("namespaceName")
        post_preview = body.get("certificatePolicyName"), body.get("certificateAuthorityName")
        if any(v is not None for v in post_preview):  # the 2026 triple; a partial reference is rejected
            if None in (*post_preview, namespace):
                raise InvalidInput("namespaceName, certificateAuthorityName and certificatePolicyName go together; "
                                   "a partial reference is rejected")
            if name is not None and name != post_preview[0]:
                raise InvalidInput("credentialPolicyName and certificatePolicyName name different policies")
            if post_preview[1] != post_preview[0]:
                raise InvalidInput(f"certificateAuthorityName {post_preview[1]!r} is not the issuing CA of policy "
                                   f"{post_preview[0]!r} (each policy owns one issuing CA of the same name)")
            name = post_preview[0]
        if name is None:
            return None
        ref = self.registry.find_policy(name, namespace)
        doc["credentialPolicyName"] = ref.name
        doc["namespaceName"] = ref.namespace
        return ref.policy_id

    def _allocation(self, body: dict[str, Any], doc: dict[str, Any]) -> None:
        hubs = body.get("iotHubs")
        if hubs is None and body.get("iotHubHostName"):
            hubs = [body["iotHubHostName"]]
        hubs = hubs or []
        if not isinstance(hubs, list) or not all(isinstance(h, str) for h in hubs):
            raise InvalidInput("iotHubs must be a list of hub host names")
        hubs_now = self.hubs.list()
        linked = {h.host_name: h.host_name for h in hubs_now}
        linked_names = {h.name: h.host_name for h in hubs_now}
        resolved = []
        for h in hubs:
            host = linked.get(h.lower()) or linked_names.get(h)
            if host is None:
                raise InvalidInput(f"iotHubs: {h!r} is not a linked hub (dps linked-hub list)")
            if host not in resolved:
                resolved.append(host)
        policy = body.get("allocationPolicy") or "hashed"
        if policy not in ALLOCATION_POLICIES:
            raise InvalidInput(f"allocationPolicy must be one of {', '.join(ALLOCATION_POLICIES)} (got {policy!r})")
        if policy == "static" and len(resolved) != 1:
            raise InvalidInput("allocationPolicy 'static' needs exactly one hub in iotHubs")
        doc["allocationPolicy"] = policy
        doc["iotHubs"] = resolved
        if policy == "custom":
            cad = json_object(body.get("customAllocationDefinition"), "customAllocationDefinition")
            url = cad.get("webhookUrl")
            try:  # urlparse raises for an unbalanced IPv6 bracket ("https://[::1")
                parsed = urlparse(url) if isinstance(url, str) else None
            except ValueError:
                parsed = None
            if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise InvalidInput("allocationPolicy 'custom' needs customAllocationDefinition.webhookUrl (an http(s) URL)")
            api_version = cad.get("apiVersion") or "2019-03-31"
            doc["customAllocationDefinition"] = {"webhookUrl": url, "apiVersion": str(api_version)}
            timeout = cad.get("timeoutInSeconds")  # opendps extension; Azure's own limit is not configurable
            if timeout is not None:
                if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 1 <= timeout <= 60:
                    raise InvalidInput("customAllocationDefinition.timeoutInSeconds must be a number from 1 to 60")
                doc["customAllocationDefinition"]["timeoutInSeconds"] = timeout


def _audit(s: Session, action: str, kind: str, enrollment_id: str, doc: dict[str, Any], **extra: Any) -> None:
    """An enrollment change in the audit log: what decides who may register and where to (attestation type, status,
    policy, hubs, allocation) — not the document: no keys, and no webhook URL (it may carry a function key)."""
    details: dict[str, Any] = {"kind": kind, "attestationType": (doc.get("attestation") or {}).get("type"),
                               "provisioningStatus": doc.get("provisioningStatus"),
                               "credentialPolicyName": doc.get("credentialPolicyName"),
                               "allocationPolicy": doc.get("allocationPolicy"), "iotHubs": doc.get("iotHubs"),
                               "caReferences": ca_names(doc) or None, **extra}
    if doc.get("deviceId"):
        details["deviceId"] = doc["deviceId"]
    audit.append(s, action, namespace=doc.get("namespaceName"), device=enrollment_id if kind == INDIVIDUAL else None,
                 subject=enrollment_id, details={k: v for k, v in details.items() if v is not None})


def ca_names(document: dict[str, Any]) -> list[str]:
    """The DPS CA certificate names an X.509 group's document references (caReferences)."""
    refs = ((document.get("attestation") or {}).get("x509") or {}).get("caReferences") or {}
    return [refs[s] for s in ("primary", "secondary") if refs.get(s)]
