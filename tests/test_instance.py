"""Local verbs: init, info, db upgrade, master key handling (real CLI processes, SQLite and PostgreSQL)."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from tests.conftest import invoke_cli

from opendps.store import Store, WrappedKey


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return invoke_cli(env, *args)


def test_console_entry_point(env):
    """The installed command itself (one real process): a bad verb is a one-line error, exit != 0."""
    r = subprocess.run([sys.executable, "-m", "opendps", "info"], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error:") and "init" in r.stderr


@pytest.fixture
def env(db_url, tmp_path) -> dict:
    e = {**os.environ, "OPENDPS_DATA_DIR": str(tmp_path / "data"), "OPENDPS_DB": db_url}
    e.pop("OPENDPS_MASTER_KEY", None)
    e.pop("OPENDPS_CONNECTION_STRING", None)
    return e


def test_init_creates_data_directory_and_info_reports_it(env, tmp_path):
    r = _cli(env, "init", "--hostname", "dps.example.test", "--https-port", "9443", "--mqtt-port", "9883")
    assert r.returncode == 0, r.stderr
    data = tmp_path / "data"
    key_file = data / "master.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(base64.b64decode(key_file.read_text())) == 32
    assert stat.S_IMODE((data / "tls" / "server.key").stat().st_mode) == 0o600

    quiet = _cli(env, "info", "-o", "json")  # no key unless asked for
    assert quiet.returncode == 0 and "SharedAccessKey" not in quiet.stdout and "connectionString" not in quiet.stdout
    assert [h["name"] for h in json.loads(quiet.stdout)["hubs"]] == ["default"]
    info = _cli(env, "info", "--show-secrets", "-o", "json")
    assert info.returncode == 0, info.stderr
    doc = json.loads(info.stdout)
    assert doc["hubs"][0]["connectionString"].startswith("HostName=dps.example.test:9443;SharedAccessKeyName=iothubowner;")
    assert doc["endpoints"]["https"] == {"hostName": "dps.example.test", "port": 9443,
                                         "url": "https://dps.example.test:9443"}
    assert doc["endpoints"]["mqtt"] == {"hostName": "dps.example.test", "port": 9883}
    assert doc["idScope"].startswith("0ne") and len(doc["idScope"]) == 11
    cs = doc["connectionStrings"]["provisioningServiceOwner"]
    assert cs.startswith("HostName=dps.example.test:9443;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=")
    # issue 12.13: init says where the secret is, and does not print it
    assert cs.split("SharedAccessKey=")[1] not in r.stdout and "opendps dps connection-string show" in r.stdout
    # the server certificate names the public host and chains to the CA clients are told to trust
    ca = x509.load_pem_x509_certificate(Path(doc["serverCaCertificate"]).read_bytes())
    leaf = x509.load_pem_x509_certificate((data / "tls" / "server.pem").read_bytes())
    leaf.verify_directly_issued_by(ca)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "dps.example.test" in sans.get_values_for_type(x509.DNSName)
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert leaf.public_key().curve.name == "secp256r1"
    # init is idempotent: same scope and owner key the second time
    assert _cli(env, "init").returncode == 0
    assert json.loads(_cli(env, "info", "-o", "json").stdout)["idScope"] == doc["idScope"]
    assert json.loads(_cli(env, "info", "--show-secrets", "-o", "json").stdout)["connectionStrings"] == \
        doc["connectionStrings"]
    table = _cli(env, "info", "-o", "table")
    assert table.returncode == 0 and doc["idScope"] in table.stdout


def test_info_without_data_directory_is_a_one_line_error(env):
    r = _cli(env, "info")
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "init" in r.stderr


def test_wrong_master_key_is_refused_and_nothing_changes(env, db_url, tmp_path):
    assert _cli(env, "init").returncode == 0
    store = Store(db_url)
    with store.session() as s:
        before = {k.id: k.blob for k in s.query(WrappedKey)}
    assert before  # the server CA key at least
    wrong = {**env, "OPENDPS_MASTER_KEY": base64.b64encode(os.urandom(32)).decode()}
    for verb in (["info"], ["init"], ["serve", "--https-port", "1"]):
        r = _cli(wrong, *verb)
        assert r.returncode != 0, verb
        assert "master key" in r.stderr.lower(), r.stderr
        assert "Traceback" not in r.stderr
    bad = {**env, "OPENDPS_MASTER_KEY": "not base64!"}
    r = _cli(bad, "info")
    assert r.returncode != 0 and "OPENDPS_MASTER_KEY" in r.stderr
    with store.session() as s:
        assert {k.id: k.blob for k in s.query(WrappedKey)} == before
    store.dispose()
    assert _cli(env, "info").returncode == 0


def test_master_key_from_environment_is_not_written(env, tmp_path):
    key = base64.b64encode(os.urandom(32)).decode()
    e = {**env, "OPENDPS_MASTER_KEY": key}
    assert _cli(e, "init").returncode == 0
    assert not (tmp_path / "data" / "master.key").exists()
    assert _cli(e, "info").returncode == 0
    r = _cli(env, "info")  # neither env nor file: clear error
    assert r.returncode != 0 and "master key" in r.stderr.lower()


def _head_revision() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from opendps.store import MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(cfg).get_current_head()


def test_db_upgrade_and_data_dir_keys_unreadable(env, db_url, tmp_path):
    r = _cli(env, "db", "upgrade")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(_head_revision())
    assert _cli(env, "init").returncode == 0
    # the server CA private key is nowhere in the data directory in clear
    store = Store(db_url)
    with store.session() as s:
        ids = [k.id for k in s.query(WrappedKey)]
    store.dispose()
    from opendps.pki import KeyStore

    master = base64.b64decode((tmp_path / "data" / "master.key").read_text())
    ks = KeyStore(Store(db_url), master)
    from cryptography.hazmat.primitives import serialization

    for key_id in ids:
        priv = ks.signer(key_id)._key
        scalar = priv.private_numbers().private_value.to_bytes(48, "big")
        pkcs8 = priv.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())
        for path in (tmp_path / "data").rglob("*"):
            if path.is_file():
                raw = path.read_bytes()
                assert scalar not in raw and pkcs8 not in raw, path


# ---------------------------------------------------------------- first contact (issue 12.9-12.12)


def _one_line(r: subprocess.CompletedProcess, words: str) -> None:
    assert r.returncode != 0, r.stdout
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and words in r.stderr, r.stderr
    assert "Traceback" not in r.stderr + r.stdout


@pytest.mark.parametrize(("args", "words"), [
    (["serve", "--https-port", "99999"], "--https-port"), (["serve", "--https-port", "-5"], "--https-port"),
    (["init", "--mqtt-port", "0"], "--mqtt-port"), (["init", "--db", "garbage"], "is not a database URL"),
    (["init", "--db", "mysql://user@localhost/db"], "database 'mysql' is not supported"),
])
def test_bad_options_are_one_line_errors_and_write_nothing(env, tmp_path, args, words):
    _one_line(_cli(env, *args), words)
    assert not (tmp_path / "data").exists()


def test_sqlite_synchronous_full_is_kept_and_used(tmp_path):
    """init --sqlite-synchronous full: kept in config.json, and the instance's connections sync at every commit; a
    level SQLite's WAL mode offers no durability with is refused in one line."""
    from opendps.instance import Settings, open_instance

    env = {k: v for k, v in os.environ.items() if k not in ("OPENDPS_DB", "OPENDPS_MASTER_KEY")}
    env["OPENDPS_DATA_DIR"] = str(tmp_path / "data")
    _one_line(_cli(env, "init", "--sqlite-synchronous", "off"), "--sqlite-synchronous")
    r = _cli(env, "init", "--sqlite-synchronous", "full")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "data" / "config.json").read_text())["sqlite_synchronous"] == "full"
    inst = open_instance(Settings.load(tmp_path / "data"), create=False)
    try:
        with inst.store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2
    finally:
        inst.close()
    assert json.loads(_cli(env, "info", "-o", "json").stdout)["sqliteSynchronous"] == "full"  # the operator can see it
    config = tmp_path / "data" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "sqlite_synchronous": "off"}))  # edited by hand
    _one_line(_cli(env, "info"), "SQLite synchronous 'off' is not one of normal, full")


