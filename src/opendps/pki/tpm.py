"""The server side of TPM 2.0 attestation: parse a TPM's keys, MakeCredential, and duplicate an HMAC key to it.

Azure DPS proves a TPM by sending it a challenge only that TPM can open. The enrollment holds the TPM's
endorsement key (EK); the device sends its EK and storage root key (SRK) as ``TPM2B_PUBLIC``; the service
answers with an ``authenticationKey`` (:func:`make_challenge`) that carries

* a credential made to the EK and bound to the SRK's *name* (TPM 2.0 Part 1 §24, MakeCredential): the
  device gets it back with ``TPM2_ActivateCredential(activateHandle=SRK, keyHandle=EK)``, which works only
  inside the TPM that holds the EK's private key and has an object of that name loaded;
* a new HMAC-SHA256 key duplicated for import under the SRK (Part 1 §23.3.2: an inner wrapper keyed with
  the activated credential, AES-128-CFB, and an outer wrapper with a seed to the SRK): the device imports
  it with ``TPM2_Import(parent=SRK, encryptionKey=credential, symmetricAlg=AES-128-CFB)`` and then signs
  its SAS tokens with it inside the TPM. The server keeps the key to verify them.

Why ``cryptography`` and not tpm2-pytss here: every server operation is plain KDFa (SP 800-108 counter
HMAC), AES-CFB, HMAC and RSA-OAEP (or ECDH for an ECC SRK) over a few marshalled structures; the server
never talks to a TPM, so it needs no native TSS library (libtss2-*) installed, built or version-matched,
and stays pure Python like the rest of pki. tpm2-pytss belongs on the device. The format is proven end to
end against a real (software) TPM in tests/unit/test_tpm_crypto.py: swtpm + tpm2-tools activate the
credential, import the duplicate and compute the same HMAC as Python.

The ``authenticationKey`` layout, as the Azure SDKs read it (checked in their sources, not copied):
base64 of six u16-size-prefixed structures in this order — ``TPM2B_ID_OBJECT``, ``TPM2B_ENCRYPTED_SECRET``
(seed to the EK, OAEP label "IDENTITY"), ``TPM2B_PRIVATE`` (the duplicate), ``TPM2B_ENCRYPTED_SECRET`` (seed
to the SRK, label "DUPLICATE"), ``TPM2B_PUBLIC`` (the HMAC key's public area), ``TPM2B_DATA`` (here empty
but present).

* Azure/azure-iot-sdk-c ``provisioning_client/adapters/hsm_client_tpm.c``: ``hsm_client_tpm_activate_identity_key``
  / ``insert_key_in_tpm`` unmarshal TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET, TPM2B_PRIVATE,
  TPM2B_ENCRYPTED_SECRET, TPM2B_PUBLIC (null allowed), then a u16 size and that many bytes; they call
  ``TPM2_ActivateCredential(SRK, EK, ...)`` in a policy session with ``PolicySecret(TPM_RH_ENDORSEMENT)``,
  then ``TPM2_Import(SRK, encryptionKey=<activated credential>, ..., symmetricAlg={AES,128,CFB})`` and
  create an AES key of ``credential.size * 8`` bits from the credential: so the credential is the 16-byte
  AES-128 inner wrapper key. Its EK template: RSA-2048, SHA-256, restricted|decrypt|fixedTPM|fixedParent|
  adminWithPolicy|sensitiveDataOrigin, the TCG EK policy, AES-128-CFB, **empty** ``unique``; SRK: the same
  RSA parameters, userWithAuth|noDA instead of adminWithPolicy, no policy.
* Azure/azure-iot-sdk-c ``provisioning_client/src/prov_device_ll_client.c``: the same import
  (``prov_auth_import_key`` -> ``hsm_client_tpm_import_key``) opens the 401's ``authenticationKey`` (the
  registration SAS key) and, on ``assigned``, ``registrationState.tpm.authenticationKey`` (the hub SAS key;
  missing is an error): both are :func:`make_challenge` blobs. The sixth structure is read and ignored.
* Azure/azure-iot-sdk-c ``provisioning_client/src/prov_auth_client.c`` ``load_registration_id``: the
  registration id derived from the EK is SHA-256 over the marshalled TPM2B_PUBLIC (with its size), base32
  (``azure_base32.c``'s lower-case RFC 4648 alphabet) with the ``=`` padding removed.
* Azure/azure-iot-sdk-csharp ``security/tpm/src/SecurityProviderTpmHsm.cs`` ``ActivateIdentityKey``: reads
  Tpm2bIdObject, u16+encryptedSecret, TpmPrivate, u16+encWrapKey, u16 + TpmPublic, u16+bytes ("uriInfo");
  same ActivateCredential/Import calls (Import with ``SymDefObject(Aes, 128, Cfb)``); its EK template is
  the TCG default with a **256-byte zero** ``unique`` (``CacheEkAndSrk``). The two templates make
  different EKs on the same TPM: the server uses whatever EK public the enrollment holds.
* Azure/azure-iot-sdk-csharp ``provisioning/transport/http/src/TPM/TpmChallenge.cs``: the 401 body is
  ``{"message", "authenticationKey", "keyName": "registration"}``.

Scope: SHA-256 name algorithms only; an RSA-2048 EK; an RSA-2048 or ECC NIST P-256 SRK (the ECC outer
wrapper seed is made by one-pass ECDH + KDFe, Part 1 §11.4.10.3 and Annex C.6).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from opendps.errors import InvalidInput
from opendps.transport.wire import json_kind

try:  # CFB moved to "decrepit" (cryptography 47+); the TPM's protections are defined with it
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB

# TPM_ALG_ID values (TPM 2.0 Part 2 §6.3)
ALG_RSA = 0x0001
ALG_SHA1 = 0x0004
ALG_HMAC = 0x0005
ALG_AES = 0x0006
ALG_KEYEDHASH = 0x0008
ALG_XOR = 0x000A
ALG_SHA256 = 0x000B
ALG_SHA384 = 0x000C
ALG_SHA512 = 0x000D
ALG_NULL = 0x0010
ALG_ECC = 0x0023
ALG_SYMCIPHER = 0x0025
ALG_CFB = 0x0043
ECC_NIST_P256 = 0x0003

_ALG_NAMES = {ALG_RSA: "RSA", ALG_SHA1: "SHA-1", ALG_HMAC: "HMAC", ALG_AES: "AES", ALG_KEYEDHASH: "KEYEDHASH",
              ALG_XOR: "XOR", ALG_SHA256: "SHA-256", ALG_SHA384: "SHA-384", ALG_SHA512: "SHA-512",
              ALG_NULL: "NULL", ALG_ECC: "ECC", ALG_SYMCIPHER: "SYMCIPHER", ALG_CFB: "CFB"}

# TPMA_OBJECT bits (Part 2 §8.3)
FIXED_TPM = 1 << 1
ST_CLEAR = 1 << 2
FIXED_PARENT = 1 << 4
SENSITIVE_DATA_ORIGIN = 1 << 5
USER_WITH_AUTH = 1 << 6
ADMIN_WITH_POLICY = 1 << 7
NO_DA = 1 << 10
ENCRYPTED_DUPLICATION = 1 << 11
RESTRICTED = 1 << 16
DECRYPT = 1 << 17
SIGN_ENCRYPT = 1 << 18

#: The TCG default EK template's attributes (EK Credential Profile, template L-1), also the Azure SDKs'.
EK_DEFAULT_ATTRIBUTES = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | ADMIN_WITH_POLICY | RESTRICTED | DECRYPT
#: PolicySecret(TPM_RH_ENDORSEMENT): the TCG default EK authPolicy.
EK_DEFAULT_POLICY = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")
#: The HMAC key handed to the device: a plain (duplicable) signing keyed-hash object usable with no auth value.
HMAC_KEY_ATTRIBUTES = USER_WITH_AUTH | SIGN_ENCRYPT

#: The size of the credential (= the AES-128 key of the duplicate's inner wrapper, see module docstring).
CREDENTIAL_SIZE = 16
#: Azure's ``keyName`` in the 401 challenge body.
KEY_NAME = "registration"
_MAX_PUBLIC = 1024  # far above any RSA-2048/P-256/keyed-hash TPM2B_PUBLIC; a bound for hostile input


def _hash_for(alg: int) -> str:
    if alg != ALG_SHA256:
        raise InvalidInput(f"unsupported nameAlg {_alg_name(alg)} (only SHA-256 is supported)")
    return "sha256"


def _alg_name(alg: int) -> str:
    return _ALG_NAMES.get(alg, f"0x{alg:04x}")


# --- marshalling --------------------------------------------------------------------------------------------


def u16(value: int) -> bytes:
    return struct.pack(">H", value)


def tpm2b(data: bytes) -> bytes:
    """A TPM2B: u16 big-endian size, then the bytes."""
    if len(data) > 0xFFFF:
        raise ValueError("TPM2B larger than 65535 bytes")
    return u16(len(data)) + data


class _Reader:
    """Big-endian reads over a byte string; every short read is an :class:`InvalidInput` naming ``what``."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, n: int, field: str) -> bytes:
        if self.pos + n > len(self.data):
            raise InvalidInput(f"{self.what} is truncated: {field} needs {n} bytes at offset {self.pos}, "
                               f"{len(self.data) - self.pos} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u16(self, field: str) -> int:
        value: int = struct.unpack(">H", self.take(2, field))[0]
        return value

    def u32(self, field: str) -> int:
        value: int = struct.unpack(">I", self.take(4, field))[0]
        return value

    def tpm2b(self, field: str) -> bytes:
        return self.take(self.u16(f"{field} size"), field)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise InvalidInput(f"{self.what} has {len(self.data) - self.pos} trailing bytes after offset {self.pos}")


# --- TPMT_PUBLIC ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TpmPublic:
    """A parsed ``TPMT_PUBLIC`` (RSA, ECC or keyed-hash) with its exact marshalled bytes (the name is over them)."""

    type: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    sym_alg: int  # TPMT_SYM_DEF_OBJECT (ALG_NULL for none)
    sym_bits: int
    sym_mode: int
    scheme: int  # TPMT_RSA_SCHEME / TPMT_ECC_SCHEME / TPMT_KEYEDHASH_SCHEME
    scheme_hash: int
    rsa_bits: int
    rsa_exponent: int
    curve: int
    kdf: int
    unique: bytes  # RSA modulus, keyed-hash unique digest; for ECC: x
    unique_y: bytes  # ECC: y
    public_area: bytes  # the marshalled TPMT_PUBLIC

    @property
    def tpm2b_public(self) -> bytes:
        return tpm2b(self.public_area)

    @property
    def name(self) -> bytes:
        """The TPM object name: nameAlg (u16) || H_nameAlg(TPMT_PUBLIC)."""
        return u16(self.name_alg) + hashlib.new(_hash_for(self.name_alg), self.public_area).digest()

    def has(self, bits: int) -> bool:
        return self.attributes & bits == bits

    @classmethod
    def parse_tpm2b(cls, data: bytes, what: str = "TPM2B_PUBLIC") -> TpmPublic:
        reader = _Reader(data, what)
        size = reader.u16("size")
        if size == 0:
            raise InvalidInput(f"{what} is empty (size 0)")
        if size > _MAX_PUBLIC:
            raise InvalidInput(f"{what} size {size} is larger than {_MAX_PUBLIC} bytes")
        area = reader.take(size, "publicArea")
        reader.end()
        return cls.parse_area(area, what)

    @classmethod
    def parse_area(cls, area: bytes, what: str = "TPMT_PUBLIC") -> TpmPublic:
        r = _Reader(area, what)
        type_ = r.u16("type")
        name_alg = r.u16("nameAlg")
        attributes = r.u32("objectAttributes")
        auth_policy = r.tpm2b("authPolicy")
        sym_alg = sym_bits = sym_mode = ALG_NULL
        scheme = scheme_hash = ALG_NULL
        rsa_bits = rsa_exponent = 0
        curve = 0
        kdf = ALG_NULL
        unique_y = b""
        if type_ in (ALG_RSA, ALG_ECC):
            sym_alg = r.u16("symmetric.algorithm")
            if sym_alg != ALG_NULL:
                sym_bits = r.u16("symmetric.keyBits")
                sym_mode = r.u16("symmetric.mode")
            scheme = r.u16("scheme")
            if scheme != ALG_NULL:
                scheme_hash = r.u16("scheme.hashAlg")
            if type_ == ALG_RSA:
                rsa_bits = r.u16("keyBits")
                rsa_exponent = r.u32("exponent")
                unique = r.tpm2b("unique (modulus)")
            else:
                curve = r.u16("curveID")
                kdf = r.u16("kdf.scheme")
                if kdf != ALG_NULL:
                    r.u16("kdf.hashAlg")
                unique = r.tpm2b("unique.x")
                unique_y = r.tpm2b("unique.y")
        elif type_ == ALG_KEYEDHASH:
            scheme = r.u16("scheme")
            if scheme == ALG_HMAC:
                scheme_hash = r.u16("scheme.hashAlg")
            elif scheme == ALG_XOR:
                scheme_hash = r.u16("scheme.hashAlg")
                kdf = r.u16("scheme.kdf")
            elif scheme != ALG_NULL:
                raise InvalidInput(f"{what}: unknown keyed-hash scheme {_alg_name(scheme)}")
            unique = r.tpm2b("unique")
        else:
            raise InvalidInput(f"{what}: unsupported key type {_alg_name(type_)} (RSA, ECC or KEYEDHASH expected)")
        r.end()
        return cls(type_, name_alg, attributes, auth_policy, sym_alg, sym_bits, sym_mode, scheme, scheme_hash,
                   rsa_bits, rsa_exponent, curve, kdf, unique, unique_y, area)


def _decode_b64(text: str | bytes, what: str) -> bytes:
    if isinstance(text, bytes):
        return text
    if text is None or (isinstance(text, str) and not text.strip()):
        raise InvalidInput(f"{what} is missing (base64 of a TPM2B_PUBLIC expected)")
    if not isinstance(text, str):  # a JSON number, array, object or boolean: "missing" named the wrong problem
        raise InvalidInput(f"{what} must be a JSON string (base64 of a TPM2B_PUBLIC), not a JSON "
                           f"{json_kind(text)}")
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"{what} is not valid base64: {exc}") from None


