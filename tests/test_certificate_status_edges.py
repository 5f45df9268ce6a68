"""Edges of the OCSP responder's request parsing (in-process, both backends): what a request's extensions may make
malformed although answers ignore them — a nonce of a size RFC 9654 refuses, an unknown critical extension (RFC 6960
4.4), extensions that do not parse — while every other request is answered and linted as usual."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp as x509_ocsp
from cryptography.x509.oid import NameOID
from tests.conftest import TEST_ID_SCOPE

import opendps.pki.ocsp as ocsp_module
from opendps.pki import Publication, der, lint_ocsp_response
from opendps.pki.ocsp import MALFORMED_REQUEST
from opendps.services import Services, wire

NONCE = "2b0601050507300102"  # id-pkix-ocsp-nonce (1.3.6.1.5.5.7.48.1.2)
UNKNOWN = "2b06010401820b0101"  # 1.3.6.1.4.1.267.1.1: an extension no one here knows


@pytest.fixture
def services(store, keys) -> Services:
    return wire(store, keys, id_scope=TEST_ID_SCOPE, hub_domain="hubs.test",
                publication=Publication.at("http", "dps.example.com", 8080))


def _chain(services: Services) -> tuple[x509.Certificate, x509.Certificate]:
    services.registry.create_namespace("edges-ns")
    issuer = services.registry.issuer(services.registry.get_policy("edges-ns", "default").policy_id)
    key = ec.generate_private_key(ec.SECP384R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(
        NameOID.COMMON_NAME, "dev-edges")])).sign(key, hashes.SHA384()).public_bytes(Encoding.DER))
    chain = services.issuance.issue(issuer, csr, "dev-edges")
    return chain.leaf, chain.issuing_ca


def _extension(oid: str, value: bytes, critical: bool = False) -> bytes:
    return der.tlv(der.SEQUENCE, der.tlv(der.OBJECT_IDENTIFIER, bytes.fromhex(oid))
                   + (der.tlv(0x01, b"\xff") if critical else b"") + der.tlv(der.OCTET_STRING, value))


def _request(leaf: x509.Certificate, ica: x509.Certificate, *extensions: bytes, single: tuple[bytes, ...] = ()) -> bytes:
    """A DER OCSPRequest for ``leaf`` (SHA-1 CertID) with ``extensions`` as its requestExtensions [2] and ``single``
    as the one Request's singleRequestExtensions [0]."""
    sha1 = der.tlv(der.SEQUENCE, der.tlv(der.OBJECT_IDENTIFIER, bytes.fromhex("2b0e03021a")) + b"\x05\x00")
    serial = leaf.serial_number.to_bytes((leaf.serial_number.bit_length() + 8) // 8, "big")
    cert_id = der.tlv(der.SEQUENCE, sha1 + der.tlv(der.OCTET_STRING, ocsp_module.name_hash(ica))
                      + der.tlv(der.OCTET_STRING, ocsp_module.key_hash(ica)) + der.tlv(0x02, serial))
    one = der.tlv(der.SEQUENCE, cert_id + (der.explicit(0, der.tlv(der.SEQUENCE, b"".join(single))) if single else b""))
    tbs = der.tlv(der.SEQUENCE, one)
    if extensions:
        tbs += der.explicit(2, der.tlv(der.SEQUENCE, b"".join(extensions)))
    return der.tlv(der.SEQUENCE, der.tlv(der.SEQUENCE, tbs))


def _good(services: Services, request: bytes) -> bool:
    answer = services.status.ocsp(request).der
    if answer == MALFORMED_REQUEST:
        return False
    assert x509_ocsp.load_der_ocsp_response(answer).certificate_status == x509_ocsp.OCSPCertStatus.GOOD
    assert lint_ocsp_response(answer) == []
    return True


def test_a_nonce_of_a_size_rfc_9654_refuses_is_a_malformed_request(services):
    """RFC 9654 2.1: a server MUST reject a nonce of 0 or more than 128 octets with malformedRequest; it was answered
    as if absent. Sizes in between are answered (the nonce ignored, as RFC 5019 allows)."""
    leaf, ica = _chain(services)
    for size, answered in ((0, False), (1, True), (16, True), (32, True), (128, True), (129, False), (1000, False)):
        nonce = _extension(NONCE, der.tlv(der.OCTET_STRING, b"\x5a" * size))
        assert _good(services, _request(leaf, ica, nonce)) is answered, size
    # a nonce sent bare (not wrapped in an OCTET STRING, as some old clients do) is still a nonce of that size
    assert _good(services, _request(leaf, ica, _extension(NONCE, b"\x5a" * 8)))


def test_an_unknown_critical_request_extension_is_a_malformed_request(services):
    """RFC 6960 4.4: unrecognized extensions are ignored unless critical; a critical one this responder does not
    understand refuses the request (it was ignored and answered ``good``). Duplicates do not parse: malformed too."""
    leaf, ica = _chain(services)
    assert _good(services, _request(leaf, ica, _extension(UNKNOWN, b"\x05\x00")))  # not critical: ignored
    assert not _good(services, _request(leaf, ica, _extension(UNKNOWN, b"\x05\x00", critical=True)))
    nonce = _extension(NONCE, der.tlv(der.OCTET_STRING, b"\x01" * 16))
    assert _good(services, _request(leaf, ica, nonce))
    assert not _good(services, _request(leaf, ica, nonce, nonce))
    # acceptable response types (RFC 6960 4.4.3) marked critical: understood, answered
    basic = der.tlv(der.SEQUENCE, der.tlv(der.OBJECT_IDENTIFIER, bytes.fromhex("2b0601050507300101")))
    assert _good(services, _request(leaf, ica, _extension("2b0601050507300104", basic, critical=True)))


def test_a_crl_not_modified_since_the_clients_copy_is_answered_304(services):
    """RFC 9110 13.1.3 / RFC 5019 6: ``If-Modified-Since`` in a later second than the document's thisUpdate is 304;
    the same second is 200 (a CRL made after a revocation can share the second of the copy the client holds, and
    HTTP dates have no finer unit), an older one 200; ``If-None-Match`` takes precedence; a date that does not
    parse is ignored. It was always 200 with the whole CRL."""
    from datetime import timedelta

    from aiohttp.test_utils import make_mocked_request

    from opendps.frontends.http.pki_status import CRL_TYPE, _http_date, _respond
    from opendps.pki.status import ca_ref

    _, ica = _chain(services)
    document = services.status.crl(ca_ref(ica))
    assert document.this_update is not None
    served = _http_date(document.this_update)

    def status(**headers: str) -> int:
        return _respond(make_mocked_request("GET", "/crl/x.crl", headers=headers), document, CRL_TYPE).status

    assert status(**{"If-Modified-Since": served}) == 200  # the same second: maybe an older CRL of that second
    assert status(**{"If-Modified-Since": _http_date(document.this_update + timedelta(seconds=1))}) == 304
    assert status(**{"If-Modified-Since": _http_date(document.this_update + timedelta(hours=1))}) == 304
    assert status(**{"If-Modified-Since": _http_date(document.this_update - timedelta(seconds=1))}) == 200
    assert status(**{"If-Modified-Since": "garbage"}) == 200
    assert status(**{"If-Modified-Since": served, "If-None-Match": '"other"'}) == 200
    assert status(**{"If-None-Match": f'"{document.etag}"'}) == 304


def test_an_unknown_critical_single_request_extension_is_a_malformed_request(services):
    """The same rule for the one Request's own singleRequestExtensions [0] (RFC 6960 4.4): a critical one not
    understood refuses the request (it was answered ``good``); a service locator (4.4.6), critical or not, or an
    unknown one not critical, is ignored — also behind a version and a requestor name."""
    leaf, ica = _chain(services)
    unknown = _extension(UNKNOWN, b"\x05\x00")
    assert x509_ocsp.load_der_ocsp_request(_request(leaf, ica, single=(unknown,))).serial_number == leaf.serial_number
    assert _good(services, _request(leaf, ica, single=(unknown,)))
    critical = _extension(UNKNOWN, b"\x05\x00", critical=True)
    assert not _good(services, _request(leaf, ica, single=(critical,)))
    assert not _good(services, _request(leaf, ica, _extension(NONCE, der.tlv(der.OCTET_STRING, b"\x01" * 32)),
                                        single=(unknown, critical)))
    locator = _extension("2b0601050507300107", der.tlv(der.SEQUENCE, ica.subject.public_bytes()), critical=True)
    assert _good(services, _request(leaf, ica, single=(locator,)))
    # a requestorName [1] (and the v1 version [0] a DER encoder leaves out) before the requestList
    request = _request(leaf, ica, single=(critical,))
    assert request[1] < 0x80 and request[3] < 0x80
    tbs_content = request[4:]  # past the OCSPRequest and TBSRequest headers (short lengths)
    named = der.tlv(der.SEQUENCE, der.tlv(der.SEQUENCE, der.explicit(1, der.tlv(0x82, b"client.example"))
                                          + tbs_content))
    assert x509_ocsp.load_der_ocsp_request(named).serial_number == leaf.serial_number
    assert not _good(services, named)
