"""Certificate profiles and the sign-after-lint assembly used for every certificate we make.

Assembly: build the certificate with a throw-away P-384 key (its TBS then carries
ecdsa-with-SHA384 and every field of the final certificate), lint that pre-certificate, then
have the CA's :class:`~opendps.pki.keys.Signer` sign the TBS bytes and wrap TBS, algorithm and
signature into the final DER. The CA key is never handed to ``cryptography``'s builder, which is
what lets an HSM-backed signer slot in.

Lint at the right cost: leaves of one profile differ only in their serial, dates, CN, key and key
identifier. :func:`skeleton` blanks exactly those values in the TBS; pkilint runs on the first leaf of
each skeleton (a profile change, another issuer, another CN length or time encoding is a new one) and
:class:`LintedShapes` remembers the clean ones. Every leaf still gets the cheap checks pkilint's verdict
on its skeleton cannot cover (the values themselves: dates in order, inside the issuer's, CN bounds).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections import OrderedDict
from datetime import UTC, datetime, timedelta
from functools import lru_cache

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from opendps.errors import InvalidInput
from opendps.pki import der
from opendps.pki.keys import Signer
from opendps.pki.lint import LintFinding, lint_certificate

ROOT_VALIDITY = timedelta(days=365 * 25)
ISSUING_VALIDITY = timedelta(days=365 * 5)
BACKDATE = timedelta(minutes=5)


class IssuanceRefused(InvalidInput):
    """The CA will not sign (lint finding, CA expired, policy without an issuing CA...)."""

    error_code = 400037


class LintRefused(IssuanceRefused):
    """Pre-issuance lint found a WARNING or worse; the certificate was not signed."""

    def __init__(self, findings: list[LintFinding]) -> None:
        self.findings = findings
        super().__init__("pre-issuance lint refused the certificate: " + "; ".join(str(f) for f in findings))


@lru_cache(maxsize=1)
def throwaway_key() -> ec.EllipticCurvePrivateKey:
    """Signs the to-be-signed copy that is linted; only its TBS bytes are kept. An EC key with SHA-384 gives the
    same TBS (signature algorithm ecdsa-with-SHA384) whatever its curve, and P-256 signs ~8x faster than P-384."""
    return ec.generate_private_key(ec.SECP256R1())


def random_serial() -> int:
    """A 128-bit random positive serial (top bit set, so always 16 significant octets)."""
    return secrets.randbits(128) | (1 << 127)


def _time_encoding(when: datetime) -> bytes:
    """The DER content of a certificate time: UTCTime before 2050, GeneralizedTime from then (RFC 5280 4.1.2.5)."""
    return when.strftime("%y%m%d%H%M%SZ" if when.year < 2050 else "%Y%m%d%H%M%SZ").encode()


def skeleton(pre: x509.Certificate) -> bytes | None:
    """SHA-256 of ``pre``'s TBS with its per-leaf values blanked (serial, dates, CN, public key, key identifier).

    Values are found in TBS order, each after the previous one, so a blank lands in its own field; their
    lengths and tags stay, so a skeleton covers one CN length and one time encoding. None when a value is
    not where the profile puts it (then the leaf is linted in full).
    """
    tbs = bytearray(pre.tbs_certificate_bytes)
    key = pre.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return None
    try:
        ski = pre.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        cns = pre.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except x509.ExtensionNotFound:
        return None
    if len(cns) != 1:
        return None
    serial = pre.serial_number.to_bytes((pre.serial_number.bit_length() + 7) // 8, "big")
    values = [serial, _time_encoding(pre.not_valid_before_utc), _time_encoding(pre.not_valid_after_utc),
              str(cns[0].value).encode(), key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint), ski]
    position = 0
    for value in values:
        at = tbs.find(value, position)
        if at < 0:
            return None
        tbs[at:at + len(value)] = bytes(len(value))
        position = at + len(value)
    return hashlib.sha256(bytes(tbs)).digest()


class LintedShapes:
    """Skeletons whose leaf pkilint passed (bounded, per process; thread-safe: issuance runs in worker threads)."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._clean: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, shape: object) -> bool:
        with self._lock:
            if shape not in self._clean:
                return False
            self._clean.move_to_end(shape)  # type: ignore[arg-type]
            return True

    def add(self, shape: bytes) -> None:
        with self._lock:
            self._clean[shape] = None
            while len(self._clean) > self.capacity:
                self._clean.popitem(last=False)

    def __len__(self) -> int:
        return len(self._clean)