def _check_storage_parameters(key: TpmPublic, what: str) -> None:
    """What a key that protects others (an EK, an SRK) must be: SHA-256, restricted decrypt, AES-CFB."""
    if key.name_alg != ALG_SHA256:
        raise InvalidInput(f"{what}: unsupported nameAlg {_alg_name(key.name_alg)} (SHA-256 expected)")
    if not key.has(RESTRICTED | DECRYPT) or key.has(SIGN_ENCRYPT):
        raise InvalidInput(f"{what} is not a restricted decryption key (objectAttributes 0x{key.attributes:08x}: "
                           "restricted and decrypt must be set, sign clear)")
    if key.sym_alg != ALG_AES or key.sym_mode != ALG_CFB or key.sym_bits not in (128, 256):
        raise InvalidInput(f"{what}: symmetric algorithm must be AES-128-CFB or AES-256-CFB, not "
                           f"{_alg_name(key.sym_alg)}-{key.sym_bits}-{_alg_name(key.sym_mode)}")
    if key.scheme != ALG_NULL:
        raise InvalidInput(f"{what}: a storage key has no scheme (NULL), not {_alg_name(key.scheme)}")


def _rsa_public(key: TpmPublic, what: str) -> rsa.RSAPublicKey:
    if key.rsa_bits != 2048:
        raise InvalidInput(f"{what} is not RSA-2048 (keyBits {key.rsa_bits})")
    if len(key.unique) != 256:
        raise InvalidInput(f"{what}: the RSA-2048 modulus (unique) is {len(key.unique)} bytes, 256 expected")
    if key.unique[0] & 0x80 == 0:
        raise InvalidInput(f"{what}: the modulus is not a 2048-bit number")
    if key.unique[-1] & 1 == 0:  # cryptography takes an even n, and then encrypting to it fails (a ValueError)
        raise InvalidInput(f"{what}: the modulus is even: not an RSA modulus")
    exponent = key.rsa_exponent or 65537
    if exponent != 65537:
        raise InvalidInput(f"{what}: RSA exponent {exponent} (only the default 65537 is supported)")
    try:
        return rsa.RSAPublicNumbers(exponent, int.from_bytes(key.unique, "big")).public_key()
    except ValueError as exc:
        raise InvalidInput(f"{what}: not a valid RSA public key: {exc}") from None


