"""The few DER encodings pki writes by hand: a signed object assembled from its TBS bytes and a signature.

Why by hand: every certificate, CRL and OCSP response is built by ``cryptography`` with a throw-away key (that is
what gets linted), then the CA's :class:`~opendps.pki.keys.Signer` signs the TBS bytes. ``cryptography`` cannot put
a signature made elsewhere into a certificate, CRL or OCSP response, so the outer SEQUENCE is written here — TBS,
AlgorithmIdentifier, BIT STRING, the same for all three (RFC 5280 4.1 and 5.1, RFC 6960 4.2.1) — and the result is
parsed back and verified by the caller. Nothing here parses.
"""

from __future__ import annotations

# AlgorithmIdentifier for ecdsa-with-SHA384 (1.2.840.10045.4.3.3), parameters absent (RFC 5758 3.2)
ECDSA_SHA384_ALGID = bytes.fromhex("300a06082a8648ce3d040303")

SEQUENCE = 0x30
OCTET_STRING = 0x04
BIT_STRING = 0x03
ENUMERATED = 0x0A
OBJECT_IDENTIFIER = 0x06


def length(n: int) -> bytes:
    """A DER length: short form below 128, else the long form."""
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def tlv(tag: int, content: bytes) -> bytes:
    """One DER element with a one-octet tag."""
    return bytes([tag]) + length(len(content)) + content


def explicit(number: int, content: bytes) -> bytes:
    """``[number] EXPLICIT`` (context-specific, constructed) around an encoded element."""
    return tlv(0xA0 | number, content)


def signed(tbs: bytes, signature: bytes, algorithm: bytes = ECDSA_SHA384_ALGID) -> bytes:
    """SEQUENCE { tbs, signatureAlgorithm, signature BIT STRING }: a Certificate, a CertificateList, and the first
    three members of a BasicOCSPResponse (whose optional ``certs`` we never send)."""
    return tlv(SEQUENCE, tbs + algorithm + tlv(BIT_STRING, b"\x00" + signature))
