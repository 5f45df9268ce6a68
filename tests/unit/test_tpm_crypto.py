"""opendps.pki.tpm: parsing a TPM's keys, KDFa, MakeCredential, duplication and the authenticationKey layout.

The pure tests check the primitives against known answers and open the blob with a Python model of the
TPM's side. The swtpm tests are the proof that matters: a real (software) TPM 2.0 activates the credential
made by our code, imports our duplicate under its SRK with that credential as the inner wrapper key, and
computes the same HMAC-SHA256 as Python — the device side of Azure's TPM flow, with tpm2-tools.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from tests.swtpm import tpm2

from opendps.errors import InvalidInput
from opendps.pki import tpm
from opendps.pki.tpm import (
    ALG_AES,
    ALG_CFB,
    ALG_ECC,
    ALG_NULL,
    ALG_RSA,
    ALG_SHA1,
    ALG_SHA256,
    DECRYPT,
    EK_DEFAULT_ATTRIBUTES,
    EK_DEFAULT_POLICY,
    FIXED_PARENT,
    FIXED_TPM,
    NO_DA,
    RESTRICTED,
    SENSITIVE_DATA_ORIGIN,
    SIGN_ENCRYPT,
    USER_WITH_AUTH,
    EndorsementKey,
    StorageRootKey,
    kdfa,
    make_challenge,
    registration_id_from_ek,
    split_authentication_key,
    tpm2b,
    u16,
)

SRK_ATTRIBUTES = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | USER_WITH_AUTH | NO_DA | RESTRICTED | DECRYPT

# --- building TPM2B_PUBLICs in Python ------------------------------------------------------------------------


def rsa_public_area(key: rsa.RSAPublicKey, *, attributes: int = EK_DEFAULT_ATTRIBUTES, name_alg: int = ALG_SHA256,
                    policy: bytes = EK_DEFAULT_POLICY, sym: tuple[int, int, int] = (ALG_AES, 128, ALG_CFB),
                    scheme: int = ALG_NULL, bits: int = 2048, exponent: int = 0, modulus: bytes | None = None,
                    type_: int = ALG_RSA) -> bytes:
    n = key.public_numbers().n
    modulus = n.to_bytes((n.bit_length() + 7) // 8, "big") if modulus is None else modulus
    symmetric = u16(sym[0]) + (u16(sym[1]) + u16(sym[2]) if sym[0] != ALG_NULL else b"")
    scheme_bytes = u16(scheme) + (u16(ALG_SHA256) if scheme != ALG_NULL else b"")
    return (u16(type_) + u16(name_alg) + struct.pack(">I", attributes) + tpm2b(policy) + symmetric + scheme_bytes
            + u16(bits) + struct.pack(">I", exponent) + tpm2b(modulus))


def ecc_public_area(key: ec.EllipticCurvePublicKey, *, attributes: int = SRK_ATTRIBUTES, curve: int = 0x0003) -> bytes:
    numbers = key.public_numbers()
    size = (key.curve.key_size + 7) // 8
    return (u16(ALG_ECC) + u16(ALG_SHA256) + struct.pack(">I", attributes) + tpm2b(b"")
            + u16(ALG_AES) + u16(128) + u16(ALG_CFB) + u16(ALG_NULL) + u16(curve) + u16(ALG_NULL)
            + tpm2b(numbers.x.to_bytes(size, "big")) + tpm2b(numbers.y.to_bytes(size, "big")))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def ek_private() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


@pytest.fixture(scope="module")
def srk_private() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


@pytest.fixture(scope="module")
def ek_area(ek_private) -> bytes:
    return rsa_public_area(ek_private.public_key())


# --- KDFa ----------------------------------------------------------------------------------------------------

# The TPM reference implementation's KDFa self-test (KdfTestData.h in the TCG reference code / libtpms):
# a 20-byte key, label "KDFSELFTESTLABEL", 8-byte contexts, 160 bits out, one expected value per hash.
KDF_KEY = bytes.fromhex("271FA08BBDC5060EC3DFA928FF9B73123A12DA0C")
KDF_U = bytes.fromhex("CE244F395DCA7391")
KDF_V = bytes.fromhex("DA504031DDF12E83")


@pytest.mark.parametrize(("hash_name", "expected"), [
    ("sha256", "bb0259e1c8ba607e6a2cd704b69a902e9ade84c4"),
    ("sha1", "55b5a7184aa07423c47dae766c26a2377d7cf851"),
    ("sha384", "1dce70c9113eb2dba47bd9cfc72bf46f45b09312"),
    ("sha512", "8be2c1b85b78569b9fa759f5857c56d684810fd3"),
])
def test_kdfa_reference_implementation_vectors(hash_name, expected):
    assert kdfa(hash_name, KDF_KEY, "KDFSELFTESTLABEL", KDF_U, KDF_V, 160).hex() == expected
    # the label's terminating NUL is added when missing, never twice
    assert kdfa(hash_name, KDF_KEY, "KDFSELFTESTLABEL\0", KDF_U, KDF_V, 160).hex() == expected


def test_kdfa_counter_blocks_and_partial_bytes():
    long = kdfa("sha256", b"k", "STORAGE", b"u", b"", 512)  # two HMAC blocks, counter 1 and 2
    first = hmac.new(b"k", b"\0\0\0\1STORAGE\0u" + struct.pack(">I", 512), "sha256").digest()
    second = hmac.new(b"k", b"\0\0\0\2STORAGE\0u" + struct.pack(">I", 512), "sha256").digest()
    assert long == first + second
    odd = kdfa("sha256", b"k", "X", b"", b"", 12)  # 12 bits: 2 bytes, the top 4 bits of the first masked
    assert len(odd) == 2 and odd[0] < 16


# --- parsing ---------------------------------------------------------------------------------------------------


def test_tcg_default_ek_parses_with_name_and_round_trip(ek_private, ek_area):
    ek = EndorsementKey.parse(b64(tpm2b(ek_area)))
    assert ek.tpm2b_public == tpm2b(ek_area)
    assert ek.base64 == b64(tpm2b(ek_area))
    assert ek.name == u16(ALG_SHA256) + hashlib.sha256(ek_area).digest()
    assert ek.key.public_numbers() == ek_private.public_key().public_numbers()
    assert ek.public.attributes == 0x000300B2  # the TCG default EK template's attributes
    assert ek.same_key(EndorsementKey.parse(tpm2b(ek_area)))  # bytes accepted as well as base64


def test_ek_template_variants_are_accepted(ek_private):
    key = ek_private.public_key()
    # the high-range style template with userWithAuth, no policy, explicit exponent: still an EK
    variant = rsa_public_area(key, attributes=EK_DEFAULT_ATTRIBUTES | USER_WITH_AUTH, policy=b"", exponent=65537)
    ek = EndorsementKey.parse(b64(tpm2b(variant)))
    assert not ek.same_key(EndorsementKey.parse(b64(tpm2b(rsa_public_area(key)))))  # another public, another EK


def _replace_attributes(area: bytes, attributes: int) -> bytes:
    return area[:4] + struct.pack(">I", attributes) + area[8:]


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda a: tpm2b(a)[:-1], "truncated"),
    (lambda a: tpm2b(a)[:1], "truncated"),
    (lambda a: tpm2b(a)[:40], "truncated"),
    (lambda a: tpm2b(a) + b"\0", "1 trailing bytes"),
    (lambda a: u16(len(a) + 2) + a + b"\0\0", "2 trailing bytes"),  # a size that covers junk inside the area
    (lambda a: b"", "missing"),
    (lambda a: u16(0), "empty"),
    (lambda a: u16(4000) + a, "larger than"),
])
def test_ek_structure_errors(ek_area, mutate, message):
    with pytest.raises(InvalidInput, match=message):
        EndorsementKey.parse(b64(mutate(ek_area)))


@pytest.mark.parametrize(("area_kwargs", "message"), [
    ({"bits": 1024}, "not RSA-2048"),
    ({"modulus": b"\x80" + b"\0" * 127}, "modulus .* 128 bytes"),
    ({"modulus": b"\x01" * 256}, "not a 2048-bit number"),
    # an even n: cryptography builds the key, then encrypting the challenge to it raised ValueError (a 500)
    ({"modulus": b"\xc1" * 255 + b"\x02"}, "modulus is even"),
    ({"exponent": 3}, "exponent 3"),
    ({"name_alg": ALG_SHA1}, "unsupported nameAlg SHA-1"),
    ({"attributes": EK_DEFAULT_ATTRIBUTES & ~RESTRICTED}, "not a restricted decryption key"),
    ({"attributes": EK_DEFAULT_ATTRIBUTES & ~DECRYPT}, "not a restricted decryption key"),
    ({"attributes": EK_DEFAULT_ATTRIBUTES | SIGN_ENCRYPT}, "not a restricted decryption key"),
    ({"attributes": EK_DEFAULT_ATTRIBUTES & ~FIXED_TPM}, "not bound to its TPM"),
    ({"sym": (ALG_NULL, 0, 0)}, "AES-128-CFB"),
    ({"sym": (ALG_AES, 256, ALG_CFB)}, "AES-128-CFB"),
    ({"scheme": 0x0017}, "no scheme"),  # RSAOAEP
    ({"type_": 0x0025}, "unsupported key type SYMCIPHER"),
])
def test_ek_content_errors(ek_private, area_kwargs, message):
    area = rsa_public_area(ek_private.public_key(), **area_kwargs)
    with pytest.raises(InvalidInput, match=message):
        EndorsementKey.parse(b64(tpm2b(area)))


def test_ek_other_errors(srk_private):
    with pytest.raises(InvalidInput, match="not valid base64"):
        EndorsementKey.parse("not*base64")
    with pytest.raises(InvalidInput, match="missing"):
        EndorsementKey.parse("")
    ecc = ecc_public_area(ec.generate_private_key(ec.SECP256R1()).public_key(), attributes=EK_DEFAULT_ATTRIBUTES)
    with pytest.raises(InvalidInput, match="endorsementKey is not RSA-2048 .type ECC"):
        EndorsementKey.parse(b64(tpm2b(ecc)))


def test_srk_rsa_and_ecc_parse(srk_private):
    rsa_srk = StorageRootKey.parse(b64(tpm2b(rsa_public_area(srk_private.public_key(), attributes=SRK_ATTRIBUTES,
                                                             policy=b""))))
    assert isinstance(rsa_srk.key, rsa.RSAPublicKey)
    ecc_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    ecc_srk = StorageRootKey.parse(b64(tpm2b(ecc_public_area(ecc_key))))
    assert ecc_srk.key.public_numbers() == ecc_key.public_numbers()
    assert ecc_srk.name[:2] == u16(ALG_SHA256) and len(ecc_srk.name) == 34


def test_srk_errors(srk_private):
    with pytest.raises(InvalidInput, match="curve 0x0004"):
        StorageRootKey.parse(b64(tpm2b(ecc_public_area(ec.generate_private_key(ec.SECP384R1()).public_key(),
                                                       curve=0x0004))))
    area = ecc_public_area(ec.generate_private_key(ec.SECP256R1()).public_key())
    off_curve = area[:-1] + bytes([area[-1] ^ 1])
    with pytest.raises(InvalidInput, match="not on P-256"):
        StorageRootKey.parse(b64(tpm2b(off_curve)))
    signing = ecc_public_area(ec.generate_private_key(ec.SECP256R1()).public_key(),
                              attributes=(SRK_ATTRIBUTES & ~DECRYPT) | SIGN_ENCRYPT)
    with pytest.raises(InvalidInput, match="storageRootKey is not a restricted decryption key"):
        StorageRootKey.parse(b64(tpm2b(signing)))
    even = srk_private.public_key().public_numbers().n ^ 1  # a device's SRK with an even modulus
    with pytest.raises(InvalidInput, match="storageRootKey: the modulus is even"):
        StorageRootKey.parse(b64(tpm2b(rsa_public_area(srk_private.public_key(), attributes=SRK_ATTRIBUTES, policy=b"",
                                                       modulus=even.to_bytes(256, "big")))))
    with pytest.raises(InvalidInput, match="storageRootKey is not RSA-2048"):
        StorageRootKey.parse(b64(tpm2b(rsa_public_area(rsa.generate_private_key(65537, 1024).public_key(),
                                                       attributes=SRK_ATTRIBUTES, bits=1024))))


def test_registration_id_from_ek(ek_area):
    ek = EndorsementKey.parse(tpm2b(ek_area))
    rid = registration_id_from_ek(ek)
    assert len(rid) == 52 and rid == rid.lower() and "=" not in rid
    assert base64.b32decode(rid.upper() + "====") == hashlib.sha256(tpm2b(ek_area)).digest()


# --- the blob, opened by a Python model of the TPM ----------------------------------------------------------


def _cfb_decrypt(key: bytes, data: bytes) -> bytes:
    decryptor = Cipher(algorithms.AES(key), tpm.CFB(b"\0" * 16)).decryptor()
    return decryptor.update(data) + decryptor.finalize()


def _unprotect(seed: bytes, name: bytes, blob: bytes, sym_bits: int = 128) -> bytes:
    """The TPM's check of an outer wrapper: HMAC first, then decrypt (Part 1 §23.3.3 / §24.5)."""
    size = struct.unpack(">H", blob[:2])[0]
    outer, ciphertext = blob[2:2 + size], blob[2 + size:]
    integrity = kdfa("sha256", seed, "INTEGRITY", b"", b"", 256)
    assert hmac.compare_digest(outer, hmac.new(integrity, ciphertext + name, "sha256").digest())
    return _cfb_decrypt(kdfa("sha256", seed, "STORAGE", name, b"", sym_bits), ciphertext)


