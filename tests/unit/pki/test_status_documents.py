"""CRLs and OCSP responses built in-process (issue 17.3): the certificates that name them, their profiles, pkilint,
and the real openssl CLI's verdict on each. No store, no server: the pure builders of opendps.pki.crl / .ocsp."""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509 import ocsp as x509_ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtensionOID, SignatureAlgorithmOID
from tests.conftest import run_openssl

import opendps.pki.crl as crl_module
import opendps.pki.ocsp as ocsp_module
from opendps.pki import LintRefused, Publication, lint_certificate, lint_crl, lint_ocsp_response
from opendps.pki import der as der_module
from opendps.pki.crl import RevokedEntry, build_crl, crl_number
from opendps.pki.keys import SoftwareSigner
from opendps.pki.lint import LintFinding
from opendps.pki.ocsp import MALFORMED_REQUEST, UNAUTHORIZED, MalformedOcspRequest, build_response, parse_request
from opendps.pki.profiles import LintedShapes, issuing_ca, leaf_builder, root_ca, sign_builder

PUBLICATION = Publication.at("http", "localhost", 8080)
HOURS = timedelta(hours=24)


@dataclass
class Pki:
    root: x509.Certificate
    root_signer: SoftwareSigner
    ica: x509.Certificate
    ica_signer: SoftwareSigner
    good: x509.Certificate
    revoked: x509.Certificate
    files: Path

    def write(self, name: str, data: bytes) -> Path:
        (self.files / name).write_bytes(data)
        return self.files / name


def _signer(name: str) -> SoftwareSigner:
    return SoftwareSigner(name, ec.generate_private_key(ec.SECP384R1()))


def _leaf(ica: x509.Certificate, signer: SoftwareSigner, cn: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP384R1())
    return sign_builder(leaf_builder(key.public_key(), cn, ica, signer.public_key(), 30,
                                     crl_url=PUBLICATION.crl_url(ica), ocsp_url=PUBLICATION.ocsp_url), signer)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    files = tmp_path_factory.mktemp("status")
    root_signer, ica_signer = _signer("root"), _signer("ica")
    root = root_ca(root_signer, "status Root CA")
    ica = issuing_ca(ica_signer, root, root_signer, "status default Issuing CA", crl_url=PUBLICATION.crl_url(root))
    p = Pki(root, root_signer, ica, ica_signer, _leaf(ica, ica_signer, "good-dev"), _leaf(ica, ica_signer, "bad-dev"),
            files)
    for name, cert in (("root.pem", root), ("ica.pem", ica), ("good.pem", p.good), ("revoked.pem", p.revoked)):
        p.write(name, cert.public_bytes(Encoding.PEM))
    p.write("chain.pem", root.public_bytes(Encoding.PEM) + ica.public_bytes(Encoding.PEM))
    return p


def _openssl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)


# ---------------------------------------------------------------- the certificates that name them


def test_certificates_name_where_their_status_is_and_pass_pkilint(pki):
    def uris(cert: x509.Certificate, oid) -> list[str]:
        try:
            value = cert.extensions.get_extension_for_oid(oid).value
        except x509.ExtensionNotFound:
            return []
        if oid == ExtensionOID.CRL_DISTRIBUTION_POINTS:
            return [n.value for point in value for n in point.full_name]
        return [f"{d.access_method.dotted_string} {d.access_location.value}" for d in value]

    cdp, aia = ExtensionOID.CRL_DISTRIBUTION_POINTS, ExtensionOID.AUTHORITY_INFORMATION_ACCESS
    ocsp_oid = AuthorityInformationAccessOID.OCSP.dotted_string
    # a leaf: its CA's CRL and the OCSP responder, nothing else (no caIssuers: the device has its chain)
    assert uris(pki.good, cdp) == [PUBLICATION.crl_url(pki.ica)]
    assert uris(pki.good, aia) == [f"{ocsp_oid} http://127.0.0.1:8080/ocsp"]
    key_id = pki.ica.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert PUBLICATION.crl_url(pki.ica) == f"http://127.0.0.1:8080/crl/{key_id[:8].hex()}.crl"
    # an issuing CA: the root's CRL; the root: neither
    assert uris(pki.ica, cdp) == [PUBLICATION.crl_url(pki.root)] and uris(pki.ica, aia) == []
    assert uris(pki.root, cdp) == [] and uris(pki.root, aia) == []
    assert not any(pki.good.extensions.get_extension_for_oid(o).critical for o in (cdp, aia))
    for cert in (pki.good, pki.ica, pki.root):
        assert lint_certificate(cert.public_bytes(Encoding.DER)) == [], cert.subject
    assert len(pki.good.public_bytes(Encoding.DER)) < 700  # leaves stay small: two short URLs


