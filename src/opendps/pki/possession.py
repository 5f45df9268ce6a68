"""CA certificates an owner uploads and proves by proof of possession (seed steps 4-5): to DPS, where
enrollment groups reference them, or to one hub, which then trusts devices they issued.

Flow: upload (etag, unverified) -> generate a verification code (needs the current etag) ->
the owner signs a certificate whose CN is that code with the CA's key -> verify (needs the etag).
Only the most recent code is accepted, and only once; every step changes the etag.
"""

from __future__ import annotations

import builtins
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from opendps import audit
from opendps.errors import Conflict, InvalidInput, NotFound, PreconditionFailed
from opendps.ids import etag_matches, new_etag, take_row
from opendps.pki.certificates import load_certificate_text, thumbprint
from opendps.store import ConfigCache, ProvenCaCertificate, Store

# Azure-style codes: 400004 invalid argument, 400011 bad verification certificate (unconfirmed numbering)
VERIFICATION_FAILED = 400011


@dataclass(frozen=True)
class CaCertificateView:
    name: str
    etag: str
    certificate: x509.Certificate
    subject: str
    sha1: str
    sha256: str
    is_verified: bool
    created_at: datetime
    updated_at: datetime
    verification_code: str | None = None


def _view(row: ProvenCaCertificate, code: str | None = None) -> CaCertificateView:
    return CaCertificateView(row.name, row.etag, x509.load_der_x509_certificate(row.der), row.subject, row.sha1,
                              row.sha256, row.is_verified, row.created_at, row.updated_at, code)


def _check_ca(cert: x509.Certificate, now: datetime) -> None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise InvalidInput("certificate is not a CA certificate (basicConstraints CA:TRUE is required)")
    if cert.not_valid_after_utc <= now:
        raise InvalidInput(f"certificate expired on {cert.not_valid_after_utc.isoformat()}")
    if cert.not_valid_before_utc > now:
        raise InvalidInput(f"certificate is not valid before {cert.not_valid_before_utc.isoformat()}")


def _check_name(name: str) -> str:
    if not name or len(name) > 256 or any(c in name for c in "/\\?#") or name.strip() != name \
            or not name.isprintable():  # no control character (a NUL, a newline), no lone surrogate
        raise InvalidInput(f"certificate name {name!r} is invalid: 1-256 printable characters, no '/', '\\\\', "
                           "'?', '#'")
    return name


