"""Alembic environment: runs on the connection handed over by :meth:`opendps.store.Store.upgrade`."""

from alembic import context
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, text

from opendps.store.models import Base

# PostgreSQL: (space, key) of the advisory lock upgrades take turns on, apart from telemetry's and the audit log's
# spaces; the key is the schema's, so installations sharing a database in their own schemas do not wait for each other
_LOCK_SPACE = 0x0A1E_3B1C
_TAKE_TURN_PG = text("SELECT pg_advisory_xact_lock(:space, hashtext(coalesce(current_schema(), '')))")


def take_turn(conn: Connection) -> None:
    """Upgrades of one PostgreSQL schema run one at a time: the lock is taken before Alembic reads the schema's
    revision and held to the upgrade's commit, so the second reads what the first committed (nothing left to do).

    Why: two processes starting together on a fresh schema (``serve`` on two nodes, or two ``init``) both found no
    ``alembic_version`` and both created it: the second failed on "duplicate key value violates unique constraint
    pg_type_typname_nsp_index" (from an older revision: on "column ... already exists"). SQLite needs nothing here:
    :meth:`~opendps.store.Store.upgrade` begins with ``BEGIN IMMEDIATE``, the file's one write lock."""
    if conn.dialect.name == "postgresql":
        conn.execute(_TAKE_TURN_PG, {"space": _LOCK_SPACE})


def known_revisions(migration: MigrationContext, scripts: ScriptDirectory) -> None:
    """Refuse, naming it, a database whose revision this version has no script for: a newer opendps upgraded it (a
    rollback of the software; opendps offers no downgrade). Alembic's own words were "Can't locate revision
    identified by '0018'", which said nothing of why or what to do."""
    known = {script.revision for script in scripts.walk_revisions()}
    for current in migration.get_current_heads():
        if current not in known:
            raise CommandError(f"the database is at schema revision {current}, newer than this opendps knows (up to "
                               f"{scripts.get_current_head()}): a newer version upgraded it; run that version or "
                               "restore a backup taken before the upgrade (there is no downgrade)")


target_metadata = Base.metadata
connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only `alembic` CLI use by developers
    from sqlalchemy import create_engine

    url = context.config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("set sqlalchemy.url in the Alembic configuration to run migrations from the alembic CLI")
    connection = create_engine(url).connect()

context.configure(
    connection=connection,
    target_metadata=target_metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    take_turn(connection)
    known_revisions(context.get_context(), context.script)
    context.run_migrations()
