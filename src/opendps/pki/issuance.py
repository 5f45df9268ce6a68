"""The issuance engine: the "PKI" box of the seed's diagram (Boulder's CA).

The RA (provisioning) loads the policy's :class:`Issuer` from the registry and validates the CSR once;
``issue(issuer, csr, registration_id)`` re-holds that CSR to the issuer's policy, builds the leaf with
the policy's profile, lints it, signs it with the issuing CA's key and records the certificate in
``issued_certificates`` before returning the chain [leaf, issuing CA, root]. The engine reads no
policy or CA rows itself: what to sign with is handed to it.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import hashlib
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time, timedelta
from time import perf_counter
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import bindparam, case, exists, func, insert, select, update
from sqlalchemy.orm import Session

from opendps import audit
from opendps.errors import Conflict, InvalidInput, NotFound
from opendps.logs import event
from opendps.pki.certificates import serial_hex
from opendps.pki.csr import ValidatedCsr, allowed_curves, check_curve, validate_csr
from opendps.pki.keys import KeyStore
from opendps.pki.profiles import IssuanceRefused, LeafTemplates, leaf_builder, sign_leaf
from opendps.pki.status import Publication
from opendps.store import IssuedCertificate, Store, Transaction, joined, table_of
from opendps.store.timebuckets import utc_day

log = logging.getLogger("opendps.pki")
LOG_EACH = 20  # revocations logged one line each; more in one line with the count
_ISSUED = table_of(IssuedCertificate)
_INSERT_CERTIFICATE = insert(_ISSUED)  # prepared once per set of columns: one row per issuance
_OLDER = _ISSUED.alias("older")
# before a certificate's first use, whether the registration holds older unrevoked ones (that use supersedes): a
# CONNECT of a certificate with nothing to supersede writes nothing (evaluated only while unused)
_HAS_OLDER = case((_ISSUED.c.first_used_at.is_(None),
                   exists().where(_OLDER.c.registration_id == _ISSUED.c.registration_id, _OLDER.c.id < _ISSUED.c.id,
                                  _OLDER.c.revoked_at.is_(None))), else_=False)
# a certificate's first hub session: prepared once (built per CONNECT it cost more than it ran)
_CLAIM_FIRST_USE = update(_ISSUED).where(_ISSUED.c.id == bindparam("b_id"), _ISSUED.c.first_used_at.is_(None)).values(
    first_used_at=bindparam("b_now"))
_ISSUED_BY_SHA256 = select(_ISSUED.c.serial, _ISSUED.c.policy_id, _ISSUED.c.registration_id, _ISSUED.c.not_after,
                           _ISSUED.c.revoked_at, _ISSUED.c.revocation_reason, _ISSUED.c.id,
                           _ISSUED.c.first_used_at, _HAS_OLDER.label("has_older")).where(
    _ISSUED.c.sha256 == bindparam("b_sha"))
_VIEW_COLUMNS = (_ISSUED.c.id, _ISSUED.c.serial, _ISSUED.c.sha256, _ISSUED.c.policy_id, _ISSUED.c.issuing_ca_id,
                 _ISSUED.c.registration_id, _ISSUED.c.not_before, _ISSUED.c.not_after, _ISSUED.c.created_at,
                 _ISSUED.c.revoked_at, _ISSUED.c.revocation_reason)

# RFC 5280 5.3.1 CRLReason names that revoke (removeFromCRL (8) undoes a hold: it is not a revocation reason)
REVOCATION_REASONS = ("unspecified", "keyCompromise", "cACompromise", "affiliationChanged", "superseded",
                      "cessationOfOperation", "certificateHold", "privilegeWithdrawn", "aACompromise")
_REASONS_BY_KEY = {r.lower(): r for r in REVOCATION_REASONS}


def revocation_reason(value: str | None) -> str:
    """The RFC 5280 reason name for ``value`` (any case; None: unspecified); InvalidInput for another."""
    if value is None or value == "":
        return "unspecified"
    found = _REASONS_BY_KEY.get(value.strip().lower())
    if found is None:
        raise InvalidInput(f"revocation reason {value!r} is not one of: {', '.join(REVOCATION_REASONS)}")
    return found


def stored_serial(serial: str) -> str:
    """A serial number as given (hex as openssl prints it, any case, with or without colons or leading zeros) in
    the stored form: lower-case hex without leading zeros. InvalidInput for anything else."""
    text = serial.strip().replace(":", "")
    if text.lower().startswith("0x"):
        text = text[2:]
    if not text or len(text) > 40:  # RFC 5280: at most 20 octets
        raise InvalidInput(f"serial number {serial!r} is not 1 to 20 octets of hex")
    try:
        return format(int(text, 16), "x")
    except ValueError:
        raise InvalidInput(f"serial number {serial!r} is not hex") from None


@dataclass(frozen=True)
class IssuedChain:
    leaf: x509.Certificate
    issuing_ca: x509.Certificate
    root: x509.Certificate
    # the three as DER, as the CA had them at hand (a registration encoded each of them again, twice for the leaf)
    ders: tuple[bytes, bytes, bytes]

    @property
    def certificates(self) -> list[x509.Certificate]:
        return [self.leaf, self.issuing_ca, self.root]

    def der_chain(self) -> list[bytes]:
        return list(self.ders)

    def pem_chain(self) -> str:
        return "".join(c.public_bytes(Encoding.PEM).decode() for c in self.certificates)


@dataclass(frozen=True)
class Issuer:
    """What a policy signs with, as the registry hands it to the CA: leaf settings and the active issuing CA."""

    policy_id: int
    policy_name: str
    validity_days: int
    allow_p256: bool
    ca_id: int
    key_id: str
    certificate: x509.Certificate
    root: x509.Certificate
    revoke_superseded: bool = True  # a renewed certificate's first CONNECT revokes the older ones
    crl_validity_hours: int = 24  # how far ahead a CRL's (and an OCSP response's) nextUpdate lies
    namespace: str = ""  # the policy's namespace (names in logs and metrics)

    @property
    def label(self) -> str:
        """``namespace/policy``: the policy as logs and metrics name it."""
        return f"{self.namespace}/{self.policy_name}" if self.namespace else self.policy_name

    @property
    def curves(self) -> set[str]:
        return allowed_curves(self.allow_p256)

    def validate(self, csr: bytes, registration_id: str) -> ValidatedCsr:
        """The RA's check of a CSR against this policy (no signature is made)."""
        return validate_csr(csr, registration_id, allow_p256=self.allow_p256)

    @functools.cached_property
    def ders(self) -> tuple[bytes, bytes]:
        """The issuing CA's and the root's DER, encoded once per issuer (the registry keeps an Issuer per
        configuration): every issued chain carries them."""
        return self.certificate.public_bytes(Encoding.DER), self.root.public_bytes(Encoding.DER)


