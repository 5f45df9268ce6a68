"""Managed PKI: issuance with the real openssl CLI, exact certificate profiles, pre-issuance lint,
the CSR checks, key custody at rest and the "stored before returned" rule.

Every store-backed test runs on SQLite and PostgreSQL through the ``db_url`` fixture.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import subprocess
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID, SignatureAlgorithmOID
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

import opendps.pki.issuance as issuance_module
import opendps.pki.profiles as profiles_module
from conftest import run_openssl
from opendps.errors import ConfigurationError, OpenDPSError
from opendps.pki import IssuanceEngine, IssuanceRefused, KeyStore, lint_certificate
from opendps.pki.csr import CsrRejected, ValidatedCsr
from opendps.store import Base, CertificateAuthority, InstanceSetting, IssuedCertificate, WrappedKey

REG_ID = "dev-1"
SLACK = timedelta(seconds=2)
LEAF_EXTENSIONS = {
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
}


# ---------------------------------------------------------------- helpers


def _utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes (stored as UTC wall time); PostgreSQL aware ones."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _ext(cert: x509.Certificate | x509.CertificateSigningRequest, cls):
    return cert.extensions.get_extension_for_class(cls)


def _issued_count(store) -> int:
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(IssuedCertificate))


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def _ski_method1(public_key) -> bytes:
    """RFC 5280 4.2.1.2 method 1, computed independently: SHA-1 of the subjectPublicKey BIT STRING value."""
    return hashlib.sha1(public_key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)).digest()


def _openssl_csr(directory: Path, name: str, *, newkey: list[str], subj: str,
                 addext: tuple[str, ...] = ()) -> Path:
    args = ["req", "-new", *newkey, "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subj]
    for ext in addext:
        args += ["-addext", ext]
    run_openssl(*args, cwd=directory)
    return directory / f"{name}.csr"


P384 = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"]


@dataclass(frozen=True)
class Corpus:
    csrs: dict[str, bytes]
    p384_key: ec.EllipticCurvePrivateKey


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Corpus:
    """CSRs made once per session (mostly with the real openssl CLI), reused on both databases."""
    d = tmp_path_factory.mktemp("csrs")
    csrs: dict[str, bytes] = {}

    def make(name: str, **kwargs) -> None:
        csrs[name] = _openssl_csr(d, name, **kwargs).read_bytes()

    make("p384", newkey=P384, subj=f"/CN={REG_ID}")
    make("p256", newkey=["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"], subj=f"/CN={REG_ID}")
    make("p521", newkey=["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-521"], subj=f"/CN={REG_ID}")
    make("rsa2048", newkey=["-newkey", "rsa:2048"], subj=f"/CN={REG_ID}")
    make("ca_true", newkey=P384, subj=f"/CN={REG_ID}", addext=("basicConstraints=critical,CA:TRUE",))
    make("cn_mismatch", newkey=P384, subj="/CN=dev-2")
    make("two_cn", newkey=P384, subj=f"/CN={REG_ID}/CN={REG_ID}")
    make("no_cn", newkey=P384, subj="/O=acme")
    make("extra_subject", newkey=P384, subj=f"/C=US/O=Evil Corp/OU=ops/CN={REG_ID}")
    make("ext_request", newkey=P384, subj=f"/CN={REG_ID}",
         addext=("keyUsage=critical,keyCertSign,cRLSign,digitalSignature", "subjectAltName=DNS:evil.example",
                 "extendedKeyUsage=serverAuth", "basicConstraints=critical,CA:FALSE"))

    # a copy of the good CSR (as DER) whose signature no longer verifies
    p384 = x509.load_pem_x509_csr(csrs["p384"])
    der = p384.public_bytes(Encoding.DER)
    assert der.endswith(p384.signature)  # the signature BIT STRING is the last field
    bad = bytearray(der)
    bad[-1] ^= 0x01  # last octet of the ECDSA "s" INTEGER, inside the BIT STRING
    bad_csr = x509.load_der_x509_csr(bytes(bad))  # still parses...
    assert not bad_csr.is_signature_valid  # ...but no longer proves possession
    csrs["bad_signature"] = bytes(bad)
    csrs["truncated"] = der[: len(der) // 2]
    # parseable DER that cryptography refuses with its own exception types (not ValueError): these were a 500
    version_at = der.index(b"\x02\x01\x00")  # CertificationRequestInfo's version INTEGER 0
    csrs["bad_version"] = der[:version_at] + b"\x02\x01\x05" + der[version_at + 3:]
    csrs["unknown_curve"] = der.replace(b"\x06\x05\x2b\x81\x04\x00\x22", b"\x06\x05\x2b\x81\x04\x00\x5d", 1)
    csrs["unknown_key_type"] = der.replace(bytes.fromhex("06072a8648ce3d0201"), bytes.fromhex("06072a8648ce3d0202"), 1)
    csrs["garbage"] = b"\x13\x37 this is not a certificate signing request \xff\x00" * 4

    # oversize: a validly signed P-384 CSR just over 8 KiB of DER whose PEM is still under the
    # PEM allowance, so both the raw-size and the re-encoded-size checks get exercised
    key = ec.generate_private_key(ec.SECP384R1())
    n = 380
    while True:
        big = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, REG_ID)]))
               .add_extension(x509.SubjectAlternativeName(
                   [x509.DNSName(f"d{i:04}.example.com") for i in range(n)]), critical=False)
               .sign(key, hashes.SHA384()))
        if len(big.public_bytes(Encoding.DER)) > 8 * 1024 + 100:
            break
        n += 10
    csrs["oversize_der"] = big.public_bytes(Encoding.DER)
    csrs["oversize_pem"] = big.public_bytes(Encoding.PEM)
    assert len(csrs["oversize_pem"]) < 12 * 1024
    assert big.is_signature_valid

    p384_key = load_pem_private_key((d / "p384.key").read_bytes(), password=None)
    return Corpus(csrs, p384_key)


@dataclass
class Ns:
    name: str
    policy: str
    policy_id: int


@pytest.fixture
def issue(engine, registry):
    """Issue under a policy as it is now: the RA's two steps (load the policy's issuer, call the CA once)."""
    return lambda policy_id, csr, rid, **kw: engine.issue(registry.issuer(policy_id), csr, rid, **kw)


@pytest.fixture
def ns(registry) -> Ns:
    """A namespace whose first policy issues 7-day leaves."""
    registry.create_namespace("acme", "default", validity_days=7)
    return Ns("acme", "default", registry.find_policy("default", "acme").policy_id)


# ---------------------------------------------------------------- 1. happy path with openssl


def _write_chain(directory: Path, chain, prefix: str) -> None:
    for name, cert in zip(("leaf", "ica", "root"), chain.certificates, strict=True):
        (directory / f"{prefix}{name}.pem").write_bytes(cert.public_bytes(Encoding.PEM))


def test_issue_openssl_csr_pem_and_der_and_openssl_verifies_chain(issue, registry, ns, tmp_path):
    csr_path = _openssl_csr(tmp_path, "dev", newkey=P384, subj=f"/CN={REG_ID}")
    chain = issue(ns.policy_id, csr_path.read_bytes(), REG_ID)

    assert chain.root == registry.credential(ns.name).certificate
    assert chain.issuing_ca == registry.get_policy(ns.name, ns.policy).issuing_ca
    assert [x509.load_der_x509_certificate(d) for d in chain.der_chain()] == chain.certificates
    assert x509.load_pem_x509_certificates(chain.pem_chain().encode()) == chain.certificates
    _write_chain(tmp_path, chain, "")

    out = run_openssl("verify", "-x509_strict", "-purpose", "sslclient", "-CAfile", "root.pem",
                      "-untrusted", "ica.pem", "leaf.pem", cwd=tmp_path)
    assert out.stdout.strip() == "leaf.pem: OK"

    # negative controls: the leaf is no server certificate, and the ICA is needed to build the path
    server = subprocess.run(["openssl", "verify", "-purpose", "sslserver", "-CAfile", "root.pem",
                             "-untrusted", "ica.pem", "leaf.pem"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert server.returncode != 0
    no_ica = subprocess.run(["openssl", "verify", "-CAfile", "root.pem", "leaf.pem"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert no_ica.returncode != 0

    # the leaf certifies the key openssl generated (checked by cryptography and by openssl)
    device_key = load_pem_private_key((tmp_path / "dev.key").read_bytes(), password=None)
    assert chain.leaf.public_key() == device_key.public_key()
    leaf_pub = run_openssl("x509", "-in", "leaf.pem", "-noout", "-pubkey", cwd=tmp_path).stdout
    key_pub = run_openssl("pkey", "-in", "dev.key", "-pubout", cwd=tmp_path).stdout
    assert leaf_pub == key_pub

    # the same request as DER bytes
    run_openssl("req", "-in", "dev.csr", "-outform", "DER", "-out", "dev.der", cwd=tmp_path)
    der = (tmp_path / "dev.der").read_bytes()
    assert der[0] == 0x30 and not der.startswith(b"-----")
    from_der = issue(ns.policy_id, der, REG_ID)
    assert from_der.leaf.public_key() == device_key.public_key()
    assert from_der.leaf.serial_number != chain.leaf.serial_number
    _write_chain(tmp_path, from_der, "der-")
    out = run_openssl("verify", "-x509_strict", "-purpose", "sslclient", "-CAfile", "der-root.pem",
                      "-untrusted", "der-ica.pem", "der-leaf.pem", cwd=tmp_path)
    assert out.stdout.strip() == "der-leaf.pem: OK"


# ---------------------------------------------------------------- 2. exact profiles


def test_leaf_profile(issue, ns, corpus):
    before = datetime.now(UTC)
    chain = issue(ns.policy_id, corpus.csrs["p384"], REG_ID)
    after = datetime.now(UTC)
    leaf, ica = chain.leaf, chain.issuing_ca

    assert leaf.version == x509.Version.v3
    assert 2**127 <= leaf.serial_number < 2**128
    # validity: backdated a little, never in the future, exactly the policy's 7 days, inside the ICA's
    nb, na = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    assert before - timedelta(minutes=5) - SLACK <= nb <= after
    assert na - nb == timedelta(days=7)
    assert na <= ica.not_valid_after_utc
    assert nb >= ica.not_valid_before_utc
    # subject: exactly CN=<registration id>; issuer: the ICA
    assert leaf.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, REG_ID)])
    assert len(leaf.subject.rdns) == 1
    assert leaf.issuer == ica.subject
    # extensions: exactly these five
    assert {e.oid for e in leaf.extensions} == LEAF_EXTENSIONS
    assert len(leaf.extensions) == 5
    bc = _ext(leaf, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False and bc.value.path_length is None
    ku = _ext(leaf, x509.KeyUsage)
    assert ku.critical
    assert ku.value == x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False)
    assert list(_ext(leaf, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ski = _ext(leaf, x509.SubjectKeyIdentifier).value.digest
    assert ski == _ski_method1(leaf.public_key())
    assert ski == _ski_method1(corpus.p384_key.public_key())
    aki = _ext(leaf, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == _ext(ica, x509.SubjectKeyIdentifier).value.digest
    assert aki.authority_cert_issuer is None and aki.authority_cert_serial_number is None
    # key and signature
    assert leaf.public_key() == corpus.p384_key.public_key()
    assert leaf.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA384
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA384)
    leaf.verify_directly_issued_by(ica)
    with pytest.raises(ValueError):  # issuer name is not the root's
        leaf.verify_directly_issued_by(chain.root)

    # a second certificate gets a different serial
    other = issue(ns.policy_id, corpus.csrs["p384"], REG_ID).leaf
    assert other.serial_number != leaf.serial_number
    assert 2**127 <= other.serial_number < 2**128


def test_ca_profiles_and_lint_clean_chain(issue, registry, ns, corpus):
    root = registry.credential(ns.name).certificate
    ica = registry.get_policy(ns.name, ns.policy).issuing_ca

    ca_ku = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False)
    for cert, pathlen in ((root, 1), (ica, 0)):
        assert cert.version == x509.Version.v3
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert cert.public_key().curve.name == "secp384r1"
        assert cert.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA384
        bc = _ext(cert, x509.BasicConstraints)
        assert bc.critical and bc.value.ca is True and bc.value.path_length == pathlen
        ku = _ext(cert, x509.KeyUsage)
        assert ku.critical and ku.value == ca_ku
        assert _ext(cert, x509.SubjectKeyIdentifier).value.digest == _ski_method1(cert.public_key())
        assert 2**127 <= cert.serial_number < 2**128

    # root: self-signed, AKI = its own SKI
    assert root.issuer == root.subject
    root.verify_directly_issued_by(root)
    assert (_ext(root, x509.AuthorityKeyIdentifier).value.key_identifier
            == _ext(root, x509.SubjectKeyIdentifier).value.digest)
    # ICA: signed by the root, AKI = root SKI, inside the root's validity
    assert ica.issuer == root.subject
    assert ica.subject != root.subject
    ica.verify_directly_issued_by(root)
    assert (_ext(ica, x509.AuthorityKeyIdentifier).value.key_identifier
            == _ext(root, x509.SubjectKeyIdentifier).value.digest)
    assert ica.public_key() != root.public_key()
    assert ica.not_valid_after_utc <= root.not_valid_after_utc
    # the chain an issuance returns is exactly these
    chain = issue(ns.policy_id, corpus.csrs["p384"], REG_ID)
    assert chain.root == root and chain.issuing_ca == ica

    # pkilint: nothing at WARNING or worse for leaf, ICA and root
    for cert in chain.certificates:
        assert lint_certificate(_der(cert)) == []
        # the linter really ran over the document: it reports informational findings only
        everything = lint_certificate(_der(cert), blocking_only=False)
        assert everything, "pkilint produced no findings at all: did it run?"
        assert {f.severity for f in everything} <= {"INFO", "NOTICE", "DEBUG"}


def test_validity_follows_policy_and_policy_updates(issue, registry, ns, corpus):
    registry.put_policy(ns.name, "short", validity_days=1)
    short_id = registry.find_policy("short", ns.name).policy_id
    assert short_id != ns.policy_id

    week = issue(ns.policy_id, corpus.csrs["p384"], REG_ID).leaf
    day = issue(short_id, corpus.csrs["p384"], REG_ID)
    assert week.not_valid_after_utc - week.not_valid_before_utc == timedelta(days=7)
    assert day.leaf.not_valid_after_utc - day.leaf.not_valid_before_utc == timedelta(days=1)
    # each policy signs with its own issuing CA
    assert day.issuing_ca == registry.get_policy(ns.name, "short").issuing_ca
    assert day.issuing_ca != registry.get_policy(ns.name, ns.policy).issuing_ca
    day.leaf.verify_directly_issued_by(day.issuing_ca)

    # updating the policy changes certificates issued afterwards (and keeps the issuing CA)
    ica_before = registry.get_policy(ns.name, ns.policy).issuing_ca
    view, created = registry.put_policy(ns.name, ns.policy, validity_days=3)
    assert not created and view.validity_days == 3
    after = issue(ns.policy_id, corpus.csrs["p384"], REG_ID)
    assert after.leaf.not_valid_after_utc - after.leaf.not_valid_before_utc == timedelta(days=3)
    assert after.issuing_ca == ica_before
    registry.put_policy(ns.name, ns.policy, validity_days=90)
    longest = issue(ns.policy_id, corpus.csrs["p384"], REG_ID).leaf
    assert longest.not_valid_after_utc - longest.not_valid_before_utc == timedelta(days=90)


def test_leaf_never_outlives_issuing_ca(issue, store, ns, corpus):
    ica = issue(ns.policy_id, corpus.csrs["p384"], REG_ID).issuing_ca
    end = ica.not_valid_after_utc
    # two days before the ICA expires, a 7-day policy is cut to the ICA's notAfter
    late = issue(ns.policy_id, corpus.csrs["p384"], REG_ID, now=end - timedelta(days=2)).leaf
    assert late.not_valid_after_utc == end
    assert end - timedelta(days=2, minutes=5) - SLACK <= late.not_valid_before_utc <= end - timedelta(days=2)
    assert late.not_valid_after_utc - late.not_valid_before_utc < timedelta(days=7)
    late.verify_directly_issued_by(ica)
    # once the ICA has expired, nothing is signed
    count = _issued_count(store)
    with pytest.raises(IssuanceRefused, match="expired"):
        issue(ns.policy_id, corpus.csrs["p384"], REG_ID, now=end + timedelta(seconds=1))
    assert _issued_count(store) == count


# ---------------------------------------------------------------- 3. pkilint


def _self_signed(key, *, ca: bool, key_cert_sign: bool, aki: bool):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lint probe")])
    now = datetime.now(UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now).not_valid_after(now + timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=False,
                                      key_encipherment=False, data_encipherment=False, key_agreement=False,
                                      key_cert_sign=key_cert_sign, crl_sign=ca, encipher_only=False,
                                      decipher_only=False), critical=True)
         .add_extension(ski, critical=False))
    if aki:
        aki_ext = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        b = b.add_extension(aki_ext, critical=False)
    return _der(b.sign(key, hashes.SHA384()))


@pytest.mark.parametrize(("kwargs", "code"), [
    ({"ca": True, "key_cert_sign": False, "aki": True}, "pkix.ca_certificate_keycertsign_keyusage_not_set"),
    ({"ca": False, "key_cert_sign": False, "aki": False}, "pkix.authority_key_identifier_extension_absent"),
    ({"ca": False, "key_cert_sign": True, "aki": True}, "pkix.ee_certificate_keycertsign_keyusage_set"),
], ids=["ca-without-keyCertSign", "no-aki", "ee-with-keyCertSign"])
def test_lint_flags_bad_certificates(kwargs, code):
    key = ec.generate_private_key(ec.SECP384R1())
    findings = lint_certificate(_self_signed(key, **kwargs))
    assert code in {f.code for f in findings}
    assert all(f.severity in {"WARNING", "ERROR", "FATAL"} for f in findings)
    assert code in str(next(f for f in findings if f.code == code))
    # control: the same certificate done right is clean
    fixed = {"ca": kwargs["ca"], "key_cert_sign": kwargs["ca"], "aki": True}
    assert lint_certificate(_self_signed(key, **fixed)) == []


LINT_INJECTIONS = [
    ("error-name-constraints-in-ee",
     x509.NameConstraints(permitted_subtrees=[x509.DNSName("example.com")], excluded_subtrees=None),
     "pkix.name_constraints_in_ee_certificate"),
    # a WARNING alone is enough to refuse
    ("warning-critical-ian", x509.IssuerAlternativeName([x509.DNSName("ca.example")]),
     "pkix.issuer_alt_name_extension_critical"),
]


def test_engine_refuses_when_lint_finds_something(issue, registry, store, keys, ns, corpus, monkeypatch, subtests):
    real = issuance_module.leaf_builder
    for label, extension, code in LINT_INJECTIONS:
        with subtests.test(msg=label):
            def tampered(*args, _extension=extension, **kwargs):
                return real(*args, **kwargs).add_extension(_extension, critical=True)

            monkeypatch.setattr(issuance_module, "leaf_builder", tampered)
            before = _issued_count(store)
            with pytest.raises(IssuanceRefused) as exc_info:
                issue(ns.policy_id, corpus.csrs["p384"], REG_ID)
            assert code in str(exc_info.value)
            assert "lint" in str(exc_info.value)
            assert _issued_count(store) == before
            # control: without lint the tampered profile would have been signed
            unlinted = IssuanceEngine(store, keys, lint=False).issue(registry.issuer(ns.policy_id), corpus.csrs["p384"],
                                                                     REG_ID)
            assert unlinted.leaf.extensions.get_extension_for_oid(extension.oid).critical


def _csr(registration_id: str) -> bytes:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, registration_id)])
    return x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA384()).public_bytes(Encoding.DER)


def test_pkilint_runs_once_per_leaf_shape_and_again_when_the_profile_changes(engine, registry, store, ns, corpus,
                                                                                monkeypatch):
    """Issue 13.3: the first leaf of each shape is linted in full, later ones of the same shape are not; a profile
    change is a new shape, so a profile pkilint rejects still stops issuance after clean leaves were cached."""
    linted: list[bytes] = []
    real_lint = profiles_module.lint_certificate

    def counting(der: bytes, **kw):
        linted.append(der)
        return real_lint(der, **kw)

    monkeypatch.setattr(profiles_module, "lint_certificate", counting)
    issuer = registry.issuer(ns.policy_id)
    for rid in ("dev-1", "dev-2", "dev-3", "DEV-4"):  # same CN length: one shape
        engine.issue(issuer, _csr(rid), rid)
    assert len(linted) == 1
    engine.issue(issuer, _csr("device-10"), "device-10")  # another CN length: another shape, linted once
    engine.issue(issuer, _csr("device-11"), "device-11")
    assert len(linted) == 2 and _issued_count(store) == 6

    real_builder = issuance_module.leaf_builder
    monkeypatch.setattr(issuance_module, "leaf_builder", lambda *a, **kw: real_builder(*a, **kw).add_extension(
        x509.IssuerAlternativeName([x509.DNSName("ca.example")]), critical=True))
    with pytest.raises(IssuanceRefused, match="pkix.issuer_alt_name_extension_critical"):
        engine.issue(issuer, _csr("dev-5"), "dev-5")
    assert len(linted) == 3 and _issued_count(store) == 6


def test_every_leaf_gets_the_value_checks_its_shape_cannot_vouch_for(engine, registry, store, ns, monkeypatch):
    """A leaf whose shape has a template but whose validity is empty is refused, though pkilint is not asked."""
    issuer = registry.issuer(ns.policy_id)
    engine.issue(issuer, _csr("dev-1"), "dev-1")  # the shape's template
    linted: list[bytes] = []
    monkeypatch.setattr(profiles_module, "lint_certificate", lambda der, **kw: linted.append(der) or [])
    monkeypatch.setattr(profiles_module, "leaf_validity", lambda now, days, ca: (now, now))
    with pytest.raises(IssuanceRefused, match="notAfter is not after notBefore"):
        engine.issue(issuer, _csr("dev-2"), "dev-2")
    assert _issued_count(store) == 1 and linted == []


def _leaf_tbs(ca, ca_key, rid: str, key, now: datetime, serial: int, **urls) -> tuple[bytes, tuple[bytes, ...]]:
    """What the builder makes for these values (the TBS of the leaf) and the values as a template takes them."""
    built = profiles_module.leaf_builder(key, rid, ca, ca_key, 7, now=now, serial=serial, **urls)
    tbs = built.sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA384()).tbs_certificate_bytes
    return tbs, profiles_module.leaf_values(serial, *profiles_module.leaf_validity(now, 7, ca), rid, key)


@pytest.mark.parametrize("variant", ["p384", "p256", "urls", "generalized-time"])
def test_a_template_filled_in_is_byte_for_byte_what_the_builder_makes(engine, registry, ns, variant):
    """Issue 13.3: a later leaf of a shape is its template with the leaf's own values written in; for other serials,
    dates, CNs (of the same length) and keys it is exactly the TBS the profile's builder makes."""
    issuer = registry.issuer(ns.policy_id)
    ca, now = issuer.certificate, datetime.now(UTC)
    curve = ec.SECP256R1() if variant == "p256" else ec.SECP384R1()
    urls = {"crl_url": "http://pki.test/crl/ica.crl", "ocsp_url": "http://pki.test/ocsp"} if variant == "urls" else {}
    if variant == "generalized-time":  # notAfter from 2050 on is a GeneralizedTime (the root lives long enough)
        ca, now = issuer.root, datetime(2049, 12, 30, tzinfo=UTC)
    first_key = ec.generate_private_key(curve).public_key()
    tbs, values = _leaf_tbs(ca, ca.public_key(), "dev-0001", first_key, now, profiles_module.random_serial(), **urls)
    template = profiles_module.LeafTemplate.of(tbs, values)
    assert template is not None and template.fill(values) == tbs
    for i, rid in enumerate(("DEV-0002", "abc.xyz9", "a" * 8)):
        key = ec.generate_private_key(curve).public_key()
        expected, values = _leaf_tbs(ca, ca.public_key(), rid, key, now + timedelta(minutes=7 * i + 1),
                                     profiles_module.random_serial(), **urls)
        assert template.fill(values) == expected
    longer = _leaf_tbs(ca, ca.public_key(), "dev-00010", first_key, now, profiles_module.random_serial(), **urls)[1]
    with pytest.raises(ValueError, match="another shape"):  # another CN length is another template
        template.fill(longer)


