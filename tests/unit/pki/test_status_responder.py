"""The status responder on the store (SQLite and PostgreSQL), no server: each CA's CRL and the OCSP answers follow
revocations (OCSP at once, CRLs within the one-second state memo), are reused while nothing changed, rebuilt at half
their validity, and the queries behind them use their index (issue 17.3)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp as x509_ocsp
from cryptography.x509.oid import ExtensionOID, NameOID
from tests.conftest import TEST_ID_SCOPE, assert_uses_index

import opendps.pki.ocsp as ocsp_module
import opendps.pki.status as status_module
from opendps.errors import NotFound
from opendps.pki import Publication, der, lint_crl
from opendps.pki.crl import crl_number
from opendps.pki.ocsp import MALFORMED_REQUEST, UNAUTHORIZED
from opendps.pki.status import ca_ref
from opendps.services import Services, wire

PUBLICATION = Publication.at("http", "dps.example.com", 8080)


@pytest.fixture
def services(store, keys) -> Services:
    return wire(store, keys, id_scope=TEST_ID_SCOPE, hub_domain="hubs.test", publication=PUBLICATION)


@pytest.fixture
def fresh(monkeypatch):
    """No one-second memo of a CA's revocation state: each CRL request asks the store (the memo has its own test)."""
    monkeypatch.setattr(status_module, "STATE_TTL", 0.0)


def _csr(rid: str) -> bytes:
    key = ec.generate_private_key(ec.SECP384R1())
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, rid)]))
            .sign(key, hashes.SHA384()).public_bytes(Encoding.DER))


def _issue(services: Services, ns: str, rid: str) -> tuple[x509.Certificate, x509.Certificate]:
    issuer = services.registry.issuer(services.registry.get_policy(ns, "default").policy_id)
    chain = services.issuance.issue(issuer, _csr(rid), rid)
    return chain.leaf, chain.issuing_ca


def _ask(services: Services, leaf: x509.Certificate, ica: x509.Certificate, **kw) -> x509_ocsp.OCSPResponse:
    request = x509_ocsp.OCSPRequestBuilder().add_certificate(leaf, ica, hashes.SHA1()).build()
    return x509_ocsp.load_der_ocsp_response(services.status.ocsp(request.public_bytes(Encoding.DER), **kw).der)


def _serials(der: bytes) -> set[int]:
    return {entry.serial_number for entry in x509.load_der_x509_crl(der)}


def test_an_issuing_ca_crl_follows_its_revocations(services, fresh):
    services.registry.create_namespace("crl-ns")
    leaf, ica = _issue(services, "crl-ns", "dev-1")
    other, _ = _issue(services, "crl-ns", "dev-2")
    ref = ca_ref(ica)
    assert leaf.extensions.get_extension_for_oid(ExtensionOID.CRL_DISTRIBUTION_POINTS).value[0].full_name[0].value \
        == f"http://dps.example.com:8080/crl/{ref}.crl"
    first = services.status.crl(ref)
    crl = x509.load_der_x509_crl(first.der)
    assert list(crl) == [] and crl.is_signature_valid(ica.public_key()) and crl.issuer == ica.subject
    assert crl.next_update_utc - crl.last_update_utc == timedelta(hours=24)  # the policy's crlValidityInHours
    assert services.status.crl(ref) is first  # nothing changed: the signed one again
    services.issuance.revoke(format(leaf.serial_number, "x"), "keyCompromise")
    second = services.status.crl(ref)
    assert _serials(second.der) == {leaf.serial_number} and lint_crl(second.der) == []
    number = x509.load_der_x509_crl(second.der).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number > crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    entry = x509.load_der_x509_crl(second.der).get_revoked_certificate_by_serial_number(leaf.serial_number)
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    # half its validity later a new one is made; past a leaf's expiry its entry goes
    later = datetime.now(UTC) + timedelta(hours=13)
    third = services.status.crl(ref, now=later)
    assert third.this_update == later.replace(microsecond=0) and _serials(third.der) == {leaf.serial_number}
    assert x509.load_der_x509_crl(third.der).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number \
        == crl_number(later)
    services.issuance.revoke(format(other.serial_number, "x"), "superseded")
    after_expiry = leaf.not_valid_after_utc + timedelta(seconds=1)
    assert _serials(services.status.crl(ref, now=after_expiry).der) == set()
    with pytest.raises(NotFound):
        services.status.crl("00" * 8)
    with pytest.raises(NotFound):  # an expired CA publishes no more
        services.status.crl(ref, now=ica.not_valid_after_utc + timedelta(seconds=1))


