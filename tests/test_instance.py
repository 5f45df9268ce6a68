"""Local verbs: init, info, db upgrade, master key handling (real CLI processes, SQLite and PostgreSQL)."""

from __future__ import annotations

import base64
import json
import os
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

    info = _cli(env, "info", "-o", "json")
    assert info.returncode == 0, info.stderr
    doc = json.loads(info.stdout)
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
    assert json.loads(_cli(env, "info", "-o", "json").stdout)["connectionStrings"] == doc["connectionStrings"]
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