@dataclass(frozen=True)
class EndorsementKey:
    """A TPM's RSA-2048 endorsement key as an enrollment holds it (``attestation.tpm.endorsementKey``).

    Accepted: RSA-2048, nameAlg SHA-256, restricted decrypt, fixedTPM and fixedParent, AES-128-CFB, no scheme,
    exponent 65537 — the TCG default template and its variants (any ``unique`` used at creation, with or
    without userWithAuth, any authPolicy: the device's session is its own business). Checked no further:
    the enrollment names the EK, the server only encrypts to it.
    """

    public: TpmPublic
    key: rsa.RSAPublicKey

    @classmethod
    def parse(cls, value: str | bytes, what: str = "endorsementKey") -> EndorsementKey:
        public = TpmPublic.parse_tpm2b(_decode_b64(value, what), what)
        if public.type != ALG_RSA:
            raise InvalidInput(f"{what} is not RSA-2048 (type {_alg_name(public.type)}; only RSA EKs are supported)")
        _check_storage_parameters(public, what)
        if public.sym_bits != 128:
            raise InvalidInput(f"{what}: symmetric algorithm must be AES-128-CFB (an RSA-2048 EK), "
                               f"not AES-{public.sym_bits}-CFB")
        if not public.has(FIXED_TPM | FIXED_PARENT):
            raise InvalidInput(f"{what} is not bound to its TPM (objectAttributes 0x{public.attributes:08x}: "
                               "fixedTPM and fixedParent must be set)")
        return cls(public, _rsa_public(public, what))

    @property
    def tpm2b_public(self) -> bytes:
        return self.public.tpm2b_public

    @property
    def base64(self) -> str:
        return base64.b64encode(self.tpm2b_public).decode()

    @property
    def name(self) -> bytes:
        return self.public.name

    def same_key(self, other: EndorsementKey) -> bool:
        """The same EK (the same public area; an EK's modulus alone could be shared by two templates' EKs)."""
        return self.public.public_area == other.public.public_area


