"""opendps.store.Prepared: Core statements run on the driver's own cursor, on both stores, giving what SQLAlchemy gives.

Why a test of its own: the hub's CONNECT runs through it, and what SQLAlchemy's execution did for us (a datetime
as SQLite's text and back, a boolean, a literal the statement fixes, the driver's parameter style) is now its job.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import bindparam, case, exists, insert, select, update
from sqlalchemy.exc import IntegrityError
from tests.unit.conftest import symmetric_group
from tests.unit.hub.test_revocation import _issue

from opendps.store import HubDevice, IssuedCertificate, Prepared, Store, joined, table_of

_ISSUED = table_of(IssuedCertificate)
_OLDER = _ISSUED.alias("older")
_ROW = select(_ISSUED.c.id, _ISSUED.c.serial, _ISSUED.c.not_after, _ISSUED.c.first_used_at,
              case((_ISSUED.c.first_used_at.is_(None),
                    exists().where(_OLDER.c.registration_id == _ISSUED.c.registration_id, _OLDER.c.id < _ISSUED.c.id)),
                   else_=False).label("has_older")).where(_ISSUED.c.sha256 == bindparam("b_sha"))
_DEVICES = table_of(HubDevice)
# an INSERT without values(): it writes the columns given (the others take their defaults) and returns two of them
_INSERT_DEVICE = insert(_DEVICES).returning(_DEVICES.c.id, _DEVICES.c.desired_version)
_DEVICE_BY_KEY = select(_DEVICES.c.id, _DEVICES.c.twin_tags, _DEVICES.c.status).where(
    _DEVICES.c.device_key == bindparam("b_key"))
_USE = update(_ISSUED).where(_ISSUED.c.id == bindparam("b_id"), _ISSUED.c.first_used_at.is_(None)).values(
    first_used_at=bindparam("b_now"))


def _certificates(store: Store, services, count: int) -> list[str]:
    """``count`` certificates issued to one registration (the oldest first, by its registrations); their SHA-256s."""
    services.registry.create_namespace("prep-ns", "prep")
    key = symmetric_group(services, "prep-group", credentialPolicyName="prep")
    for _ in range(count):
        _issue(services, key, "prep-dev")
    with store.session() as s:
        return [r.sha256 for r in s.execute(select(_ISSUED.c.sha256).order_by(_ISSUED.c.id))]


def test_rows_parameters_and_changes_are_what_sqlalchemy_gives(store, services):
    first, second = _certificates(store, services, 2)
    prepared, use = store.prepare(_ROW), store.prepare(_USE)
    with store.session() as s:  # what SQLAlchemy itself reads, to compare with
        expected = s.connection().execute(_ROW, {"b_sha": second}).one()
    with store.driver_transaction() as conn:
        row = prepared.first(conn.cursor(), b_sha=second)
    assert row == tuple(expected) and row.serial == expected.serial
    assert isinstance(row.not_after, datetime) and row.not_after == expected.not_after  # SQLite's text, read back
    assert row.has_older is True and row.first_used_at is None  # a boolean, and the literal False not taken
    with store.driver_transaction() as conn:
        assert prepared.first(conn.cursor(), b_sha=first).has_older is False
        assert prepared.first(conn.cursor(), b_sha="0" * 64) is None
        assert prepared.all(conn.cursor(), b_sha=first) == [prepared.first(conn.cursor(), b_sha=first)]
    with pytest.raises(ValueError, match="naive datetime"), store.driver_transaction() as conn:  # the column type's rule
        use.run(conn.cursor(), b_id=row.id, b_now=datetime(2026, 12, 7, 12, 30))
    when = datetime(2026, 12, 7, 14, 30, 1, 250000, tzinfo=timezone(timedelta(hours=2)))
    with store.driver_transaction() as conn:
        assert use.run(conn.cursor(), b_id=row.id, b_now=when) == 1  # a datetime written as the store writes one
        assert use.run(conn.cursor(), b_id=row.id, b_now=when + timedelta(days=1)) == 0
    with store.session() as s:
        stored = s.get(IssuedCertificate, row.id)
        assert stored.first_used_at == when and stored.first_used_at.utcoffset() == timedelta(0)  # as UTC: 12:30:01
    with store.driver_transaction() as conn:
        assert prepared.first(conn.cursor(), b_sha=second).first_used_at == when
    with store.driver_transaction() as conn:  # the CASE's ELSE: the statement's own literal False, as a boolean
        assert prepared.first(conn.cursor(), b_sha=second).has_older is False


def test_a_failed_driver_transaction_writes_nothing(store, services):
    (sha,) = _certificates(store, services, 1)
    prepared, use = store.prepare(_ROW), store.prepare(_USE)
    with store.driver_transaction() as conn:
        row = prepared.first(conn.cursor(), b_sha=sha)
    with pytest.raises(RuntimeError), store.driver_transaction() as conn:
        assert use.run(conn.cursor(), b_id=row.id, b_now=datetime.now(UTC)) == 1
        raise RuntimeError("refused after the write")
    with store.driver_transaction() as conn:
        assert prepared.first(conn.cursor(), b_sha=sha).first_used_at is None


def test_statements_a_fixed_shape_cannot_hold_are_refused(store):
    with pytest.raises(ValueError, match="no IN lists"):
        store.prepare(select(_ISSUED.c.id).where(_ISSUED.c.serial.in_(bindparam("serials", expanding=True))))


def test_a_misspelt_or_missing_parameter_is_an_error_not_a_null(store):
    prepared, use = store.prepare(_ROW), store.prepare(_USE)
    with store.driver_transaction() as conn:
        with pytest.raises(TypeError, match="b_sha"):
            prepared.first(conn.cursor(), b_sah="0" * 64)
        with pytest.raises(TypeError, match="b_now"):
            use.run(conn.cursor(), b_id=1)
        assert prepared.first(conn.cursor(), b_sha="0" * 64) is None  # the statement's own literal is not asked for


def _device(hub_id: int, key: str) -> dict[str, object]:
    now = datetime.now(UTC)
    return {"hub_id": hub_id, "device_id": key.upper(), "device_key": key, "auth_type": "sas", "generation_id": "g",
            "etag": "e", "twin_tags": {"site": key, "n": [1, 2]}, "twin_desired": {}, "twin_reported": {},
            "created_at": now, "updated_at": now}


def test_a_transaction_writes_the_columns_given_and_the_defaults_of_the_others(store, services):
    """The registration's writes: an INSERT compiled for the columns each call gives, the others' defaults as
    SQLAlchemy's execution would fill them, RETURNING rows, JSON both ways; a misspelt column is refused."""
    hub_id = services.hubs.get("default").id
    with store.transaction() as tx:
        row = tx.first(_INSERT_DEVICE, **_device(hub_id, "tx-one"))
        assert row.desired_version == 1  # not given: the column's default, not a NULL the NOT NULL refuses
        with pytest.raises(TypeError, match="desired_verison"):
            tx.first(_INSERT_DEVICE, **_device(hub_id, "tx-two"), desired_verison=5)
        again = tx.first(_INSERT_DEVICE, **_device(hub_id, "tx-two"), desired_version=5)  # another set of columns
        assert again.desired_version == 5 and again.id != row.id
        assert tx.first(_DEVICE_BY_KEY, b_key="tx-one") == (row.id, {"site": "tx-one", "n": [1, 2]}, "enabled")
    with store.session() as s:
        stored = s.get(HubDevice, row.id)
        assert (stored.status, stored.reported_version, stored.twin_tags) == ("enabled", 1, {"site": "tx-one", "n": [1, 2]})


