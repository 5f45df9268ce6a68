"""The fleet dashboard's pages and aggregates (issue 19), in-process on both stores: each owner's read method
(pki's expiry timeline, provisioning's registrations per minute, the hub's device page with presence's last seen, the
registry's current certificates, the enrollments' page), their paging, the indexes they read, and the /fleet/ routes
and /ui/ files through the HTTP application on a loopback socket. The page itself in a browser: tests/test_dashboard.py.
"""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from sqlalchemy import select
from tests.conftest import assert_uses_index
from tests.unit.conftest import creds, register, symmetric_group
from tests.x509_helpers import p384_csr

from opendps.cluster import Cluster, Nodes
from opendps.frontends import build
from opendps.hub import Presence
from opendps.hub.presence import Change
from opendps.provisioning.access import OWNER_POLICY, OWNER_RIGHTS
from opendps.provisioning.activity import registrations_per_minute
from opendps.store import IssuedCertificate, Operation
from opendps.transport import sas
from opendps.transport.sas import derive_device_key

PREVIEW = "2025-07-01-preview"


def _provision(services, group_key: str, rid: str) -> dict:
    csr = base64.b64encode(p384_csr(rid)).decode()
    result = register(services, creds(rid, key=derive_device_key(group_key, rid)), csr=csr, api_version=PREVIEW)
    assert result["status"] == "assigned", result
    return result


@pytest.fixture
def fleet(services):
    """Two namespaces (7- and 30-day certificates), a symmetric-key group on each; three devices provisioned."""
    services.registry.create_namespace("fleet-a", "short", validity_days=7)
    services.registry.create_namespace("fleet-b", "long", validity_days=30)
    short = symmetric_group(services, "fleet-short", credentialPolicyName="short")
    long = symmetric_group(services, "fleet-long", credentialPolicyName="long")
    for rid in ("fleet-dev-1", "fleet-dev-2"):
        _provision(services, short, rid)
    _provision(services, long, "fleet-dev-3")
    return short, long


def _not_after(services, rid: str) -> datetime:
    [view] = [v for v in services.issuance.list(registration_ids=[rid]) if not v.revoked]
    return view.not_after


def test_the_expiry_timeline_counts_unrevoked_certificates_per_utc_day(services, fleet):
    now = datetime.now(UTC)
    series = services.issuance.expiry_timeline(90, now=now)
    assert len(series) == 90 and series[0][0] == now.date() and series[-1][0] == now.date() + timedelta(days=89)
    by_day = dict(series)
    assert sum(by_day.values()) == 3
    assert by_day[_not_after(services, "fleet-dev-1").date()] == 2  # issued seconds apart, 7 days ahead
    assert by_day[_not_after(services, "fleet-dev-3").date()] == 1
    # one namespace's only (its issuing CAs, named by the registry)
    only_b = services.issuance.expiry_timeline(90, now=now, issuing_ca_ids=services.devices.issuing_ca_ids("fleet-b"))
    assert sum(n for _, n in only_b) == 1
    assert sum(n for _, n in services.issuance.expiry_timeline(90, now=now, issuing_ca_ids=[])) == 0
    # a revoked certificate leaves the timeline; an expired one (seen from later on) too; the window is the days asked
    services.issuance.revoke(services.issuance.list(registration_ids=["fleet-dev-2"])[0].serial_number, "superseded")
    assert sum(n for _, n in services.issuance.expiry_timeline(90, now=now)) == 2
    later = _not_after(services, "fleet-dev-1") + timedelta(seconds=1)
    assert sum(n for _, n in services.issuance.expiry_timeline(90, now=later)) == 1
    assert sum(n for _, n in services.issuance.expiry_timeline(8, now=now)) == 1  # not the 30-day one in 8 days


def test_registrations_per_minute_group_operations_by_utc_minute_and_outcome(services, fleet):
    now = datetime.now(UTC)
    series = registrations_per_minute(services.store, 60, now=now)
    assert len(series) == 60 and series[-1].minute == now.replace(second=0, microsecond=0)
    assert series[0].minute == series[-1].minute - timedelta(minutes=59)
    assert sum(m.assigned for m in series) == 3 and sum(m.failed for m in series) == 0
    # an operation from 3 minutes ago falls in its own minute; one from 2 hours ago outside the hour
    with services.store.session() as s:
        for op, age in (("old-3m", timedelta(minutes=3)), ("old-2h", timedelta(hours=2))):
            s.add(Operation(operation_id=op, registration_key=op, status="failed", result={}, created_at=now - age))
    series = registrations_per_minute(services.store, 60, now=now)
    assert [m.failed for m in series if m.failed] == [1]
    assert next(m for m in series if m.failed).minute == (now - timedelta(minutes=3)).replace(second=0, microsecond=0)
    assert series[-1].to_wire()["minute"].endswith("Z") and series[-1].total == series[-1].assigned
    assert sum(m.failed for m in registrations_per_minute(services.store, 180, now=now)) == 2


