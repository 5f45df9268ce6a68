"""DPS service API for the device plane: enrollments, enrollment groups, registration states,
linked hubs (with their device registries and trusted CAs) and the ADR device registry.

Shapes follow Azure's DPS service REST API (wire spec §5); linked hubs and device listings are
opendps' own (documented in docs/api.md). Routes only translate: the domain validates.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from opendps.api.service import certificate_response, certificate_routes, pem, run
from opendps.errors import InvalidInput
from opendps.provisioning.ca_certificates import CaCertificates
from opendps.provisioning.enrollments import GROUP, INDIVIDUAL
from opendps.store import HubCertificate

routes = web.RouteTableDef()
MAX_PAGE = 1000


async def json_body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw.strip():
        raise InvalidInput("request body is required")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from exc


def send(data: Any, status: int = 200, etag: str | None = None, headers: dict | None = None) -> web.Response:
    h = dict(headers or {})
    if etag:
        h["ETag"] = f'"{etag}"'
    return web.Response(status=status, text=json.dumps(data), content_type="application/json", headers=h)


def page(request: web.Request, items: list, item_type: str) -> web.Response:
    """Azure's query paging: x-ms-max-item-count in, x-ms-continuation in and out."""
    try:
        size = int(request.headers.get("x-ms-max-item-count") or MAX_PAGE)
        start = int(request.headers.get("x-ms-continuation") or 0)
    except ValueError as exc:
        raise InvalidInput("x-ms-max-item-count and x-ms-continuation must be integers") from exc
    if not 1 <= size <= MAX_PAGE or start < 0:
        raise InvalidInput(f"x-ms-max-item-count must be 1-{MAX_PAGE} and x-ms-continuation >= 0")
    chunk = items[start:start + size]
    headers = {"x-ms-item-type": item_type, "x-ms-max-item-count": str(size)}
    if start + size < len(items):
        headers["x-ms-continuation"] = str(start + size)
    return send(chunk, headers=headers)


def _kind(request: web.Request) -> str:
    return GROUP if request.path.startswith("/enrollmentGroups") else INDIVIDUAL


# ---- enrollments and enrollment groups ----
async def put_enrollment(request: web.Request) -> web.Response:
    doc = await json_body(request)
    v, created = await run(request, request.app["instance"].enrollments.put, _kind(request), request.match_info["id"],
                           doc, if_match=request.headers.get("If-Match"))
    return send(v.to_wire(include_keys=True), 201 if created else 200, v.etag)


async def get_enrollment(request: web.Request) -> web.Response:
    v = await run(request, request.app["instance"].enrollments.get, _kind(request), request.match_info["id"])
    return send(v.to_wire(), etag=v.etag)


async def delete_enrollment(request: web.Request) -> web.Response:
    await run(request, request.app["instance"].enrollments.delete, _kind(request), request.match_info["id"],
              if_match=request.headers.get("If-Match"))
    return web.Response(status=204)


async def attestation_mechanism(request: web.Request) -> web.Response:
    v = await run(request, request.app["instance"].enrollments.get, _kind(request), request.match_info["id"])
    return send(v.attestation_mechanism())


async def query_enrollments(request: web.Request) -> web.Response:
    raw = await request.read()
    if raw.strip():
        try:
            q = json.loads(raw)
        except ValueError as exc:
            raise InvalidInput(f"request body is not valid JSON: {exc}") from exc
        if not isinstance(q, dict) or q.get("query", "*") not in ("*", "SELECT * FROM enrollments"):
            raise InvalidInput('only the query "*" is supported')
    kind = _kind(request)
    views = await run(request, request.app["instance"].enrollments.list, kind)
    return page(request, [v.to_wire() for v in views], "EnrollmentGroup" if kind == GROUP else "Enrollment")


for base in ("/enrollments", "/enrollmentGroups"):
    routes.put(base + "/{id}")(put_enrollment)
    routes.get(base + "/{id}")(get_enrollment)
    routes.delete(base + "/{id}")(delete_enrollment)
    routes.post(base + "/{id}/attestationmechanism")(attestation_mechanism)
    routes.post(base + "/query")(query_enrollments)


# ---- registration states ----
@routes.get("/registrations/{id}")
async def get_registration(request: web.Request) -> web.Response:
    state = await run(request, request.app["instance"].provisioning.get_registration, request.match_info["id"])
    return send(state, etag=state["etag"])


@routes.delete("/registrations/{id}")
async def delete_registration(request: web.Request) -> web.Response:
    await run(request, request.app["instance"].provisioning.delete_registration, request.match_info["id"],
              if_match=request.headers.get("If-Match"))
    return web.Response(status=204)


