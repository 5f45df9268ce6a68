"""Two writers of one resource at once, on SQLite and PostgreSQL: the second waits for or loses to the first —
no change lost, never two winners of one If-Match, never a database error (a 500) for a lost insert race.

Each test makes both writers read the row before either writes (a barrier after the read), the interleaving a
storm of HTTP clients hit: on SQLite a session's reads run before its transaction begins, on PostgreSQL each
statement reads what is committed, so a read-modify-write that does not take the row first loses an update.
"""

from __future__ import annotations

import base64
import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import func, select
from tests.unit.conftest import creds
from tests.x509_helpers import p384_csr

from opendps import audit
from opendps.errors import OpenDPSError, PreconditionFailed
from opendps.hub import registry as hub_registry
from opendps.provisioning.attestation import AttestationFailed
from opendps.store import CertificateAuthority, Registration


def race(monkeypatch, owner: object, method: str, *calls: Callable[[], Any], before: bool = False) -> list[Any]:
    """Run ``calls`` at once, each pausing after ``owner.method`` returns (``before``: before it is called) until every
    one got there (or 1 s: a writer that holds the row keeps the others from getting there). Returns results, or the
    exceptions raised."""
    original = getattr(owner, method)
    barrier = threading.Barrier(len(calls))

    def paused(*args: Any, **kwargs: Any) -> Any:
        if before:
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(timeout=1)
        result = original(*args, **kwargs)
        if not before:
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(timeout=1)
        return result

    monkeypatch.setattr(owner, method, paused)

    def run(call: Callable[[], Any]) -> Any:
        try:
            return call()
        except OpenDPSError as exc:
            return exc

    with ThreadPoolExecutor(len(calls)) as pool:
        results = list(pool.map(run, calls))
    monkeypatch.setattr(owner, method, original)
    return results


def kinds(results: list[Any]) -> list[str]:
    return sorted(type(r).__name__ if isinstance(r, Exception) else "ok" for r in results)


def test_concurrent_twin_patches_lose_no_update(services, monkeypatch):
    hubs = services.hubs
    hubs.create_device("default", "twin-race")
    before = hubs.get_device("default", "twin-race")
    results = race(monkeypatch, hubs, "_device_row",
                   lambda: hubs.update_twin("default", "twin-race", desired={"a": 1}),
                   lambda: hubs.update_twin("default", "twin-race", desired={"b": 2}))
    assert kinds(results) == ["ok", "ok"], results
    after = hubs.get_device("default", "twin-race")
    assert after.desired == {"a": 1, "b": 2}  # the old code kept one of them
    assert after.desired_version == before.desired_version + 2
    assert sorted(r.desired_version for r in results) == [before.desired_version + 1, before.desired_version + 2]


def test_one_if_match_has_one_winner(services, monkeypatch):
    hubs = services.hubs
    hubs.create_device("default", "etag-race")
    etag = hubs.get_device("default", "etag-race").etag
    results = race(monkeypatch, hubs, "_device_row",
                   lambda: hubs.update_twin("default", "etag-race", tags={"x": 1}, if_match=etag),
                   lambda: hubs.replace_twin("default", "etag-race", tags={"y": 2}, if_match=etag))
    assert kinds(results) == ["PreconditionFailed", "ok"], results
    results = race(monkeypatch, hubs, "_device_row",
                   lambda: hubs.delete_device("default", "etag-race"),
                   lambda: hubs.delete_device("default", "etag-race"))
    assert kinds(results) == ["NotFound", "ok"], results


def test_creating_one_device_or_hub_twice_at_once_is_a_conflict(services, monkeypatch):
    hubs = services.hubs
    results = race(monkeypatch, hubs, "_find",
                   lambda: hubs.create_device("default", "twice"), lambda: hubs.create_device("default", "twice"))
    assert kinds(results) in (["Conflict", "ok"], ["ok", "ok"]), results  # never the database's IntegrityError
    assert [d.device_id for d in hubs.list_devices("default")].count("twice") == 1
    results = race(monkeypatch, hub_registry, "check_host_name",
                   lambda: hubs.create("twin-hub"), lambda: hubs.create("twin-hub"))
    assert sorted(kinds(results)) == ["Conflict", "ok"], results


