"""The audit log (issue 17.4), in-process on both stores: the chain and its check against raw-SQL tampering,
appends from many threads, and the entries domain actions leave (and do not leave)."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import func, select, text
from tests.unit.conftest import creds, register, symmetric_group
from tests.x509_helpers import make_ca, make_leaf, p384_csr

from opendps import audit
from opendps.frontends import build
from opendps.pki import CsrRejected, serial_hex, thumbprint
from opendps.provisioning import registration as registration_module
from opendps.provisioning.access import OWNER_POLICY, OWNER_RIGHTS
from opendps.store import IssuedCertificate
from opendps.transport import sas
from opendps.transport.sas import derive_device_key

PREVIEW = "2025-07-01-preview"
COLUMNS = "created_at, action, actor, namespace, device_id, subject, details, prev_hash, hash"


def _fill(store, count: int = 5) -> None:
    """An audit log of ``count`` entries (whatever was there before is gone)."""
    with store.engine.begin() as c:
        c.execute(text("DELETE FROM audit_log"))
    for i in range(1, count + 1):
        with store.session() as s:
            audit.append(s, "test.appended", namespace="ns", device=f"Dev-{i}", subject=f"s-{i}", details={"i": i},
                         actor="tester")


def _sql(store, *statements: tuple[str, dict]) -> None:
    with store.engine.begin() as c:
        for statement, params in statements:
            c.execute(text(statement), params)


def _row(store, seq: int) -> dict:
    with store.engine.connect() as c:
        return dict(c.execute(text(f"SELECT {COLUMNS} FROM audit_log WHERE seq = :s"), {"s": seq}).mappings().one())


def _swap_contents(store, a: int, b: int) -> None:
    """Every column but seq exchanged between two rows (raw SQL, as someone with database access would)."""
    ra, rb = _row(store, a), _row(store, b)
    sets = ", ".join(f"{c} = :{c}" for c in ra)
    _sql(store, (f"UPDATE audit_log SET {sets} WHERE seq = :seq", {**rb, "seq": a}),
         (f"UPDATE audit_log SET {sets} WHERE seq = :seq", {**ra, "seq": b}))


def _rewrite_with_its_hash(store, seq: int) -> None:
    """Edit an entry and give it the hash its new contents have: only the next entry's link can tell."""
    [r] = [e for e in audit.AuditLog(store).list() if e.seq == seq]
    details = '{"i":99}'
    digest = audit.entry_hash(seq, r.created_at, r.action, r.actor, r.namespace, r.device_id, r.subject, details,
                              r.prev_hash)
    _sql(store, ("UPDATE audit_log SET details = :d, hash = :h WHERE seq = :s", {"d": details, "h": digest, "s": seq}))


def _reorder(store, a: int, b: int) -> None:
    """Two rows exchange places (their sequence numbers), contents untouched."""
    _sql(store, ("UPDATE audit_log SET seq = -1 WHERE seq = :a", {"a": a}),
         ("UPDATE audit_log SET seq = :a WHERE seq = :b", {"a": a, "b": b}),
         ("UPDATE audit_log SET seq = :b WHERE seq = -1", {"b": b}))


TAMPERING = [
    ("an edited detail", lambda st: _sql(st, ("UPDATE audit_log SET details = :d WHERE seq = 3", {"d": '{"i":99}'})), 3,
     "does not match its hash"),
    ("an edited actor", lambda st: _sql(st, ("UPDATE audit_log SET actor = 'mallory' WHERE seq = 2", {})), 2,
     "does not match its hash"),
    ("an edited hash", lambda st: _sql(st, ("UPDATE audit_log SET hash = :h WHERE seq = 4", {"h": "ab" * 32})), 4,
     "does not match its hash"),
    ("a deleted middle entry", lambda st: _sql(st, ("DELETE FROM audit_log WHERE seq = 3", {})), 3,
     "entry 3 is missing: entry 4 comes after entry 2 (deleted)"),
    ("a deleted first entry", lambda st: _sql(st, ("DELETE FROM audit_log WHERE seq = 1", {})), 1,
     "at the start of the log"),
    ("two rows' contents swapped", lambda st: _swap_contents(st, 2, 3), 2, "moved from another position"),
    ("two entries reordered", lambda st: _reorder(st, 3, 4), 3, "does not match its hash"),
    ("an entry rewritten with a matching hash", lambda st: _rewrite_with_its_hash(st, 2), 3,
     "does not follow the entry before it"),
]


