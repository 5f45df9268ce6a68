"""The issuance engine: the "PKI" box of the seed's diagram (Boulder's CA).

The RA (provisioning) loads the policy's :class:`Issuer` from the registry and validates the CSR once;
``issue(issuer, csr, registration_id)`` re-holds that CSR to the issuer's policy, builds the leaf with
the policy's profile, lints it, signs it with the issuing CA's key and records the certificate in
``issued_certificates`` before returning the chain [leaf, issuing CA, root]. The engine reads no
policy or CA rows itself: what to sign with is handed to it.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import bindparam, insert, select
from sqlalchemy.orm import Session

from opendps.pki.csr import ValidatedCsr, allowed_curves, check_curve, validate_csr
from opendps.pki.keys import KeyStore
from opendps.pki.profiles import IssuanceRefused, LintedShapes, leaf_builder, sign_builder
from opendps.store import IssuedCertificate, Store, table_of

_ISSUED = table_of(IssuedCertificate)
_INSERT_CERTIFICATE = insert(_ISSUED)  # prepared once: one row per issuance
_ISSUED_BY_SHA256 = select(_ISSUED.c.serial, _ISSUED.c.policy_id, _ISSUED.c.registration_id, _ISSUED.c.not_after).where(
    _ISSUED.c.sha256 == bindparam("b_sha"))


@dataclass(frozen=True)
class IssuedChain:
    leaf: x509.Certificate
    issuing_ca: x509.Certificate
    root: x509.Certificate

    @property
    def certificates(self) -> list[x509.Certificate]:
        return [self.leaf, self.issuing_ca, self.root]

    def der_chain(self) -> list[bytes]:
        return [c.public_bytes(Encoding.DER) for c in self.certificates]

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

    @property
    def curves(self) -> set[str]:
        return allowed_curves(self.allow_p256)

    def validate(self, csr: bytes, registration_id: str) -> ValidatedCsr:
        """The RA's check of a CSR against this policy (no signature is made)."""
        return validate_csr(csr, registration_id, allow_p256=self.allow_p256)


@dataclass(frozen=True)
class IssuedRecord:
    """An issued certificate as recorded: who it was issued to, under which policy."""

    serial: str
    policy_id: int | None
    registration_id: str
    not_after: datetime


class IssuanceEngine:
    def __init__(self, store: Store, keys: KeyStore, *, lint: bool = True) -> None:
        self.store = store
        self.keys = keys
        self.lint = lint
        self.linted = LintedShapes()  # leaf shapes pkilint passed: the first leaf of each is linted in full

    def issue(self, issuer: Issuer, csr: ValidatedCsr | bytes, registration_id: str, *, now: datetime | None = None,
              session: Session | None = None) -> IssuedChain:
        """Sign a leaf for ``registration_id`` under ``issuer``, record it, return the chain.

        ``csr``: DER/PEM bytes (validated here), or what :meth:`Issuer.validate` returned for this registration
        moments ago — confirmed to be that check of this CSR (:meth:`ValidatedCsr.confirm`) and its curve held to
        ``issuer`` as it is now; its signature is not verified twice. With ``session`` the certificate row joins
        the caller's transaction (provisioning commits it together with the device and registration, so a failure
        leaves none of them behind).
        """
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
        builder = leaf_builder(checked.public_key, registration_id, issuer.certificate, signer.public_key(),
                               issuer.validity_days, now=now)
        leaf = sign_builder(builder, signer, lint=self.lint, shapes=self.linted)
        der = leaf.public_bytes(Encoding.DER)
        row = {"serial": format(leaf.serial_number, "x"), "sha256": hashlib.sha256(der).hexdigest(), "der": der,
               "policy_id": issuer.policy_id, "issuing_ca_id": issuer.ca_id, "registration_id": registration_id,
               "not_before": leaf.not_valid_before_utc, "not_after": leaf.not_valid_after_utc, "created_at": now}
        # in the caller's transaction when given (a duplicate serial fails it); an SQL statement, not the ORM's unit
        # of work, which costs more than it gives for one insert on every registration
        with contextlib.nullcontext(session) if session is not None else self.store.session() as s:
            s.connection().execute(_INSERT_CERTIFICATE, row)
        return IssuedChain(leaf, issuer.certificate, issuer.root)

    def find(self, certificate: x509.Certificate, *, session: Session | None = None) -> IssuedRecord | None:
        """The record of ``certificate`` if this service issued it (by its SHA-256, stored lower-case); one prepared
        statement, in ``session``'s transaction when given (the hub asks on every CONNECT)."""
        sha = hashlib.sha256(certificate.public_bytes(Encoding.DER)).hexdigest()
        with contextlib.nullcontext(session) if session is not None else self.store.session() as s:
            row = s.connection().execute(_ISSUED_BY_SHA256, {"b_sha": sha}).first()
        return IssuedRecord(row.serial, row.policy_id, row.registration_id, row.not_after) if row else None