def test_publication_urls_are_ones_pkilint_accepts():
    assert Publication.at("http", "localhost", 8080).base_url == "http://127.0.0.1:8080"  # one label: refused
    assert Publication.at("http", "dps.example.com", 80).ocsp_url == "http://dps.example.com/ocsp"
    assert Publication.at("https", "DPS.example.com", 443).base_url == "https://dps.example.com"
    assert Publication.at("http", "::1", 8080).base_url == "http://[::1]:8080"
    with pytest.raises(ValueError, match="fully qualified"):
        Publication.at("http", "myhost", 8080)


# ---------------------------------------------------------------- CRLs


def test_a_crl_lists_the_revoked_and_openssl_verifies_it(pki):
    now = datetime.now(UTC)
    revoked = [RevokedEntry(pki.revoked.serial_number, now - timedelta(minutes=1), "keyCompromise"),
               RevokedEntry(0x1234, now, "unspecified"), RevokedEntry(0x99, now, "superseded")]
    crl = build_crl(pki.ica_signer, pki.ica, revoked, this_update=now, next_update=now + HOURS)
    assert crl.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA384 and crl.is_signature_valid(
        pki.ica_signer.public_key())
    assert crl.issuer == pki.ica.subject and crl.next_update_utc == (now + HOURS).replace(microsecond=0)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == crl_number(now)
    ski = pki.ica.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == ski
    reasons = {}
    for entry in crl:
        try:
            reasons[entry.serial_number] = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        except x509.ExtensionNotFound:
            reasons[entry.serial_number] = None  # unspecified: left out (RFC 5280 5.3.1)
    assert reasons == {pki.revoked.serial_number: x509.ReasonFlags.key_compromise, 0x1234: None,
                       0x99: x509.ReasonFlags.superseded}
    der = crl.public_bytes(Encoding.DER)
    assert lint_crl(der, blocking_only=False) == []
    root_crl = build_crl(pki.root_signer, pki.root, [RevokedEntry(0x77, now, "cACompromise")], this_update=now,
                         next_update=now + HOURS)
    assert lint_crl(root_crl.public_bytes(Encoding.DER), blocking_only=False) == []
    ica_file, root_file = pki.write("ica.crl", der), pki.write("root.crl", root_crl.public_bytes(Encoding.DER))
    pki.write("crls.pem", crl.public_bytes(Encoding.PEM) + root_crl.public_bytes(Encoding.PEM))
    for crl_file, ca_file in ((ica_file, "chain.pem"), (root_file, "root.pem")):
        checked = run_openssl("crl", "-in", str(crl_file), "-inform", "DER", "-CAfile", ca_file, "-noout", cwd=pki.files)
        assert "verify OK" in checked.stdout + checked.stderr
    # a relying party checking both CRLs (the ICA's for the leaf, the root's for the ICA)
    refused = _openssl("verify", "-crl_check_all", "-CRLfile", "crls.pem", "-CAfile", "chain.pem", "revoked.pem",
                       cwd=pki.files)
    assert refused.returncode != 0 and "certificate revoked" in refused.stdout + refused.stderr, refused
    accepted = _openssl("verify", "-crl_check_all", "-CRLfile", "crls.pem", "-CAfile", "chain.pem", "good.pem",
                        cwd=pki.files)
    assert accepted.returncode == 0 and "good.pem: OK" in accepted.stdout, accepted
    # and a CRL signed by another key is not the CA's
    forged = build_crl(pki.root_signer, pki.root, [], this_update=now, next_update=now + HOURS)
    pki.write("forged.crl", forged.public_bytes(Encoding.DER).replace(pki.root.subject.public_bytes(),
                                                                      pki.ica.subject.public_bytes()))
    bad = _openssl("crl", "-in", "forged.crl", "-inform", "DER", "-CAfile", "chain.pem", "-noout", cwd=pki.files)
    assert "verify OK" not in bad.stdout + bad.stderr


def test_crl_numbers_grow_with_time_without_a_counter():
    """Boulder's scheme: thisUpdate in nanoseconds. Later is larger, within RFC 5280's 20 octets for centuries."""
    t = datetime(2026, 12, 6, 10, 0, 0, 123456, tzinfo=UTC)
    assert crl_number(t) == int(t.timestamp()) * 10**9 + 123456 * 1000
    assert crl_number(t) < crl_number(t + timedelta(microseconds=1)) < crl_number(t + timedelta(days=1))
    assert crl_number(datetime(2262, 1, 1, tzinfo=UTC)) < 1 << 63 < 1 << 159


