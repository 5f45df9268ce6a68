"""Small X.509 hierarchies for tests, made with ``cryptography`` (fast EC keys), so each test owns its CAs."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class Ca:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()


def make_ca(cn: str, parent: Ca | None = None) -> Ca:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(parent.cert.subject if parent else _name(cn))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=365))
         .add_extension(x509.BasicConstraints(ca=True, path_length=None if parent is None else 0), critical=True)
         .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if parent is not None:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()), critical=False)
    return Ca(b.sign((parent or Ca(None, key)).key, hashes.SHA256()), key)  # type: ignore[arg-type]


Identity = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def make_leaf(cn: str, issuer: Ca | None, *, not_before: timedelta = timedelta(days=-1),
              not_after: timedelta = timedelta(days=30),
              eku: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH) -> Identity:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(issuer.cert.subject if issuer else _name(cn))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now + not_before).not_valid_after(now + not_after)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([eku]), critical=False))
    if issuer is not None:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False)
    return b.sign(issuer.key if issuer else key, hashes.SHA256()), key


def p384_csr(cn: str) -> bytes:
    """A DER PKCS#10 request for a fresh P-384 key, as a device makes one."""
    key = ec.generate_private_key(ec.SECP384R1())
    return (x509.CertificateSigningRequestBuilder().subject_name(_name(cn)).sign(key, hashes.SHA384())
            .public_bytes(serialization.Encoding.DER))