def _oaep(private: rsa.RSAPrivateKey, data: bytes, label: bytes) -> bytes:
    return private.decrypt(data, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(),
                                              label=label))


def _open_duplicate(private_blob: bytes, seed: bytes, inner_key: bytes, public: tpm.TpmPublic) -> bytes:
    inner = _cfb_decrypt(inner_key, _unprotect(seed, public.name, private_blob))
    assert inner[:2] == u16(32)
    integrity, sensitive = inner[2:34], inner[34:]
    assert integrity == hashlib.sha256(sensitive + public.name).digest()
    assert struct.unpack(">H", sensitive[:2])[0] == len(sensitive) - 2
    body = sensitive[2:]
    assert body[:2] == u16(tpm.ALG_KEYEDHASH) and body[2:4] == u16(0)  # type, empty authValue
    seed_value = body[6:6 + struct.unpack(">H", body[4:6])[0]]
    rest = body[6 + len(seed_value):]
    key = rest[2:2 + struct.unpack(">H", rest[:2])[0]]
    assert public.unique == hashlib.sha256(seed_value + key).digest()  # the public binds the key
    return key


def test_challenge_opens_in_a_python_model_of_the_tpm(ek_private, ek_area, srk_private):
    ek = EndorsementKey.parse(b64(tpm2b(ek_area)))
    srk = StorageRootKey.parse(b64(tpm2b(rsa_public_area(srk_private.public_key(), attributes=SRK_ATTRIBUTES,
                                                         policy=b""))))
    hmac_key = os.urandom(32)
    challenge = make_challenge(ek, srk, hmac_key)
    parts = split_authentication_key(challenge.authentication_key)
    assert parts.data == b""
    assert len(parts.identity_secret) == 256 and len(parts.duplicate_secret) == 256
    # ActivateCredential: seed from the EK, credential bound to the SRK's name
    seed = _oaep(ek_private, parts.identity_secret, b"IDENTITY\0")
    credential_2b = _unprotect(seed, srk.name, parts.id_object)
    assert credential_2b == tpm2b(challenge.credential) and len(challenge.credential) == 16
    with pytest.raises(AssertionError):
        _unprotect(seed, ek.name, parts.id_object)  # another object's name fails the integrity check
    # Import: the outer seed from the SRK, the inner wrapper with the credential
    public = parts.public
    assert public.type == tpm.ALG_KEYEDHASH and public.scheme == tpm.ALG_HMAC and public.scheme_hash == ALG_SHA256
    assert public.attributes & (FIXED_TPM | FIXED_PARENT) == 0  # duplicable, as TPM2_Import requires
    dup_seed = _oaep(srk_private, parts.duplicate_secret, b"DUPLICATE\0")
    assert _open_duplicate(parts.private, dup_seed, challenge.credential, public) == hmac_key


