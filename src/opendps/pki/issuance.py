"""The issuance engine: the "PKI" box of the seed's diagram.

``issue(policy_id, csr, registration_id)`` re-checks the CSR, builds the leaf with the policy's
profile, lints it, signs it with the policy's active issuing CA and commits the certificate to the
store before returning the chain [leaf, issuing CA, root].
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import select

from opendps.errors import InvalidInput, NotFound
from opendps.pki.csr import ValidatedCsr, allowed_curves, validate_csr
from opendps.pki.keys import KeyStore
from opendps.pki.profiles import LintRefused, leaf_builder, sign_builder
from opendps.store import CertificateAuthority, IssuedCertificate, Policy, Store


class IssuanceRefused(InvalidInput):
    """The engine will not sign (lint finding, CA expired...)."""

    error_code = 400037


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


@dataclass
class _PolicyMaterial:
    policy_id: int
    validity_days: int
    allow_p256: bool
    issuing_ca_id: int
    issuing_key_id: str
    issuing_ca: x509.Certificate
    root: x509.Certificate


def active_issuing_ca(session, policy_id: int) -> CertificateAuthority | None:  # noqa: ANN001
    return session.scalars(
        select(CertificateAuthority)
        .where(CertificateAuthority.policy_id == policy_id, CertificateAuthority.status == "active")
        .order_by(CertificateAuthority.id.desc())
    ).first()


class IssuanceEngine:
    def __init__(self, store: Store, keys: KeyStore, *, lint: bool = True):
        self.store = store
        self.keys = keys
        self.lint = lint

    def _material(self, policy_id: int) -> _PolicyMaterial:
        with self.store.session() as s:
            policy = s.get(Policy, policy_id)
            if policy is None:
                raise NotFound(f"policy {policy_id} does not exist", error_code=404001)
            ica = active_issuing_ca(s, policy_id)
            if ica is None:
                raise IssuanceRefused(f"policy {policy.name!r} has no active issuing CA")
            root = s.get(CertificateAuthority, ica.parent_id)
            return _PolicyMaterial(policy.id, policy.validity_days, policy.allow_p256, ica.id, ica.key_id,
                                   x509.load_der_x509_certificate(ica.der), x509.load_der_x509_certificate(root.der))

    def check(self, policy_id: int, csr: bytes, registration_id: str) -> ValidatedCsr:
        """Validate ``csr`` against the policy without signing (the RA's early refusal)."""
        return validate_csr(csr, registration_id, allow_p256=self._material(policy_id).allow_p256)

    def issue(self, policy_id: int, csr: bytes, registration_id: str, *, now: datetime | None = None,
              session=None, checked: ValidatedCsr | None = None) -> IssuedChain:  # noqa: ANN001 - sqlalchemy Session
        """Validate ``csr`` (DER or PEM), sign a leaf under the policy, store it, return the chain.

        With ``session`` the certificate row joins the caller's transaction (provisioning commits it
        together with the device and registration, so a failure leaves none of them behind).
        ``checked``: what :meth:`check` returned for this same ``csr`` and registration id moments ago;
        its signature and subject are not verified twice, but its curve is held to the policy as it is now.
        """
        now = now or datetime.now(UTC)
        m = self._material(policy_id)
        if checked is None or checked.curve not in allowed_curves(m.allow_p256):
            checked = validate_csr(csr, registration_id, allow_p256=m.allow_p256)
        if m.issuing_ca.not_valid_after_utc <= now:
            raise IssuanceRefused("the policy's issuing CA has expired")
        signer = self.keys.signer(m.issuing_key_id)
        builder = leaf_builder(checked.public_key, registration_id, m.issuing_ca, signer.public_key(),
                               m.validity_days, now=now)
        try:
            leaf = sign_builder(builder, signer, lint=self.lint)
        except LintRefused as exc:
            raise IssuanceRefused(str(exc)) from exc
        der = leaf.public_bytes(Encoding.DER)
        row = IssuedCertificate(
            serial=format(leaf.serial_number, "x"), sha256=hashlib.sha256(der).hexdigest(), der=der,
            policy_id=m.policy_id, issuing_ca_id=m.issuing_ca_id, registration_id=registration_id,
            not_before=leaf.not_valid_before_utc, not_after=leaf.not_valid_after_utc, created_at=now,
        )
        if session is not None:
            session.add(row)
            session.flush()
        else:
            with self.store.session() as s:
                s.add(row)
        return IssuedChain(leaf, m.issuing_ca, m.root)