def test_pkilint_catches_a_broken_crl_and_build_refuses_one(pki, monkeypatch):
    now = datetime.now(UTC)
    throwaway = ec.generate_private_key(ec.SECP384R1())
    broken = (x509.CertificateRevocationListBuilder().issuer_name(pki.ica.subject).last_update(now)
              .next_update(now + HOURS)  # no CRL number, no AKI, and a critical reason code
              .add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(5).revocation_date(now)
                                       .add_extension(x509.CRLReason(x509.ReasonFlags.unspecified), critical=True)
                                       .build())
              .sign(throwaway, hashes.SHA384()))
    codes = {f.code for f in lint_crl(broken.public_bytes(Encoding.DER))}
    assert {"pkix.crl_number_missing", "pkix.authority_key_identifier_missing",
            "pkix.crl_reason_code_extension_critical", "pkix.crl_unspecified_crl_entry_reason_code"} <= codes, codes
    # build_crl lints every CRL it would sign, and signs none with a finding
    seen: list[bytes] = []

    def recording(der: bytes) -> list[LintFinding]:
        seen.append(der)
        return lint_crl(broken.public_bytes(Encoding.DER)) if len(seen) == 2 else lint_crl(der)

    monkeypatch.setattr(crl_module, "lint_crl", recording)
    clean = build_crl(pki.ica_signer, pki.ica, [], this_update=now, next_update=now + HOURS)
    assert len(seen) == 1 and x509.load_der_x509_crl(seen[0]).tbs_certlist_bytes == clean.tbs_certlist_bytes
    with pytest.raises(LintRefused, match="crl_number_missing"):
        build_crl(pki.ica_signer, pki.ica, [], this_update=now, next_update=now + HOURS)


# ---------------------------------------------------------------- OCSP


def _request(cert: x509.Certificate, issuer: x509.Certificate, algorithm=None) -> bytes:
    return (x509_ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, algorithm or hashes.SHA1()).build()
            .public_bytes(Encoding.DER))


def test_ocsp_answers_good_revoked_and_unknown_and_openssl_verifies_them(pki):
    now = datetime.now(UTC)
    key_sha1 = hashlib.sha1(pki.ica.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)).digest()
    shapes = LintedShapes()
    answers = {}
    for name, cert, known, revoked in (
            ("good", pki.good, True, None),
            ("revoked", pki.revoked, True, RevokedEntry(pki.revoked.serial_number, now - HOURS, "keyCompromise")),
            ("unknown", pki.good, False, None)):
        query = parse_request(_request(cert, pki.ica))
        der = build_response(pki.ica_signer, pki.ica, query, known=known, revoked=revoked, this_update=now,
                             next_update=now + HOURS, shapes=shapes)
        assert lint_ocsp_response(der, blocking_only=False) == [], name
        answer = x509_ocsp.load_der_ocsp_response(der)
        assert answer.response_status == x509_ocsp.OCSPResponseStatus.SUCCESSFUL
        assert answer.responder_key_hash == key_sha1 and answer.responder_name is None  # byKey, the CA itself
        assert answer.certificates == [] and answer.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA384
        pki.ica_signer.public_key().verify(answer.signature, answer.tbs_response_bytes, ec.ECDSA(hashes.SHA384()))
        assert (answer.serial_number, answer.issuer_key_hash) == (cert.serial_number, key_sha1)
        assert answer.next_update_utc == (now + HOURS).replace(microsecond=0)
        answers[name] = answer
        pki.write(f"{name}.ocsp", der)
    assert answers["good"].certificate_status == x509_ocsp.OCSPCertStatus.GOOD
    assert answers["unknown"].certificate_status == x509_ocsp.OCSPCertStatus.UNKNOWN
    assert answers["revoked"].certificate_status == x509_ocsp.OCSPCertStatus.REVOKED
    assert answers["revoked"].revocation_reason == x509.ReasonFlags.key_compromise
    assert len(shapes) == 3  # one shape each: pkilint ran on each once
    for name, cert_file, says in (("good", "good.pem", "good.pem: good"), ("revoked", "revoked.pem", "revoked.pem: revoked")):
        out = run_openssl("ocsp", "-respin", f"{name}.ocsp", "-issuer", "ica.pem", "-cert", cert_file, "-CAfile",
                          "root.pem", "-no_nonce", cwd=pki.files)
        assert "Response verify OK" in out.stdout + out.stderr and says in out.stdout, out
    assert "Reason: keyCompromise" in run_openssl("ocsp", "-respin", "revoked.ocsp", "-issuer", "ica.pem", "-cert",
                                                   "revoked.pem", "-CAfile", "root.pem", "-no_nonce",
                                                   cwd=pki.files).stdout
    # a SHA-256 CertID is answered in kind
    query = parse_request(_request(pki.good, pki.ica, hashes.SHA256()))
    assert query.algorithm == "sha256"
    answer = x509_ocsp.load_der_ocsp_response(build_response(
        pki.ica_signer, pki.ica, query, known=True, revoked=None, this_update=now, next_update=now + HOURS))
    assert isinstance(answer.hash_algorithm, hashes.SHA256) and answer.certificate_status == x509_ocsp.OCSPCertStatus.GOOD


