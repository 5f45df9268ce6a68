"""On-disk operational credentials with a safe switch-over: the new set is only trusted once it worked.

Layout of ``directory``::

    device.key      operational private key (0600)
    device.pem      leaf certificate
    chain.pem       leaf + issuing CA: what a TLS client presents to the hub
    fullchain.pem   leaf + issuing CA + root, as issued
    previous/       the last set that connected, kept until :meth:`CertificateStore.confirm`
    agent.json      the assignment (hub, device id) the set was issued for: ``device provision`` writes
                    it, so a later ``device run`` connects with the set instead of registering again
    tpm-hmac.key    with TPM attestation: the DPS/hub key, wrapped by the TPM (written by the TPM client)

Every file is written atomically (temporary file in the same directory, fsync, ``os.replace``, then
the directory is fsynced), so a crash or power cut leaves either the old or the new file, never a
partial one. A renewal writes all new temporary files first and only then replaces them, keeping the
window in which key and certificate disagree to a few renames; :meth:`current` refuses such a set
(:class:`StoreError`) rather than handing a TLS stack a key that does not match its certificate.

``previous/`` always holds the last *confirmed* set: saving twice before a confirmation (a retried
renewal) keeps the known-good one, and :meth:`rollback` restores it when the new certificate cannot
connect.

A process killed in the middle of a write leaves its temporary files (``.device.key.XXXX.tmp``,
``.tpm-hmac.key.XXXX.tmp``: keys among them); :meth:`CertificateStore.sweep` removes them, which the agent does when
it starts (never while another process may be writing the set).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from opendps.device.keys import key_to_pem, load_private_key, public_keys_match
from opendps.files import fsync_dir, replace_all, write_atomic, write_temp

__all__ = ["CertificateStore", "StoreError", "StoredCredentials"]

KEY, LEAF, CHAIN, FULLCHAIN = "device.key", "device.pem", "chain.pem", "fullchain.pem"
FILES = (KEY, LEAF, CHAIN, FULLCHAIN)
PREVIOUS = "previous"
ASSIGNMENT = "agent.json"
TPM_KEY = "tpm-hmac.key"  # the TPM-held DPS/hub key, wrapped by the TPM's SRK (useless elsewhere)
PROBE, PROBE_SIZE = "write-check", 16384  # more than a set and its previous/ copy take (some 5 KB each)


class StoreError(Exception):
    """The stored set is missing, inconsistent, or there is nothing to roll back to."""


@dataclass(frozen=True)
class StoredCredentials:
    """Paths of the current set plus its parsed leaf (for expiry checks and twin reports)."""

    directory: Path
    key_file: Path
    cert_file: Path
    chain_file: Path
    fullchain_file: Path
    certificate: x509.Certificate

    @property
    def tls_identity(self) -> tuple[Path, Path]:
        """``(chain file, key file)``, the ``x509=`` argument of the hub and provisioning clients."""
        return self.chain_file, self.key_file


def _pem(certs: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


class CertificateStore:
    """The device's operational key and chain in ``directory`` (created 0700 if missing)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    @property
    def previous_dir(self) -> Path:
        return self.directory / PREVIOUS

    @property
    def pending(self) -> bool:
        """True between :meth:`save` over an existing set and :meth:`confirm` (or :meth:`rollback`)."""
        return (self.previous_dir / KEY).exists()

    def save(self, key: ec.EllipticCurvePrivateKey, chain: list[x509.Certificate]) -> StoredCredentials:
        """Store a newly issued chain [leaf, issuing CA, root...] for ``key``; the old set moves to ``previous/``."""
        if len(chain) < 2:
            raise ValueError("an issued chain holds at least the leaf and its issuing CA")
        if not public_keys_match(key, chain[0]):
            raise ValueError("the issued leaf does not certify this key")
        if not self.pending and (self.directory / KEY).exists():
            self._copy_set(self.directory, self.previous_dir)
        replace_all(self.directory, {
            LEAF: (_pem(chain[:1]), 0o644),
            CHAIN: (_pem(chain[:2]), 0o644),
            FULLCHAIN: (_pem(chain), 0o644),
            KEY: (key_to_pem(key), 0o600),
        })
        result = self.current()
        assert result is not None
        return result

    def current(self) -> StoredCredentials | None:
        """The current set, or None when nothing was stored yet; StoreError if it is incomplete or mismatched."""
        present = [name for name in FILES if (self.directory / name).exists()]
        if not present:
            return None
        if len(present) != len(FILES):
            raise StoreError(f"{self.directory}: incomplete credential set (have {', '.join(present)})")
        certificate = x509.load_pem_x509_certificate((self.directory / LEAF).read_bytes())
        key = load_private_key(self.directory / KEY)
        if not public_keys_match(key, certificate):
            raise StoreError(f"{self.directory}: {KEY} does not match {LEAF} (interrupted renewal?); use rollback()")
        return StoredCredentials(self.directory, self.directory / KEY, self.directory / LEAF, self.directory / CHAIN,
                                 self.directory / FULLCHAIN, certificate)

    def confirm(self) -> None:
        """The current set connected to the hub: forget the previous one."""
        if self.previous_dir.exists():
            shutil.rmtree(self.previous_dir)
            fsync_dir(self.directory)

    def rollback(self) -> StoredCredentials:
        """Put the previous (last confirmed) set back, e.g. when the new certificate is refused by the hub."""
        if not self.pending:
            raise StoreError(f"{self.directory}: no previous credential set to roll back to")
        self._copy_set(self.previous_dir, self.directory)
        shutil.rmtree(self.previous_dir)
        fsync_dir(self.directory)
        result = self.current()
        assert result is not None
        return result

    def check_writable(self) -> None:
        """StoreError unless a set can be written here now (the disk is full or read-only): checked before asking for a
        certificate, so that one which could not be stored is not issued (each retry would have issued another)."""
        try:
            write_temp(self.directory, PROBE, bytes(PROBE_SIZE), 0o600).unlink()
        except OSError as exc:
            raise StoreError(f"{self.directory}: cannot store credentials ({exc.strerror or exc}); not asking for a "
                             "certificate until it can") from exc

    def sweep(self) -> list[Path]:
        """Remove the temporary files an interrupted write left (here and in ``previous/``); the removed paths."""
        removed: list[Path] = []
        for directory in (self.directory, self.previous_dir):
            for name in (*FILES, ASSIGNMENT, TPM_KEY, PROBE):
                for tmp in directory.glob(f".{name}.*.tmp"):
                    with contextlib.suppress(FileNotFoundError):
                        tmp.unlink()
                        removed.append(tmp)
        return removed

    @property
    def assignment_file(self) -> Path:
        return self.directory / ASSIGNMENT

    def save_assignment(self, hub: str, device_id: str) -> None:
        """Remember where DPS assigned the device (written atomically next to the certificates)."""
        data = json.dumps({"assignedHub": hub, "deviceId": device_id}, indent=2).encode()
        write_atomic(self.assignment_file, data)

    def assignment(self) -> tuple[str, str] | None:
        """``(assigned hub, device id)`` as last saved, or None when missing or unreadable."""
        try:
            state = json.loads(self.assignment_file.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(state, dict):
            return None
        hub, device_id = state.get("assignedHub"), state.get("deviceId")
        if not isinstance(hub, str) or not isinstance(device_id, str) or not hub or not device_id:
            return None
        return hub, device_id

    @staticmethod
    def _copy_set(source: Path, target: Path) -> None:
        target.mkdir(mode=0o700, exist_ok=True)
        # the key goes last: previous/device.key is the marker of a complete, pending previous set
        names = [name for name in FILES if name != KEY] + [KEY]
        replace_all(target, {name: ((source / name).read_bytes(), 0o600 if name == KEY else 0o644) for name in names})