def test_ecc_srk_seed_is_ecdh_kdfe(ek_area):
    ek = EndorsementKey.parse(b64(tpm2b(ek_area)))
    srk_priv = ec.generate_private_key(ec.SECP256R1())
    srk = StorageRootKey.parse(b64(tpm2b(ecc_public_area(srk_priv.public_key()))))
    hmac_key = os.urandom(32)
    challenge = make_challenge(ek, srk, hmac_key)
    parts = split_authentication_key(challenge.authentication_key)
    x_size = struct.unpack(">H", parts.duplicate_secret[:2])[0]
    x = parts.duplicate_secret[2:2 + x_size]
    y = parts.duplicate_secret[4 + x_size:]
    ephemeral = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + x + y)
    z = srk_priv.exchange(ec.ECDH(), ephemeral)
    seed = tpm.kdfe("sha256", z, "DUPLICATE", x, srk.public.unique, 256)
    assert _open_duplicate(parts.private, seed, challenge.credential, parts.public) == hmac_key


def test_split_authentication_key_errors():
    with pytest.raises(InvalidInput, match="authenticationKey is truncated: TPM2B_DATA size"):
        split_authentication_key(b64(tpm2b(b"a") * 4 + tpm2b(tpm.hmac_key_public(b"k" * 32, b"s" * 32).public_area)))


