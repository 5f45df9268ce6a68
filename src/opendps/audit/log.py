"""Appending to the audit log inside the caller's transaction, and reading and checking it.

Why in the caller's transaction: an action and its entry commit together or not at all — a rolled-back
registration leaves no entry, and no committed certificate lacks one.

Why a lock: each entry names the hash of the one before, so appends must take turns, across threads, processes
and hosts, or two would chain to the same head. PostgreSQL: a transaction-level advisory lock (released when the
transaction ends, after its commit is visible), then the head is read — in READ COMMITTED each statement sees what
committed before it, so the head read after the lock is the newest. SQLite: one writer at a time — a no-op UPDATE
of ``audit_log`` takes the database's write lock (and waits for it) before the head is read, so the head cannot
move until this transaction ends. Either way ``seq`` is the primary key, so a second appender on the same head
would fail its INSERT rather than fork the chain. The cost: appends from concurrent transactions are serialised
from their append to their commit, so hooks append as the last statement of their transaction.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Row, Select, insert, or_, select, text
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.orm import Session

from opendps.audit.chain import GENESIS, ChainCheck, Record, Verification, canonical_json, entry_hash, printable
from opendps.store import Store, Transaction, joined, table_of
from opendps.store.models import AuditEntry

# who is acting: the access policy of the management request being served (set by the HTTP front end, carried into
# the domain thread pool by DomainRunner's context copy); None for a device's own request or a local command
ACTOR: ContextVar[str | None] = ContextVar("opendps_audit_actor", default=None)
_FROM_CONTEXT: Any = object()

_TABLE = table_of(AuditEntry)
_HEAD = select(_TABLE.c.seq, _TABLE.c.hash).order_by(_TABLE.c.seq.desc()).limit(1)
_INSERT = insert(_TABLE)
# PostgreSQL: (space, key) of the advisory lock appends take turns on; apart from telemetry's space (0x0DD57E1E)
_LOCK_SPACE = 0x0A0D_17A0
# ... and the holder's transaction may sit idle at most HOLD_LIMIT: a process frozen while holding the turn (SIGSTOP, a
# paused VM, swapping) kept its connection open, so every append of the cluster waited for as long as it stayed
# frozen; PostgreSQL ends such a session, and the turn with it. Transaction-local (set_config's is_local), so no
# startup option a connection pooler such as PgBouncer would refuse. Appends are their transaction's last statement.
HOLD_LIMIT = "60s"
_TAKE_TURN_PG = text("SELECT set_config('idle_in_transaction_session_timeout', :hold, true), "
                     "pg_advisory_xact_lock(:space, 0)")
_TAKE_TURN_SQLITE = text("UPDATE audit_log SET seq = seq WHERE 0 = 1")  # takes SQLite's write lock, changes nothing

ACTION = re.compile(r"^[a-z][a-z0-9-]*(?:\.[a-z][a-z0-9-]*)+$")
MAX_DETAILS = 4096  # characters of canonical JSON: entries describe, they do not carry documents
# what an entry must never hold: a details member so named, or a value that looks like a credential
_SECRET_NAME = re.compile(r"(?:key|keys|secret|secrets|token|tokens|password|passphrase|pin|sas|signature|sig)$",
                          re.IGNORECASE)
_SECRET_VALUE = re.compile(r"SharedAccessSignature|PRIVATE KEY|SharedAccessKey=", re.IGNORECASE)
_LIMITS = {"actor": 128, "namespace": 64, "device": 128, "subject": 256}


@contextmanager
def acting_as(actor: str | None) -> Iterator[None]:
    """Attribute the entries appended inside to ``actor`` (in-process callers; front ends set :data:`ACTOR`)."""
    token = ACTOR.set(actor)
    try:
        yield
    finally:
        ACTOR.reset(token)


@dataclass(frozen=True)
class Event:
    """One thing to record: ``action`` (``certificate.issued``...), the namespace, the device (its registration id;
    stored lower-cased, as ids compare), the subject (a serial number, thumbprint, enrollment id...) and small
    ``details`` (JSON values; never a key, token, PIN or other secret — refused with ValueError)."""

    action: str
    namespace: str | None = None
    device: str | None = None
    subject: str | None = None
    details: Mapping[str, Any] | None = None


def append(db: Session | Transaction, action: str, *, namespace: str | None = None, device: str | None = None,
           subject: str | None = None, details: Mapping[str, Any] | None = None,
           actor: str | None = _FROM_CONTEXT) -> Record:
    """Append one entry in ``db``'s transaction (a Session or a store.Transaction); returns it as it will be stored.

    ``actor`` defaults to the one acting now (:data:`ACTOR`). Call it as the last statement of the transaction: the
    chain is locked from here to the commit, so nothing that may wait for another transaction's row lock should come
    after it (a Session's pending changes are flushed first for that reason)."""
    return append_all(db, [Event(action, namespace, device, subject, details)], actor=actor)[0]


def append_all(db: Session | Transaction, events: Sequence[Event], *,
               actor: str | None = _FROM_CONTEXT) -> list[Record]:
    """Append several entries in order with one turn of the lock, one head read and one INSERT (e.g. a registration's
    ``certificate.issued`` and ``registration.assigned``, or a batch of revocations)."""
    if not events:
        return []
    who = ACTOR.get() if actor is _FROM_CONTEXT else actor
    prepared = [_prepared(event, who) for event in events]
    # a Session's pending writes are flushed first: no row lock is waited for while holding the chain
    tx = joined(db)
    dialect = tx.dialect.name
    if dialect == "postgresql":
        tx.run(_TAKE_TURN_PG, hold=HOLD_LIMIT, space=_LOCK_SPACE)
    elif dialect == "sqlite":
        tx.run(_TAKE_TURN_SQLITE)
    head = tx.first(_HEAD)
    seq, prev = (int(head.seq), str(head.hash)) if head is not None else (0, GENESIS)
    # taken under the lock, so times follow the chain's order on one clock; a wall clock stepped back (NTP) shows as
    # a time going back, kept as it is: an entry says when it was made by the clock of the time (verify checks no
    # times), rather than the head's time repeated for the step's length
    now = datetime.now(UTC)
    records: list[Record] = []
    for action, actor_, namespace, device, subject, details in prepared:
        seq += 1
        digest = entry_hash(seq, now, action, actor_, namespace, device, subject, details, prev)
        records.append(Record(seq, now, action, actor_, namespace, device, subject, details, prev, digest))
        prev = digest
    if dialect == "postgresql":
        # one statement per entry (a registration's two), not psycopg's executemany: that runs in pipeline mode,
        # after which PostgreSQL never armed HOLD_LIMIT, so a process frozen between this and its commit held the
        # turn again for as long as it stayed frozen
        for record in records:
            tx.run(_INSERT, **_row(record))
    else:
        tx.many(_INSERT, [_row(r) for r in records])
    return records


def _prepared(event: Event, actor: str | None) -> tuple[str, str | None, str | None, str | None, str | None, str]:
    if not isinstance(event.action, str) or len(event.action) > 64 or not ACTION.fullmatch(event.action):
        raise ValueError(f"audit action {event.action!r} is not a dotted lower-case name like 'certificate.issued'")
    device = event.device.lower() if event.device is not None else None
    for name, value in (("actor", actor), ("namespace", event.namespace), ("device", device),
                        ("subject", event.subject)):
        if value is not None and (not isinstance(value, str) or len(value) > _LIMITS[name]):
            raise ValueError(f"audit {name} must be a string of at most {_LIMITS[name]} characters")
        if value is not None and _SECRET_VALUE.search(value):
            raise ValueError(f"audit {name} looks like a credential: entries never hold secrets")
    details = dict(event.details or {})
    _refuse_secrets(details, "details")
    encoded = canonical_json(details)
    if len(encoded) > MAX_DETAILS:
        raise ValueError(f"audit details of {event.action} are {len(encoded)} characters (at most {MAX_DETAILS})")
    return event.action, actor, event.namespace, device, event.subject, encoded


def _refuse_secrets(value: Any, where: str) -> None:
    if isinstance(value, Mapping):
        for name, member in value.items():
            if not isinstance(name, str):
                raise ValueError(f"audit {where} has a non-string member name {name!r}")
            if _SECRET_NAME.search(name):
                raise ValueError(f"audit {where}.{name}: entries never hold keys, tokens, PINs or other secrets")
            _refuse_secrets(member, f"{where}.{name}")
    elif isinstance(value, list | tuple | set | frozenset):
        for member in value:
            _refuse_secrets(member, where)
    elif isinstance(value, str) and _SECRET_VALUE.search(value):
        raise ValueError(f"audit {where} looks like a credential: entries never hold secrets")


def _row(record: Record) -> dict[str, Any]:
    return {"seq": record.seq, "created_at": record.created_at, "action": record.action, "actor": record.actor,
            "namespace": record.namespace, "device_id": record.device_id, "subject": record.subject,
            "details": record.details, "prev_hash": record.prev_hash, "hash": record.hash}


class UnreadableEntry(Exception):
    """An entry that cannot be read as an appender writes it (edited outside opendps): ``seq`` and ``why``."""

    def __init__(self, seq: int, why: str) -> None:
        super().__init__(f"audit entry {seq} cannot be read: {why} (edited outside opendps; 'opendps audit verify' "
                         "names the first bad entry)")
        self.seq, self.why = seq, why


_TEXT = ("action", "details", "prev_hash", "hash")
_OPTIONAL_TEXT = ("actor", "namespace", "device_id", "subject")


def _record(row: Row[Any]) -> Record:
    """A row as a Record; UnreadableEntry for a value of a type no appender writes (SQLite keeps whatever it is
    given: bytes or a number in a text column would fail the hash's encoder or the answer's model later)."""
    for name in (*_TEXT, *_OPTIONAL_TEXT):
        value = getattr(row, name)
        if not isinstance(value, str) and (value is not None or name in _TEXT):
            raise UnreadableEntry(int(row.seq), f"its {name} is {_shown(value)}, not text")
    return Record(int(row.seq), row.created_at, row.action, row.actor, row.namespace, row.device_id, row.subject,
                  row.details, row.prev_hash, row.hash)


def _shown(value: Any) -> str:
    return f"{type(value).__name__} {repr(value)[:40]}"


def _unreadable(exc: BaseException) -> str | None:
    """Why a row could not be loaded, when the row's value is the cause (not the database): a time no time type
    takes (SQLite text 'garbage' or a number: the DateTime processor; PostgreSQL 'infinity' or a year past 9999:
    psycopg's loader), or text that is no UTF-8 (sqlite3). None for anything else (e.g. the database is gone)."""
    driver = getattr(exc, "orig", None)
    if isinstance(exc, ValueError | TypeError | OverflowError | DataError):
        why = str(driver or exc)
    elif isinstance(exc, OperationalError) and "could not decode" in str(driver).lower():
        why = str(driver)
    else:
        return None
    return printable(" ".join(why.split()), 200)


def _records(store: Store, query: Select[Any]) -> tuple[list[Record], UnreadableEntry | None]:
    """The rows of ``query`` as Records in its order. A row that cannot be read fails the whole fetch, so then the
    rows are read one by one: the records before the first unreadable one, and that one's UnreadableEntry."""
    records: list[Record] = []
    try:
        with store.session() as s:
            rows = s.execute(query).all()
    except Exception as exc:
        if _unreadable(exc) is None:
            raise
    else:
        for row in rows:
            try:
                records.append(_record(row))
            except UnreadableEntry as exc:
                return records, exc
        return records, None
    with store.session() as s:
        seqs = list(s.scalars(query.with_only_columns(_TABLE.c.seq)))
    for seq in seqs:
        try:
            with store.session() as s:
                one = s.execute(select(_TABLE).where(_TABLE.c.seq == seq)).first()
            if one is not None:  # (deleted meanwhile)
                records.append(_record(one))
        except UnreadableEntry as exc:
            return records, exc
        except Exception as exc:
            why = _unreadable(exc)
            if why is None:
                raise
            return records, UnreadableEntry(seq, why)
    return records, None


class AuditLog:
    """Reading the log (newest first, filtered) and checking the whole chain."""

    MAX_TOP = 1000

    def __init__(self, store: Store) -> None:
        self.store = store

    def list(self, *, device_id: str | None = None, namespace: str | None = None, action: str | None = None,
             since: datetime | None = None, until: datetime | None = None, top: int = 100,
             before: int | None = None) -> list[Record]:
        """Entries newest first: of one device (registration id, any case), one namespace, one ``action`` or a
        family of them (``certificate`` matches ``certificate.issued`` and ``certificate.revoked``), at or after
        ``since`` and before ``until``, sequence numbers below ``before`` (the next page); at most ``top``
        (1-:attr:`MAX_TOP`). ValueError for a value out of range."""
        if not 1 <= top <= self.MAX_TOP:
            raise ValueError(f"top must be from 1 to {self.MAX_TOP}")
        q = select(_TABLE)
        if device_id is not None:
            q = q.where(_TABLE.c.device_id == device_id.lower())
        if namespace is not None:
            q = q.where(_TABLE.c.namespace == namespace)
        if action is not None:
            if not re.fullmatch(r"[a-z][a-z0-9.-]*", action):
                raise ValueError(f"action {action!r} is not an audit action name (e.g. certificate.issued)")
            q = q.where(or_(_TABLE.c.action == action, _TABLE.c.action.like(action.rstrip(".") + ".%")))
        if since is not None:
            q = q.where(_TABLE.c.created_at >= since)
        if until is not None:
            q = q.where(_TABLE.c.created_at < until)
        if before is not None:
            q = q.where(_TABLE.c.seq < before)
        records, unreadable = _records(self.store, q.order_by(_TABLE.c.seq.desc()).limit(top))
        if unreadable is not None:
            raise unreadable
        return records

    def verify(self, *, expect_head: tuple[int, str] | None = None, batch: int = 5000) -> Verification:
        """Recompute every entry's hash in sequence order, and check the links and that no sequence number is
        missing; stops at the first bad entry. ``expect_head`` = (seq, hash) an earlier check printed: that entry
        must still be there, unchanged (catches entries cut from the end, or a chain rewritten wholesale).

        Read in pages of ``batch`` entries by sequence number (a page per short transaction), so the log's size
        does not matter to memory; entries appended meanwhile are checked as well."""
        check = ChainCheck(expect_head)
        page = select(_TABLE).order_by(_TABLE.c.seq).limit(batch)
        query = page  # the first page from the lowest number, whatever it is: a row numbered 0 or less is listed too
        while True:
            records, unreadable = _records(self.store, query)
            for record in records:
                if not check.feed(record):
                    return check.result()
            if unreadable is not None:
                check.unreadable(unreadable.seq, unreadable.why)
                return check.result()
            if len(records) < batch:
                return check.result()
            query = page.where(_TABLE.c.seq > records[-1].seq)

    def head(self) -> tuple[int, str]:
        """(sequence number, hash) of the newest entry; (0, 64 zeros) while the log is empty."""
        with self.store.session() as s:
            row = s.execute(_HEAD).first()
        return (int(row.seq), str(row.hash)) if row is not None else (0, GENESIS)


__all__ = ["ACTOR", "AuditLog", "Event", "UnreadableEntry", "acting_as", "append", "append_all"]
