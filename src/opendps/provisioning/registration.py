"""Registration: the registration authority of the seed's diagram (steps 2-6).

``register`` attests the device, validates any CSR against the enrollment's policy, allocates a
hub, and then, in ONE transaction, issues the operational certificate, creates or moves the hub
device identity, records the device in the namespace's device registry, updates the registration
state and stores the operation's final result. A refusal (401/403/400) raises before anything is
written; a failed allocation (e.g. the custom webhook) is a *failed operation* the device reads
when it polls, never a 5xx, and writes no device, registration or certificate.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from opendps.errors import Conflict, InvalidInput, NotFound, OpenDPSError, PreconditionFailed
from opendps.hub import Hubs
from opendps.ids import etag_matches, new_etag
from opendps.pki import IssuanceEngine
from opendps.pki.csr import ValidatedCsr, decode_csr_text
from opendps.provisioning import allocation
from opendps.provisioning.attestation import (
    AttestationFailed,
    AttestedIdentity,
    DeviceCredentials,
    Mechanism,
    require_enabled,
)
from opendps.provisioning.attestation.symmetric_key import SymmetricKeyAttestation
from opendps.provisioning.attestation.x509 import X509Attestation
from opendps.provisioning.enrollments import GROUP, Enrollments, check_registration_id
from opendps.store import DeviceRecord, LinkedHub, Operation, Policy, Registration, Store

log = logging.getLogger("opendps.provisioning")
RETRY_AFTER_SECONDS = 2
OPERATION_TTL = timedelta(hours=24)  # how long a poll can still fetch an operation's result
SWEEP_EVERY = timedelta(minutes=10)
CSR_API_VERSION = "2025-07-01-preview"
REGISTRATION_NOT_FOUND = 404201
OPERATION_NOT_FOUND = 404203


def csr_supported(api_version: str | None) -> bool:
    """``csr`` is a 2025-07-01-preview field; later dated versions keep it (e.g. 2026-11-01)."""
    return bool(api_version) and api_version[:10] >= CSR_API_VERSION[:10]


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def new_operation_id() -> str:
    """Azure's shape: ``5.<16 hex>.<uuid>``."""
    return f"5.{secrets.token_hex(8)}.{uuid.uuid4()}"


@dataclass(frozen=True)
class Accepted:
    operation_id: str
    retry_after: int = RETRY_AFTER_SECONDS

    def to_wire(self) -> dict[str, str]:
        return {"operationId": self.operation_id, "status": "assigning"}


def registration_state(reg: Registration) -> dict[str, Any]:
    """``DeviceRegistrationResult`` / ``DeviceRegistrationState`` of a stored registration."""
    state: dict[str, Any] = {
        "registrationId": reg.registration_id, "createdDateTimeUtc": _iso(reg.created_at),
        "assignedHub": reg.assigned_hub, "deviceId": reg.device_id, "status": reg.status,
        "substatus": reg.substatus, "lastUpdatedDateTimeUtc": _iso(reg.updated_at), "etag": reg.etag,
    }
    if reg.error_code is not None:
        state["errorCode"], state["errorMessage"] = reg.error_code, reg.error_message
    if reg.payload is not None:
        state["payload"] = reg.payload
    return {k: v for k, v in state.items() if v is not None}