def test_the_revocation_state_is_asked_at_most_once_a_second(services, monkeypatch):
    services.registry.create_namespace("memo-ns")
    leaf, ica = _issue(services, "memo-ns", "dev-1")
    ref = ca_ref(ica)
    before = services.status.crl(ref)
    services.issuance.revoke(format(leaf.serial_number, "x"))
    assert services.status.crl(ref) is before  # within the memo: not asked yet
    monkeypatch.setattr(status_module, "STATE_TTL", 0.0)  # the second has passed
    assert _serials(services.status.crl(ref).der) == {leaf.serial_number}


def test_ocsp_answers_follow_revocations_at_once(services):
    services.registry.create_namespace("ocsp-ns")
    services.registry.create_namespace("elsewhere")
    leaf, ica = _issue(services, "ocsp-ns", "dev-1")
    foreign, foreign_ica = _issue(services, "elsewhere", "dev-9")
    good = _ask(services, leaf, ica)
    assert good.certificate_status == x509_ocsp.OCSPCertStatus.GOOD
    assert good.next_update_utc - good.this_update_utc == timedelta(hours=24)
    again = services.status.ocsp(x509_ocsp.OCSPRequestBuilder().add_certificate(leaf, ica, hashes.SHA1()).build()
                                 .public_bytes(Encoding.DER))
    assert again.der == good.public_bytes(Encoding.DER)  # reused, not signed again
    services.issuance.revoke(format(leaf.serial_number, "x"), "cessationOfOperation")
    revoked = _ask(services, leaf, ica)
    assert revoked.certificate_status == x509_ocsp.OCSPCertStatus.REVOKED
    assert revoked.revocation_reason == x509.ReasonFlags.cessation_of_operation
    # a serial this CA did not issue (another namespace's certificate asked of this CA): unknown
    asked_wrongly = x509_ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        good.issuer_name_hash, good.issuer_key_hash, foreign.serial_number, hashes.SHA1()).build()
    unknown = x509_ocsp.load_der_ocsp_response(services.status.ocsp(asked_wrongly.public_bytes(Encoding.DER)).der)
    assert unknown.certificate_status == x509_ocsp.OCSPCertStatus.UNKNOWN
    assert _ask(services, foreign, foreign_ica).certificate_status == x509_ocsp.OCSPCertStatus.GOOD
    # an issuer not published here, and no request at all
    stranger = x509_ocsp.OCSPRequestBuilder().add_certificate_by_hash(b"\1" * 20, b"\2" * 20, 5, hashes.SHA1()).build()
    assert services.status.ocsp(stranger.public_bytes(Encoding.DER)).der == UNAUTHORIZED
    assert services.status.ocsp(b"\x30\x03\x02\x01\x05").der == MALFORMED_REQUEST
    # half the validity later the answer is made again
    later = datetime.now(UTC) + timedelta(hours=13)
    assert _ask(services, foreign, foreign_ica, now=later).this_update_utc == later.replace(microsecond=0)


def test_after_the_clock_steps_back_no_document_from_the_future_is_served(services, fresh):
    """NTP steps the clock back an hour: the CRL and the OCSP answer cached before the step have a thisUpdate an
    hour ahead, which relying parties refuse as not yet valid; they are made again, dated by the clock now."""
    services.registry.create_namespace("step-ns")
    leaf, ica = _issue(services, "step-ns", "dev-1")
    ref, now = ca_ref(ica), datetime.now(UTC)
    before = services.status.crl(ref, now=now)
    answer = _ask(services, leaf, ica, now=now)
    back = now - timedelta(hours=1)
    after = services.status.crl(ref, now=back)
    assert after is not before and after.this_update is not None and after.this_update <= back
    assert x509.load_der_x509_crl(after.der).last_update_utc <= back
    assert answer.this_update_utc > back >= _ask(services, leaf, ica, now=back).this_update_utc
    assert services.status.crl(ref, now=back) is after  # then reused as before


