"""Certificate helpers every package shares: reading what users send, thumbprints, and the one
RFC 5280 path validation used for device chains (DPS attestation and hub CONNECT)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import (
    ClientVerifier,
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from opendps.errors import InvalidInput

MAX_CERTIFICATE_TEXT = 64 * 1024
# device certificates carry no SAN (the CN is the identity): relax only that rule of the EE profile
_DEVICE_EE_POLICY = ExtensionPolicy.webpki_defaults_ee().may_be_present(x509.SubjectAlternativeName,
                                                                         Criticality.AGNOSTIC, None)

__all__ = ["MAX_CERTIFICATE_TEXT", "VerificationError", "device_chain_verifier", "issued_by", "load_certificate_text",
           "serial_hex", "thumbprint", "unreadable"]


def thumbprint(cert: x509.Certificate, algorithm: str = "sha256") -> str:
    """Hex digest of the DER certificate in upper case, as Azure shows thumbprints (``sha1`` or ``sha256``).

    Tables that key on a digest store it lower-cased (``issued_certificates.sha256``...); they say so."""
    return hashlib.new(algorithm, cert.public_bytes(Encoding.DER)).hexdigest().upper()


def serial_hex(serial: x509.Certificate | int) -> str:
    """A certificate's serial number (or the number) as Azure shows it: upper-case hex of whole octets (a leading
    zero kept). Tables store serials lower-case without padding (``issued_certificates.serial``)."""
    n = serial.serial_number if isinstance(serial, x509.Certificate) else serial
    return n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big").hex().upper()


def authority_key_id(certificate: x509.Certificate) -> str | None:
    """The lower-case hex key identifier of the CA that signed ``certificate`` (None when it names none)."""
    try:
        aki = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    return aki.key_identifier.hex() if aki.key_identifier else None


def subject_key_id(certificate: x509.Certificate) -> str | None:
    """The lower-case hex key identifier a CA certificate gives its own key (None when it states none): what the
    ``authority_key_id`` of the certificates it signs names."""
    try:
        return certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()
    except x509.ExtensionNotFound:
        return None


def load_certificate_text(value: object, what: str = "certificate") -> x509.Certificate:
    """A certificate given as PEM text, base64 DER, or raw DER bytes (anything else: InvalidInput)."""
    if isinstance(value, str):
        if len(value) > MAX_CERTIFICATE_TEXT:
            raise InvalidInput(f"{what} is larger than {MAX_CERTIFICATE_TEXT} bytes")
        text = value.strip()
        if not text:
            raise InvalidInput(f"{what} is empty")
        if text.startswith("-----BEGIN"):
            data = text.encode()
        else:
            try:
                data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise InvalidInput(f"{what} is neither PEM nor base64 DER") from exc
    elif isinstance(value, bytes):
        data = value
    else:  # a JSON number, list or object where a certificate was expected
        raise InvalidInput(f"{what} must be a PEM or base64 DER string")
    try:
        cert = (x509.load_pem_x509_certificate(data) if data.lstrip().startswith(b"-----BEGIN")
                else x509.load_der_x509_certificate(data))
    except x509.InvalidVersion as exc:  # not a ValueError
        raise InvalidInput(f"{what} has X.509 version number {exc.parsed_version}, not 0-2 (v1-v3)") from exc
    except ValueError as exc:
        raise InvalidInput(f"{what} cannot be parsed as an X.509 certificate") from exc
    why = unreadable(cert)
    if why is not None:
        raise InvalidInput(f"{what} cannot be read: {why}")
    return cert


def unreadable(cert: x509.Certificate, *, key: bool = True) -> str | None:
    """Why ``cert`` cannot be read whole, or None when it can (``key=False``: all but the public key, for a leaf
    whose key OpenSSL has just used in a handshake, where loading it again would be ~40 µs of nothing).

    Why: cryptography parses a certificate's parts when they are first asked for, and a malformed part raises what
    its parser raises (ValueError, TypeError, UnsupportedAlgorithm, DuplicateExtension...) wherever that happens to be:
    a 500 on an API or a traceback at a CONNECT. OpenSSL, which took the certificate in the TLS handshake, is more
    lenient (a negative serial number, a broken SAN). A certificate from a peer or a request is read whole here
    once, before anything uses it."""
    try:
        cert.subject  # noqa: B018 - every name attribute, parsed (formatting one as text cannot fail after that)
        cert.issuer  # noqa: B018
        cert.extensions  # noqa: B018 - every extension, parsed
        if key:
            cert.public_key()
        serial = cert.serial_number
        cert.not_valid_before_utc  # noqa: B018
        cert.not_valid_after_utc  # noqa: B018
    except Exception as exc:  # noqa: BLE001 - only cryptography's parsers run here
        return " ".join(str(exc).split())[:160] or type(exc).__name__
    if serial <= 0:
        return "its serial number is not a positive integer (RFC 5280, 4.1.2.2)"
    return None


def issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    """Whether ``parent``'s key signed ``child`` (names match and the signature verifies)."""
    if child.issuer != parent.subject:
        return False
    try:
        child.verify_directly_issued_by(parent)
        return True
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):  # an unknown signature algorithm: not ours
        return False