@dataclass(frozen=True)
class StorageRootKey:
    """The device's storage root key (``tpm.storageRootKey``): the parent the HMAC key is duplicated to.

    RSA-2048 or ECC NIST P-256; nameAlg SHA-256, restricted decrypt, AES-128/256-CFB, no scheme.
    """

    public: TpmPublic
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey

    @classmethod
    def parse(cls, value: str | bytes, what: str = "storageRootKey") -> StorageRootKey:
        public = TpmPublic.parse_tpm2b(_decode_b64(value, what), what)
        if public.type not in (ALG_RSA, ALG_ECC):
            raise InvalidInput(f"{what}: unsupported key type {_alg_name(public.type)} (RSA-2048 or ECC P-256 expected)")
        _check_storage_parameters(public, what)
        key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
        if public.type == ALG_RSA:
            key = _rsa_public(public, what)
        else:
            if public.curve != ECC_NIST_P256:
                raise InvalidInput(f"{what}: unsupported curve 0x{public.curve:04x} (only NIST P-256)")
            if public.kdf != ALG_NULL:
                raise InvalidInput(f"{what}: a storage key has no KDF scheme (NULL)")
            if len(public.unique) != 32 or len(public.unique_y) != 32:
                raise InvalidInput(f"{what}: the P-256 point has coordinates of {len(public.unique)} and "
                                   f"{len(public.unique_y)} bytes, 32 expected")
            try:
                key = ec.EllipticCurvePublicKey.from_encoded_point(
                    ec.SECP256R1(), b"\x04" + public.unique + public.unique_y)
            except ValueError:
                raise InvalidInput(f"{what}: the ECC point is not on P-256") from None
        return cls(public, key)

    @property
    def tpm2b_public(self) -> bytes:
        return self.public.tpm2b_public

    @property
    def name(self) -> bytes:
        return self.public.name