def test_a_policy_crl_validity_and_a_rotation_are_followed(services, fresh):
    services.registry.create_namespace("rot-ns")
    leaf, old_ica = _issue(services, "rot-ns", "dev-1")
    services.registry.put_policy("rot-ns", "default", crl_validity_hours=2)
    crl = x509.load_der_x509_crl(services.status.crl(ca_ref(old_ica)).der)
    assert crl.next_update_utc - crl.last_update_utc == timedelta(hours=2)
    services.registry.rotate_policy("rot-ns", "default")
    new_leaf, new_ica = _issue(services, "rot-ns", "dev-1")
    assert new_ica != old_ica
    # the retired CA still publishes and answers for its leaves
    assert _ask(services, leaf, old_ica).certificate_status == x509_ocsp.OCSPCertStatus.GOOD
    services.issuance.revoke(format(leaf.serial_number, "x"), "superseded")
    assert _ask(services, leaf, old_ica).revocation_reason == x509.ReasonFlags.superseded
    assert _serials(services.status.crl(ca_ref(old_ica)).der) == {leaf.serial_number}
    assert _serials(services.status.crl(ca_ref(new_ica)).der) == set()
    # the root: its CRL lists the issuing CA it revoked (the registry revokes it with its leaves)
    root = services.registry.credential("rot-ns").certificate
    assert _serials(services.status.crl(ca_ref(root)).der) == set()
    done = services.registry.revoke_issuing_ca("rot-ns", "default", format(old_ica.serial_number, "x"),
                                               "keyCompromise", services.issuance)
    assert done.ca.revoked_at is not None
    root_crl = x509.load_der_x509_crl(services.status.crl(ca_ref(root)).der)
    assert root_crl.is_signature_valid(root.public_key()) and _serials(root_crl.public_bytes(Encoding.DER)) == {
        old_ica.serial_number}
    entry = root_crl.get_revoked_certificate_by_serial_number(old_ica.serial_number)
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    assert _ask(services, new_leaf, new_ica).certificate_status == x509_ocsp.OCSPCertStatus.GOOD


def test_a_new_issuing_ca_names_its_roots_crl(services):
    services.registry.create_namespace("cdp-ns")
    root = services.registry.credential("cdp-ns").certificate
    root_url = PUBLICATION.crl_url(root)

    def cdp(ica: x509.Certificate) -> str:
        return ica.extensions.get_extension_for_oid(ExtensionOID.CRL_DISTRIBUTION_POINTS).value[0].full_name[0].value

    assert cdp(services.registry.get_policy("cdp-ns", "default").issuing_ca) == root_url
    assert cdp(services.registry.rotate_policy("cdp-ns", "default").issuing_ca) == root_url
    assert services.status.crl(ca_ref(root)).der  # served where it says


def test_the_revocation_queries_use_their_index(store):
    from opendps.pki.status import _REVOCATION_STATE, _REVOKED_LEAVES

    now = datetime.now(UTC)
    assert_uses_index(store, {"ix_issued_certificates_revoked": _REVOCATION_STATE.params(b_ca=1)})
    assert_uses_index(store, {"ix_issued_certificates_revoked": _REVOKED_LEAVES.params(b_ca=1, b_now=now)})


def test_an_ocsp_request_for_a_negative_serial_is_malformed(services):
    """A CertID naming this CA with a negative serial (a DER INTEGER is signed; RFC 5280 serials are positive, so no
    certificate has one): ``malformedRequest``, as the request cannot name a certificate — it was ``unauthorized``,
    which tells a client this responder does not answer for the CA."""
    services.registry.create_namespace("negative-ns")
    leaf, ica = _issue(services, "negative-ns", "dev-neg")
    name_hash, key_hash = ocsp_module.name_hash(ica), ocsp_module.key_hash(ica)
    sha1 = der.tlv(der.SEQUENCE, der.tlv(der.OBJECT_IDENTIFIER, bytes.fromhex("2b0e03021a")) + b"\x05\x00")
    for serial in (-1, -leaf.serial_number):
        octets = serial.to_bytes((serial.bit_length() + 8) // 8, "big", signed=True)
        cert_id = der.tlv(der.SEQUENCE, sha1 + der.tlv(der.OCTET_STRING, name_hash)
                          + der.tlv(der.OCTET_STRING, key_hash) + der.tlv(0x02, octets))  # INTEGER
        request = der.tlv(der.SEQUENCE, der.tlv(der.SEQUENCE, der.tlv(der.SEQUENCE, der.tlv(der.SEQUENCE, cert_id))))
        assert x509_ocsp.load_der_ocsp_request(request).serial_number == serial
        assert services.status.ocsp(request).der == MALFORMED_REQUEST
    assert _ask(services, leaf, ica).certificate_status == x509_ocsp.OCSPCertStatus.GOOD  # the CA is answered for
