"""Pre-issuance lint with pkilint's RFC 5280 certificate linter (the Boulder/cfssl zlint pattern).

The TBS is signed with a throw-away key first; that "pre-certificate" is linted, and only a clean
one is signed by the CA key. pkilint costs ~2 ms per certificate, so leaves are linted once per shape
(:func:`opendps.pki.profiles.skeleton`); it can be switched off per engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

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


def lint_certificate(der: bytes, *, blocking_only: bool = True) -> list[LintFinding]:
    """Findings of pkilint's RFC 5280 linter; by default only WARNING or worse."""
    from pkilint import loader

    validator = _validator()
    doc = loader.RFC5280CertificateDocumentLoader().load_der_document(der, "certificate")
    results = validator.validate(doc.root)
    findings: list[LintFinding] = []
    for result in results:
        for finding in result.finding_descriptions:
            if blocking_only and finding.finding.severity.name not in _BLOCKING:
                continue
            findings.append(LintFinding(finding.finding.severity.name, finding.finding.code,
                                        finding.message, result.node.path))
    return findings


__all__ = ["LintFinding", "lint_certificate"]
