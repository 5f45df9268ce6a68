"""Upgrading an installation that holds data, from every earlier schema revision, on SQLite and PostgreSQL.

``tests/test_store.py`` checks that the migrations build the models' schema on an empty database; here each
earlier revision gets the rows an installation of that time held (a namespace with its CAs and wrapped keys, a
symmetric-key group and an individual enrollment, registrations with an issued certificate, hub devices with
twins, telemetry, a cloud-to-device message, a telemetry route, the audit chain), inserted in that revision's own
schema (the tables its migrations made, reflected), then it is upgraded to head and read through today's code:
nothing lost or changed, and the installation still works (the old certificate connects to its hub, devices
register, the audit chain verifies). Also: two processes upgrading one PostgreSQL schema at once.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from cryptography import x509
from sqlalchemy import MetaData, event, select, text
from tests.conftest import DEFAULT_HUB_HOST, TEST_ID_SCOPE, database, migrated_store, wait_until
from tests.unit.conftest import creds, register, symmetric_group
from tests.x509_helpers import p384_csr

from opendps.pki import KeyStore
from opendps.provisioning.access import HUB_OWNER_POLICY, OWNER_POLICY, OWNER_RIGHTS
from opendps.services import Services, wire
from opendps.store import MIGRATIONS, Store, sqlite_url
from opendps.store.models import Base
from opendps.transport.sas import derive_device_key

PREVIEW = "2025-07-01-preview"
_SCRIPTS = ScriptDirectory(str(MIGRATIONS))
HEAD = _SCRIPTS.get_current_head()
#: every revision an installation may be at before this version's upgrade, oldest first
EARLIER = [r.revision for r in reversed(list(_SCRIPTS.walk_revisions())) if r.revision != HEAD]
_SKIPPED_TABLES = {"config_generation"}  # made with its one row by its migration (0007)


def _services(store: Store, master_key: bytes) -> Services:
    keys = KeyStore(store, master_key)
    keys.check_master_key()  # the key that wrapped the old CA keys still opens them
    services = wire(store, keys, id_scope=TEST_ID_SCOPE, hub_domain="hubs.test", lint=False)
    services.hubs.ensure("default", DEFAULT_HUB_HOST)
    return services


def _issue(services: Services, group_key: str, rid: str) -> list[x509.Certificate]:
    state = register(services, creds(rid, key=derive_device_key(group_key, rid)),
                     csr=base64.b64encode(p384_csr(rid)).decode(), api_version=PREVIEW)["registrationState"]
    return [x509.load_der_x509_certificate(base64.b64decode(d)) for d in state["issuedCertificateChain"]]


def _connect(services: Services, device_id: str, chain: list[x509.Certificate]) -> str:
    return services.hub_auth.connect(DEFAULT_HUB_HOST, device_id, device_id, None, list(chain[:2]),
                                     datetime.now(UTC)).device_id


class Written:
    """What an installation held: every table's rows as today's models read them, and what a device kept."""

    def __init__(self, rows: dict[str, list[dict[str, Any]]], master_key: bytes, group_key: str, sym_key: str,
                 chain: list[x509.Certificate]) -> None:
        self.rows, self.master_key, self.group_key, self.sym_key, self.chain = rows, master_key, group_key, sym_key, chain


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Written:
    """One installation's data, made once by today's domain code. The columns older revisions have are written the
    same way: the code of the commits at revisions 0005, 0012 and 0015 (``git archive``), run for real
    (``opendps quickstart`` on SQLite and PostgreSQL), left installations today's code upgrades and runs on."""
    folder = tmp_path_factory.mktemp("written")
    store = migrated_store(sqlite_url(folder / "opendps.db"))
    master_key = os.urandom(32)
    try:
        services = _services(store, master_key)
        services.access_policies.ensure(OWNER_POLICY, OWNER_RIGHTS)
        services.access_policies.ensure(HUB_OWNER_POLICY, "RegistryWrite, ServiceConnect")  # shared before 0006
        services.registry.create_namespace("up-ns", "ops")
        group_key = symmetric_group(services, "up-group", credentialPolicyName="ops")
        chain = _issue(services, group_key, "dev-up1")
        view, _ = services.enrollments.put("individual", "dev-sym", {"attestation": {"type": "symmetricKey"}})
        assert view.keys is not None
        sym_key = view.keys[0]
        assert register(services, creds("dev-sym", key=sym_key))["status"] == "assigned"
        services.hubs.update_twin("default", "dev-up1", tags={"site": {"floor": 3}}, desired={"fan": "on"})
        hub_id = services.hubs.get("default").id
        services.hubs.patch_reported(hub_id, "dev-up1", {"temperature": 21.5, "firmware": {"version": "1.2"}})
        services.telemetry.append_many([(hub_id, "dev-up1", {"message-id": "m1", "content-type": "application/json"},
                                         {"alert": "none"}, b'{"t": 21.5}')])
        services.c2d.enqueue("default", "dev-up1", b"reboot", properties={"reason": "upgrade"})
        services.routes.put("default", "to-nats", {"properties": {"endpointType": "nats", "url": "nats://127.0.0.1:4222",
                                                                "subject": "telemetry"}})
        assert services.audit.verify().intact
        rows: dict[str, list[dict[str, Any]]] = {}
        with store.engine.connect() as conn:
            for table in Base.metadata.sorted_tables:
                if table.name not in _SKIPPED_TABLES:
                    rows[table.name] = [dict(r._mapping) for r in conn.execute(select(table))]
    finally:
        store.dispose()
    for name in ("namespaces", "wrapped_keys", "certificate_authorities", "policies", "enrollments", "registrations",
                 "operations", "issued_certificates", "device_records", "hub_devices", "telemetry_events",
                 "c2d_messages", "telemetry_routes", "audit_log", "access_policies", "instance_settings"):
        assert rows[name], f"the installation has no {name}: the test would check nothing there"
    return Written(rows, master_key, group_key, sym_key, chain)


