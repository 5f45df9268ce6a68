"""CSR validation: the CA's own check of what a device asks for, whatever the RA decided.

Nothing from the CSR is copied into the certificate except the public key; the subject CN must
already equal the registration id, so it is re-created, not copied.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from opendps.errors import InvalidInput, PayloadTooLarge

MAX_CSR_BYTES = 8 * 1024
MAX_CN_LENGTH = 64
# error codes (Azure uses 400004 invalid argument / 400037 backend CSR validation for the hub path)
CSR_INVALID = 400037


class CsrRejected(InvalidInput):
    error_code = CSR_INVALID


# Seals a check result to the CSR it was made for. Per process: the RA's check and the CA's signature happen in
# the same process moments apart, and a seal must never outlive it (nothing persists or ships a ValidatedCsr).
_SEAL_KEY = secrets.token_bytes(32)


def _seal(der: bytes, registration_id: str, curve: str) -> bytes:
    message = b"\0".join((hashlib.sha256(der).digest(), registration_id.encode(), curve.encode()))
    return hmac.new(_SEAL_KEY, message, hashlib.sha256).digest()


@dataclass(frozen=True)
class ValidatedCsr:
    """A CSR that passed :func:`validate_csr` for ``registration_id``.

    The CA does not take the RA's word for it (Boulder's CA re-checks what the RA sends): :meth:`confirm` holds
    the seal :func:`validate_csr` put over the CSR's bytes, the registration id and the curve against the fields,
    and the key against the CSR's own — so a check result made for another CSR, another device, or assembled by
    hand gets no signature, while the costly signature verification is not repeated.
    """

    csr: x509.CertificateSigningRequest
    public_key: ec.EllipticCurvePublicKey
    curve: str
    registration_id: str
    seal: bytes = field(default=b"", repr=False)

    def confirm(self, registration_id: str) -> None:
        """Raise CsrRejected unless this is :func:`validate_csr`'s own result for this CSR and ``registration_id``."""
        if self.registration_id != registration_id:
            raise CsrRejected(f"CSR was validated for {self.registration_id!r}, not {registration_id!r}")
        expected = _seal(self.csr.public_bytes(Encoding.DER), registration_id, self.curve)
        if not hmac.compare_digest(self.seal, expected):
            raise CsrRejected("the CSR check result does not belong to this CSR and registration id")
        if self.public_key != self.csr.public_key() or self.public_key.curve.name != self.curve:
            raise CsrRejected("the CSR check result names another key than the CSR's")