@dataclass(frozen=True)
class IssuedRecord:
    """An issued certificate as recorded: who it was issued to, under which policy."""

    serial: str
    policy_id: int | None
    registration_id: str
    not_after: datetime
    revoked_at: datetime | None = None
    revocation_reason: str | None = None
    id: int = 0
    first_used_at: datetime | None = None
    # when read before its first use: whether older unrevoked certificates of the registration existed then
    has_older: bool = True

    @property
    def serial_number(self) -> str:
        """As openssl prints it: upper-case hex of whole octets."""
        return serial_hex(int(self.serial, 16))


@dataclass(frozen=True)
class IssuedCertificateView:
    """An issued certificate as the management API shows it."""

    serial_number: str  # upper-case hex of whole octets, as openssl prints it
    sha256: str  # lower-case hex
    policy_id: int | None
    issuing_ca_id: int
    registration_id: str
    not_before: datetime
    not_after: datetime
    created_at: datetime
    revoked_at: datetime | None
    revocation_reason: str | None

    @classmethod
    def of(cls, row: Any) -> IssuedCertificateView:
        return cls(serial_hex(int(row.serial, 16)), row.sha256, row.policy_id, row.issuing_ca_id, row.registration_id,
                   row.not_before, row.not_after, row.created_at, row.revoked_at, row.revocation_reason)

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