def _write_at(store: Store, written: Written) -> dict[str, set[str]]:
    """Insert ``written``'s rows into the tables and columns the store's revision has (reflected from the database
    its migrations made); on PostgreSQL each serial is moved past the ids given, as the old code's inserts left it.
    Returns the columns written per table."""
    columns: dict[str, set[str]] = {}
    with store.engine.begin() as conn:
        old = MetaData()
        old.reflect(conn)
        for table in Base.metadata.sorted_tables:  # parents first
            if table.name not in old.tables or not written.rows.get(table.name):
                continue
            at_revision = old.tables[table.name]
            names = set(at_revision.c.keys())
            if table.name == "enrollments" and "secret" not in names:
                continue  # symmetric keys (these enrollments' attestation) came with the device plane, 0002
            columns[table.name] = names
            conn.execute(at_revision.insert(), [{k: v for k, v in row.items() if k in names}
                                                for row in written.rows[table.name]])
            if conn.dialect.name == "postgresql" and "id" in names and at_revision.c.id.autoincrement:
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                                  f"(SELECT max(id) FROM {table.name}))"))
    return columns


@pytest.mark.parametrize("revision", EARLIER)
def test_an_installation_at_an_earlier_revision_upgrades_with_its_data_whole_and_working(db_url, written, revision):
    store = Store(db_url)
    try:
        store.upgrade(revision)
        columns = _write_at(store, written)
        store.upgrade()
        assert store.current_revision() == HEAD
        with store.engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
            # every row, every column it had: the same values read through today's models
            for name, kept in columns.items():
                table = Base.metadata.tables[name]
                key = [c.name for c in table.primary_key]
                now = {tuple(r._mapping[k] for k in key): dict(r._mapping) for r in conn.execute(select(table))}
                assert len(now) == len(written.rows[name]), name
                for row in written.rows[name]:
                    found = now[tuple(row[k] for k in key)]
                    assert {k: found[k] for k in kept} == {k: row[k] for k in kept}, (name, row)
            # what the later migrations added to existing rows
            if "revoke_superseded" not in columns["policies"]:
                assert {(r.revoke_superseded, r.crl_validity_hours) for r in conn.execute(
                    text("SELECT revoke_superseded, crl_validity_hours FROM policies"))} == {(True, 24)}
            assert conn.execute(text("SELECT id FROM config_generation")).scalars().all() == [1]

        services = _services(store, written.master_key)
        if "linked_hubs" in columns:
            # the default hub's owner keys: made before 0006, it adopts the installation's shared pair (as serve does)
            shared = services.access_policies.former_hub_owner_keys()
            assert shared is not None
            hub_keys = services.hubs.owner_keys("default", initial=shared)
            assert hub_keys == shared if "owner_keys" not in columns["linked_hubs"] else hub_keys != shared
        if "hub_devices" in columns:
            # the device's old certificate still connects to its hub; its twin is whole
            assert _connect(services, "dev-up1", written.chain) == "dev-up1"
            twin = services.hubs.get_device("default", "dev-up1").twin()
            assert twin["tags"] == {"site": {"floor": 3}}
            assert twin["properties"]["desired"]["fan"] == "on"
            assert twin["properties"]["reported"]["firmware"] == {"version": "1.2"}
        if "telemetry_events" in columns:
            events = services.telemetry.read("default")
            assert [(e.device_id, e.body, e.application) for e in events] == [
                ("dev-up1", b'{"t": 21.5}', {"alert": "none"})]
            hub_id = services.hubs.get("default").id
            assert [m.body for m in services.c2d.pending(hub_id, "dev-up1")] == [b"reboot"]
        # devices register: a new one of the group (the old issuing CA's key signs), the individual one again
        group_key = written.group_key if "enrollments" in columns else \
            symmetric_group(services, "up-group", credentialPolicyName="ops")  # 0001 had no device plane yet
        fresh = _issue(services, group_key, "dev-up2")
        assert fresh[1] == written.chain[1] and _connect(services, "dev-up2", fresh) == "dev-up2"
        if "enrollments" in columns:
            assert register(services, creds("dev-sym", key=written.sym_key))["status"] == "assigned"
        # the audit chain: the old entries (from 0014 on) and today's, one chain
        old = written.rows["audit_log"][-1] if "audit_log" in columns else None
        verified = services.audit.verify(expect_head=(old["seq"], old["hash"]) if old else None)
        assert verified.intact, verified.message()
        assert verified.entries > (old["seq"] if old else 0)
    finally:
        store.dispose()


