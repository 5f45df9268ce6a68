"""Registration: the registration authority of the seed's diagram (steps 2-6), as decide -> issue -> assign.

- **decide** (provisioning): attest the device (the mechanism registry), load the policy's issuer once
  and validate any CSR against it, allocate a hub. A refusal (401/403/400) raises here, before
  anything is written; a failed allocation (e.g. the custom webhook) is a *failed operation* the
  device reads when it polls, never a 5xx, and writes no device, registration or certificate.
- **issue** (pki): the CA signs the leaf and records it — called once, in the transaction below.
- **assign** (hub, registry, provisioning), in that ONE transaction: place the device in its hub
  (reprovisioning rules), record it in the namespace's device registry, store the registration state
  and the operation's final result. Any failure rolls all of it back, certificate record included.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import re
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, bindparam, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from opendps import audit
from opendps.errors import Conflict, InvalidInput, NotFound, OpenDPSError
from opendps.hub import DeviceCredential, Hubs
from opendps.ids import new_etag, take_row
from opendps.logs import event
from opendps.pki import (
    CaCertificates,
    IssuanceEngine,
    IssuedChain,
    Issuer,
    ValidatedCsr,
    decode_csr_text,
    serial_hex,
)
from opendps.provisioning import allocation, attestation, reprovisioning
from opendps.provisioning.attestation import (
    AttestationFailed,
    AttestedIdentity,
    Challenge,
    DeviceCredentials,
    EnrollmentDisabled,
)
from opendps.provisioning.enrollments import GROUP, Enrollments, check_registration_id
from opendps.provisioning.throttle import PollThrottle, RegistrationLimit, ServiceLimit
from opendps.registry import DeviceRegistry, Registry
from opendps.registry.devices import IssuerRetired
from opendps.store import Operation, Registration, Store, Transaction, table_of
from opendps.transport import shown
from opendps.transport.wire import iso8601

log = logging.getLogger("opendps.provisioning")
RETRY_AFTER_SECONDS = 2
# a registration complete within this is answered in the register response itself; slower ones (a slow custom
# allocation webhook) keep the 202 + poll path, so a device never waits on one open request
ANSWER_WITHIN = timedelta(seconds=1)
OPERATION_TTL = timedelta(hours=24)  # how long a poll can still fetch an operation's result
SWEEP_EVERY = timedelta(minutes=10)
CSR_API_VERSION = "2025-07-01-preview"
REGISTRATION_NOT_FOUND = 404201
OPERATION_NOT_FOUND = 404203
MAX_OPERATION_ID = 96  # the operations table's key column


_API_VERSION = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2})(-preview)?")


def csr_supported(api_version: str | None) -> bool:
    """``csr`` is a 2025-07-01-preview field; later dated versions keep it (e.g. 2026-11-01). Only a dated version
    counts: compared as text, ``abc`` or ``é`` sorted after every date."""
    match = _API_VERSION.fullmatch(api_version or "")
    return match is not None and match[1] >= CSR_API_VERSION[:10]


def canonical_registration_id(registration_id: str) -> str:
    """Registration ids are case-insensitive (as in Azure DPS); opendps records and issues the lower-cased one."""
    return registration_id.lower()


def new_operation_id() -> str:
    """Azure's shape: ``5.<16 hex>.<uuid>``."""
    return f"5.{secrets.token_hex(8)}.{uuid.uuid4()}"


@dataclass(frozen=True)
class Accepted:
    """A register request's answer: the final result when the registration was assigned within
    :data:`ANSWER_WITHIN`, else the operation to poll (+ Retry-After). ``status`` is the MQTT answer's
    (``res/200`` for a final result); HTTPS answers 202 either way, the only status the C# SDK takes."""

    operation_id: str
    retry_after: int = RETRY_AFTER_SECONDS
    result: dict[str, Any] | None = None  # RegistrationOperationStatus, status "assigned"
    outcome: str = "assigned"  # or "failed": a failed allocation, stored as a failed operation (front ends count it)

    @property
    def status(self) -> int:
        return 200 if self.result is not None else 202

    def to_wire(self) -> dict[str, Any]:
        return self.result if self.result is not None else {"operationId": self.operation_id, "status": "assigning"}