def registration_id_from_ek(ek: EndorsementKey) -> str:
    """The registration id some Azure SDKs derive from the EK: base32 (lower case, no padding) of SHA-256 over
    the EK's marshalled ``TPM2B_PUBLIC`` (size prefix included)."""
    digest = hashlib.sha256(ek.tpm2b_public).digest()
    return base64.b32encode(digest).decode().rstrip("=").lower()


# --- KDFs and the protection primitives -------------------------------------------------------------------------


def kdfa(hash_name: str, key: bytes, label: str, context_u: bytes, context_v: bytes, bits: int) -> bytes:
    """KDFa (TPM 2.0 Part 1 §11.4.10.2): SP 800-108 counter mode with HMAC; the label is NUL-terminated.

    Each block is HMAC(key, [i]32 || label || 00 || contextU || contextV || [bits]32); the result is the
    leftmost ``bits`` (a partial top byte masked).
    """
    label_bytes = label.encode()
    if not label_bytes.endswith(b"\0"):
        label_bytes += b"\0"
    size = (bits + 7) // 8
    out = b""
    counter = 0
    while len(out) < size:
        counter += 1
        out += hmac.new(key, struct.pack(">I", counter) + label_bytes + context_u + context_v
                        + struct.pack(">I", bits), hash_name).digest()
    out = out[:size]
    if bits % 8:
        out = bytes([out[0] & ((1 << (bits % 8)) - 1)]) + out[1:]
    return out


