"""The CA side: key custody, certificate profiles, CSR validation, pre-issuance lint, issuance.

Public surface: :class:`KeyStore` / :class:`Signer` (custody), :class:`IssuanceEngine` (issue a leaf),
:func:`validate_csr`, the profile builders :func:`root_ca` / :func:`issuing_ca`, :func:`lint_certificate`.
"""

from opendps.pki.csr import CsrRejected, ValidatedCsr, decode_csr_text, validate_csr
from opendps.pki.issuance import IssuanceEngine, IssuanceRefused, IssuedChain, active_issuing_ca
from opendps.pki.keys import KeyStore, Signer, SoftwareSigner, load_master_key
from opendps.pki.lint import LintFinding, lint_certificate
from opendps.pki.profiles import LintRefused, issuing_ca, root_ca, sign_builder

__all__ = [
    "CsrRejected",
    "IssuanceEngine",
    "IssuanceRefused",
    "IssuedChain",
    "KeyStore",
    "LintFinding",
    "LintRefused",
    "Signer",
    "SoftwareSigner",
    "ValidatedCsr",
    "active_issuing_ca",
    "decode_csr_text",
    "issuing_ca",
    "lint_certificate",
    "load_master_key",
    "root_ca",
    "sign_builder",
    "validate_csr",
]