def test_leaves_made_from_a_template_are_whole_certificates_pkilint_passes(engine, registry, ns):
    issuer = registry.issuer(ns.policy_id)
    chains = [engine.issue(issuer, _csr(rid), rid) for rid in ("dev-1", "dev-2", "dev-3")]
    assert len(engine.templates) == 1  # one shape: the first leaf built and linted, the others filled in
    assert len({c.leaf.serial_number for c in chains}) == 3
    for chain, rid in zip(chains, ("dev-1", "dev-2", "dev-3"), strict=True):
        leaf = chain.leaf
        leaf.verify_directly_issued_by(chain.issuing_ca)
        assert leaf.subject.rfc4514_string() == f"CN={rid}"
        assert lint_certificate(leaf.public_bytes(Encoding.DER)) == []
        ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert ski == x509.SubjectKeyIdentifier.from_public_key(leaf.public_key())


def test_a_ca_key_that_is_not_its_certificates_issues_nothing(engine, registry, store, ns, keys):
    """The first leaf of a shape is verified with the issuing certificate's key, not the signer's own: a key mixed
    up with another CA's (here a fresh software key under the policy's issuer) signs nothing, and leaves no
    template behind for later leaves to skip the check with."""
    issuer = registry.issuer(ns.policy_id)
    with store.session() as s:
        stray = keys.generate(s, "stray-key")
        s.commit()
    mixed_up = replace(issuer, key_id=stray.key_id)
    for rid in ("dev-1", "dev-2"):
        with pytest.raises(InvalidSignature):
            engine.issue(mixed_up, _csr(rid), rid)
    assert len(engine.templates) == 0 and _issued_count(store) == 0
    engine.issue(issuer, _csr("dev-3"), "dev-3")  # the right key still issues
    assert _issued_count(store) == 1


