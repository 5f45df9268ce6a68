"""Registration as decide -> issue -> assign, in-process on both stores: what is written, and what is not."""

from __future__ import annotations

import base64
from types import SimpleNamespace

import pytest
from cryptography import x509
from sqlalchemy import event, func, select
from tests.unit.conftest import creds, new_key, register, statements_run, symmetric_group
from tests.x509_helpers import p384_csr

from opendps.errors import Conflict, InvalidInput, NotFound
from opendps.pki import CsrRejected
from opendps.provisioning.attestation import AttestationFailed, EnrollmentDisabled
from opendps.store import DeviceRecord, HubDevice, IssuedCertificate, Registration, Store
from opendps.transport.sas import derive_device_key

PREVIEW = "2025-07-01-preview"


@pytest.fixture
def fleet(services):
    """A namespace with a policy, and a symmetric-key group issuing under it; returns the group key."""
    services.registry.create_namespace("fleet", "ops", validity_days=3)
    return symmetric_group(services, "sensors", credentialPolicyName="ops")


def _b64(der: bytes) -> str:
    return base64.b64encode(der).decode()


def _counts(services, rid: str) -> tuple[int, int, int, int]:
    with services.store.session() as s:
        return tuple(s.scalar(select(func.count()).select_from(model).where(column == value)) or 0 for model, column, value in (
            (Registration, Registration.registration_key, rid.lower()), (HubDevice, HubDevice.device_key, rid.lower()),
            (DeviceRecord, DeviceRecord.device_key, rid.lower()),
            (IssuedCertificate, IssuedCertificate.registration_id, rid)))


def test_a_csr_registration_issues_once_and_records_everything(services, fleet):
    rid = "dev-001"
    result = register(services, creds(rid, key=derive_device_key(fleet, rid)), csr=_b64(p384_csr(rid)),
                      api_version=PREVIEW)
    state = result["registrationState"]
    assert result["status"] == "assigned" and state["substatus"] == "initialAssignment"
    assert state["symmetricKey"] == {"enrollmentGroupId": "sensors"}
    leaf, ica, root = (x509.load_der_x509_certificate(base64.b64decode(d)) for d in state["issuedCertificateChain"])
    leaf.verify_directly_issued_by(ica)
    ica.verify_directly_issued_by(root)
    assert leaf.subject.rfc4514_string() == f"CN={rid}"
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days == 3
    assert _counts(services, rid) == (1, 1, 1, 1)
    identity, keys = services.hubs.identity(services.hubs.get("default"), rid)
    assert identity.auth_type == "certificateAuthority" and keys is None  # the certificate replaces the SAS key
    record = services.devices.get("fleet", rid)
    assert record.certificate_serial == format(leaf.serial_number, "x") and record.hub_host_name == state["assignedHub"]
    assert services.provisioning.get_registration(rid)["etag"] == state["etag"]


def test_a_dps_connect_reads_the_configuration_counter_once(services, fleet, monkeypatch):
    """An MQTT CONNECT's attestation makes several cached lookups (the individual enrollment, the group; an X.509
    device's verified CAs too): one read of the configuration counter serves them all, as in a registration. Before:
    each lookup read it again, a SQL statement each."""
    rid = "dev-connect"
    credentials = creds(rid, key=derive_device_key(fleet, rid))
    services.provisioning.authenticate_connection(credentials)  # the caches filled
    reads: list[object] = []
    original = Store._read_generation
    monkeypatch.setattr(Store, "_read_generation", staticmethod(lambda conn: reads.append(conn) or original(conn)))
    services.provisioning.authenticate_connection(credentials)
    assert len(reads) == 1


