"""PostgreSQL pool connections are pinged when they sat idle, not on every checkout (opendps.store._PingWhenIdle).

Why a test of its own: the ping round trip on every checkout was about a tenth of a registration's or a CONNECT's
time in the database, and leaving it out must not let a connection the server dropped fail requests once the
pool has had a chance to notice. Real PostgreSQL: its backends are terminated with pg_terminate_backend.
"""

from __future__ import annotations

import time

import pytest
from tests.conftest import _pg_admin

from opendps import store as store_module
from opendps.store import Store, unavailable


def _pings(monkeypatch, store: Store) -> list[object]:
    seen: list[object] = []
    real = store.engine.dialect.do_ping

    def counted(dbapi_conn):
        seen.append(dbapi_conn)
        return real(dbapi_conn)

    monkeypatch.setattr(store.engine.dialect, "do_ping", counted)
    return seen


def _backend(store: Store) -> int:
    with store.driver_transaction() as conn:
        cursor = conn.cursor()
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


def _terminate(pid: int) -> None:
    admin = _pg_admin()
    try:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    finally:
        admin.close()
    time.sleep(0.2)  # the backend is gone once the server has handled the signal


def test_a_connection_used_a_moment_ago_is_not_pinged_and_an_idle_one_is(pg_store, monkeypatch):
    pings = _pings(monkeypatch, pg_store)
    monkeypatch.setattr(store_module, "PING_IDLE_AFTER", 60.0)
    for _ in range(5):
        pg_store.config_generation()
    assert pings == []  # under load: no round trip before each use
    monkeypatch.setattr(store_module, "PING_IDLE_AFTER", 0.0)
    pg_store.config_generation()
    assert len(pings) == 1


def test_a_connection_the_server_dropped_while_idle_is_replaced_without_a_failed_request(pg_store, monkeypatch):
    monkeypatch.setattr(store_module, "PING_IDLE_AFTER", 0.0)  # every pooled connection counts as idle
    _terminate(_backend(pg_store))
    assert pg_store.config_generation() >= 0  # the ping found it dead; the pool handed out a new one
    with pg_store.session() as s:  # the ORM path too
        assert s.connection().exec_driver_sql("SELECT 1").scalar() == 1


def _read_in_autocommit(store: Store) -> None:
    with store.autocommitted() as conn:
        conn.cursor().execute("SELECT 1")


def _read_in_transaction(store: Store) -> None:
    with store.driver_transaction() as conn:
        conn.cursor().execute("SELECT 1")


@pytest.mark.parametrize("read", [_read_in_autocommit, _read_in_transaction])
def test_after_a_broken_connection_the_others_are_pinged_before_their_next_use(pg_store, monkeypatch, read):
    """Dropped within the window, a connection fails its request (a retryable refusal); every connection pooled
    before that is then pinged, so one server restart costs one failed request, not one per pooled connection —
    whether the broken one was found in autocommit (a CONNECT, the counter) or in a transaction (a registration)."""
    monkeypatch.setattr(store_module, "PING_IDLE_AFTER", 60.0)
    with pg_store.driver_transaction() as first, pg_store.driver_transaction() as second:  # two pooled connections
        pids = []
        for conn in (first, second):
            cursor = conn.cursor()
            cursor.execute("SELECT pg_backend_pid()")
            pids.append(int(cursor.fetchone()[0]))
    for pid in pids:
        _terminate(pid)
    pings = _pings(monkeypatch, pg_store)
    with pytest.raises(Exception) as failed:
        read(pg_store)
    assert unavailable(failed.value), failed.value
    read(pg_store)  # the other dropped connection was pinged and replaced
    assert pings, "the connection pooled before the failure was used without a ping"


def test_autocommitted_reads_run_without_begin_and_commit_and_leave_pooled_connections_as_they_were(pg_store):
    """A hub CONNECT's reads and the configuration counter's need no transaction (READ COMMITTED gives each statement
    what committed before it): on PostgreSQL they run in autocommit, two round trips fewer a CONNECT."""
    with pg_store.autocommitted() as conn:
        cursor = conn.cursor()
        cursor.execute("SELECT 1")
        assert conn.driver_connection.info.transaction_status.name == "IDLE"  # no transaction was opened
    with pg_store.driver_transaction() as conn:  # the same pooled connection, back to transactions
        assert conn.driver_connection.autocommit is False
        conn.cursor().execute("SELECT 1")
        assert conn.driver_connection.info.transaction_status.name == "INTRANS"
