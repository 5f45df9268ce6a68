"""OCSP (RFC 6960) in the RFC 5019 lightweight profile: one request in, one signed answer out.

A request names a certificate by CertID: a hash algorithm, the hashes of its issuer's name and key, and its serial.
The answer is a BasicOCSPResponse signed by the issuing CA itself (no delegated responder, so no ``certs``),
responderID ``byKey`` (the SHA-1 of the CA's key, RFC 6960 4.2.1), with one SingleResponse: good, revoked (time and
reason; the reason left out for ``unspecified``, as RFC 5280 asks of CRLs) or unknown, and thisUpdate/nextUpdate.
Request extensions (a nonce) are ignored, as RFC 5019 allows: an answer depends only on the certificate's status,
so it can be reused until it is refreshed. Unsigned error answers (``malformedRequest``, ``unauthorized``) are
constants.

Signing: ``cryptography``'s OCSP builder makes the response with a throw-away key, but it derives the responderID
from the responder certificate and refuses a signing key that does not match it, and the CA key stays behind the
:class:`Signer`. So the TBS is built for a throw-away responder whose key hash (20 octets, the same length) is then
replaced by the CA's, at the one place RFC 6960 puts it (the responderID, first member of ResponseData), and the
BasicOCSPResponse and OCSPResponse around it are written with :mod:`opendps.pki.der`; the result is parsed back
and its responderID and signature checked before it leaves.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from opendps.errors import InvalidInput
from opendps.pki import der
from opendps.pki.crl import RevokedEntry
from opendps.pki.keys import Signer
from opendps.pki.lint import lint_ocsp_response
from opendps.pki.profiles import IssuanceRefused, LintedShapes, LintRefused, throwaway_key

MAX_REQUEST_BYTES = 16 * 1024  # one CertID and a nonce take ~100 octets; RFC 5019 keeps GET requests under 255
MAX_NONCE_BYTES = 128  # RFC 9654 2.1: a nonce is 1 to 128 octets; a request with another must be malformedRequest
# request extensions this responder understands (and ignores, RFC 5019): the nonce (RFC 9654), acceptable response
# types and preferred signature algorithms (RFC 6960 4.4.3, 4.4.7). Another one marked critical is refused (4.4).
_UNDERSTOOD_EXTENSIONS = frozenset({"1.3.6.1.5.5.7.48.1.2", "1.3.6.1.5.5.7.48.1.4", "1.3.6.1.5.5.7.48.1.8"})
# and of the one Request's singleRequestExtensions: the service locator (RFC 6960 4.4.6), as its OID's DER content
_SERVICE_LOCATOR = bytes.fromhex("2b0601050507300107")
# id-pkix-ocsp-basic (1.3.6.1.5.5.7.48.1.1)
_ID_PKIX_OCSP_BASIC = der.tlv(der.OBJECT_IDENTIFIER, bytes.fromhex("2b0601050507300101"))
# CertID hash algorithms answered: SHA-1 (what RFC 5019 and every client send) and the SHA-2 family
HASHES: dict[str, type[hashes.HashAlgorithm]] = {"sha1": hashes.SHA1, "sha256": hashes.SHA256,
                                                   "sha384": hashes.SHA384, "sha512": hashes.SHA512}


def _error(status: ocsp.OCSPResponseStatus) -> bytes:
    """An unsigned OCSPResponse carrying only ``status`` (RFC 6960 4.2.1: no responseBytes)."""
    return der.tlv(der.SEQUENCE, der.tlv(der.ENUMERATED, bytes([status.value])))


MALFORMED_REQUEST = _error(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
UNAUTHORIZED = _error(ocsp.OCSPResponseStatus.UNAUTHORIZED)
INTERNAL_ERROR = _error(ocsp.OCSPResponseStatus.INTERNAL_ERROR)
TRY_LATER = _error(ocsp.OCSPResponseStatus.TRY_LATER)  # the responder is busy (a flood of requests)


class MalformedOcspRequest(InvalidInput):
    """Not a DER OCSPRequest with exactly one request (answered ``malformedRequest``, never an HTTP error)."""


@dataclass(frozen=True)
class OcspQuery:
    """The one CertID of a request: ``algorithm`` is None when it is a hash this responder does not compute."""

    algorithm: str | None
    issuer_name_hash: bytes
    issuer_key_hash: bytes
    serial: int


def parse_request(data: bytes) -> OcspQuery:
    """The CertID of a DER OCSPRequest; :class:`MalformedOcspRequest` for anything else (empty, too large, not DER,
    trailing bytes, several requests, a nonce of a size RFC 9654 refuses, an unknown critical extension, a negative
    serial: RFC 5280 4.1.2.2 serials are positive, so no certificate has one — it was answered ``unauthorized``, as
    if the CA were not this responder's)."""
    if not data or len(data) > MAX_REQUEST_BYTES:
        raise MalformedOcspRequest(f"an OCSP request is 1 to {MAX_REQUEST_BYTES} octets of DER, got {len(data)}")
    try:
        request = ocsp.load_der_ocsp_request(data)
        serial, name_hash, key_hash = request.serial_number, request.issuer_name_hash, request.issuer_key_hash
    except Exception as exc:  # noqa: BLE001 - untrusted input: whatever the parser refuses (ValueError, and
        # NotImplementedError for several requests) is a malformed request, never a server error
        raise MalformedOcspRequest(f"not an OCSP request with one certificate: {exc}") from None
    if serial < 0:
        raise MalformedOcspRequest(f"the request's serial number {serial} is negative: certificate serials are positive")
    _check_extensions(request)
    try:
        _check_single_request_extensions(data)
    except (IndexError, ValueError, StopIteration) as exc:  # a shape the walk did not expect: not one request
        raise MalformedOcspRequest(f"not an OCSP request with one certificate: {exc!r}") from None
    try:
        algorithm: str | None = request.hash_algorithm.name
    except UnsupportedAlgorithm:
        algorithm = None
    if algorithm not in HASHES:
        algorithm = None
    return OcspQuery(algorithm, name_hash, key_hash, serial)


def _check_extensions(request: ocsp.OCSPRequest) -> None:
    """Its requestExtensions, which answers ignore, may still make it malformed: a nonce of 0 or more than
    :data:`MAX_NONCE_BYTES` octets (RFC 9654 2.1), an extension this responder does not understand marked critical
    (RFC 6960 4.4), or extensions that do not parse (a duplicate one, RFC 5280 4.2)."""
    try:
        extensions = list(request.extensions)
    except Exception as exc:  # noqa: BLE001 - untrusted input, as above
        raise MalformedOcspRequest(f"the request's extensions do not parse: {exc}") from None
    for extension in extensions:
        if isinstance(extension.value, x509.OCSPNonce):
            if not 1 <= len(extension.value.nonce) <= MAX_NONCE_BYTES:
                raise MalformedOcspRequest(f"the request's nonce is {len(extension.value.nonce)} octets, not 1 to "
                                           f"{MAX_NONCE_BYTES}")
        elif extension.critical and extension.oid.dotted_string not in _UNDERSTOOD_EXTENSIONS:
            raise MalformedOcspRequest(f"the request has a critical extension {extension.oid.dotted_string} this "
                                       "responder does not understand")


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """(tag, content start, content end) of each DER element in ``data[start:end]`` (already parsed as DER)."""
    found, at = [], start
    while at < end:
        size, header = data[at + 1], 2
        if size & 0x80:
            header += size & 0x7F
            size = int.from_bytes(data[at + 2:at + header], "big")
        found.append((data[at], at + header, at + header + size))
        at += header + size
    return found


def _check_single_request_extensions(data: bytes) -> None:
    """The one Request's singleRequestExtensions (which ``cryptography`` does not expose): one this responder does
    not understand marked critical makes the request malformed (RFC 6960 4.4). ``data`` parsed as an OCSPRequest
    with one Request already, so its structure is known."""
    (_, start, end), = _children(data, 0, len(data))  # OCSPRequest
    tbs = _children(data, *_children(data, start, end)[0][1:])  # TBSRequest: [0] version, [1] name, requestList
    _, start, end = next(child for child in tbs if child[0] == der.SEQUENCE)
    (_, start, end), = _children(data, start, end)  # the one Request: CertID, [0] EXPLICIT Extensions
    for tag, inner_start, inner_end in _children(data, start, end)[1:]:
        if tag != 0xA0:
            continue
        (_, list_start, list_end), = _children(data, inner_start, inner_end)  # Extensions
        for _, extension_start, extension_end in _children(data, list_start, list_end):
            parts = _children(data, extension_start, extension_end)  # extnID, critical DEFAULT FALSE, extnValue
            oid = data[parts[0][1]:parts[0][2]]
            critical = parts[1][0] == 0x01 and data[parts[1][1]:parts[1][2]] != b"\x00"
            if critical and oid != _SERVICE_LOCATOR:
                raise MalformedOcspRequest("the request's certificate has a critical extension this responder does "
                                           "not understand")


def key_hash(certificate: x509.Certificate, algorithm: str = "sha1") -> bytes:
    """The hash of a CA's public key (the BIT STRING's value, RFC 6960 4.1.1): a CertID's issuerKeyHash, and with
    SHA-1 the responderID ``byKey``."""
    point = certificate.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)  # EC keys only
    return hashlib.new(algorithm, point).digest()