def test_sqlite_busy_timeout_is_kept_and_used(tmp_path):
    """init --sqlite-busy-timeout: kept in config.json, used by the instance's connections, shown by info; a value
    out of range, on the command line or edited into config.json, is one line."""
    from opendps.instance import Settings, open_instance

    env = {k: v for k, v in os.environ.items() if k not in ("OPENDPS_DB", "OPENDPS_MASTER_KEY")}
    env["OPENDPS_DATA_DIR"] = str(tmp_path / "data")
    _one_line(_cli(env, "init", "--sqlite-busy-timeout", "0"), "--sqlite-busy-timeout")
    r = _cli(env, "init", "--sqlite-busy-timeout", "2.5")
    assert r.returncode == 0, r.stderr
    inst = open_instance(Settings.load(tmp_path / "data"), create=False)
    try:
        with inst.store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 2500
    finally:
        inst.close()
    assert json.loads(_cli(env, "info", "-o", "json").stdout)["sqliteBusyTimeout"] == 2.5
    config = tmp_path / "data" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "sqlite_busy_timeout": "soon"}))
    _one_line(_cli(env, "info"), "SQLite busy timeout 'soon' is out of range 0.1-3600 seconds")


def test_an_impossible_data_directory_is_one_line(env):
    _one_line(_cli(env, "init", "--data-dir", "/etc/passwd/x"), "cannot create data directory /etc/passwd/x")


