"""DPS service API for the device plane: enrollments, enrollment groups, registration states,
linked hubs (with their device registries and trusted CAs) and the ADR device registry.

Shapes follow Azure's DPS service REST API (wire spec §5); linked hubs and device listings are
opendps' own (documented in docs/api.md). Routes only translate: the domain validates.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from opendps.errors import InvalidInput
from opendps.frontends.http.certificates import certificate_response, certificate_routes, pem
from opendps.frontends.http.wire import (
    if_match,
    json_body,
    json_object_body,
    keyset_page,
    keyset_request,
    object_member,
    page,
    page_response,
    page_window,
    run,
    runtime,
    send,
    services,
)
from opendps.hub import HubView
from opendps.pki import CaCertificates
from opendps.provisioning.enrollments import GROUP, INDIVIDUAL
from opendps.transport.wire import iso8601

routes = web.RouteTableDef()


def _kind(request: web.Request) -> str:
    return GROUP if request.path.lower().startswith("/enrollmentgroups") else INDIVIDUAL


# ---- enrollments and enrollment groups ----
async def put_enrollment(request: web.Request) -> web.Response:
    doc = await json_body(request)
    v, created = await run(request, services(request).enrollments.put, _kind(request), request.match_info["id"],
                           doc, if_match=if_match(request))
    return send(v.to_wire(include_keys=True), 201 if created else 200, v.etag)


async def get_enrollment(request: web.Request) -> web.Response:
    v = await run(request, services(request).enrollments.get, _kind(request), request.match_info["id"])
    return send(v.to_wire(), etag=v.etag)


async def delete_enrollment(request: web.Request) -> web.Response:
    await run(request, services(request).enrollments.delete, _kind(request), request.match_info["id"],
              if_match=if_match(request))
    return web.Response(status=204)


async def attestation_mechanism(request: web.Request) -> web.Response:
    v = await run(request, services(request).enrollments.get, _kind(request), request.match_info["id"])
    return send(v.attestation_mechanism())


# what SDKs send: "*" (Node, C), "select * from enrollments" (Java), "SELECT * FROM enrollmentGroups" (C# samples)
_SELECT_ALL = re.compile(r"\s*(\*|select\s+\*\s+from\s+(enrollments|enrollmentgroups))\s*", re.IGNORECASE)


async def query_enrollments(request: web.Request) -> web.Response:
    if (await request.read()).strip():
        q = await json_body(request)
        text = q.get("query", "*") if isinstance(q, dict) else None
        if not isinstance(text, str) or not _SELECT_ALL.fullmatch(text):
            raise InvalidInput(f"query {text!r} is not supported: only \"*\" or SELECT * FROM enrollments | "
                               "enrollmentGroups, without WHERE")
    kind = _kind(request)
    start, size = page_window(request)
    views, more = await run(request, services(request).enrollments.window, kind, start, size)
    return page_response([v.to_wire() for v in views], "EnrollmentGroup" if kind == GROUP else "Enrollment", start,
                         size, more=more)


async def bulk_enrollments(request: web.Request) -> web.Response:
    """Azure's bulk operation (``POST /enrollments`` with ``{"mode", "enrollments": [...]}``; groups under
    ``enrollmentGroups``): 200 with ``isSuccessful`` and the items refused."""
    kind = _kind(request)
    body = await json_object_body(request)
    items, id_field = ("enrollmentGroups", "enrollmentGroupId") if kind == GROUP else ("enrollments", "registrationId")
    errors = await run(request, services(request).enrollments.bulk, kind, body.get("mode"), body.get(items))
    return send({"isSuccessful": not errors, "errors": [
        {id_field: e.enrollment_id, "errorCode": e.error_code, "errorStatus": e.error_status} for e in errors]})


for base in ("/enrollments", "/enrollmentGroups"):
    routes.post(base)(bulk_enrollments)
    routes.put(base + "/{id}")(put_enrollment)
    routes.get(base + "/{id}")(get_enrollment)
    routes.delete(base + "/{id}")(delete_enrollment)
    routes.post(base + "/{id}/attestationmechanism")(attestation_mechanism)
    routes.post(base + "/query")(query_enrollments)


# ---- registration states ----
@routes.get("/registrations/{id}")
async def get_registration(request: web.Request) -> web.Response:
    state = await run(request, services(request).provisioning.get_registration, request.match_info["id"])
    return send(state, etag=state["etag"])


@routes.delete("/registrations/{id}")
async def delete_registration(request: web.Request) -> web.Response:
    await run(request, services(request).provisioning.delete_registration, request.match_info["id"],
              if_match=if_match(request))
    return web.Response(status=204)


@routes.post("/registrations/{id}/query")
async def query_registrations(request: web.Request) -> web.Response:
    states = await run(request, services(request).provisioning.list_registrations, request.match_info["id"])
    return page(request, states, "DeviceRegistration")


# ---- linked hubs ----
def hub_wire(h: HubView) -> dict[str, Any]:
    return {"name": h.name, "etag": h.etag, "properties": {
        "hostName": h.host_name, "allocationWeight": h.allocation_weight,
        "applyAllocationPolicy": h.apply_allocation_policy, "createdAt": iso8601(h.created_at)}}


@routes.put("/linkedHubs/{name}")
async def put_linked_hub(request: web.Request) -> web.Response:
    body = await json_object_body(request, required=False)
    props = object_member(body, "properties", "properties")
    h = await run(request, services(request).hubs.create, request.match_info["name"], props.get("hostName") or None,
                  allocation_weight=props.get("allocationWeight", 1),
                  apply_allocation_policy=props.get("applyAllocationPolicy", True))
    return send(hub_wire(h), 201, h.etag)


@routes.get("/linkedHubs")
async def list_linked_hubs(request: web.Request) -> web.Response:
    hubs = await run(request, services(request).hubs.list)
    return send({"value": [hub_wire(h) for h in hubs]})


@routes.get("/linkedHubs/{name}")
async def get_linked_hub(request: web.Request) -> web.Response:
    h = await run(request, services(request).hubs.get, request.match_info["name"])
    return send(hub_wire(h), etag=h.etag)


@routes.delete("/linkedHubs/{name}")
async def delete_linked_hub(request: web.Request) -> web.Response:
    """Unlink a hub, then close its devices' sessions on every node: their identities went with it (a session left
    open had its telemetry refused and no presence row)."""
    name = request.match_info["name"]
    hub = await run(request, services(request).hubs.get, name)
    await run(request, services(request).hubs.delete, name, if_match=if_match(request))
    await runtime(request).live.drop_hub(hub.id, hub.name, f"hub {hub.name} was unlinked")
    return web.Response(status=204)


@routes.get("/linkedHubs/{name}/devices")
async def list_hub_devices(request: web.Request) -> web.Response:
    """A page of the hub's twins in device id order (``top``, ``continuationToken``)."""
    top, after = keyset_request(request)
    devices = await run(request, services(request).hubs.list_devices, request.match_info["name"], top=top + 1,
                        after=after)
    body = keyset_page(devices, top, lambda d: d.device_id.lower())
    body["value"] = [d.twin() for d in body["value"]]
    return send(body)