def kdfe(hash_name: str, z: bytes, label: str, party_u: bytes, party_v: bytes, bits: int) -> bytes:
    """KDFe (Part 1 §11.4.10.3): SP 800-56A concatenation KDF, H([i]32 || Z || label || 00 || U || V)."""
    label_bytes = label.encode()
    if not label_bytes.endswith(b"\0"):
        label_bytes += b"\0"
    size = (bits + 7) // 8
    out = b""
    counter = 0
    while len(out) < size:
        counter += 1
        out += hashlib.new(hash_name, struct.pack(">I", counter) + z + label_bytes + party_u + party_v).digest()
    return out[:size]


def _cfb(key: bytes, data: bytes) -> bytes:
    """AES-CFB (full-block feedback, CFB128) with a zero IV, as every TPM protection here uses."""
    encryptor = Cipher(algorithms.AES(key), CFB(b"\0" * 16)).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def _secret_to(parent: TpmPublic, key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, label: str) -> tuple[bytes, bytes]:
    """A new seed for ``parent`` and its TPM2B_ENCRYPTED_SECRET contents (Part 1 Annex B.10.3 / C.6.4)."""
    hash_name = _hash_for(parent.name_alg)
    digest_size = hashlib.new(hash_name).digest_size
    if isinstance(key, rsa.RSAPublicKey):
        seed = os.urandom(digest_size)
        encrypted = key.encrypt(seed, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(),
                                                   label=label.encode() + b"\0"))
        return seed, encrypted
    ephemeral = ec.generate_private_key(key.curve)
    z = ephemeral.exchange(ec.ECDH(), key)
    point = ephemeral.public_key().public_numbers()
    size = (key.curve.key_size + 7) // 8
    ephemeral_x, ephemeral_y = point.x.to_bytes(size, "big"), point.y.to_bytes(size, "big")
    static_x = key.public_numbers().x.to_bytes(size, "big")
    seed = kdfe(hash_name, z, label, ephemeral_x, static_x, digest_size * 8)
    return seed, tpm2b(ephemeral_x) + tpm2b(ephemeral_y)  # TPMS_ECC_POINT


