"""Rotation and issuing-CA revocation racing issuance: a registration or a hub renewal decides what to sign with
before its write transaction, so a rotation (and the old CA's revocation) can commit in between. No certificate of
a CA that was retired or revoked before the issuance committed may be kept."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select, text
from tests.conftest import wait_until
from tests.x509_helpers import p384_csr

from opendps.registry.devices import IssuerRetired
from opendps.store import DeviceRecord, IssuedCertificate


def _issue_and_record(services, issuer, rid: str, tx) -> None:
    """What the RA does in its write transaction (registration and renewal through the hub): sign, then record."""
    chain = services.issuance.issue(issuer, p384_csr(rid), rid, session=tx)
    services.devices.record(tx, policy_id=issuer.policy_id, device_id=rid, registration_id=rid,
                            hub_host="localhost", certificate=chain.leaf, issuing_ca_id=issuer.ca_id,
                            now=datetime.now(UTC))


def _kept(services, rid: str) -> tuple[int, int]:
    with services.store.session() as s:
        return (s.scalar(select(func.count()).select_from(IssuedCertificate)
                         .where(IssuedCertificate.registration_id == rid)) or 0,
                s.scalar(select(func.count()).select_from(DeviceRecord).where(DeviceRecord.device_key == rid)) or 0)


@pytest.mark.parametrize("then_revoke", [False, True], ids=["rotated", "rotated-and-revoked"])
def test_a_certificate_of_an_issuing_ca_rotated_away_meanwhile_is_not_kept(services, then_revoke):
    services.registry.create_namespace("race-ns", "race-p")
    policy_id = services.registry.find_policy("race-p", "race-ns").policy_id
    stale = services.registry.issuer(policy_id)  # decided before the operator acted
    services.registry.rotate_policy("race-ns", "race-p")
    if then_revoke:
        services.registry.revoke_issuing_ca("race-ns", "race-p", format(stale.certificate.serial_number, "x"),
                                            "keyCompromise", services.issuance)
    with pytest.raises(IssuerRetired, match="'race-ns/race-p'.*rotated or revoked") as info, \
            services.store.transaction() as tx:
        _issue_and_record(services, stale, "race-dev", tx)
    assert info.value.status == 503 and info.value.info["retryAfter"] == "1"  # the device's SDK retries
    assert _kept(services, "race-dev") == (0, 0)  # rolled back: no certificate of the old CA, no record
    fresh = services.registry.issuer(policy_id)
    assert fresh.ca_id != stale.ca_id
    with services.store.transaction() as tx:
        _issue_and_record(services, fresh, "race-dev", tx)
    assert _kept(services, "race-dev") == (1, 1)


def test_a_rotation_waits_for_a_registration_still_signing_with_the_old_ca(services):
    """PostgreSQL (READ COMMITTED): the registration read its CA active; a rotation committing before the registration
    commits would leave a certificate of the retired CA, issued after the rotation was acknowledged — and a revocation
    of that CA made at once would miss it (its row not yet committed). The rotation waits for it instead."""
    if services.store.dialect != "postgresql":
        pytest.skip("SQLite's one writer serialises them already")
    services.registry.create_namespace("wait-ns", "wait-p")
    policy_id = services.registry.find_policy("wait-p", "wait-ns").policy_id
    old = services.registry.issuer(policy_id)
    signed, commit = threading.Event(), threading.Event()

    def registration() -> None:
        with services.store.transaction() as tx:
            _issue_and_record(services, old, "wait-dev", tx)
            signed.set()
            assert commit.wait(30)

    def rotation_blocked() -> bool:
        with services.store.session() as s:
            return bool(s.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                      "AND query LIKE '%certificate_authorities%FOR UPDATE%'")))

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(registration)
        assert signed.wait(30)
        rotating = pool.submit(services.registry.rotate_policy, "wait-ns", "wait-p")
        try:
            assert wait_until(lambda: rotating.done() or rotation_blocked(), timeout=10)
            assert not rotating.done(), "the rotation committed while a registration signing with the old CA was open"
        finally:
            commit.set()
        first.result(30)
        rotating.result(30)
    # the certificate was issued while its CA was active; revoking that CA now takes it with it
    revoked = services.registry.revoke_issuing_ca("wait-ns", "wait-p", format(old.certificate.serial_number, "x"),
                                                  "keyCompromise", services.issuance)
    assert revoked.leaves_revoked == 1


def test_two_revocations_of_one_issuing_ca_at_once_one_is_refused(services):
    """SQLite reads the CA outside the write transaction: both calls read it unrevoked, and the second rewrote the
    first's date and reason (and audited a second revocation). One of them must be a Conflict naming the CA."""
    if services.store.dialect != "sqlite":
        pytest.skip("PostgreSQL: the second waits on the CA row's lock (FOR UPDATE) and then reads it revoked")
    from sqlalchemy import event

    services.registry.create_namespace("twice-ns", "twice-p")
    old = services.registry.get_policy("twice-ns", "twice-p").issuing_ca
    services.registry.rotate_policy("twice-ns", "twice-p")
    both_read = threading.Barrier(2)

    def before(conn, cursor, statement, *args) -> None:  # both have read the CA unrevoked before either writes
        if statement.startswith("UPDATE config_generation"):  # a revocation's first write (SQLite's write lock)
            both_read.wait(10)

    event.listen(services.store.engine, "before_cursor_execute", before)
    try:
        with ThreadPoolExecutor(2) as pool:
            calls = [pool.submit(services.registry.revoke_issuing_ca, "twice-ns", "twice-p",
                                 format(old.serial_number, "x"), reason, services.issuance)
                     for reason in ("keyCompromise", "superseded")]
            outcomes = [c.exception(30) for c in calls]
    finally:
        event.remove(services.store.engine, "before_cursor_execute", before)
    refused = [e for e in outcomes if e is not None]
    assert len(refused) == 1 and "revoked by a concurrent call" in str(refused[0]), outcomes
    done = calls[outcomes.index(None)].result()
    shown = [ca for ca in services.registry.list_issuing_cas("twice-ns", "twice-p") if ca.status == "revoked"]
    assert [(ca.revocation_reason, ca.revoked_at) for ca in shown] == [(done.ca.revocation_reason, done.ca.revoked_at)]
