"""The one persistence layer: SQLAlchemy 2 models and Alembic migrations.

SQLite (WAL) is the embedded default; PostgreSQL is chosen by URL for several nodes. Domain code
is synchronous and uses :meth:`Store.session`; async front ends run it in a thread pool.

Configuration caching: every change to a row of :data:`CONFIG_MODELS` (enrollments, policies, CAs, hubs...)
bumps one counter in the same transaction — by a session hook, so no write path can forget it, ORM or bulk.
:class:`ConfigCache` keeps values derived from those rows while the counter a request reads is unchanged: a
change made on any node is seen by the next request on every node, for the price of reading one row.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

from sqlalchemy import Table, create_engine, event, text, update
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import DBAPIError, DisconnectionError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry, NullPool, QueuePool, SingletonThreadPool, StaticPool
from sqlalchemy.sql import ClauseElement

from opendps.store.models import (
    CONFIG_MODELS,
    AccessPolicy,
    Base,
    CertificateAuthority,
    CloudToDeviceMessage,
    ClusterNode,
    ConfigGeneration,
    DeviceRecord,
    DpsCertificate,
    Enrollment,
    HubCertificate,
    HubConnection,
    HubDevice,
    InstanceSetting,
    IssuedCertificate,
    LinkedHub,
    LiveMessage,
    Namespace,
    Operation,
    Policy,
    ProvenCaCertificate,
    Registration,
    TelemetryEvent,
    TelemetryRoute,
    WrappedKey,
)
from opendps.store.prepared import Prepared, Transaction
from opendps.store.prepared import prepared as _compiled_once

__all__ = [
    "conflicted",
    "AccessPolicy",
    "Base",
    "CertificateAuthority",
    "CloudToDeviceMessage",
    "ClusterNode",
    "ConfigCache",
    "ConfigGeneration",
    "DeviceRecord",
    "DpsCertificate",
    "Enrollment",
    "HubCertificate",
    "HubConnection",
    "HubDevice",
    "InstanceSetting",
    "IssuedCertificate",
    "LinkedHub",
    "LiveMessage",
    "Namespace",
    "Operation",
    "Policy",
    "Prepared",
    "ProvenCaCertificate",
    "Registration",
    "Store",
    "TelemetryEvent",
    "TelemetryRoute",
    "Transaction",
    "WrappedKey",
    "add_setting",
    "after_commit",
    "count_change_first",
    "driver_message",
    "joined",
    "lock_row",
    "short_of_room",
    "sqlite_url",
    "table_of",
    "unavailable",
    "with_connection_defaults",
]

MIGRATIONS = Path(__file__).parent / "migrations"


def table_of(model: type[Base]) -> Table:
    """A model's table, for the hot paths that write with SQL statements instead of the ORM's unit of work."""
    return cast(Table, model.__table__)


def sqlite_url(path: Path) -> str:
    return f"sqlite+pysqlite:///{path}"


#: how long a pooled PostgreSQL connection may have sat unused and still be handed out without a ping (HikariCP's
#: aliveBypassWindowMs): under load a connection is back in use within milliseconds, and a round trip to check it on
#: every checkout (``pool_pre_ping``) was about a tenth of a registration's or a CONNECT's time in the database
PING_IDLE_AFTER = 0.5
_IDLE_SINCE = "opendps.idle_since"


class _PingWhenIdle:
    """``pool_pre_ping`` without its round trip on every checkout: a connection is pinged when it has sat in the pool
    for :data:`PING_IDLE_AFTER` seconds, or since a connection was found broken (:meth:`broken`: a server restart
    breaks them all); a failed ping discards it and the pool hands out another (SQLAlchemy retries the checkout). A
    connection that broke within the window fails its first statement: that request is a retryable refusal
    (:func:`unavailable`), and SQLAlchemy (for Sessions) or :meth:`broken` (for driver transactions) makes every older
    connection pinged before its next use."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.broken_at = 0.0
        event.listen(engine, "checkin", self._checkin)
        event.listen(engine, "checkout", self._checkout)

    def broken(self) -> None:
        self.broken_at = time.monotonic()

    @staticmethod
    def _checkin(_dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    def _checkout(self, dbapi_conn: DBAPIConnection, record: ConnectionPoolEntry, _proxy: Any) -> None:
        since = record.info.pop(_IDLE_SINCE, None)
        if since is None or (since > self.broken_at and time.monotonic() - since < PING_IDLE_AFTER):
            return  # a connection just made, or used a moment ago
        try:
            self.engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # any failure: this connection is not to be used
            raise DisconnectionError(f"a pooled connection failed its ping: {exc}") from exc


#: SQLite's ``synchronous`` levels an installation may choose (WAL mode): ``normal`` syncs the WAL at checkpoints, so
#: a commit survives the process dying but not a power cut or an OS crash; ``full`` syncs it at every commit
SQLITE_SYNCHRONOUS = ("normal", "full")


#: seconds a SQLite writer waits for another process's write lock (a backup, the sqlite3 shell, another opendps
#: command) before its call fails as a store outage (a device is answered 503 with Retry-After)
SQLITE_BUSY_TIMEOUT = 10.0


def _sqlite_pragmas(synchronous: str, busy_timeout: float) -> Callable[[DBAPIConnection, ConnectionPoolEntry], None]:
    def on_connect(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={round(busy_timeout * 1000)}")
        cur.execute(f"PRAGMA synchronous={synchronous.upper()}")
        cur.close()
    return on_connect


_CONFIG_TABLES = frozenset(model.__table__.name for model in CONFIG_MODELS)  # type: ignore[attr-defined]
_BUMPED = "opendps.config_bumped"
_GENERATION_SQL = "SELECT value FROM config_generation WHERE id = 1"  # read on every registration and poll
_GENERATION: ContextVar[int | None] = ContextVar("opendps_config_generation", default=None)
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def _bump(session: Session) -> None:
    """Count a configuration change, once per transaction, inside it (rolled back with it)."""
    if session.info.get(_BUMPED):
        return
    session.info[_BUMPED] = True
    session.execute(update(ConfigGeneration).where(ConfigGeneration.id == 1).values(value=ConfigGeneration.value + 1))


def _bump_on_flush(session: Session, _context: Any, _instances: Any) -> None:
    if any(type(o) in CONFIG_MODELS for o in (*session.new, *session.dirty, *session.deleted)):
        _bump(session)


def _bump_on_bulk(state: ORMExecuteState) -> None:
    """``update(Policy)`` / ``delete(CertificateAuthority)`` statements bypass the flush."""
    if (state.is_update or state.is_delete) and getattr(state.statement, "table", None) is not None \
            and state.statement.table.name in _CONFIG_TABLES:  # type: ignore[attr-defined]
        _bump(state.session)


def _transaction_ended(session: Session, _transaction: Any) -> None:
    session.info.pop(_BUMPED, None)


_AFTER_COMMIT = "opendps.after_commit"
_log = logging.getLogger("opendps.store")


def after_commit(session: Session, action: Callable[[], None]) -> None:
    """Run ``action`` once the :meth:`Store.session` holding ``session`` has committed, never if it rolls back. Why:
    a log line saying something happened ("certificate ... issued") was written inside the transaction, so also for
    one whose commit then failed (a full disk) and that left nothing behind."""
    session.info.setdefault(_AFTER_COMMIT, []).append(action)


def joined(db: Session | Transaction) -> Transaction:
    """``db``'s transaction as a :class:`Transaction`: its driver cursor, for the domain functions hot paths run on
    one (a Session's pending changes are flushed first, so statements stay in the order they were made)."""
    if isinstance(db, Transaction):
        return db
    db.flush()
    conn = db.connection()
    return Transaction(conn.connection.cursor(), conn.dialect, lambda action: after_commit(db, action))


# PostgreSQL SQLSTATEs that mean "the server is not there for now": class 08 (connection exception), and the server
# shutting down (57P01 admin_shutdown, 57P02 crash_shutdown) or starting up (57P03 cannot_connect_now)
_PG_AWAY = ("57P01", "57P02", "57P03")
_PG_CONFLICT = ("40P01", "40001")  # deadlock_detected, serialization_failure: run the transaction again
# ... or "it cannot take this for now": class 53, insufficient resources (53100 disk_full, 53200 out_of_memory, 53300
# too_many_connections)
_PG_SHORT = "53"
# SQLite's primary result codes for "the file is locked past the busy timeout" (BUSY, LOCKED) and for "its disk is
# full or fails a write" (FULL: ENOSPC; IOERR: any other failed write, e.g. EFBIG past a file-size limit, or EIO): the
# statement is fine and the same request succeeds once the lock or the room is there again
_SQLITE_LOCKED = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED,
                  # ... and "the file cannot be opened": a process out of descriptors opening a new pooled connection
                  # to the file it opened at start (it is there; the descriptors are not, for now)
                  sqlite3.SQLITE_CANTOPEN)
_SQLITE_SHORT = (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR)

# libpq settings for a database that stops answering rather than refusing (its host down, a network partition):
# without them a connect waits for the kernel (~2 min) and a statement sent to a dead server for TCP's retransmissions
# (~15 min), each holding a domain thread; with them such a call fails in seconds and is refused as retryable
# (:func:`unavailable`). ``tcp_user_timeout`` bounds data the server does not acknowledge, not a slow query.
PG_CONNECTION_DEFAULTS = {"connect_timeout": "10", "keepalives": "1", "keepalives_idle": "30",
                          "keepalives_interval": "10", "keepalives_count": "3", "tcp_user_timeout": "30000"}


def with_connection_defaults(url: str | URL) -> URL:
    """``url`` with :data:`PG_CONNECTION_DEFAULTS` for what its query does not set (PostgreSQL only; the operator's
    own values win)."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("postgresql"):
        return parsed
    missing = {k: v for k, v in PG_CONNECTION_DEFAULTS.items() if k not in parsed.query}
    return parsed.update_query_dict(missing) if missing else parsed


def unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) says the database cannot be reached for now — a lost or refused
    connection, a server shutting down or starting up, SQLite's file locked past the busy timeout — or cannot store
    for now (:func:`short_of_room`) rather than that the statement or the data is wrong: the caller may retry the same
    request later (a transaction that failed wrote nothing).

    Why here: only the store knows its drivers' errors; the front ends map this to one retryable refusal (HTTP 503,
    CONNACK 3) instead of a 500 and a traceback per request."""
    return any(invalidated or _driver_unavailable(driver) for invalidated, driver in _driver_errors(exc))


def conflicted(exc: BaseException) -> bool:
    """Whether ``exc`` says the database aborted the transaction in a conflict with a concurrent one — PostgreSQL's
    ``deadlock_detected`` (40P01) or ``serialization_failure`` (40001) —: it wrote nothing, and the same transaction
    may run again at once. Not an outage: the database answers."""
    return any(driver is not None and type(driver).__module__.startswith("psycopg")
               and getattr(driver, "sqlstate", None) in _PG_CONFLICT for _, driver in _driver_errors(exc))


def short_of_room(exc: BaseException) -> bool:
    """Whether ``exc`` says the database cannot store for now — its disk is full or fails writes (SQLite's FULL and
    IOERR, PostgreSQL's class 53, insufficient resources) — while it may still answer reads: one of
    :func:`unavailable`'s outages, which a read that succeeds does not show to be over."""
    return any(driver is not None and _driver_short(driver) for _, driver in _driver_errors(exc))


def _driver_errors(exc: BaseException) -> Iterator[tuple[bool, BaseException | None]]:
    """(whether SQLAlchemy saw the connection die, the driver's own error) for ``exc`` and what it was raised from."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        seen += 1
        if isinstance(current, DBAPIError):
            yield current.connection_invalidated, current.orig
        else:
            yield False, current
        current = current.__cause__ or current.__context__


def _driver_unavailable(exc: BaseException | None) -> bool:
    if exc is None:
        return False
    if isinstance(exc, PoolTimeout):  # every pooled connection in use past the pool's timeout: busy for now
        return True
    if isinstance(exc, sqlite3.OperationalError):
        return getattr(exc, "sqlite_errorcode", 0) & 0xFF in _SQLITE_LOCKED or _driver_short(exc)
    if not type(exc).__module__.startswith("psycopg"):
        return False
    state = getattr(exc, "sqlstate", None)
    if state is None:  # libpq's own: the connection failed, timed out or was lost (no server message, no SQLSTATE)
        return any(c.__name__ in ("OperationalError", "InterfaceError") for c in type(exc).__mro__)
    return state.startswith("08") or state in _PG_AWAY or _driver_short(exc)


def _driver_short(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.OperationalError):
        return getattr(exc, "sqlite_errorcode", 0) & 0xFF in _SQLITE_SHORT
    state = getattr(exc, "sqlstate", None) if type(exc).__module__.startswith("psycopg") else None
    return isinstance(state, str) and state.startswith(_PG_SHORT)


def driver_message(exc: BaseException) -> str:
    """The driver's own error, first line, with its type (SQLAlchemy's wrapper adds the statement, its parameters and
    a link): what a log line about an outage names."""
    inner = getattr(exc, "orig", None) or exc
    text = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {text[0] if text else ''}"[:300]


class _PoolOutageLines(logging.Filter):
    """SQLAlchemy's pool logs a connection that died in use ("Exception during reset or similar") at ERROR with a
    traceback, one per connection of the pool: during a database outage (:func:`unavailable`) that is the outage the
    domain runner already tells once, so such a line is kept as one WARNING line without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and unavailable(exc):
            record.msg = f"{record.getMessage()}: {driver_message(exc)}"
            record.args = None
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_POOL_OUTAGE_LINES = _PoolOutageLines()
for _pool in (QueuePool, NullPool, SingletonThreadPool, StaticPool):  # a logger's filter does not see its children's
    logging.getLogger(f"{_pool.__module__}.{_pool.__name__}").addFilter(_POOL_OUTAGE_LINES)