class ValidatedPaths:
    """Certificate paths that validated, by the SHA-256 of each certificate given (:meth:`key`), with what the caller
    kept of the result and the time window in which it stands: the overlap of the validated path's validity periods.

    Why: a device proves the same chain again and again — over MQTT at CONNECT and then at its register, at every
    poll, at every hub reconnect — each time two or three P-384 signatures (~0.6 ms each) over the same bytes. Path
    validation is a function of those certificates, the trust anchors and the time (revocation is not part of it),
    so inside the window it would say the same again. Callers keep the anchors fixed for a cache's life (the anchor
    in the key, or one cache per trust store) and still decide on every request what the path means (which CA is
    verified, which enrollment or hub trusts it, whether the device is enabled). Bounded (least recently used out
    first), thread-safe, per process; 32-byte digests, not certificates, so it holds little."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._paths: OrderedDict[tuple[bytes, ...], tuple[datetime, datetime, Any]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(certificates: Iterable[x509.Certificate]) -> tuple[bytes, ...]:
        return tuple(hashlib.sha256(c.public_bytes(Encoding.DER)).digest() for c in certificates)

    def get(self, key: tuple[bytes, ...], now: datetime) -> Any | None:
        """What :meth:`add` kept for ``key`` if ``now`` is inside its window, else None."""
        with self._lock:
            entry = self._paths.get(key)
            if entry is None:
                return None
            if not entry[0] <= now <= entry[1]:
                del self._paths[key]
                return None
            self._paths.move_to_end(key)
            return entry[2]

    def add(self, key: tuple[bytes, ...], path: Sequence[x509.Certificate], result: Any = True) -> None:
        """Remember that ``path`` (the certificates the validation used, leaf to anchor) validated: ``result`` for
        ``key`` (not None)."""
        window = (max(c.not_valid_before_utc for c in path), min(c.not_valid_after_utc for c in path))
        with self._lock:
            self._paths[key] = (*window, result)
            self._paths.move_to_end(key)
            while len(self._paths) > self.capacity:
                self._paths.popitem(last=False)

    def __len__(self) -> int:
        return len(self._paths)


def device_chain_verifier(anchors: Sequence[x509.Certificate], now: datetime) -> ClientVerifier:
    """RFC 5280 path validation of a device's TLS client chain to ``anchors`` (cryptography's verifier, web PKI
    CA profile; the end-entity profile allows a certificate without SAN, since the CN is the device's identity).

    ``verify(leaf, intermediates)`` raises :class:`VerificationError` naming what failed."""
    return (PolicyBuilder().store(Store(list(anchors))).time(now)
            .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=_DEVICE_EE_POLICY)
            .build_client_verifier())