def _protect(parent: TpmPublic, seed: bytes, name: bytes, plaintext: bytes) -> bytes:
    """Outer protection with ``seed`` for ``parent`` (Part 1 §23.3.2.3 / §24.4): KDFa "STORAGE" keyed by the
    protected object's ``name`` encrypts; KDFa "INTEGRITY" keys the HMAC over ciphertext || name.

    Returns the marshalled TPM2B_DIGEST outer HMAC followed by the ciphertext (the body of a
    TPM2B_PRIVATE or TPM2B_ID_OBJECT)."""
    hash_name = _hash_for(parent.name_alg)
    sym_key = kdfa(hash_name, seed, "STORAGE", name, b"", parent.sym_bits)
    ciphertext = _cfb(sym_key, plaintext)
    hmac_key = kdfa(hash_name, seed, "INTEGRITY", b"", b"", hashlib.new(hash_name).digest_size * 8)
    outer = hmac.new(hmac_key, ciphertext + name, hash_name).digest()
    return tpm2b(outer) + ciphertext


@dataclass(frozen=True)
class Credential:
    """MakeCredential's output: TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET contents (without the u16 sizes)."""

    id_object: bytes
    encrypted_secret: bytes


def make_credential(ek: EndorsementKey, object_name: bytes, credential: bytes) -> Credential:
    """TPM2_MakeCredential in software (Part 1 §24): ``credential`` for ``ek``, bound to ``object_name``.

    A seed is encrypted to the EK (RSA-OAEP SHA-256, label "IDENTITY"); the TPM2B_DIGEST credential is
    encrypted with AES-CFB under KDFa(seed, "STORAGE", object_name) and covered by the outer HMAC.
    """
    if not 0 < len(credential) <= hashlib.new(_hash_for(ek.public.name_alg)).digest_size:
        raise ValueError("a credential is 1 to 32 bytes (at most the EK nameAlg's digest size)")
    seed, encrypted_secret = _secret_to(ek.public, ek.key, "IDENTITY")
    return Credential(_protect(ek.public, seed, object_name, tpm2b(credential)), encrypted_secret)


@dataclass(frozen=True)
class Duplicate:
    """A keyed-hash object duplicated for import: TPM2B_PRIVATE, TPM2B_ENCRYPTED_SECRET and TPMT_PUBLIC contents."""

    private: bytes
    encrypted_seed: bytes
    public: TpmPublic


def hmac_key_public(hmac_key: bytes, seed_value: bytes) -> TpmPublic:
    """The public area of a keyed-hash HMAC-SHA256 signing key; unique = SHA-256(seedValue || key)."""
    unique = hashlib.sha256(seed_value + hmac_key).digest()
    area = (u16(ALG_KEYEDHASH) + u16(ALG_SHA256) + struct.pack(">I", HMAC_KEY_ATTRIBUTES) + tpm2b(b"")
            + u16(ALG_HMAC) + u16(ALG_SHA256) + tpm2b(unique))
    return TpmPublic.parse_area(area)


