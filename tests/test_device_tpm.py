"""The device SDK's TPM (``opendps.device.tpm``) against swtpm, without a running server.

EK and SRK made and found again, the EK-derived registration id, and DPS's challenge round trip: an
``authenticationKey`` (MakeCredential to the EK bound to the SRK's name, an HMAC key duplicated under the SRK
with the credential as inner wrapper) built three ways — tpm2-pytss' software utilities, the same with
``tpm2_makecredential -T none`` for the credential, and the server's own ``opendps.pki.tpm`` — is activated
in the TPM, and the TPM's HMAC-SHA256 equals Python's with the same key. A challenge made for another TPM, or
malformed, fails with an error that says so.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opendps.transport import sas

pytestmark = pytest.mark.timeout(120, func_only=True)


def open_tpm(tcti: str, **kwargs):
    from opendps.device.tpm import DeviceTpm

    return DeviceTpm(tcti, **kwargs)


def publics(tcti: str) -> tuple[str, str]:
    with open_tpm(tcti) as tpm:
        return tpm.endorsement_key(), tpm.storage_root_key()


def make_challenge(ek_b64: str, srk_b64: str, hmac_key: bytes, *, tools_tcti: str | None = None,
                   directory: Path | None = None) -> str:
    """An authenticationKey as DPS makes it (wire spec §3.4), in software: the six u16-size-prefixed structures.
    With ``directory``, the credential part comes from ``tpm2_makecredential -T none`` instead of tpm2-pytss."""
    from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
    from tpm2_pytss.types import (
        TPM2B_DATA,
        TPM2B_PUBLIC,
        TPM2B_SENSITIVE,
        TPMS_SCHEME_HASH,
        TPMT_KEYEDHASH_SCHEME,
        TPMT_SYM_DEF_OBJECT,
        TPMU_SCHEME_KEYEDHASH,
        TPMU_SYM_KEY_BITS,
        TPMU_SYM_MODE,
    )
    from tpm2_pytss.utils import make_credential, tools_to_credential, wrap

    ek, _ = TPM2B_PUBLIC.unmarshal(base64.b64decode(ek_b64))
    srk, _ = TPM2B_PUBLIC.unmarshal(base64.b64decode(srk_b64))
    scheme = TPMT_KEYEDHASH_SCHEME(scheme=TPM2_ALG.HMAC,
                                   details=TPMU_SCHEME_KEYEDHASH(hmac=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256)))
    sensitive, public = TPM2B_SENSITIVE.keyedhash_from_secret(
        hmac_key, objectAttributes=TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.USERWITHAUTH, scheme=scheme)
    inner_key = os.urandom(16)  # the credential: the inner wrapper's AES-128 key
    aes128cfb = TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.AES, keyBits=TPMU_SYM_KEY_BITS(aes=128),
                                    mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB))
    _, duplicate, duplicate_seed = wrap(srk.publicArea, public, sensitive, inner_key, aes128cfb)
    if directory is None:
        id_object, identity_secret = make_credential(ek, inner_key, srk.get_name())
    else:
        (directory / "ek.pub").write_bytes(ek.marshal())
        (directory / "secret").write_bytes(inner_key)  # -n: the name in hex on the command line (tpm2-tools 5)
        subprocess.run(["tpm2_makecredential", "-T", "none", "-u", "ek.pub", "-n", bytes(srk.get_name()).hex(),
                        "-s", "secret",
                        "-o", "cred.out"], cwd=directory, check=True, capture_output=True, timeout=30)
        id_object, identity_secret = tools_to_credential((directory / "cred.out").read_bytes())
    parts = (id_object, identity_secret, duplicate, duplicate_seed, public, TPM2B_DATA())
    return base64.b64encode(b"".join(part.marshal() for part in parts)).decode()


def python_hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


# ---------------------------------------------------------------- EK, SRK, registration id
def test_ek_and_srk_are_made_and_stable(tcti):
    from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
    from tpm2_pytss.types import TPM2B_PUBLIC

    with open_tpm(tcti) as tpm:
        ek_b64, srk_b64, rid = tpm.endorsement_key(), tpm.storage_root_key(), tpm.registration_id()
    with open_tpm(tcti) as again:  # a second open (new process state): the same keys from the same seeds
        assert (again.endorsement_key(), again.storage_root_key(), again.registration_id()) == (ek_b64, srk_b64, rid)

    ek, used = TPM2B_PUBLIC.unmarshal(base64.b64decode(ek_b64))
    assert used == len(base64.b64decode(ek_b64))
    area = ek.publicArea
    assert (area.type, area.nameAlg, area.parameters.rsaDetail.keyBits) == (TPM2_ALG.RSA, TPM2_ALG.SHA256, 2048)
    # the TCG EK Credential Profile's default RSA template: restricted decryption key, admin by policy only, whose
    # policy is PolicySecret(TPM_RH_ENDORSEMENT)
    assert area.objectAttributes == (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
                                     | TPMA_OBJECT.ADMINWITHPOLICY | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT)
    assert bytes(area.authPolicy).hex() == "837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa"
    assert len(bytes(area.unique.rsa)) == 256
    srk, _ = TPM2B_PUBLIC.unmarshal(base64.b64decode(srk_b64))
    srk_area = srk.publicArea
    assert srk_area.parameters.rsaDetail.keyBits == 2048
    assert srk_area.objectAttributes & TPMA_OBJECT.RESTRICTED and srk_area.objectAttributes & TPMA_OBJECT.DECRYPT
    assert bytes(srk_area.authPolicy) == b"" and bytes(srk_area.unique.rsa) != bytes(area.unique.rsa)


def test_registration_id_is_base32_sha256_of_the_ek_tpm2b_public(tcti):
    with open_tpm(tcti) as tpm:
        ek = base64.b64decode(tpm.endorsement_key())
        rid = tpm.registration_id()
    # the C SDK's load_registration_id: SHA-256 over the marshalled TPM2B_PUBLIC (size prefix included)
    assert int.from_bytes(ek[:2], "big") == len(ek) - 2
    assert rid == base64.b32encode(hashlib.sha256(ek).digest()).decode().rstrip("=").lower()
    assert len(rid) == 52 and rid == rid.lower() and "=" not in rid


def test_persistent_srk_and_ek_are_used_when_present(other_tcti, tmp_path):
    from tests.swtpm import tpm2

    from opendps.device.tpm import EK_HANDLE, SRK_HANDLE

    ek, srk = publics(other_tcti)
    with open_tpm(other_tcti, persist_srk=True) as tpm:
        assert tpm.storage_root_key() == srk
    assert f"{SRK_HANDLE:#x}" in tpm2(other_tcti, "getcap", "handles-persistent").stdout.decode()
    # an EK provisioned by another tool is read from its handle, not made again: nothing transient is loaded
    tpm2(other_tcti, "createek", "-c", f"{EK_HANDLE:#x}", "-G", "rsa", "-u", str(tmp_path / "ek.pub"))
    with open_tpm(other_tcti) as tpm:
        assert tpm.storage_root_key() == srk
        assert base64.b64decode(tpm.endorsement_key()) == (tmp_path / "ek.pub").read_bytes()
        assert tpm._transient == []
        assert tpm.endorsement_key() == ek  # tpm2-tools' createek uses the same TCG default template


# ---------------------------------------------------------------- the challenge
def test_challenge_round_trip_signs_with_the_duplicated_key(tcti, tmp_path):
    key = os.urandom(32)
    ek, srk = publics(tcti)
    challenge = make_challenge(ek, srk, key)
    key_file = tmp_path / "dps-hmac.key"
    with open_tpm(tcti) as tpm:
        started = time.monotonic()
        tpm.activate(challenge, key_file=key_file)
        activation = time.monotonic() - started
        for data in (b"x", b"0ne2abc/registrations/dev-1\n1700000000", os.urandom(1024), os.urandom(3000)):
            assert tpm.sign(data) == python_hmac(key, data), len(data)
        resource = "0ne00000001/registrations/tpm-dev-1"
        token = tpm.sas_token(resource, 1_900_000_000, "registration")
    assert activation < 10
    parsed = sas.parse(token)
    assert (parsed.resource, parsed.expiry, parsed.key_name) == (resource, 1_900_000_000, "registration")
    assert parsed.raw_resource == "0ne00000001%2Fregistrations%2Ftpm-dev-1"
    sas.verify(parsed, base64.b64encode(key).decode(), now=1_800_000_000)  # the server's check, with the key in clear
    # the key file holds only the SRK-wrapped private: another process loads it into the same TPM and signs alike
    assert key not in key_file.read_bytes() and oct(key_file.stat().st_mode & 0o777) == "0o600"
    with open_tpm(tcti) as later:
        later.load_key_file(key_file)
        assert later.sign(b"later") == python_hmac(key, b"later")


def test_credential_from_tpm2_makecredential(tcti, tmp_path):
    """An independent MakeCredential (tpm2-tools in software mode) opens the same way."""
    key = os.urandom(32)
    ek, srk = publics(tcti)
    challenge = make_challenge(ek, srk, key, directory=tmp_path)
    with open_tpm(tcti) as tpm:
        tpm.activate(challenge)
        assert tpm.sign(b"tools") == python_hmac(key, b"tools")


def test_key_persisted_at_a_handle(other_tcti):
    from opendps.device.tpm import ID_KEY_HANDLE

    first, second = os.urandom(32), os.urandom(32)
    ek, srk = publics(other_tcti)
    with open_tpm(other_tcti) as tpm:
        tpm.activate(make_challenge(ek, srk, first), persistent_handle=ID_KEY_HANDLE)
    with open_tpm(other_tcti) as tpm:
        tpm.load_persistent_key()
        assert tpm.sign(b"p") == python_hmac(first, b"p")
        tpm.activate(make_challenge(ek, srk, second), persistent_handle=ID_KEY_HANDLE)  # replaces the old key
    with open_tpm(other_tcti) as tpm:
        tpm.load_persistent_key(ID_KEY_HANDLE)
        assert tpm.sign(b"p") == python_hmac(second, b"p")


def test_challenge_made_by_the_server(tcti, other_tcti):
    """The server's own crypto (``opendps.pki.tpm``, cryptography only) and the device's TPM agree: its challenge
    activates and signs here, its registration id is the device's, and its challenge for another TPM is refused."""
    from opendps.device.tpm import TpmError
    from opendps.pki.tpm import EndorsementKey, StorageRootKey, make_challenge, registration_id_from_ek

    ek, srk = publics(tcti)
    challenge = make_challenge(EndorsementKey.parse(ek), StorageRootKey.parse(srk), os.urandom(32))
    with open_tpm(tcti) as tpm:
        assert tpm.registration_id() == registration_id_from_ek(EndorsementKey.parse(ek))
        tpm.activate(challenge.authentication_key)
        token = tpm.sas_token(f"0ne00000001/registrations/{tpm.registration_id()}", 1_900_000_000, "registration")
    sas.verify(sas.parse(token), base64.b64encode(challenge.hmac_key).decode(), now=1_800_000_000)
    other_ek, _ = publics(other_tcti)
    elsewhere = make_challenge(EndorsementKey.parse(other_ek), StorageRootKey.parse(srk), os.urandom(32))
    with open_tpm(tcti) as tpm, pytest.raises(TpmError, match="not made for this TPM"):
        tpm.activate(elsewhere.authentication_key)