# --- the real check: swtpm ---------------------------------------------------------------------------------

EK_ATTRS = "fixedtpm|fixedparent|sensitivedataorigin|adminwithpolicy|restricted|decrypt"


class Tpm:
    """tpm2-tools against the session's swtpm, flushing transient objects after each step (3 slots)."""

    def __init__(self, tcti: str, directory: Path) -> None:
        self.tcti = tcti
        self.dir = directory

    def __call__(self, tool: str, *args: str, check: bool = True):
        proc = tpm2(self.tcti, tool, *args, cwd=self.dir, check=check)
        tpm2(self.tcti, "flushcontext", "-t", cwd=self.dir)
        return proc

    def read(self, name: str) -> bytes:
        return (self.dir / name).read_bytes()

    def write(self, name: str, data: bytes) -> str:
        (self.dir / name).write_bytes(data)
        return name


@pytest.fixture(scope="module")
def device_tpm(swtpm, tmp_path_factory) -> Tpm:
    """An EK made by tpm2_createek (TCG default template, 256 zero bytes of unique), an EK made from the
    Azure C SDK's template (empty unique), RSA-2048 SRKs with AES-128-CFB and AES-256-CFB and an ECC P-256
    SRK, as context files."""
    t = Tpm(swtpm, tmp_path_factory.mktemp("device-tpm"))
    t("createek", "-c", "ek_tcg.ctx", "-G", "rsa", "-u", "ek_tcg.pub")
    t.write("ek_policy.bin", EK_DEFAULT_POLICY)
    t("createprimary", "-C", "e", "-g", "sha256", "-G", "rsa2048:null:aes128cfb", "-a", EK_ATTRS,
      "-L", "ek_policy.bin", "-c", "ek_empty.ctx")
    t("readpublic", "-c", "ek_empty.ctx", "-o", "ek_empty.pub")
    t("createprimary", "-C", "o", "-g", "sha256", "-G", "rsa2048:null:aes128cfb", "-c", "srk_rsa.ctx")
    t("readpublic", "-c", "srk_rsa.ctx", "-o", "srk_rsa.pub", "-n", "srk_rsa.name")
    t("createprimary", "-C", "o", "-g", "sha256", "-G", "rsa2048:null:aes256cfb", "-c", "srk_rsa256.ctx")
    t("readpublic", "-c", "srk_rsa256.ctx", "-o", "srk_rsa256.pub", "-n", "srk_rsa256.name")
    t("createprimary", "-C", "o", "-g", "sha256", "-G", "ecc256:null:aes128cfb", "-c", "srk_ecc.ctx")
    t("readpublic", "-c", "srk_ecc.ctx", "-o", "srk_ecc.pub", "-n", "srk_ecc.name")
    return t


