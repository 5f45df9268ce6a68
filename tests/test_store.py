"""The migrations build exactly the schema the models describe, on SQLite and PostgreSQL."""

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from tests.conftest import assert_uses_index

from opendps.store import Store, sqlite_url
from opendps.store.models import Base


def test_migrations_match_the_models(store):
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_hot_lookups_use_their_indexes(store):
    """The queries the store-scale benchmark found scanning 1M rows now use an index (SQLite's plan, or
    PostgreSQL's with sequential scans discouraged, since a tiny table would otherwise be scanned)."""
    from sqlalchemy import delete, func, select

    from opendps.store import Enrollment, Operation, Registration

    now = __import__("datetime").datetime.now(__import__("datetime").UTC)
    queries = {
        "ix_enrollments_kind_lower_id": select(Enrollment).where(Enrollment.kind == "individual",
                                                                 func.lower(Enrollment.enrollment_id) == "dev-1"),
        "ix_registrations_device_hub": select(Registration).where(Registration.assigned_hub == "hub.example",
                                                                  Registration.status == "assigned",
                                                                  Registration.device_id == "dev-1"),
        "ix_operations_created_at": delete(Operation).where(Operation.created_at < now),
    }
    assert_uses_index(store, queries)


def test_sqlite_synchronous_is_the_installations_choice(tmp_path):
    """Every pooled SQLite connection runs with the level asked for: normal (1, the default) or full (2)."""
    for level, code in ((None, 1), ("normal", 1), ("full", 2)):
        store = Store(sqlite_url(tmp_path / f"{level}.db"), **({"sqlite_synchronous": level} if level else {}))
        try:
            with store.engine.connect() as first, store.engine.connect() as second:
                assert [c.exec_driver_sql("PRAGMA synchronous").scalar() for c in (first, second)] == [code, code]
        finally:
            store.dispose()
    with pytest.raises(ValueError, match="is not one of normal, full"):
        Store(sqlite_url(tmp_path / "off.db"), sqlite_synchronous="off")


def test_sqlite_busy_timeout_is_the_installations_choice(tmp_path):
    """How long a write waits for another process's lock: 10 s unless asked otherwise, on every pooled connection."""
    for timeout, ms in ((None, 10000), (2.5, 2500)):
        store = Store(sqlite_url(tmp_path / f"{timeout}.db"), **({"sqlite_busy_timeout": timeout} if timeout else {}))
        try:
            with store.engine.connect() as first, store.engine.connect() as second:
                assert [c.exec_driver_sql("PRAGMA busy_timeout").scalar() for c in (first, second)] == [ms, ms]
        finally:
            store.dispose()
    with pytest.raises(ValueError, match="busy timeout 0 is out of range"):
        Store(sqlite_url(tmp_path / "zero.db"), sqlite_busy_timeout=0)


