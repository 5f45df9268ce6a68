"""Key custody: CA private keys exist only wrapped at rest or on an HSM token; issuance sees only :class:`Signer`.

Two backends, chosen per key when it is made (``KeyStore.generate(..., backend=)``, default: the installation's):

- ``software``: each PKCS#8 key is wrapped with AES-256-GCM under a key-encryption key derived (HKDF-SHA256) from
  the 32-byte master key; the wrapped key's id is the GCM associated data, so a blob moved to another row does not
  decrypt.
- ``pkcs11``: the key is generated on a PKCS#11 token and never leaves it (:mod:`opendps.pki.pkcs11`); its row holds
  the token's label, the key's CKA_LABEL and CKA_ID and the public key — an empty blob.

Both give a ``Signer``, so issuance code does not change when keys move into an HSM. There is no fallback: a key on a
token that does not answer is :class:`~opendps.pki.pkcs11.KeyUnavailable` (503), never a software key instead.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import delete, event, select
from sqlalchemy.orm import Session

from opendps.errors import ConfigurationError, InvalidInput
from opendps.files import create_atomic
from opendps.pki.pkcs11 import BACKEND as PKCS11
from opendps.pki.pkcs11 import KeyUnavailable, Pkcs11Signer, Pkcs11Token
from opendps.store import Store, WrappedKey

log = logging.getLogger("opendps.keys")
SOFTWARE = "software"
BACKENDS = (SOFTWARE, PKCS11)

MASTER_KEY_ENV = "OPENDPS_MASTER_KEY"
MASTER_KEY_BYTES = 32
MASTER_KEY_CHECK = "master_key_check"
_CHECK_PLAINTEXT = b"opendps master key check v1"


@runtime_checkable
class Signer(Protocol):
    """Signs with a CA key it never reveals. ``sign`` returns a DER ECDSA-Sig-Value over SHA-384."""

    key_id: str

    def public_key(self) -> ec.EllipticCurvePublicKey: ...

    def sign(self, data: bytes) -> bytes: ...


class SoftwareSigner:
    """A P-384 key held in process memory after unwrapping."""

    def __init__(self, key_id: str, private_key: ec.EllipticCurvePrivateKey) -> None:
        self.key_id = key_id
        self._key = private_key

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data, ec.ECDSA(hashes.SHA384()))

    def __repr__(self) -> str:  # never print key material
        return f"SoftwareSigner(key_id={self.key_id!r})"


def generate_master_key() -> bytes:
    return secrets.token_bytes(MASTER_KEY_BYTES)


def encode_master_key(key: bytes) -> str:
    return base64.b64encode(key).decode()


def decode_master_key(text: str, source: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except ValueError as exc:
        raise ConfigurationError(f"master key from {source} is not valid base64") from exc
    if len(key) != MASTER_KEY_BYTES:
        raise ConfigurationError(f"master key from {source} must be {MASTER_KEY_BYTES} bytes, got {len(key)}")
    return key


def load_master_key(path: Path, *, create: bool = False) -> bytes:
    """The master key from ``OPENDPS_MASTER_KEY`` if set, else from ``path`` (created 0600 if asked)."""
    env = os.environ.get(MASTER_KEY_ENV)
    if env:
        return decode_master_key(env, MASTER_KEY_ENV)
    if not path.exists():
        if not create:
            raise ConfigurationError(f"master key file {path} does not exist and {MASTER_KEY_ENV} is not set")
        key = generate_master_key()
        create_atomic(path, (encode_master_key(key) + "\n").encode(), 0o600)  # whole and fsynced, or not there
        return key
    # bytes, not read_text(): a file of random bytes (a binary key written by mistake) is "not valid base64" in one
    # line, not a UnicodeDecodeError traceback (b64decode refuses the replacement character as it refuses non-ASCII)
    return decode_master_key(path.read_bytes().decode("ascii", "replace"), str(path))


DEFAULT_BACKEND_SETTING = "key_backend"  # instance_settings: where new CA keys go unless a request says
TOKEN_SETTING = "pkcs11_token_label"  # instance_settings: the installation's PKCS#11 token


def custody_settings(store: Store) -> tuple[str, str | None]:
    """The installation's key custody, shared by every node: (default backend, token label or None)."""
    return store.setting(DEFAULT_BACKEND_SETTING) or SOFTWARE, store.setting(TOKEN_SETTING)


def remember_custody(store: Store, backend: str, token_label: str | None) -> None:
    if backend not in BACKENDS:
        raise ConfigurationError(f"key backend {backend!r} is not one of {', '.join(BACKENDS)}")
    store.put_setting(DEFAULT_BACKEND_SETTING, backend)
    if token_label:
        store.put_setting(TOKEN_SETTING, token_label)