def test_a_csr_registration_is_one_transaction_of_few_statements(services, fleet):
    """Issue 13: reads first, then one row per table, every statement prepared on one driver transaction (none
    through SQLAlchemy's execution, one pooled connection besides the configuration counter's); the configuration
    comes from the per-process cache."""
    rid = "dev-lean"
    services.provisioning.register(creds("warm-up", key=derive_device_key(fleet, "warm-up")),
                                   csr=_b64(p384_csr("warm-up")), api_version=PREVIEW)
    through_sqlalchemy, stop_sqlalchemy = statements_run(services.store, prepared=False)
    statements, stop = statements_run(services.store)
    checkouts: list[object] = []
    count = lambda *args: checkouts.append(args)  # noqa: E731
    event.listen(services.store.engine, "checkout", count)
    try:
        rounds = []
        for _ in range(2):  # a new device, then the same device re-registering (updates instead of inserts)
            accepted = services.provisioning.register(creds(rid, key=derive_device_key(fleet, rid)),
                                                      csr=_b64(p384_csr(rid)), api_version=PREVIEW)
            assert accepted.result is not None and accepted.result["status"] == "assigned"
            rounds.append([sql.split()[0].upper() for sql in statements])
            statements.clear()
    finally:
        stop()
        stop_sqlalchemy()
        event.remove(services.store.engine, "checkout", count)
    assert through_sqlalchemy == []
    assert len(checkouts) == 2 * 2  # per registration: the configuration counter's read, the write transaction
    first, second = rounds
    # the audit log's append, last (issue 17.4): its turn on the chain (PostgreSQL: an advisory lock, a SELECT;
    # SQLite: a no-op UPDATE taking the write lock), the head, the two entries (PostgreSQL: an INSERT each, not an
    # executemany, whose pipeline mode left the turn's HOLD_LIMIT unarmed; SQLite: one executemany)
    pg = services.store.dialect == "postgresql"
    audit = ["SELECT", "SELECT", "INSERT", "INSERT"] if pg else ["UPDATE", "SELECT", "INSERT"]
    assert first[-len(audit):] == audit and second[-len(audit):] == audit, (first, second)
    first, second = first[:-len(audit)], second[:-len(audit)]
    # registration, identity, record; 5 rows, and the request limit's upsert (INSERT ... ON CONFLICT DO UPDATE)
    assert sorted(first) == ["INSERT"] * 6 + ["SELECT"] * 3, first
    assert sorted(second) == ["INSERT"] * 3 + ["SELECT"] * 3 + ["UPDATE"] * 3, second  # certificate + operation new
    assert _counts(services, rid) == (1, 1, 1, 2)


def test_without_a_csr_the_device_keeps_its_attestation_credential_at_the_hub(services, fleet):
    rid = "dev-002"
    device_key = derive_device_key(fleet, rid)
    state = register(services, creds(rid, key=device_key))["registrationState"]
    assert "issuedCertificateChain" not in state
    identity, keys = services.hubs.identity(services.hubs.get("default"), rid)
    assert identity.auth_type == "sas" and keys[0] == device_key
    assert _counts(services, rid) == (1, 1, 1, 0)  # recorded in the namespace of the group's policy, no certificate


@pytest.mark.parametrize(("csr", "api_version", "error", "words"), [
    (lambda rid: p384_csr("someone-else"), PREVIEW, CsrRejected, "does not match the registration id"),
    (lambda rid: b"not a csr", PREVIEW, CsrRejected, "cannot be parsed"),
    (lambda rid: p384_csr(rid), "2021-06-01", InvalidInput, "needs api-version 2025-07-01-preview"),
    # not a dated version: compared as text, these sorted after every date and the CSR was taken
    *((lambda rid: p384_csr(rid), odd, InvalidInput, "needs api-version") for odd in ("abc", "\u00e9", "x" * 5000,
                                                                                      "2025-07-01x", "")),
])
def test_a_refused_registration_writes_nothing(services, fleet, csr, api_version, error, words):
    rid = "dev-003"
    with pytest.raises(error, match=words):
        services.provisioning.register(creds(rid, key=derive_device_key(fleet, rid)), csr=_b64(csr(rid)),
                                       api_version=api_version)
    assert _counts(services, rid) == (0, 0, 0, 0)