class CaCertificates:
    """The CA certificates of one owner, kept in the owner's table: DPS (``dps_certificates``, owned by
    provisioning) or one hub (``hub_certificates`` scoped by ``{"hub_id": n}``, owned by hub). Both follow
    the same proof-of-possession rules; only the table and its scoping column differ, and the owner
    package is the one that builds this object.

    Uploads, proofs and deletions are recorded in the audit log (``ca-certificate.*``, subject: the SHA-256
    thumbprint) with ``audit_scope`` in the details: ``{"service": "dps"}`` or ``{"service": "hub", "hub": name}``.
    """

    def __init__(self, store: Store, model: type[ProvenCaCertificate], scope: dict[str, Any] | None = None, *,
                 audit_scope: dict[str, str] | None = None) -> None:
        self.store = store
        self.model = model
        self.scope = dict(scope or {})
        self.audit_scope = dict(audit_scope or {"service": "dps"})
        # the proven certificates, parsed: every X.509 registration asks for them (CA rows are configuration)
        self._verified: ConfigCache[str, builtins.list[CaCertificateView]] = ConfigCache(store, capacity=1)

    def _select(self) -> Select[ProvenCaCertificate]:
        q = select(self.model)
        for column, value in self.scope.items():
            q = q.where(getattr(self.model, column) == value)
        return q

    def _find(self, s: Session, name: str) -> ProvenCaCertificate | None:
        if "\x00" in name:
            return None  # no certificate is so named, and PostgreSQL cannot even compare a NUL
        return s.scalars(self._select().where(self.model.name == name)).first()

    def _get(self, s: Session, name: str) -> ProvenCaCertificate:
        row = self._find(s, name)
        if row is None:
            raise NotFound(f"certificate {name!r} does not exist")
        return row

    def upload(self, name: str, certificate: str | bytes, *, if_match: str | None = None) -> tuple[CaCertificateView, bool]:
        """Upload (or, with a matching If-Match, replace) a CA certificate; returns (view, created)."""
        _check_name(name)
        cert = load_certificate_text(certificate)
        now = datetime.now(UTC)
        _check_ca(cert, now)
        der = cert.public_bytes(Encoding.DER)
        with self.store.session() as s:
            row = self._find(s, name)
            created = row is None
            if row is None:
                if if_match not in (None, "*"):
                    raise PreconditionFailed(f"certificate {name!r} does not exist, so If-Match cannot match")
                row = self.model(name=name, created_at=now, **self.scope)
                s.add(row)
            elif if_match is None:
                raise Conflict(f"certificate {name!r} already exists; pass its etag (If-Match) to replace it")
            elif not etag_matches(if_match, row.etag):
                raise PreconditionFailed(f"ETag {if_match} does not match certificate {name!r}, as per RFC7232")
            row.der = der
            row.subject = cert.subject.rfc4514_string()
            row.sha1 = thumbprint(cert, "sha1")
            row.sha256 = thumbprint(cert)
            row.not_after = cert.not_valid_after_utc
            row.is_verified = False
            row.verification_code = None
            row.etag = new_etag()
            row.updated_at = now
            s.flush()
            self._audit(s, audit.CA_CERTIFICATE_UPLOADED, row, replaced=not created)
            return _view(row), created

    def _audit(self, s: Session, action: str, row: ProvenCaCertificate, **details: Any) -> None:
        audit.append(s, action, subject=row.sha256, details={**self.audit_scope, "name": row.name,
                                                             "certificateSubject": row.subject, **details})

    def get(self, name: str) -> CaCertificateView:
        with self.store.session() as s:
            return _view(self._get(s, name))

    def list(self) -> list[CaCertificateView]:
        with self.store.session() as s:
            return [_view(r) for r in s.scalars(self._select().order_by(self.model.name))]

    def find_by_thumbprint(self, sha256: str) -> CaCertificateView | None:
        """The certificate with this SHA-256 thumbprint (upper-case hex, as :func:`~opendps.pki.thumbprint` gives)."""
        with self.store.session() as s:
            row = s.scalars(self._select().where(self.model.sha256 == sha256.upper())).first()
            return _view(row) if row else None

    def verified(self, *, now: datetime | None = None) -> builtins.list[CaCertificateView]:
        """The proven certificates (still valid at ``now`` when given), by name: what attestation and hubs trust."""
        proven = self._verified.get("proven", self._load_verified)
        return proven if now is None else [v for v in proven if v.certificate.not_valid_after_utc > now]

    def _load_verified(self) -> builtins.list[CaCertificateView]:
        with self.store.session() as s:
            q = self._select().where(self.model.is_verified.is_(True)).order_by(self.model.name)
            return [_view(r) for r in s.scalars(q)]

    def delete(self, name: str, *, if_match: str | None = None) -> None:
        with self.store.session() as s:
            row = self._get(s, name)
            take_row(s, row, if_match, f"certificate {name!r}")  # of two writers with one etag, one goes on
            s.delete(row)
            self._audit(s, audit.CA_CERTIFICATE_DELETED, row, wasVerified=row.is_verified)

    def generate_verification_code(self, name: str, *, if_match: str | None) -> CaCertificateView:
        """A fresh code (the previous one stops working); needs the current etag."""
        if not if_match:
            raise PreconditionFailed("generating a verification code needs the certificate's etag (If-Match)")
        with self.store.session() as s:
            row = self._get(s, name)
            take_row(s, row, if_match, f"certificate {name!r}")  # of two writers with one etag, one goes on
            code = secrets.token_hex(24).upper()
            row.verification_code = code
            row.etag = new_etag()
            row.updated_at = datetime.now(UTC)
            s.flush()
            return _view(row, code)

    def verify(self, name: str, verification_certificate: str | bytes, *, if_match: str | None) -> CaCertificateView:
        """Proof of possession: a certificate with CN = current code, signed by the uploaded CA's key."""
        if not if_match:
            raise PreconditionFailed("verifying a certificate needs its etag (If-Match)")
        proof = load_certificate_text(verification_certificate, "verification certificate")
        now = datetime.now(UTC)
        with self.store.session() as s:
            row = self._get(s, name)
            take_row(s, row, if_match, f"certificate {name!r}")  # of two writers with one etag, one goes on
            if row.verification_code is None:
                raise InvalidInput(f"certificate {name!r} has no pending verification code: generate one first",
                                   error_code=VERIFICATION_FAILED)
            cns = [a.value for a in proof.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
            if cns != [row.verification_code]:
                shown = cns[0] if cns else "(none)"
                raise InvalidInput(f"verification certificate CN {shown!r} is not the current verification code",
                                   error_code=VERIFICATION_FAILED)
            if not proof.not_valid_before_utc <= now <= proof.not_valid_after_utc:
                raise InvalidInput("verification certificate is expired or not yet valid",
                                   error_code=VERIFICATION_FAILED)
            ca = x509.load_der_x509_certificate(row.der)
            try:
                proof.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
                raise InvalidInput(
                    f"verification certificate is not signed by the private key of certificate {name!r}",
                    error_code=VERIFICATION_FAILED) from exc
            row.is_verified = True
            row.verification_code = None  # one use
            row.etag = new_etag()
            row.updated_at = now
            s.flush()
            self._audit(s, audit.CA_CERTIFICATE_VERIFIED, row)
            return _view(row)