class Provisioning:
    def __init__(self, store: Store, enrollments: Enrollments, hubs: Hubs, engine: IssuanceEngine, id_scope: str, *,
                 webhook_timeout: float = allocation.DEFAULT_WEBHOOK_TIMEOUT, webhook_verify: Any = True):
        self.store = store
        self.enrollments = enrollments
        self.hubs = hubs
        self.engine = engine
        self.id_scope = id_scope
        self.webhook_timeout = webhook_timeout
        self.webhook_verify = webhook_verify
        self.mechanisms: list[Mechanism] = [SymmetricKeyAttestation(enrollments), X509Attestation(enrollments, store)]
        self._last_sweep = datetime.min.replace(tzinfo=UTC)

    # ---- device side ----
    def attest(self, credentials: DeviceCredentials, *, now: datetime | None = None) -> AttestedIdentity:
        now = now or datetime.now(UTC)
        if credentials.id_scope.lower() != self.id_scope.lower():
            raise AttestationFailed(f"unknown ID scope {credentials.id_scope!r}")
        check_registration_id(credentials.registration_id)
        for mechanism in self.mechanisms:
            if mechanism.applies(credentials):
                return require_enabled(mechanism.authenticate(credentials, now=now))
        raise AttestationFailed("no credential presented: send a client certificate chain in the TLS handshake or an "
                                "Authorization: SharedAccessSignature header", error_code=401000)

    def register(self, credentials: DeviceCredentials, *, payload: Any = None, csr: str | None = None,
                 api_version: str | None = None) -> Accepted:
        try:
            return self._register(credentials, payload, csr, api_version)
        except OpenDPSError as exc:
            log.info("registration %r refused (%s): %s", credentials.registration_id, exc.error_code, exc.message)
            raise

    def sweep_operations(self, now: datetime | None = None) -> int:
        """Forget operation results older than OPERATION_TTL (the table would otherwise grow forever)."""
        now = now or datetime.now(UTC)
        self._last_sweep = now
        with self.store.session() as s:
            return s.execute(delete(Operation).where(Operation.created_at < now - OPERATION_TTL)).rowcount or 0

    def _register(self, credentials: DeviceCredentials, payload: Any, csr: str | None,
                  api_version: str | None) -> Accepted:
        now = datetime.now(UTC)
        if now - self._last_sweep > SWEEP_EVERY:
            self.sweep_operations(now)
        identity = self.attest(credentials, now=now)
        enrollment = identity.enrollment
        csr_der, checked = None, None
        if csr is not None:
            if not csr_supported(api_version):
                raise InvalidInput(f"'csr' needs api-version {CSR_API_VERSION} or later (got {api_version!r})")
            if not isinstance(csr, str):
                raise InvalidInput("csr must be a base64 DER PKCS#10 string")
            if enrollment.policy_id is None:
                what = "enrollment group" if enrollment.kind == GROUP else "enrollment"
                raise InvalidInput(f"{what} {enrollment.enrollment_id!r} has no credentialPolicyName, so no operational "
                                   "certificate can be issued for a CSR")
            csr_der = decode_csr_text(csr)
            checked = self.engine.check(enrollment.policy_id, csr_der, identity.registration_id)
        operation_id = new_operation_id()
        try:
            alloc = self._allocate(identity, payload)
        except allocation.AllocationFailed as exc:
            log.info("registration %r failed: %s", identity.registration_id, exc.message)
            self._store_failure(operation_id, identity, exc, now)
            return Accepted(operation_id)
        for attempt in range(3):  # a concurrent registration of the same id may win the insert race
            try:
                self._commit(operation_id, identity, alloc, csr_der, now, checked)
                break
            except IntegrityError:
                if attempt == 2:
                    raise Conflict(f"registration {identity.registration_id!r} is being processed concurrently; retry",
                                   error_code=409005) from None
        log.info("registration %r assigned to %s via %s %r%s", identity.registration_id, alloc.hub.host_name,
                 enrollment.kind, enrollment.enrollment_id, " with a new certificate" if csr_der else "")
        return Accepted(operation_id)

    def operation(self, credentials: DeviceCredentials, operation_id: str) -> dict[str, Any]:
        self.attest(credentials)
        with self.store.session() as s:
            op = s.get(Operation, operation_id)
            if op is None or op.registration_key != credentials.registration_id.lower():
                raise NotFound(f"operation {operation_id!r} does not exist for registration "
                               f"{credentials.registration_id!r}", error_code=OPERATION_NOT_FOUND)
            return op.result

    def status(self, credentials: DeviceCredentials) -> dict[str, Any]:
        """Registration status lookup (POST /{idScope}/registrations/{id}): no certificate chain."""
        self.attest(credentials)
        return self.get_registration(credentials.registration_id)

    def renew_through_hub(self, hub_host: str, device_id: str, csr: bytes):  # noqa: ANN201 - IssuedChain
        """Renewal over the hub's ``$iothub/credentials`` topic: same policy, same checks, same records."""
        now = datetime.now(UTC)
        with self.store.session() as s:
            reg = s.scalars(select(Registration).where(Registration.assigned_hub == hub_host.lower(),
                                                       Registration.status == "assigned")
                            .where(Registration.device_id == device_id)).first()
            if reg is None:
                raise InvalidInput(f"device {device_id!r} was not provisioned to this hub by DPS", error_code=400006)
            enrollment = self.enrollments.find(reg.enrollment_kind, reg.enrollment_id)
            if enrollment is None or enrollment.policy_id is None:
                raise InvalidInput(f"device {device_id!r} has no credential policy to issue from", error_code=400006)
            if not enrollment.enabled:
                raise InvalidInput(f"the enrollment of device {device_id!r} is disabled", error_code=400006)
            chain = self.engine.issue(enrollment.policy_id, csr, reg.registration_id, now=now, session=s)
            self._record_device(s, enrollment.policy_id, device_id, reg.registration_id, hub_host, chain, now)
            reg.certificate_serial = format(chain.leaf.serial_number, "x")
            reg.updated_at = now
        log.info("device %r renewed its certificate through hub %s", device_id, hub_host)
        return chain

    # ---- service side ----
    def get_registration(self, registration_id: str) -> dict[str, Any]:
        with self.store.session() as s:
            reg = s.get(Registration, registration_id.lower())
            if reg is None:
                raise NotFound(f"registration {registration_id!r} does not exist", error_code=REGISTRATION_NOT_FOUND)
            return registration_state(reg)

    def list_registrations(self, enrollment_group_id: str) -> list[dict[str, Any]]:
        group = self.enrollments.get(GROUP, enrollment_group_id)  # 404 for an unknown group; ids are case-insensitive
        with self.store.session() as s:
            rows = s.scalars(select(Registration).where(Registration.enrollment_kind == GROUP,
                                                        Registration.enrollment_id == group.enrollment_id)
                             .order_by(Registration.registration_key))
            return [registration_state(r) for r in rows]

    def delete_registration(self, registration_id: str, *, if_match: str | None = None) -> None:
        """Forget the registration state: the device registers as new next time (hub identity stays)."""
        with self.store.session() as s:
            reg = s.get(Registration, registration_id.lower())
            if reg is None:
                raise NotFound(f"registration {registration_id!r} does not exist", error_code=REGISTRATION_NOT_FOUND)
            if not etag_matches(if_match, reg.etag):
                raise PreconditionFailed(f"ETag {if_match} does not match registration {registration_id!r}, as per RFC7232")
            s.delete(reg)

    # ---- steps ----
    def _allocate(self, identity: AttestedIdentity, payload: Any) -> allocation.Allocation:
        doc = identity.enrollment.document
        cands = allocation.candidates(doc, self.hubs.list())
        if not cands:
            raise allocation.AllocationFailed("no linked hub is available to this enrollment", error_code=400208)
        policy = doc.get("allocationPolicy", "hashed")
        if policy == "static":
            return allocation.Allocation(cands[0], payload=None)
        if policy == "custom":
            cad = doc["customAllocationDefinition"]
            return allocation.custom(cad["webhookUrl"], self._webhook_request(identity, payload, cands), cands,
                                     timeout=cad.get("timeoutInSeconds", self.webhook_timeout), verify=self.webhook_verify)
        return allocation.Allocation(allocation.hashed(identity.registration_id, cands))  # hashed, geoLatency

    def _webhook_request(self, identity: AttestedIdentity, payload: Any, cands: list) -> dict[str, Any]:
        e = identity.enrollment
        with self.store.session() as s:
            reg = s.get(Registration, identity.registration_id.lower())
            current_hub, current_device = (reg.assigned_hub, reg.device_id) if reg is not None else (None, None)
        context: dict[str, Any] = {"registrationId": identity.registration_id, "payload": payload,
                                   "currentIotHubHostName": current_hub, "currentDeviceId": current_device}
        context.update(identity.details)
        key = "enrollmentGroup" if e.kind == GROUP else "individualEnrollment"
        return {key: e.to_wire(), "deviceRuntimeContext": {k: v for k, v in context.items() if v is not None},
                "linkedHubs": [h.host_name for h in cands]}

    def _store_failure(self, operation_id: str, identity: AttestedIdentity, exc: allocation.AllocationFailed,
                       now: datetime) -> None:
        state = {"registrationId": identity.registration_id, "createdDateTimeUtc": _iso(now), "status": "failed",
                 "errorCode": exc.error_code, "errorMessage": exc.message, "lastUpdatedDateTimeUtc": _iso(now),
                 "etag": new_etag()}
        with self.store.session() as s:
            s.add(Operation(operation_id=operation_id, registration_key=identity.registration_id.lower(), status="failed",
                            result={"operationId": operation_id, "status": "failed", "registrationState": state},
                            created_at=now))

    def _commit(self, operation_id: str, identity: AttestedIdentity, alloc: allocation.Allocation,
                csr_der: bytes | None, now: datetime, checked: ValidatedCsr | None = None) -> None:
        e = identity.enrollment
        rid = identity.registration_id
        device_id = e.document.get("deviceId") or rid
        rp = e.document.get("reprovisionPolicy") or {}
        twin = alloc.initial_twin if alloc.initial_twin is not None else e.document.get("initialTwin")
        with self.store.session() as s:
            target = s.get(LinkedHub, alloc.hub.id)
            if target is None:
                raise InvalidInput(f"linked hub {alloc.hub.name!r} was removed during registration; retry")
            reg = s.get(Registration, rid.lower())
            previous = None
            if reg is not None and reg.status == "assigned" and reg.assigned_hub:
                previous = s.scalars(select(LinkedHub).where(LinkedHub.host_name == reg.assigned_hub)).first()
            substatus, reset, migrate_from, old_device = "initialAssignment", False, None, None
            if previous is not None:
                old_device = self.hubs.find_device(s, previous, reg.device_id or device_id)
                if not rp.get("updateHubAssignment", True):
                    target = previous
                elif rp.get("migrateDeviceData", True):
                    if previous.id != target.id:
                        substatus, migrate_from = "deviceDataMigrated", old_device
                else:
                    substatus, reset = "deviceDataReset", True
            chain = None
            if csr_der is not None:
                chain = self.engine.issue(e.policy_id, csr_der, rid, now=now, session=s, checked=checked)
            if chain is not None:
                auth, keys, prints = "certificateAuthority", None, (None, None)
            else:
                auth, keys, prints = identity.hub_auth_type, identity.device_keys, identity.thumbprints
            self.hubs.put_device(s, target, device_id, auth_type=auth, thumbprints=prints, keys=keys,
                                 initial_twin=twin, reset_twin=reset, migrate_from=migrate_from)
            if old_device is not None and previous is not None and previous.id != target.id:
                s.delete(old_device)
            if e.policy_id is not None:
                self._record_device(s, e.policy_id, device_id, rid, target.host_name, chain, now)
            if reg is None:
                reg = Registration(registration_key=rid.lower(), created_at=now)
                s.add(reg)
            reg.registration_id = rid
            reg.enrollment_kind, reg.enrollment_id, reg.attestation_type = e.kind, e.enrollment_id, identity.attestation_type
            reg.device_id, reg.assigned_hub, reg.status, reg.substatus = device_id, target.host_name, "assigned", substatus
            reg.error_code = reg.error_message = None
            reg.payload = alloc.payload
            reg.certificate_serial = format(chain.leaf.serial_number, "x") if chain else None
            reg.etag = new_etag()
            reg.updated_at = now
            s.flush()
            state = registration_state(reg)
            state.update(identity.details)
            if chain is not None:
                state["issuedCertificateChain"] = [base64.b64encode(d).decode() for d in chain.der_chain()]
            s.add(Operation(operation_id=operation_id, registration_key=rid.lower(), status="assigned",
                            result={"operationId": operation_id, "status": "assigned", "registrationState": state},
                            created_at=now))

    @staticmethod
    def _record_device(s, policy_id: int, device_id: str, registration_id: str, hub_host: str, chain,  # noqa: ANN001
                       now: datetime) -> None:
        policy = s.get(Policy, policy_id)
        if policy is None:
            return
        rec = s.scalars(select(DeviceRecord).where(DeviceRecord.namespace_id == policy.namespace_id,
                                                   DeviceRecord.device_key == device_id.lower())).first()
        if rec is None:
            rec = DeviceRecord(namespace_id=policy.namespace_id, device_id=device_id, device_key=device_id.lower(),
                               created_at=now)
            s.add(rec)
        rec.registration_id, rec.hub_host_name, rec.policy_id = registration_id, hub_host, policy_id
        if chain is not None:
            rec.certificate_serial = format(chain.leaf.serial_number, "x")
            rec.certificate_sha256 = hashlib.sha256(chain.leaf.public_bytes(Encoding.DER)).hexdigest()
            rec.certificate_not_after = chain.leaf.not_valid_after_utc
        rec.etag = new_etag()
        rec.updated_at = now


__all__ = ["Accepted", "Provisioning", "csr_supported", "registration_state"]