def test_challenge_for_another_tpm_is_refused(tcti, other_tcti):
    from opendps.device.tpm import TpmError

    ek, srk = publics(tcti)
    other_ek, other_srk = publics(other_tcti)
    key = os.urandom(32)
    with open_tpm(tcti) as tpm:
        with pytest.raises(TpmError, match="not made for this TPM"):
            tpm.activate(make_challenge(other_ek, srk, key))  # made to another EK
        with pytest.raises(TpmError, match="not made for this TPM"):
            tpm.activate(make_challenge(ek, other_srk, key))  # bound to another SRK's name
        with pytest.raises(TpmError, match="no HMAC key"):
            tpm.sign(b"nothing was imported")


def test_malformed_challenges_say_what_is_wrong(tcti):
    from opendps.device.tpm import TpmError, split_authentication_key

    ek, srk = publics(tcti)
    good = base64.b64decode(make_challenge(ek, srk, os.urandom(32)))
    parts = split_authentication_key(base64.b64encode(good).decode())
    assert len(parts) == 6 and b"".join(parts) == good and parts[5] == b"\x00\x00"
    assert split_authentication_key(base64.b64encode(good[:-2]).decode())[5] == b"\x00\x00"  # no TPM2B_DATA: empty
    cases = {
        "not valid base64": "@@@",
        "ends before its TPM2B_PRIVATE": base64.b64encode(parts[0] + parts[1]).decode(),
        r"TPM2B_ENCRYPTED_SECRET \(identity\) \(structure 2 of 6\) claims 256 bytes": base64.b64encode(good[:300]).decode(),
        "bytes after its six structures": base64.b64encode(good + b"\x00").decode(),
    }
    for message, blob in cases.items():
        with pytest.raises(TpmError, match=message):
            split_authentication_key(blob)
    # a public that is not an HMAC key: the SRK's public in place of the fifth structure
    parts[4] = base64.b64decode(srk)
    with open_tpm(tcti) as tpm, pytest.raises(TpmError, match="not a keyed-hash"):
        tpm.activate(base64.b64encode(b"".join(parts)).decode())