def name_hash(certificate: x509.Certificate, algorithm: str = "sha1") -> bytes:
    """The hash of a CA's subject as DER: a CertID's issuerNameHash for the certificates it issued."""
    return hashlib.new(algorithm, certificate.subject.public_bytes()).digest()


@lru_cache(maxsize=1)
def _throwaway_responder() -> x509.Certificate:
    """A certificate for the throw-away key: what ``cryptography``'s builder derives the responderID from."""
    key = throwaway_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "opendps throw-away OCSP responder")])
    now = datetime.now(UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + timedelta(days=1))
            .sign(key, hashes.SHA256()))


def _by_key(hash_: bytes) -> bytes:
    return der.explicit(2, der.tlv(der.OCTET_STRING, hash_))  # ResponderID byKey [2] EXPLICIT KeyHash


def _with_responder(tbs: bytes, ours: bytes) -> bytes:
    """``tbs`` (a ResponseData for the throw-away responder) naming the CA's key hash ``ours`` instead."""
    theirs = _by_key(key_hash(_throwaway_responder()))
    header = 2 + (tbs[1] & 0x7F if tbs[1] & 0x80 else 0)  # SEQUENCE tag and length octets
    if tbs[0] != der.SEQUENCE or tbs[header:header + len(theirs)] != theirs or len(ours) != 20:
        raise IssuanceRefused("the OCSP response data is not shaped as expected (responderID byKey first)")
    return tbs[:header] + _by_key(ours) + tbs[header + len(theirs):]


