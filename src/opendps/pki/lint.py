"""Pre-issuance lint with pkilint (the Boulder/cfssl zlint pattern): RFC 5280 for certificates and CRLs, RFC 6960
for OCSP responses.

The TBS is signed with a throw-away key first; that "pre-certificate" (pre-CRL, pre-response) is linted, and only a
clean one is signed by the CA key. pkilint costs ~2 ms per certificate, so leaves are linted once per shape
(:class:`opendps.pki.profiles.LeafTemplates`); CRLs are linted each time they are built (a few a day per CA), OCSP
responses once per shape (:mod:`opendps.pki.ocsp`). It can be switched off per engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pkilint ships no type information; this names what _validator builds
    from pkilint.validation import ValidatorContainer

_BLOCKING = {"WARNING", "ERROR", "FATAL"}


@dataclass(frozen=True)
class LintFinding:
    severity: str
    code: str
    message: str | None
    node: str

    def __str__(self) -> str:
        text = f"{self.severity} {self.code} at {self.node}"
        return f"{text}: {self.message}" if self.message else text


@lru_cache(maxsize=1)
def _validator() -> ValidatorContainer:
    # imported on first use: pkilint's ASN.1 tables take a while to load and most commands never lint
    from pkilint.pkix import certificate, extension, name

    return certificate.create_pkix_certificate_validator_container(
        certificate.create_decoding_validators(name.ATTRIBUTE_TYPE_MAPPINGS, extension.EXTENSION_MAPPINGS),
        [
            certificate.create_issuer_validator_container([]),
            certificate.create_validity_validator_container(),
            certificate.create_subject_validator_container([]),
            certificate.create_extensions_validator_container([]),
            certificate.create_spki_validator_container([]),
        ],
    )


@lru_cache(maxsize=1)
def _crl_validator() -> ValidatorContainer:
    """pkilint's RFC 5280 CRL linter as its ``lint_crl -t CRL -p PKIX`` builds it, plus the reason-code check
    (``unspecified`` is a WARNING: RFC 5280 5.3.1 says to leave the extension out instead)."""
    from pkilint import pkix
    from pkilint.pkix import crl, extension, name
    from pkilint.pkix.crl import crl_extension

    return crl.create_pkix_crl_validator_container(
        [pkix.create_attribute_decoder(name.ATTRIBUTE_TYPE_MAPPINGS),
         pkix.create_extension_decoder(extension.EXTENSION_MAPPINGS)],
        [crl.create_issuer_validator_container([]),
         crl.create_validity_validator_container([]),
         crl.create_extensions_validator_container([]),
         crl_extension.CrlReasonCodeValidator()],
    )


@lru_cache(maxsize=1)
def _ocsp_validator() -> ValidatorContainer:
    """pkilint's RFC 6960 OCSP response linter, as its ``lint_ocsp_response`` builds it."""
    from pkilint import pkix
    from pkilint.pkix import extension, name, ocsp

    return ocsp.create_pkix_ocsp_response_validator_container(
        [ocsp.create_response_decoder(), pkix.create_attribute_decoder(name.ATTRIBUTE_TYPE_MAPPINGS),
         pkix.create_extension_decoder(extension.EXTENSION_MAPPINGS)],
        [],
    )


def _findings(validator: ValidatorContainer, document: Any, blocking_only: bool) -> list[LintFinding]:
    findings: list[LintFinding] = []
    for result in validator.validate(document.root):
        for finding in result.finding_descriptions:
            if blocking_only and finding.finding.severity.name not in _BLOCKING:
                continue
            findings.append(LintFinding(finding.finding.severity.name, finding.finding.code,
                                        finding.message, result.node.path))
    return findings


def lint_certificate(der: bytes, *, blocking_only: bool = True) -> list[LintFinding]:
    """Findings of pkilint's RFC 5280 linter; by default only WARNING or worse."""
    from pkilint import loader

    validator = _validator()
    doc = loader.RFC5280CertificateDocumentLoader().load_der_document(der, "certificate")
    return _findings(validator, doc, blocking_only)


def lint_crl(der: bytes, *, blocking_only: bool = True) -> list[LintFinding]:
    """Findings of pkilint's RFC 5280 CRL linter; by default only WARNING or worse."""
    from pkilint import loader

    validator = _crl_validator()
    doc = loader.RFC5280CertificateListDocumentLoader().load_der_document(der, "crl")
    return _findings(validator, doc, blocking_only)


def lint_ocsp_response(der: bytes, *, blocking_only: bool = True) -> list[LintFinding]:
    """Findings of pkilint's RFC 6960 OCSP response linter; by default only WARNING or worse."""
    from pkilint import loader

    validator = _ocsp_validator()
    doc = loader.RFC6960OCSPResponseDocumentLoader().load_der_document(der, "ocsp-response")
    return _findings(validator, doc, blocking_only)


__all__ = ["LintFinding", "lint_certificate", "lint_crl", "lint_ocsp_response"]