def test_the_chain_verifies_and_every_kind_of_tampering_names_the_first_bad_entry(store):
    log = audit.AuditLog(store)
    assert log.verify().intact and log.verify().entries == 0 and log.head() == (0, audit.GENESIS)
    _fill(store)
    entries = log.list()
    assert [e.seq for e in entries] == [5, 4, 3, 2, 1] and entries[0].device_id == "dev-5"  # ids compare lower-cased
    assert entries[-1].prev_hash == audit.GENESIS
    assert all(e.prev_hash == p.hash for e, p in zip(entries, entries[1:], strict=False))  # newest first
    intact = log.verify(batch=2)  # read in pages: the links across pages are checked too
    assert intact.intact and intact.entries == 5 and (intact.last_seq, intact.last_hash) == log.head()
    assert intact.message() == f"audit log intact: 5 entries, head 5:{entries[0].hash}"
    for what, tamper, bad, words in TAMPERING:
        _fill(store)
        tamper(store)
        for batch in (5000, 2):
            result = log.verify(batch=batch)
            assert not result.intact and result.bad_seq == bad, (what, result)
            assert words in result.problem, (what, result.problem)
            message = result.message()
            assert message.startswith(f"audit log broken at entry {bad}: ") and "\n" not in message, (what, message)
        assert result.entries == bad - 1 and result.last_seq == bad - 1, what


def test_entries_cut_from_the_end_are_caught_by_the_head_kept_earlier(store):
    log = audit.AuditLog(store)
    _fill(store)
    head = log.head()
    assert log.verify(expect_head=head).intact
    _sql(store, ("DELETE FROM audit_log WHERE seq >= 4", {}))
    assert log.verify().intact  # a chain alone cannot tell its newest entries were cut...
    cut = log.verify(expect_head=head)  # ...the head an earlier check printed can
    assert not cut.intact and cut.bad_seq == 5 and "the log ends at entry 3" in cut.problem
    _fill(store)  # the same number of entries, rewritten wholesale: the kept head's hash differs
    rewritten = log.verify(expect_head=head)
    assert not rewritten.intact and rewritten.bad_seq == 5 and "not the entry recorded earlier" in rewritten.problem