def _shape(query: OcspQuery, status: ocsp.OCSPCertStatus, reason: x509.ReasonFlags | None) -> bytes:
    """What pkilint's verdict on one response covers for others: everything but the values (serial length counts:
    it changes the encoding)."""
    return repr((query.algorithm, len(query.issuer_name_hash), len(query.issuer_key_hash),
                 (query.serial.bit_length() + 8) // 8, status.name, reason is not None)).encode()


def build_response(signer: Signer, issuer: x509.Certificate, query: OcspQuery, *, known: bool,
                   revoked: RevokedEntry | None, this_update: datetime, next_update: datetime, lint: bool = True,
                   shapes: LintedShapes | None = None) -> bytes:
    """The signed OCSPResponse (DER) of ``issuer`` (whose key ``signer`` holds) for ``query``: revoked when
    ``revoked`` is given, else good when ``known`` (issued by ``issuer``), else unknown. pkilint checks the first
    response of each shape (every response without ``shapes``); WARNING or worse refuses (:class:`LintRefused`)."""
    if issuer.public_key() != signer.public_key() or query.algorithm is None:
        raise IssuanceRefused("the OCSP signer's key is not the key of the CA it would answer for")
    if not this_update < next_update:
        raise IssuanceRefused("an OCSP response's nextUpdate must be after its thisUpdate")
    status = (ocsp.OCSPCertStatus.REVOKED if revoked is not None
              else ocsp.OCSPCertStatus.GOOD if known else ocsp.OCSPCertStatus.UNKNOWN)
    reason = revoked.reason_flag if revoked is not None else None
    builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
        query.issuer_name_hash, query.issuer_key_hash, query.serial, HASHES[query.algorithm](), status,
        this_update, next_update, revoked.revoked_at if revoked is not None else None, reason,
    ).responder_id(ocsp.OCSPResponderEncoding.HASH, _throwaway_responder())
    pre = builder.sign(throwaway_key(), hashes.SHA384())
    shape = hashlib.sha256(_shape(query, status, reason)).digest()
    if lint and (shapes is None or shape not in shapes):
        findings = lint_ocsp_response(pre.public_bytes(Encoding.DER))
        if findings:
            raise LintRefused(findings)
        if shapes is not None:
            shapes.add(shape)
    ours = key_hash(issuer)
    tbs = _with_responder(pre.tbs_response_bytes, ours)
    basic = der.signed(tbs, signer.sign(tbs))
    response = der.tlv(der.SEQUENCE, der.tlv(der.ENUMERATED, b"\x00") + der.explicit(0, der.tlv(
        der.SEQUENCE, _ID_PKIX_OCSP_BASIC + der.tlv(der.OCTET_STRING, basic))))
    # parsed back: what leaves is an OCSP response naming this CA, signed by its key
    parsed = ocsp.load_der_ocsp_response(response)
    if parsed.responder_key_hash != ours or parsed.serial_number != query.serial \
            or parsed.certificate_status != status:
        raise IssuanceRefused("the assembled OCSP response does not say what was built")
    signer.public_key().verify(parsed.signature, parsed.tbs_response_bytes, ec.ECDSA(hashes.SHA384()))
    return response


__all__ = ["INTERNAL_ERROR", "MALFORMED_REQUEST", "TRY_LATER", "UNAUTHORIZED", "MalformedOcspRequest", "OcspQuery",
           "build_response", "key_hash", "name_hash", "parse_request"]
