"""The device's TPM 2.0 for TPM attestation (issue 16; wire spec §3.4): EK, SRK, the DPS challenge, TPM-held HMAC.

A TPM device proves itself by opening a challenge only its TPM can open: DPS answers the first ``register`` with
an ``authenticationKey`` — a credential made to the EK and bound to the SRK's name (MakeCredential), and an
HMAC key duplicated under the SRK with that credential as the inner wrapper. :meth:`DeviceTpm.activate` recovers
the credential (ActivateCredential, which needs the EK's admin policy: PolicySecret on the endorsement hierarchy)
and imports the HMAC key under the SRK; from then on the key only ever exists inside the TPM (its private part
on disk is wrapped by the SRK and useless elsewhere) and :meth:`DeviceTpm.sign` / :meth:`DeviceTpm.sas_token`
sign with it. The sequence and handles follow the Azure IoT C SDK
(``provisioning_client/adapters/hsm_client_tpm.c``: ``insert_key_in_tpm``; ``prov_auth_client.c``:
``load_registration_id``), so a blob made for an Azure SDK device opens here and the reverse.

Runs on the device: it imports :mod:`opendps.transport.sas`, :mod:`opendps.files` and tpm2-pytss (the optional
extra ``opendps[tpm]``, which needs the TSS2 libraries: ``apt-get install libtss2-dev``) — no server code. The
module imports without tpm2-pytss; opening a :class:`DeviceTpm` then says what to install.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import struct
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

from opendps.files import write_atomic
from opendps.transport import sas

try:
    from tpm2_pytss import ESAPI, TSS2_Exception
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_HC, TPM2_SE, TPMA_OBJECT
    from tpm2_pytss.types import (
        TPM2B_DATA,
        TPM2B_ENCRYPTED_SECRET,
        TPM2B_ID_OBJECT,
        TPM2B_PRIVATE,
        TPM2B_PUBLIC,
        TPM2B_SENSITIVE_CREATE,
        TPMS_CONTEXT,
        TPMS_RSA_PARMS,
        TPMT_PUBLIC,
        TPMT_RSA_SCHEME,
        TPMT_SYM_DEF,
        TPMT_SYM_DEF_OBJECT,
        TPMU_PUBLIC_PARMS,
        TPMU_SYM_KEY_BITS,
        TPMU_SYM_MODE,
    )
    from tpm2_pytss.utils import NoSuchIndex, NVReadEK, create_ek_template
except (ImportError, OSError) as _exc:  # tpm2-pytss absent, or present without the TSS2 shared libraries
    _IMPORT_ERROR: BaseException | None = _exc
else:
    _IMPORT_ERROR = None

EK_HANDLE = 0x81010001  # TCG EK Credential Profile's RSA EK handle; the Azure C SDK's TPM_20_EK_HANDLE
SRK_HANDLE = 0x81000001  # TCG TPM v2.0 Provisioning Guidance's SRK handle; the Azure C SDK's TPM_20_SRK_HANDLE
ID_KEY_HANDLE = 0x81000100  # where the Azure C SDK persists the DPS HMAC key (DPS_ID_KEY_HANDLE)
HARDWARE_TCTI = "device:/dev/tpmrm0"  # the kernel's resource manager: several processes may share the TPM
_MAX_BUFFER = 1024  # TPM2B_MAX_BUFFER's size in the TSS headers: longer data goes through an HMAC sequence
_KEY_FILE_MAGIC = b"opendps-tpm-key\x00"


class TpmError(Exception):
    """The TPM refused, or a challenge is malformed or was not made for this TPM; the message says which."""


class TpmUnavailable(TpmError):
    """tpm2-pytss or the TSS2 libraries are not installed, or the TPM cannot be reached."""


def tcti_from_environment(explicit: str | None = None) -> str:
    """The TCTI to open: ``explicit``, else ``TPM2TOOLS_TCTI`` (what tpm2-tools use, so both see the same TPM),
    else ``TCTI``, else the hardware resource manager."""
    return explicit or os.environ.get("TPM2TOOLS_TCTI") or os.environ.get("TCTI") or HARDWARE_TCTI


def split_authentication_key(authentication_key_b64: str) -> list[bytes]:
    """The six u16-size-prefixed structures of an ``authenticationKey`` (each with its size prefix), in order:
    TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET (IDENTITY), TPM2B_PRIVATE, TPM2B_ENCRYPTED_SECRET (DUPLICATE),
    TPM2B_PUBLIC, TPM2B_DATA. A missing trailing TPM2B_DATA reads as empty (the C SDK tolerates it, and the
    device does not use it); anything else missing, short or trailing is an error that says which part."""
    try:
        blob = base64.b64decode(authentication_key_b64, validate=True)
    except ValueError as exc:
        raise TpmError("authenticationKey is not valid base64") from exc
    names = ("TPM2B_ID_OBJECT", "TPM2B_ENCRYPTED_SECRET (identity)", "TPM2B_PRIVATE",
             "TPM2B_ENCRYPTED_SECRET (duplicate)", "TPM2B_PUBLIC", "TPM2B_DATA")
    parts: list[bytes] = []
    offset = 0
    for index, name in enumerate(names):
        if offset == len(blob) and index == len(names) - 1:
            parts.append(b"\x00\x00")
            break
        if offset + 2 > len(blob):
            raise TpmError(f"authenticationKey ends before its {name} (structure {index + 1} of 6)")
        (size,) = struct.unpack_from(">H", blob, offset)
        if offset + 2 + size > len(blob):
            raise TpmError(f"authenticationKey's {name} (structure {index + 1} of 6) claims {size} bytes; "
                           f"{len(blob) - offset - 2} are left")
        parts.append(blob[offset:offset + 2 + size])
        offset += 2 + size
    if offset != len(blob):
        raise TpmError(f"authenticationKey has {len(blob) - offset} bytes after its six structures")
    return parts


def _unmarshal(kind: Any, data: bytes, what: str) -> Any:
    """Unmarshal one whole 2B structure; a structure that does not parse or has trailing bytes names itself."""
    try:
        value, used = kind.unmarshal(data)
    except (TSS2_Exception, ValueError, TypeError) as exc:
        raise TpmError(f"authenticationKey's {what} is malformed: {exc}") from exc
    if used != len(data):
        raise TpmError(f"authenticationKey's {what} is malformed: its inner size does not match its length")
    return value


def _srk_template() -> Any:
    """The SRK of the TCG Provisioning Guidance and of the Azure C SDK (``GetSrkTemplate``): RSA-2048 restricted
    decryption key, AES-128-CFB, empty auth, no DA; same template + same owner seed = same SRK every time."""
    attributes = (TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
                  | TPMA_OBJECT.NODA | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.SENSITIVEDATAORIGIN)
    return TPM2B_PUBLIC(publicArea=TPMT_PUBLIC(
        type=TPM2_ALG.RSA, nameAlg=TPM2_ALG.SHA256, objectAttributes=attributes,
        parameters=TPMU_PUBLIC_PARMS(rsaDetail=TPMS_RSA_PARMS(
            symmetric=_aes128_cfb(), scheme=TPMT_RSA_SCHEME(scheme=TPM2_ALG.NULL), keyBits=2048, exponent=0))))


def _aes128_cfb() -> Any:
    return TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.AES, keyBits=TPMU_SYM_KEY_BITS(aes=128),
                               mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB))


class DeviceTpm:
    """One open TPM: its EK and SRK loaded (or made), and the DPS HMAC key once activated or loaded.

    ``persist_srk`` makes a created SRK persistent at :data:`SRK_HANDLE` (an owner action: a provisioning step,
    not something every run should do). A TPM without a resource manager (swtpm, ``/dev/tpm0``) keeps what a
    process loads until it is flushed, so use it as a context manager or call :meth:`close`.
    """

    def __init__(self, tcti: str | None = None, *, persist_srk: bool = False) -> None:
        if _IMPORT_ERROR is not None:
            raise TpmUnavailable("TPM support needs tpm2-pytss and the TSS2 libraries: apt-get install libtss2-dev "
                                 f"pkg-config && pip install 'opendps[tpm]' ({_IMPORT_ERROR})")
        self.tcti = tcti_from_environment(tcti)
        self._transient: list[Any] = []  # objects this instance loaded, flushed at close
        try:
            self._esapi = ESAPI(self.tcti)
        except (TSS2_Exception, RuntimeError, ValueError) as exc:
            raise TpmUnavailable(f"cannot open the TPM at {self.tcti!r}: {exc}") from exc
        try:
            self._ek, self._ek_public = self._endorsement_key()
            self._srk, self._srk_public = self._storage_root_key(persist_srk)
        except BaseException:
            self.close()
            raise
        self._key: Any = None

    # ------------------------------------------------------------------ EK / SRK
    def _persistent(self, handle: int) -> Any | None:
        """The ESYS handle of a persistent object if the TPM has one at ``handle``."""
        handles: list[int] = []
        start = int(TPM2_HC.HR_PERSISTENT)
        while True:
            more, data = self._esapi.get_capability(TPM2_CAP.HANDLES, start, 64)
            page = [int(h) for h in data.data.handles]
            handles += page
            if not more or not page:
                break
            start = page[-1] + 1
        return self._esapi.tr_from_tpmpublic(handle) if handle in handles else None

    def _endorsement_key(self) -> tuple[Any, Any]:
        """The persistent EK if provisioned (it may come from another stack's template: the enrollment holds
        whatever public it has), else the TCG RSA-2048 EK made from the endorsement seed (the same each time)."""
        persistent = self._persistent(EK_HANDLE)
        if persistent is not None:
            public, _, _ = self._esapi.read_public(persistent)
            return persistent, public
        try:  # the TCG profile's template, or the one the maker left in NV (so that the EK matches its certificate)
            _, template = create_ek_template("EK-RSA2048", NVReadEK(self._esapi))
        except TSS2_Exception:  # an NV index this process may not read: the EK is then the default one
            _, template = create_ek_template("EK-RSA2048", _no_nv_index)
        handle, public, _, _, _ = self._esapi.create_primary(TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT)
        # only ActivateCredential needs it loaded: keep a saved context and free the slot (a TPM without a resource
        # manager has three, and the SRK, the HMAC key and an HMAC sequence need them)
        context = self._esapi.context_save(handle)
        self._esapi.flush_context(handle)
        return context, public

    def _storage_root_key(self, persist: bool) -> tuple[Any, Any]:
        persistent = self._persistent(SRK_HANDLE)
        if persistent is not None:
            public, _, _ = self._esapi.read_public(persistent)
            return persistent, public
        handle, public, _, _, _ = self._esapi.create_primary(TPM2B_SENSITIVE_CREATE(), _srk_template(), ESYS_TR.OWNER)
        if not persist:
            self._transient.append(handle)
            return handle, public
        persisted = self._esapi.evict_control(ESYS_TR.OWNER, handle, SRK_HANDLE)
        self._esapi.flush_context(handle)
        return persisted, public

    def endorsement_key(self) -> str:
        """The EK as DPS wants it (``tpm.endorsementKey``): base64 of the marshalled TPM2B_PUBLIC."""
        return base64.b64encode(self._ek_public.marshal()).decode()

    def storage_root_key(self) -> str:
        """The SRK as DPS wants it (``tpm.storageRootKey``): base64 of the marshalled TPM2B_PUBLIC."""
        return base64.b64encode(self._srk_public.marshal()).decode()

    def registration_id(self) -> str:
        """The registration id some SDKs derive from the EK (C SDK ``load_registration_id``): base32 of SHA-256
        over the marshalled TPM2B_PUBLIC, size prefix included, lower case, no padding."""
        digest = hashlib.sha256(self._ek_public.marshal()).digest()
        return base64.b32encode(digest).decode().rstrip("=").lower()

    # ------------------------------------------------------------------ the challenge
    def activate(self, authentication_key_b64: str, *, key_file: Path | None = None,
                 persistent_handle: int | None = None) -> None:
        """Open DPS's challenge and keep its HMAC key in the TPM for :meth:`sign`.

        ActivateCredential (activate handle: the SRK, whose name the credential is bound to; key handle: the EK,
        authorised by its admin policy) gives the credential, which is the AES-128-CFB inner-wrapper key of the
        duplicated HMAC key; Import re-wraps that key under the SRK and Load puts it in the TPM. ``key_file``
        keeps the imported public + SRK-wrapped private (for :meth:`load_key_file` in a later process);
        ``persistent_handle`` makes it persistent there instead (:data:`ID_KEY_HANDLE` is the C SDK's), replacing
        what was there.
        """
        id_object, identity_secret, duplicate, duplicate_seed, public_bytes, _data = \
            split_authentication_key(authentication_key_b64)
        credential_blob = _unmarshal(TPM2B_ID_OBJECT, id_object, "TPM2B_ID_OBJECT")
        secret = _unmarshal(TPM2B_ENCRYPTED_SECRET, identity_secret, "TPM2B_ENCRYPTED_SECRET (identity)")
        private = _unmarshal(TPM2B_PRIVATE, duplicate, "TPM2B_PRIVATE")
        seed = _unmarshal(TPM2B_ENCRYPTED_SECRET, duplicate_seed, "TPM2B_ENCRYPTED_SECRET (duplicate)")
        public = _unmarshal(TPM2B_PUBLIC, public_bytes, "TPM2B_PUBLIC")
        _check_hmac_public(public)
        credential = self._activate_credential(credential_blob, secret)
        try:
            imported = self._esapi.import_(self._srk, TPM2B_DATA(bytes(credential)), public, private, seed,
                                           _aes128_cfb())
        except TSS2_Exception as exc:
            raise TpmError(f"the TPM refused to import the challenge's HMAC key under the SRK ({exc}): the key was "
                           "not duplicated to this TPM's storage root key") from exc
        self._use_key(self._load(imported, public), persistent_handle)
        if key_file is not None:
            write_atomic(Path(key_file), _KEY_FILE_MAGIC + public.marshal() + imported.marshal(), 0o600)

    def _activate_credential(self, credential_blob: Any, secret: Any) -> Any:
        ek = self._esapi.context_load(self._ek) if isinstance(self._ek, TPMS_CONTEXT) else self._ek
        session = self._esapi.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY,
                                                 TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256)
        try:
            self._esapi.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
            return self._esapi.activate_credential(self._srk, ek, credential_blob, secret,
                                                   session1=ESYS_TR.PASSWORD, session2=session)
        except TSS2_Exception as exc:
            raise TpmError("the challenge was not made for this TPM: ActivateCredential refused it (made to another "
                           f"endorsement key, or bound to another storage root key) ({exc})") from exc
        finally:
            _flush_quietly(self._esapi, session)
            if ek is not self._ek:
                _flush_quietly(self._esapi, ek)

    def _load(self, private: Any, public: Any) -> Any:
        try:
            return self._esapi.load(self._srk, private, public)
        except TSS2_Exception as exc:
            raise TpmError(f"the TPM refused to load the HMAC key under the SRK ({exc})") from exc

    def _use_key(self, handle: Any, persistent_handle: int | None) -> None:
        """Make ``handle`` the signing key (persisting it at ``persistent_handle`` if given) and flush the old one."""
        if persistent_handle is not None:
            old = self._persistent(persistent_handle)
            if old is not None:
                self._esapi.evict_control(ESYS_TR.OWNER, old, persistent_handle)
            persisted = self._esapi.evict_control(ESYS_TR.OWNER, handle, persistent_handle)
            self._esapi.flush_context(handle)
            handle = persisted
        else:
            self._transient.append(handle)
        if self._key is not None and self._key in self._transient:
            self._transient.remove(self._key)
            self._esapi.flush_context(self._key)
        self._key = handle

    def load_key_file(self, key_file: Path) -> None:
        """Load the HMAC key :meth:`activate` kept in ``key_file`` (only this TPM's SRK can load it)."""
        data = Path(key_file).read_bytes()
        if not data.startswith(_KEY_FILE_MAGIC):
            raise TpmError(f"{key_file} is not a TPM key file written by opendps")
        data = data[len(_KEY_FILE_MAGIC):]
        try:
            public, used = TPM2B_PUBLIC.unmarshal(data)
            private, rest = TPM2B_PRIVATE.unmarshal(data[used:])
        except (TSS2_Exception, ValueError, TypeError) as exc:
            raise TpmError(f"{key_file} is damaged: {exc}") from exc
        if used + rest != len(data):
            raise TpmError(f"{key_file} is damaged: trailing bytes")
        self._use_key(self._load(private, public), None)

    def load_persistent_key(self, handle: int = ID_KEY_HANDLE) -> None:
        """Use the HMAC key persisted at ``handle`` (by :meth:`activate` or by the Azure C SDK)."""
        persistent = self._persistent(handle)
        if persistent is None:
            raise TpmError(f"no key persisted at {handle:#010x}: activate a challenge first")
        public, _, _ = self._esapi.read_public(persistent)
        _check_hmac_public(public)
        if self._key is not None and self._key in self._transient:
            self._transient.remove(self._key)
            self._esapi.flush_context(self._key)
        self._key = persistent

    # ------------------------------------------------------------------ signing
    def sign(self, data: bytes) -> bytes:
        """HMAC-SHA256 of ``data`` with the TPM-held key (TPM2_HMAC; an HMAC sequence past the TPM's buffer)."""
        if self._key is None:
            raise TpmError("no HMAC key in the TPM: activate a challenge or load the saved key first")
        try:
            if len(data) <= _MAX_BUFFER:
                return bytes(self._esapi.hmac(self._key, data, TPM2_ALG.SHA256))
            sequence = self._esapi.hmac_start(self._key, b"", TPM2_ALG.SHA256)
            for start in range(0, len(data) - _MAX_BUFFER, _MAX_BUFFER):
                self._esapi.sequence_update(sequence, data[start:start + _MAX_BUFFER])
            last = (len(data) - 1) // _MAX_BUFFER * _MAX_BUFFER
            digest, _ = self._esapi.sequence_complete(sequence, data[last:], ESYS_TR.RH_NULL)
            return bytes(digest)
        except TSS2_Exception as exc:
            raise TpmError(f"the TPM refused to sign with the HMAC key ({exc})") from exc

    def sas_token(self, resource_uri: str, expiry: int, key_name: str | None = None) -> str:
        """An Azure SAS for ``resource_uri`` (unencoded) signed in the TPM: the string-to-sign and encoding of
        :func:`opendps.transport.sas.generate` (``quote(safe='')``, ``sr + "\\n" + se``), with the signature
        coming from :meth:`sign` instead of a key in memory. DPS: ``{scope}/registrations/{id}``, ``registration``."""
        signature = base64.b64encode(self.sign(f"{quote(resource_uri, safe='')}\n{expiry}".encode())).decode()
        return sas.token(resource_uri, signature, expiry, key_name)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Flush what this instance loaded (a TPM without a resource manager keeps it otherwise) and disconnect."""
        esapi = getattr(self, "_esapi", None)
        if esapi is None:
            return
        for handle in reversed(self._transient):
            _flush_quietly(esapi, handle)
        self._transient.clear()
        esapi.close()
        self._esapi = None

    def __enter__(self) -> DeviceTpm:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _no_nv_index(index: int) -> bytes:
    """An NV reader for :func:`create_ek_template` that finds nothing: the TCG default template."""
    raise NoSuchIndex(index)


def _flush_quietly(esapi: Any, handle: Any) -> None:
    """Flush, where the object may already be gone (a session ended by its command, a TPM reset): nothing to free."""
    with contextlib.suppress(TSS2_Exception):
        esapi.flush_context(handle)


def _check_hmac_public(public: Any) -> None:
    """The challenge's key must be a keyed-hash signing key with an HMAC scheme: anything else would import and then
    fail at every signature, far from its cause."""
    area = public.publicArea
    if area.type != TPM2_ALG.KEYEDHASH:
        raise TpmError(f"authenticationKey's TPM2B_PUBLIC is a {TPM2_ALG(area.type)!s} key, not a keyed-hash (HMAC) key")
    if not area.objectAttributes & TPMA_OBJECT.SIGN_ENCRYPT:
        raise TpmError("authenticationKey's TPM2B_PUBLIC is not a signing key (sign attribute clear)")
    scheme = area.parameters.keyedHashDetail.scheme
    if scheme.scheme not in (TPM2_ALG.HMAC, TPM2_ALG.NULL):
        raise TpmError(f"authenticationKey's TPM2B_PUBLIC has scheme {TPM2_ALG(scheme.scheme)!s}, not HMAC")