def test_concurrent_appends_from_many_threads_make_one_linear_chain(store):
    """Each appender holds its turn until its commit (the sleep): without the lock, two would read the same head
    and one INSERT would fail on the sequence number, or the chain would fork."""
    threads, per_thread, errors = 6, 6, []

    def appender(t: int) -> None:
        try:
            for i in range(per_thread):
                with store.session() as s:
                    audit.append(s, "test.concurrent", subject=f"{t}-{i}")
                    time.sleep(0.002)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    workers = [threading.Thread(target=appender, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    result = audit.AuditLog(store).verify()
    assert result.intact and result.entries == threads * per_thread
    subjects = {e.subject for e in audit.AuditLog(store).list(top=1000)}
    assert subjects == {f"{t}-{i}" for t in range(threads) for i in range(per_thread)}


def test_a_holder_of_the_turn_that_freezes_holds_the_others_up_only_until_its_hold_limit(store, monkeypatch):
    """PostgreSQL: a process frozen after taking the turn (SIGSTOP, a paused VM) keeps its connection, so every
    other append of the cluster waited for as long as it stayed frozen. Its idle transaction is now ended by the
    server after HOLD_LIMIT (made 1 s here), and the others go on; the frozen one's entry is not kept."""
    if store.engine.dialect.name != "postgresql":
        pytest.skip("SQLite: one process's threads; a frozen process there holds the file's write lock (busy timeout)")
    from opendps.audit import log as log_module

    monkeypatch.setattr(log_module, "HOLD_LIMIT", "1s")
    _fill(store, 1)
    frozen, thawed, outcome = threading.Event(), threading.Event(), []

    def freezer() -> None:
        try:
            with store.session() as s:
                audit.append_all(s, [audit.Event("test.frozen", subject="frozen-1"),  # two, as a registration's
                                     audit.Event("test.frozen", subject="frozen-2")])
                frozen.set()
                assert thawed.wait(30)  # "frozen": holds its transaction, idle, and the turn
        except Exception as exc:  # noqa: BLE001 - the server ended the session
            outcome.append(exc)

    thread = threading.Thread(target=freezer)
    thread.start()
    try:
        assert frozen.wait(10)
        started = time.monotonic()
        with store.session() as s:
            audit.append(s, "test.after", subject="after")
        assert time.monotonic() - started < 15  # without the limit: until the frozen one thaws (30 s here)
    finally:
        thawed.set()
        thread.join()
    assert outcome, "the frozen transaction committed after its session was ended"
    assert [e.subject for e in audit.AuditLog(store).list(top=10)][:2] == ["after", "s-1"]
    assert audit.AuditLog(store).verify().intact


def test_a_rolled_back_transaction_leaves_no_entry(store):
    log = audit.AuditLog(store)
    _fill(store, 2)
    with pytest.raises(RuntimeError), store.session() as s:
        audit.append(s, "test.appended", subject="never")
        raise RuntimeError("the action failed after its entry was appended")
    assert log.head()[0] == 2 and "never" not in {e.subject for e in log.list()}
    with store.session() as s:
        assert audit.append(s, "test.appended", subject="next").seq == 3  # the number was not used up
    assert log.verify().intact


def test_entries_never_hold_secrets(store):
    with store.session() as s:
        for details in ({"primaryKey": "x"}, {"nested": {"symmetricKey": "x"}}, {"sasToken": "x"}, {"pin": "1234"},
                        {"note": "SharedAccessSignature sr=a&sig=b"}, {"pem": "-----BEGIN PRIVATE KEY-----"}):
            with pytest.raises(ValueError, match="secret"):
                audit.append(s, "test.appended", details=details)
        with pytest.raises(ValueError, match="dotted lower-case"):
            audit.append(s, "Not An Action")
    assert audit.AuditLog(store).head()[0] == 0


# ---- what domain actions leave ----
@pytest.fixture
def fleet(services):
    services.registry.create_namespace("audit-ns", "ops", validity_days=3)
    return symmetric_group(services, "audited", credentialPolicyName="ops")


def _everything(services) -> str:
    return json.dumps([e.to_wire() for e in services.audit.list(top=1000)])


def test_a_registration_leaves_its_assignment_and_certificate_and_no_secret(services, fleet):
    rid = "dev-audited"
    device_key = derive_device_key(fleet, rid)
    credentials = creds(rid, key=device_key)
    csr = base64.b64encode(p384_csr(rid)).decode()
    state = register(services, credentials, csr=csr, api_version=PREVIEW)["registrationState"]
    leaf, ica, _ = (x509.load_der_x509_certificate(base64.b64decode(d)) for d in state["issuedCertificateChain"])
    assigned, issued = services.audit.list(device_id=rid.upper())  # newest first; any case finds the device
    assert (issued.action, assigned.action) == ("certificate.issued", "registration.assigned")
    assert assigned.seq == issued.seq + 1 and assigned.created_at == issued.created_at  # one append, one transaction
    assert issued.subject == serial_hex(leaf) and issued.namespace == "audit-ns" and issued.actor is None
    assert issued.details_object() == {"sha256": thumbprint(leaf), "policy": "ops", "issuingCa": thumbprint(ica),
                                       "notAfter": issued.details_object()["notAfter"], "via": "registration"}
    assert assigned.subject == "audited" and assigned.details_object()["serialNumber"] == serial_hex(leaf)
    assert assigned.details_object()["hub"] == state["assignedHub"]
    logged = _everything(services)
    for secret in (fleet, device_key, credentials.authorization, csr, "SharedAccessSignature"):
        assert secret not in logged
    # renewal over the hub's $iothub/credentials topic: issued too, in the renewal's transaction
    renewed = services.provisioning.renew_through_hub(state["assignedHub"], rid, p384_csr(rid)).leaf
    latest = services.audit.list(device_id=rid, top=1)[0]
    assert (latest.action, latest.subject, latest.namespace) == ("certificate.issued", serial_hex(renewed), "audit-ns")
    assert latest.details_object()["via"] == "hub" and latest.details_object()["hub"] == state["assignedHub"]
    assert services.audit.verify().intact


def test_a_failed_registration_leaves_nothing_of_what_it_would_have_done(services, fleet, monkeypatch):
    rid = "dev-rolled-back"
    real = registration_module.audit.append_all

    def fail_after_the_append(db, events, **kw):
        real(db, events, **kw)
        raise RuntimeError("the commit failed")

    monkeypatch.setattr(registration_module.audit, "append_all", fail_after_the_append)
    with pytest.raises(RuntimeError):
        services.provisioning.register(creds(rid, key=derive_device_key(fleet, rid)),
                                       csr=base64.b64encode(p384_csr(rid)).decode(), api_version=PREVIEW)
    monkeypatch.undo()
    with pytest.raises(CsrRejected):  # refused before anything is written
        services.provisioning.register(creds(rid, key=derive_device_key(fleet, rid)),
                                       csr=base64.b64encode(p384_csr("someone-else")).decode(), api_version=PREVIEW)
    assert services.audit.list(device_id=rid) == []
    with services.store.session() as s:
        assert s.scalar(select(func.count()).select_from(IssuedCertificate)
                        .where(IssuedCertificate.registration_id == rid)) == 0
    assert services.audit.verify().intact


def test_a_failed_allocation_is_recorded_as_a_failed_registration(services):
    key = symmetric_group(services, "unreachable", allocationPolicy="custom", iotHubs=["default"],
                          customAllocationDefinition={"webhookUrl": "http://127.0.0.1:9/?code=function-secret",
                                                      "apiVersion": "2021-10-01"})
    accepted = services.provisioning.register(creds("dev-unplaced", key=derive_device_key(key, "dev-unplaced")))
    assert accepted.result is None
    [failed] = services.audit.list(device_id="dev-unplaced")
    assert failed.action == "registration.failed" and failed.details_object()["errorCode"] == 400208
    assert failed.details_object()["operationId"] == accepted.operation_id
    enrolled = services.audit.list(action="enrollment.created")
    assert [e.subject for e in enrolled] == ["unreachable"]
    assert "function-secret" not in _everything(services)  # a webhook URL may carry a key: never recorded


def test_enrollment_changes_are_recorded_with_the_actor_and_without_keys(services, fleet):
    with audit.acting_as("ops-admin"):
        view, _ = services.enrollments.put("individual", "Dev-Enrolled", {"attestation": {"type": "symmetricKey"},
                                                                          "credentialPolicyName": "ops"})
        services.enrollments.put("individual", "Dev-Enrolled", {"attestation": {"type": "symmetricKey"},
                                                                "provisioningStatus": "disabled"})
        services.enrollments.delete("individual", "dev-enrolled")
    deleted, updated, created = services.audit.list(device_id="dev-enrolled")
    assert [e.action for e in (created, updated, deleted)] == ["enrollment.created", "enrollment.updated",
                                                              "enrollment.deleted"]
    assert {e.actor for e in (created, updated, deleted)} == {"ops-admin"}
    assert created.subject == "Dev-Enrolled" and created.namespace == "audit-ns"
    assert created.details_object()["attestationType"] == "symmetricKey"
    assert updated.details_object()["provisioningStatus"] == "disabled" and updated.namespace is None
    logged = _everything(services)
    assert view.keys is not None and not any(k in logged for k in view.keys) and fleet not in logged


def test_ca_certificate_uploads_and_proofs_are_recorded_for_dps_and_hubs(services):
    ca = make_ca("audited owner ca")
    for certificates, scope in ((services.ca_certificates, {"service": "dps"}),
                                (services.hubs.certificates("default"), {"service": "hub", "hub": "default"})):
        view, _ = certificates.upload("owner", ca.pem)
        view = certificates.generate_verification_code("owner", if_match=view.etag)
        proof, _ = make_leaf(view.verification_code, ca)
        view = certificates.verify("owner", proof.public_bytes(Encoding.PEM), if_match=view.etag)
        certificates.delete("owner", if_match=view.etag)
        deleted, verified, uploaded = services.audit.list(action="ca-certificate", top=3)
        assert [e.action for e in (uploaded, verified, deleted)] == [
            "ca-certificate.uploaded", "ca-certificate.verified", "ca-certificate.deleted"]
        assert {e.subject for e in (uploaded, verified, deleted)} == {thumbprint(ca.cert)}
        assert uploaded.details_object() == {**scope, "name": "owner", "certificateSubject": "CN=audited owner ca",
                                             "replaced": False}
        assert view.verification_code is None or view.verification_code not in _everything(services)
    assert services.audit.verify().intact


# ---- over HTTPS: the management caller is the actor ----
def _call(services, requests: list[tuple[str, str, str, dict | None]]) -> list[tuple[int, object]]:
    front = build(services, service_hosts={"localhost"})

    async def run() -> list[tuple[int, object]]:
        server = TestServer(front.http, host="127.0.0.1")
        await server.start_server()
        answers = []
        try:
            async with aiohttp.ClientSession() as http:
                for method, path, token, body in requests:
                    async with http.request(method, str(server.make_url(path)), json=body,
                                            headers={"Authorization": token}) as r:
                        answers.append((r.status, await r.json() if r.content_length else {}))
        finally:
            await server.close()
        return answers

    return asyncio.run(run())


def test_the_management_caller_is_the_actor_and_reading_the_log_needs_service_config(services):
    services.access_policies.ensure(OWNER_POLICY, OWNER_RIGHTS)
    owner = sas.generate("localhost", services.access_policies.keys_of(OWNER_POLICY)[0], OWNER_POLICY)
    tokens = {}
    for name, rights in (("enroller", "EnrollmentWrite"), ("reader", "EnrollmentRead")):
        services.access_policies.put(name, rights)
        tokens[name] = sas.generate("localhost", services.access_policies.keys_of(name)[0], name)
    answers = _call(services, [
        ("PUT", "/enrollmentGroups/http-audited", tokens["enroller"], {"attestation": {"type": "symmetricKey"}}),
        ("GET", "/auditLog?action=enrollment", tokens["reader"], None),
        ("GET", "/auditLog?action=enrollment&top=5", owner, None),
        ("GET", "/auditLog/verify", owner, None),
        ("GET", "/auditLog?since=yesterday", owner, None),
        ("GET", "/auditLog?top=0", owner, None),
    ])
    assert [status for status, _ in answers] == [201, 401, 200, 200, 400, 400], answers
    assert "lacks the ServiceConfig right" in answers[1][1]["message"]
    [entry] = answers[2][1]["value"]
    assert entry["action"] == "enrollment.created" and entry["actor"] == "enroller"
    assert entry["subject"] == "http-audited" and entry["details"]["kind"] == "group"
    assert answers[3][1]["intact"] is True and answers[3][1]["lastSequenceNumber"] == entry["sequenceNumber"]


# ---- rows no appender writes (helper round): named by verify and list, never a traceback or a 500 ----
def test_a_row_numbered_zero_or_less_is_named_by_verify(store):
    """verify read from seq > 0, so a row inserted by hand as entry 0 (or -1) — which list shows like any other —
    passed unseen: the log said intact."""
    log = audit.AuditLog(store)
    for seq in (0, -1):
        _fill(store)
        _sql(store, (f"INSERT INTO audit_log (seq, {COLUMNS}) SELECT :s, {COLUMNS} FROM audit_log WHERE seq = 1",
                     {"s": seq}))
        assert seq in {e.seq for e in log.list()}
        for batch in (5000, 2):
            result = log.verify(batch=batch)
            assert not result.intact and result.bad_seq == seq, result
            assert "out of sequence order (expected entry 1)" in result.problem


def _unreadable_rows(store) -> list[tuple[str, dict, str]]:
    """Values a tamperer can store that no appender writes: the driver or the time type cannot even load them."""
    if store.engine.dialect.name == "sqlite":
        return [("UPDATE audit_log SET created_at = 'garbage' WHERE seq = 3", {}, "Invalid isoformat string"),
                ("UPDATE audit_log SET created_at = 12345 WHERE seq = 3", {}, "argument must be str"),
                ("UPDATE audit_log SET device_id = x'c3' WHERE seq = 3", {}, "its device_id is bytes"),
                ("UPDATE audit_log SET details = x'7b7d' WHERE seq = 3", {}, "its details is bytes"),
                ("UPDATE audit_log SET details = CAST(x'ff' AS TEXT) WHERE seq = 3", {}, "Could not decode to UTF-8")]
    return [("UPDATE audit_log SET created_at = 'infinity' WHERE seq = 3", {}, "timestamp too large"),
            ("UPDATE audit_log SET created_at = '12000-01-01' WHERE seq = 3", {}, "after year 10K"),
            ("UPDATE audit_log SET created_at = '0100-01-01 BC' WHERE seq = 3", {}, "before year 1")]


def test_a_row_that_cannot_be_loaded_is_named_as_the_first_bad_entry(store):
    """They raised from the driver (ValueError, psycopg's DataError, sqlite3's decode error) or from the hash's encoder
    (bytes): a traceback from audit verify --local and a 500 from the server, naming nothing."""
    log = audit.AuditLog(store)
    for statement, params, words in _unreadable_rows(store):
        _fill(store)
        _sql(store, (statement, params))
        for batch in (5000, 2):
            result = log.verify(batch=batch)
            assert not result.intact and result.bad_seq == 3 and result.entries == 2, (statement, result)
            assert result.problem.startswith("entry 3 cannot be read: ") and words in result.problem, result.problem
        with pytest.raises(audit.UnreadableEntry, match=f"audit entry 3 cannot be read: .*{words}"):
            log.list()
        assert [e.seq for e in log.list(top=2)] == [5, 4] and [e.seq for e in log.list(before=3)] == [2, 1]
        _sql(store, ("DELETE FROM audit_log WHERE seq = 2", {}))  # an earlier bad entry is still the one named
        assert log.verify().bad_seq == 2


def test_a_stored_escape_sequence_is_escaped_in_the_one_line_message(store):
    """An edited action holding an ESC sequence and a line break went raw into the message audit verify prints: it
    could clear or retitle the checker's terminal and split the one line."""
    _fill(store)
    _sql(store, ("UPDATE audit_log SET action = :a WHERE seq = 3", {"a": "x\x1b[2J\x1b]0;owned\x07\nsecond line"}))
    message = audit.AuditLog(store).verify().message()
    assert message.startswith("audit log broken at entry 3: entry 3 (x\\x1b[2J\\x1b]0;owned\\x07\\nsecond line at ")
    assert message.isprintable()


def test_the_server_names_an_unreadable_entry_instead_of_a_500(services):
    services.access_policies.ensure(OWNER_POLICY, OWNER_RIGHTS)
    owner = sas.generate("localhost", services.access_policies.keys_of(OWNER_POLICY)[0], OWNER_POLICY)
    _fill(services.store)
    statement, params, words = _unreadable_rows(services.store)[0]
    _sql(services.store, (statement, params))
    (listed, body), (verified, result) = _call(services, [("GET", "/auditLog", owner, None),
                                                          ("GET", "/auditLog/verify", owner, None)])
    assert listed == 409 and body["message"].startswith("audit entry 3 cannot be read: ") and words in body["message"]
    assert verified == 200 and result["intact"] is False and result["firstBadEntry"] == 3, result


def test_the_server_banner_shows_the_audit_head_to_keep(tmp_path, monkeypatch, capsys):
    """Nothing in the database anchors the head (entries cut from the end leave an intact chain): the head printed at
    each start goes to a log the database does not hold, for audit verify --expect-head later."""
    from opendps.instance import Settings, open_instance
    from opendps.server import print_banner

    for name in ("OPENDPS_DB", "OPENDPS_MASTER_KEY", "OPENDPS_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    inst = open_instance(Settings.load(tmp_path / "data", lint=False))
    try:
        with inst.store.session() as s:
            audit.append(s, "test.appended")
        print_banner(inst)
        seq, head = inst.services.audit.head()
        assert seq >= 1 and f"\n  audit log head:     {seq}:{head}\n" in capsys.readouterr().out
    finally:
        inst.close()
