"""DPS CA certificates with proof of possession, driven by the seed's openssl commands.

The seed document (x509-csr-workflow.txt) steps 2, 4, 5 and 6 are run here verbatim (PowerShell
translated to argv lists): a root CA, an intermediate CA signed by it, verification certificates whose
CN is the verification code, and a device (leaf) certificate. Every test runs on SQLite and PostgreSQL.

RSA-4096 key generation is slow, so the seed's PKI is made once per module (its key generations run
concurrently) and the per-test timeout covers the test body only, not that one-time setup.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import itertools
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import run_openssl
from opendps.errors import Conflict, InvalidInput, NotFound, OpenDPSError, PreconditionFailed
from opendps.pki import CaCertificates
from seed import DEVICE_EXT, INTERMEDIATE_EXT, REGISTRATION_ID

pytestmark = pytest.mark.timeout(120, func_only=True)

ROOT_NAME = f"{REGISTRATION_ID}-root"  # $rootCertName
INTERMEDIATE_NAME = f"{REGISTRATION_ID}-intermediate"  # $caCertName

VERIFICATION_FAILED = 400011


def _openssl_concurrently(*commands: tuple[Path, list[str]]) -> None:
    """Run independent openssl commands at once (key generation dominates; 2+ cores help)."""
    procs = [(args, subprocess.Popen(["openssl", *args], cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)) for cwd, args in commands]
    failures = []
    for args, proc in procs:
        _, err = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            failures.append(f"openssl {' '.join(args)} failed: {err}")
    if failures:
        pytest.fail("\n".join(failures))


@dataclass(frozen=True)
class SeedPki:
    """Files made by the seed's steps 2 and 6 (plus an impostor root with the same subject)."""

    root_dir: Path
    ca_dir: Path
    device_dir: Path
    impostor_dir: Path
    verification_key: Path

    @property
    def root_pem(self) -> Path:
        return self.root_dir / "root-ca.pem"

    @property
    def intermediate_pem(self) -> Path:
        return self.ca_dir / "intermediate-ca.pem"

    @property
    def intermediate_as_printed_pem(self) -> Path:
        return self.ca_dir / "intermediate-ca-as-printed.pem"

    @property
    def device_pem(self) -> Path:
        return self.device_dir / "device.pem"

    @property
    def impostor_pem(self) -> Path:
        return self.impostor_dir / "root-ca.pem"

    def signer(self, which: str) -> tuple[Path, Path]:
        return {
            "root": (self.root_dir / "root-ca.pem", self.root_dir / "root-ca.key"),
            "intermediate": (self.ca_dir / "intermediate-ca.pem", self.ca_dir / "intermediate-ca.key"),
            "impostor": (self.impostor_dir / "root-ca.pem", self.impostor_dir / "root-ca.key"),
        }[which]

    def verification_cert(self, code: str, signer: str, workdir: Path, *, subj: str | None = None) -> str:
        """Seed steps 4/5 'Create ... verification certificate' (the 2048-bit key is made once per module)."""
        ca_pem, ca_key = self.signer(signer)
        workdir.mkdir(parents=True, exist_ok=True)
        run_openssl("req", "-new", "-key", str(self.verification_key), "-out", "verification.csr",
                    "-subj", subj or f"/CN={code}", cwd=workdir)
        run_openssl("x509", "-req", "-in", "verification.csr", "-CA", str(ca_pem), "-CAkey", str(ca_key),
                    "-CAcreateserial", "-out", "verification.pem", "-days", "1", "-sha256", cwd=workdir)
        return (workdir / "verification.pem").read_text()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> SeedPki:
    cert_dir = tmp_path_factory.mktemp("certs")
    root, ca, device, impostor = (cert_dir / d for d in ("root", "ca", "device", "impostor"))
    for d in (root, ca, device, impostor):
        d.mkdir()

    def root_ca_cmd(bits: str) -> list[str]:
        # Seed step 2 "Create root CA certificate (self-signed)".
        return ["req", "-x509", "-new", "-nodes", "-newkey", f"rsa:{bits}",
                "-keyout", "root-ca.key", "-out", "root-ca.pem", "-days", "3650", "-sha256",
                "-subj", f"/CN={REGISTRATION_ID}-root",
                "-addext", "basicConstraints=critical,CA:true,pathlen:1",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                "-addext", "subjectKeyIdentifier=hash",
                "-addext", "authorityKeyIdentifier=keyid:always"]

    _openssl_concurrently(
        (root, root_ca_cmd("4096")),
        (ca, ["genrsa", "-out", "intermediate-ca.key", "4096"]),
        (root, ["genrsa", "-out", "verification.key", "2048"]),
        (device, ["genrsa", "-out", "device.key", "2048"]),
        # Not in the seed: a different key behind a root with the very same subject name.
        (impostor, root_ca_cmd("2048")),
    )
    # Seed step 2: intermediate CSR, extensions file, signed by the root.
    run_openssl("req", "-new", "-key", "intermediate-ca.key", "-out", "intermediate-ca.csr",
                "-subj", f"/CN={REGISTRATION_ID}-intermediate", cwd=ca)
    (ca / "intermediate-ext.cnf").write_text(INTERMEDIATE_EXT, encoding="ascii")
    run_openssl("x509", "-req", "-in", "intermediate-ca.csr", "-CA", str(root / "root-ca.pem"),
                "-CAkey", str(root / "root-ca.key"), "-CAcreateserial", "-out", "intermediate-ca.pem",
                "-days", "1825", "-sha256", "-extfile", "intermediate-ext.cnf",
                "-extensions", "v3_intermediate", cwd=ca)
    # The seed as printed lacks the PowerShell line continuation before "-extensions v3_intermediate",
    # so that line never reaches openssl: the result is an X.509 v1 certificate with no extensions.
    run_openssl("x509", "-req", "-in", "intermediate-ca.csr", "-CA", str(root / "root-ca.pem"),
                "-CAkey", str(root / "root-ca.key"), "-CAcreateserial",
                "-out", "intermediate-ca-as-printed.pem",
                "-days", "1825", "-sha256", "-extfile", "intermediate-ext.cnf", cwd=ca)
    # Seed step 6: device bootstrap certificate signed by the intermediate.
    run_openssl("req", "-new", "-key", "device.key", "-out", "device.csr", "-subj", f"/CN={REGISTRATION_ID}",
                cwd=device)
    (device / "device-ext.cnf").write_text(DEVICE_EXT, encoding="ascii")
    run_openssl("x509", "-req", "-in", "device.csr", "-CA", str(ca / "intermediate-ca.pem"),
                "-CAkey", str(ca / "intermediate-ca.key"), "-out", "device.pem", "-days", "365", "-sha256",
                "-extfile", "device-ext.cnf", "-extensions", "v3_req", cwd=device)
    return SeedPki(root, ca, device, impostor, root / "verification.key")


