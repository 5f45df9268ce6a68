"""The CA side: key custody, certificate profiles, CSR validation, pre-issuance lint, issuance, and the
certificate helpers every package shares (reading, thumbprints, device chain validation, proof of possession).

Public surface: :class:`KeyStore` / :class:`Signer` / :class:`KeyCustody` (custody: software or a PKCS#11 token,
:mod:`opendps.pki.pkcs11`), :class:`IssuanceEngine` + :class:`Issuer`
(issue a leaf), :func:`validate_csr`, the profile builders :func:`root_ca` / :func:`issuing_ca`,
:func:`lint_certificate` / :func:`lint_crl` / :func:`lint_ocsp_response`, :class:`CaCertificates` (uploaded CA
certificates proven by proof of possession); certificate status: :class:`Publication` (where CRLs and OCSP are
served), :class:`StatusResponder` (each CA's CRL and the OCSP answers, cached), :func:`build_crl` and
:class:`PublishedCa` / :class:`RevokedEntry` (what the registry hands over);
TPM attestation's server side (:mod:`opendps.pki.tpm`): :class:`EndorsementKey` / :class:`StorageRootKey` (parsed TPM2B_PUBLICs),
:func:`make_challenge` (the ``authenticationKey`` of Azure's TPM flow), :func:`registration_id_from_ek`.
pki owns ``wrapped_keys`` and ``issued_certificates``.
"""

from opendps.pki.certificates import (
    device_chain_verifier,
    issued_by,
    load_certificate_text,
    serial_hex,
    thumbprint,
    unreadable,
)
from opendps.pki.crl import RevokedEntry, build_crl
from opendps.pki.csr import CsrRejected, ValidatedCsr, decode_csr_text, validate_csr
from opendps.pki.issuance import (
    REVOCATION_REASONS,
    IssuanceEngine,
    IssuedCertificateView,
    IssuedChain,
    IssuedRecord,
    Issuer,
    revocation_reason,
)
from opendps.pki.keys import KeyCustody, KeyStore, Signer, SoftwareSigner, load_master_key
from opendps.pki.lint import LintFinding, lint_certificate, lint_crl, lint_ocsp_response
from opendps.pki.possession import CaCertificates, CaCertificateView
from opendps.pki.profiles import IssuanceRefused, LintRefused, issuing_ca, root_ca, sign_builder
from opendps.pki.status import Publication, PublishedCa, StatusDocument, StatusResponder
from opendps.pki.tpm import EndorsementKey, StorageRootKey, TpmChallenge, make_challenge, registration_id_from_ek

__all__ = [
    "REVOCATION_REASONS",
    "CaCertificateView",
    "CaCertificates",
    "CsrRejected",
    "EndorsementKey",
    "IssuanceEngine",
    "IssuanceRefused",
    "IssuedCertificateView",
    "IssuedChain",
    "IssuedRecord",
    "Issuer",
    "KeyCustody",
    "KeyStore",
    "LintFinding",
    "LintRefused",
    "Publication",
    "PublishedCa",
    "RevokedEntry",
    "Signer",
    "SoftwareSigner",
    "StatusDocument",
    "StatusResponder",
    "StorageRootKey",
    "TpmChallenge",
    "ValidatedCsr",
    "build_crl",
    "decode_csr_text",
    "device_chain_verifier",
    "issued_by",
    "issuing_ca",
    "lint_certificate",
    "lint_crl",
    "lint_ocsp_response",
    "load_certificate_text",
    "load_master_key",
    "make_challenge",
    "registration_id_from_ek",
    "revocation_reason",
    "root_ca",
    "serial_hex",
    "sign_builder",
    "thumbprint",
    "unreadable",
    "validate_csr",
]