def test_pkilint_catches_a_broken_ocsp_response_and_every_new_shape_is_linted(pki, monkeypatch):
    now = datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP384R1())
    responder = (x509.CertificateBuilder().subject_name(pki.ica.subject).issuer_name(pki.ica.subject)
                 .public_key(key.public_key()).serial_number(1).not_valid_before(now)
                 .not_valid_after(now + HOURS).sign(key, hashes.SHA384()))
    broken = (x509_ocsp.OCSPResponseBuilder()
              .add_response(pki.good, pki.ica, hashes.SHA1(), x509_ocsp.OCSPCertStatus.GOOD, now, now - HOURS, None, None)
              .responder_id(x509_ocsp.OCSPResponderEncoding.HASH, responder)
              .sign(key, hashes.SHA384()).public_bytes(Encoding.DER))
    codes = {f.code for f in lint_ocsp_response(broken)}
    assert "pkix.ocsp_negative_validity_period" in codes, codes
    seen: list[bytes] = []

    def recording(der: bytes) -> list[LintFinding]:
        seen.append(der)
        return [LintFinding("ERROR", "test.refused", None, "oCSPResponse")] if len(seen) == 3 else []

    monkeypatch.setattr(ocsp_module, "lint_ocsp_response", recording)
    shapes = LintedShapes()
    query = parse_request(_request(pki.good, pki.ica))
    for _ in range(2):  # one shape: linted once
        build_response(pki.ica_signer, pki.ica, query, known=True, revoked=None, this_update=now,
                       next_update=now + HOURS, shapes=shapes)
    assert len(seen) == 1 and x509_ocsp.load_der_ocsp_response(seen[0]).serial_number == pki.good.serial_number
    build_response(pki.ica_signer, pki.ica, query, known=False, revoked=None, this_update=now, next_update=now + HOURS,
                   shapes=shapes)  # unknown: another shape
    with pytest.raises(LintRefused, match="test.refused"):  # a finding: nothing is signed
        build_response(pki.ica_signer, pki.ica, query, known=True,
                       revoked=RevokedEntry(pki.good.serial_number, now, "superseded"), this_update=now,
                       next_update=now + HOURS, shapes=shapes)


def test_malformed_requests_are_refused_and_error_answers_are_ocsp_statuses(pki):
    good = _request(pki.good, pki.ica)
    cert_id = der_module.tlv(0x30, bytes.fromhex("300906052b0e03021a0500") + der_module.tlv(0x04, bytes(20))
                             + der_module.tlv(0x04, bytes(20)) + der_module.tlv(0x02, b"\x05"))
    one = der_module.tlv(0x30, cert_id)
    two_requests = der_module.tlv(0x30, der_module.tlv(0x30, der_module.tlv(0x30, one + one)))
    assert parse_request(der_module.tlv(0x30, der_module.tlv(0x30, der_module.tlv(0x30, one)))).serial == 5
    for bad in (b"", b"garbage", good + b"\x00", good[:-3], two_requests, b"\x30" * 20000):
        with pytest.raises(MalformedOcspRequest):
            parse_request(bad)
    assert x509_ocsp.load_der_ocsp_response(MALFORMED_REQUEST).response_status \
        == x509_ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    assert x509_ocsp.load_der_ocsp_response(UNAUTHORIZED).response_status == x509_ocsp.OCSPResponseStatus.UNAUTHORIZED
    assert lint_ocsp_response(MALFORMED_REQUEST) == []