def test_tcti_from_environment(monkeypatch):
    from opendps.device.tpm import HARDWARE_TCTI, tcti_from_environment

    monkeypatch.delenv("TPM2TOOLS_TCTI", raising=False)
    monkeypatch.delenv("TCTI", raising=False)
    assert tcti_from_environment() == HARDWARE_TCTI == "device:/dev/tpmrm0"
    monkeypatch.setenv("TCTI", "swtpm:port=1")
    assert tcti_from_environment() == "swtpm:port=1"
    monkeypatch.setenv("TPM2TOOLS_TCTI", "swtpm:port=2")
    assert tcti_from_environment() == "swtpm:port=2"
    assert tcti_from_environment("mssim:port=3") == "mssim:port=3"


def test_imports_without_server_code_or_tpm2_pytss():
    """Like test_device_sdk's rule, and without tpm2-pytss: opening a TPM then says what to install."""
    code = """
import sys
BLOCKED = ("opendps.frontends", "opendps.services", "opendps.hub", "opendps.provisioning", "opendps.store",
           "opendps.pki", "opendps.registry", "opendps.instance", "opendps.server", "opendps.cli",
           "sqlalchemy", "aiohttp", "OpenSSL", "tpm2_pytss")
class Block:
    def find_spec(self, name, path=None, target=None):
        if name in BLOCKED or name.startswith(tuple(b + "." for b in BLOCKED)):
            raise ImportError(f"blocked import of {name}")
        return None
sys.meta_path.insert(0, Block())
from opendps.device.tpm import DeviceTpm, TpmUnavailable
try:
    DeviceTpm("swtpm:port=1")
except TpmUnavailable as exc:
    print(exc)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'opendps[tpm]'" in proc.stdout and "libtss2-dev" in proc.stdout