def test_a_pem_csr_that_is_not_ascii_is_a_csr_refusal_not_a_traceback(services, fleet):
    """JSON can carry a lone surrogate (``"-----BEGIN\\ud800"``): encoding that PEM text raised UnicodeEncodeError, a
    traceback on DPS and on the hub's issueCertificate alike, instead of refusing the CSR."""
    rid = "dev-003"
    for text in ("-----BEGIN CERTIFICATE REQUEST-----\ud800", "-----BEGIN CERTIFICATE REQUEST-----\n\u00e9"):
        with pytest.raises(CsrRejected, match="PEM CSR text must be ASCII"):
            services.provisioning.register(creds(rid, key=derive_device_key(fleet, rid)), csr=text, api_version=PREVIEW)
    assert _counts(services, rid) == (0, 0, 0, 0)


def test_a_hub_unlinked_after_the_decision_fails_the_write_and_leaves_nothing(services, fleet, monkeypatch):
    """The write transaction does not re-read the allocated hub: its foreign key refuses the identity instead."""
    gone = services.hubs.create("gone", "gone.hubs.test")
    services.hubs.delete("gone")
    monkeypatch.setattr(services.hubs, "list", lambda: [gone])  # the allocation saw the hub before it was unlinked
    rid = "dev-unlinked"
    with pytest.raises(Conflict, match="hub was unlinked") as info:
        services.provisioning.register(creds(rid, key=derive_device_key(fleet, rid)), csr=_b64(p384_csr(rid)),
                                       api_version=PREVIEW)
    assert info.value.status == 409
    assert _counts(services, rid) == (0, 0, 0, 0)


def test_a_csr_needs_an_enrollment_with_a_policy(services):
    key = symmetric_group(services, "no-policy")
    with pytest.raises(InvalidInput, match="has no credentialPolicyName"):
        services.provisioning.register(creds("dev-004", key=derive_device_key(key, "dev-004")),
                                       csr=_b64(p384_csr("dev-004")), api_version=PREVIEW)


def test_refusals_before_anything_is_read(services, fleet):
    with pytest.raises(AttestationFailed, match="unknown ID scope"):
        services.provisioning.register(creds("dev-005", key=fleet, scope="0ne00OTHER1"))
    with pytest.raises(AttestationFailed, match="no credential presented: .* or [(]TPM[)] the body's tpm member") as info:
        services.provisioning.register(creds("dev-005"))
    assert info.value.error_code == 401000
    with pytest.raises(InvalidInput, match="registration id"):
        services.provisioning.register(creds("bad id!", key=fleet))
    services.enrollments.put("group", "sensors", {"attestation": {"type": "symmetricKey"},
                                                  "credentialPolicyName": "ops", "provisioningStatus": "disabled"})
    with pytest.raises(EnrollmentDisabled, match="enrollment group 'sensors' is disabled") as info:
        services.provisioning.register(creds("dev-005", key=derive_device_key(fleet, "dev-005")))
    assert info.value.status == 403


def test_a_poll_is_answered_only_for_its_own_registration(services, fleet):
    a, b = creds("dev-006", key=derive_device_key(fleet, "dev-006")), creds("dev-007", key=derive_device_key(fleet, "dev-007"))
    accepted = services.provisioning.register(a)
    services.provisioning.register(b)
    with pytest.raises(NotFound, match="does not exist for registration 'dev-007'"):
        services.provisioning.operation(b, accepted.operation_id)
    with pytest.raises(AttestationFailed):
        services.provisioning.operation(creds("dev-006", key=fleet), accepted.operation_id)  # the group key itself