class IssuanceEngine:
    def __init__(self, store: Store, keys: KeyStore, *, lint: bool = True,
                 publication: Publication | None = None) -> None:
        self.store = store
        self.keys = keys
        self.lint = lint
        self.templates = LeafTemplates()  # linted leaves' TBS by shape: the first leaf of each is linted in full
        # where this installation serves CRLs and OCSP: named in every leaf (None: leaves name none)
        self.publication = publication
        # told of every certificate signed and recorded (the issuer, seconds it took): the wiring hands it the metrics
        self.observer: Callable[[Issuer, float], None] | None = None
        self._issued_by_sha256 = store.prepare(_ISSUED_BY_SHA256)
        self._claim_first_use = store.prepare(_CLAIM_FIRST_USE)

    def issue(self, issuer: Issuer, csr: ValidatedCsr | bytes, registration_id: str, *, now: datetime | None = None,
              session: Session | Transaction | None = None) -> IssuedChain:
        """Sign a leaf for ``registration_id`` under ``issuer``, record it, return the chain.

        ``csr``: DER/PEM bytes (validated here), or what :meth:`Issuer.validate` returned for this registration
        moments ago — confirmed to be that check of this CSR (:meth:`ValidatedCsr.confirm`) and its curve held to
        ``issuer`` as it is now; its signature is not verified twice. With ``session`` the certificate row joins
        the caller's transaction (provisioning commits it together with the device and registration, so a failure
        leaves none of them behind).
        """
        started = perf_counter()
        now = now or datetime.now(UTC)
        if isinstance(csr, bytes):
            checked = issuer.validate(csr, registration_id)
        else:
            checked = csr
            checked.confirm(registration_id)
            check_curve(checked.curve, allow_p256=issuer.allow_p256)
        if issuer.certificate.not_valid_after_utc <= now:
            raise IssuanceRefused(f"the issuing CA of policy {issuer.policy_name!r} has expired")
        signer = self.keys.signer(issuer.key_id)
        # the issuing CA's CRL and OCSP URLs, when this installation publishes them
        where = self.publication
        urls = {"crl_url": where.crl_url(issuer.certificate), "ocsp_url": where.ocsp_url} if where is not None else {}
        # the leaf's shape: what its TBS holds besides its own values (the profile is the builder function)
        shape = (leaf_builder, issuer.ca_id, issuer.key_id, issuer.certificate, *urls.values())
        leaf = sign_leaf(self.templates, shape, leaf_builder, checked.public_key, registration_id, issuer.certificate,
                         signer, issuer.validity_days, now=now, lint=self.lint, **urls)
        der = leaf.public_bytes(Encoding.DER)
        row = {"serial": format(leaf.serial_number, "x"), "sha256": hashlib.sha256(der).hexdigest(), "der": der,
               "policy_id": issuer.policy_id, "issuing_ca_id": issuer.ca_id, "registration_id": registration_id,
               "not_before": leaf.not_valid_before_utc, "not_after": leaf.not_valid_after_utc, "created_at": now}
        # in the caller's transaction when given (a duplicate serial fails it); a prepared statement on the driver's
        # cursor, not the ORM's unit of work, which costs more than it gives for one insert on every registration
        serial = serial_hex(leaf.serial_number)

        def issued_line() -> None:
            log.info("certificate %s issued to %r under policy %s", serial, registration_id, issuer.label,
                     extra=event("certificate.issued", serial=serial, registration_id=registration_id,
                                 policy=issuer.label))

        with contextlib.nullcontext(joined(session)) if session is not None else self.store.transaction() as tx:
            tx.run(_INSERT_CERTIFICATE, **row)
            tx.after_commit(issued_line)  # said once the transaction holding the record has committed
        if self.observer is not None:
            self.observer(issuer, perf_counter() - started)
        return IssuedChain(leaf, issuer.certificate, issuer.root, (der, *issuer.ders))

    def find(self, cursor: Any, certificate: x509.Certificate) -> IssuedRecord | None:
        """The record of ``certificate`` if this service issued it (by its SHA-256, stored lower-case); one prepared
        statement, on the cursor of the caller's driver transaction (the hub asks on every CONNECT)."""
        sha = hashlib.sha256(certificate.public_bytes(Encoding.DER)).hexdigest()
        row = self._issued_by_sha256.first(cursor, b_sha=sha)
        return (IssuedRecord(row.serial, row.policy_id, row.registration_id, row.not_after, row.revoked_at,
                             row.revocation_reason, row.id, row.first_used_at, bool(row.has_older)) if row else None)

    def revoked_among(self, serials: builtins.list[str]) -> set[str]:
        """Of ``serials`` (as :func:`serial_hex` writes them), those of certificates issued here and revoked: one
        statement (a bus catching up after an outage re-checks a node's certificate sessions)."""
        stored = {format(int(serial, 16), "x"): serial for serial in serials}
        if not stored:
            return set()
        with self.store.session() as s:
            rows = s.connection().execute(select(_ISSUED.c.serial).where(
                _ISSUED.c.serial.in_(list(stored)), _ISSUED.c.revoked_at.is_not(None)))
            return {stored[row.serial] for row in rows}

    def claim_first_use(self, cursor: Any, record: IssuedRecord, now: datetime) -> None:
        """Note ``record``'s first hub session on the cursor of the caller's driver transaction (a CONNECT's), when
        it supersedes nothing: older certificates that its policy keeps (:meth:`first_use` revokes them)."""
        if record.first_used_at is None and record.id:
            self._claim_first_use.run(cursor, b_id=record.id, b_now=now)

    def first_use(self, record: IssuedRecord, *, now: datetime | None = None) -> builtins.list[IssuedCertificateView]:
        """``record``'s certificate, under a policy that revokes superseded ones, opened its first hub session: note
        it and revoke as ``superseded`` every unrevoked certificate issued to the same registration before it, in a
        transaction of its own. Returns those revoked. Runs once per certificate (``first_used_at`` is set in the same
        statement that decides who does it), so only a renewed certificate's first CONNECT pays for it."""
        if record.first_used_at is not None or not record.id:
            return []
        now = now or datetime.now(UTC)
        with self.store.session() as s:
            conn = s.connection()
            claimed = conn.execute(_CLAIM_FIRST_USE, {"b_id": record.id, "b_now": now})
            # a concurrent first CONNECT of the same certificate did it; or none older when the record was read (in
            # this transaction: older ones are never issued later, and are only ever revoked meanwhile)
            if claimed.rowcount != 1 or not record.has_older:
                return []
            older = ((_ISSUED.c.registration_id == record.registration_id) & (_ISSUED.c.id < record.id)
                     & _ISSUED.c.revoked_at.is_(None))
            rows = conn.execute(select(*_VIEW_COLUMNS).where(older)).all()
            if rows:
                conn.execute(update(_ISSUED).where(_ISSUED.c.id.in_([r.id for r in rows]),
                                                   _ISSUED.c.revoked_at.is_(None))
                             .values(revoked_at=now, revocation_reason="superseded"))
                audit.append_all(s, [_revoked_event(r, "superseded", supersededBy=record.serial_number) for r in rows])
        _log_revoked(rows, "superseded")
        return [replace(IssuedCertificateView.of(r), revoked_at=now, revocation_reason="superseded") for r in rows]

    # ---- certificate views and revocation (issue 17) ----
    @staticmethod
    def _where_one(serial_or_thumbprint: str) -> Any:
        """A 64-hex-digit value is a SHA-256 thumbprint (colons allowed), anything else a serial (at most 40)."""
        text = serial_or_thumbprint.strip().replace(":", "").lower()
        if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
            return _ISSUED.c.sha256 == text
        return _ISSUED.c.serial == stored_serial(serial_or_thumbprint)

    def get(self, serial_or_thumbprint: str) -> IssuedCertificateView:
        """One issued certificate by serial number or SHA-256 thumbprint; NotFound if this service did not issue it."""
        where = self._where_one(serial_or_thumbprint)
        with self.store.session() as s:
            row = s.connection().execute(select(*_VIEW_COLUMNS).where(where)).first()
        if row is None:
            raise NotFound(f"no certificate with serial number or thumbprint {serial_or_thumbprint!r} was issued here")
        return IssuedCertificateView.of(row)

    def list(self, *, registration_ids: Collection[str] | None = None,
             issuing_ca_ids: Collection[int] | None = None) -> list[IssuedCertificateView]:
        """Issued certificates, newest first, filtered by registration ids (any case) and/or issuing CA ids (the
        registry resolves a device id or a namespace to these)."""
        q = select(*_VIEW_COLUMNS).order_by(_ISSUED.c.created_at.desc(), _ISSUED.c.id.desc())
        if registration_ids is not None:
            if not registration_ids:
                return []
            q = q.where(_ISSUED.c.registration_id.in_(sorted(set(registration_ids))))
        if issuing_ca_ids is not None:
            if not issuing_ca_ids:
                return []
            q = q.where(_ISSUED.c.issuing_ca_id.in_(sorted(set(issuing_ca_ids))))
        with self.store.session() as s:
            return [IssuedCertificateView.of(r) for r in s.connection().execute(q).all()]

    def revoke(self, serial_or_thumbprint: str, reason: str | None = None, *,
               now: datetime | None = None) -> IssuedCertificateView:
        """Revoke one certificate. Revoking one already revoked is a Conflict (409) naming it, its date and its
        first reason, which stays: a revocation is never rewritten."""
        reason = revocation_reason(reason)
        now = now or datetime.now(UTC)
        where = self._where_one(serial_or_thumbprint)
        with self.store.session() as s:
            conn = s.connection()
            row = conn.execute(select(*_VIEW_COLUMNS).where(where)).first()
            if row is None:
                raise NotFound(f"no certificate with serial number or thumbprint {serial_or_thumbprint!r} was issued "
                               "here")
            view = IssuedCertificateView.of(row)
            if view.revoked:
                raise Conflict(f"certificate {view.serial_number} is already revoked ({view.revocation_reason}, "
                               f"{view.revoked_at:%Y-%m-%dT%H:%M:%SZ})")
            done = conn.execute(update(_ISSUED).where(_ISSUED.c.id == row.id, _ISSUED.c.revoked_at.is_(None))
                                .values(revoked_at=now, revocation_reason=reason))
            if done.rowcount != 1:  # revoked by a concurrent call between the read and the update
                raise Conflict(f"certificate {view.serial_number} is already revoked")
            audit.append_all(s, [_revoked_event(row, reason)])
        _log_revoked([row], reason)
        return replace(view, revoked_at=now, revocation_reason=reason)

    def revoke_registrations(self, registration_ids: Collection[str], reason: str | None = None, *,
                             issuing_ca_ids: Collection[int] | None = None,
                             now: datetime | None = None) -> builtins.list[IssuedCertificateView]:
        """Revoke every unrevoked certificate issued to ``registration_ids`` (by ``issuing_ca_ids`` only, when given:
        a namespace's), in one transaction; returns those just revoked (none is not an error: revoking a device
        twice revokes nothing the second time)."""
        if not registration_ids or (issuing_ca_ids is not None and not issuing_ca_ids):
            revocation_reason(reason)
            return []
        pending: Any = _ISSUED.c.registration_id.in_(sorted(set(registration_ids)))
        if issuing_ca_ids is not None:
            pending = pending & _ISSUED.c.issuing_ca_id.in_(sorted(set(issuing_ca_ids)))
        return self._revoke_where(pending, reason, now)

    def revoke_issued_by(self, issuing_ca_ids: Collection[int], reason: str | None = None, *,
                         now: datetime | None = None, session: Session | None = None,
                         audit_scope: dict[str, Any] | None = None) -> int:
        """Revoke every unrevoked certificate signed by ``issuing_ca_ids`` (a policy's, or one compromised issuing
        CA's), in one statement (in ``session``'s transaction when given: the registry revokes the CA itself in the
        same one, and records it). Returns how many; the hub drops live sessions by their certificates' issuer, not
        one by one. With ``audit_scope`` (e.g. the namespace and policy), one audit entry records the whole
        revocation (there may be a million certificates)."""
        reason = revocation_reason(reason)
        if not issuing_ca_ids:
            return 0
        now = now or datetime.now(UTC)
        with contextlib.nullcontext(session) if session is not None else self.store.session() as s:
            done = s.connection().execute(
                update(_ISSUED).where(_ISSUED.c.issuing_ca_id.in_(sorted(set(issuing_ca_ids))),
                                      _ISSUED.c.revoked_at.is_(None))
                .values(revoked_at=now, revocation_reason=reason))
            count = int(done.rowcount or 0)
            if audit_scope is not None:
                audit.append(s, audit.CERTIFICATE_REVOKED, namespace=audit_scope.get("namespace"),
                             details={**audit_scope, "count": count, "reason": reason})
        if count:
            log.info("%d certificate(s) of %d issuing CA(s) revoked (%s)", count, len(set(issuing_ca_ids)), reason,
                     extra=event("certificate.revoked", count=count, reason=reason,
                                 namespace=(audit_scope or {}).get("namespace")))
        return count

    def _revoke_where(self, where: Any, reason: str | None, now: datetime | None) -> builtins.list[IssuedCertificateView]:
        reason = revocation_reason(reason)
        now = now or datetime.now(UTC)
        pending = where & _ISSUED.c.revoked_at.is_(None)
        with self.store.session() as s:
            conn = s.connection()
            rows = conn.execute(select(*_VIEW_COLUMNS).where(pending)).all()
            if rows:
                conn.execute(update(_ISSUED).where(_ISSUED.c.id.in_([r.id for r in rows]),
                                                   _ISSUED.c.revoked_at.is_(None))
                             .values(revoked_at=now, revocation_reason=reason))
                audit.append_all(s, [_revoked_event(r, reason) for r in rows])
        _log_revoked(rows, reason)
        return [replace(IssuedCertificateView.of(r), revoked_at=now, revocation_reason=reason) for r in rows]


    # ---- the fleet dashboard's aggregate (issue 19) ----
    def expiry_timeline(self, days: int = 90, *, now: datetime | None = None,
                        issuing_ca_ids: Collection[int] | None = None) -> builtins.list[tuple[date, int]]:
        """How many unrevoked certificates expire on each UTC day from today to ``days - 1`` days ahead (those of
        ``issuing_ca_ids`` only, when given: a namespace's), zeros included, today counting only those not yet
        expired: one ``GROUP BY`` on the partial index ``ix_issued_certificates_expiry`` (unrevoked certificates by
        notAfter), so expired history costs nothing."""
        now = now or datetime.now(UTC)
        first = now.astimezone(UTC).date()
        end = datetime.combine(first + timedelta(days=days), time(), UTC)
        day = utc_day(_ISSUED.c.not_after, self.store.dialect)
        q = (select(day, func.count()).where(_ISSUED.c.revoked_at.is_(None), _ISSUED.c.not_after >= now,
                                             _ISSUED.c.not_after < end).group_by(day))
        if issuing_ca_ids is not None:
            if not issuing_ca_ids:
                return [(first + timedelta(days=n), 0) for n in range(days)]
            q = q.where(_ISSUED.c.issuing_ca_id.in_(sorted(set(issuing_ca_ids))))
        with self.store.session() as s:
            counts = {str(d): int(c) for d, c in s.connection().execute(q).all()}
        return [(first + timedelta(days=n), counts.get((first + timedelta(days=n)).isoformat(), 0)) for n in range(days)]

def _log_revoked(rows: Sequence[Any], reason: str) -> None:
    """One log line per certificate revoked (the first :data:`LOG_EACH`; then one line with how many more)."""
    for r in rows[:LOG_EACH]:
        serial = serial_hex(int(r.serial, 16))
        log.info("certificate %s of %r revoked (%s)", serial, r.registration_id, reason,
                 extra=event("certificate.revoked", serial=serial, registration_id=r.registration_id, reason=reason))
    if len(rows) > LOG_EACH:
        log.info("%d more certificate(s) revoked (%s)", len(rows) - LOG_EACH, reason,
                 extra=event("certificate.revoked", count=len(rows) - LOG_EACH, reason=reason))


def _revoked_event(row: Any, reason: str, **details: Any) -> audit.Event:
    """The audit entry of one certificate's revocation: serial as openssl prints it, thumbprint, reason."""
    return audit.Event(audit.CERTIFICATE_REVOKED, device=row.registration_id, subject=serial_hex(int(row.serial, 16)),
                       details={"sha256": row.sha256.upper(), "reason": reason, **details})
