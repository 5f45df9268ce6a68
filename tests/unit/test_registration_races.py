"""The registration lifecycle against itself, on SQLite and PostgreSQL: a registration state deleted, a hub device
deleted or a second register of the same id landing while a device registers (or renews through its hub). Each
ends as if one of them ran entirely before the other: no operation, certificate or hub identity without the
registration that names it, never a database error.

Most tests run the other writer inside the registration where it has read what it goes on to write (a hook on the
call that follows the read): the interleaving two nodes, or two domain threads, produce; the renewal's uses the
barrier of ``test_concurrent_writes.race``. An enrollment group deleted meanwhile needs nothing: the registration
writes no row the delete touches (a registration of a deleted group is what one made just before it leaves too).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pytest
from cryptography import x509
from sqlalchemy import func, select
from tests.unit.conftest import creds, register, symmetric_group
from tests.unit.test_concurrent_writes import kinds, race
from tests.x509_helpers import p384_csr

from opendps import audit
from opendps.provisioning import allocation
from opendps.store import HubDevice, IssuedCertificate, Operation, Registration
from opendps.transport.sas import derive_device_key

PREVIEW = "2025-07-01-preview"


def once(run: Callable[[], Any], then: Callable[..., Any]) -> Callable[..., Any]:
    """``then`` with ``run`` called before its first call only."""
    pending = [run]

    def hooked(*args: Any, **kwargs: Any) -> Any:
        while pending:
            pending.pop()()
        return then(*args, **kwargs)

    return hooked


def _rows(services, model, column, value) -> int:
    with services.store.session() as s:
        return s.scalar(select(func.count()).select_from(model).where(column == value)) or 0


def _fleet(services, name: str) -> str:
    services.registry.create_namespace(f"{name}-ns", f"{name}-p")
    return symmetric_group(services, f"{name}-g", credentialPolicyName=f"{name}-p")


def _serial(result: dict[str, Any]) -> str:
    leaf = base64.b64decode(result["registrationState"]["issuedCertificateChain"][0])
    return format(x509.load_der_x509_certificate(leaf).serial_number, "x")


def test_a_registration_deleted_while_its_device_registers_again_is_not_lost(services, monkeypatch):
    """The re-registration read the registration, the delete went through, then the re-registration updated a row
    that was gone: its operation said assigned with a new certificate, hub identity and device record, and no
    registration named any of them. Now the registration is read once its write transaction holds the store."""
    key = _fleet(services, "redel")
    rid = "redel-dev"
    device = creds(rid, key=derive_device_key(key, rid))
    register(services, device, csr=base64.b64encode(p384_csr(rid)).decode(), api_version=PREVIEW)
    provisioning = services.provisioning
    monkeypatch.setattr(provisioning.issuance, "issue",
                        once(lambda: provisioning.delete_registration(rid), provisioning.issuance.issue))
    result = register(services, device, csr=base64.b64encode(p384_csr(rid)).decode(), api_version=PREVIEW)
    assert result["status"] == "assigned"
    with services.store.session() as s:
        reg = s.get(Registration, rid)
        assert reg is not None, "the re-registration's registration was lost"
        assert reg.certificate_serial == _serial(result)
        assert reg.etag == result["registrationState"]["etag"]
    # as a registration after the delete: a first assignment, and the hub identity kept
    assert result["registrationState"]["substatus"] == "initialAssignment"
    assert _rows(services, IssuedCertificate, IssuedCertificate.registration_id, rid) == 2
    assert services.hubs.get_device("default", rid).device_id == rid


def test_a_registration_deleted_between_its_read_and_its_write_is_registered_anew(services, monkeypatch):
    """PostgreSQL reads what is committed at each statement: a delete committed after the registration read its row
    (here: while the hub identity is placed) made the registration's UPDATE match nothing. SQLite cannot interleave
    so: the registration holds the write lock from its first write, before that read."""
    if services.store.dialect != "postgresql":
        pytest.skip("SQLite's write lock, held from the registration's first write, keeps the delete out")
    key = _fleet(services, "midel")
    rid = "midel-dev"
    device = creds(rid, key=derive_device_key(key, rid))
    register(services, device)
    provisioning, hubs = services.provisioning, services.hubs
    monkeypatch.setattr(hubs, "place_device", once(lambda: provisioning.delete_registration(rid), hubs.place_device))
    result = register(services, device)
    assert result["status"] == "assigned"
    assert provisioning.get_registration(rid)["etag"] == result["registrationState"]["etag"]
    assert result["registrationState"]["substatus"] == "initialAssignment"  # as if the delete came first
    # the first registration's operation went with its deleted state; this one's was written after the delete
    assert _rows(services, Operation, Operation.registration_key, rid) == 1


def test_two_registrations_of_one_id_at_once_leave_one_hub_identity(services, monkeypatch):
    """A device retrying while its first register is under way, each allocated another hub (a custom webhook
    answering by load): the second read the registration before the first moved the device from hub A to B, so it
    'stayed' on A — a new identity there — and the identity on B was left behind, named by no registration."""
    key = symmetric_group(services, "twice-g")
    hubs, provisioning = services.hubs, services.provisioning
    rid = "twice-dev"
    device = creds(rid, key=derive_device_key(key, rid))
    register(services, device)  # on hub A, the only one
    hub_a, hub_b = hubs.get("default"), hubs.create("twice-b")
    hubs.update_twin("default", rid, tags={"kept": 1})
    answers = [hub_a, hub_b]  # the second register (outer) is answered A, the first (inner) B
    monkeypatch.setattr(provisioning, "_allocate", lambda identity, payload: allocation.Allocation(answers.pop(0)))
    limit = provisioning.registration_limit
    first: list[dict[str, Any]] = []
    monkeypatch.setattr(limit, "check", once(lambda: first.append(register(services, device)), limit.check))
    second = register(services, device)
    assert first[0]["registrationState"]["assignedHub"] == hub_b.host_name
    assert second["registrationState"]["assignedHub"] == hub_a.host_name
    assert second["registrationState"]["substatus"] == "deviceDataMigrated"  # moved back from B, as it was on B
    identities = [h.name for h in (hub_a, hub_b) if _rows(services, HubDevice, HubDevice.hub_id, h.id)]
    assert identities == ["default"], identities  # was both: B's identity left behind
    assert hubs.get_device("default", rid).tags == {"kept": 1}  # the twin came along both ways
    assert provisioning.get_registration(rid)["assignedHub"] == hub_a.host_name


def test_a_hub_device_deleted_while_its_device_registers_again_is_created_anew(services, monkeypatch):
    """The registration read the hub identity, the hub's delete went through, then the registration updated a row
    that was gone (PostgreSQL): assigned to a hub where the device did not exist. Now it is created anew, as if the
    delete came first. SQLite cannot interleave so (the registration holds the write lock before that read)."""
    if services.store.dialect != "postgresql":
        pytest.skip("SQLite's write lock, held from the registration's first write, keeps the delete out")
    key = symmetric_group(services, "hubdel-g")
    rid = "hubdel-dev"
    device = creds(rid, key=derive_device_key(key, rid))
    register(services, device)
    hubs = services.hubs
    wrap = hubs.keys.wrap  # the identity's SAS keys are wrapped between its read and its write

    def delete_first(data: bytes, label: str) -> bytes:
        if label.startswith("hub-device:") and not deleted:
            deleted.append(True)
            hubs.delete_device("default", rid)
        return wrap(data, label)

    deleted: list[bool] = []
    monkeypatch.setattr(hubs.keys, "wrap", delete_first)
    result = register(services, device)
    assert deleted and result["status"] == "assigned"
    identity = hubs.get_device("default", rid)  # was NotFound: assigned to a hub without the device
    assert identity.status == "enabled"




def test_a_registration_deleted_while_its_device_renews_through_the_hub(services, monkeypatch):
    """The renewal read the registration, a delete of it committed, then the renewal's ORM update of the row matched
    nothing: StaleDataError, a 500 (PostgreSQL). Now either goes first, whole: here both pause before their audit
    entry (the delete holding the row), and the renewal's certificate stands, the registration gone."""
    key = _fleet(services, "renew")
    rid = "renew-dev"
    state = register(services, creds(rid, key=derive_device_key(key, rid)),
                     csr=base64.b64encode(p384_csr(rid)).decode(), api_version=PREVIEW)["registrationState"]
    provisioning = services.provisioning
    results = race(monkeypatch, audit, "append",
                   lambda: provisioning.renew_through_hub(state["assignedHub"], rid, p384_csr(rid)),
                   lambda: provisioning.delete_registration(rid), before=True)
    assert kinds(results) == ["ok", "ok"], results  # was StaleDataError (PostgreSQL)
    assert _rows(services, Registration, Registration.registration_key, rid) == 0
    serial = format(next(r for r in results if r is not None).leaf.serial_number, "x")
    assert _rows(services, IssuedCertificate, IssuedCertificate.serial, serial) == 1
    assert services.devices.get("renew-ns", rid).certificate_serial == serial