def lock_row(session: Session, row: Any, etag: str, *, expected: str | None = None) -> bool:
    """Give ``row`` (a model with an ``etag``, read in ``session``) the new ``etag`` and hold it until the
    transaction ends (SQLite's write lock, PostgreSQL's row lock), then read it again as it is now; ``expected``: only
    while its etag is still that one (an ``If-Match``). False: the row is gone or its etag moved on; nothing written.

    Why: a session's reads run before its transaction begins on SQLite (pysqlite opens it at the first write) and
    each at its own snapshot on PostgreSQL (READ COMMITTED), so two writers that read a row, then change it, both
    write: the last one wins and the other's change is lost (two If-Match writers with one etag both succeeding).
    Taking the row first makes a read-modify-write take turns."""
    model = type(row)
    mapper = sa_inspect(model)
    where = [column == value for column, value in zip(mapper.primary_key, mapper.primary_key_from_instance(row),
                                                      strict=True)]
    if expected is not None:
        where.append(model.etag == expected)
    done = session.execute(update(model).where(*where).values(etag=etag).execution_options(synchronize_session=False))
    if cast(Any, done).rowcount != 1:
        return False
    session.refresh(row)
    return True


def count_change_first(session: Session) -> None:
    """Count this transaction's configuration change now, before its reads: the counter's one row is then held to the
    commit (SQLite's write lock, PostgreSQL's row lock), so configuration changes that do this take turns with every
    other, and what they read is what the last one committed — a check-then-insert that no constraint backs (a name
    unique ignoring case) cannot insert twice."""
    _bump(session)


