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
