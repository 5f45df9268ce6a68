"""Issue 13.2: what registrations read (enrollments, issuers, hubs) is cached per process and every change is seen
by the next registration on every process — two wirings on one database stand for two server processes."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest
from cryptography import x509
from tests.conftest import installation
from tests.unit.conftest import creds, register, statements_run, symmetric_group
from tests.x509_helpers import p384_csr

from opendps.pki import KeyStore
from opendps.provisioning.attestation import AttestationFailed, EnrollmentDisabled
from opendps.store import ConfigCache, LinkedHub, Store
from opendps.transport.sas import derive_device_key

PREVIEW = "2025-07-01-preview"


@pytest.fixture
def other(db_url, master_key):
    """A second process on the same database: its own Store, KeyStore and caches."""
    store = Store(db_url)
    keys = KeyStore(store, master_key)
    yield installation(store, keys)
    store.dispose()


def _issue(services, group_key: str, rid: str) -> x509.Certificate:
    state = register(services, creds(rid, key=derive_device_key(group_key, rid)),
                     csr=base64.b64encode(p384_csr(rid)).decode(), api_version=PREVIEW)["registrationState"]
    return x509.load_der_x509_certificate(base64.b64decode(state["issuedCertificateChain"][1]))


def test_a_change_on_one_process_is_seen_by_the_next_registration_on_another(services, other):
    services.registry.create_namespace("cache-ns", "cache-p", validity_days=3)
    key = symmetric_group(services, "cache-group", credentialPolicyName="cache-p")
    first_ca = _issue(other, key, "cache-1")  # the other process has now cached the group, the issuer and the hubs
    assert _issue(other, key, "cache-2") == first_ca

    services.registry.rotate_policy("cache-ns", "cache-p")  # a new issuing CA, on this process
    rotated = _issue(other, key, "cache-3")
    assert rotated != first_ca

    services.enrollments.put("group", "cache-group", {"attestation": {"type": "symmetricKey"},
                                                                "credentialPolicyName": "cache-p",
                                                                "provisioningStatus": "disabled"})
    with pytest.raises(EnrollmentDisabled):
        other.provisioning.register(creds("cache-4", key=derive_device_key(key, "cache-4")))

    new_key = base64.b64encode(bytes(range(32))).decode()
    services.enrollments.put("group", "cache-group", {"attestation": {"type": "symmetricKey", "symmetricKey": {
        "primaryKey": new_key, "secondaryKey": new_key}}, "credentialPolicyName": "cache-p"})
    with pytest.raises(AttestationFailed):  # the old group key no longer derives a valid device key
        other.provisioning.register(creds("cache-5", key=derive_device_key(key, "cache-5")))
    assert _issue(other, new_key, "cache-5") == rotated

    services.hubs.create("second", "second.hubs.test", allocation_weight=1000)
    services.enrollments.put("group", "cache-group", {"attestation": {"type": "symmetricKey", "symmetricKey": {
        "primaryKey": new_key, "secondaryKey": new_key}}, "credentialPolicyName": "cache-p",
        "allocationPolicy": "static", "iotHubs": ["second.hubs.test"]})
    placed = register(other, creds("cache-6", key=derive_device_key(new_key, "cache-6")))
    assert placed["registrationState"]["assignedHub"] == "second.hubs.test"

    individual, _ = services.enrollments.put("individual", "Cache-7", {"attestation": {"type": "symmetricKey"}})
    state = register(other, creds("cache-7", key=individual.keys[0]))["registrationState"]  # not in other's id index
    assert "enrollmentGroupId" not in state["symmetricKey"]


def test_every_configuration_write_moves_the_counter_and_a_rolled_back_one_does_not(services):
    store = services.store
    before = store.config_generation()
    services.registry.create_namespace("gen-ns", "gen-p")
    after_create = store.config_generation()
    assert after_create > before
    services.registry.delete_namespace("gen-ns")  # bulk DELETE statements on policies and CAs
    assert store.config_generation() > after_create
    settled = store.config_generation()
    with pytest.raises(RuntimeError), store.session() as s:
        s.add(LinkedHub(name="doomed", host_name="doomed.hubs.test", allocation_weight=1, apply_allocation_policy=True,
                        etag="x", created_at=datetime.now(UTC)))
        s.flush()  # counted inside the transaction...
        raise RuntimeError("rolled back")
    assert store.config_generation() == settled  # ...and rolled back with it
    register_key = symmetric_group(services, "gen-group")
    moved = store.config_generation()
    assert moved > settled
    register(services, creds("gen-1", key=derive_device_key(register_key, "gen-1")))
    assert store.config_generation() == moved  # a registration is not a configuration change


def test_a_registration_reads_the_counter_once_and_no_configuration_rows(services, monkeypatch):
    key = symmetric_group(services, "quiet-group")
    register(services, creds("quiet-0", key=derive_device_key(key, "quiet-0")))  # fills the caches
    counter_reads: list[int] = []
    read = Store._read_generation

    def counting(conn):  # the counter is read on the driver directly, below SQLAlchemy's statement events
        counter_reads.append(1)
        return read(conn)

    monkeypatch.setattr(Store, "_read_generation", staticmethod(counting))
    statements, stop = statements_run(services.store)  # SQLAlchemy's and the prepared ones
    try:
        services.provisioning.register(creds("quiet-1", key=derive_device_key(key, "quiet-1")))
    finally:
        stop()
    reads = [s for s in statements if s.upper().startswith("SELECT")]
    assert len(counter_reads) == 1 and not [s for s in reads if "config_generation" in s]
    assert not [s for s in reads if "FROM enrollments" in s or "FROM policies" in s], reads
    assert not [s for s in reads if "FROM linked_hubs" in s], reads  # an unlinked hub fails the insert instead
    assert any("FROM registrations" in s for s in reads), reads  # the recorder sees the registration's own reads


def test_the_cache_is_bounded_and_reloads_after_a_change(services):
    cache: ConfigCache[str, int] = ConfigCache(services.store, capacity=2)
    loads: list[str] = []

    def load(name: str):
        return lambda: loads.append(name) or len(loads)

    assert cache.get("a", load("a")) == 1 and cache.get("a", load("a")) == 1
    cache.get("b", load("b"))
    cache.get("c", load("c"))
    assert len(cache) == 2 and cache.get("a", load("a")) == 4  # "a" was evicted
    symmetric_group(services, "bump")
    assert cache.get("a", load("a")) == 5  # the configuration changed