def test_a_poll_for_an_operation_id_no_operation_can_have_is_a_404(services, fleet):
    """An MQTT poll's operationId is URL-decoded: ``%00`` reached PostgreSQL as a key holding U+0000, a DataError (a
    traceback, the device's connection dropped) instead of the 404 any unknown operation gets."""
    device = creds("dev-012", key=derive_device_key(fleet, "dev-012"))
    accepted = services.provisioning.register(device)
    for operation_id in ("\x00", accepted.operation_id + "\x00", "x" * 97):  # polls are limited to 5 per 10 s
        with pytest.raises(NotFound, match="does not exist for registration") as info:
            services.provisioning.operation(device, operation_id)
        assert info.value.error_code == 404203
    assert services.provisioning.operation(device, accepted.operation_id)["status"] == "assigned"


def test_a_status_lookup_or_poll_for_a_registration_id_no_device_can_have_is_refused_first(services, fleet):
    """The registration id (the URL's, as sent) is checked before the request limit keys a row by it: 200 characters
    were too long for PostgreSQL's column and a NUL one it cannot hold, both a DataError (a 500)."""
    for rid in ("x" * 200, "a\x00b", "dev-013\n"):
        device = creds(rid, key=derive_device_key(fleet, "dev-013"))
        with pytest.raises(InvalidInput, match="registration id .* is invalid"):
            services.provisioning.status(device)
        with pytest.raises(InvalidInput, match="registration id .* is invalid"):
            services.provisioning.operation(device, "0" * 32)


def test_polls_and_status_lookups_without_the_credential_do_not_use_up_the_devices_allowance(services, fleet):
    """Counted before the attestation, 5 requests without any credential (or with a wrong one) kept the device itself
    from polling and looking up its status (429) for as long as they went on; now only proven requests count, as
    registrations do."""
    from opendps.errors import Throttled

    rid = "dev-starved"
    device, nobody, forger = creds(rid, key=derive_device_key(fleet, rid)), creds(rid), creds(rid, key=new_key())
    accepted = services.provisioning.register(device)
    for _ in range(8):
        for stranger in (nobody, forger):
            with pytest.raises(AttestationFailed):
                services.provisioning.operation(stranger, accepted.operation_id)
            with pytest.raises(AttestationFailed):
                services.provisioning.status(stranger)
    assert services.provisioning.operation(device, accepted.operation_id)["status"] == "assigned"
    assert services.provisioning.status(device)["status"] == "assigned"
    for _ in range(3):
        services.provisioning.status(device)
    with pytest.raises(Throttled):  # the device's own requests still count: 5 per 10 s
        services.provisioning.operation(device, accepted.operation_id)
    with pytest.raises(Throttled):  # and a refusal seen is answered before any attestation, even to strangers
        services.provisioning.status(nobody)


def test_an_unknown_operation_id_is_named_cut_short(services, fleet):
    """The poll's operation id is the peer's (up to 64 KB in an MQTT topic): the 404 named it whole."""
    device = creds("dev-014", key=derive_device_key(fleet, "dev-014"))
    services.provisioning.register(device)
    with pytest.raises(NotFound, match="does not exist for registration") as info:
        services.provisioning.operation(device, "a" * 60_000)
    assert len(info.value.message) < 300


def test_renewal_through_the_hub_issues_under_the_same_policy_and_updates_the_records(services, fleet):
    rid = "dev-008"
    state = register(services, creds(rid, key=derive_device_key(fleet, rid)), csr=_b64(p384_csr(rid)),
                     api_version=PREVIEW)["registrationState"]
    first = x509.load_der_x509_certificate(base64.b64decode(state["issuedCertificateChain"][0]))
    chain = services.provisioning.renew_through_hub(state["assignedHub"], rid, p384_csr(rid))
    assert chain.leaf.serial_number != first.serial_number and chain.issuing_ca.subject == first.issuer
    assert services.devices.get("fleet", rid).certificate_serial == format(chain.leaf.serial_number, "x")
    with services.store.session() as s:
        assert s.get(Registration, rid).certificate_serial == format(chain.leaf.serial_number, "x")
    assert _counts(services, rid)[3] == 2
    with pytest.raises(CsrRejected, match="does not match the registration id"):
        services.provisioning.renew_through_hub(state["assignedHub"], rid, p384_csr("other"))


