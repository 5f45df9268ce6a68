"""IoT hub service API in Azure's REST shapes (wire spec §6.7): device identities, twins, direct
methods, plus C2D send and a telemetry stream (opendps' own; Azure uses AMQP — also served, by
:mod:`opendps.frontends.amqp` — and Event Hubs there).

The hub is the one an ``iothubowner`` token's audience names, or ``?hub=<name>`` (default ``default``)
for the DPS owner. Routes are named ``hub:*`` (the SAS middleware lets ``iothubowner`` call only these).
What needs a connected device goes through the live sessions (:class:`opendps.hub.LiveSessions`), which reach it on
whichever process or node holds it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from opendps.errors import InvalidInput, OpenDPSError
from opendps.frontends import metrics
from opendps.frontends.http.wire import (
    TOKEN_HUB,
    if_match,
    json_body,
    json_object_body,
    keyset_after,
    keyset_token,
    max_item_count,
    object_member,
    run,
    runtime,
    send,
    services,
)
from opendps.hub import DEFAULT_HUB, DeviceIdentity, DeviceOffline
from opendps.hub.live import check_method_payload
from opendps.hub.messaging import time_to_live
from opendps.transport.wire import decimal, iso8601

routes = web.RouteTableDef()
HUB_ROUTE_PREFIX = "hub:"
MAX_METHOD_TIMEOUT = 300
DEFAULT_QUERY_PAGE = 100  # rows per query page when x-ms-max-item-count is not sent, as IoT Hub
HEARTBEAT = 15.0
C2D_HEADERS = {"iothub-messageid": "message-id", "iothub-correlationid": "correlation-id", "iothub-userid": "user-id",
               "iothub-ack": "ack", "content-type": "content-type", "content-encoding": "content-encoding"}


def hub_name(request: web.Request) -> str:
    forced = request.get(TOKEN_HUB)
    asked = request.query.get("hub")
    if forced is not None:
        if asked is not None and asked != forced:
            raise InvalidInput(f"this token is for hub {forced!r}, not {asked!r}")
        return forced
    return asked or DEFAULT_HUB


def device_wire(d: DeviceIdentity, keys: tuple[str, str] | None, connected: bool) -> dict[str, Any]:
    auth: dict[str, Any] = {"type": d.auth_type, "symmetricKey": {"primaryKey": keys[0] if keys else None,
                                                                 "secondaryKey": keys[1] if keys else None},
                            "x509Thumbprint": {"primaryThumbprint": d.primary_thumbprint,
                                               "secondaryThumbprint": d.secondary_thumbprint}}
    return {"deviceId": d.device_id, "generationId": d.generation_id, "etag": d.etag, "status": d.status,
            "statusReason": None, "connectionState": "Connected" if connected else "Disconnected",
            "lastActivityTime": iso8601(d.updated_at), "cloudToDeviceMessageCount": 0, "authentication": auth,
            "capabilities": {"iotEdge": False}}


def twin_wire(d: DeviceIdentity, connected: bool) -> dict[str, Any]:
    twin = d.twin()
    return {"deviceId": d.device_id, "etag": d.etag, "deviceEtag": d.etag, "version": d.desired_version + d.reported_version,
            "status": d.status, "connectionState": "Connected" if connected else "Disconnected",
            "authenticationType": d.auth_type, "tags": twin["tags"], "properties": twin["properties"],
            "x509Thumbprint": {"primaryThumbprint": d.primary_thumbprint, "secondaryThumbprint": d.secondary_thumbprint},
            "capabilities": {"iotEdge": False}}


async def _connected(request: web.Request, d: DeviceIdentity) -> bool:
    """Connected to any process or node of the service (presence), or to this one."""
    return bool(await runtime(request).live.connected_anywhere(d.hub_name, [d.device_id]))


@routes.put("/devices/{id}", name=HUB_ROUTE_PREFIX + "device-put")
async def put_device(request: web.Request) -> web.Response:
    body = await json_object_body(request, "request body (a Device)")
    device_id = request.match_info["id"]
    if body.get("deviceId") not in (None, device_id):
        raise InvalidInput(f"deviceId {body.get('deviceId')!r} in the body does not match {device_id!r} in the path")
    auth = object_member(body, "authentication", "authentication")
    sym = object_member(auth, "symmetricKey", "authentication.symmetricKey")
    thumbs = object_member(auth, "x509Thumbprint", "authentication.x509Thumbprint")
    if bool(sym.get("primaryKey")) != bool(sym.get("secondaryKey")):
        raise InvalidInput("authentication.symmetricKey needs both primaryKey and secondaryKey, or neither (generated)")
    keys = (sym["primaryKey"], sym["secondaryKey"]) if sym.get("primaryKey") else None
    hub = hub_name(request)
    ident, _ = await run(request, services(request).hubs.create_device, hub, device_id,
                         auth_type=auth.get("type") or "sas", keys=keys,
                         thumbprints=(thumbs.get("primaryThumbprint"), thumbs.get("secondaryThumbprint")),
                         status=body.get("status") or "enabled", if_match=if_match(request))
    if ident.status != "enabled":
        await runtime(request).live.drop(hub, device_id, "device disabled by the service")
    return await _device_reply(request, hub, device_id)


async def _device_reply(request: web.Request, hub: str, device_id: str) -> web.Response:
    ident, keys = await run(request, services(request).hubs.device_credentials, hub, device_id)
    return send(device_wire(ident, keys, await _connected(request, ident)), etag=ident.etag)


@routes.get("/devices/{id}", name=HUB_ROUTE_PREFIX + "device-get")
async def get_device(request: web.Request) -> web.Response:
    return await _device_reply(request, hub_name(request), request.match_info["id"])


MAX_DEVICE_LIST = 1000  # IoT Hub's bound on GET /devices


def device_list_top(request: web.Request) -> int:
    """``GET /devices?top=N``: at most N identities; as in IoT Hub, absent or outside 1-1000 means 1000 (a hub of a
    million devices is not one response)."""
    raw = request.query.get("top")
    if raw is None:
        return MAX_DEVICE_LIST
    try:
        top = int(raw)
    except ValueError:
        raise InvalidInput(f"top must be an integer, not {raw[:32]!r}") from None
    return top if 1 <= top <= MAX_DEVICE_LIST else MAX_DEVICE_LIST


@routes.get("/devices", name=HUB_ROUTE_PREFIX + "device-list")
async def list_devices(request: web.Request) -> web.Response:
    """At most ``top`` identities in device id order, as IoT Hub answers. IoT Hub stops there; opendps also answers
    ``x-ms-continuation`` when more follow, and a request carrying it lists the ones after (Azure's clients ignore
    the header; ``opendps iot hub device-identity list`` follows it)."""
    hub, top = hub_name(request), device_list_top(request)
    after = keyset_after(request.headers.get("x-ms-continuation"), "x-ms-continuation")
    devices = await run(request, services(request).hubs.list_devices, hub, top=top + 1, after=after)
    page = devices[:top]
    connected = await runtime(request).live.connected_anywhere(hub, [d.device_id for d in page]) if page \
        else frozenset()
    headers = {"x-ms-continuation": keyset_token(page[-1].device_id.lower())} if len(devices) > top else None
    return send([device_wire(d, None, d.device_id.lower() in connected) for d in page], headers=headers)


@routes.post("/devices/query", name=HUB_ROUTE_PREFIX + "query")
async def query_devices(request: web.Request) -> web.Response:
    """Azure's Query IoT Hub over twins (the subset :mod:`opendps.hub.query` supports), paged in device id order:
    ``x-ms-max-item-count`` in, ``x-ms-continuation`` in and out (an opaque token bound to the query)."""
    body = await json_object_body(request, "request body (a QuerySpecification)")
    if not isinstance(body.get("query"), str):
        raise InvalidInput('request body needs "query": the query text, e.g. "SELECT * FROM devices"')
    size = max_item_count(request, DEFAULT_QUERY_PAGE)
    hub = hub_name(request)
    connected = await runtime(request).live.connected_anywhere(hub)  # read before: the query runs in the thread pool

    def document(d: DeviceIdentity) -> dict[str, Any]:
        return twin_wire(d, d.device_id.lower() in connected)

    result = await run(request, services(request).hubs.query, hub, body["query"], document, page_size=size,
                       continuation=request.headers.get("x-ms-continuation") or None)
    headers = {"x-ms-item-type": result.item_type, "x-ms-max-item-count": str(size)}
    if result.continuation is not None:
        headers["x-ms-continuation"] = result.continuation
    return send(result.items, headers=headers)


@routes.delete("/devices/{id}", name=HUB_ROUTE_PREFIX + "device-delete")
async def delete_device(request: web.Request) -> web.Response:
    hub, device_id = hub_name(request), request.match_info["id"]
    await run(request, services(request).hubs.delete_device, hub, device_id, if_match=if_match(request))
    await runtime(request).live.drop(hub, device_id, "device deleted by the service")
    return web.Response(status=204)


@routes.get("/twins/{id}", name=HUB_ROUTE_PREFIX + "twin-get")
async def get_twin(request: web.Request) -> web.Response:
    ident = await run(request, services(request).hubs.get_device, hub_name(request), request.match_info["id"])
    return send(twin_wire(ident, await _connected(request, ident)), etag=ident.etag)


def _desired(body: dict[str, Any]) -> Any:
    """``properties.desired`` of a twin body (None when absent); ``properties`` must be an object."""
    properties = body.get("properties")
    if properties is None:
        return None
    if not isinstance(properties, dict):
        raise InvalidInput("properties must be a JSON object")
    return properties.get("desired")


async def _write_twin(request: web.Request, device_id: str,
                      write: Callable[[], Awaitable[tuple[DeviceIdentity, dict[str, Any] | None]]]) -> web.Response:
    """A twin write (PATCH or PUT) and its answer; a desired change goes to the device now if it is connected. The
    write and its push take the device's turn (``LiveSessions.twin_turn``), so the device gets its desired patches in
    the order of their versions."""
    live = runtime(request).live
    async with live.twin_turn(hub_name(request), device_id):
        ident, desired_change = await write()
        if desired_change is not None:
            await live.push_desired(ident.hub_name, ident.device_id, desired_change, ident.desired_version)
    return send(twin_wire(ident, await _connected(request, ident)), etag=ident.etag)


@routes.patch("/twins/{id}", name=HUB_ROUTE_PREFIX + "twin-patch")
async def patch_twin(request: web.Request) -> web.Response:
    body = await json_object_body(request, "request body (a twin patch)")
    desired, device_id = _desired(body), request.match_info["id"]

    async def write() -> tuple[DeviceIdentity, dict[str, Any] | None]:
        ident = await run(request, services(request).hubs.update_twin, hub_name(request), device_id,
                          desired=desired, tags=body.get("tags"), if_match=if_match(request))
        return ident, desired

    return await _write_twin(request, device_id, write)


@routes.put("/twins/{id}", name=HUB_ROUTE_PREFIX + "twin-replace")
async def replace_twin(request: web.Request) -> web.Response:
    """Azure's Replace Twin: tags and desired properties replaced wholesale (reported ones in the body ignored);
    the device is sent the merge patch from its old desired properties to the new ones."""
    body = await json_object_body(request, "request body (a twin)")
    device_id = request.match_info["id"]
    if body.get("deviceId") not in (None, device_id):
        raise InvalidInput(f"deviceId {body.get('deviceId')!r} in the body does not match {device_id!r} in the path")
    desired = _desired(body)

    async def write() -> tuple[DeviceIdentity, dict[str, Any] | None]:
        ident, change = await run(request, services(request).hubs.replace_twin, hub_name(request), device_id,
                                  tags=body.get("tags"), desired=desired, if_match=if_match(request))
        return ident, change

    return await _write_twin(request, device_id, write)


@routes.post("/twins/{id}", name=HUB_ROUTE_PREFIX + "twin-override")
async def overridden_twin_method(request: web.Request) -> web.Response:
    """``POST`` + ``X-HTTP-Method-Override: PATCH``: how Java's service SDK patches a twin (its HttpURLConnection
    cannot send PATCH). Any other POST to a twin is 405, as before."""
    override = request.headers.get("X-HTTP-Method-Override", "").strip().upper()
    if override == "PATCH":
        return await patch_twin(request)
    if override == "PUT":
        return await replace_twin(request)
    raise web.HTTPMethodNotAllowed("POST", ["GET", "PATCH", "PUT"])


def _seconds(body: dict[str, Any], name: str, default: int, low: int) -> float:
    """A direct method's timeout member: a number of seconds within ``low``-300 (absent or null: ``default``)."""
    value = body.get(name)
    if value is None:
        return float(default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= MAX_METHOD_TIMEOUT:
        raise InvalidInput(f"{name} must be within [{low}; {MAX_METHOD_TIMEOUT}]")
    return float(value)


@routes.post("/twins/{id}/methods", name=HUB_ROUTE_PREFIX + "method")
async def invoke_method(request: web.Request) -> web.Response:
    """Azure's Invoke Device Method: ``responseTimeoutInSeconds`` (default 30) counts from when the device is handed
    the call; ``connectTimeoutInSeconds`` (default 0: it must be listening already, up to 300) is how long to wait for
    a device that is not connected or not subscribed to methods. 404 404001 for a device that does not exist, 404103
    for one that is not listening (in time), 504 504101 for one that does not answer in time."""
    body = await json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("methodName"), str) or not body["methodName"]:
        raise InvalidInput("request body needs methodName")
    timeout = _seconds(body, "responseTimeoutInSeconds", 30, 1)
    connect_timeout = _seconds(body, "connectTimeoutInSeconds", 0, 0)
    check_method_payload(body.get("payload"))
    hub, device_id = hub_name(request), request.match_info["id"]
    try:
        if connect_timeout:  # no waiting for a device that does not exist
            await run(request, services(request).hubs.get_device, hub, device_id)
        try:
            status, payload = await runtime(request).live.invoke_method(
                hub, device_id, body["methodName"], body.get("payload"), timeout=timeout, connect_timeout=connect_timeout)
        except DeviceOffline:  # one that does not exist is told so (404001), as IoT Hub does
            await run(request, services(request).hubs.get_device, hub, device_id)
            raise
    except OpenDPSError as exc:
        metrics.method_call(None, exc)
        raise
    metrics.method_call(status)
    return send({"status": status, "payload": payload})