def registration_state(reg: Registration | Mapping[str, Any]) -> dict[str, Any]:
    """``DeviceRegistrationResult`` / ``DeviceRegistrationState`` of a stored registration (a row, or its values)."""
    v: Mapping[str, Any] = reg if isinstance(reg, Mapping) else {k: getattr(reg, k) for k in _STATE_COLUMNS}
    state: dict[str, Any] = {
        "registrationId": v["registration_id"], "createdDateTimeUtc": iso8601(v["created_at"]),
        "assignedHub": v["assigned_hub"], "deviceId": v["device_id"], "status": v["status"],
        "substatus": v["substatus"], "lastUpdatedDateTimeUtc": iso8601(v["updated_at"]), "etag": v["etag"],
    }
    if v["error_code"] is not None:
        state["errorCode"], state["errorMessage"] = v["error_code"], v["error_message"]
    if v["payload"] is not None:
        state["payload"] = v["payload"]
    return {k: val for k, val in state.items() if val is not None}


_STATE_COLUMNS = ("registration_id", "created_at", "assigned_hub", "device_id", "status", "substatus", "updated_at",
                  "etag", "error_code", "error_message", "payload")
# the registration's own rows, read and written with prepared statements (compiled once) in its transaction
_REGISTRATIONS = table_of(Registration)
_REGISTRATION_BY_KEY = select(_REGISTRATIONS).where(_REGISTRATIONS.c.registration_key == bindparam("b_key"))
_INSERT_REGISTRATION = insert(_REGISTRATIONS)
_UPDATE_REGISTRATION = update(_REGISTRATIONS).where(_REGISTRATIONS.c.registration_key == bindparam("b_key"))
_INSERT_OPERATION = insert(table_of(Operation))


class _RegistrationGone(Exception):
    """The registration state read in this transaction was deleted before it was written: roll back, go again."""


@dataclass(frozen=True)
class Decision:
    """What the RA decided for one register request, before anything is written."""

    identity: AttestedIdentity
    allocation: allocation.Allocation
    issuer: Issuer | None = None  # with a CSR: the policy's issuer, loaded once
    csr: ValidatedCsr | None = None