def test_renewal_decisions_refuse_devices_dps_did_not_provision_here(services, fleet):
    rid = "dev-009"
    state = register(services, creds(rid, key=derive_device_key(fleet, rid)))["registrationState"]
    with pytest.raises(InvalidInput, match="was not provisioned to this hub by DPS") as info:
        services.provisioning.renew_through_hub("elsewhere.hubs.test", rid, p384_csr(rid))
    assert info.value.error_code == 400006
    services.enrollments.put("group", "sensors", {"attestation": {"type": "symmetricKey"},
                                                  "credentialPolicyName": "ops", "provisioningStatus": "disabled"})
    with pytest.raises(InvalidInput, match="enrollment of device 'dev-009' is disabled"):
        services.provisioning.renew_through_hub(state["assignedHub"], rid, p384_csr(rid))
    symmetric_group(services, "plain")
    rid = "dev-010"
    plain_key = services.enrollments.get("group", "plain").keys[0]
    state = register(services, creds(rid, key=derive_device_key(plain_key, rid)))["registrationState"]
    with pytest.raises(InvalidInput, match="has no credential policy"):
        services.provisioning.renew_through_hub(state["assignedHub"], rid, p384_csr(rid))


def test_deleting_the_registration_state_makes_the_next_one_initial_again(services, fleet):
    rid = "dev-011"
    c = creds(rid, key=derive_device_key(fleet, rid))
    register(services, c)
    services.provisioning.delete_registration(rid)
    with pytest.raises(NotFound):
        services.provisioning.get_registration(rid)
    assert register(services, c)["registrationState"]["substatus"] == "initialAssignment"
    assert services.provisioning.list_registrations("SENSORS")[0]["registrationId"] == rid  # ids case-insensitive


def test_registration_ids_are_case_insensitive_and_recorded_lower_cased(services, fleet):
    """Issue 12.6: Upper-1 then upper-1 is one device, whose identity, certificate and state agree."""
    from datetime import UTC, datetime

    states = []
    for sent in ("Upper-1", "upper-1"):
        key = derive_device_key(fleet, sent)  # the device derives its key from the id as it sends it
        states.append(register(services, creds(sent, key=key), csr=_b64(p384_csr(sent)),
                               api_version=PREVIEW)["registrationState"])
    for state in states:
        leaf = x509.load_der_x509_certificate(base64.b64decode(state["issuedCertificateChain"][0]))
        assert (state["registrationId"], state["deviceId"], leaf.subject.rfc4514_string()) == (
            "upper-1", "upper-1", "CN=upper-1")
    hub = services.hubs.get("default")
    assert [d.device_id for d in services.hubs.list_devices("default")] == ["upper-1"]
    chain = [x509.load_der_x509_certificate(base64.b64decode(d)) for d in states[1]["issuedCertificateChain"]]
    device = services.hub_auth.authenticate(hub, "upper-1", "upper-1", None, chain[:2], datetime.now(UTC))
    assert device.device_id == "upper-1"
    assert _counts(services, "upper-1") == (1, 1, 1, 2)


def test_registrations_are_limited_per_device_after_attestation(services, fleet):
    """Issue 12.4: one registration id cannot get certificate after certificate (10 a minute, then 429)."""
    from opendps.errors import Throttled

    rid, bad = "looper", creds("looper", key=new_key())
    for _ in range(8):  # without the credential nobody uses up the device's allowance
        with pytest.raises(AttestationFailed):
            services.provisioning.register(bad)
    good = creds(rid, key=derive_device_key(fleet, rid))
    for _ in range(10):
        services.provisioning.register(good, csr=_b64(p384_csr(rid)), api_version=PREVIEW)
    with pytest.raises(Throttled, match="at most 10 per 60 s") as info:
        services.provisioning.register(good, csr=_b64(p384_csr(rid)), api_version=PREVIEW)
    assert info.value.status == 429 and int(info.value.info["retryAfter"]) >= 1
    assert _counts(services, rid)[3] == 10
    for i in range(40):  # a factory burst of distinct devices is not hurt
        other = f"burst-{i}"
        services.provisioning.register(creds(other, key=derive_device_key(fleet, other)))