def test_enrollments_created_updated_and_deleted_twice_at_once(services, monkeypatch):
    enrollments = services.enrollments
    doc = {"attestation": {"type": "symmetricKey"}}
    results = race(monkeypatch, enrollments, "_normalise",
                   lambda: enrollments.put("individual", "en-race", doc),
                   lambda: enrollments.put("individual", "en-race", doc))
    assert kinds(results) == ["Conflict", "ok"], results  # was an IntegrityError: a 500
    results = race(monkeypatch, enrollments, "_normalise",  # ids are one ignoring case: no constraint said so
                   lambda: enrollments.put("individual", "Case-Race", doc),
                   lambda: enrollments.put("individual", "case-race", doc))
    assert kinds(results) == ["Conflict", "ok"], results  # was two enrollments
    assert [e.enrollment_id.lower() for e in enrollments.list("individual")].count("case-race") == 1
    etag = enrollments.get("individual", "en-race").etag
    results = race(monkeypatch, enrollments, "_normalise",
                   lambda: enrollments.put("individual", "en-race", {**doc, "initialTwin": {"tags": {"a": 1}}},
                                           if_match=etag),
                   lambda: enrollments.put("individual", "en-race", {**doc, "initialTwin": {"tags": {"b": 1}}},
                                           if_match=etag))
    assert kinds(results) == ["PreconditionFailed", "ok"], results
    assert isinstance([r for r in results if isinstance(r, Exception)][0], PreconditionFailed)
    results = race(monkeypatch, enrollments, "_row",
                   lambda: enrollments.delete("individual", "en-race"),
                   lambda: enrollments.delete("individual", "en-race"))
    assert kinds(results) == ["NotFound", "ok"], results
    deleted = [e for e in audit.AuditLog(services.store).list() if e.action == "enrollment.deleted"]
    assert len(deleted) == 1  # one deletion, one entry (there were two)


def test_concurrent_rotations_leave_one_active_issuing_ca(services, monkeypatch):
    registry = services.registry
    registry.create_namespace("rot-ns", "rot-p")
    results = race(monkeypatch, registry.keys, "generate",
                   lambda: registry.rotate_policy("rot-ns", "rot-p"), lambda: registry.rotate_policy("rot-ns", "rot-p"))
    assert kinds(results) == ["ok", "ok"], results
    with services.store.session() as s:
        statuses = s.scalars(select(CertificateAuthority.status).where(CertificateAuthority.policy_id.is_not(None))
                             .order_by(CertificateAuthority.id)).all()
    assert statuses == ["retired", "retired", "active"]  # was two active issuing CAs


def test_an_access_policy_deleted_twice_at_once_is_deleted_once(services, monkeypatch):
    access = services.access_policies
    access.put("twice-deleted", "EnrollmentRead")
    results = race(monkeypatch, access, "_lock_all",
                   lambda: access.delete("twice-deleted"), lambda: access.delete("twice-deleted"))
    assert kinds(results) == ["NotFound", "ok"], results


def test_an_individual_enrollment_deleted_while_its_device_registers_leaves_no_registration(services, monkeypatch):
    """Deleting an individual enrollment deletes its registration state: a registration decided before the delete
    and written after it left a registration of an enrollment that no longer exists."""
    services.registry.create_namespace("del-ns", "del-p")
    view, _ = services.enrollments.put("individual", "del-dev", {"attestation": {"type": "symmetricKey"},
                                                                 "credentialPolicyName": "del-p"})
    assert view.keys is not None
    decide = services.provisioning._decide

    def decide_then_delete(*args: Any, **kwargs: Any) -> Any:
        decision = decide(*args, **kwargs)
        services.enrollments.delete("individual", "del-dev")
        return decision

    monkeypatch.setattr(services.provisioning, "_decide", decide_then_delete)
    csr = base64.b64encode(p384_csr("del-dev")).decode()
    with pytest.raises(AttestationFailed, match="was deleted"):
        services.provisioning.register(creds("del-dev", key=view.keys[0]), csr=csr, api_version="2025-07-01-preview")
    with services.store.session() as s:
        assert s.scalar(select(func.count()).select_from(Registration)) == 0


