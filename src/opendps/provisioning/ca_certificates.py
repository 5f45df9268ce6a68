"""CA certificates uploaded to DPS and proven by proof of possession (seed steps 4-5).

Flow: upload (etag, unverified) -> generate a verification code (needs the current etag) ->
the owner signs a certificate whose CN is that code with the CA's key -> verify (needs the etag).
Only the most recent code is accepted, and only once; every step changes the etag.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from sqlalchemy import select

from opendps.errors import Conflict, InvalidInput, NotFound, PreconditionFailed
from opendps.ids import etag_matches, new_etag
from opendps.store import DpsCertificate, Store

MAX_CERTIFICATE_TEXT = 64 * 1024
# Azure-style codes: 400004 invalid argument, 400011 bad verification certificate (unconfirmed numbering)
VERIFICATION_FAILED = 400011


@dataclass(frozen=True)
class DpsCertificateView:
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


def load_certificate_text(value: str | bytes, what: str = "certificate") -> x509.Certificate:
    """A certificate given as PEM text, base64 DER, or raw DER bytes."""
    if isinstance(value, str):
        if len(value) > MAX_CERTIFICATE_TEXT:
            raise InvalidInput(f"{what} is larger than {MAX_CERTIFICATE_TEXT} bytes")
        text = value.strip()
        if not text:
            raise InvalidInput(f"{what} is empty")
        if text.startswith("-----BEGIN"):
            data = text.encode()
        else:
            try:
                data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise InvalidInput(f"{what} is neither PEM nor base64 DER") from exc
    else:
        data = value
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise InvalidInput(f"{what} cannot be parsed as an X.509 certificate") from exc


def _view(row, code: str | None = None) -> DpsCertificateView:  # noqa: ANN001 - DpsCertificate | HubCertificate
    return DpsCertificateView(row.name, row.etag, x509.load_der_x509_certificate(row.der), row.subject, row.sha1,
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
    if not name or len(name) > 256 or any(c in name for c in "/\\?#") or name.strip() != name:
        raise InvalidInput(f"certificate name {name!r} is invalid: 1-256 characters, no '/', '\\\\', '?', '#'")
    return name


class CaCertificates:
    """The CA certificates of one owner: DPS (the default) or one hub (``model=HubCertificate, scope={"hub_id": n}``).

    Both follow the same proof-of-possession rules; only the table and its scoping column differ.
    """

    def __init__(self, store: Store, *, model: type = DpsCertificate, scope: dict | None = None):
        self.store = store
        self.model = model
        self.scope = dict(scope or {})

    def _select(self):  # noqa: ANN202
        q = select(self.model)
        for column, value in self.scope.items():
            q = q.where(getattr(self.model, column) == value)
        return q

    def _find(self, s, name: str):  # noqa: ANN001, ANN202
        return s.scalars(self._select().where(self.model.name == name)).first()

    def _get(self, s, name: str):  # noqa: ANN001, ANN202
        row = self._find(s, name)
        if row is None:
            raise NotFound(f"certificate {name!r} does not exist", error_code=404001)
        return row

    def upload(self, name: str, certificate: str | bytes, *, if_match: str | None = None) -> tuple[DpsCertificateView, bool]:
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
                raise Conflict(f"certificate {name!r} already exists; pass its etag (If-Match) to replace it",
                               error_code=409001)
            elif not etag_matches(if_match, row.etag):
                raise PreconditionFailed(f"ETag {if_match} does not match certificate {name!r}, as per RFC7232")
            row.der = der
            row.subject = cert.subject.rfc4514_string()
            row.sha1 = hashlib.sha1(der).hexdigest().upper()  # noqa: S324 - a thumbprint, as Azure shows it
            row.sha256 = hashlib.sha256(der).hexdigest().upper()
            row.not_after = cert.not_valid_after_utc
            row.is_verified = False
            row.verification_code = None
            row.etag = new_etag()
            row.updated_at = now
            s.flush()
            return _view(row), created

    def get(self, name: str) -> DpsCertificateView:
        with self.store.session() as s:
            return _view(self._get(s, name))

    def list(self) -> list[DpsCertificateView]:
        with self.store.session() as s:
            return [_view(r) for r in s.scalars(self._select().order_by(self.model.name))]

    def delete(self, name: str, *, if_match: str | None = None) -> None:
        with self.store.session() as s:
            row = self._get(s, name)
            if not etag_matches(if_match, row.etag):
                raise PreconditionFailed(f"ETag {if_match} does not match certificate {name!r}, as per RFC7232")
            s.delete(row)

    def generate_verification_code(self, name: str, *, if_match: str | None) -> DpsCertificateView:
        """A fresh code (the previous one stops working); needs the current etag."""
        if not if_match:
            raise PreconditionFailed("generating a verification code needs the certificate's etag (If-Match)")
        with self.store.session() as s:
            row = self._get(s, name)
            if not etag_matches(if_match, row.etag):
                raise PreconditionFailed(f"ETag {if_match} does not match certificate {name!r}, as per RFC7232")
            code = secrets.token_hex(24).upper()
            row.verification_code = code
            row.etag = new_etag()
            row.updated_at = datetime.now(UTC)
            s.flush()
            return _view(row, code)

    def verify(self, name: str, verification_certificate: str | bytes, *, if_match: str | None) -> DpsCertificateView:
        """Proof of possession: a certificate with CN = current code, signed by the uploaded CA's key."""
        if not if_match:
            raise PreconditionFailed("verifying a certificate needs its etag (If-Match)")
        proof = load_certificate_text(verification_certificate, "verification certificate")
        now = datetime.now(UTC)
        with self.store.session() as s:
            row = self._get(s, name)
            if not etag_matches(if_match, row.etag):
                raise PreconditionFailed(f"ETag {if_match} does not match certificate {name!r}, as per RFC7232")
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
            except (ValueError, TypeError, InvalidSignature) as exc:
                raise InvalidInput(
                    f"verification certificate is not signed by the private key of certificate {name!r}",
                    error_code=VERIFICATION_FAILED) from exc
            row.is_verified = True
            row.verification_code = None  # one use
            row.etag = new_etag()
            row.updated_at = now
            s.flush()
            return _view(row)