def _activate(t: Tpm, ek: str, srk: str, blob: str, out: str, check: bool = True):
    """tpm2_activatecredential in a policy session satisfying the EK's PolicySecret(TPM_RH_ENDORSEMENT)."""
    t("startauthsession", "--policy-session", "-S", "session.ctx")
    try:
        t("policysecret", "-S", "session.ctx", "-c", "0x4000000B")
        return t("activatecredential", "-c", f"{srk}.ctx", "-C", f"{ek}.ctx", "-i", blob, "-o", out,
                 "-P", "session:session.ctx", check=check)
    finally:
        t("flushcontext", "session.ctx", check=False)


@pytest.mark.parametrize(("ek", "srk"), [("ek_tcg", "srk_rsa"), ("ek_empty", "srk_ecc"), ("ek_empty", "srk_rsa256")])
def test_swtpm_activates_imports_and_signs(device_tpm, ek, srk):
    t = device_tpm
    endorsement = EndorsementKey.parse(b64(t.read(f"{ek}.pub")))
    storage = StorageRootKey.parse(b64(t.read(f"{srk}.pub")))
    assert storage.name == t.read(f"{srk}.name")  # our object name is the TPM's
    hmac_key = os.urandom(32)
    challenge = make_challenge(endorsement, storage, hmac_key)
    parts = split_authentication_key(challenge.authentication_key)

    # TPM2_ActivateCredential(activateHandle=SRK, keyHandle=EK): tpm2-tools' credential file is a header
    # (magic 0xBADCC0DE, version 1) then the TPM2B_ID_OBJECT and the TPM2B_ENCRYPTED_SECRET
    credential_file = b"\xba\xdc\xc0\xde\x00\x00\x00\x01" + tpm2b(parts.id_object) + tpm2b(parts.identity_secret)
    t.write(f"{ek}-{srk}-cred.bin", credential_file)
    _activate(t, ek, srk, f"{ek}-{srk}-cred.bin", f"{ek}-{srk}-activated.bin")
    assert t.read(f"{ek}-{srk}-activated.bin") == challenge.credential

    # TPM2_Import under the SRK with the credential as the inner wrapper key (AES-128-CFB), then load and HMAC
    t.write(f"{ek}-{srk}-key.pub", parts.public.tpm2b_public)
    t.write(f"{ek}-{srk}-key.dup", tpm2b(parts.private))
    t.write(f"{ek}-{srk}-key.seed", tpm2b(parts.duplicate_secret))
    t("import", "-C", f"{srk}.ctx", "-u", f"{ek}-{srk}-key.pub", "-i", f"{ek}-{srk}-key.dup", "-s", f"{ek}-{srk}-key.seed",
      "-k", f"{ek}-{srk}-activated.bin", "-r", f"{ek}-{srk}-key.priv")
    t("load", "-C", f"{srk}.ctx", "-u", f"{ek}-{srk}-key.pub", "-r", f"{ek}-{srk}-key.priv", "-c", f"{ek}-{srk}-key.ctx")
    message = b"0ne00TEST01%2Fregistrations%2Ftpm-device\n1700000000"
    t.write(f"{ek}-{srk}-msg.bin", message)
    t("hmac", "-c", f"{ek}-{srk}-key.ctx", "-g", "sha256", "-o", f"{ek}-{srk}-mac.bin", f"{ek}-{srk}-msg.bin")
    assert t.read(f"{ek}-{srk}-mac.bin") == hmac.new(hmac_key, message, "sha256").digest()


def test_swtpm_refuses_a_credential_bound_to_another_srk(device_tpm):
    t = device_tpm
    endorsement = EndorsementKey.parse(b64(t.read("ek_tcg.pub")))
    other = StorageRootKey.parse(b64(t.read("srk_ecc.pub")))
    parts = split_authentication_key(make_challenge(endorsement, other, os.urandom(32)).authentication_key)
    t.write("wrong-cred.bin", b"\xba\xdc\xc0\xde\x00\x00\x00\x01" + tpm2b(parts.id_object)
            + tpm2b(parts.identity_secret))
    proc = _activate(t, "ek_tcg", "srk_rsa", "wrong-cred.bin", "wrong-activated.bin", check=False)
    assert proc.returncode != 0  # the integrity HMAC binds the SRK's name: only that object activates it