class _FaultySigner:
    """An external signer (as a PKCS#11 token is) whose signatures go bad after its first."""

    def __init__(self, inner) -> None:
        self.key_id, self.inner, self.calls = inner.key_id, inner, 0

    def public_key(self):
        return self.inner.public_key()

    def sign(self, data: bytes) -> bytes:
        self.calls += 1
        good = self.inner.sign(data)
        return good if self.calls == 1 else self.inner.sign(data + b"fault")


def test_each_leaf_from_an_external_signer_is_verified_and_in_process_keys_per_shape(engine, registry, store, ns,
                                                                                     monkeypatch):
    """Issue 13: a CA key in process memory (OpenSSL's ECDSA) has its first leaf of each shape verified against the
    issuing certificate; a signer outside the process (a PKCS#11 token) has every leaf verified, so a token that
    starts to return bad signatures issues nothing more."""
    issuer = registry.issuer(ns.policy_id)
    verified: list[bytes] = []
    real_sign_tbs = profiles_module.sign_tbs

    def spy(tbs, signer, **kw):
        if kw.get("verify", True):
            verified.append(tbs)
        return real_sign_tbs(tbs, signer, **kw)

    monkeypatch.setattr(profiles_module, "sign_tbs", spy)
    for rid in ("dev-1", "dev-2", "dev-3"):  # one shape
        engine.issue(issuer, _csr(rid), rid).leaf.verify_directly_issued_by(issuer.certificate)
    assert len(verified) == 1

    faulty = _FaultySigner(engine.keys.signer(issuer.key_id))
    monkeypatch.setattr(engine.keys, "signer", lambda key_id: faulty)
    engine.issue(issuer, _csr("dev-4"), "dev-4")  # the template exists: a good signature, verified all the same
    assert len(verified) == 2 and _issued_count(store) == 4
    with pytest.raises(InvalidSignature):
        engine.issue(issuer, _csr("dev-5"), "dev-5")
    assert _issued_count(store) == 4