def test_a_driver_error_is_sqlalchemys_and_the_transaction_writes_nothing(store, services):
    """Callers keep one ``except IntegrityError`` (a registration retries on it) whichever way they write."""
    hub_id = services.hubs.get("default").id
    with pytest.raises(IntegrityError) as caught, store.transaction() as tx:
        tx.first(_INSERT_DEVICE, **_device(hub_id, "tx-dup"))
        tx.first(_INSERT_DEVICE, **_device(hub_id, "tx-dup"))  # (hub, key) is unique
    assert isinstance(caught.value.orig, store.engine.dialect.loaded_dbapi.IntegrityError)
    assert '"site"' not in str(caught.value)  # the parameters (a wrapped key, a twin) are not shown
    with store.transaction() as tx:
        assert tx.first(_DEVICE_BY_KEY, b_key="tx-dup") is None


def test_after_commit_actions_run_once_committed_and_never_after_a_rollback(store, services):
    done: list[str] = []
    with store.transaction() as tx:
        tx.after_commit(lambda: done.append("own"))
        assert done == []
    assert done == ["own"]
    with pytest.raises(RuntimeError), store.transaction() as tx:
        tx.after_commit(lambda: done.append("rolled back"))
        raise RuntimeError("refused")
    with store.session() as s:
        joined(s).after_commit(lambda: done.append("session"))
        assert done == ["own"]
    assert done == ["own", "session"]


def test_joined_runs_after_the_sessions_pending_changes_in_its_transaction(store, services):
    hub_id = services.hubs.get("default").id
    with pytest.raises(RuntimeError), store.session() as s:
        s.add(HubDevice(**_device(hub_id, "tx-pending")))  # not flushed yet
        tx = joined(s)
        assert tx.first(_DEVICE_BY_KEY, b_key="tx-pending") is not None
        raise RuntimeError("rolled back with the session")
    with store.transaction() as tx:
        assert tx.first(_DEVICE_BY_KEY, b_key="tx-pending") is None


def test_statements_built_per_call_do_not_grow_the_compiled_cache_without_bound(store, monkeypatch):
    from opendps.store import prepared as prepared_module

    monkeypatch.setattr(prepared_module, "_COMPILED", {})
    monkeypatch.setattr(prepared_module, "MAX_COMPILED", 3)
    with store.transaction() as tx:
        for n in range(10):  # a new statement object each time: compiled anew, correct, kept only up to the bound
            row = tx.first(select(_ISSUED.c.id).where(_ISSUED.c.serial == bindparam("b_serial")), b_serial=f"{n:x}")
            assert row is None
    assert len(prepared_module._COMPILED) == 3


def test_a_column_whose_default_is_computed_per_row_must_be_given(store):
    """A scalar default is filled in as SQLAlchemy's execution would; one computed per row (a callable) cannot be
    compiled once, so leaving it out is refused when the statement is prepared, not written as a NULL."""
    from sqlalchemy import Column, Integer, MetaData, String, Table

    table = Table("per_row", MetaData(), Column("id", Integer, primary_key=True),
                  Column("label", String(8), default=lambda: "made"), Column("kind", String(8), default="fixed"))
    with pytest.raises(ValueError, match="'label' has a default computed per row"):
        Prepared(insert(table), store.engine.dialect, ["id", "kind"])
    Prepared(insert(table), store.engine.dialect, ["id", "label"])  # given: the scalar default of kind fills in
