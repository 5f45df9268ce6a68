"""Shared fixtures. Every store-backed test runs on SQLite and on PostgreSQL.

PostgreSQL comes from OPENDPS_TEST_PG (default: the CI machine's 127.0.0.1:5432 database ``test``);
each test gets its own schema. Without a reachable server the PostgreSQL variants skip, unless
OPENDPS_REQUIRE_SERVICES=1 (set by .ci/run), which turns that skip into a failure.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import event

from opendps.bench._harness import free_port, free_ports  # noqa: F401 - test modules import them from here
from opendps.pki import CaCertificates, IssuanceEngine, KeyStore
from opendps.registry import Registry
from opendps.services import Services, wire
from opendps.store import Store

PG_URL = os.environ.get("OPENDPS_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REQUIRE_SERVICES = os.environ.get("OPENDPS_REQUIRE_SERVICES") == "1"


def service_missing(reason: str) -> None:
    """Skip locally; fail where services are mandatory (CI)."""
    if REQUIRE_SERVICES:
        pytest.fail(f"required service unavailable: {reason}")
    pytest.skip(reason)


def _pg_admin():
    import psycopg

    dsn = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    return psycopg.connect(dsn, autocommit=True, connect_timeout=3)


@contextmanager
def database(kind: str, directory: Path):
    """A fresh empty database: a SQLite file in ``directory`` or a new PostgreSQL schema."""
    if kind == "sqlite":
        yield f"sqlite+pysqlite:///{directory / 'opendps.db'}"
        return
    try:
        admin = _pg_admin()
    except Exception as exc:  # noqa: BLE001
        service_missing(f"PostgreSQL not reachable at {PG_URL}: {exc}")
    schema = f"t_{secrets.token_hex(6)}"
    admin.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    with database(request.param, tmp_path) as url:
        yield url


# What the migrations produced, once per test session: a migrated SQLite file to copy, the statements they ran on
# PostgreSQL to replay in a fresh schema. Running Alembic's 17 scripts for each of ~800 stores cost ~0.1 s on
# SQLite and ~0.2 s on PostgreSQL apiece (about a minute of the suite); tests of the migrations themselves call
# Store.upgrade directly.
_SQLITE_TEMPLATE: list[Path] = []
_PG_STATEMENTS: list[tuple[str, object]] = []


def migrated_store(url: str) -> Store:
    """A store at the newest migration on the empty database ``url`` (from :func:`database`)."""
    if url.startswith("sqlite"):
        path = Path(url.split(":///", 1)[1])
        if _SQLITE_TEMPLATE:
            shutil.copyfile(_SQLITE_TEMPLATE[0], path)
            return Store(url)
        s = Store(url)
        s.upgrade()
        s.dispose()  # the last connection closes: WAL checkpointed into the file
        folder = tempfile.mkdtemp(prefix="opendps-template-")
        atexit.register(shutil.rmtree, folder, True)
        template = Path(folder) / "opendps.db"
        shutil.copyfile(path, template)
        _SQLITE_TEMPLATE.append(template)
        return Store(url)
    s = Store(url)
    if _PG_STATEMENTS:
        raw = s.engine.raw_connection()
        try:
            cursor = raw.cursor()
            for statement, parameters in _PG_STATEMENTS:
                cursor.execute(statement, parameters or None)
            cursor.close()
            raw.commit()
        finally:
            raw.close()
        return s
    ran: list[tuple[str, object]] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        assert not executemany, "a migration's executemany is not replayed"
        ran.append((statement, parameters))

    event.listen(s.engine, "before_cursor_execute", record)
    s.upgrade()
    event.remove(s.engine, "before_cursor_execute", record)
    _PG_STATEMENTS.extend(ran)
    return s


@pytest.fixture
def store(db_url) -> Store:
    s = migrated_store(db_url)
    yield s
    s.dispose()


@pytest.fixture
def master_key() -> bytes:
    return secrets.token_bytes(32)


@pytest.fixture
def keys(store, master_key) -> KeyStore:
    k = KeyStore(store, master_key)
    k.check_master_key()
    return k


TEST_ID_SCOPE = "0ne00TEST01"


DEFAULT_HUB_HOST = "default.hubs.test"


def installation(store: Store, keys: KeyStore, id_scope: str = TEST_ID_SCOPE) -> Services:
    """Every domain service wired in-process on ``store``, with the default hub an installation starts with."""
    services = wire(store, keys, id_scope=id_scope, hub_domain="hubs.test")
    services.hubs.ensure("default", DEFAULT_HUB_HOST)
    return services


@pytest.fixture
def services(store, keys) -> Services:
    """The domain services in this process on the test's store (no server, no sockets)."""
    return installation(store, keys)