# --- helpers -------------------------------------------------------------------------------------------


@functools.cache
def _fingerprint(pem: Path, digest: str) -> str:
    """Seed step 3's thumbprint, as openssl prints it (colons removed)."""
    out = run_openssl("x509", "-in", str(pem), "-noout", "-fingerprint", f"-{digest}").stdout
    return out.strip().split("=", 1)[1].replace(":", "").upper()


def run_openssl_bytes(*args: str) -> bytes:
    proc = subprocess.run(["openssl", *args], capture_output=True)
    if proc.returncode != 0:
        pytest.fail(f"openssl {' '.join(args)} failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


def _state(cas: CaCertificates, name: str) -> tuple[str, bool, str]:
    v = cas.get(name)
    return v.etag, v.is_verified, v.sha256


def _assert_refused(excinfo: pytest.ExceptionInfo, cls: type[OpenDPSError], status: int, error_code: int,
                    *fragments: str) -> None:
    exc = excinfo.value
    assert type(exc) is cls, f"expected {cls.__name__}, got {type(exc).__name__}: {exc}"
    assert exc.status == status
    assert exc.error_code == error_code
    for fragment in fragments:
        assert fragment in str(exc), f"{fragment!r} not in message {str(exc)!r}"
        assert fragment in exc.message


@pytest.fixture
def workdir(tmp_path):
    """Returns a fresh directory for each verification certificate a test makes."""
    numbers = itertools.count(1)
    return lambda: tmp_path / f"verification-{next(numbers)}"


def _ec_cert(subject_cn: str, *, not_before: datetime, not_after: datetime, ca: bool,
             issuer: x509.Certificate | None = None, issuer_key=None) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(issuer.subject if issuer else subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(not_before)
               .not_valid_after(not_after))
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _upload_with_code(cas: CaCertificates, name: str, pem: Path) -> tuple[str, str]:
    """Upload and generate a verification code; returns (code, etag to verify with)."""
    view, created = cas.upload(name, pem.read_text())
    assert created
    gen = cas.generate_verification_code(name, if_match=view.etag)
    return gen.verification_code, gen.etag


# --- seed steps 4 and 5, end to end ----------------------------------------------------------------------


def test_seed_step4_root_ca_upload_generate_code_and_verify(ca_certificates, pki, workdir):
    cas = ca_certificates
    uploaded, created = cas.upload(ROOT_NAME, pki.root_pem.read_text())
    assert created is True
    assert uploaded.name == ROOT_NAME
    assert uploaded.is_verified is False
    assert uploaded.etag
    assert uploaded.verification_code is None
    assert uploaded.subject == f"CN={REGISTRATION_ID}-root"
    assert uploaded.sha1 == _fingerprint(pki.root_pem, "sha1")  # seed step 3 thumbprint
    assert uploaded.sha256 == _fingerprint(pki.root_pem, "sha256")
    shown = cas.get(ROOT_NAME)  # "az iot dps certificate show" -> etag
    assert (shown.etag, shown.is_verified, shown.sha1) == (uploaded.etag, False, uploaded.sha1)

    generated = cas.generate_verification_code(ROOT_NAME, if_match=shown.etag)
    code = generated.verification_code
    assert code and len(code) <= 64  # must fit an X.509 CN
    assert generated.etag != uploaded.etag
    assert generated.is_verified is False
    assert cas.get(ROOT_NAME).etag == generated.etag

    proof = pki.verification_cert(code, "root", workdir())
    verified = cas.verify(ROOT_NAME, proof, if_match=generated.etag)
    assert verified.is_verified is True
    assert verified.etag not in (uploaded.etag, generated.etag)
    after = cas.get(ROOT_NAME)
    assert (after.etag, after.is_verified) == (verified.etag, True)
    assert after.sha256 == uploaded.sha256


def test_seed_step5_intermediate_ca_upload_generate_code_and_verify(ca_certificates, pki, workdir):
    cas = ca_certificates
    uploaded, created = cas.upload(INTERMEDIATE_NAME, pki.intermediate_pem.read_text())
    assert created is True and uploaded.is_verified is False
    assert uploaded.subject == f"CN={REGISTRATION_ID}-intermediate"
    assert uploaded.sha1 == _fingerprint(pki.intermediate_pem, "sha1")

    generated = cas.generate_verification_code(INTERMEDIATE_NAME, if_match=uploaded.etag)
    assert generated.etag != uploaded.etag
    proof = pki.verification_cert(generated.verification_code, "intermediate", workdir())
    verified = cas.verify(INTERMEDIATE_NAME, proof, if_match=generated.etag)
    assert verified.is_verified is True
    assert cas.get(INTERMEDIATE_NAME).is_verified is True


def test_root_and_intermediate_are_independent(ca_certificates, pki, workdir):
    cas = ca_certificates
    root_code, root_etag = _upload_with_code(cas, ROOT_NAME, pki.root_pem)
    ca_code, ca_etag = _upload_with_code(cas, INTERMEDIATE_NAME, pki.intermediate_pem)
    assert root_code != ca_code
    cas.verify(INTERMEDIATE_NAME, pki.verification_cert(ca_code, "intermediate", workdir()), if_match=ca_etag)
    assert cas.get(ROOT_NAME).is_verified is False
    assert cas.get(ROOT_NAME).etag == root_etag
    cas.verify(ROOT_NAME, pki.verification_cert(root_code, "root", workdir()), if_match=root_etag)
    assert [(v.name, v.is_verified) for v in cas.list()] == [(INTERMEDIATE_NAME, True), (ROOT_NAME, True)]


def test_upload_accepts_pem_base64_der_and_raw_der(ca_certificates, pki, workdir, subtests):
    pem_text = pki.root_pem.read_text()
    der = run_openssl_bytes("x509", "-in", str(pki.root_pem), "-outform", "DER")
    payloads = {
        "pem-text": pem_text,
        "pem-text-crlf": pem_text.replace("\n", "\r\n"),  # as written on Windows
        "pem-bytes": pem_text.encode(),
        "base64-der-text": base64.b64encode(der).decode(),
        "der-bytes": der,
    }
    for form, payload in payloads.items():
        with subtests.test(form=form):
            view, created = ca_certificates.upload(form, payload)
            assert created is True and view.is_verified is False
            assert view.sha256 == hashlib.sha256(der).hexdigest().upper() == _fingerprint(pki.root_pem, "sha256")
            assert view.certificate.public_bytes(serialization.Encoding.DER) == der
            # The stored certificate is the one proof of possession is checked against.
            gen = ca_certificates.generate_verification_code(form, if_match=view.etag)
            proof = pki.verification_cert(gen.verification_code, "root", workdir())
            assert ca_certificates.verify(form, proof, if_match=gen.etag).is_verified is True
    assert [v.name for v in ca_certificates.list()] == sorted(payloads)


def test_verify_accepts_verification_certificate_as_der_bytes(ca_certificates, pki, workdir):
    code, etag = _upload_with_code(ca_certificates, ROOT_NAME, pki.root_pem)
    proof = x509.load_pem_x509_certificate(pki.verification_cert(code, "root", workdir()).encode())
    der = proof.public_bytes(serialization.Encoding.DER)
    assert ca_certificates.verify(ROOT_NAME, der, if_match=etag).is_verified is True


# --- upload refusals -------------------------------------------------------------------------------------


def _expired_ca() -> str:
    now = datetime.now(UTC)
    return _pem(_ec_cert(f"{REGISTRATION_ID}-root", not_before=now - timedelta(days=730),
                         not_after=now - timedelta(days=1), ca=True))


def _future_ca() -> str:
    now = datetime.now(UTC)
    return _pem(_ec_cert(f"{REGISTRATION_ID}-root", not_before=now + timedelta(days=1),
                         not_after=now + timedelta(days=365), ca=True))


NOT_A_CA = "not a CA certificate"
UNPARSEABLE = "cannot be parsed as an X.509 certificate"
UPLOAD_REFUSALS = {
    # name: (payload factory, message fragments)
    "seed-step6-device-cert": (lambda p, w: p.device_pem.read_text(), (NOT_A_CA, "CA:TRUE")),
    "verification-cert": (lambda p, w: p.verification_cert("ABCDEF", "root", w()), (NOT_A_CA,)),
    "seed-step2-intermediate-as-printed": (lambda p, w: p.intermediate_as_printed_pem.read_text(),
                                           (NOT_A_CA,)),
    "expired-ca": (lambda p, w: _expired_ca(), ("expired",)),
    "not-yet-valid-ca": (lambda p, w: _future_ca(), ("not valid before",)),
    "garbage-text": (lambda p, w: "this is not a certificate", ("neither PEM nor base64 DER",)),
    "garbage-pem": (lambda p, w: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                    (UNPARSEABLE,)),
    "base64-of-junk": (lambda p, w: base64.b64encode(b"junk" * 20).decode(),
                       (UNPARSEABLE,)),
    "junk-bytes": (lambda p, w: b"\x30\x03\x02\x01", (UNPARSEABLE,)),
    "private-key-pem": (lambda p, w: p.verification_key.read_text(), (UNPARSEABLE,)),
    "empty": (lambda p, w: "   \n", ("empty",)),
    "too-large": (lambda p, w: "A" * (64 * 1024 + 1), ("larger than",)),
}


def test_upload_refuses_new_certificate(ca_certificates, pki, workdir, subtests):
    for case, (make, fragments) in UPLOAD_REFUSALS.items():
        with subtests.test(case=case):
            with pytest.raises(InvalidInput) as excinfo:
                ca_certificates.upload(ROOT_NAME, make(pki, workdir))
            _assert_refused(excinfo, InvalidInput, 400, 400004, *fragments)
            with pytest.raises(NotFound):
                ca_certificates.get(ROOT_NAME)
            assert ca_certificates.list() == []


def test_seed_as_printed_intermediate_is_an_x509_v1_certificate(pki):
    """Documents why the seed's printed step 2 is refused: no extensions at all, hence no CA:TRUE."""
    cert = x509.load_pem_x509_certificate(pki.intermediate_as_printed_pem.read_bytes())
    assert cert.version == x509.Version.v1
    assert len(cert.extensions) == 0
    good = x509.load_pem_x509_certificate(pki.intermediate_pem.read_bytes())
    assert good.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True


def test_refused_replacement_leaves_verified_certificate_untouched(ca_certificates, pki, workdir, subtests):
    cas = ca_certificates
    code, etag = _upload_with_code(cas, ROOT_NAME, pki.root_pem)
    verified = cas.verify(ROOT_NAME, pki.verification_cert(code, "root", workdir()), if_match=etag)
    for case in ("seed-step6-device-cert", "verification-cert", "expired-ca", "garbage-text", "junk-bytes"):
        with subtests.test(case=case):
            make, fragments = UPLOAD_REFUSALS[case]
            with pytest.raises(InvalidInput) as excinfo:
                cas.upload(ROOT_NAME, make(pki, workdir), if_match=verified.etag)
            _assert_refused(excinfo, InvalidInput, 400, 400004, *fragments)
            assert _state(cas, ROOT_NAME) == (verified.etag, True, verified.sha256)


def test_upload_checks_names(ca_certificates, pki, subtests):
    # a NUL, a newline, a lone surrogate: no name (PostgreSQL cannot hold a NUL: its DataError was a 500)
    for name in ("", " leading", "trailing ", "a/b", "a\\b", "a?b", "a#b", "x" * 257, "a\x00b", "a\nb", "a\ud800"):
        with subtests.test(name=name):
            with pytest.raises(InvalidInput) as excinfo:
                ca_certificates.upload(name, pki.root_pem.read_text())
            _assert_refused(excinfo, InvalidInput, 400, 400004, "certificate name", "is invalid")
            assert ca_certificates.list() == []
    longest = "n" * 256
    view, created = ca_certificates.upload(longest, pki.root_pem.read_text())
    assert created and ca_certificates.get(longest).etag == view.etag


# --- etag preconditions --------------------------------------------------------------------------------


def test_generate_code_needs_the_current_etag(ca_certificates, pki, workdir):
    cas = ca_certificates
    uploaded, _ = cas.upload(ROOT_NAME, pki.root_pem.read_text())
    with pytest.raises(PreconditionFailed) as excinfo:
        cas.generate_verification_code(ROOT_NAME, if_match="AAAAAAAAAAA=")
    _assert_refused(excinfo, PreconditionFailed, 412, 412001, "AAAAAAAAAAA=", ROOT_NAME, "does not match")
    for missing in (None, ""):
        with pytest.raises(PreconditionFailed) as excinfo:
            cas.generate_verification_code(ROOT_NAME, if_match=missing)
        _assert_refused(excinfo, PreconditionFailed, 412, 412001, "etag", "If-Match")
    assert _state(cas, ROOT_NAME) == (uploaded.etag, False, uploaded.sha256)
    # No code was stored by the refused calls: verifying now says there is nothing pending.
    with pytest.raises(InvalidInput) as excinfo:
        cas.verify(ROOT_NAME, pki.verification_cert("ABCDEF", "root", workdir()), if_match=uploaded.etag)
    _assert_refused(excinfo, InvalidInput, 400, VERIFICATION_FAILED, "no pending verification code")

    gen = cas.generate_verification_code(ROOT_NAME, if_match=uploaded.etag)
    with pytest.raises(PreconditionFailed) as excinfo:
        cas.generate_verification_code(ROOT_NAME, if_match=uploaded.etag)  # the upload's etag is stale now
    _assert_refused(excinfo, PreconditionFailed, 412, 412001, uploaded.etag, "does not match")
    assert cas.get(ROOT_NAME).etag == gen.etag
    # The refused call did not replace the code.
    proof = pki.verification_cert(gen.verification_code, "root", workdir())
    assert cas.verify(ROOT_NAME, proof, if_match=gen.etag).is_verified is True


def test_verify_with_wrong_or_missing_etag_is_412_and_changes_nothing(ca_certificates, pki, workdir):
    cas = ca_certificates
    uploaded, _ = cas.upload(ROOT_NAME, pki.root_pem.read_text())
    gen = cas.generate_verification_code(ROOT_NAME, if_match=uploaded.etag)
    proof = pki.verification_cert(gen.verification_code, "root", workdir())
    for bad in (uploaded.etag, "AAAAAAAAAAA=", None, ""):  # stale, made up, missing, empty
        with pytest.raises(PreconditionFailed) as excinfo:
            cas.verify(ROOT_NAME, proof, if_match=bad)
        fragments = ("etag", "If-Match") if not bad else (bad, ROOT_NAME, "does not match")
        _assert_refused(excinfo, PreconditionFailed, 412, 412001, *fragments)
        assert _state(cas, ROOT_NAME) == (gen.etag, False, uploaded.sha256), bad
    # The code was not consumed: the same proof with the right etag succeeds.
    assert cas.verify(ROOT_NAME, proof, if_match=gen.etag).is_verified is True


def test_quoted_and_weak_etags_match(ca_certificates, pki, workdir):
    cas = ca_certificates
    uploaded, _ = cas.upload(ROOT_NAME, pki.root_pem.read_text())
    gen = cas.generate_verification_code(ROOT_NAME, if_match=f'"{uploaded.etag}"')
    proof = pki.verification_cert(gen.verification_code, "root", workdir())
    assert cas.verify(ROOT_NAME, proof, if_match=f'W/"{gen.etag}"').is_verified is True


# --- proof-of-possession refusals -----------------------------------------------------------------------


def _assert_unverified_and_code_still_good(cas, pki, workdir, code, etag):
    """A refused verify changes nothing: same etag, unverified, and the code still works once."""
    view = cas.get(ROOT_NAME)
    assert (view.etag, view.is_verified) == (etag, False)
    proof = pki.verification_cert(code, "root", workdir())
    assert cas.verify(ROOT_NAME, proof, if_match=etag).is_verified is True


def test_verify_refuses_certificate_signed_by_other_key_with_same_issuer_name(ca_certificates, pki, workdir):
    cas = ca_certificates
    impostor = x509.load_pem_x509_certificate(pki.impostor_pem.read_bytes())
    genuine = x509.load_pem_x509_certificate(pki.root_pem.read_bytes())
    assert impostor.subject == genuine.subject and impostor.public_key() != genuine.public_key()
    code, etag = _upload_with_code(cas, ROOT_NAME, pki.root_pem)
    forged = pki.verification_cert(code, "impostor", workdir())
    assert x509.load_pem_x509_certificate(forged.encode()).issuer == genuine.subject
    with pytest.raises(InvalidInput) as excinfo:
        cas.verify(ROOT_NAME, forged, if_match=etag)
    _assert_refused(excinfo, InvalidInput, 400, VERIFICATION_FAILED, "not signed by the private key",
                    ROOT_NAME)
    _assert_unverified_and_code_still_good(cas, pki, workdir, code, etag)


def test_verify_refuses_intermediate_proof_signed_by_root(ca_certificates, pki, workdir):
    cas = ca_certificates
    code, etag = _upload_with_code(cas, INTERMEDIATE_NAME, pki.intermediate_pem)
    with pytest.raises(InvalidInput) as excinfo:
        cas.verify(INTERMEDIATE_NAME, pki.verification_cert(code, "root", workdir()), if_match=etag)
    _assert_refused(excinfo, InvalidInput, 400, VERIFICATION_FAILED, "not signed by the private key",
                    INTERMEDIATE_NAME)
    assert _state(cas, INTERMEDIATE_NAME)[:2] == (etag, False)


def _expired_proof(pki: SeedPki, code: str) -> str:
    """Properly signed with the root's key, but no longer valid (openssl 3.0 x509 cannot backdate)."""
    root_key = serialization.load_pem_private_key((pki.root_dir / "root-ca.key").read_bytes(), password=None)
    root = x509.load_pem_x509_certificate(pki.root_pem.read_bytes())
    now = datetime.now(UTC)
    expired = _ec_cert(code, not_before=now - timedelta(days=2), not_after=now - timedelta(days=1), ca=False,
                       issuer=root, issuer_key=root_key)
    expired.verify_directly_issued_by(root)
    return _pem(expired)


NOT_CURRENT = "not the current verification code"
NOT_SIGNED = "not signed by the private key"
# name: (proof factory (pki, code, workdir), error code, message fragments (may use {code}))
BAD_PROOFS = {
    "signed-by-intermediate-key": (lambda p, c, w: p.verification_cert(c, "intermediate", w()),
                                   VERIFICATION_FAILED, (NOT_SIGNED, ROOT_NAME)),
    "cn-other": (lambda p, c, w: p.verification_cert(c, "root", w(), subj="/CN=WRONG-CODE"),
                 VERIFICATION_FAILED, ("'WRONG-CODE'", NOT_CURRENT)),
    "cn-code-plus-suffix": (lambda p, c, w: p.verification_cert(c, "root", w(), subj=f"/CN={c}0"),
                            VERIFICATION_FAILED, ("'{code}0'", NOT_CURRENT)),
    "cn-code-prefix-only": (lambda p, c, w: p.verification_cert(c, "root", w(), subj=f"/CN={c[:-1]}"),
                            VERIFICATION_FAILED, (NOT_CURRENT,)),
    "code-in-O-no-CN": (lambda p, c, w: p.verification_cert(c, "root", w(), subj=f"/O={c}"),
                        VERIFICATION_FAILED, ("(none)", NOT_CURRENT)),
    "two-CNs": (lambda p, c, w: p.verification_cert(c, "root", w(), subj=f"/CN={c}/CN=extra"),
                VERIFICATION_FAILED, (NOT_CURRENT,)),
    "the-ca-certificate-itself": (lambda p, c, w: p.root_pem.read_text(),
                                  VERIFICATION_FAILED, (f"'{REGISTRATION_ID}-root'", NOT_CURRENT)),
    "expired-proof": (lambda p, c, w: _expired_proof(p, c), VERIFICATION_FAILED, ("expired or not yet valid",)),
    "unparseable": (lambda p, c, w: "not a certificate", 400004,
                    ("verification certificate", "neither PEM nor base64 DER")),
}


def test_verify_refuses_bad_proofs_and_keeps_the_code(ca_certificates, pki, workdir, subtests):
    cas = ca_certificates
    code, etag = _upload_with_code(cas, ROOT_NAME, pki.root_pem)
    for case, (make, error_code, fragments) in BAD_PROOFS.items():
        with subtests.test(case=case):
            with pytest.raises(InvalidInput) as excinfo:
                cas.verify(ROOT_NAME, make(pki, code, workdir), if_match=etag)
            _assert_refused(excinfo, InvalidInput, 400, error_code, *(f.format(code=code) for f in fragments))
            assert _state(cas, ROOT_NAME)[:2] == (etag, False)
    _assert_unverified_and_code_still_good(cas, pki, workdir, code, etag)


def test_only_the_latest_code_counts(ca_certificates, pki, workdir):
    cas = ca_certificates
    uploaded, _ = cas.upload(ROOT_NAME, pki.root_pem.read_text())
    gen_a = cas.generate_verification_code(ROOT_NAME, if_match=uploaded.etag)
    gen_b = cas.generate_verification_code(ROOT_NAME, if_match=gen_a.etag)
    assert gen_a.verification_code != gen_b.verification_code
    assert len({uploaded.etag, gen_a.etag, gen_b.etag}) == 3
    proof_a = pki.verification_cert(gen_a.verification_code, "root", workdir())
    with pytest.raises(InvalidInput) as excinfo:
        cas.verify(ROOT_NAME, proof_a, if_match=gen_b.etag)
    _assert_refused(excinfo, InvalidInput, 400, VERIFICATION_FAILED, repr(gen_a.verification_code),
                    "not the current verification code")
    assert _state(cas, ROOT_NAME)[:2] == (gen_b.etag, False)
    # Code A with A's (stale) etag is a precondition failure, not a success.
    with pytest.raises(PreconditionFailed):
        cas.verify(ROOT_NAME, proof_a, if_match=gen_a.etag)
    proof_b = pki.verification_cert(gen_b.verification_code, "root", workdir())
    assert cas.verify(ROOT_NAME, proof_b, if_match=gen_b.etag).is_verified is True


def test_verify_without_a_generated_code_is_refused(ca_certificates, pki, workdir):
    cas = ca_certificates
    uploaded, _ = cas.upload(ROOT_NAME, pki.root_pem.read_text())
    # Even a properly signed certificate cannot prove anything without a pending code.
    proof = pki.verification_cert("0123456789ABCDEF", "root", workdir())
    with pytest.raises(InvalidInput) as excinfo:
        cas.verify(ROOT_NAME, proof, if_match=uploaded.etag)
    _assert_refused(excinfo, InvalidInput, 400, VERIFICATION_FAILED, "no pending verification code",
                    ROOT_NAME)
    assert _state(cas, ROOT_NAME) == (uploaded.etag, False, uploaded.sha256)


def test_a_code_is_good_for_one_verification_only(ca_certificates, pki, workdir):
    cas = ca_certificates
    code, etag = _upload_with_code(cas, ROOT_NAME, pki.root_pem)
    proof = pki.verification_cert(code, "root", workdir())
    verified = cas.verify(ROOT_NAME, proof, if_match=etag)
    assert verified.is_verified is True and verified.etag != etag
    with pytest.raises(PreconditionFailed):  # the old etag is gone
        cas.verify(ROOT_NAME, proof, if_match=etag)
    with pytest.raises(InvalidInput) as excinfo:  # the new etag, but the code was used up
        cas.verify(ROOT_NAME, proof, if_match=verified.etag)
    _assert_refused(excinfo, InvalidInput, 400, VERIFICATION_FAILED, "no pending verification code")
    assert _state(cas, ROOT_NAME) == (verified.etag, True, verified.sha256)


def test_new_code_after_verification_keeps_verified_and_works(ca_certificates, pki, workdir):
    cas = ca_certificates
    code, etag = _upload_with_code(cas, ROOT_NAME, pki.root_pem)
    verified = cas.verify(ROOT_NAME, pki.verification_cert(code, "root", workdir()), if_match=etag)
    again = cas.generate_verification_code(ROOT_NAME, if_match=verified.etag)
    assert again.verification_code != code and again.is_verified is True
    proof = pki.verification_cert(again.verification_code, "root", workdir())
    assert cas.verify(ROOT_NAME, proof, if_match=again.etag).is_verified is True


def test_unknown_certificate_name_is_404(ca_certificates, pki, workdir, subtests):
    cas = ca_certificates
    cas.upload(ROOT_NAME, pki.root_pem.read_text())
    proof = pki.verification_cert("ABCDEF", "root", workdir())
    calls = {
        "get": lambda: cas.get("nope"),
        "generate": lambda: cas.generate_verification_code("nope", if_match="AAAAAAAAAAA="),
        "verify": lambda: cas.verify("nope", proof, if_match="AAAAAAAAAAA="),
        "delete": lambda: cas.delete("nope", if_match="AAAAAAAAAAA="),
    }
    for operation, call in calls.items():
        with subtests.test(operation=operation):
            with pytest.raises(NotFound) as excinfo:
                call()
            _assert_refused(excinfo, NotFound, 404, 404001, "'nope'", "does not exist")
    with pytest.raises(NotFound):  # no certificate holds a NUL: not looked up (PostgreSQL's DataError, a 500)
        cas.get("no\x00pe")
    assert [v.name for v in cas.list()] == [ROOT_NAME]


# --- upload conflicts, replacement, delete ---------------------------------------------------------------


def test_upload_of_existing_name_needs_matching_if_match(ca_certificates, pki):
    cas = ca_certificates
    uploaded, _ = cas.upload(ROOT_NAME, pki.root_pem.read_text())
    gen = cas.generate_verification_code(ROOT_NAME, if_match=uploaded.etag)
    for payload in (pki.root_pem.read_text(), pki.intermediate_pem.read_text()):
        with pytest.raises(Conflict) as excinfo:
            cas.upload(ROOT_NAME, payload)
        _assert_refused(excinfo, Conflict, 409, 409001, ROOT_NAME, "already exists")
        for wrong in ("AAAAAAAAAAA=", uploaded.etag):  # made up, stale
            with pytest.raises(PreconditionFailed) as excinfo:
                cas.upload(ROOT_NAME, payload, if_match=wrong)
            _assert_refused(excinfo, PreconditionFailed, 412, 412001, wrong, ROOT_NAME, "does not match")
    assert _state(cas, ROOT_NAME) == (gen.etag, False, uploaded.sha256)


def test_if_match_on_a_new_name_is_412_unless_star(ca_certificates, pki):
    cas = ca_certificates
    with pytest.raises(PreconditionFailed) as excinfo:
        cas.upload(ROOT_NAME, pki.root_pem.read_text(), if_match="AAAAAAAAAAA=")
    _assert_refused(excinfo, PreconditionFailed, 412, 412001, ROOT_NAME, "does not exist")
    assert cas.list() == []
    view, created = cas.upload(ROOT_NAME, pki.root_pem.read_text(), if_match="*")
    assert created is True and view.is_verified is False


@pytest.mark.parametrize("replacement", ["same-ca", "other-ca"])
def test_replace_with_matching_if_match_resets_verification(ca_certificates, pki, workdir, replacement):
    cas = ca_certificates
    code, etag = _upload_with_code(cas, ROOT_NAME, pki.root_pem)
    original = cas.get(ROOT_NAME)
    verified = cas.verify(ROOT_NAME, pki.verification_cert(code, "root", workdir()), if_match=etag)
    assert verified.is_verified is True
    new_pem = pki.root_pem if replacement == "same-ca" else pki.intermediate_pem
    replaced, created = cas.upload(ROOT_NAME, new_pem.read_text(), if_match=verified.etag)
    assert created is False
    assert replaced.is_verified is False
    assert replaced.etag != verified.etag
    assert replaced.sha256 == _fingerprint(new_pem, "sha256")
    shown = cas.get(ROOT_NAME)
    assert (shown.etag, shown.is_verified, shown.sha256) == (replaced.etag, False, replaced.sha256)
    assert shown.created_at == original.created_at
    assert shown.updated_at >= original.updated_at
    # The used code stays used.
    with pytest.raises(InvalidInput) as excinfo:
        cas.verify(ROOT_NAME, pki.verification_cert(code, "root", workdir()), if_match=replaced.etag)
    _assert_refused(excinfo, InvalidInput, 400, VERIFICATION_FAILED, "no pending verification code")
    # ...and it can be proven again from scratch.
    gen = cas.generate_verification_code(ROOT_NAME, if_match=replaced.etag)
    signer = "root" if replacement == "same-ca" else "intermediate"
    proof = pki.verification_cert(gen.verification_code, signer, workdir())
    assert cas.verify(ROOT_NAME, proof, if_match=gen.etag).is_verified is True


def test_replace_discards_a_pending_code_and_accepts_star(ca_certificates, pki, workdir):
    cas = ca_certificates
    code, etag = _upload_with_code(cas, ROOT_NAME, pki.root_pem)
    replaced, created = cas.upload(ROOT_NAME, pki.root_pem.read_text(), if_match=etag)
    assert created is False and replaced.etag != etag and replaced.is_verified is False
    with pytest.raises(InvalidInput) as excinfo:
        cas.verify(ROOT_NAME, pki.verification_cert(code, "root", workdir()), if_match=replaced.etag)
    _assert_refused(excinfo, InvalidInput, 400, VERIFICATION_FAILED, "no pending verification code")
    again, created = cas.upload(ROOT_NAME, pki.intermediate_pem.read_text(), if_match="*")
    assert created is False and again.etag != replaced.etag
    assert cas.get(ROOT_NAME).subject == f"CN={REGISTRATION_ID}-intermediate"


def test_delete_needs_matching_etag(ca_certificates, pki, workdir):
    cas = ca_certificates
    code, etag = _upload_with_code(cas, ROOT_NAME, pki.root_pem)
    verified = cas.verify(ROOT_NAME, pki.verification_cert(code, "root", workdir()), if_match=etag)
    cas.upload(INTERMEDIATE_NAME, pki.intermediate_pem.read_text())
    for wrong in ("AAAAAAAAAAA=", etag):  # a made-up etag and a stale one
        with pytest.raises(PreconditionFailed) as excinfo:
            cas.delete(ROOT_NAME, if_match=wrong)
        _assert_refused(excinfo, PreconditionFailed, 412, 412001, wrong, ROOT_NAME, "does not match")
        assert _state(cas, ROOT_NAME) == (verified.etag, True, verified.sha256)
    cas.delete(ROOT_NAME, if_match=verified.etag)
    with pytest.raises(NotFound) as excinfo:
        cas.get(ROOT_NAME)
    _assert_refused(excinfo, NotFound, 404, 404001, ROOT_NAME)
    assert [v.name for v in cas.list()] == [INTERMEDIATE_NAME]
    with pytest.raises(NotFound):
        cas.delete(ROOT_NAME, if_match=verified.etag)
    # The name is free again: a new upload starts unverified.
    view, created = cas.upload(ROOT_NAME, pki.root_pem.read_text())
    assert created is True and view.is_verified is False and view.etag != verified.etag


# --- get / list ------------------------------------------------------------------------------------------


def test_get_and_list(ca_certificates, pki):
    cas = ca_certificates
    assert cas.list() == []
    uploads = {}
    for name, pem in (("charlie", pki.root_pem), ("alpha", pki.intermediate_pem), ("bravo", pki.root_pem)):
        uploads[name], _ = cas.upload(name, pem.read_text())
    listed = cas.list()
    assert [v.name for v in listed] == ["alpha", "bravo", "charlie"]
    for view in listed:
        got = cas.get(view.name)
        up = uploads[view.name]
        assert (view.etag, view.subject, view.sha1, view.sha256, view.is_verified) == \
               (up.etag, up.subject, up.sha1, up.sha256, False)
        assert (got.etag, got.sha256) == (view.etag, view.sha256)
        assert got.verification_code is None and view.verification_code is None
        assert got.certificate == up.certificate
    assert cas.get("alpha").subject == f"CN={REGISTRATION_ID}-intermediate"
    assert cas.get("bravo").sha256 == cas.get("charlie").sha256


def test_pending_code_is_not_shown_by_get_or_list(ca_certificates, pki):
    cas = ca_certificates
    code, etag = _upload_with_code(cas, ROOT_NAME, pki.root_pem)
    assert code
    assert cas.get(ROOT_NAME).verification_code is None
    assert [(v.verification_code, v.etag) for v in cas.list()] == [(None, etag)]


def test_timestamps_are_timezone_aware_on_every_backend(ca_certificates, pki):
    uploaded, _ = ca_certificates.upload(ROOT_NAME, pki.root_pem.read_text())
    assert uploaded.created_at.tzinfo is not None
    for view in (ca_certificates.get(ROOT_NAME), *ca_certificates.list()):
        assert view.created_at.tzinfo is not None, view.created_at
        assert view.updated_at.tzinfo is not None, view.updated_at
        assert view.created_at == uploaded.created_at
