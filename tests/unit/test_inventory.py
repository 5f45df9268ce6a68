"""The counts behind ``GET /status`` and the store gauges of ``/metrics`` (issue 19), in-process on SQLite and
PostgreSQL: each package's aggregate of its own rows, and the refusal log's bounds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from sqlalchemy import select

from opendps.audit import refusals as refusal_module
from opendps.audit.refusals import HUB_CONNECT, REGISTRATION, Refusal
from opendps.errors import Unauthorized
from opendps.frontends.metrics import StoreGauges, render
from opendps.services import Services


def _csr(rid: str) -> bytes:
    key = ec.generate_private_key(ec.SECP384R1())
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, rid)]))
            .sign(key, hashes.SHA384()).public_bytes(Encoding.DER))


def _issue(services: Services, ns: str, policy: str, rid: str, *, expires_in: timedelta) -> str:
    """A leaf of ``ns/policy`` that expires ``expires_in`` from now (issued as if earlier); its serial."""
    view = services.registry.get_policy(ns, policy)
    issuer = services.registry.issuer(view.policy_id)
    now = datetime.now(UTC)
    issued_at = now + expires_in - timedelta(days=issuer.validity_days) + timedelta(minutes=5)  # notBefore is backdated
    chain = services.issuance.issue(issuer, _csr(rid), rid, now=issued_at)
    assert abs(chain.leaf.not_valid_after_utc - (now + expires_in)) < timedelta(minutes=1)
    return format(chain.leaf.serial_number, "x")


def test_certificates_per_policy_by_days_to_expiry(services):
    services.registry.create_namespace("inv-a")
    services.registry.put_policy("inv-a", "short", validity_days=30)
    _issue(services, "inv-a", "default", "a-soon", expires_in=timedelta(hours=12))
    _issue(services, "inv-a", "default", "a-week", expires_in=timedelta(days=5))
    _issue(services, "inv-a", "default", "a-later", expires_in=timedelta(days=20))
    revoked = _issue(services, "inv-a", "default", "a-revoked", expires_in=timedelta(days=3))
    services.issuance.revoke(revoked, "keyCompromise")
    _issue(services, "inv-a", "short", "s-expired", expires_in=timedelta(days=-1))  # expired: not valid
    _issue(services, "inv-a", "short", "s-month", expires_in=timedelta(days=29))

    names = services.inventory.registry.policy_names()
    rows = {names[r.policy_id]: r for r in services.inventory.certificates.expiry()}
    assert set(rows) == {"inv-a/default", "inv-a/short"}
    default, short = rows["inv-a/default"], rows["inv-a/short"]
    assert default.valid == 3 and short.valid == 1
    assert default.within == {1: 1, 7: 2, 14: 2, 30: 3, 60: 3, 90: 3}
    assert short.within == {1: 0, 7: 0, 14: 0, 30: 1, 60: 1, 90: 1}
    assert services.inventory.registry.counts() == (1, 2)

    # the same numbers as the /metrics gauges (rendered in-process)
    text = render(StoreGauges(services)).decode()
    assert 'opendps_certificates_valid{policy="inv-a/default"} 3.0' in text
    assert 'opendps_certificates_expiring{policy="inv-a/default",within_days="7"} 2.0' in text
    assert 'opendps_certificates_expiring{policy="inv-a/short",within_days="30"} 1.0' in text


def test_the_expiry_count_is_one_statement(services, store):
    """One GROUP BY whatever the number of certificates and policies (the gauges are read at scrape time)."""
    from sqlalchemy import event

    services.registry.create_namespace("inv-b")
    for i in range(5):
        _issue(services, "inv-b", "default", f"b-{i}", expires_in=timedelta(days=10 + i))
    statements: list[str] = []
    listener = lambda *args: statements.append(args[2])  # noqa: E731
    event.listen(store.engine, "before_cursor_execute", listener)
    try:
        services.inventory.certificates.expiry()
    finally:
        event.remove(store.engine, "before_cursor_execute", listener)
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 1 and "GROUP BY" in selects[0].upper(), statements


def test_hub_and_provisioning_counts(services):
    hub = services.inventory.hubs.counts()
    assert (hub.linked_hubs, hub.identities, hub.connected) == (1, 0, 0)
    services.hubs.create_device("default", "inv-sas-1")
    assert services.inventory.hubs.counts().identities == 1
    counts = services.inventory.provisioning.counts(datetime.now(UTC) - timedelta(hours=1))
    assert (counts.individual_enrollments, counts.enrollment_groups, counts.provisioned, counts.operations) \
        == (0, 0, 0, {})


def test_the_refusal_log_keeps_the_newest_and_sweeps(services, monkeypatch):
    log = services.inventory.refusals
    now = datetime.now(UTC)
    exc = Unauthorized("device certificate is revoked", reason="certificate_revoked")
    old = Refusal(now - timedelta(hours=25), HUB_CONNECT, "old-dev", "mqtt", exc.reason, exc.error_code, exc.message,
                  "default.hubs.test")
    fresh = [Refusal(now - timedelta(seconds=i), REGISTRATION, f"dev-{i}", "https", "sas_invalid", 401002,
                     "SharedAccessSignature signature does not verify") for i in range(5)]
    log.record([old, *reversed(fresh)], now=now)  # older first, as they happen
    assert log.count_since(now - timedelta(hours=1)) == 5
    recent = log.recent(3)
    assert [r.subject for r in recent] == ["dev-0", "dev-1", "dev-2"]
    assert recent[0].to_wire() == {"time": recent[0].time.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "kind": "registration",
                                   "id": "dev-0", "transport": "https", "reason": "sas_invalid", "errorCode": 401002,
                                   "message": "SharedAccessSignature signature does not verify"}
    # the sweep: older than a day went at once (a process's first write sweeps); beyond the newest MAX_ROWS goes
    with services.store.session() as s:
        assert "old-dev" not in s.execute(select(refusal_module._TABLE.c.subject)).scalars().all()
    monkeypatch.setattr(refusal_module, "MAX_ROWS", 3)
    assert log.sweep(now) == 2
    with services.store.session() as s:
        left = s.execute(select(refusal_module._TABLE.c.subject)).scalars().all()
    assert sorted(left) == ["dev-0", "dev-1", "dev-2"]


def test_the_refusal_log_sweeps_by_the_monotonic_clock_not_the_wall_clock(services, monkeypatch):
    """A wall clock stepped back (NTP) paused the sweeps for the step's length (their last time lay in the future);
    one stepped forward could not make them run each batch either: the sweep interval is a monotonic one."""
    log = services.inventory.refusals
    swept: list[datetime] = []
    real_sweep = log.sweep
    monkeypatch.setattr(log, "sweep", lambda now=None: swept.append(now) or real_sweep(now))
    exc = Unauthorized("device certificate is revoked", reason="certificate_revoked")

    def batch(now: datetime) -> None:
        log.record([Refusal(now, HUB_CONNECT, "dev", "mqtt", exc.reason, exc.error_code, exc.message)], now=now)

    clock = [1000.0]
    monkeypatch.setattr(refusal_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    now = datetime.now(UTC)
    batch(now)
    assert len(swept) == 1  # a process's first write sweeps
    batch(now - timedelta(hours=1))  # the wall clock stepped back an hour; a monotonic second passed
    clock[0] += 1
    batch(now - timedelta(hours=1))
    assert len(swept) == 1
    clock[0] += refusal_module.SWEEP_EVERY.total_seconds()  # a minute later, whatever the wall clock says
    batch(now - timedelta(hours=1))
    assert len(swept) == 2