@pytest.fixture
def registry(services) -> Registry:
    return services.registry


@pytest.fixture
def engine(services) -> IssuanceEngine:
    return services.issuance


@pytest.fixture
def ca_certificates(services) -> CaCertificates:
    return services.ca_certificates


def assert_uses_index(store: Store, queries: dict[str, object]) -> None:
    """Each query (a SQLAlchemy statement with its parameters bound) is planned on the index that names it: SQLite's
    plan, or PostgreSQL's with sequential scans discouraged (a test's tiny table would be scanned otherwise)."""
    with store.engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if not sqlite:
            conn.exec_driver_sql("SET enable_seqscan = off")
        for index, query in queries.items():
            sql = str(query.compile(conn, compile_kwargs={"literal_binds": True}))  # type: ignore[attr-defined]
            plan = " ".join(str(row) for row in conn.exec_driver_sql(
                ("EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN ") + sql))
            assert index in plan, (index, plan)


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01):
    """Poll ``predicate`` until it returns something true or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)


def run_openssl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real openssl CLI; fail the test with its stderr if it fails."""
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"openssl {' '.join(args)} failed: {proc.stderr}")
    return proc


@dataclass
class RunningServer:
    db_url: str
    data_dir: Path
    url: str
    connection_string: str
    ca_file: Path
    env: dict
    proc: subprocess.Popen
    id_scope: str = ""
    mqtt_port: int = 0
    amqp_port: int = 0
    http_port: int = 0  # plain HTTP: CRLs and OCSP

    def cli(self, *args: str, check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run the ``opendps`` command (in-process, see :func:`invoke_cli`) against this server."""
        proc = invoke_cli(env or self.env, *args)
        if check and proc.returncode != 0:
            pytest.fail(f"opendps {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc


def invoke_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    """Run the real click command tree in this process with ``env`` as the environment.

    In-process because a fresh interpreter costs seconds of imports on a loaded 2-core machine;
    test_console_entry_point proves the installed entry point itself with one real subprocess.
    """
    from click.testing import CliRunner

    from opendps.cli import main

    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        result = CliRunner().invoke(main, list(args), prog_name="opendps", catch_exceptions=False)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(["opendps", *args], result.exit_code, result.stdout, result.stderr)


def pytest_collection_modifyitems(config, items) -> None:
    """A module whose subject is the front end or the CLI, not the store, says ``SERVER_STORES = ("sqlite",)``: its
    server runs on that store only (the domain behind it is tested on both stores in-process, tests/unit, and the
    wire modules about the store — device API, MQTT hub, API, scale-out — keep both). Keeps the suite within its
    time budget without losing a code path."""
    kept, dropped = [], []
    for item in items:
        stores = getattr(item.module, "SERVER_STORES", None)
        param = getattr(getattr(item, "callspec", None), "params", {}).get("server")
        (dropped if stores is not None and param is not None and param not in stores else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory) -> RunningServer:
    """``opendps serve`` in a subprocess on free ports, with its own data directory and database.

    Module-scoped (startup costs seconds): tests sharing it use distinct resource names. A module's ``SERVER_ARGS``
    (a tuple) are added to ``opendps serve``'s arguments.
    """
    tmp_path = tmp_path_factory.mktemp(f"server-{request.param}")
    with database(request.param, tmp_path) as db_url:
        yield from _run_server(db_url, tmp_path, extra_args=getattr(request.module, "SERVER_ARGS", ()))


def _run_server(db_url: str, tmp_path: Path, *, https_port: int | None = None, mqtt_port: int | None = None,
                amqp_port: int | None = None, http_port: int | None = None, extra_args: tuple[str, ...] = (),
                max_open_files: int | None = None, data_dir: Path | None = None):
    """Start ``opendps serve``; ports default to free ones (the Azure SDK compat suite needs 8883, 443 and 5671)."""
    data_dir = data_dir or tmp_path / "data"
    env = {**os.environ, "OPENDPS_DATA_DIR": str(data_dir), "OPENDPS_DB": db_url}
    env.pop("OPENDPS_CONNECTION_STRING", None)
    env.pop("OPENDPS_MASTER_KEY", None)
    chosen = (https_port, mqtt_port, amqp_port, http_port)

    def limit_files() -> None:  # a lowered descriptor limit (soft and hard) for the connection-limit tests
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (max_open_files, max_open_files))

    # free ports are free when looked at: another worker's connection may take one before the server binds it (a CI
    # run lost a module's server so), so a server refused its port is started again on others, twice at most
    for attempt in range(3):
        spare = free_ports(4)
        port = chosen[0] or spare[0]
        mqtt_port = chosen[1] or spare[1]
        amqp_port = chosen[2] or spare[2]  # never the default 5671: servers of several tests run side by side
        http_port = chosen[3] or spare[3]  # nor the default 8080 (CRLs and OCSP); extra_args may say 0 (off)
        log = open(tmp_path / "server.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "opendps", "serve", "--host", "127.0.0.1", "--https-port", str(port),
             "--mqtt-port", str(mqtt_port), "--amqp-port", str(amqp_port), "--http-port", str(http_port), *extra_args],
            env=env, stdout=log,
            stderr=subprocess.STDOUT, preexec_fn=limit_files if max_open_files else None,
            start_new_session=True)  # its own process group: only this fixture's terminate() stops it
        deadline = time.time() + 180
        waiting = [port, mqtt_port, amqp_port]
        while waiting and time.time() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", waiting[0]), timeout=0.5):
                    waiting.pop(0)
            except OSError:
                time.sleep(0.1)
        refused_port = proc.poll() is not None and "address already in use" in (tmp_path / "server.log").read_text()
        if not refused_port or attempt == 2 or all(chosen[:3]):
            break
        log.close()
    if proc.poll() is not None:
        pytest.fail(f"server exited {proc.returncode}: {(tmp_path / 'server.log').read_text()}")
    # the banner comes after config.json is written (a copied data directory holds another node's ports until then)
    while waiting == [] and "opendps listening on" not in (tmp_path / "server.log").read_text() \
            and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    if waiting or proc.poll() is not None:
        proc.kill()
        pytest.fail(f"server did not start listening within 180 s: {(tmp_path / 'server.log').read_text()}")
    info = invoke_cli(env, "info", "--show-secrets", "-o", "json")
    assert info.returncode == 0, info.stderr
    import json

    data = json.loads(info.stdout)
    yield RunningServer(db_url, data_dir, data["endpoints"]["https"]["url"],
                        data["connectionStrings"]["provisioningServiceOwner"], Path(data["serverCaCertificate"]),
                        env, proc, data["idScope"], data["endpoints"]["mqtt"]["port"], data["endpoints"]["amqp"]["port"],
                        data["endpoints"]["http"]["port"])
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="session")
def swtpm(tmp_path_factory) -> str:
    """A software TPM 2.0 (swtpm on loopback) for the whole session: its TCTI string
    ``swtpm:host=127.0.0.1,port=P``. Skips (fails in CI) without swtpm/tpm2-tools; see tests/swtpm.py."""
    from tests.swtpm import running_swtpm

    with running_swtpm(tmp_path_factory.mktemp("swtpm")) as tcti:
        yield tcti


# the device side's TPM fixtures (tests/test_device_tpm.py, tests/test_tpm_e2e.py)
@pytest.fixture(scope="session")
def tss():
    """tpm2-pytss, or skip (fail in CI): it is the optional extra ``opendps[tpm]``."""
    try:
        import tpm2_pytss
    except (ImportError, OSError) as exc:
        service_missing(f"tpm2-pytss not usable (pip install 'opendps[tpm]' after apt-get install libtss2-dev): {exc}")
    return tpm2_pytss


@pytest.fixture
def tcti(tss, swtpm):
    """The session's swtpm, shared: each test must leave no object loaded in it (swtpm has three slots)."""
    from tests.swtpm import tpm2

    yield swtpm
    assert tpm2(swtpm, "getcap", "handles-transient").stdout.strip() == b"", "a test left objects in the TPM"


@pytest.fixture(scope="module")
def other_tcti(tss):
    """A second TPM (its own seeds, so its own EK and SRK), also where a test persists objects."""
    from tests.swtpm import running_swtpm

    with running_swtpm() as tcti:
        yield tcti


# The Azure SDK compat suite's fixtures (tests/compat/azure_sdk.py). They are registered here, not in a
# tests/compat/conftest.py: a second conftest module would shadow this one for `from conftest import ...`.
from tests.compat.azure_sdk import azure_python, compat_server  # noqa: E402, F401