def duplicate_hmac_key(srk: StorageRootKey, hmac_key: bytes, inner_key: bytes) -> Duplicate:
    """Duplicate a new HMAC-SHA256 key for TPM2_Import under ``srk`` (Part 1 §23.3.2).

    Inner wrapper (§23.3.2.2): AES-128-CFB under ``inner_key`` (the credential) over
    TPM2B_DIGEST(SHA-256(TPM2B_SENSITIVE || name)) || TPM2B_SENSITIVE. Outer wrapper (§23.3.2.3): a seed
    to the SRK (RSA-OAEP label "DUPLICATE", or ECDH for an ECC SRK), the result protected as in :func:`_protect`.
    """
    if not 0 < len(hmac_key) <= 128:
        raise ValueError("an HMAC key is 1 to 128 bytes (TPM2B_SENSITIVE_DATA)")
    if len(inner_key) != 16:
        raise ValueError("the inner wrapper key is 16 bytes (AES-128)")
    seed_value = os.urandom(32)  # the obfuscation value of a keyed-hash object: nameAlg digest size
    public = hmac_key_public(hmac_key, seed_value)
    sensitive = tpm2b(u16(ALG_KEYEDHASH) + tpm2b(b"") + tpm2b(seed_value) + tpm2b(hmac_key))  # TPM2B_SENSITIVE
    name = public.name
    inner_integrity = tpm2b(hashlib.sha256(sensitive + name).digest())
    enc_sensitive = _cfb(inner_key, inner_integrity + sensitive)
    seed, encrypted_seed = _secret_to(srk.public, srk.key, "DUPLICATE")
    return Duplicate(_protect(srk.public, seed, name, enc_sensitive), encrypted_seed, public)


# --- the authenticationKey -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TpmChallenge:
    """What :func:`make_challenge` produces: the blob for the device and what the server keeps."""

    authentication_key: str  # base64 of the six structures (the 401 body's / registrationState's authenticationKey)
    hmac_key: bytes  # the key the device's SAS tokens are signed with (the server keeps it, wrapped)
    credential: bytes  # the activated credential (= the inner wrapper key); for tests and diagnostics
    key_public: TpmPublic  # the HMAC key's public area


def authentication_key_blob(credential: Credential, duplicate: Duplicate, data: bytes = b"") -> bytes:
    """The six u16-size-prefixed structures, in the order the Azure SDKs unmarshal them."""
    return (tpm2b(credential.id_object) + tpm2b(credential.encrypted_secret) + tpm2b(duplicate.private)
            + tpm2b(duplicate.encrypted_seed) + duplicate.public.tpm2b_public + tpm2b(data))


def make_challenge(ek: EndorsementKey, srk: StorageRootKey, hmac_key: bytes) -> TpmChallenge:
    """The ``authenticationKey`` that gives ``hmac_key`` to the TPM holding ``ek`` and ``srk``, and only to it.

    The credential (a fresh AES-128 key) is made to the EK and bound to the SRK's name; the HMAC key is
    duplicated under the SRK with that credential as its inner wrapper key.
    """
    credential = os.urandom(CREDENTIAL_SIZE)
    made = make_credential(ek, srk.name, credential)
    duplicate = duplicate_hmac_key(srk, hmac_key, credential)
    blob = authentication_key_blob(made, duplicate)
    return TpmChallenge(base64.b64encode(blob).decode(), hmac_key, credential, duplicate.public)


@dataclass(frozen=True)
class AuthenticationKeyParts:
    """The six structures of an ``authenticationKey`` (contents, without their u16 sizes)."""

    id_object: bytes
    identity_secret: bytes
    private: bytes
    duplicate_secret: bytes
    public: TpmPublic
    data: bytes


def split_authentication_key(value: str | bytes) -> AuthenticationKeyParts:
    """Read an ``authenticationKey`` the way the SDKs do (tests and diagnostics; the server only writes them)."""
    r = _Reader(_decode_b64(value, "authenticationKey"), "authenticationKey")
    id_object = r.tpm2b("TPM2B_ID_OBJECT")
    identity_secret = r.tpm2b("TPM2B_ENCRYPTED_SECRET (IDENTITY)")
    private = r.tpm2b("TPM2B_PRIVATE")
    duplicate_secret = r.tpm2b("TPM2B_ENCRYPTED_SECRET (DUPLICATE)")
    public = TpmPublic.parse_area(r.tpm2b("TPM2B_PUBLIC"), "authenticationKey TPM2B_PUBLIC")
    data = r.tpm2b("TPM2B_DATA")
    r.end()
    return AuthenticationKeyParts(id_object, identity_secret, private, duplicate_secret, public, data)