def tokens_in_use(store: Store) -> set[str]:
    """The labels of the tokens that hold this installation's keys (empty: every key is in software)."""
    with store.session() as s:
        return {t for t in s.scalars(select(WrappedKey.pkcs11_token).where(WrappedKey.backend == PKCS11).distinct())
                if t}


@dataclass(frozen=True)
class KeyCustody:
    """Where a CA key lives, as the management API shows it (no secret in it)."""

    backend: str  # software | pkcs11
    token: str | None = None  # pkcs11: the token's label
    label: str | None = None  # pkcs11: the key objects' CKA_LABEL on the token


def _after_transaction(session: Session, *, on_commit: Callable[[], None] | None = None,
                       on_rollback: Callable[[], None] | None = None) -> None:
    """Run one of the callbacks once ``session``'s transaction ends (outside the database: the token's objects)."""
    done = False

    def finish(action: Callable[[], None] | None) -> None:
        nonlocal done
        if done:
            return
        done = True
        if action is not None:
            try:
                action()
            except Exception as exc:  # noqa: BLE001 - the transaction has ended; say what was left behind
                log.warning("after the transaction: %s", exc)

    event.listen(session, "after_commit", lambda _s: finish(on_commit))
    event.listen(session, "after_rollback", lambda _s: finish(on_rollback))