def test_the_service_limit_is_a_token_bucket():
    from opendps.errors import Throttled
    from opendps.provisioning.throttle import ServiceLimit

    limit = ServiceLimit(rate=10, burst=3)
    for _ in range(3):
        limit.take(now=100.0)
    with pytest.raises(Throttled, match="more than 10 registrations per second") as info:
        limit.take(now=100.0)
    assert info.value.info["retryAfter"] == "1"
    limit.take(now=100.2)  # tokens come back at the rate (1/rate seconds each)


def test_the_namespace_registry_lists_in_keyset_pages(services, fleet):
    for rid in ("reg-b", "Reg-A", "reg-c"):
        register(services, creds(rid, key=derive_device_key(fleet, rid)), csr=_b64(p384_csr(rid)), api_version=PREVIEW)
    assert [v.device_id for v in services.devices.list("fleet")] == ["reg-a", "reg-b", "reg-c"]
    assert [v.device_id for v in services.devices.list("fleet", top=2)] == ["reg-a", "reg-b"]
    assert [v.device_id for v in services.devices.list("fleet", top=2, after="REG-B")] == ["reg-c"]
    assert services.devices.list("fleet", after="reg-c") == []


def test_the_certificate_issued_line_is_written_only_once_the_registration_commits(services, caplog, monkeypatch):
    """"certificate ... issued" was logged inside the registration's transaction, so also when it then failed (a full
    disk at the commit, any later step) and nothing was issued after all."""
    import base64
    import logging

    from tests.unit.conftest import creds, register, symmetric_group
    from tests.x509_helpers import p384_csr

    from opendps.transport.sas import derive_device_key

    services.registry.create_namespace("line-ns", "ops")
    key = symmetric_group(services, "line-g", credentialPolicyName="ops")
    caplog.set_level(logging.INFO, logger="opendps")

    def attempt(rid: str) -> dict:
        return register(services, creds(rid, key=derive_device_key(key, rid)),
                        csr=base64.b64encode(p384_csr(rid)).decode(), api_version="2025-07-01-preview")

    def place_fails(*_a, **_k):
        raise RuntimeError("a later step of the registration fails")

    with monkeypatch.context() as m:
        m.setattr(services.hubs, "place_device", place_fails)
        with pytest.raises(RuntimeError):
            attempt("line-dev-1")
    assert not [r for r in caplog.records if "issued to 'line-dev-1'" in r.getMessage()]
    assert attempt("line-dev-2")["status"] == "assigned"
    assert len([r for r in caplog.records if "issued to 'line-dev-2'" in r.getMessage()]) == 1


def test_operation_sweeps_follow_the_monotonic_clock(services, fleet, monkeypatch):
    """A wall clock stepped back paused the 10-minute operation sweep for the step's length (its last time lay in the
    future): the interval is a monotonic one now."""
    import opendps.provisioning.registration as registration_module

    swept: list[object] = []
    real = services.provisioning.sweep_operations
    monkeypatch.setattr(services.provisioning, "sweep_operations", lambda now=None: swept.append(now) or real(now))
    clock = [5000.0]
    monkeypatch.setattr(registration_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    services.provisioning._swept_at = None
    for i in range(2):
        register(services, creds(f"sweep-{i}", key=derive_device_key(fleet, f"sweep-{i}")))
    assert len(swept) == 1  # the first registration sweeps, the next not
    clock[0] += registration_module.SWEEP_EVERY.total_seconds() + 1
    register(services, creds("sweep-2", key=derive_device_key(fleet, "sweep-2")))
    assert len(swept) == 2