def add_setting(session: Session, name: str, value: str) -> None:
    """Add an instance setting inside a caller's transaction (with the rows it describes)."""
    session.add(InstanceSetting(name=name, value=value))


class Store:
    """Engine + session factory for one database URL."""

    def __init__(self, url: str, *, echo: bool = False, sqlite_synchronous: str = "normal",
                 sqlite_busy_timeout: float = SQLITE_BUSY_TIMEOUT) -> None:
        """``sqlite_synchronous``: one of :data:`SQLITE_SYNCHRONOUS`; ``sqlite_busy_timeout``: see
        :data:`SQLITE_BUSY_TIMEOUT` (SQLite only)."""
        if sqlite_synchronous not in SQLITE_SYNCHRONOUS:
            raise ValueError(f"SQLite synchronous {sqlite_synchronous!r} is not one of {', '.join(SQLITE_SYNCHRONOUS)}")
        if not 0 < sqlite_busy_timeout <= 3600:
            raise ValueError(f"SQLite busy timeout {sqlite_busy_timeout!r} is out of range (0, 3600] seconds")
        self.url = url
        # hide_parameters: a database error names its statement but not the values bound to it (a route or webhook
        # URL with its password, telemetry, a wrapped key), which tracebacks and log lines would carry
        kwargs: dict[str, Any] = {"echo": echo, "future": True, "hide_parameters": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": sqlite_busy_timeout}
        else:
            kwargs["pool_size"] = 10
        self.engine: Engine = create_engine(with_connection_defaults(url), **kwargs)
        self._pings: _PingWhenIdle | None = None
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas(sqlite_synchronous, sqlite_busy_timeout))
        else:
            self._pings = _PingWhenIdle(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        event.listen(self._sessions, "before_flush", _bump_on_flush)
        event.listen(self._sessions, "do_orm_execute", _bump_on_bulk)
        event.listen(self._sessions, "after_transaction_end", _transaction_ended)

    def config_generation(self, on: Session | DBAPIConnection | None = None) -> int:
        """The configuration counter: as read once for the current request inside :meth:`config_snapshot`, else
        read now (on the connection of ``on``, a session or a :meth:`driver_transaction`'s, when given, else on one
        of its own)."""
        memo = _GENERATION.get()
        if memo is not None:
            return memo
        # the driver directly: ~10 us instead of ~110 us through Core
        if on is None:
            with self.autocommitted() as conn:  # one round trip on PostgreSQL; a broken connection is not pooled again
                return self._read_generation(conn)
        return self._read_generation(on.connection().connection if isinstance(on, Session) else on)

    @staticmethod
    def _read_generation(conn: Any) -> int:
        cursor = conn.cursor()
        try:
            cursor.execute(_GENERATION_SQL)
            row = cursor.fetchone()
        finally:
            cursor.close()
        return int(row[0]) if row else 0

    @contextmanager
    def config_snapshot(self, on: Session | DBAPIConnection | None = None) -> Iterator[int]:
        """Read the counter once for a whole request (a registration makes several cached lookups); with ``on`` (a
        session or a driver transaction's connection), on its connection (a CONNECT: one pool checkout, on
        PostgreSQL one ping, instead of two)."""
        if _GENERATION.get() is not None:
            yield self.config_generation()
            return
        token = _GENERATION.set(self.config_generation(on))
        try:
            yield self.config_generation()
        finally:
            _GENERATION.reset(token)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: commits on success, rolls back on any exception."""
        s = self._sessions()
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            actions = s.info.pop(_AFTER_COMMIT, ())
            s.close()
        _run_after_commit(actions)

    @contextmanager
    def autocommitted(self) -> Iterator[DBAPIConnection]:
        """A pooled connection of the driver whose statements each commit on their own: on PostgreSQL in autocommit,
        so no BEGIN and COMMIT round trips around them (two of a hub CONNECT's six); elsewhere a
        :meth:`driver_transaction`. For reads that need no snapshot across statements — in READ COMMITTED each
        statement sees what committed before it, inside a transaction or not — and single-statement writes."""
        if self.dialect != "postgresql":
            with self.driver_transaction() as conn:
                yield conn
            return
        conn = self.engine.raw_connection()
        driver = cast(Any, conn.driver_connection)
        try:
            driver.autocommit = True
            yield conn
            driver.autocommit = False  # as the pool hands connections out
        except BaseException:
            try:
                driver.autocommit = False
            except Exception:  # noqa: BLE001 - the connection is broken (the server went away)
                self._discard(conn)
            raise
        finally:
            conn.close()

    @contextmanager
    def driver_transaction(self) -> Iterator[DBAPIConnection]:
        """One transaction on a pooled connection of the driver itself (sqlite3, psycopg): committed on success,
        rolled back on any exception, the connection back in the pool either way.

        Why: for a statement whose rows the caller has already built (a telemetry batch), a Session around it is
        ~0.2 ms of SQLAlchemy per transaction: at 30 messages a batch, more than SQLite's own cost of storing them."""
        conn = self.engine.raw_connection()
        try:
            yield conn
            conn.commit()
        except BaseException:
            try:
                conn.rollback()
            except Exception:  # noqa: BLE001 - the connection is broken (the server went away)
                self._discard(conn)
            raise
        finally:
            conn.close()

    def _discard(self, conn: Any) -> None:
        """A connection found broken: not back to the pool; the others may be too, so each is pinged before its next
        use (PostgreSQL)."""
        conn.invalidate()
        if self._pings is not None:
            self._pings.broken()

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """A :meth:`driver_transaction` as a :class:`Transaction` (prepared statements on its cursor), whose
        after-commit actions run once it has committed: the registration's write transaction."""
        actions: list[Callable[[], None]] = []
        with self.driver_transaction() as conn:
            cursor = conn.cursor()
            try:
                yield Transaction(cursor, self.engine.dialect, actions.append)
            finally:
                cursor.close()
        _run_after_commit(actions)

    def prepare(self, statement: ClauseElement) -> Prepared:
        """``statement`` compiled for this store's dialect (once: :func:`opendps.store.prepared.prepared`), to run on a
        :meth:`driver_transaction`'s cursor: for the few fixed statements a hot path runs on every call."""
        return _compiled_once(statement, self.engine.dialect)

    # ---- instance settings: facts of the installation every node shares (ID scope, key check value...) ----
    def setting(self, name: str) -> str | None:
        with self.session() as s:
            row = s.get(InstanceSetting, name)
            return row.value if row else None

    def set_setting_if_absent(self, name: str, value: str) -> str:
        """Insert-if-missing; a concurrent node may win, so the stored value is returned."""
        try:
            with self.session() as s:
                if s.get(InstanceSetting, name) is None:
                    add_setting(s, name, value)
        except IntegrityError:
            pass  # another node stored it first
        stored = self.setting(name)
        assert stored is not None
        return stored

    def put_setting(self, name: str, value: str) -> None:
        """Insert or replace an instance setting (the installation's choices an operator may change)."""
        with self.session() as s:
            row = s.get(InstanceSetting, name)
            if row is None:
                add_setting(s, name, value)
            else:
                row.value = value

    def upgrade(self, revision: str = "head") -> None:
        """Apply Alembic migrations up to ``revision``, all in one transaction: a failure part-way (a full disk, an
        interrupted upgrade) leaves the schema as it was, and the next upgrade starts again from there.

        Why the SQLite case: pysqlite begins a transaction only before an INSERT/UPDATE/DELETE, so every CREATE, ALTER
        and DROP committed at once; a migration that failed part-way left tables behind without its version, and
        every later upgrade stopped at "table ... already exists". Here the driver is told to leave transactions to
        us and the transaction is begun by hand, so SQLite's transactional DDL covers the whole upgrade."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        if self.dialect != "sqlite":
            with self.engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
            return
        with self.engine.connect() as conn:
            driver = cast(sqlite3.Connection, conn.connection.driver_connection)
            driver.isolation_level = None  # no implicit BEGIN/COMMIT around statements: ours covers them all
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock first: no other writer between our steps
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
                conn.commit()  # sqlite3 commits what BEGIN opened even without an isolation level
            except BaseException:
                conn.rollback()
                raise
            finally:
                conn.invalidate()  # not back to the pool with the changed isolation level

    def current_revision(self) -> str | None:
        with self.engine.connect() as conn:
            try:
                return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            except Exception:  # noqa: BLE001 - table missing: never migrated
                return None

    def dispose(self) -> None:
        self.engine.dispose()


def _run_after_commit(actions: Iterable[Callable[[], None]]) -> None:
    for action in actions:  # committed (see after_commit)
        try:
            action()
        except Exception:  # noqa: BLE001 - committed: an action's failure must not look like the commit's
            _log.exception("after a commit")


class ConfigCache(Generic[K, V]):
    """Values derived from configuration rows (parsed certificates, unwrapped keys, enrollment views), kept while
    :meth:`Store.config_generation` is unchanged; bounded, least recently used first out; thread-safe.

    The counter is read before the value is loaded, so a change landing in between only costs a reload.
    """

    def __init__(self, store: Store, capacity: int = 10_000) -> None:
        self.store = store
        self.capacity = capacity
        self._entries: OrderedDict[K, tuple[int, V]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K, load: Callable[[], V]) -> V:
        generation = self.store.config_generation()
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit[0] == generation:
                self._entries.move_to_end(key)
                return hit[1]
        value = load()
        with self._lock:
            self._entries[key] = (generation, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._entries)
