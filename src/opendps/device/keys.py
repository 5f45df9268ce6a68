"""Device-side keys and CSRs for the certificate-management flow (wire spec §4.3).

The operational key is made on the device and never leaves it: DPS (or the hub) only sees a CSR.
The preview requires EC P-384 with SHA-384 and CN = registration id; P-256 exists because some
policies allow it (``allowP256``) and the C SDK samples use it. On the wire a CSR is base64 DER
without PEM armour.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from opendps.transport.sas import derive_device_key  # the SDK's name for it, kept

__all__ = [
    "Curve",
    "certificate_summary",
    "certificates_from_b64",
    "csr_b64",
    "derive_device_key",
    "generate_key",
    "key_to_pem",
    "load_certificates",
    "load_private_key",
    "make_csr",
    "new_key_and_csr",
    "public_keys_match",
    "renewal_due",
    "renewal_time",
]

Curve = Literal["P-384", "P-256"]
_CURVES: dict[str, ec.EllipticCurve] = {"P-384": ec.SECP384R1(), "P-256": ec.SECP256R1()}


def generate_key(curve: Curve = "P-384") -> ec.EllipticCurvePrivateKey:
    """A fresh EC key; P-384 is what the preview's policies accept by default."""
    try:
        return ec.generate_private_key(_CURVES[curve])
    except KeyError:
        raise ValueError(f"curve must be one of {sorted(_CURVES)}, got {curve!r}") from None


def make_csr(key: ec.EllipticCurvePrivateKey, registration_id: str) -> x509.CertificateSigningRequest:
    """PKCS#10 with exactly CN = registration id, signed with SHA-384 (the CA uses nothing else from it)."""
    if not registration_id:
        raise ValueError("registration id is empty")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, registration_id)])
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA384())


def csr_b64(csr: x509.CertificateSigningRequest) -> str:
    """The ``csr`` field of a register body: base64 of the DER, no PEM headers."""
    return base64.b64encode(csr.public_bytes(serialization.Encoding.DER)).decode("ascii")


def new_key_and_csr(registration_id: str, curve: Curve = "P-384") -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A new operational key and its CSR in wire form; keep the key until the chain arrives."""
    key = generate_key(curve)
    return key, csr_b64(make_csr(key, registration_id))


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM (the file is protected by its 0600 mode, as TLS stacks expect)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private_key(path: str | Path, password: bytes | None = None) -> ec.EllipticCurvePrivateKey:
    """Load an existing EC key from a PEM file (PKCS#8 or SEC1)."""
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=password)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: not an EC private key ({type(key).__name__})")
    return key


def load_certificates(path: str | Path) -> list[x509.Certificate]:
    """All certificates of a PEM file, in file order."""
    return x509.load_pem_x509_certificates(Path(path).read_bytes())


def certificates_from_b64(items: list[str]) -> list[x509.Certificate]:
    """``issuedCertificateChain`` / ``certificates`` (base64 DER strings) → certificates, order kept."""
    return [x509.load_der_x509_certificate(base64.b64decode(item)) for item in items]


def public_keys_match(key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> bool:
    """Whether ``certificate`` certifies ``key`` (checked before a new chain replaces the old one)."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return (key.public_key().public_bytes(serialization.Encoding.DER, spki)
            == certificate.public_key().public_bytes(serialization.Encoding.DER, spki))


def certificate_summary(cert: x509.Certificate) -> dict[str, str]:
    """What a device reports in its twin (``{"certificate": {...}}``) so the operator can watch expiry."""
    return {
        "validFrom": cert.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "validUntil": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "serialNumber": format(cert.serial_number, "X"),
        "thumbprint": cert.fingerprint(hashes.SHA256()).hex().upper(),
        "issuer": cert.issuer.rfc4514_string(),
    }


def renewal_time(cert: x509.Certificate, at_fraction: float = 0.8) -> datetime:
    """When to renew: at ``at_fraction`` of the validity (the service sends no reminder; wire spec §4.3 says ~80 %)."""
    if not 0 < at_fraction <= 1:
        raise ValueError("at_fraction must be in (0, 1]")
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + (end - start) * at_fraction


def renewal_due(cert: x509.Certificate, at_fraction: float = 0.8, now: datetime | None = None) -> bool:
    """Whether :func:`renewal_time` has passed (checked periodically by the device)."""
    return (now or datetime.now(UTC)) >= renewal_time(cert, at_fraction)