def _check_values(pre: x509.Certificate) -> None:
    """What a skeleton cannot vouch for: the values pkilint would have judged in this very certificate."""
    problems = []
    if not pre.not_valid_before_utc < pre.not_valid_after_utc:
        problems.append("notAfter is not after notBefore")
    if not 0 < pre.serial_number < 1 << 159:
        problems.append("serial number is not a positive integer of at most 20 octets")
    for cn in pre.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        if not 1 <= len(str(cn.value)) <= 64:
            problems.append("subject CN is empty or longer than 64 characters (ub-common-name)")
    if problems:
        raise IssuanceRefused("pre-issuance check refused the certificate: " + "; ".join(problems))


def sign_builder(builder: x509.CertificateBuilder, signer: Signer, *, lint: bool = True,
                 shapes: LintedShapes | None = None) -> x509.Certificate:
    """Lint the builder's certificate, then sign it with ``signer`` and verify the result.

    With ``shapes``, pkilint runs once per :func:`skeleton` (the profile's first leaf of that shape) and every
    leaf gets :func:`_check_values`; without, every certificate is linted in full (CA certificates: rare).
    """
    pre = builder.sign(throwaway_key(), hashes.SHA384())
    if lint:
        _check_values(pre)
        shape = skeleton(pre) if shapes is not None else None
        if shapes is None or shape is None or shape not in shapes:
            findings = lint_certificate(pre.public_bytes(Encoding.DER))
            if findings:
                raise LintRefused(findings)
            if shapes is not None and shape is not None:
                shapes.add(shape)
    tbs = pre.tbs_certificate_bytes
    cert = x509.load_der_x509_certificate(der.signed(tbs, signer.sign(tbs)))
    # a wrong key or a broken signer must never produce a certificate
    signer.public_key().verify(cert.signature, tbs, ec.ECDSA(hashes.SHA384()))
    return cert




def _name(common_name: str, organization: str | None = "opendps") -> x509.Name:
    attrs = []
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                         encipher_only=False, decipher_only=False)


def root_ca(signer: Signer, common_name: str, *, now: datetime | None = None, lint: bool = True) -> x509.Certificate:
    """Self-signed namespace root: P-384, pathlen 1, long-lived."""
    now = now or datetime.now(UTC)
    subject = _name(common_name)
    pub = signer.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(pub)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(pub)
        .serial_number(random_serial())
        .not_valid_before(now - BACKDATE).not_valid_after(now + ROOT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    )
    return sign_builder(builder, signer, lint=lint)


def _crl_distribution_point(url: str) -> x509.CRLDistributionPoints:
    """One distribution point, a full name with one http URI (RFC 5280 4.2.1.13: no reasons, no cRLIssuer)."""
    return x509.CRLDistributionPoints([x509.DistributionPoint(full_name=[x509.UniformResourceIdentifier(url)],
                                                              relative_name=None, reasons=None, crl_issuer=None)])


def issuing_ca(signer: Signer, parent: x509.Certificate, parent_signer: Signer, common_name: str, *,
               now: datetime | None = None, lint: bool = True, crl_url: str | None = None) -> x509.Certificate:
    """Issuing CA under a namespace root: pathlen 0, ends no later than the root. ``crl_url``: where the root's
    CRL is published (the CRL Distribution Points extension; none when the installation publishes none)."""
    now = now or datetime.now(UTC)
    pub = signer.public_key()
    not_after = min(now + ISSUING_VALIDITY, parent.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(parent.subject).public_key(pub)
        .serial_number(random_serial())
        .not_valid_before(now - BACKDATE).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(parent_signer.public_key()),
                       critical=False)
    )
    if crl_url is not None:
        builder = builder.add_extension(_crl_distribution_point(crl_url), critical=False)
    return sign_builder(builder, parent_signer, lint=lint)


def leaf_builder(public_key: ec.EllipticCurvePublicKey, registration_id: str, issuer: x509.Certificate,
                 issuer_public_key: ec.EllipticCurvePublicKey, validity_days: int, *,
                 now: datetime | None = None, crl_url: str | None = None,
                 ocsp_url: str | None = None) -> x509.CertificateBuilder:
    """Operational certificate profile (see docs/architecture.md, "Leaf profile"). ``crl_url`` / ``ocsp_url``: the
    issuing CA's CRL (CRL Distribution Points) and OCSP responder (Authority Information Access, OCSP only: a device
    has its chain from DPS, so no caIssuers)."""
    now = now or datetime.now(UTC)
    not_before = now - BACKDATE
    not_after = min(not_before + timedelta(days=validity_days), issuer.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, registration_id)]))
        .issuer_name(issuer.subject).public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public_key), critical=False)
    )
    if crl_url is not None:
        builder = builder.add_extension(_crl_distribution_point(crl_url), critical=False)
    if ocsp_url is not None:
        builder = builder.add_extension(x509.AuthorityInformationAccess([x509.AccessDescription(
            AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp_url))]), critical=False)
    return builder