# ---------------------------------------------------------------- 4. bad CSRs

BAD_CSRS = [
    # (corpus entry, registration id, substrings the message must name)
    ("garbage", REG_ID, ["pars"]),
    ("truncated", REG_ID, ["pars"]),
    ("bad_version", REG_ID, ["version 5"]),
    ("unknown_curve", REG_ID, ["unsupported type", "1.3.132.0.93"]),
    ("unknown_key_type", REG_ID, ["unsupported type", "1.2.840.10045.2.2"]),
    ("bad_signature", REG_ID, ["signature"]),
    ("cn_mismatch", REG_ID, ["CN", "dev-2", REG_ID]),
    ("p384", "dev-10", ["CN", "dev-10"]),
    ("rsa2048", REG_ID, ["RSA", "2048"]),
    ("p256", REG_ID, ["P-256", "P-384"]),
    ("p521", REG_ID, ["P-521"]),
    ("ca_true", REG_ID, ["CA:TRUE"]),
    ("oversize_der", REG_ID, ["larger", "8192"]),
    ("oversize_pem", REG_ID, ["larger", "8192"]),
    ("two_cn", REG_ID, ["one CN", "2"]),
    ("no_cn", REG_ID, ["one CN", "0"]),
]


def test_bad_csrs_rejected_and_nothing_stored(issue, store, ns, corpus, subtests):
    for entry, registration_id, words in BAD_CSRS:
        with subtests.test(msg=entry):
            before = _issued_count(store)
            with pytest.raises(OpenDPSError) as exc_info:
                issue(ns.policy_id, corpus.csrs[entry], registration_id)
            err = exc_info.value
            assert err.status == 400
            for word in words:
                assert word in err.message, f"{entry}: {err.message!r} does not name {word!r}"
            assert err.message == str(err)
            assert _issued_count(store) == before
    assert _issued_count(store) == 0