class Provisioning:
    def __init__(self, store: Store, *, enrollments: Enrollments, ca_certificates: CaCertificates, registry: Registry,
                 devices: DeviceRegistry, hubs: Hubs, issuance: IssuanceEngine, id_scope: str,
                 webhook_timeout: float = allocation.DEFAULT_WEBHOOK_TIMEOUT, webhook_verify: Any = True) -> None:
        self.store = store
        self.enrollments = enrollments
        self.registry = registry
        self.devices = devices
        self.hubs = hubs
        self.issuance = issuance
        self.id_scope = id_scope
        self.webhook_timeout = webhook_timeout
        self.webhook_verify = webhook_verify
        self.mechanisms = attestation.mechanisms()
        self.context = attestation.Context(enrollments, ca_certificates)
        self.throttle = PollThrottle(store)  # shared by every process on the database (request_limits)
        self.registration_limit = RegistrationLimit(store)
        self.service_limit = ServiceLimit()
        self._swept_at: float | None = None  # time.monotonic() of the last sweep: a wall-clock step neither
        # pauses the sweeps for its length nor runs one per request

    # ---- device side ----
    def attest(self, credentials: DeviceCredentials, *, now: datetime | None = None) -> AttestedIdentity | Challenge:
        """The enrollment the device proves it belongs to (enabled), or the challenge its mechanism asks it to answer."""
        now = now or datetime.now(UTC)
        if credentials.id_scope.lower() != self.id_scope.lower():
            raise AttestationFailed(f"unknown ID scope {credentials.id_scope!r}", reason="unknown_scope")
        check_registration_id(credentials.registration_id)
        for mechanism in self.mechanisms.values():
            if not mechanism.presented(credentials):
                continue
            if credentials.transport not in mechanism.transports:
                raise AttestationFailed(f"{mechanism.name} attestation is not supported over "
                                        f"{credentials.transport.upper()}; use {' or '.join(sorted(mechanism.transports))}",
                                        reason="wrong_transport")
            result = mechanism.authenticate(credentials, self.context, now=now)
            if isinstance(result, Challenge):
                return result
            if not result.enrollment.enabled:
                e = result.enrollment
                what = "enrollment group" if e.kind == GROUP else "enrollment"
                raise EnrollmentDisabled(f"{what} {e.enrollment_id!r} is disabled: registration refused")
            # registration ids are case-insensitive: from here on (state, device id, certificate CN) the canonical,
            # lower-cased one; the mechanism checked the credential against the id as the device sent it
            return replace(result, registration_id=canonical_registration_id(result.registration_id))
        raise AttestationFailed("no credential presented: send a client certificate chain in the TLS handshake, an "
                                "Authorization: SharedAccessSignature header, or (TPM) the body's tpm member "
                                "{endorsementKey, storageRootKey}", error_code=401000, reason="no_credential")

    def mechanism_presented(self, credentials: DeviceCredentials) -> str:
        """The attestation type whose credential the request carries (the first in matching order), or ``none``:
        what front ends count a registration under, whatever its outcome."""
        for mechanism in self.mechanisms.values():
            if mechanism.presented(credentials):
                return mechanism.name
        return "none"

    def authenticate_connection(self, credentials: DeviceCredentials) -> None:
        """A device opening a DPS connection (MQTT CONNECT) must prove its credential now, so that nobody can open,
        or take over, a registration's session without it. A disabled enrollment does not refuse the connection:
        the credential is proven, and each request is answered 403 as over HTTPS."""
        # one read of the configuration counter for the enrollment, CA and group lookups (each read its own: ~4 SQL
        # statements per X.509 CONNECT)
        with contextlib.suppress(EnrollmentDisabled), self.store.config_snapshot():
            self.attest(credentials)

    def _identity(self, credentials: DeviceCredentials) -> AttestedIdentity:
        """Attestation for requests after the register (poll, status): a challenge is not an answer there."""
        result = self.attest(credentials)
        if isinstance(result, Challenge):
            raise AttestationFailed("attestation is not complete: answer the challenge of the register request first")
        return result

    def register(self, credentials: DeviceCredentials, *, payload: Any = None, csr: str | None = None,
                 api_version: str | None = None) -> Accepted | Challenge:
        now = datetime.now(UTC)
        if self._swept_at is None or time.monotonic() - self._swept_at > SWEEP_EVERY.total_seconds():
            self.sweep_operations(now)
        operation_id = new_operation_id()
        try:
            return self._register(credentials, payload, csr, api_version, operation_id, now)
        except IssuerRetired:
            # the policy's issuing CA was rotated (or revoked) after this registration chose it (a custom allocation
            # webhook took its time): nothing was kept; decided again on the configuration as it is now, the device
            # gets a certificate of the new CA in this answer rather than a 503 to retry
            log.info("registration %r: the issuing CA it was to be signed by was rotated or revoked meanwhile; "
                     "deciding again", credentials.registration_id)
            return self._register(credentials, payload, csr, api_version, operation_id, now)

    def _register(self, credentials: DeviceCredentials, payload: Any, csr: str | None, api_version: str | None,
                  operation_id: str, now: datetime) -> Accepted | Challenge:
        with self.store.config_snapshot():  # enrollments, issuer, hubs: one read of the configuration counter
            try:
                self.service_limit.take()
                decision = self._decide(credentials, payload, csr, api_version, now)
            except allocation.AllocationFailed as exc:
                log.info("registration %r failed: %s", credentials.registration_id, exc.message,
                         extra=event("registration.failed", registration_id=credentials.registration_id,
                                     outcome="failed", reason=exc.reason, error_code=exc.error_code,
                                     transport=credentials.transport, operation_id=operation_id))
                self._store_failure(operation_id, credentials.registration_id, exc, now)
                return Accepted(operation_id, outcome="failed")
            except OpenDPSError as exc:
                log.info("registration %r refused (%s): %s", credentials.registration_id, exc.error_code, exc.message,
                         extra=event("registration.refused", registration_id=credentials.registration_id,
                                     outcome="refused", reason=exc.reason, error_code=exc.error_code,
                                     transport=credentials.transport))
                raise
            if isinstance(decision, Challenge):
                return decision
            for attempt in range(3):  # changed since read: a hub unlinked, a device id taken, the state deleted
                try:
                    result = self._issue_and_assign(operation_id, decision, now)
                    break
                except (IntegrityError, _RegistrationGone):
                    if attempt == 2:
                        raise Conflict(f"registration {credentials.registration_id!r} is being processed concurrently "
                                       "(or its hub was unlinked meanwhile); retry", error_code=409005) from None
        e = decision.identity.enrollment
        log.info("registration %r assigned to %s via %s %r%s", credentials.registration_id,
                 decision.allocation.hub.host_name, e.kind, e.enrollment_id, " with a new certificate" if decision.csr else "",
                 extra=event("registration.assigned", registration_id=decision.identity.registration_id,
                             device_id=(result.get("registrationState") or {}).get("deviceId"),
                             hub=decision.allocation.hub.host_name, outcome="assigned", enrollment_id=e.enrollment_id,
                             transport=credentials.transport, operation_id=operation_id,
                             policy=decision.issuer.label if decision.issuer else None))
        return Accepted(operation_id, result=result if datetime.now(UTC) - now <= ANSWER_WITHIN else None)

    def operation(self, credentials: DeviceCredentials, operation_id: str) -> dict[str, Any]:
        self._attest_and_count(credentials)
        with self.store.session() as s:
            # ours are printable ASCII that fits the column: anything else names no operation, and sent to the
            # database as a key (a U+0000 from '%00') it was PostgreSQL's DataError, a traceback, not a 404
            known = 0 < len(operation_id) <= MAX_OPERATION_ID and operation_id.isascii() and operation_id.isprintable()
            op = s.get(Operation, operation_id) if known else None
            if op is None or op.registration_key != credentials.registration_id.lower():
                raise NotFound(f"operation {shown(operation_id)} does not exist for registration "
                               f"{credentials.registration_id!r}", error_code=OPERATION_NOT_FOUND)
            return op.result

    def status(self, credentials: DeviceCredentials) -> dict[str, Any]:
        """Registration status lookup (POST /{idScope}/registrations/{id}): no certificate chain."""
        self._attest_and_count(credentials)
        return self.get_registration(credentials.registration_id)

    def _attest_and_count(self, credentials: DeviceCredentials) -> None:
        """A poll or status lookup: attested, then counted against the device's limit — as registrations are, so that
        nobody can use up a device's allowance without its credential (counted first, 5 requests without any
        credential kept the device itself from polling, 429, for as long as they went on). A refusal this process has
        already seen answers at once, before the attestation."""
        check_registration_id(credentials.registration_id)  # before the throttle keys a row by it
        self.throttle.check_known(credentials.registration_id)
        with self.store.config_snapshot():
            self._identity(credentials)
        self.throttle.check(credentials.registration_id)

    def renew_through_hub(self, hub_host: str, device_id: str, csr: bytes) -> IssuedChain:
        """Renewal over the hub's ``$iothub/credentials`` topic: same policy, same checks, same records."""
        now = datetime.now(UTC)
        with self.store.session() as s:
            reg = s.scalars(select(Registration).where(Registration.assigned_hub == hub_host.lower(),
                                                       Registration.status == "assigned")
                            .where(Registration.device_id == device_id)).first()
            if reg is None:
                raise InvalidInput(f"device {device_id!r} was not provisioned to this hub by DPS", error_code=400006)
            registration_id, kind, enrollment_id = reg.registration_id, reg.enrollment_kind, reg.enrollment_id
        enrollment = self.enrollments.find(kind, enrollment_id)
        if enrollment is None or enrollment.policy_id is None:
            raise InvalidInput(f"device {device_id!r} has no credential policy to issue from", error_code=400006)
        if not enrollment.enabled:
            raise InvalidInput(f"the enrollment of device {device_id!r} is disabled", error_code=400006)
        issuer = self.registry.issuer(enrollment.policy_id)
        checked = issuer.validate(csr, registration_id)
        with self.store.session() as s:
            chain = self.issuance.issue(issuer, checked, registration_id, now=now, session=s)
            self.devices.record(s, policy_id=issuer.policy_id, device_id=device_id, registration_id=registration_id,
                                hub_host=hub_host, certificate=chain.leaf, issuing_ca_id=issuer.ca_id, now=now)
            # one statement, not the ORM's read-then-update: a delete of the registration state committed in between
            # made that update match no row (StaleDataError, a 500); now the renewal stands as if it came first
            s.execute(update(Registration).where(Registration.registration_key == registration_id.lower())
                      .values(certificate_serial=format(chain.leaf.serial_number, "x"), updated_at=now))
            audit.append(s, audit.CERTIFICATE_ISSUED, **_issued(enrollment.document.get("namespaceName"),
                                                                registration_id, device_id, issuer, chain,
                                                                via="hub", hub=hub_host))
        log.info("device %r renewed its certificate through hub %s", device_id, hub_host)
        return chain

    def sweep_operations(self, now: datetime | None = None) -> int:
        """Forget operation results older than OPERATION_TTL (the table would otherwise grow forever)."""
        now = now or datetime.now(UTC)
        self._swept_at = time.monotonic()
        with self.store.session() as s:
            # a DML statement's result is a CursorResult (Session.execute is typed with the general Result)
            result = cast(CursorResult[Any], s.execute(delete(Operation).where(Operation.created_at < now - OPERATION_TTL)))
            return result.rowcount or 0

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
            # of two deletes at once one goes on (the other's ORM delete matched no row: a 500)
            take_row(s, reg, if_match, f"registration {registration_id!r}", gone=NotFound(
                f"registration {registration_id!r} does not exist", error_code=REGISTRATION_NOT_FOUND))
            s.delete(reg)
            # its operations go with it: a poll of one answered the forgotten state (hub, device, certificate chain),
            # also to whoever holds the credential of an enrollment made again under the same registration id
            s.execute(delete(Operation).where(Operation.registration_key == reg.registration_key))
            audit.append(s, audit.REGISTRATION_DELETED, device=reg.registration_id, subject=reg.enrollment_id,
                         details=_present({"enrollmentKind": reg.enrollment_kind, "status": reg.status,
                                           "assignedHub": reg.assigned_hub, "deviceId": reg.device_id}))

    # ---- decide ----
    def _decide(self, credentials: DeviceCredentials, payload: Any, csr: str | None, api_version: str | None,
                now: datetime) -> Decision | Challenge:
        identity = self.attest(credentials, now=now)
        if isinstance(identity, Challenge):
            return identity
        # counted once the credential is proven, in the write transaction (_issue_and_assign, _store_failure); here
        # only a refusal this process has already seen, without a statement
        self.registration_limit.check_known(identity.registration_id)
        issuer, checked = None, None
        if csr is not None:
            issuer, checked = self._check_csr(identity, csr, api_version)
        return Decision(identity, self._allocate(identity, payload), issuer, checked)

    def _check_csr(self, identity: AttestedIdentity, csr: str, api_version: str | None) -> tuple[Issuer, ValidatedCsr]:
        enrollment = identity.enrollment
        if not csr_supported(api_version):
            raise InvalidInput(f"'csr' needs api-version {CSR_API_VERSION} or later (got {shown(api_version or '')})")
        if not isinstance(csr, str):
            raise InvalidInput("csr must be a base64 DER PKCS#10 string")
        if enrollment.policy_id is None:
            what = "enrollment group" if enrollment.kind == GROUP else "enrollment"
            raise InvalidInput(f"{what} {enrollment.enrollment_id!r} has no credentialPolicyName, so no operational "
                               "certificate can be issued for a CSR")
        issuer = self.registry.issuer(enrollment.policy_id)
        return issuer, issuer.validate(decode_csr_text(csr), identity.registration_id)

    def _allocate(self, identity: AttestedIdentity, payload: Any) -> allocation.Allocation:
        doc = identity.enrollment.document
        cands = allocation.candidates(doc, self.hubs.list())
        if not cands:
            raise allocation.AllocationFailed("no linked hub is available to this enrollment")
        policy = doc.get("allocationPolicy", "hashed")
        if policy == "static":
            return allocation.Allocation(cands[0], payload=None)
        if policy == "custom":
            cad = doc["customAllocationDefinition"]
            return allocation.custom(cad["webhookUrl"], self._webhook_request(identity, payload, cands), cands,
                                     timeout=cad.get("timeoutInSeconds", self.webhook_timeout), verify=self.webhook_verify)
        return allocation.Allocation(allocation.hashed(identity.registration_id, cands))  # hashed, geoLatency

    def _webhook_request(self, identity: AttestedIdentity, payload: Any, cands: list[Any]) -> dict[str, Any]:
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

    def _store_failure(self, operation_id: str, registration_id: str, exc: allocation.AllocationFailed,
                       now: datetime) -> None:
        state = {"registrationId": registration_id, "createdDateTimeUtc": iso8601(now), "status": "failed",
                 "errorCode": exc.error_code, "errorMessage": exc.message, "lastUpdatedDateTimeUtc": iso8601(now),
                 "etag": new_etag()}
        with self.store.session() as s:
            self.registration_limit.check(registration_id, within=s)  # a failed one counts too
            s.add(Operation(operation_id=operation_id, registration_key=registration_id.lower(), status="failed",
                            result={"operationId": operation_id, "status": "failed", "registrationState": state},
                            created_at=now))
            audit.append(s, audit.REGISTRATION_FAILED, device=registration_id,
                         details={"errorCode": exc.error_code, "message": exc.message[:256],
                                  "operationId": operation_id})

    # ---- issue + assign: one transaction ----
    def _issue_and_assign(self, operation_id: str, decision: Decision, now: datetime) -> dict[str, Any]:
        """Issue and assign in one transaction; the operation's final result (what a poll returns)."""
        identity, e = decision.identity, decision.identity.enrollment
        rid = identity.registration_id
        device_id = e.document.get("deviceId") or rid
        twin = decision.allocation.initial_twin
        if twin is None:
            twin = e.document.get("initialTwin")
        # prepared statements on one driver transaction (store.Transaction): through a Session and Core each of its
        # ~11 statements cost ~50-100 us of SQLAlchemy's Python, on every registration; the rows' owners still write
        # them (hubs the identity, devices the record, the CA its certificate). A failure rolls all of them back.
        with self.store.transaction() as tx:
            chain = None
            if decision.issuer is not None and decision.csr is not None:
                chain = self.issuance.issue(decision.issuer, decision.csr, rid, now=now, session=tx)
            # one upsert in this transaction (429 rolls it back); it also holds this id's row to the commit (SQLite:
            # the write lock), so registrations of one id take turns from here and each reads what the last wrote
            self.registration_limit.check(rid, within=tx)
            # an individual enrollment's delete takes its registration state with it: one deleted since the decision
            # would leave this registration behind, of an enrollment that no longer exists
            if e.kind != GROUP and not self.enrollments.hold(tx, e.kind, e.enrollment_id):
                raise AttestationFailed(f"enrollment {e.enrollment_id!r} was deleted while {rid!r} registered",
                                        reason="no_enrollment")
            # read after the turn is taken: read before it, a registration of the same id (a device retrying) that
            # moved the device meanwhile was undone from a stale previous hub, its hub identity left behind
            reg = tx.first(_REGISTRATION_BY_KEY, b_key=rid.lower())
            previous = None
            if reg is not None and reg.status == "assigned" and reg.assigned_hub:
                previous = self.hubs.by_host(reg.assigned_hub)  # from the configuration snapshot
            placement = reprovisioning.place(decision.allocation.hub, previous, e.document.get("reprovisionPolicy") or {})
            credential = identity.hub_credential
            if chain:
                # a TPM device keeps its TPM-held key for hub SAS beside the certificate (registrationState.tpm
                # gives it the key for the hub); other devices use the certificate only
                credential = DeviceCredential("certificateAuthority", keys=identity.hub_credential.keys
                                              if identity.attestation_type == "tpm" else None)
            self.hubs.place_device(tx, placement.hub, device_id, credential, initial_twin=twin, twin=placement.twin,
                                   previous=(previous, (reg.device_id if reg else None) or device_id) if previous else None)
            if e.policy_id is not None:
                self.devices.record(tx, policy_id=e.policy_id, device_id=device_id, registration_id=rid,
                                    hub_host=placement.hub.host_name, certificate=chain.leaf if chain else None,
                                    issuing_ca_id=decision.issuer.ca_id if decision.issuer else None, now=now)
            result = self._record_assignment(tx, operation_id, decision, reg, device_id, placement, chain, now)
            # last: the audit chain is locked from this append to the commit
            audit.append_all(tx, _assignment_events(decision, device_id, placement, chain, operation_id))
            return result

    @staticmethod
    def _record_assignment(tx: Transaction, operation_id: str, decision: Decision, reg: Any | None,
                           device_id: str, placement: reprovisioning.Placement, chain: IssuedChain | None,
                           now: datetime) -> dict[str, Any]:
        identity, e = decision.identity, decision.identity.enrollment
        key = identity.registration_id.lower()
        values: dict[str, Any] = {
            "registration_id": identity.registration_id, "enrollment_kind": e.kind, "enrollment_id": e.enrollment_id,
            "attestation_type": identity.attestation_type, "device_id": device_id,
            "assigned_hub": placement.hub.host_name, "status": "assigned", "substatus": placement.substatus,
            "error_code": None, "error_message": None, "payload": decision.allocation.payload,
            "certificate_serial": format(chain.leaf.serial_number, "x") if chain else None, "etag": new_etag(),
            "updated_at": now}
        if reg is None:
            values.update(registration_key=key, created_at=now)
            tx.run(_INSERT_REGISTRATION, **values)
        else:
            # a delete of the registration state may commit between the read and this (PostgreSQL reads what is
            # committed; a delete does not take the limit's row): nothing updated — go again, as after the delete
            if tx.run(_UPDATE_REGISTRATION, b_key=key, **values) != 1:
                raise _RegistrationGone(key)
            values["created_at"] = reg.created_at
        state = registration_state(values)
        state.update(identity.details)
        if chain is not None:
            state["issuedCertificateChain"] = [base64.b64encode(d).decode() for d in chain.der_chain()]
        result = {"operationId": operation_id, "status": "assigned", "registrationState": state}
        tx.run(_INSERT_OPERATION, operation_id=operation_id, registration_key=key, status="assigned", result=result,
               created_at=now)
        return result


