"""Certificate revocation lists (RFC 5280 section 5), linted, then signed through a :class:`Signer`.

Profile: v2; issuer = the CA's subject; thisUpdate and nextUpdate (the policy's CRL validity later); extensions CRL
number and authority key identifier (the CA's key identifier, which openssl matches against the CA certificate);
one entry per revoked certificate that has not expired, with its revocation date and a reasonCode — left out for
``unspecified``, as RFC 5280 5.3.1 asks. No invalidity dates, no delta CRLs, no issuing distribution point: each CRL
is the full list of one CA (leaves for an issuing CA, issuing CAs for a root).

Built like a certificate (:func:`opendps.pki.profiles.sign_builder`): ``cryptography`` builds it with a throw-away
key, pkilint checks that pre-CRL, the CA's signer signs its TBS bytes and :func:`opendps.pki.der.signed` assembles
the CRL, which is parsed back and verified against the CA key.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from opendps.pki import der
from opendps.pki.keys import Signer
from opendps.pki.lint import lint_crl
from opendps.pki.profiles import IssuanceRefused, LintRefused, throwaway_key

# the stored RFC 5280 CRLReason names (opendps.pki.issuance.REVOCATION_REASONS) as cryptography's flags
REASON_FLAGS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "cACompromise": x509.ReasonFlags.ca_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "certificateHold": x509.ReasonFlags.certificate_hold,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
    "aACompromise": x509.ReasonFlags.aa_compromise,
}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class RevokedEntry:
    """A revoked certificate as a CRL (or an OCSP answer) states it."""

    serial: int
    revoked_at: datetime
    reason: str  # an RFC 5280 CRLReason name, as stored

    @property
    def reason_flag(self) -> x509.ReasonFlags | None:
        """The reason to state: None for ``unspecified`` (RFC 5280 5.3.1: leave the reasonCode out)."""
        flag = REASON_FLAGS.get(self.reason, x509.ReasonFlags.unspecified)
        return None if flag is x509.ReasonFlags.unspecified else flag


def crl_number(this_update: datetime) -> int:
    """The CRL number for a CRL made at ``this_update``: its time in nanoseconds since the Unix epoch.

    Numbering by time is what Let's Encrypt's Boulder crl-updater does (``crlNumber = thisUpdate.UnixNano()``): every
    process on every host builds and signs the CRLs of the CAs it serves, so a shared counter would need coordination
    (a row to lock on each build). A timestamp needs none, and a CRL built later gets a larger number (RFC 5280
    5.2.3: monotonically increasing) as far as the hosts' clocks agree; 2^63 ns is the year 2262, well inside the 20
    octets RFC 5280 allows."""
    delta = this_update.astimezone(UTC) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


def _key_identifier(certificate: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        ski = x509.SubjectKeyIdentifier.from_public_key(certificate.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def build_crl(signer: Signer, issuer: x509.Certificate, revoked: Iterable[RevokedEntry], *, this_update: datetime,
              next_update: datetime, lint: bool = True) -> x509.CertificateRevocationList:
    """The CRL of ``issuer`` (whose key ``signer`` holds) listing ``revoked``, numbered by :func:`crl_number`.

    Pure: the caller gathers the entries (the CA's own records for an issuing CA, the registry's revoked issuing CAs
    for a root) and decides the times. A lint finding of WARNING or worse refuses it (:class:`LintRefused`)."""
    if issuer.public_key() != signer.public_key():
        raise IssuanceRefused("the CRL signer's key is not the key of the CA certificate it would sign for")
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject).last_update(this_update).next_update(next_update)
        .add_extension(x509.CRLNumber(crl_number(this_update)), critical=False)
        .add_extension(_key_identifier(issuer), critical=False)
    )
    for entry in sorted(revoked, key=lambda e: e.serial):
        item = x509.RevokedCertificateBuilder().serial_number(entry.serial).revocation_date(entry.revoked_at)
        if entry.reason_flag is not None:
            item = item.add_extension(x509.CRLReason(entry.reason_flag), critical=False)
        builder = builder.add_revoked_certificate(item.build())
    pre = builder.sign(throwaway_key(), hashes.SHA384())
    if lint:
        findings = lint_crl(pre.public_bytes(Encoding.DER))
        if findings:
            raise LintRefused(findings)
    tbs = pre.tbs_certlist_bytes
    crl = x509.load_der_x509_crl(der.signed(tbs, signer.sign(tbs)))
    # a wrong key or a broken signer must never publish a CRL
    signer.public_key().verify(crl.signature, tbs, ec.ECDSA(hashes.SHA384()))
    return crl


__all__ = ["REASON_FLAGS", "RevokedEntry", "build_crl", "crl_number"]