def test_a_route_deleted_twice_at_once_is_deleted_once(services, monkeypatch):
    routes = services.routes
    body = {"properties": {"url": "nats://127.0.0.1:4222", "durable": False}}
    view, _ = routes.put("default", "twice", body)
    results = race(monkeypatch, routes, "_route",
                   lambda: routes.delete("default", "twice"), lambda: routes.delete("default", "twice"))
    assert kinds(results) == ["NotFound", "ok"], results
    routes.put("default", "twice", body)
    etag = routes.get("default", "twice").etag
    results = race(monkeypatch, routes, "_route",
                   lambda: routes.delete("default", "twice", if_match=etag),
                   lambda: routes.delete("default", "twice", if_match=etag))
    assert kinds(results) in (["NotFound", "ok"], ["PreconditionFailed", "ok"]), results


def test_two_owner_key_renewals_at_once_both_take_effect(services, monkeypatch):
    """Each renewal read the pair, then wrote its own: of a primary and a secondary renewal at once, the later write put
    back the primary the other had just replaced, so that caller was handed a key that never worked."""
    hubs = services.hubs
    hubs.create("keys-race")
    results = race(monkeypatch, hubs, "owner_keys",
                   lambda: hubs.renew_owner_key("keys-race", "primary"),
                   lambda: hubs.renew_owner_key("keys-race", "secondary"))
    assert kinds(results) == ["ok", "ok"], results
    stored = hubs.owner_keys("keys-race")
    by_which = dict(zip(("primary", "secondary"), results, strict=True))
    assert stored[0] == by_which["primary"][0] and stored[1] == by_which["secondary"][1]
    assert stored in results  # the one that went last was handed what is stored


def test_a_linked_hub_deleted_twice_at_once_is_deleted_once(services, monkeypatch):
    """Both deletes read the hub, then each deleted it: the second one's ORM delete matched no row (StaleDataError,
    a 500); now one is deleted and the other finds it gone (404)."""
    hubs = services.hubs
    hubs.create("gone-race")
    results = race(monkeypatch, hubs, "get", lambda: hubs.delete("gone-race"), lambda: hubs.delete("gone-race"))
    assert kinds(results) == ["NotFound", "ok"], results


def test_a_namespace_deleted_twice_at_once_is_deleted_once(services, monkeypatch):
    """The second delete's ORM delete matched no row (StaleDataError, a 500); now it finds the namespace gone (404)."""
    registry = services.registry
    registry.create_namespace("ns-race", "ns-race-p", 30)
    results = race(monkeypatch, registry.referrers, "enrollments_using_policies",
                   lambda: registry.delete_namespace("ns-race"), lambda: registry.delete_namespace("ns-race"))
    assert kinds(results) == ["NotFound", "ok"], results


def test_one_etag_generates_one_verification_code(services, monkeypatch):
    """Two code generations with one etag both answered a code and only the last one worked (the other caller's proof
    then failed); now one gets the code and the other 412. Two deletes at once: one 204, one 404 (was a 500)."""
    from tests.x509_helpers import make_ca

    certs = services.ca_certificates
    view, _ = certs.upload("pop-race", make_ca("pop-race").pem)
    results = race(monkeypatch, certs, "_get",
                   lambda: certs.generate_verification_code("pop-race", if_match=view.etag),
                   lambda: certs.generate_verification_code("pop-race", if_match=view.etag))
    assert kinds(results) == ["PreconditionFailed", "ok"], results
    results = race(monkeypatch, certs, "_get", lambda: certs.delete("pop-race"), lambda: certs.delete("pop-race"))
    assert kinds(results) == ["NotFound", "ok"], results


def test_a_registration_deleted_twice_at_once_is_deleted_once(services, monkeypatch):
    """The second delete's ORM delete matched no row (StaleDataError, a 500); now it finds the registration gone."""
    from opendps.provisioning import registration as registration_module

    view, _ = services.enrollments.put("individual", "reg-race", {"attestation": {"type": "symmetricKey"}})
    assert view.keys is not None
    services.provisioning.register(creds("reg-race", key=view.keys[0]))
    provisioning = services.provisioning
    results = race(monkeypatch, registration_module, "take_row",  # both have read it, neither has taken it
                   lambda: provisioning.delete_registration("reg-race"),
                   lambda: provisioning.delete_registration("reg-race"), before=True)
    assert kinds(results) == ["NotFound", "ok"], results
    deleted = [e for e in audit.AuditLog(services.store).list() if e.action == audit.REGISTRATION_DELETED]
    assert len(deleted) == 1  # one audit entry for the one delete