@routes.get("/linkedHubs/{name}/devices/{deviceId}")
async def get_hub_device(request: web.Request) -> web.Response:
    d = await run(request, services(request).hubs.get_device, request.match_info["name"],
                  request.match_info["deviceId"])
    return send(d.twin(), etag=d.etag)


@routes.get("/linkedHubs/{name}/certificates")
async def list_hub_certificates(request: web.Request) -> web.Response:
    """What the hub trusts: issuing CAs synced from linked policies, then CAs uploaded to the hub."""
    cas = await run(request, services(request).hubs.trusted_cas, request.match_info["name"])
    uploaded = await run(request, (await hub_certificates(request)).list)
    synced = [{"name": f"{t.namespace}-{t.policy}", "properties": {
        "source": "policy", "subject": t.certificate.subject.rfc4514_string(), "namespace": t.namespace,
        "policy": t.policy, "status": t.status, "enrollments": t.enrollments,
        "expiry": iso8601(t.certificate.not_valid_after_utc),
        "isVerified": True, "certificate": pem(t.certificate)}} for t in cas]
    own = []
    for v in uploaded:
        item = certificate_response(v).model_dump(exclude_none=True)
        item["properties"].update(source="uploaded", status="active" if v.is_verified else "unverified")
        own.append(item)
    return send({"value": synced + own})