@routes.post("/devices/{id}/messages/deviceBound", name=HUB_ROUTE_PREFIX + "c2d-send")
async def send_c2d(request: web.Request) -> web.Response:
    """Body = the message; ``iothub-*`` headers and ``iothub-app-<name>`` for properties; ``iothub-ttl`` seconds."""
    hub, device_id = hub_name(request), request.match_info["id"]
    data = await request.read()
    system = {name: request.headers[h] for h, name in C2D_HEADERS.items() if h in request.headers}
    props = {h[len("iothub-app-"):]: v for h, v in request.headers.items() if h.lower().startswith("iothub-app-")}
    try:
        seconds = float(request.headers.get("iothub-ttl", 3600))
    except ValueError as exc:
        raise InvalidInput("iothub-ttl must be a number of seconds") from exc
    ttl = time_to_live(seconds)
    message = await runtime(request).queue_c2d(hub, device_id, data, system=system, properties=props, ttl=ttl)
    return send({"messageId": message.message_id}, 202)


@routes.delete("/devices/{id}/commands", name=HUB_ROUTE_PREFIX + "c2d-purge")
async def purge_c2d(request: web.Request) -> web.Response:
    """IoT Hub's purge of a device's cloud-to-device queue (C#'s ``ServiceClient.PurgeMessageQueueAsync``, az's
    ``c2d-message purge``): 200 ``{"deviceId", "totalMessagesPurged"}``, 404 for a device that does not exist."""
    hub, device_id = hub_name(request), request.match_info["id"]
    purged = await run(request, services(request).c2d.purge, hub, device_id)
    return send({"deviceId": device_id, "moduleId": None, "totalMessagesPurged": purged})