def test_a_failed_init_leaves_no_half_made_directory(env, tmp_path):
    unreachable = {**env, "OPENDPS_DB": "postgresql+psycopg://nobody@127.0.0.1:9/none?connect_timeout=2"}
    _one_line(_cli(unreachable, "init"), "cannot open database")
    assert not (tmp_path / "data").exists()


def test_init_twice_says_so(env):
    assert _cli(env, "init").stdout.startswith("initialised ")
    again = _cli(env, "init")
    assert again.returncode == 0 and again.stdout.startswith("already initialised ")


def test_a_failed_serve_persists_no_options(env, tmp_path):
    import socket

    assert _cli(env, "init", "--https-port", "8443").returncode == 0
    config = (tmp_path / "data" / "config.json").read_text()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        _one_line(_cli(env, "serve", "--https-port", str(port), "--mqtt-port", str(port), "--amqp-port", "0"),
                  "cannot listen")
    assert (tmp_path / "data" / "config.json").read_text() == config


def test_a_missing_master_key_is_named_and_none_is_written(env, tmp_path):
    assert _cli(env, "init").returncode == 0
    key = tmp_path / "data" / "master.key"
    key.unlink()
    for verb in (["serve", "--https-port", "1"], ["init"], ["info"]):
        _one_line(_cli(env, *verb), "master.key")
        assert not key.exists(), verb