def test_the_ca_signs_only_the_check_result_made_for_that_csr(engine, registry, store, ns, corpus):
    """Issue 13.4: `issue` does not take the RA's check result on trust. A result made for another CSR, another
    registration id, with another key swapped in, or assembled by hand gets no certificate; the real one does."""
    issuer = registry.issuer(ns.policy_id)
    checked = issuer.validate(corpus.csrs["p384"], REG_ID)
    other_csr = issuer.validate(corpus.csrs["extra_subject"], REG_ID)
    stranger = ec.generate_private_key(ec.SECP384R1()).public_key()
    forged = [
        ("another registration id", replace(checked, registration_id="dev-2"), "dev-2"),
        ("another CSR's seal", replace(checked, seal=other_csr.seal), REG_ID),
        ("another key", replace(checked, public_key=stranger), REG_ID),
        ("another CSR, same key", replace(other_csr, csr=checked.csr, public_key=checked.public_key), REG_ID),
        ("assembled by hand", ValidatedCsr(checked.csr, stranger, "secp384r1", REG_ID), REG_ID),
    ]
    for label, result, rid in forged:
        with pytest.raises(CsrRejected):
            engine.issue(issuer, result, rid)
        assert _issued_count(store) == 0, label
    with pytest.raises(CsrRejected, match="validated for"):
        engine.issue(issuer, checked, "dev-2")  # the right result, presented for another device
    chain = engine.issue(issuer, checked, REG_ID)
    assert chain.leaf.public_key() == checked.csr.public_key() and _issued_count(store) == 1


