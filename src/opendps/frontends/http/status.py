"""The service's own state: ``GET /status`` (a one-screen summary for ``opendps status`` and the dashboard's top row)
and ``GET /metrics`` (Prometheus exposition). Management routes (ServiceConfig), except that ``/metrics`` answers a
loopback client without credentials (``app.sas_middleware``; the plain-HTTP ``--metrics-port`` listener serves it too).

Each number of the summary comes from the package that owns the rows (``Services.inventory``: one aggregate query
each), read together in one domain call and kept :data:`CACHE_SECONDS` per process, so a dashboard refreshing every
few seconds costs the store a handful of small queries.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from opendps.frontends import metrics
from opendps.frontends.http.wire import int_param, run, runtime, send
from opendps.services import Services

routes = web.RouteTableDef()
METRICS_ROUTE_PREFIX = "metrics:"  # the SAS middleware lets a loopback client without credentials through
CACHE_SECONDS = 5.0
DEFAULT_REFUSALS = 10
MAX_REFUSALS = 100


def summary(services: Services, refusals: int = DEFAULT_REFUSALS, *, now: datetime | None = None) -> dict[str, Any]:
    """The status document (docs/api.md, "Service status"): blocking, in the domain thread pool."""
    now = now or datetime.now(UTC)
    hour_ago = now - timedelta(hours=1)
    inventory = services.inventory
    namespaces, policies = inventory.registry.counts()
    hubs = inventory.hubs.counts()
    ra = inventory.provisioning.counts(hour_ago)
    valid = expiring_7 = expiring_30 = 0
    for row in inventory.certificates.expiry(now=now, horizons_days=(7, 30)):
        valid += row.valid
        expiring_7 += row.within[7]
        expiring_30 += row.within[30]
    return {
        "time": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "namespaces": namespaces, "policies": policies, "linkedHubs": hubs.linked_hubs,
        "enrollments": {"individual": ra.individual_enrollments, "groups": ra.enrollment_groups,
                        "disabled": ra.disabled_enrollments},
        "devices": {"provisioned": ra.provisioned, "connected": hubs.connected},
        "certificates": {"valid": valid, "expiringIn7Days": expiring_7, "expiringIn30Days": expiring_30},
        "registrations": {"lastHour": sum(ra.operations.values()), "assignedLastHour": ra.operations.get("assigned", 0),
                          "failedLastHour": ra.operations.get("failed", 0)},
        "refusals": {"lastHour": inventory.refusals.count_since(hour_ago),
                     "recent": [r.to_wire() for r in inventory.refusals.recent(refusals)]},
    }


@routes.get("/status")
async def service_status(request: web.Request) -> web.Response:
    """The summary, at most :data:`CACHE_SECONDS` old (query ``refusals``: how many recent refusals, 0-100)."""
    asked = int_param(request, "refusals", DEFAULT_REFUSALS, 0, MAX_REFUSALS)
    rt = runtime(request)
    hit = rt.status_cache.get(asked)
    if hit is not None and time.monotonic() - hit[0] < CACHE_SECONDS:
        return send(hit[1])
    data = await run(request, summary, rt.services, asked)
    rt.status_cache.clear()  # one entry: the newest
    rt.status_cache[asked] = (time.monotonic(), data)
    return send(data)


async def metrics_exposition(request: web.Request) -> web.Response:
    """Prometheus' text format (0.0.4): every process's metrics and the store gauges, rendered off the loop."""
    body = await run(request, metrics.render, runtime(request).store_gauges)
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})


routes.get("/metrics", name=METRICS_ROUTE_PREFIX + "exposition")(metrics_exposition)