def test_unavailable_tells_a_database_away_from_a_wrong_statement(tmp_path):
    """What the front ends refuse as retryable (503, CONNACK 3): a connection lost, refused or cut by a server shutting
    down or starting up, SQLite locked past its busy timeout — not a statement's or the data's own error."""
    import sqlite3

    import psycopg
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError, OperationalError

    from opendps.store import unavailable

    def wrapped(orig: Exception, invalidated: bool = False) -> OperationalError:
        return OperationalError("SELECT 1", {}, orig, connection_invalidated=invalidated)

    away = [psycopg.OperationalError("connection failed: Connection refused"),
            wrapped(psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly")),
            wrapped(psycopg.errors.AdminShutdown("terminating connection due to administrator command")),
            wrapped(psycopg.errors.CannotConnectNow("the database system is starting up")),
            wrapped(psycopg.errors.SerializationFailure("x"), invalidated=True)]  # SQLAlchemy saw the connection die
    chained = RuntimeError("while storing")
    chained.__cause__ = away[1]
    for exc in [*away, chained]:
        assert unavailable(exc), exc
    wrong = [wrapped(psycopg.errors.SerializationFailure("could not serialize")),
             wrapped(psycopg.errors.DeadlockDetected("deadlock")), wrapped(psycopg.errors.QueryCanceled("timeout")),
             IntegrityError("INSERT", {}, psycopg.errors.UniqueViolation("duplicate")), ValueError("no")]
    for exc in wrong:
        assert not unavailable(exc), exc

    # every pooled connection in use past the pool's timeout; SQLite unable to open the file for now (a process out
    # of descriptors opening a new pooled connection)
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    cantopen = sqlite3.OperationalError("unable to open database file")
    cantopen.sqlite_errorcode = sqlite3.SQLITE_CANTOPEN
    for exc in (PoolTimeout("QueuePool limit of size 10 overflow 10 reached"), wrapped(cantopen)):
        assert unavailable(exc), exc

    # SQLite: a writer holding the file past the busy timeout
    store = Store(sqlite_url(tmp_path / "locked.db"))
    holder = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
    try:
        with store.session() as s:
            s.execute(text("CREATE TABLE t (x INTEGER)"))
        holder.execute("BEGIN IMMEDIATE")
        with store.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA busy_timeout=1")
            with pytest.raises(OperationalError) as caught:
                conn.exec_driver_sql("INSERT INTO t VALUES (1)")
        assert unavailable(caught.value)
    finally:
        holder.close()
        store.dispose()


@pytest.mark.timeout(60)  # without the timeouts it hangs: fail in a minute, not at the suite's 15
def test_postgresql_connections_give_up_on_a_database_that_stops_answering(monkeypatch):
    """A database host that accepts and then says nothing (down behind a load balancer, a partition) held a domain
    thread for as long as the kernel liked (a connect waits for the server's first message without end); libpq's
    connect timeout, keepalives and TCP user timeout are now set unless the URL sets them, on the store's engine and
    on the live-message bus's connections alike, and the failure is one the front ends refuse as retryable."""
    import socket
    import threading
    import time

    from sqlalchemy import text

    from opendps import store as store_module
    from opendps.cluster.bus import psycopg_conninfo
    from opendps.store import PG_CONNECTION_DEFAULTS, unavailable, with_connection_defaults

    url = with_connection_defaults("postgresql+psycopg://postgres:s%40cret@127.0.0.1:5432/test?connect_timeout=3")
    assert url.query["connect_timeout"] == "3" and url.password == "s@cret"  # the operator's value wins, kept whole
    assert {k: url.query[k] for k in PG_CONNECTION_DEFAULTS if k != "connect_timeout"} == {
        k: v for k, v in PG_CONNECTION_DEFAULTS.items() if k != "connect_timeout"}
    assert "connect_timeout=10" in psycopg_conninfo("postgresql+psycopg://postgres@127.0.0.1:5432/test")
    assert "tcp_user_timeout=30000" in psycopg_conninfo("postgresql+psycopg://postgres@127.0.0.1:5432/test")
    assert str(with_connection_defaults("sqlite:////tmp/x.db")) == "sqlite:////tmp/x.db"

    silent = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(silent.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.setitem(store_module.PG_CONNECTION_DEFAULTS, "connect_timeout", "1")  # the default, made short
    store = Store(f"postgresql+psycopg://postgres@127.0.0.1:{silent.getsockname()[1]}/test")
    try:
        started = time.monotonic()
        with pytest.raises(Exception) as caught, store.session() as s:
            s.execute(text("SELECT 1"))
        assert time.monotonic() - started < 10  # without a connect timeout: never
        assert unavailable(caught.value)
        assert held  # it did connect: the server said nothing
    finally:
        store.engine.dispose()
        silent.close()
        for sock in held:
            sock.close()


def test_a_pooled_connection_lost_in_an_outage_is_one_warning_line_not_a_traceback(tmp_path, caplog):
    """SQLAlchemy's pool logs a connection that died while checked out ("Exception during reset or similar") at
    ERROR with a whole traceback, once per connection of the pool, each time the database restarts; the domain runner
    already tells the outage once. Now such a line is one WARNING naming the driver's error; other pool errors are
    left as they are."""
    import logging
    import time

    from sqlalchemy import text
    from tests.conftest import database

    with database("postgresql", tmp_path) as url:
        store = Store(url)
        try:
            raw = store.engine.raw_connection()
            cursor = raw.cursor()
            cursor.execute("SELECT pg_backend_pid()")
            pid = cursor.fetchone()[0]
            with store.engine.connect() as other:
                other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
                other.commit()
            time.sleep(0.2)
            with caplog.at_level(logging.INFO, logger="sqlalchemy.pool"):
                raw.close()  # returned to the pool: its reset fails on the dead connection
        finally:
            store.engine.dispose()
    lines = [r for r in caplog.records if r.name.startswith("sqlalchemy.pool") and r.levelno >= logging.WARNING]
    assert [(r.levelname, r.getMessage()) for r in lines] == [
        ("WARNING", "Exception during reset or similar: AdminShutdown: terminating connection due to administrator "
                    "command")]
    assert all(r.exc_info is None and not r.exc_text for r in lines)

    other_error = logging.LogRecord("sqlalchemy.pool.impl.QueuePool", logging.ERROR, __file__, 1, "boom", None,
                                    (ValueError, ValueError("not an outage"), None))
    logging.getLogger("sqlalchemy.pool.impl.QueuePool").filter(other_error)
    assert other_error.levelno == logging.ERROR and other_error.exc_info is not None


def test_a_full_disk_is_a_retryable_refusal_not_a_wrong_statement(tmp_path):
    """SQLite's FULL (ENOSPC) and IOERR (EFBIG past a file-size limit, EIO) and PostgreSQL's class 53 (53100 disk_full)
    say the database cannot store for now, not that the request is wrong: refused as retryable (503, CONNACK 3) like
    an outage, not a 500 and a traceback per request. FULL is made for real by ``PRAGMA max_page_count`` (the same
    result code SQLite returns when a write finds no room on the disk); IOERR as SQLite reports a failed write."""
    import sqlite3

    import psycopg
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from opendps.store import short_of_room, unavailable

    store = Store(sqlite_url(tmp_path / "full.db"))
    try:
        with store.session() as s:
            s.execute(text("CREATE TABLE t (x BLOB)"))
        with store.engine.connect() as conn:
            pages = conn.exec_driver_sql("PRAGMA page_count").scalar()
            conn.exec_driver_sql(f"PRAGMA max_page_count={pages}")
            with pytest.raises(OperationalError) as caught:
                conn.exec_driver_sql("INSERT INTO t VALUES (zeroblob(100000))")
        assert "full" in str(caught.value) and unavailable(caught.value) and short_of_room(caught.value)
    finally:
        store.dispose()

    io_error = sqlite3.OperationalError("disk I/O error")
    io_error.sqlite_errorcode = 778  # SQLITE_IOERR_WRITE
    disk_full = psycopg.errors.DiskFull("could not extend file: No space left on device")
    for exc in (OperationalError("COMMIT", {}, io_error), OperationalError("INSERT", {}, disk_full)):
        assert unavailable(exc) and short_of_room(exc), exc
    locked = sqlite3.OperationalError("database is locked")
    locked.sqlite_errorcode = sqlite3.SQLITE_BUSY
    lost = psycopg.OperationalError("server closed the connection unexpectedly")
    for exc in (OperationalError("INSERT", {}, locked), lost):  # away, not short of room: a read shows it is back
        assert unavailable(exc) and not short_of_room(exc), exc


def test_a_migration_that_fails_part_way_leaves_the_schema_as_it_was(tmp_path):
    """An upgrade is one transaction on SQLite too: pysqlite committed each CREATE TABLE at once, so an upgrade that
    ran out of room part-way (``opendps init`` or ``db upgrade`` on a full disk) left tables without their version,
    and every later upgrade failed on "table ... already exists" even once there was room again."""
    from sqlalchemy import event, inspect
    from sqlalchemy.exc import OperationalError

    store = Store(sqlite_url(tmp_path / "upgrade.db"))

    def little_room(dbapi_conn, _record) -> None:
        dbapi_conn.execute("PRAGMA max_page_count=12")  # room for a few tables of the first migration, not all

    event.listen(store.engine, "connect", little_room)
    try:
        with pytest.raises(OperationalError, match="full"):
            store.upgrade()
        event.remove(store.engine, "connect", little_room)
        store.engine.dispose()
        with store.engine.connect() as conn:
            assert inspect(conn).get_table_names() == []  # nothing of the failed upgrade stayed
        store.upgrade()  # with room again, the upgrade runs whole
        assert store.current_revision() is not None
        with store.engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        store.dispose()


def test_after_commit_runs_once_its_transaction_commits_and_never_after_a_rollback(tmp_path):
    from sqlalchemy import text

    from opendps.store import after_commit

    store = Store(sqlite_url(tmp_path / "a.db"))
    ran: list[str] = []
    with store.session() as s:
        after_commit(s, lambda: ran.append("committed"))
        with s.begin_nested():  # a savepoint ending is not the transaction's end
            s.execute(text("SELECT 1"))
        assert ran == []
    assert ran == ["committed"]
    with pytest.raises(RuntimeError), store.session() as s:
        after_commit(s, lambda: ran.append("rolled back"))
        raise RuntimeError("the transaction fails")
    with store.session() as s:  # nothing left over from the rolled-back one
        s.execute(text("SELECT 1"))
    assert ran == ["committed"]
    store.dispose()