def test_the_device_page_pages_by_id_with_a_prefix_and_last_seen(services):
    hubs = services.hubs
    ids = ["Pump-01", "pump-02", "pump-10", "pumpkin", "valve-1", "p", "pu-mp"]
    for device_id in ids:
        hubs.create_device("default", device_id)
    page = hubs.device_page("default", top=3)
    assert [d.device_id for d in page.items] == ["p", "pu-mp", "Pump-01"] and page.next_after == "pump-01"
    seen, after = [], ""
    while True:  # every device once, in key order, whatever the page size
        page = hubs.device_page("default", after=after, top=2)
        seen += [d.device_id for d in page.items]
        if page.next_after is None:
            break
        after = page.next_after
    assert seen == sorted(ids, key=str.lower)
    first = hubs.device_page("default", prefix="PUMP-", top=2)
    assert [d.device_id for d in first.items] == ["Pump-01", "pump-02"] and first.next_after == "pump-02"
    rest = hubs.device_page("default", prefix="pump-", after=first.next_after, top=2)
    assert [d.device_id for d in rest.items] == ["pump-10"] and rest.next_after is None
    assert [d.device_id for d in hubs.device_page("default", prefix="pump").items] == ["Pump-01", "pump-02", "pump-10",
                                                                                     "pumpkin"]
    assert hubs.device_page("default", prefix="zzz").items == []
    # where the database orders text linguistically the prefix only starts the range: the same pages
    hubs._byte_order = False
    assert [d.device_id for d in hubs.device_page("default", prefix="pump-", after="pump-01").items] == ["pump-02",
                                                                                                       "pump-10"]
    assert [d.device_id for d in hubs.device_page("default", prefix="p", top=3).items] == ["p", "pu-mp", "Pump-01"]
    hubs._byte_order = None
    # presence's batched write says when a session began or ended
    assert all(d.last_seen_at is None for d in hubs.device_page("default").items)
    nodes, node = Nodes(services.store), Cluster(services.store, None, None)._info()  # type: ignore[arg-type]
    nodes.join(node)
    hub = hubs.list()[0]
    before = datetime.now(UTC)
    Presence(services.store, hubs).record(node.id, [Change(hub.id, "pump-02", "s1", True),
                                                    Change(hub.id, "valve-1", "s2", True),
                                                    Change(hub.id, "valve-1", "s2", False)])
    seen_at = {d.device_id: d.last_seen_at for d in hubs.device_page("default").items}
    assert seen_at["pump-02"] >= before - timedelta(seconds=1) and seen_at["valve-1"] == seen_at["pump-02"]
    assert seen_at["pumpkin"] is None


def test_the_registry_names_each_devices_current_certificate(services, fleet):
    records = services.devices.records_of(["FLEET-DEV-1", "fleet-dev-3", "nobody"])
    assert sorted((r.device_id, r.namespace) for r in records) == [("fleet-dev-1", "fleet-a"), ("fleet-dev-3", "fleet-b")]
    assert all(r.certificate_not_after == _not_after(services, r.device_id) for r in records)
    assert services.devices.records_of([]) == []


def test_the_enrollment_page_pages_by_id_without_keys(services, fleet):
    for n in range(5):
        services.enrollments.put("individual", f"Enr-{n}", {"attestation": {"type": "symmetricKey"}})
    page = services.enrollments.page("individual", top=3)
    assert [e.enrollment_id for e in page.items] == ["Enr-0", "Enr-1", "Enr-2"] and page.next_after == "enr-2"
    rest = services.enrollments.page("individual", after=page.next_after, top=3)
    assert [e.enrollment_id for e in rest.items] == ["Enr-3", "Enr-4"] and rest.next_after is None
    wire = rest.items[0].to_wire()
    assert wire["attestationType"] == "symmetricKey" and wire["provisioningStatus"] == "enabled"
    assert "primaryKey" not in str(wire)
    groups = services.enrollments.page("group")
    assert [g.enrollment_id for g in groups.items] == ["fleet-long", "fleet-short"]
    assert groups.items[0].to_wire()["credentialPolicyName"] == "long"