@pytest.mark.timeout(120)
def test_two_processes_upgrading_one_postgresql_schema_take_turns(tmp_path):
    """Two nodes starting together on a fresh schema: both found no ``alembic_version`` and both created it; the
    second stopped with "duplicate key value violates unique constraint pg_type_typname_nsp_index" (from an older
    revision, "column ... already exists"). Now the second waits for the first (an advisory lock held by the
    upgrade's transaction) and finds nothing left to do. Made deterministic: this process's upgrade stops inside its
    transaction, right after its first statement, until an ``opendps db upgrade`` process is seen waiting for a lock."""
    with database("postgresql", tmp_path) as url:
        first = Store(url)
        inside, go_on = threading.Event(), threading.Event()

        def pause(conn, cursor, statement, parameters, context, executemany) -> None:
            if statement.lstrip().upper().startswith("CREATE TABLE") and not inside.is_set():
                inside.set()
                go_on.wait(60)

        event.listen(first.engine, "after_cursor_execute", pause)
        failures: list[BaseException] = []

        def upgrade() -> None:
            try:
                first.upgrade()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                failures.append(exc)

        runner = threading.Thread(target=upgrade)
        runner.start()
        try:
            assert inside.wait(30)
            env = {**os.environ, "OPENDPS_DB": url}
            second = subprocess.Popen([sys.executable, "-m", "opendps", "db", "upgrade", "--data-dir",
                                       str(tmp_path / "second")], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
            watcher = Store(url)
            try:
                def waiting() -> bool:
                    with watcher.engine.connect() as conn:
                        return bool(conn.execute(text(
                            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                            "AND wait_event_type = 'Lock' AND query NOT ILIKE '%pg_stat_activity%'")).scalar())
                assert wait_until(waiting, timeout=30), "the second upgrade never waited"
            finally:
                watcher.dispose()
        finally:
            go_on.set()
            runner.join(60)
        output, _ = second.communicate(timeout=60)
        assert failures == []
        assert second.returncode == 0, output
        assert output.strip().splitlines()[-1] == f"database at revision {HEAD}"
        with first.engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [HEAD]
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        first.dispose()


def test_the_test_covers_every_revision():
    """A new migration is covered by the upgrade test on its own (the revisions are read from the scripts)."""
    files = sorted(p.name[:4] for p in (Path(MIGRATIONS) / "versions").glob("[0-9]*.py"))
    assert [*EARLIER, HEAD] == files


def test_a_database_a_newer_version_upgraded_is_refused_naming_why(db_url, tmp_path):
    """Rolling the software back over a database a newer opendps upgraded said only "Can't locate revision identified
    by '0099'" (serve, init and db upgrade alike); now the one line says the database is newer and what to do."""
    from click.testing import CliRunner

    from opendps.cli import main

    store = migrated_store(db_url)
    try:
        with store.engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
        result = CliRunner().invoke(main, ["db", "upgrade", "--data-dir", str(tmp_path / "dd"), "--db", db_url])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1, result.output
        assert lines[0] == (f"error: migration failed: the database is at schema revision 0099, newer than this "
                            f"opendps knows (up to {HEAD}): a newer version upgraded it; run that version or restore a "
                            "backup taken before the upgrade (there is no downgrade)")
        assert store.current_revision() == "0099"  # nothing changed
    finally:
        store.dispose()


def test_a_migration_that_fails_on_the_database_is_one_line_without_sqlalchemys_wrapper(tmp_path):
    """``db upgrade`` printed SQLAlchemy's whole message: the statement, its parameters and a help link."""
    from click.testing import CliRunner

    from opendps.cli import main

    url = f"sqlite+pysqlite:///{tmp_path / 'taken.db'}"
    store = Store(url)
    with store.engine.begin() as conn:  # a table of that name already there: the first migration cannot create it
        conn.execute(text("CREATE TABLE instance_settings (other TEXT)"))
    store.dispose()
    result = CliRunner().invoke(main, ["db", "upgrade", "--data-dir", str(tmp_path / "dd"), "--db", url])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0] == "error: migration failed: table instance_settings already exists", lines
