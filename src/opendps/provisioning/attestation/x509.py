"""X.509 attestation: the client certificate chain sent in the TLS handshake.

The TLS layer accepts any chain and hands it over (docs/architecture.md, "TLS"); this module
decides. CN must equal the registration id (<= 64 characters). An individual enrollment pins the
device certificate (primary or secondary, by SHA-256). Otherwise the enrollment group of the
nearest CA first decides: the sent intermediates in order, then verified DPS CA certificates that
issued the last one, up to a root. The chain is then path-validated (cryptography's verifier,
RFC 5280) from the leaf to that group's CA as the only trust anchor.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store, VerificationError
from sqlalchemy import select

from opendps.provisioning.attestation import AttestationFailed, AttestedIdentity, DeviceCredentials
from opendps.provisioning.enrollments import INDIVIDUAL, Enrollments, certificate_info
from opendps.store import DpsCertificate
from opendps.store import Store as DataStore

MAX_CN = 64
MAX_DEPTH = 6
# device certificates carry no SAN (the CN is the identity): relax only that rule of the EE profile
_EE_POLICY = ExtensionPolicy.webpki_defaults_ee().may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)


def sha256(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest().upper()


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    if child.issuer != parent.subject:
        return False
    try:
        child.verify_directly_issued_by(parent)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def check_client_certificate(leaf: x509.Certificate, registration_id: str, now: datetime) -> None:
    """The device certificate itself: identity, validity window and usage for TLS client auth."""
    cns = [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if len(cns) != 1:
        raise AttestationFailed("device certificate must have exactly one subject CN (the registration id)")
    if cns[0] != registration_id:
        raise AttestationFailed(f"device certificate CN {cns[0]!r} does not match registration id {registration_id!r}")
    if len(registration_id) > MAX_CN:
        raise AttestationFailed(f"registration id is longer than {MAX_CN} characters, the limit for X.509 attestation")
    if now < leaf.not_valid_before_utc:
        raise AttestationFailed(f"device certificate is not yet valid (notBefore {leaf.not_valid_before_utc.isoformat()})")
    if now > leaf.not_valid_after_utc:
        raise AttestationFailed(f"device certificate has expired (notAfter {leaf.not_valid_after_utc.isoformat()})")
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in eku and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku:
        raise AttestationFailed("device certificate's extended key usage does not allow TLS client authentication")
    try:
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    if ku is not None and not ku.digital_signature:
        raise AttestationFailed("device certificate's key usage lacks digitalSignature")


class X509Attestation:
    name = "x509"

    def __init__(self, enrollments: Enrollments, store: DataStore):
        self.enrollments = enrollments
        self.store = store

    def applies(self, credentials: DeviceCredentials) -> bool:
        return bool(credentials.client_chain)

    def authenticate(self, credentials: DeviceCredentials, *, now: datetime) -> AttestedIdentity:
        chain = credentials.client_chain
        leaf = chain[0]
        rid = credentials.registration_id
        check_client_certificate(leaf, rid, now)
        info = certificate_info(leaf)
        individual = self.enrollments.find(INDIVIDUAL, rid)
        if individual is not None:
            if individual.attestation_type != "x509":
                raise AttestationFailed(f"enrollment {individual.enrollment_id!r} does not use X.509 attestation")
            pinned = individual.document["attestation"]["x509"]["clientCertificates"]
            prints = tuple(pinned[s]["info"]["sha256Thumbprint"] if s in pinned else None for s in ("primary", "secondary"))
            if info["sha256Thumbprint"] not in prints:
                raise AttestationFailed(f"device certificate is not the one enrolled for {individual.enrollment_id!r}")
            return AttestedIdentity(rid, "x509", individual, "selfSigned", thumbprints=prints,
                                    details={"x509": {"certificateInfo": info}})
        return self._group(chain, rid, info, now)

    def _group(self, chain: list[x509.Certificate], rid: str, info: dict, now: datetime) -> AttestedIdentity:
        with self.store.session() as s:
            verified = list(s.scalars(select(DpsCertificate).where(DpsCertificate.is_verified.is_(True))))
        by_sha = {}
        for row in verified:
            by_sha.setdefault(row.sha256, []).append(row)
        loaded = {row.name: x509.load_der_x509_certificate(row.der) for row in verified}
        path = list(chain[1:MAX_DEPTH])
        top = path[-1] if path else chain[0]
        while len(path) < MAX_DEPTH and top.issuer != top.subject:
            parent = next((loaded[r.name] for r in verified if _issued_by(top, loaded[r.name])), None)
            if parent is None:
                break
            path.append(parent)
            top = parent
        for position, ca in enumerate(path):
            rows = by_sha.get(sha256(ca), [])
            for row in rows:
                groups = self.enrollments.groups_on_certificate(row.name)
                if not groups:
                    continue
                group = groups[0]
                self._verify_path(chain[0], chain[1:position + 1], ca, row.name, now)
                return AttestedIdentity(rid, "x509", group, "certificateAuthority", details={"x509": {
                    "certificateInfo": info, "enrollmentGroupId": group.enrollment_id,
                    "signingCertificateInfo": certificate_info(ca)}})
        raise AttestationFailed("device certificate does not chain to a verified CA certificate of any enrollment group, "
                                "and no individual enrollment matches it")

    @staticmethod
    def _verify_path(leaf: x509.Certificate, intermediates: list[x509.Certificate], anchor: x509.Certificate,
                     name: str, now: datetime) -> None:
        verifier = (PolicyBuilder().store(Store([anchor])).time(now)
                    .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=_EE_POLICY)
                    .build_client_verifier())
        try:
            verifier.verify(leaf, intermediates)
        except VerificationError as exc:
            raise AttestationFailed(f"device certificate chain does not validate to CA certificate {name!r}: {exc}") from exc