@pytest.mark.filterwarnings("ignore:Attribute's length must be:UserWarning")
def test_overlong_registration_id_gets_a_clear_error(issue, store, ns):
    registration_id = "d" * 65  # Azure DPS registration ids may be up to 128 characters
    key = ec.generate_private_key(ec.SECP384R1())
    with pytest.warns(UserWarning):  # cryptography itself says the CN is too long
        cn = x509.NameAttribute(NameOID.COMMON_NAME, registration_id, _validate=False)
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([cn])).sign(key, hashes.SHA384())
    with pytest.raises(OpenDPSError) as exc_info:
        issue(ns.policy_id, csr.public_bytes(Encoding.DER), registration_id)
    assert "64" in exc_info.value.message
    assert _issued_count(store) == 0


def test_p256_only_when_policy_allows(issue, registry, store, ns, corpus):
    with pytest.raises(OpenDPSError, match="P-256"):
        issue(ns.policy_id, corpus.csrs["p256"], REG_ID)
    assert _issued_count(store) == 0

    registry.put_policy(ns.name, ns.policy, allow_p256=True)
    chain = issue(ns.policy_id, corpus.csrs["p256"], REG_ID)
    assert chain.leaf.public_key().curve.name == "secp256r1"
    assert chain.leaf.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA384
    chain.leaf.verify_directly_issued_by(chain.issuing_ca)
    assert lint_certificate(_der(chain.leaf)) == []
    # P-521 stays refused even then
    with pytest.raises(OpenDPSError, match="P-521"):
        issue(ns.policy_id, corpus.csrs["p521"], REG_ID)
    assert _issued_count(store) == 1

    registry.put_policy(ns.name, ns.policy, allow_p256=False)
    with pytest.raises(OpenDPSError, match="P-256"):
        issue(ns.policy_id, corpus.csrs["p256"], REG_ID)
    assert _issued_count(store) == 1