EVENT_STREAMS_END = web.AppKey("event-streams-end", asyncio.Event)


def end_event_streams_at_shutdown(app: web.Application) -> None:
    """A stopping server ends its ``/events`` streams within a second: a follower (``timeout=0``) held the stop for
    aiohttp's whole shutdown timeout and more (SIGTERM answered after 90 s), and a supervisor's worker restart with it."""
    app[EVENT_STREAMS_END] = asyncio.Event()

    async def end(app: web.Application) -> None:
        app[EVENT_STREAMS_END].set()

    app.on_shutdown.append(end)


@routes.get("/events", name=HUB_ROUTE_PREFIX + "events")
async def stream_events(request: web.Request) -> web.StreamResponse:
    """Telemetry as NDJSON, from a position (``from=<n>``, ``earliest`` or ``latest`` = only new), live until
    ``timeout`` seconds pass without a message (0 = follow forever) or ``count`` events were sent."""
    hub = hub_name(request)
    sink = services(request).telemetry
    device_id = request.query.get("deviceId") or None
    start = request.query.get("from", "latest")
    try:
        timeout = float(request.query.get("timeout", "0"))
    except ValueError:
        timeout = -1.0
    count = decimal(request.query.get("count", "0"))
    asked = None if start in ("earliest", "latest") else decimal(start, 18)  # a position fits a 64-bit column
    if asked is None and start not in ("earliest", "latest"):
        raise InvalidInput(f"from must be earliest, latest or a position (a number an event carried), not {start[:20]!r}")
    if not 0 <= timeout < float("inf") or count is None:
        raise InvalidInput("timeout must be a number of seconds (0: follow) and count a whole number (0: all)")
    position = 0 if start == "earliest" else await run(request, sink.last_position, hub) if start == "latest" else asked
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    bus = runtime(request).telemetry_bus
    ending = request.app.get(EVENT_STREAMS_END)
    sent = 0
    idle_since = last_write = asyncio.get_running_loop().time()
    while True:
        if request.transport is None or request.transport.is_closing():
            return response  # the consumer went away
        if ending is not None and ending.is_set():
            return response  # the server is stopping
        events = await run(request, sink.read, hub, after=position, device_id=device_id, limit=200)
        for event in events:
            await response.write((json.dumps(event.to_wire()) + "\n").encode())
            position = event.position
            sent += 1
            if count and sent >= count:
                return response
        now = asyncio.get_running_loop().time()
        if events:
            idle_since = now
        elif timeout and now - idle_since >= timeout:
            return response
        if not events:
            if now - last_write >= HEARTBEAT:  # a blank line: lets a proxy, and us, notice a dead consumer
                await response.write(b"\n")
                last_write = now
            await bus.wait(min(1.0, timeout - (now - idle_since)) if timeout else 1.0)
        else:
            last_write = now