def _present(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _issued(namespace: str | None, registration_id: str, device_id: str, issuer: Issuer, chain: IssuedChain,
            **via: Any) -> dict[str, Any]:
    """The ``certificate.issued`` entry's fields: the serial number as openssl prints it, the thumbprints of the leaf
    and of its issuing CA (as the ``ca.*`` entries name CAs), the policy and the validity end."""
    leaf_der, ca_der, _ = chain.der_chain()
    details = {"sha256": hashlib.sha256(leaf_der).hexdigest().upper(), "policy": issuer.policy_name,
               "issuingCa": hashlib.sha256(ca_der).hexdigest().upper(),
               "notAfter": iso8601(chain.leaf.not_valid_after_utc), **via}
    if device_id.lower() != registration_id.lower():
        details["deviceId"] = device_id
    return {"namespace": namespace, "device": registration_id, "subject": serial_hex(chain.leaf), "details": details}


def _assignment_events(decision: Decision, device_id: str, placement: reprovisioning.Placement,
                       chain: IssuedChain | None, operation_id: str) -> list[audit.Event]:
    """A registration's entries: the certificate issued (if a CSR came), then the assignment; subject of the
    assignment: the enrollment it came through (as the ``enrollment.*`` entries name it)."""
    identity, e = decision.identity, decision.identity.enrollment
    rid, namespace = identity.registration_id, e.document.get("namespaceName")
    events = []
    if chain is not None and decision.issuer is not None:
        events.append(audit.Event(audit.CERTIFICATE_ISSUED, **_issued(namespace, rid, device_id, decision.issuer, chain,
                                                                       via="registration")))
    details = _present({"enrollmentKind": e.kind, "attestationType": identity.attestation_type,
                        "hub": placement.hub.host_name, "substatus": placement.substatus,
                        "deviceId": device_id if device_id.lower() != rid.lower() else None,
                        "serialNumber": serial_hex(chain.leaf) if chain is not None else None,
                        "operationId": operation_id})
    events.append(audit.Event(audit.REGISTRATION_ASSIGNED, namespace, rid, e.enrollment_id, details))
    return events


__all__ = ["Accepted", "Decision", "Provisioning", "csr_supported", "registration_state"]