class KeyStore:
    """Generates, persists and opens CA keys: wrapped in the store (software) or on a PKCS#11 token.

    ``token``: this process's connection to the installation's token (None: no HSM configured here);
    ``default_backend``: where a new key goes when the caller does not say (the installation's choice).
    """

    def __init__(self, store: Store, master_key: bytes, *, token: Pkcs11Token | None = None,
                 default_backend: str = SOFTWARE) -> None:
        if len(master_key) != MASTER_KEY_BYTES:
            raise ConfigurationError("master key must be 32 bytes")
        if default_backend not in BACKENDS:
            raise ConfigurationError(f"key backend {default_backend!r} is not one of {', '.join(BACKENDS)}")
        self.token = token  # None with default pkcs11: a process without the PIN (opendps info); nothing is signed
        self.default_backend = default_backend
        kek = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"opendps key-wrap v1").derive(master_key)
        self._aead = AESGCM(kek)
        self._store = store
        self._signers: dict[str, Signer] = {}
        self._lock = threading.Lock()

    # -- wrapping primitives (also used for other secrets, e.g. access policy keys) --
    def wrap(self, plaintext: bytes, label: str) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, plaintext, label.encode())

    def unwrap(self, blob: bytes, label: str) -> bytes:
        try:
            return self._aead.decrypt(blob[:12], blob[12:], label.encode())
        except InvalidTag as exc:
            raise ConfigurationError(
                f"cannot decrypt {label}: wrong master key for this database, or the stored blob was altered or moved"
            ) from exc

    def check_master_key(self) -> None:
        """Create the key check value on first use; afterwards refuse a different master key."""
        fresh = base64.b64encode(self.wrap(_CHECK_PLAINTEXT, MASTER_KEY_CHECK)).decode()
        blob = base64.b64decode(self._store.set_setting_if_absent(MASTER_KEY_CHECK, fresh))
        try:
            ok = self.unwrap(blob, MASTER_KEY_CHECK) == _CHECK_PLAINTEXT
        except ConfigurationError:
            ok = False
        if not ok:
            raise ConfigurationError(
                "wrong master key: it does not match the key this database's CA keys were encrypted with "
                f"(check {MASTER_KEY_ENV} or the data directory's master.key)"
            )

    # -- CA keys --
    def backend_for(self, backend: str | None) -> str:
        """The backend a new key goes to: ``backend``, or the installation's default; InvalidInput for a name that is
        none, or for pkcs11 where no token is configured."""
        if backend is None:
            backend = self.default_backend
        elif backend not in BACKENDS:
            raise InvalidInput(f"keyBackend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if backend == PKCS11 and self.token is None:
            if backend == self.default_backend:  # never a software key instead
                raise KeyUnavailable("new CA keys go to a PKCS#11 token, and this process has none open: start it "
                                     "with --pkcs11-module and the token's PIN in OPENDPS_PKCS11_PIN")
            raise InvalidInput("keyBackend pkcs11: this installation has no PKCS#11 token configured (opendps init "
                               "--pkcs11-module PATH --pkcs11-token-label LABEL)")
        return backend

    def generate(self, session: Session, label: str, *, backend: str | None = None) -> Signer:
        """Make a new P-384 key (in software, or on the token with ``backend="pkcs11"``; default: the installation's
        backend), add its row to ``session`` and return its signer. A key made on the token whose row is rolled back
        is deleted from the token again."""
        backend = self.backend_for(backend)
        key_id = f"{label}-{secrets.token_hex(8)}"
        signer: Signer
        if backend == PKCS11:
            token = self.token
            assert token is not None
            made = token.generate(key_id)
            spki = made.public_key.public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
            session.add(WrappedKey(id=key_id, backend=PKCS11, algorithm="EC-P384", blob=b"", public_key=spki,
                                   created_at=datetime.now(UTC), pkcs11_token=made.token, pkcs11_label=made.label,
                                   pkcs11_id=made.cka_id.hex()))
            _after_transaction(session, on_rollback=lambda: self._destroy_on_token(made.label, made.cka_id))
            signer = Pkcs11Signer(key_id, made.public_key, token, made.label, made.cka_id)
        else:
            key = ec.generate_private_key(ec.SECP384R1())
            pkcs8 = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
            spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
            session.add(WrappedKey(id=key_id, backend=SOFTWARE, algorithm="EC-P384",
                                   blob=self.wrap(pkcs8, key_id), public_key=spki,
                                   created_at=datetime.now(UTC)))
            signer = SoftwareSigner(key_id, key)
        session.flush()  # rows referencing the key may follow in the same unit of work
        with self._lock:
            self._signers[key_id] = signer
        return signer

    def _destroy_on_token(self, label: str, cka_id: bytes) -> None:
        if self.token is not None:
            self.token.destroy(label, cka_id)

    def destroy(self, session: Session, key_ids: list[str]) -> None:
        """Delete keys in the caller's transaction (their CA certificates are gone) and forget their signers; keys on
        the token are deleted from it once the transaction has committed."""
        on_token = session.execute(select(WrappedKey.pkcs11_label, WrappedKey.pkcs11_id).where(
            WrappedKey.id.in_(key_ids), WrappedKey.backend == PKCS11)).all()
        session.execute(delete(WrappedKey).where(WrappedKey.id.in_(key_ids)))
        with self._lock:
            for key_id in key_ids:
                self._signers.pop(key_id, None)
        if on_token:
            def destroy_on_token() -> None:
                for label, cka_id in on_token:
                    if label and cka_id:
                        self._destroy_on_token(label, bytes.fromhex(cka_id))

            _after_transaction(session, on_commit=destroy_on_token)

    def custody(self, key_id: str, *, session: Session | None = None) -> KeyCustody:
        """Where a stored key lives (for the management API); in ``session``'s transaction when given (a key made in
        it is not committed yet)."""
        query = select(WrappedKey.backend, WrappedKey.pkcs11_token, WrappedKey.pkcs11_label).where(WrappedKey.id == key_id)
        if session is not None:
            row = session.execute(query).first()
        else:
            with self._store.session() as s:
                row = s.execute(query).first()
        if row is None:
            raise ConfigurationError(f"CA key {key_id} is missing from the store")
        return KeyCustody(row.backend, row.pkcs11_token, row.pkcs11_label)

    def tokens_in_use(self) -> set[str]:
        return tokens_in_use(self._store)

    def signer(self, key_id: str) -> Signer:
        """The signer for a stored key (unwrapped, or found on the token, once; then cached)."""
        with self._lock:
            cached = self._signers.get(key_id)
        if cached is not None:
            return cached
        with self._store.session() as s:
            row = s.get(WrappedKey, key_id)
            if row is None:
                raise ConfigurationError(f"CA key {key_id} is missing from the store")
            backend, blob, spki = row.backend, row.blob, row.public_key
            token_label, label, cka_id = row.pkcs11_token, row.pkcs11_label, row.pkcs11_id
        signer: Signer
        if backend == PKCS11:
            if self.token is None or self.token.label != token_label:
                where = "no PKCS#11 token is configured in this process" if self.token is None else \
                    f"this process is configured for token {self.token.label!r}"
                raise KeyUnavailable(f"CA key {key_id} is on PKCS#11 token {token_label!r}, but {where} (opendps serve "
                                     "--pkcs11-module, with the token's PIN in OPENDPS_PKCS11_PIN)")
            public_key = serialization.load_der_public_key(spki)
            if not isinstance(public_key, ec.EllipticCurvePublicKey) or not label or not cka_id:
                raise ConfigurationError(f"CA key {key_id}: its PKCS#11 reference in the store is incomplete")
            signer = Pkcs11Signer(key_id, public_key, self.token, label, bytes.fromhex(cka_id))
        else:
            key = serialization.load_der_private_key(self.unwrap(blob, key_id), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ConfigurationError(f"CA key {key_id} is not an EC key")
            signer = SoftwareSigner(key_id, key)
        with self._lock:
            self._signers[key_id] = signer
        return signer
