"""Certificate profiles and the sign-after-lint assembly used for every certificate we make.

Assembly: build the certificate with a throw-away P-384 key (its TBS then carries
ecdsa-with-SHA384 and every field of the final certificate), lint that pre-certificate, then
have the CA's :class:`~opendps.pki.keys.Signer` sign the TBS bytes and wrap TBS, algorithm and
signature into the final DER. The CA key is never handed to ``cryptography``'s builder, which is
what lets an HSM-backed signer slot in.

Lint at the right cost: leaves of one profile differ only in their serial, dates, CN, key and key
identifier. The first leaf of each shape (its profile, issuer, URLs and the lengths of those values) is
built as above and linted in full; :class:`LeafTemplates` keeps its TBS with the places of the values,
and a later leaf of the shape is that TBS with its own values written in — no builder, no throw-away
signature, no pkilint: byte for byte what the builder makes (tests/test_pki.py holds them equal). Every
leaf still gets the cheap checks pkilint's verdict on its shape cannot cover (the values themselves:
dates in order, serial and CN bounds), and its signature is verified with the issuer's key.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Generic, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from opendps.errors import InvalidInput
from opendps.pki import der
from opendps.pki.keys import Signer, SoftwareSigner
from opendps.pki.lint import LintFinding, lint_certificate

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
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


def leaf_validity(now: datetime, validity_days: int, issuer: x509.Certificate) -> tuple[datetime, datetime]:
    """A leaf's notBefore and notAfter: backdated a little for clocks behind ours, never past the issuer's end."""
    not_before = now - BACKDATE
    return not_before, min(not_before + timedelta(days=validity_days), issuer.not_valid_after_utc)


def leaf_values(serial: int, not_before: datetime, not_after: datetime, common_name: str,
                public_key: ec.EllipticCurvePublicKey) -> tuple[bytes, ...]:
    """A leaf's own values as they stand in its TBS, in TBS order: serial, notBefore, notAfter, CN, public key,
    subject key identifier (the rest of a leaf is its shape's)."""
    point = public_key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    return (serial.to_bytes((serial.bit_length() + 7) // 8, "big"), _time_encoding(not_before),
            _time_encoding(not_after), common_name.encode(), point, hashlib.sha1(point).digest())  # noqa: S324 - RFC 5280 4.2.1.2 (1)


class LeafTemplate:
    """A linted leaf's TBS and where its own values stand in it (offset, length), found in TBS order, each after
    the one before, so each lands in its own field."""

    __slots__ = ("tbs", "places")

    def __init__(self, tbs: bytes, places: tuple[tuple[int, int], ...]) -> None:
        self.tbs, self.places = tbs, places

    @classmethod
    def of(cls, tbs: bytes, values: tuple[bytes, ...]) -> LeafTemplate | None:
        """The template of ``tbs``, a leaf holding ``values``; None when a value is not where the profile puts it."""
        places, position = [], 0
        for value in values:
            at = tbs.find(value, position)
            if at < 0:
                return None
            places.append((at, len(value)))
            position = at + len(value)
        return cls(tbs, tuple(places))

    def fill(self, values: tuple[bytes, ...]) -> bytes:
        """The TBS of the leaf holding ``values`` (of the template's lengths: they are part of its shape)."""
        tbs = bytearray(self.tbs)
        for (at, size), value in zip(self.places, values, strict=True):
            if len(value) != size:
                raise ValueError("a leaf value of another length is another shape")
            tbs[at:at + size] = value
        return bytes(tbs)


class Bounded(Generic[K, V]):
    """A map of at most ``capacity`` entries, the least recently used out first (per process; thread-safe: issuance
    and status answers run in the domain threads)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def add(self, key: K, value: V) -> None:
        with self._lock:
            self._entries[key] = value
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class LeafTemplates(Bounded[Hashable, LeafTemplate]):
    """Templates of linted leaves by shape."""

    def __init__(self, capacity: int = 1024) -> None:
        super().__init__(capacity)


class LintedShapes(Bounded[bytes, bool]):
    """Skeletons of OCSP responses pkilint passed (:mod:`opendps.pki.ocsp`)."""

    def __init__(self, capacity: int = 4096) -> None:
        super().__init__(capacity)

    def __contains__(self, shape: object) -> bool:
        return isinstance(shape, bytes) and self.get(shape) is not None

    def add(self, key: bytes, value: bool = True) -> None:
        super().add(key, value)


def check_leaf_values(serial: int, not_before: datetime, not_after: datetime, common_names: Sequence[str]) -> None:
    """What a shape cannot vouch for: the values pkilint would have judged in this very certificate."""
    problems = []
    if not not_before < not_after:
        problems.append("notAfter is not after notBefore")
    if not 0 < serial < 1 << 159:
        problems.append("serial number is not a positive integer of at most 20 octets")
    if any(not 1 <= len(cn) <= 64 for cn in common_names):
        problems.append("subject CN is empty or longer than 64 characters (ub-common-name)")
    if problems:
        raise IssuanceRefused("pre-issuance check refused the certificate: " + "; ".join(problems))


def _check_values(pre: x509.Certificate) -> None:
    check_leaf_values(pre.serial_number, pre.not_valid_before_utc, pre.not_valid_after_utc,
                      [str(cn.value) for cn in pre.subject.get_attributes_for_oid(NameOID.COMMON_NAME)])


def sign_builder(builder: x509.CertificateBuilder, signer: Signer, *, lint: bool = True) -> x509.Certificate:
    """Lint the builder's certificate in full, then sign it with ``signer`` and verify the result (CA certificates,
    and the first leaf of each shape: :func:`sign_leaf`)."""
    return sign_tbs(linted_tbs(builder, lint=lint), signer)


def linted_tbs(builder: x509.CertificateBuilder, *, lint: bool = True) -> bytes:
    """The TBS of the builder's certificate, signed with the throw-away key and linted in full (with ``lint``)."""
    pre = builder.sign(throwaway_key(), hashes.SHA384())
    if lint:
        _check_values(pre)
        findings = lint_certificate(pre.public_bytes(Encoding.DER))
        if findings:
            raise LintRefused(findings)
    return pre.tbs_certificate_bytes


def sign_tbs(tbs: bytes, signer: Signer, *, verify_with: ec.EllipticCurvePublicKey | None = None,
             verify: bool = True) -> x509.Certificate:
    """The certificate of ``tbs`` signed by ``signer``; with ``verify``, its signature verified with ``verify_with``
    (the issuing certificate's key: a CA key that is not its certificate's is caught) or else the signer's own."""
    signature = signer.sign(tbs)
    if verify:  # a wrong key or a broken signer must never produce a certificate
        (verify_with or signer.public_key()).verify(signature, tbs, ec.ECDSA(hashes.SHA384()))
    return x509.load_der_x509_certificate(der.signed(tbs, signature))


def verifies_each_signature(signer: Signer) -> bool:
    """Whether every leaf ``signer`` makes is verified, or only the first of each shape.

    Why: a signature made outside this process (a PKCS#11 token: its hardware, driver, or a network HSM) is
    verified every time, as Go's ``x509.CreateCertificate`` (hence cfssl, step-ca, Boulder) verifies each. A key
    in process memory signs with OpenSSL's ECDSA, which this process's first signature of each shape has shown
    to agree with the issuing certificate's key; verifying each later P-384 signature again cost more than
    signing it (~0.6 ms a registration, a fifth of its CPU) to catch only a fault in OpenSSL's arithmetic."""
    return not isinstance(signer, SoftwareSigner)


def sign_leaf(templates: LeafTemplates, shape: Hashable, build: Callable[..., x509.CertificateBuilder],
              public_key: ec.EllipticCurvePublicKey, registration_id: str, issuer: x509.Certificate, signer: Signer,
              validity_days: int, *, now: datetime, lint: bool = True, **urls: str | None) -> x509.Certificate:
    """An operational certificate of the profile ``build`` (:func:`leaf_builder`'s signature) for ``public_key``,
    signed by ``signer`` under ``issuer``.

    ``shape``: what the leaf's TBS depends on besides its own values (:func:`leaf_values`), as the caller knows it
    (the issuing CA and its key, the URLs, ``build`` itself): with the values' lengths, the key of its template.
    The first leaf of a shape is built and linted in full and gives the template (checked against a second leaf
    built with other values); the others are the template filled in."""
    serial = random_serial()
    not_before, not_after = leaf_validity(now, validity_days, issuer)
    values = leaf_values(serial, not_before, not_after, registration_id, public_key)
    check_leaf_values(serial, not_before, not_after, [registration_id])
    key = (shape, lint, tuple(len(v) for v in values))
    template = templates.get(key)
    if template is not None:
        return sign_tbs(template.fill(values), signer, verify=verifies_each_signature(signer))
    tbs = linted_tbs(build(public_key, registration_id, issuer, signer.public_key(), validity_days, now=now,
                           serial=serial, **urls), lint=lint)
    # the shape's first leaf: its signature verified with the issuing certificate's key before the shape gets a
    # template, so later leaves of the shape come from a key shown to be the issuer's
    issuer_key = issuer.public_key()
    leaf = sign_tbs(tbs, signer, verify_with=issuer_key if isinstance(issuer_key, ec.EllipticCurvePublicKey) else None)
    template = LeafTemplate.of(tbs, values)
    if template is not None and template.fill(values) == tbs:
        # a second leaf of the shape built by the profile, with another serial, dates and CN of the same length: the
        # places hold exactly the values
        probe_serial, probe_now = random_serial(), now + timedelta(seconds=1)
        probe_cn = ("1" if registration_id[:1] == "0" else "0") * len(registration_id)
        probe_tbs = build(public_key, probe_cn, issuer, signer.public_key(), validity_days, now=probe_now,
                          serial=probe_serial, **urls).sign(throwaway_key(), hashes.SHA384()).tbs_certificate_bytes
        probe = leaf_values(probe_serial, *leaf_validity(probe_now, validity_days, issuer), probe_cn, public_key)
        if tuple(map(len, probe)) == key[2] and template.fill(probe) == probe_tbs:
            templates.add(key, template)
    return leaf


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
                 ocsp_url: str | None = None, serial: int | None = None) -> x509.CertificateBuilder:
    """Operational certificate profile (see docs/architecture.md, "Leaf profile"). ``crl_url`` / ``ocsp_url``: the
    issuing CA's CRL (CRL Distribution Points) and OCSP responder (Authority Information Access, OCSP only: a device
    has its chain from DPS, so no caIssuers). ``serial``: a new random one unless given."""
    not_before, not_after = leaf_validity(now or datetime.now(UTC), validity_days, issuer)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, registration_id)]))
        .issuer_name(issuer.subject).public_key(public_key)
        .serial_number(serial if serial is not None else random_serial())
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