def _owner_keys_wire(keys: tuple[str, str]) -> dict[str, Any]:
    return {"keyName": "iothubowner", "rights": "RegistryWrite, ServiceConnect, DeviceConnect",
            "primaryKey": keys[0], "secondaryKey": keys[1]}


@routes.get("/linkedHubs/{name}/keys")
async def get_hub_keys(request: web.Request) -> web.Response:
    """The hub's own iothubowner keys (DPS owner only: not a hub: route)."""
    return send(_owner_keys_wire(await run(request, services(request).hubs.owner_keys, request.match_info["name"])))


@routes.post("/linkedHubs/{name}/keys/renew")
async def renew_hub_key(request: web.Request) -> web.Response:
    """``{"renewKey": "primary" | "secondary" | "swap"}``, as ``az iot hub policy renew-key``."""
    body = await json_object_body(request)
    keys = await run(request, services(request).hubs.renew_owner_key, request.match_info["name"], body.get("renewKey"))
    return send(_owner_keys_wire(keys))


async def hub_certificates(request: web.Request) -> CaCertificates:
    """The CA certificates uploaded to the hub in the path (``az iot hub certificate``)."""
    return await run(request, services(request).hubs.certificates, request.match_info["name"])


certificate_routes(routes, "/linkedHubs/{name}/certificates", hub_certificates, list_route=False)


# ---- ADR device registry ----
@routes.get("/namespaces/{ns}/devices")
async def list_namespace_devices(request: web.Request) -> web.Response:
    """A page of the namespace's device records in device id order (``top``, ``continuationToken``)."""
    top, after = keyset_request(request)
    views = await run(request, services(request).devices.list, request.match_info["ns"], top=top + 1, after=after)
    body = keyset_page(views, top, lambda v: v.device_id.lower())
    body["value"] = [v.to_wire() for v in body["value"]]
    return send(body)


@routes.get("/namespaces/{ns}/devices/{deviceId}")
async def get_namespace_device(request: web.Request) -> web.Response:
    v = await run(request, services(request).devices.get, request.match_info["ns"], request.match_info["deviceId"])
    return send(v.to_wire(), etag=v.etag)


# ---- telemetry routes of a hub (NATS; opendps' own, in the spirit of IoT Hub message routing) ----
@routes.put("/linkedHubs/{name}/routes/{route}")
async def put_route(request: web.Request) -> web.Response:
    body = await json_body(request)
    v, created = await run(request, services(request).routes.put, request.match_info["name"], request.match_info["route"],
                           body, if_match=if_match(request))
    return send(v.to_wire(), 201 if created else 200, v.etag)


@routes.get("/linkedHubs/{name}/routes")
async def list_routes(request: web.Request) -> web.Response:
    found = await run(request, services(request).routes.list, request.match_info["name"])
    return send({"value": [v.to_wire() for v in found]})


@routes.get("/linkedHubs/{name}/routes/{route}")
async def get_route(request: web.Request) -> web.Response:
    v = await run(request, services(request).routes.get, request.match_info["name"], request.match_info["route"])
    return send(v.to_wire(), etag=v.etag)


@routes.delete("/linkedHubs/{name}/routes/{route}")
async def delete_route(request: web.Request) -> web.Response:
    await run(request, services(request).routes.delete, request.match_info["name"], request.match_info["route"],
              if_match=if_match(request))
    return web.Response(status=204)
