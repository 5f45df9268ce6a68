"""The fleet dashboard's aggregates (issue 19): management routes under ``/fleet/`` (ServiceConfig, as every route
that is not an enrollment's or a registration's: :func:`opendps.frontends.http.app.required_right`).

Each answer is a page or a server-side aggregate computed in SQL by the package that owns the rows, so the
dashboard works on a store of any size without loading it: devices and enrollments a page at a time by id (keyset
ranges on their unique indexes), the certificate expiry timeline one ``GROUP BY`` in pki, registrations per minute
one ``GROUP BY`` in provisioning. Paging: ``top`` (1-1000) in, ``continuationToken`` out while more follow and in
for the next page (opaque).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from opendps.errors import InvalidInput
from opendps.frontends.http.wire import int_param, keyset_after, keyset_token, run, runtime, send, services
from opendps.hub import DEFAULT_HUB
from opendps.hub.registry import DevicePage, DeviceSummary
from opendps.provisioning.activity import MAX_MINUTES, registrations_per_minute
from opendps.provisioning.enrollments import GROUP, INDIVIDUAL
from opendps.registry.devices import DeviceRecordView
from opendps.services import Services
from opendps.transport.wire import iso8601

routes = web.RouteTableDef()
DEFAULT_TOP = 50
MAX_TOP = 1000
MAX_DAYS = 366
MAX_PREFIX = 128  # a device id's length


def _after(request: web.Request) -> str:
    """The key a page starts after, from the previous page's ``continuationToken`` (absent: the first page)."""
    return keyset_after(request.query.get("continuationToken"), "continuationToken")


def _certificate(records: list[DeviceRecordView], hub_host: str | None) -> dict[str, Any] | None:
    """The device's current operational certificate: its record in the namespace that placed it in this hub (else
    its most recently updated record), as the device registry (ADR) holds it."""
    placed = [r for r in records if hub_host is not None and r.hub_host_name.lower() == hub_host.lower()] or records
    record = next((r for r in placed if r.certificate_serial), None)
    if record is None or record.certificate_serial is None:
        return None
    return {"serialNumber": record.to_wire()["properties"]["operationalCertificate"]["serialNumber"],
            "notAfter": iso8601(record.certificate_not_after) if record.certificate_not_after else None,
            "namespace": record.namespace, "policy": record.policy, "registrationId": record.registration_id}


def _device_page(s: Services, hub: str, prefix: str, after: str, top: int) -> tuple[DevicePage, dict[str, list[DeviceRecordView]],
                                                                                   str | None]:
    """The hub names a page of its devices; the registry their current certificates (one lookup for the page)."""
    page = s.hubs.device_page(hub, prefix=prefix, after=after, top=top)
    records: dict[str, list[DeviceRecordView]] = {}
    for r in s.devices.records_of([d.device_id for d in page.items]):
        records.setdefault(r.device_id.lower(), []).append(r)
    host = next((h.host_name for h in s.hubs.list() if h.name == hub), None)
    return page, records, host


def _device_wire(d: DeviceSummary, connected: bool, certificate: dict[str, Any] | None) -> dict[str, Any]:
    return {"deviceId": d.device_id, "hub": d.hub_name, "status": d.status, "authenticationType": d.auth_type,
            "connected": connected, "lastSeen": iso8601(d.last_seen_at) if d.last_seen_at else None,
            "createdAt": iso8601(d.created_at), "certificate": certificate}


@routes.get("/fleet/devices")
async def fleet_devices(request: web.Request) -> web.Response:
    """A page of a hub's devices in id order (``hub``, default ``default``; ``prefix``: ids starting with it, any
    case): connected now (on any node), last seen, current certificate serial and expiry."""
    hub = request.query.get("hub") or DEFAULT_HUB
    prefix = request.query.get("prefix") or ""
    if len(prefix) > MAX_PREFIX:
        raise InvalidInput(f"prefix must be at most {MAX_PREFIX} characters")
    top = int_param(request, "top", DEFAULT_TOP, 1, MAX_TOP)
    page, records, host = await run(request, _device_page, services(request), hub, prefix, _after(request), top)
    connected = await runtime(request).live.connected_anywhere(hub, [d.device_id for d in page.items]) \
        if page.items else frozenset()
    body: dict[str, Any] = {"hub": hub, "value": [
        _device_wire(d, d.device_id.lower() in connected, _certificate(records.get(d.device_id.lower(), []), host))
        for d in page.items]}
    if page.next_after is not None:
        body["continuationToken"] = keyset_token(page.next_after)
    return send(body)


@routes.get("/fleet/enrollments")
async def fleet_enrollments(request: web.Request) -> web.Response:
    """A page of individual enrollments (``kind=individual``, the default) or groups (``kind=group``) in id order,
    without keys."""
    kind = request.query.get("kind") or INDIVIDUAL
    if kind not in (INDIVIDUAL, GROUP):
        raise InvalidInput(f"kind must be {INDIVIDUAL} or {GROUP}")
    top = int_param(request, "top", DEFAULT_TOP, 1, MAX_TOP)
    page = await run(request, services(request).enrollments.page, kind, after=_after(request), top=top)
    body: dict[str, Any] = {"kind": kind, "value": [e.to_wire() for e in page.items]}
    if page.next_after is not None:
        body["continuationToken"] = keyset_token(page.next_after)
    return send(body)


def _timeline(s: Services, days: int, namespace: str | None) -> list[tuple[Any, int]]:
    """The registry names a namespace's issuing CAs; the CA counts their certificates by day of expiry."""
    ca_ids = s.devices.issuing_ca_ids(namespace) if namespace else None
    return s.issuance.expiry_timeline(days, issuing_ca_ids=ca_ids)


@routes.get("/fleet/expiryTimeline")
async def expiry_timeline(request: web.Request) -> web.Response:
    """How many unrevoked operational certificates expire on each UTC day, today first (``days``: 1-366, default
    90; ``namespace``: that namespace's only)."""
    days = int_param(request, "days", 90, 1, MAX_DAYS)
    namespace = request.query.get("namespace") or None
    series = await run(request, _timeline, services(request), days, namespace)
    return send({"from": series[0][0].isoformat(), "days": days, "namespace": namespace,
                 "total": sum(n for _, n in series),
                 "value": [{"date": d.isoformat(), "count": n} for d, n in series]})


@routes.get("/fleet/registrationsPerMinute")
async def registrations_by_minute(request: web.Request) -> web.Response:
    """Register operations per UTC minute over the last ``minutes`` (1-1440, default 60), oldest first, by outcome."""
    minutes = int_param(request, "minutes", 60, 1, MAX_MINUTES)
    series = await run(request, registrations_per_minute, services(request).store, minutes)
    return send({"minutes": minutes, "total": sum(m.total for m in series), "value": [m.to_wire() for m in series]})