def test_csr_extensions_and_subject_are_not_copied(issue, ns, corpus):
    requested = x509.load_pem_x509_csr(corpus.csrs["ext_request"])
    # the CSR really asks for these (so the test can fail)
    assert _ext(requested, x509.KeyUsage).value.key_cert_sign
    san = _ext(requested, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["evil.example"]
    assert list(_ext(requested, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]

    leaf = issue(ns.policy_id, corpus.csrs["ext_request"], REG_ID).leaf
    assert {e.oid for e in leaf.extensions} == LEAF_EXTENSIONS
    ku = _ext(leaf, x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign and not ku.crl_sign
    assert list(_ext(leaf, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        _ext(leaf, x509.SubjectAlternativeName)
    assert leaf.public_key() == requested.public_key()

    # extra subject attributes in the CSR do not reach the certificate either
    requested = x509.load_pem_x509_csr(corpus.csrs["extra_subject"])
    assert requested.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    leaf = issue(ns.policy_id, corpus.csrs["extra_subject"], REG_ID).leaf
    assert leaf.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, REG_ID)])


def test_issue_for_unknown_or_deleted_policy_refused(issue, registry, store, ns, corpus):
    with pytest.raises(OpenDPSError, match="does not exist"):
        issue(ns.policy_id + 1000, corpus.csrs["p384"], REG_ID)
    registry.put_policy(ns.name, "doomed", validity_days=5)
    doomed = registry.find_policy("doomed", ns.name).policy_id
    issue(doomed, corpus.csrs["p384"], REG_ID)
    registry.delete_policy(ns.name, "doomed")
    with pytest.raises(OpenDPSError):
        issue(doomed, corpus.csrs["p384"], REG_ID)
    assert _issued_count(store) == 1


# ---------------------------------------------------------------- 5. key custody


def _ca_key_ids(store) -> list[str]:
    with store.session() as s:
        return list(s.scalars(select(CertificateAuthority.key_id).order_by(CertificateAuthority.id)))


def _raw_database_bytes(store, db_url: str) -> bytes:
    """Every value of every table as stored, plus (SQLite) the database and WAL files themselves."""
    parts: list[bytes] = []
    with store.engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            for row in conn.execute(select(table)):
                for value in row:
                    if isinstance(value, bytes | bytearray | memoryview):
                        parts.append(bytes(value))
                    elif value is not None:
                        parts.append(str(value).encode())
    if store.dialect == "sqlite":
        path = Path(db_url.split("///", 1)[1])
        for f in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-journal")):
            if f.exists():
                parts.append(f.read_bytes())
    return b"\x00".join(parts)


def _wrapped_rows(store) -> dict:
    with store.session() as s:
        keys = {k.id: (bytes(k.blob), bytes(k.public_key), k.backend, k.algorithm)
                for k in s.scalars(select(WrappedKey))}
        cas = {c.id: (bytes(c.der), c.key_id, c.status) for c in s.scalars(select(CertificateAuthority))}
        settings = {x.name: x.value for x in s.scalars(select(InstanceSetting))}
    return {"keys": keys, "cas": cas, "settings": settings}


def test_ca_private_keys_never_stored_in_clear(store, keys, master_key, db_url, ns):
    key_ids = _ca_key_ids(store)
    assert len(key_ids) == 2  # root + issuing CA
    raw = _raw_database_bytes(store, db_url)
    rows = _wrapped_rows(store)
    for key_id in key_ids:
        private = keys.signer(key_id)._key
        pkcs8 = private.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())
        scalar = private.private_numbers().private_value.to_bytes(48, "big")
        sec1 = private.private_bytes(Encoding.DER, PrivateFormat.TraditionalOpenSSL, NoEncryption())
        needles = [pkcs8, scalar, sec1, pkcs8.hex().encode(), scalar.hex().encode(), base64.b64encode(pkcs8),
                   base64.b64encode(scalar)]
        leaked = [i for i, needle in enumerate(needles) if needle in raw]
        assert leaked == [], f"private key material of {key_id} (forms {leaked}) is readable in the database"
        # positive controls: what we scan does hold the wrapped blob and the public key
        blob, spki, backend, algorithm = rows["keys"][key_id]
        assert blob in raw
        assert spki == private.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        assert (backend, algorithm) == ("software", "EC-P384")
        assert len(blob) == 12 + len(pkcs8) + 16  # nonce || AES-GCM ciphertext || tag
        # and the blob really is that key: a fresh key store with the right master key unwraps it
        fresh = KeyStore(store, master_key).signer(key_id)
        assert fresh._key.private_numbers() == private.private_numbers()


def test_wrong_master_key_cannot_unwrap_and_changes_nothing(registry, store, keys, ns, corpus):
    before = _wrapped_rows(store)
    other = KeyStore(store, secrets.token_bytes(32))
    for key_id in _ca_key_ids(store):
        with pytest.raises(ConfigurationError, match="master key"):
            other.signer(key_id)
    with pytest.raises(ConfigurationError, match="master key"):
        other.check_master_key()
    with pytest.raises(ConfigurationError, match="master key"):
        IssuanceEngine(store, other).issue(registry.issuer(ns.policy_id), corpus.csrs["p384"], REG_ID)
    assert _issued_count(store) == 0
    assert _wrapped_rows(store) == before
    # the right key still works
    keys.check_master_key()
    IssuanceEngine(store, keys).issue(registry.issuer(ns.policy_id), corpus.csrs["p384"], REG_ID)


def test_wrapped_blob_bound_to_its_key_id(store, keys, master_key, ns):
    a, b = _ca_key_ids(store)
    with store.session() as s:
        blob_a = bytes(s.get(WrappedKey, a).blob)
        s.execute(update(WrappedKey).where(WrappedKey.id == b).values(blob=blob_a))
    fresh = KeyStore(store, master_key)  # nothing cached
    with pytest.raises(ConfigurationError, match=b):
        fresh.signer(b)
    # the blob itself is intact: under its own id it still unwraps
    assert fresh.signer(a)._key.private_numbers() == keys.signer(a)._key.private_numbers()


# ---------------------------------------------------------------- 6. stored before returned


def test_issued_certificate_is_stored(issue, store, ns, corpus):
    chain = issue(ns.policy_id, corpus.csrs["p384"], REG_ID)
    leaf = chain.leaf
    with store.session() as s:
        row = s.scalars(select(IssuedCertificate).where(
            IssuedCertificate.serial == format(leaf.serial_number, "x"))).one()
        ica_row = s.get(CertificateAuthority, row.issuing_ca_id)
        assert bytes(row.der) == _der(leaf)
        assert row.sha256 == hashlib.sha256(_der(leaf)).hexdigest()
        assert row.registration_id == REG_ID
        assert row.policy_id == ns.policy_id
        assert _utc(row.not_before) == leaf.not_valid_before_utc
        assert _utc(row.not_after) == leaf.not_valid_after_utc
        assert bytes(ica_row.der) == _der(chain.issuing_ca)
        assert ica_row.kind == "issuing"
    assert _issued_count(store) == 1


def test_issue_fails_if_the_certificate_cannot_be_stored(issue, store, ns, corpus, monkeypatch):
    serial = (1 << 127) | secrets.randbits(64)
    monkeypatch.setattr(profiles_module, "random_serial", lambda: serial)
    first = issue(ns.policy_id, corpus.csrs["p384"], REG_ID).leaf
    assert first.serial_number == serial
    # a second certificate with the same serial cannot be recorded, so it must not be returned
    with pytest.raises((IntegrityError, OpenDPSError)):
        issue(ns.policy_id, corpus.csrs["p384"], "dev-1")
    with store.session() as s:
        rows = s.scalars(select(IssuedCertificate)).all()
    assert [bytes(r.der) for r in rows] == [_der(first)]
