"""The hash chain itself, without a database: what an entry's hash covers and how a run of entries is checked.

Kept apart from the store so that the rule can be read — and re-implemented by an auditor with nothing but the
rows — on its own:

- an entry's hash is SHA-256 over the UTF-8 of the JSON array ``["opendps-audit-1", seq, time, action, actor,
  namespace, device, subject, details, prev_hash]`` written compactly (no spaces, ASCII only), ``time`` as
  ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` and ``details`` as the stored text (canonical JSON itself). A JSON array is used
  because it is unambiguous (every string is quoted and escaped, ``null`` is not ``"null"``), with one encoder
  everywhere, so no field can bleed into the next;
- ``prev_hash`` of entry 1 is 64 zeros; of entry n, the hash of entry n - 1;
- sequence numbers start at 1 and have no gaps.

So editing any field of an entry breaks that entry's hash; deleting an entry leaves a gap; moving entries (or
swapping two rows' contents) breaks the hash of each moved entry (its sequence number is hashed) and the link to
its neighbours; rewriting an entry *and* its hash breaks the next entry's ``prev_hash``. What a chain alone cannot
show is the removal of its newest entries, or a rewrite of everything from some entry on: an operator keeps the
head (``audit verify`` prints it) and checks it is still there later (``--expect-head``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

VERSION = "opendps-audit-1"
GENESIS = "0" * 64


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces, ASCII only, no NaN: the same text for the same value on every host."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False,
                      default=_jsonable)


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return timestamp(value)
    if isinstance(value, set | frozenset | tuple):
        return sorted(value) if isinstance(value, set | frozenset) else list(value)
    raise TypeError(f"audit details must be JSON values, not {type(value).__name__}")


def printable(text: str, limit: int | None = 80, *, keep: str = "") -> str:
    """``text`` for a one-line message, at most ``limit`` characters of it (None: all), each character that is not
    printable escaped (``\\x1b``, ``\\n``) but those in ``keep``: messages quote what is stored, and an edited entry
    may hold an ESC sequence or a line break meant for the terminal or log of whoever checks the chain (the CLI's
    tables show a device's text through it too: ``cli.output.terminal_safe``)."""
    shown = text if limit is None or len(text) <= limit else text[:limit] + "..."
    if shown.isprintable():
        return shown
    return "".join(c if c.isprintable() or c in keep else c.encode("unicode_escape").decode("ascii") for c in shown)


def timestamp(at: datetime) -> str:
    """An entry's time as hashed and shown: UTC, microseconds (what both backends store exactly)."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def entry_hash(seq: int, created_at: datetime, action: str, actor: str | None, namespace: str | None,
               device_id: str | None, subject: str | None, details: str, prev_hash: str) -> str:
    encoded = canonical_json([VERSION, seq, timestamp(created_at), action, actor, namespace, device_id, subject,
                              details, prev_hash])
    return hashlib.sha256(encoded.encode()).hexdigest()


@dataclass(frozen=True)
class Record:
    """One audit entry as stored (``details`` is the canonical JSON text the hash covers)."""

    seq: int
    created_at: datetime
    action: str
    actor: str | None
    namespace: str | None
    device_id: str | None
    subject: str | None
    details: str
    prev_hash: str
    hash: str

    def computed_hash(self) -> str:
        return entry_hash(self.seq, self.created_at, self.action, self.actor, self.namespace, self.device_id,
                          self.subject, self.details, self.prev_hash)

    def details_object(self) -> Any:
        try:
            return json.loads(self.details)
        except ValueError:
            return self.details  # an edited row: shown as stored (verify names it)

    def label(self) -> str:
        return f"entry {self.seq} ({printable(str(self.action))} at {timestamp(self.created_at)})"

    def to_wire(self) -> dict[str, Any]:
        return {"sequenceNumber": self.seq, "time": timestamp(self.created_at), "action": self.action,
                "actor": self.actor, "namespace": self.namespace, "deviceId": self.device_id, "subject": self.subject,
                "details": self.details_object(), "previousHash": self.prev_hash, "hash": self.hash}


@dataclass(frozen=True)
class Verification:
    """The outcome of checking the chain: intact, or the first bad entry and what is wrong with it.

    ``entries``: how many entries were found intact (all of them when intact); ``last_seq``/``last_hash``: the last
    intact entry (the head when intact: keep it to check later that nothing after it was cut or rewritten)."""

    intact: bool
    entries: int
    last_seq: int
    last_hash: str
    bad_seq: int | None = None
    problem: str | None = None

    def message(self) -> str:
        """One line, for the CLI and logs."""
        if self.intact:
            if not self.entries:
                return "audit log intact: no entries yet"
            # SEQ:HASH is what --expect-head takes: keep it to check later that nothing was cut or rewritten
            return f"audit log intact: {self.entries} entries, head {self.last_seq}:{self.last_hash}"
        return f"audit log broken at entry {self.bad_seq}: {self.problem}"

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"intact": self.intact, "entries": self.entries, "lastSequenceNumber": self.last_seq,
                                "lastHash": self.last_hash, "message": self.message()}
        if not self.intact:
            wire.update(firstBadEntry=self.bad_seq, problem=self.problem)
        return wire


class ChainCheck:
    """Feed entries in sequence order (:meth:`feed` says whether to go on); :meth:`result` after the last one.

    Stops at the first bad entry: after it, nothing can be trusted to say more."""

    def __init__(self, expect_head: tuple[int, str] | None = None) -> None:
        self.expected = 1
        self.prev = GENESIS
        self.count = 0
        self.bad: tuple[int, str] | None = None
        self.expect_head = expect_head

    def feed(self, record: Record) -> bool:
        if not self._in_order(record.seq, record.label()):
            return False
        if record.computed_hash() != record.hash:
            self.bad = (record.seq, f"{record.label()} does not match its hash: edited, or moved from another "
                                    "position")
            return False
        if record.prev_hash != self.prev:
            before = f"entry {record.seq - 1}'s hash" if record.seq > 1 else "the chain's start (64 zeros)"
            self.bad = (record.seq, f"{record.label()} does not follow the entry before it: its previous hash is not "
                                    f"{before} (entries reordered or replaced, or the previous entry rewritten)")
            return False
        if self.expect_head is not None and record.seq == self.expect_head[0] \
                and record.hash != self.expect_head[1].lower():
            self.bad = (record.seq, f"{record.label()} is not the entry recorded earlier (its hash was "
                                    f"{self.expect_head[1].lower()}): the log was rewritten from here or before")
            return False
        self.prev = record.hash
        self.count += 1
        self.expected += 1
        return True

    def unreadable(self, seq: int, why: str) -> bool:
        """The entry numbered ``seq`` is there but cannot be read as an appender writes it (a time that is no time,
        bytes or a number in a text column: put there by hand); it is the bad one unless an earlier one is."""
        if self._in_order(seq, f"entry {seq}"):
            self.bad = (seq, f"entry {seq} cannot be read: {printable(why, 200)} (no appender writes that: edited)")
        return False

    def _in_order(self, seq: int, label: str) -> bool:
        if self.bad is not None:
            return False
        if seq > self.expected:
            gone = (f"entry {self.expected} is missing" if seq == self.expected + 1
                    else f"entries {self.expected} to {seq - 1} are missing")
            after = f"after entry {self.expected - 1}" if self.expected > 1 else "at the start of the log"
            self.bad = (self.expected, f"{gone}: entry {seq} comes {after} (deleted)")
        elif seq < self.expected:  # a row numbered 0 or less (inserted by hand), or a caller feeding anything
            self.bad = (seq, f"{label} is out of sequence order (expected entry {self.expected}): entries are "
                             "numbered from 1 (inserted)")
        return self.bad is None

    def result(self) -> Verification:
        last_seq, last_hash = self.expected - 1, self.prev
        if self.bad is None and self.expect_head is not None and self.expect_head[0] > last_seq:
            seq = self.expect_head[0]
            self.bad = (seq, f"entry {seq} recorded earlier is gone: the log ends at entry {last_seq} "
                             "(entries deleted from its end)")
        if self.bad is not None:
            return Verification(False, self.count, last_seq, last_hash, self.bad[0], self.bad[1])
        return Verification(True, self.count, last_seq, last_hash)


__all__ = ["GENESIS", "VERSION", "ChainCheck", "Record", "Verification", "canonical_json", "entry_hash", "timestamp"]
