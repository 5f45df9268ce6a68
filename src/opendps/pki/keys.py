"""Key custody: CA private keys exist only wrapped at rest; issuance sees only :class:`Signer`.

The software key store wraps each PKCS#8 key with AES-256-GCM under a key-encryption key derived
(HKDF-SHA256) from the 32-byte master key; the wrapped key's id is the GCM associated data, so a
blob moved to another row does not decrypt. A PKCS#11 backend implements the same ``Signer``
protocol, so issuance code does not change when keys move into an HSM.
"""

from __future__ import annotations

import base64
import os
import secrets
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import delete
from sqlalchemy.orm import Session

from opendps.errors import ConfigurationError
from opendps.store import Store, WrappedKey

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
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(encode_master_key(key) + "\n")
        return key
    return decode_master_key(path.read_text(), str(path))


class KeyStore:
    """Software key store: generates, wraps, persists and unwraps CA keys."""

    backend = "software"

    def __init__(self, store: Store, master_key: bytes) -> None:
        if len(master_key) != MASTER_KEY_BYTES:
            raise ConfigurationError("master key must be 32 bytes")
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
    def generate(self, session: Session, label: str) -> Signer:
        """Make a new P-384 key, add its wrapped form to ``session`` and return its signer."""
        key = ec.generate_private_key(ec.SECP384R1())
        key_id = f"{label}-{secrets.token_hex(8)}"
        pkcs8 = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
        spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        session.add(WrappedKey(id=key_id, backend=self.backend, algorithm="EC-P384",
                               blob=self.wrap(pkcs8, key_id), public_key=spki,
                               created_at=datetime.now(UTC)))
        session.flush()  # rows referencing the key may follow in the same unit of work
        signer = SoftwareSigner(key_id, key)
        with self._lock:
            self._signers[key_id] = signer
        return signer

    def destroy(self, session: Session, key_ids: list[str]) -> None:
        """Delete keys in the caller's transaction (their CA certificates are gone) and forget their signers."""
        session.execute(delete(WrappedKey).where(WrappedKey.id.in_(key_ids)))
        with self._lock:
            for key_id in key_ids:
                self._signers.pop(key_id, None)

    def signer(self, key_id: str) -> Signer:
        """The signer for a stored key (unwrapped once, then cached)."""
        with self._lock:
            cached = self._signers.get(key_id)
        if cached is not None:
            return cached
        with self._store.session() as s:
            row = s.get(WrappedKey, key_id)
            if row is None:
                raise ConfigurationError(f"CA key {key_id} is missing from the store")
            blob = row.blob
        key = serialization.load_der_private_key(self.unwrap(blob, key_id), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigurationError(f"CA key {key_id} is not an EC key")
        signer = SoftwareSigner(key_id, key)
        with self._lock:
            self._signers[key_id] = signer
        return signer