def test_the_aggregates_read_their_indexes(services):
    """Query plans (PostgreSQL's with sequential scans discouraged: the tables are tiny here)."""
    store, now = services.store, datetime.now(UTC)
    t = IssuedCertificate
    queries = {
        "ix_issued_certificates_expiry": select(t.not_after).where(t.revoked_at.is_(None), t.not_after >= now,
                                                                   t.not_after < now + timedelta(days=90)),
        "ix_operations_created_at": select(Operation.status).where(Operation.created_at >= now),
    }
    assert_uses_index(store, queries)


def _get(services, paths: list[str], token: str | None) -> list[tuple[int, dict, object]]:
    """GET each path on the HTTP application on a loopback socket: (status, headers, JSON or text)."""
    front = build(services, service_hosts={"localhost"})

    async def run() -> list[tuple[int, dict, object]]:
        server = TestServer(front.http, host="127.0.0.1")
        await server.start_server()
        answers = []
        try:
            async with aiohttp.ClientSession() as http:
                for path in paths:
                    async with http.get(str(server.make_url(path)), allow_redirects=False,
                                        headers={"Authorization": token} if token else {}) as r:
                        body = await r.json() if r.content_type == "application/json" else await r.text()
                        answers.append((r.status, dict(r.headers), body))
        finally:
            await server.close()
        return answers

    return asyncio.run(run())


def test_the_fleet_routes_answer_pages_and_aggregates(services, fleet):
    services.access_policies.ensure(OWNER_POLICY, OWNER_RIGHTS)
    token = sas.generate("localhost", services.access_policies.keys_of(OWNER_POLICY)[0], OWNER_POLICY)
    services.hubs.create_device("default", "fleet-manual")  # a hub identity DPS did not place: no certificate
    answers = _get(services, ["/fleet/devices?top=2&prefix=FLEET-", "/fleet/expiryTimeline?days=40&namespace=fleet-a",
                              "/fleet/registrationsPerMinute", "/fleet/enrollments?kind=group&top=1",
                              "/fleet/devices?top=0", "/fleet/devices?continuationToken=%25%25", "/fleet/devices?hub=nope",
                              "/fleet/enrollments?kind=other"], token)
    (s1, _, devices), (s2, _, timeline), (s3, _, minutes), (s4, _, groups), *errors = answers
    assert (s1, s2, s3, s4) == (200, 200, 200, 200), answers
    assert [d["deviceId"] for d in devices["value"]] == ["fleet-dev-1", "fleet-dev-2"]
    first = devices["value"][0]
    assert first["connected"] is False and first["lastSeen"] is None and first["hub"] == "default"
    assert first["certificate"]["namespace"] == "fleet-a" and first["certificate"]["policy"] == "short"
    assert first["certificate"]["notAfter"].startswith(_not_after(services, "fleet-dev-1").date().isoformat())
    assert first["certificate"]["serialNumber"] == services.issuance.list(registration_ids=["fleet-dev-1"])[0].serial_number
    [rest] = _get(services, [f"/fleet/devices?top=2&prefix=fleet-&continuationToken={devices['continuationToken']}"],
                  token)
    assert [d["deviceId"] for d in rest[2]["value"]] == ["fleet-dev-3", "fleet-manual"] and "continuationToken" not in rest[2]
    assert rest[2]["value"][1]["certificate"] is None
    assert timeline["total"] == 2 and len(timeline["value"]) == 40 and timeline["namespace"] == "fleet-a"
    assert minutes["total"] == 3 and len(minutes["value"]) == 60
    assert [g["id"] for g in groups["value"]] == ["fleet-long"] and groups["continuationToken"]
    assert [status for status, _, _ in errors] == [400, 400, 404, 400], errors
    # without a token: 401; the page's files are open, with a strict Content-Security-Policy
    (unauthorized, _, _), (index, headers, html), (script, _, _), (missing, _, _), (redirect, moved, _) = _get(
        services, ["/fleet/devices", "/ui/", "/ui/dashboard.js", "/ui/secret.txt", "/ui"], None)
    assert (unauthorized, index, script, missing, redirect) == (401, 200, 200, 404, 301)
    assert "script-src 'self'" in headers["Content-Security-Policy"] and "unsafe-inline" not in headers[
        "Content-Security-Policy"]
    assert '<script src="dashboard.js"' in html and moved["Location"] == "/ui/"
