"""Where a namespace's and a policy's CA keys are made (issue 18), in-process on SoftHSM2 (SQLite): per namespace,
per policy, kept by a rotation unless it says otherwise, shown in the views; a wrong or unavailable backend refused
before anything is written. Skips locally without SoftHSM2 / python-pkcs11; mandatory in CI."""

from __future__ import annotations

import pytest
from tests.conftest import database, installation
from tests.softhsm import TOKEN, session_softhsm  # noqa: F401 - the fixture

from opendps.errors import InvalidInput, NotFound
from opendps.pki import KeyStore
from opendps.pki.pkcs11 import Pkcs11Token


@pytest.fixture
def db_url(tmp_path):
    with database("sqlite", tmp_path) as url:
        yield url


@pytest.fixture
def registry(store, master_key, session_softhsm):  # noqa: F811 - the fixture imported above
    token = Pkcs11Token(session_softhsm.config())
    token.open()
    keys = KeyStore(store, master_key, token=token, default_backend="pkcs11")
    keys.check_master_key()
    return installation(store, keys).registry


def _backends(registry, ns: str, policy: str) -> tuple[str, str]:
    root = registry.credential(ns).key
    ica = registry.get_policy(ns, policy).key
    return root.backend, ica.backend


def test_a_namespace_and_its_first_policy_follow_the_installation_or_the_request(registry):
    registry.create_namespace("kb-default")
    assert _backends(registry, "kb-default", "default") == ("pkcs11", "pkcs11")
    root = registry.credential("kb-default").key
    assert root.token == TOKEN and root.label.startswith("opendps-root-")
    registry.create_namespace("kb-soft", key_backend="software")
    assert _backends(registry, "kb-soft", "default") == ("software", "software")
    assert registry.credential("kb-soft").key.label is None
    registry.create_namespace("kb-mixed", key_backend="pkcs11", policy_key_backend="software")
    assert _backends(registry, "kb-mixed", "default") == ("pkcs11", "software")


def test_a_policy_chooses_its_issuing_ca_key_and_a_rotation_keeps_or_moves_it(registry):
    registry.create_namespace("kb-p")
    view, created = registry.put_policy("kb-p", "fast", key_backend="software")
    assert created and view.key.backend == "software"
    updated, _ = registry.put_policy("kb-p", "fast", validity_days=7, key_backend="software")  # same: fine
    assert updated.validity_days == 7
    with pytest.raises(InvalidInput, match="rotate the policy with keyBackend 'pkcs11'"):
        registry.put_policy("kb-p", "fast", key_backend="pkcs11")
    kept = registry.rotate_policy("kb-p", "fast")
    assert kept.key.backend == "software" and kept.issuing_ca != view.issuing_ca
    moved = registry.rotate_policy("kb-p", "fast", key_backend="pkcs11")
    assert moved.key.backend == "pkcs11" and moved.key.label.startswith("opendps-ica-")
    assert registry.rotate_policy("kb-p", "fast").key.backend == "pkcs11"


def test_an_unknown_or_unavailable_backend_is_refused_before_anything_is_written(registry, store, master_key):
    with pytest.raises(InvalidInput, match="keyBackend must be one of software, pkcs11"):
        registry.create_namespace("kb-bad", key_backend="tpm")
    with pytest.raises(NotFound):
        registry.get_namespace("kb-bad")
    registry.create_namespace("kb-ok", key_backend="software")
    with pytest.raises(InvalidInput, match="keyBackend must be one of"):
        registry.put_policy("kb-ok", "p2", key_backend="hsm")
    with pytest.raises(NotFound):
        registry.get_policy("kb-ok", "p2")
    plain = installation(store, KeyStore(store, master_key)).registry  # a process with no token configured
    with pytest.raises(InvalidInput, match="no PKCS#11 token configured"):
        plain.create_namespace("kb-none", key_backend="pkcs11")
    with pytest.raises(NotFound):
        plain.get_namespace("kb-none")