def test_a_readable_master_key_is_warned_about_and_the_database_is_private(env, db_url, tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    assert _cli(env, "init").returncode == 0
    if db_url.startswith("sqlite"):
        for name in ("opendps.db", "opendps.db-wal", "opendps.db-shm"):
            if (data / name).exists():
                assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    (data / "master.key").chmod(0o644)
    r = _cli(env, "info")
    assert r.returncode == 0 and "warning: " in r.stderr and "readable by other users" in r.stderr


def test_a_database_password_is_never_written_but_the_database_is_kept(env, tmp_path):
    from opendps.instance import Settings

    settings = Settings(data_dir=tmp_path / "data", db="postgresql+psycopg://app:s3cret@db.example:5432/opendps")
    (tmp_path / "data").mkdir()
    assert settings.save() is True
    saved = json.loads((tmp_path / "data" / "config.json").read_text())
    assert saved["db"] == "postgresql+psycopg://app@db.example:5432/opendps" and "s3cret" not in json.dumps(saved)


def test_hubs_made_before_per_hub_keys_get_their_own_and_the_default_keeps_the_old_pair(env, db_url, tmp_path):
    """Store migration 0006: an installation with one shared iothubowner pair keeps it for its default hub only."""
    from sqlalchemy import update

    from opendps.instance import HUB_OWNER_POLICY, Settings, _ensure_access_policy, open_instance
    from opendps.store import LinkedHub

    inst = open_instance(Settings.load(tmp_path / "data", db=db_url))
    inst.services.hubs.create("east")
    _ensure_access_policy(inst.store, inst.keys, HUB_OWNER_POLICY, "RegistryWrite")  # what older versions made
    shared = inst.access_policy_keys(HUB_OWNER_POLICY)
    with inst.store.session() as s:  # as an upgraded database has them: no hub has keys of its own
        s.execute(update(LinkedHub).values(owner_keys=None))
    inst.close()
    inst = open_instance(Settings.load(tmp_path / "data", db=db_url))
    try:
        assert inst.services.hubs.owner_keys("default") == shared
        assert set(inst.services.hubs.owner_keys("east")).isdisjoint(shared)
    finally:
        inst.close()


@pytest.mark.parametrize(("field", "value", "words"), [
    ("hostname", None, "hostname None is not a DNS name or an IPv4 address"),
    ("hostname", 5, "hostname 5 is not"),
    ("hostname", "9" * 300, "hostname '9999"),
    ("hostname", "a\x00b", "is not a DNS name"),
    ("hostname", "::1", "hostname '::1' is not a DNS name or an IPv4 address"),  # it goes into URLs as it is
    ("host", [], "host [] is not a host name or an IP address"),
    ("metrics_host", "", "metrics host '' is not"),
    ("pkcs11_module", 3, "pkcs11 module 3 is not a file path"),
])
def test_a_hand_edited_config_value_of_the_wrong_kind_is_named(tmp_path, field, value, words):
    """config.json may be edited by hand: a host or path of the wrong kind was a traceback wherever it was first
    used (``hostname.lower()`` in ``info``, an IDNA error in ``audit verify``); now the check names it."""
    from opendps.instance import ConfigurationError, Settings

    (tmp_path / "config.json").write_text(json.dumps({field: value}))
    with pytest.raises(ConfigurationError, match=re.escape(words)):
        Settings.load(tmp_path).check()
    for fine in ("dps.example.com", "10.0.0.5", "localhost", "edge_1.factory.local."):
        (tmp_path / "config.json").write_text(json.dumps({"hostname": fine, "host": "::"}))
        Settings.load(tmp_path).check()


@pytest.mark.parametrize("text", ["[]", "5", "null", '"x"'])
def test_a_config_file_that_is_not_an_object_is_named(tmp_path, text):
    from opendps.instance import ConfigurationError, Settings

    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigurationError, match="does not hold a JSON object"):
        Settings.load(tmp_path)


def test_a_master_key_that_cannot_be_written_whole_leaves_no_file(tmp_path):
    """master.key was opened, then written, without a temporary file or fsync: on a full disk (here a file-size limit
    of 10 bytes in a child process: the write stops part-way, as ENOSPC does) a truncated or empty key stayed, and every
    later init or serve stopped on "must be 32 bytes" until an operator deleted it. Now it appears whole or not at all."""
    path = tmp_path / "master.key"
    script = ("import resource, sys; from pathlib import Path; from opendps.pki.keys import load_master_key\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (10, resource.RLIM_INFINITY))\n"
              "try:\n    load_master_key(Path(sys.argv[1]), create=True)\nexcept OSError as exc:\n    print(exc.errno)\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENDPS_MASTER_KEY"}
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "27", (done.stdout, done.stderr)  # EFBIG
    assert list(tmp_path.iterdir()) == []  # neither master.key nor a temporary file
    done = subprocess.run([sys.executable, "-c", script.replace("10, ", "resource.RLIM_INFINITY, "), str(path)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0 and done.stdout == "", done.stderr
    assert len(path.read_text().strip()) == 44 and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_init_on_a_file_system_without_room_for_a_database_says_so_and_writes_nothing(tmp_path, monkeypatch):
    """With a few dozen KB free, SQLite crashed `opendps init` with SIGBUS setting up its -shm file (exit 135, files
    left behind); with a few hundred, the migration failed part-way. A new database's room is checked first: one line
    naming the free space, exit 1, nothing written; with room, the same command initialises."""
    from collections import namedtuple

    from opendps import instance

    real_disk_usage = instance.shutil.disk_usage
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(instance.shutil, "disk_usage", lambda _path: usage(10 << 20, (10 << 20) - 40960, 40960))
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENDPS_")}
    done = invoke_cli(env, "init", "--data-dir", str(data))
    assert done.returncode == 1
    assert done.stderr == (f"error: the file system of {data} has 40 KB free; a new database needs 2 MB: make room "
                           "first\n")
    assert not data.exists() or not any(data.iterdir())
    monkeypatch.setattr(instance.shutil, "disk_usage", real_disk_usage)
    assert invoke_cli(env, "init", "--data-dir", str(data)).returncode == 0
    assert (data / "opendps.db").exists() and (data / "master.key").exists()