@routes.post("/registrations/{id}/query")
async def query_registrations(request: web.Request) -> web.Response:
    states = await run(request, request.app["instance"].provisioning.list_registrations, request.match_info["id"])
    return page(request, states, "DeviceRegistration")


# ---- linked hubs ----
def hub_wire(h) -> dict[str, Any]:  # noqa: ANN001 - HubView
    return {"name": h.name, "etag": h.etag, "properties": {
        "hostName": h.host_name, "allocationWeight": h.allocation_weight,
        "applyAllocationPolicy": h.apply_allocation_policy,
        "createdAt": h.created_at.isoformat().replace("+00:00", "Z")}}


@routes.put("/linkedHubs/{name}")
async def put_linked_hub(request: web.Request) -> web.Response:
    body = await json_body(request) if (await request.read()).strip() else {}
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object")
    props = body.get("properties") or {}
    inst = request.app["instance"]
    name = request.match_info["name"]
    host = props.get("hostName") or f"{name}.{inst.settings.hostname}"
    h = await run(request, inst.hubs.create, name, host,
                  allocation_weight=props.get("allocationWeight", 1),
                  apply_allocation_policy=props.get("applyAllocationPolicy", True))
    return send(hub_wire(h), 201, h.etag)


@routes.get("/linkedHubs")
async def list_linked_hubs(request: web.Request) -> web.Response:
    hubs = await run(request, request.app["instance"].hubs.list)
    return send({"value": [hub_wire(h) for h in hubs]})


@routes.get("/linkedHubs/{name}")
async def get_linked_hub(request: web.Request) -> web.Response:
    h = await run(request, request.app["instance"].hubs.get, request.match_info["name"])
    return send(hub_wire(h), etag=h.etag)


@routes.delete("/linkedHubs/{name}")
async def delete_linked_hub(request: web.Request) -> web.Response:
    await run(request, request.app["instance"].hubs.delete, request.match_info["name"],
              if_match=request.headers.get("If-Match"))
    return web.Response(status=204)


@routes.get("/linkedHubs/{name}/devices")
async def list_hub_devices(request: web.Request) -> web.Response:
    devices = await run(request, request.app["instance"].hubs.list_devices, request.match_info["name"])
    return send({"value": [d.twin() for d in devices]})


@routes.get("/linkedHubs/{name}/devices/{deviceId}")
async def get_hub_device(request: web.Request) -> web.Response:
    d = await run(request, request.app["instance"].hubs.get_device, request.match_info["name"],
                  request.match_info["deviceId"])
    return send(d.twin(), etag=d.etag)


@routes.get("/linkedHubs/{name}/certificates")
async def list_hub_certificates(request: web.Request) -> web.Response:
    """What the hub trusts: issuing CAs synced from linked policies, then CAs uploaded to the hub."""
    cas = await run(request, request.app["instance"].hubs.trusted_cas, request.match_info["name"])
    uploaded = await run(request, (await hub_certificates(request)).list)
    synced = [{"name": f"{t.namespace}-{t.policy}", "properties": {
        "source": "policy", "subject": t.certificate.subject.rfc4514_string(), "namespace": t.namespace,
        "policy": t.policy, "status": t.status, "enrollments": t.enrollments,
        "expiry": t.certificate.not_valid_after_utc.isoformat().replace("+00:00", "Z"),
        "isVerified": True, "certificate": pem(t.certificate)}} for t in cas]
    own = []
    for v in uploaded:
        item = certificate_response(v).model_dump(exclude_none=True)
        item["properties"].update(source="uploaded", status="active" if v.is_verified else "unverified")
        own.append(item)
    return send({"value": synced + own})


async def hub_certificates(request: web.Request) -> CaCertificates:
    """The CA certificates uploaded to the hub in the path (``az iot hub certificate``)."""
    hub = await run(request, request.app["instance"].hubs.get, request.match_info["name"])
    return CaCertificates(request.app["instance"].store, model=HubCertificate, scope={"hub_id": hub.id})


certificate_routes(routes, "/linkedHubs/{name}/certificates", hub_certificates, list_route=False)


# ---- ADR device registry ----
@routes.get("/namespaces/{ns}/devices")
async def list_namespace_devices(request: web.Request) -> web.Response:
    views = await run(request, request.app["instance"].devices.list, request.match_info["ns"])
    return send({"value": [v.to_wire() for v in views]})


@routes.get("/namespaces/{ns}/devices/{deviceId}")
async def get_namespace_device(request: web.Request) -> web.Response:
    v = await run(request, request.app["instance"].devices.get, request.match_info["ns"], request.match_info["deviceId"])
    return send(v.to_wire(), etag=v.etag)
