"""``opendps bootstrap`` (the seed's setup-x509-attestation script) against a real server, SQLite and PostgreSQL.

The command runs once per server (module fixture: RSA-4096 keys are the slow part); the tests then check
its files against the seed's layout and the profiles the seed's openssl commands produce, the server
state it left (verified CAs, enrollment group), that a device onboards with the bootstrap chain, and
that a re-run reuses everything.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID
from tests.conftest import invoke_cli, run_openssl
from tests.seed import DEVICE_EXT, INTERMEDIATE_EXT
from tests.seed import REGISTRATION_ID as SEED_ID
from tests.test_device_api import svc

from opendps.cli import bootstrap as bootstrap_module

SERVER_STORES = ("sqlite",)  # the CLI/SDK/front end is the subject, not the store (tests/conftest.py)

pytestmark = pytest.mark.timeout(120, func_only=True)

RID = "boot-skittlesorter"
POLICY = "boot-policy"
LAYOUT = ["root/root-ca.pem", "root/root-ca.key", "ca/intermediate-ca.pem", "ca/intermediate-ca.key",
          "device/device.pem", "device/device.key", "device/chain.pem", "device/device-full-chain.pem"]
KEYS = ["root/root-ca.key", "ca/intermediate-ca.key", "device/device.key"]


@dataclass
class Run:
    cert_dir: Path
    summary: dict
    seconds: float


def _json(proc) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _fails(proc, *words: str) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _cert(cert_dir: Path, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((cert_dir / name).read_bytes())


def _key(cert_dir: Path, name: str) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key((cert_dir / name).read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


@pytest.fixture(scope="module")
def first_run(server, tmp_path_factory) -> Run:
    """The command under test, as a user types it (namespace left at its default)."""
    cert_dir = tmp_path_factory.mktemp("bootstrap") / "certs"
    started = time.monotonic()
    proc = server.cli("bootstrap", "--registration-id", RID, "--cert-dir", str(cert_dir), "--credential-policy", POLICY,
                      "-o", "json")
    return Run(cert_dir, _json(proc), time.monotonic() - started)


def test_files_have_the_seed_layout_and_private_keys_are_0600(first_run):
    d = first_run.cert_dir
    found = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    assert found == sorted(LAYOUT)  # nothing else: no temporary files, CSRs, serial files or verification keys
    for name in LAYOUT:
        assert stat.S_IMODE((d / name).stat().st_mode) == (0o600 if name in KEYS else 0o644), name
    assert first_run.summary["created"] == ["root", "intermediate", "device"]
    assert [(f["role"], f["path"], f["mode"]) for f in first_run.summary["files"]] == [
        ("rootCertificate", str(d / LAYOUT[0]), "644"), ("rootKey", str(d / LAYOUT[1]), "600"),
        ("intermediateCertificate", str(d / LAYOUT[2]), "644"), ("intermediateKey", str(d / LAYOUT[3]), "600"),
        ("deviceCertificate", str(d / LAYOUT[4]), "644"), ("deviceKey", str(d / LAYOUT[5]), "600"),
        ("chain", str(d / LAYOUT[6]), "644"), ("fullChain", str(d / LAYOUT[7]), "644")]
    root, ica, leaf = ((d / n).read_bytes() for n in ("root/root-ca.pem", "ca/intermediate-ca.pem", "device/device.pem"))
    assert (d / "device/chain.pem").read_bytes() == ica + root
    assert (d / "device/device-full-chain.pem").read_bytes() == leaf + ica + root
    assert first_run.seconds < 60, f"bootstrap took {first_run.seconds:.1f} s"


def test_openssl_verifies_the_chain(first_run):
    d = first_run.cert_dir
    out = run_openssl("verify", "-CAfile", "root/root-ca.pem", "-untrusted", "ca/intermediate-ca.pem",
                      "device/device.pem", cwd=d)
    assert out.stdout.strip() == "device/device.pem: OK"
    out = run_openssl("verify", "-CAfile", "root/root-ca.pem", "-untrusted", "device/chain.pem", "-purpose", "sslclient",
                      "device/device.pem", cwd=d)
    assert out.stdout.strip() == "device/device.pem: OK"
    for cert, key in (("root/root-ca.pem", "root/root-ca.key"), ("ca/intermediate-ca.pem", "ca/intermediate-ca.key"),
                      ("device/device.pem", "device/device.key")):
        assert (run_openssl("x509", "-in", cert, "-noout", "-pubkey", cwd=d).stdout
                == run_openssl("pkey", "-in", key, "-pubout", cwd=d).stdout), cert


def _ski(key: rsa.RSAPrivateKey) -> bytes:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest


def _extensions(cert: x509.Certificate) -> list[tuple]:
    return [(e.oid, e.critical, e.value) for e in cert.extensions]


CA_USAGE = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
DEVICE_USAGE = x509.KeyUsage(True, False, True, False, False, False, False, False, False)


def test_profiles_are_exactly_the_seeds(first_run):
    d = first_run.cert_dir
    root, ica, leaf = (_cert(d, n) for n in ("root/root-ca.pem", "ca/intermediate-ca.pem", "device/device.pem"))
    root_key, ica_key, leaf_key = (_key(d, n) for n in KEYS)
    assert [root_key.key_size, ica_key.key_size, leaf_key.key_size] == [4096, 4096, 2048]
    assert [k.public_key().public_numbers().e for k in (root_key, ica_key, leaf_key)] == [65537] * 3

    def aki(key: rsa.RSAPrivateKey) -> x509.AuthorityKeyIdentifier:
        return x509.AuthorityKeyIdentifier(_ski(key), None, None)

    assert _extensions(root) == [
        (ExtensionOID.BASIC_CONSTRAINTS, True, x509.BasicConstraints(ca=True, path_length=1)),
        (ExtensionOID.KEY_USAGE, True, CA_USAGE),
        (ExtensionOID.SUBJECT_KEY_IDENTIFIER, False, x509.SubjectKeyIdentifier(_ski(root_key))),
        (ExtensionOID.AUTHORITY_KEY_IDENTIFIER, False, aki(root_key))]
    assert _extensions(ica) == [
        (ExtensionOID.BASIC_CONSTRAINTS, True, x509.BasicConstraints(ca=True, path_length=0)),
        (ExtensionOID.KEY_USAGE, True, CA_USAGE),
        (ExtensionOID.SUBJECT_KEY_IDENTIFIER, False, x509.SubjectKeyIdentifier(_ski(ica_key))),
        (ExtensionOID.AUTHORITY_KEY_IDENTIFIER, False, aki(root_key))]
    assert _extensions(leaf) == [
        (ExtensionOID.BASIC_CONSTRAINTS, False, x509.BasicConstraints(ca=False, path_length=None)),
        (ExtensionOID.KEY_USAGE, True, DEVICE_USAGE),
        (ExtensionOID.EXTENDED_KEY_USAGE, False, x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])),
        (ExtensionOID.SUBJECT_ALTERNATIVE_NAME, False, x509.SubjectAlternativeName([x509.DNSName(RID)])),
        (ExtensionOID.AUTHORITY_KEY_IDENTIFIER, False, aki(ica_key)),
        (ExtensionOID.SUBJECT_KEY_IDENTIFIER, False, x509.SubjectKeyIdentifier(_ski(leaf_key)))]
    names = [(c.subject.rfc4514_string(), c.issuer.rfc4514_string()) for c in (root, ica, leaf)]
    assert names == [(f"CN={RID}-root", f"CN={RID}-root"), (f"CN={RID}-intermediate", f"CN={RID}-root"),
                     (f"CN={RID}", f"CN={RID}-intermediate")]
    assert [c.not_valid_after_utc - c.not_valid_before_utc for c in (root, ica, leaf)] == [
        timedelta(days=3650), timedelta(days=1825), timedelta(days=365)]
    for c in (root, ica, leaf):
        assert c.version == x509.Version.v3
        assert isinstance(c.signature_hash_algorithm, hashes.SHA256)
        assert 0 < c.serial_number < 2 ** 159


def _shape(cert: x509.Certificate) -> list[tuple]:
    """Extensions without key-dependent bytes: what two runs of the same profile share."""
    out = []
    for e in cert.extensions:
        value = e.value
        if isinstance(value, x509.SubjectKeyIdentifier):
            value = "ski"
        elif isinstance(value, x509.AuthorityKeyIdentifier):
            value = ("aki", value.key_identifier is not None, value.authority_cert_issuer,
                     value.authority_cert_serial_number)
        out.append((e.oid.dotted_string, e.critical, value))
    return out


def test_profiles_match_what_the_seeds_openssl_commands_make(first_run, tmp_path):
    """Replay seed steps 2 and 6 with the real openssl (2048-bit keys for speed) and compare extension by extension."""
    ref = tmp_path
    for sub in ("root", "ca", "device"):
        (ref / sub).mkdir()
    rid = SEED_ID
    run_openssl("req", "-x509", "-new", "-nodes", "-newkey", "rsa:2048", "-keyout", "root/root-ca.key",
                "-out", "root/root-ca.pem", "-days", "3650", "-sha256", "-subj", f"/CN={rid}-root",
                "-addext", "basicConstraints=critical,CA:true,pathlen:1",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                "-addext", "subjectKeyIdentifier=hash", "-addext", "authorityKeyIdentifier=keyid:always", cwd=ref)
    run_openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca/intermediate-ca.key",
                "-out", "ca/intermediate-ca.csr", "-subj", f"/CN={rid}-intermediate", cwd=ref)
    (ref / "ca/intermediate-ext.cnf").write_text(INTERMEDIATE_EXT, encoding="ascii")
    run_openssl("x509", "-req", "-in", "ca/intermediate-ca.csr", "-CA", "root/root-ca.pem", "-CAkey", "root/root-ca.key",
                "-CAcreateserial", "-out", "ca/intermediate-ca.pem", "-days", "1825", "-sha256",
                "-extfile", "ca/intermediate-ext.cnf", "-extensions", "v3_intermediate", cwd=ref)
    run_openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", "device/device.key",
                "-out", "device/device.csr", "-subj", f"/CN={rid}", cwd=ref)
    (ref / "device/device-ext.cnf").write_text(DEVICE_EXT.replace(SEED_ID, RID), encoding="ascii")
    run_openssl("x509", "-req", "-in", "device/device.csr", "-CA", "ca/intermediate-ca.pem",
                "-CAkey", "ca/intermediate-ca.key", "-out", "device/device.pem", "-days", "365", "-sha256",
                "-extfile", "device/device-ext.cnf", "-extensions", "v3_req", cwd=ref)
    for name in ("root/root-ca.pem", "ca/intermediate-ca.pem", "device/device.pem"):
        assert _shape(_cert(first_run.cert_dir, name)) == _shape(_cert(ref, name)), name


def test_both_cas_are_verified_in_dps_and_the_group_exists(server, first_run):
    d = first_run.cert_dir
    with svc(server) as c:
        for which, pem in (("root", "root/root-ca.pem"), ("intermediate", "ca/intermediate-ca.pem")):
            r = c.get(f"/certificates/{RID}-{which}")
            assert r.status_code == 200, r.text
            props = r.json()["properties"]
            assert props["isVerified"] is True
            assert props["sha256Thumbprint"] == _cert(d, pem).fingerprint(hashes.SHA256()).hex().upper()
            assert props["subject"] == f"CN={RID}-{which}"
        r = c.get(f"/enrollmentGroups/{RID}-group")
        assert r.status_code == 200, r.text
        group = r.json()
        ns = c.get("/namespaces/default")
        assert ns.status_code == 200 and POLICY in ns.json()["properties"]["policies"]
    assert group["attestation"]["type"] == "x509"
    assert group["attestation"]["x509"]["caReferences"] == {"primary": f"{RID}-intermediate"}
    assert [group["credentialPolicyName"], group["namespaceName"], group["provisioningStatus"]] == [
        POLICY, "default", "enabled"]
    s = first_run.summary
    assert [(c["name"], c["isVerified"], c["action"]) for c in s["certificates"]] == [
        (f"{RID}-root", True, "uploaded, verified"), (f"{RID}-intermediate", True, "uploaded, verified")]
    assert s["credentialPolicy"] == {"namespace": "default", "policy": POLICY, "action": "created namespace and policy"}
    assert s["enrollmentGroup"] == {"enrollmentGroupId": f"{RID}-group", "caReference": f"{RID}-intermediate",
                                    "credentialPolicyName": POLICY, "namespaceName": "default",
                                    "provisioningStatus": "enabled", "action": "created"}


def test_device_provisions_with_the_bootstrap_chain(server, first_run, tmp_path):
    d = first_run.cert_dir
    store = tmp_path / "store"
    doc = _json(server.cli("device", "provision", "--registration-id", RID,
                           "--certificate-file", str(d / "device/device-full-chain.pem"),
                           "--key-file", str(d / "device/device.key"), "--transport", "https",
                           "--store-dir", str(store)))
    assert [doc["registrationId"], doc["status"], doc["assignedHub"], doc["deviceId"]] == [RID, "assigned", "localhost", RID]
    chain = x509.load_pem_x509_certificates((store / "fullchain.pem").read_bytes())
    assert len(chain) == 3
    leaf, issuing, root = chain
    assert leaf.subject.rfc4514_string() == f"CN={RID}" and doc["certificate"]["subject"] == f"CN={RID}"
    assert doc["certificate"]["serialNumber"] == f"{leaf.serial_number:X}"
    with svc(server) as c:
        policy = c.get(f"/namespaces/default/credentials/default/policies/{POLICY}").json()
        credential = c.get("/namespaces/default/credentials/default").json()
    ica_pem = policy["properties"]["certificate"]["certificateAuthorityConfiguration"]["certificate"]
    assert issuing == x509.load_pem_x509_certificate(ica_pem.encode())
    assert root == x509.load_pem_x509_certificate(credential["properties"]["certificate"].encode())
    assert stat.S_IMODE((store / "device.key").stat().st_mode) == 0o600
    (tmp_path / "root.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))
    out = run_openssl("verify", "-CAfile", str(tmp_path / "root.pem"), "-untrusted", str(store / "chain.pem"),
                      str(store / "device.pem"))
    assert out.stdout.strip() == f"{store / 'device.pem'}: OK"


def test_rerun_reuses_files_and_server_state(server, first_run):
    d = first_run.cert_dir
    before = {name: (d / name).read_bytes() for name in LAYOUT}
    fingerprint = _cert(d, "root/root-ca.pem").fingerprint(hashes.SHA256())
    summary = _json(server.cli("bootstrap", "--registration-id", RID, "--cert-dir", str(d), "--credential-policy", POLICY,
                               "-o", "json"))
    assert summary["created"] == []
    assert _cert(d, "root/root-ca.pem").fingerprint(hashes.SHA256()) == fingerprint
    assert {name: (d / name).read_bytes() for name in LAYOUT} == before
    assert [c["action"] for c in summary["certificates"]] == ["unchanged", "unchanged"]
    assert summary["credentialPolicy"]["action"] == "unchanged"
    assert summary["enrollmentGroup"]["action"] == "unchanged"
    table = server.cli("bootstrap", "--registration-id", RID, "--cert-dir", str(d), "--credential-policy", POLICY)
    assert table.returncode == 0, table.stderr
    assert "created: none (existing files reused)" in table.stdout and f"{RID}-intermediate" in table.stdout


def test_force_regenerates_and_replaces_the_cas_in_dps(server, first_run):
    """Last in the module: it replaces the chain the other tests use."""
    d = first_run.cert_dir
    fingerprint = _cert(d, "root/root-ca.pem").fingerprint(hashes.SHA256())
    summary = _json(server.cli("bootstrap", "--registration-id", RID, "--cert-dir", str(d), "--credential-policy", POLICY,
                               "--force", "-o", "json"))
    assert summary["created"] == ["root", "intermediate", "device"]
    new_root = _cert(d, "root/root-ca.pem")
    assert new_root.fingerprint(hashes.SHA256()) != fingerprint
    assert [c["action"] for c in summary["certificates"]] == ["replaced, verified", "replaced, verified"]
    with svc(server) as c:
        props = c.get(f"/certificates/{RID}-root").json()["properties"]
    assert props["isVerified"] is True and props["sha256Thumbprint"] == new_root.fingerprint(hashes.SHA256()).hex().upper()
    assert summary["enrollmentGroup"]["action"] == "unchanged"
    for name in KEYS:
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600


# ---------------------------------------------------------------- no server needed


def _offline(*args: str) -> object:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENDPS_")}
    return invoke_cli(env, "bootstrap", *args)


@pytest.fixture(scope="module")
def offline_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("offline") / "certs"
    proc = _offline("--registration-id", "off-dev", "--cert-dir", str(d), "--skip-upload", "-o", "json")
    assert _json(proc)["certificates"] == [] and _json(proc)["enrollmentGroup"] is None
    return d


def test_skip_upload_needs_no_server_and_refuses_foreign_or_partial_files(offline_dir, tmp_path):
    assert sorted(str(p.relative_to(offline_dir)) for p in offline_dir.rglob("*") if p.is_file()) == sorted(LAYOUT)
    _fails(_offline("--registration-id", "other-dev", "--cert-dir", str(offline_dir), "--skip-upload"),
           "root-ca.pem is for CN='off-dev-root', not 'other-dev-root'", "--force")
    partial = tmp_path / "partial"
    shutil.copytree(offline_dir, partial)
    (partial / "ca/intermediate-ca.key").unlink()
    _fails(_offline("--registration-id", "off-dev", "--cert-dir", str(partial), "--skip-upload"),
           "intermediate-ca.pem exists without", "intermediate-ca.key")
    _fails(_offline("--registration-id", "off-dev", "--cert-dir", str(partial)), "no connection")
    # a loose key mode left by someone else is tightened, and the device stage alone is remade when missing
    os.chmod(partial / "root/root-ca.key", 0o644)
    shutil.copy(offline_dir / "ca/intermediate-ca.key", partial / "ca/intermediate-ca.key")
    (partial / "device/device.pem").unlink()
    (partial / "device/device.key").unlink()
    summary = _json(_offline("--registration-id", "off-dev", "--cert-dir", str(partial), "--skip-upload", "-o", "json"))
    assert summary["created"] == ["device"]
    assert stat.S_IMODE((partial / "root/root-ca.key").stat().st_mode) == 0o600
    run_openssl("verify", "-CAfile", "root/root-ca.pem", "-untrusted", "ca/intermediate-ca.pem", "device/device.pem",
                cwd=partial)


def test_unwritable_cert_dir_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    _fails(_offline("--registration-id", "x", "--cert-dir", str(blocker / "certs"), "--skip-upload"),
           "cannot write certificates")


def test_keys_are_written_0600_before_they_get_their_name(tmp_path, monkeypatch):
    """Every file appears by rename of a temporary file that already has its final mode (never world-readable)."""
    seen: list[tuple[str, int]] = []
    real_replace = os.replace

    def replace(src, dst):
        assert Path(src).parent == Path(dst).parent
        seen.append((Path(dst).name, stat.S_IMODE(os.stat(src).st_mode)))
        return real_replace(src, dst)

    monkeypatch.setattr(bootstrap_module.os, "replace", replace)
    pool = [rsa.generate_private_key(65537, 2048) for _ in range(3)]
    bootstrap_module.build_pki("fast", tmp_path, force=False, generate=lambda bits: pool.pop())
    assert sorted(seen) == sorted([("root-ca.key", 0o600), ("root-ca.pem", 0o644), ("intermediate-ca.key", 0o600),
                                   ("intermediate-ca.pem", 0o644), ("device.key", 0o600), ("device.pem", 0o644),
                                   ("chain.pem", 0o644), ("device-full-chain.pem", 0o644)])