def decode_csr_text(value: str) -> bytes:
    """The wire form: base64 DER without PEM armour (PEM text accepted too)."""
    value = value.strip()
    if value.startswith("-----BEGIN"):
        if not value.isascii():  # PEM is ASCII (RFC 7468); a lone surrogate could not even be encoded
            raise CsrRejected("PEM CSR text must be ASCII")
        return value.encode()
    if len(value) > MAX_CSR_BYTES * 2:
        raise PayloadTooLarge(f"CSR is larger than {MAX_CSR_BYTES} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError as exc:
        raise CsrRejected("CSR is not valid base64 (expected base64 DER PKCS#10 without PEM headers)") from exc


def allowed_curves(allow_p256: bool) -> set[str]:
    """The curves a policy accepts for operational keys: P-384, and P-256 where the policy allows it."""
    return {"secp384r1"} | ({"secp256r1"} if allow_p256 else set())


def check_curve(curve: str, *, allow_p256: bool) -> None:
    """Refuse an operational key on a curve the policy does not accept."""
    allowed = allowed_curves(allow_p256)
    if curve not in allowed:
        names = {"secp384r1": "P-384", "secp256r1": "P-256", "secp521r1": "P-521"}
        wanted = " or ".join(sorted(names[c] for c in allowed))
        raise CsrRejected(f"CSR key curve {names.get(curve, curve)} is not allowed by the policy (needs {wanted})")


def _load_csr(data: bytes) -> x509.CertificateSigningRequest:
    if len(data) > MAX_CSR_BYTES + (MAX_CSR_BYTES // 2 if data.lstrip().startswith(b"-----BEGIN") else 0):
        raise CsrRejected(f"CSR is larger than {MAX_CSR_BYTES} bytes")
    is_pem = data.lstrip().startswith(b"-----BEGIN")
    if is_pem and (data.count(b"-----BEGIN") != 1 or not data.rstrip().endswith(b"-----")):
        # as DER with bytes after it is refused: one PEM block and nothing after it, not the first block of several
        raise CsrRejected("PEM CSR text must be exactly one CERTIFICATE REQUEST block, with nothing after it")
    try:
        csr = x509.load_pem_x509_csr(data) if is_pem else x509.load_der_x509_csr(data)
    except x509.InvalidVersion as exc:  # not a ValueError
        raise CsrRejected(f"CSR version {exc.parsed_version} is not PKCS#10's v1 (0)") from exc
    except ValueError as exc:
        raise CsrRejected("CSR cannot be parsed as PKCS#10 (DER or PEM)") from exc
    if len(csr.public_bytes(Encoding.DER)) > MAX_CSR_BYTES:
        raise CsrRejected(f"CSR is larger than {MAX_CSR_BYTES} bytes")
    return csr


def validate_csr(data: bytes, registration_id: str, *, allow_p256: bool = False) -> ValidatedCsr:
    """Parse and check a CSR (DER or PEM); raise CsrRejected naming the first problem found."""
    if not 1 <= len(registration_id) <= MAX_CN_LENGTH:
        raise CsrRejected(f"registration id is {len(registration_id)} characters; a certificate CN holds "
                          f"1-{MAX_CN_LENGTH} (RFC 5280 ub-common-name)")
    csr = _load_csr(data)
    try:
        key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # an unknown key type or curve: UnsupportedAlgorithm
        raise CsrRejected(f"CSR public key is of an unsupported type: {str(exc)[:120]}") from exc
    if isinstance(key, rsa.RSAPublicKey):
        raise CsrRejected(f"CSR key is RSA-{key.key_size}; operational certificates need an EC P-384 key")
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CsrRejected("CSR key is not an EC key; operational certificates need an EC P-384 key")
    curve = key.curve.name
    check_curve(curve, allow_p256=allow_p256)
    try:
        signature_ok = csr.is_signature_valid
    except Exception:  # noqa: BLE001 - unsupported signature algorithm
        signature_ok = False
    if not signature_ok:
        raise CsrRejected("CSR signature does not verify (no proof of possession of the private key)")
    try:  # cryptography parses the subject when first asked for it
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError as exc:  # an attribute value not of its type (a CN that is an INTEGER, UTF8String not UTF-8)
        raise CsrRejected("CSR subject cannot be parsed (an attribute value is not of its type)") from exc
    if len(cns) != 1:
        raise CsrRejected(f"CSR subject must have exactly one CN, found {len(cns)}")
    cn = str(cns[0].value)
    # registration ids are case-insensitive ASCII; the leaf gets the canonical one. ASCII only on the CN's side too:
    # str.lower() folds some other letters onto ASCII ones (U+212A KELVIN SIGN is "k"), which no id holds
    if not cn.isascii() or cn.lower() != registration_id.lower():
        raise CsrRejected(f"CSR subject CN {ascii(cn)} does not match the registration id {registration_id!r}")
    try:  # parsed when first asked for too: each requested extension's value, by its type
        bc = csr.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        bc = None
    except x509.DuplicateExtension as exc:
        raise CsrRejected(f"CSR requests extension {exc.oid.dotted_string} more than once (RFC 5280 4.2)") from exc
    except x509.UnsupportedGeneralNameType as exc:
        raise CsrRejected(f"CSR extension request names a general name of an unsupported type ({exc})") from exc
    except ValueError as exc:
        raise CsrRejected("CSR extension request cannot be parsed") from exc
    if bc is not None and bc.value.ca:
        raise CsrRejected("CSR requests a CA certificate (basicConstraints CA:TRUE); only end-entity is issued")
    return ValidatedCsr(csr, key, curve, registration_id, _seal(csr.public_bytes(Encoding.DER), registration_id, curve))





