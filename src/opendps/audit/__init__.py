"""The tamper-evident audit log: every issuance, revocation, CA creation/rotation/upload/verification, enrollment
change and registration outcome, appended as a hash chain (``audit_log``; docs/architecture.md, "Data model").

Domain code records an action with one call, in the transaction that makes the change::

    audit.append(session, audit.CERTIFICATE_ISSUED, namespace=ns, device=registration_id,
                 subject=serial_hex(leaf), details={"policy": name, "sha256": thumbprint(leaf)})

Who acted comes from :data:`ACTOR` (the management request's access policy), or ``actor=``. Entries hold names,
ids, serial numbers and thumbprints — never keys, tokens or PINs (:func:`append` refuses such members).
:class:`AuditLog` lists entries and checks the chain (:mod:`.chain` says what is hashed and what a check catches).

Imports only ``opendps.store`` (like ``opendps.cluster``), so every domain package may record into it.
"""

from __future__ import annotations

from opendps.audit.chain import GENESIS, ChainCheck, Record, Verification, canonical_json, entry_hash, timestamp
from opendps.audit.log import ACTOR, AuditLog, Event, UnreadableEntry, acting_as, append, append_all

# the actions (stable names: scripts filter on them; a family is the part before the dot)
CERTIFICATE_ISSUED = "certificate.issued"
CERTIFICATE_REVOKED = "certificate.revoked"
CA_CREATED = "ca.created"  # a namespace's root CA, or a policy's issuing CA
CA_ROTATED = "ca.rotated"  # a policy's new issuing CA; the old one retired
CA_REVOKED = "ca.revoked"  # an issuing CA revoked by its root
POLICY_UPDATED = "policy.updated"  # a credential policy's settings changed (validity, curves, superseding, CRL)
CA_CERTIFICATE_UPLOADED = "ca-certificate.uploaded"  # an owner's CA certificate, to DPS or a hub
CA_CERTIFICATE_VERIFIED = "ca-certificate.verified"  # ... proven by proof of possession
CA_CERTIFICATE_DELETED = "ca-certificate.deleted"
ENROLLMENT_CREATED = "enrollment.created"
ENROLLMENT_UPDATED = "enrollment.updated"
ENROLLMENT_DELETED = "enrollment.deleted"
REGISTRATION_ASSIGNED = "registration.assigned"
REGISTRATION_FAILED = "registration.failed"  # stored as a failed operation (allocation failed)
REGISTRATION_DELETED = "registration.deleted"  # the service deleted a registration state

__all__ = [
    "ACTOR",
    "CA_CERTIFICATE_DELETED",
    "CA_CERTIFICATE_UPLOADED",
    "CA_CERTIFICATE_VERIFIED",
    "CA_CREATED",
    "CA_REVOKED",
    "CA_ROTATED",
    "CERTIFICATE_ISSUED",
    "CERTIFICATE_REVOKED",
    "ENROLLMENT_CREATED",
    "ENROLLMENT_DELETED",
    "ENROLLMENT_UPDATED",
    "GENESIS",
    "POLICY_UPDATED",
    "REGISTRATION_ASSIGNED",
    "REGISTRATION_DELETED",
    "REGISTRATION_FAILED",
    "AuditLog",
    "ChainCheck",
    "Event",
    "Record",
    "UnreadableEntry",
    "Verification",
    "acting_as",
    "append",
    "append_all",
    "canonical_json",
    "entry_hash",
    "timestamp",
]
