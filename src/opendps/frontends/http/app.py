"""The aiohttp application of the HTTPS listener: management API, hub service API, DPS device API, MQTT over
WebSockets, certificate status (CRLs and OCSP), ``/openapi.json`` and ``/healthz``; and the plain-HTTP listener's,
which serves certificate status only (:func:`make_status_app`)."""

from __future__ import annotations

import json

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from aiohttp.typedefs import Handler
from multidict import CIMultiDict

from opendps import audit, logs
from opendps.errors import Forbidden, InvalidInput, Unauthorized
from opendps.frontends.http.audit import routes as audit_routes
from opendps.frontends.http.device import DEVICE_ROUTE_PREFIX
from opendps.frontends.http.device import routes as device_routes
from opendps.frontends.http.enrollments import routes as enrollment_routes
from opendps.frontends.http.errors import error_middleware, error_response, quiet_client_errors
from opendps.frontends.http.fleet import routes as fleet_routes
from opendps.frontends.http.hub_service import HUB_ROUTE_PREFIX, end_event_streams_at_shutdown
from opendps.frontends.http.hub_service import routes as hub_routes
from opendps.frontends.http.openapi import build_openapi
from opendps.frontends.http.pki_status import OCSP_GET_ROUTE, PKI_ROUTE_PREFIX, add_status_routes
from opendps.frontends.http.service import routes as service_routes
from opendps.frontends.http.status import METRICS_ROUTE_PREFIX, metrics_exposition
from opendps.frontends.http.status import routes as service_status_routes
from opendps.frontends.http.ui import UI_ROUTE_PREFIX
from opendps.frontends.http.ui import routes as ui_routes
from opendps.frontends.http.wire import RUNTIME, TOKEN_HUB
from opendps.frontends.metrics import is_loopback
from opendps.frontends.runtime import Runtime
from opendps.frontends.service_auth import HUB_POLICY, SasAuthenticator, SasPrincipal, hub_service_only
from opendps.provisioning.access import (
    ENROLLMENT_READ,
    ENROLLMENT_WRITE,
    REGISTRATION_STATUS_READ,
    REGISTRATION_STATUS_WRITE,
    SERVICE_CONFIG,
)
from opendps.transport import shown
from opendps.transport.mqtt.server import MqttServer

MAX_BODY = 1024 * 1024
OPEN_PATHS = {"/openapi.json", "/healthz"}
MQTT_SERVER = web.AppKey("mqtt", MqttServer)


def required_right(method: str, path: str) -> str:
    """The access right a DPS policy needs for a management route (``path``: the route's canonical path, in any of
    its spellings). Enrollments and groups: reading them (GET, their query and attestation mechanism) needs
    EnrollmentRead, anything else (PUT, DELETE, a bulk operation) EnrollmentWrite; registration states: DELETE needs
    RegistrationStatusWrite, reading them RegistrationStatusRead; every other route — certificates, linked hubs and
    their keys, ADR namespaces and policies, the access policies themselves, and any route added later — needs
    ServiceConfig."""
    segments = [s for s in path.lower().split("/") if s]
    head = segments[0] if segments else ""
    reading = method.upper() in ("GET", "HEAD")
    if head in ("enrollments", "enrollmentgroups"):
        if reading or (method.upper() == "POST" and len(segments) > 1
                       and segments[-1] in ("query", "attestationmechanism")):
            return ENROLLMENT_READ
        return ENROLLMENT_WRITE
    if head == "registrations":
        return REGISTRATION_STATUS_WRITE if method.upper() == "DELETE" else REGISTRATION_STATUS_READ
    return SERVICE_CONFIG


def sas_middleware(authenticator: SasAuthenticator) -> web.Middleware:
    """Open and device routes pass; others need a verified service token: ``hub:*`` routes a hub's ``iothubowner``
    or the DPS owner (:func:`hub_service_only`), the rest a DPS access policy holding the route's right
    (:func:`required_right`; missing: 401 naming it) — ``iothubowner`` there is 403."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route
        route_name = route.name or ""
        if request.match_info.http_exception is not None:
            return await handler(request)  # no such route (404/405): said before any credential is looked at
        if request.path in OPEN_PATHS or route_name.startswith((DEVICE_ROUTE_PREFIX, PKI_ROUTE_PREFIX, UI_ROUTE_PREFIX)):
            return await handler(request)  # open (certificate status, the dashboard's files), or the device API
        if route_name.startswith(METRICS_ROUTE_PREFIX) and "Authorization" not in request.headers \
                and is_loopback(_peer_host(request), request.headers):
            return await handler(request)  # Prometheus on this machine scrapes without credentials; others: a SAS

        def permit(principal: SasPrincipal) -> None:
            if route_name.startswith(HUB_ROUTE_PREFIX):
                hub_service_only(principal)
                return
            if principal.hub is not None:
                raise Forbidden(f"policy {HUB_POLICY!r} may only use the hub service API", error_code=403002)
            canonical = route.resource.canonical if route.resource is not None else request.path
            need = required_right(request.method, canonical)
            if need not in principal.rights:
                raise Unauthorized(f"access policy {principal.policy!r} lacks the {need} right needed for "
                                   f"{request.method} {canonical}")

        principal = await authenticator.authenticate(request.headers.get("Authorization"), permit)
        if principal.hub is not None:
            request[TOKEN_HUB] = principal.hub
        # the audit log's actor: the access policy (a hub's iothubowner names its hub); DomainRunner carries it
        token = audit.ACTOR.set(principal.policy if principal.hub is None else f"{principal.policy}@{principal.hub}")
        try:
            return await handler(request)
        finally:
            audit.ACTOR.reset(token)

    return middleware


def _peer_host(request: web.Request) -> str | None:
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    return str(peer[0]) if isinstance(peer, tuple) and peer else None


@web.middleware
async def nul_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """No name, id or query value of this API holds a NUL (``%00``), and PostgreSQL cannot even compare one: a 400
    naming it here, before any lookup binds it (it was the database driver's DataError, a 500). Not on ``GET
    /ocsp/...``: an OCSP request is answered in OCSP's own terms (``malformedRequest``), never an HTTP error."""
    if ("\x00" in request.path or "\x00" in request.query_string) \
            and request.match_info.route.name != OCSP_GET_ROUTE:  # both as decoded (%00 is a NUL there)
        raise InvalidInput("the request's path or query holds a NUL character (%00), which no name or id has")
    return await handler(request)


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request gets an id (the caller's ``x-ms-client-request-id`` when it is a plain token): its log lines,
    the domain's included, carry it (``opendps.logs.REQUEST_ID``), and the answer names it in ``x-ms-request-id``."""
    request_id = logs.accept_request_id(request.headers.get("x-ms-client-request-id")) or logs.new_request_id()
    token = logs.REQUEST_ID.set(request_id)
    try:
        response = await handler(request)
    finally:
        logs.REQUEST_ID.reset(token)
    if not response.prepared:
        response.headers["x-ms-request-id"] = request_id
    return response


# where the SDKs open MQTT over WebSockets besides /$iothub/websocket: C# DPS (``wss://host:443/``) and Java DPS
# (Paho's default path) — served only to a WebSocket upgrade, so a plain GET there stays a 404
WEBSOCKET_ONLY_PATHS = ("/", "/mqtt")


# Sec-WebSocket-Version values aiohttp's framing speaks: 13 (RFC 6455) and the two drafts before it
WEBSOCKET_VERSIONS = ("13", "8", "7")


def _websocket_refusal(request: web.Request) -> web.Response | None:
    """What RFC 6455 refuses before aiohttp's handshake would accept it: an upgrade needs HTTP/1.1 or later (4.1;
    aiohttp answered HTTP/1.0 with 101), and a version this server does not speak is a 426 naming the one it does
    (4.2.2; aiohttp said a bare 400). A request that asks no WebSocket upgrade is aiohttp's to refuse."""
    if request.headers.get(hdrs.UPGRADE, "").lower().strip() != "websocket":
        return None
    if request.version < HttpVersion11:
        raise InvalidInput(f"a WebSocket upgrade needs HTTP/1.1 or later (RFC 6455 4.1), not HTTP/"
                           f"{request.version.major}.{request.version.minor}")
    version = request.headers.get(hdrs.SEC_WEBSOCKET_VERSION, "")
    if version not in WEBSOCKET_VERSIONS:
        return error_response(426, 426001, f"Sec-WebSocket-Version {shown(version, 16)} is not supported: this server "
                              "speaks version 13 (RFC 6455)", headers={hdrs.SEC_WEBSOCKET_VERSION: "13"})
    return None


def _one_protocol_line(request: web.Request) -> web.Request:
    """The subprotocols a client offers on several ``Sec-WebSocket-Protocol`` lines are one list (RFC 7230 3.2.2),
    but aiohttp's handshake reads only the first line (``mqtt`` on a second one was answered with no subprotocol):
    the lines are joined into one for it. A request with one line (every SDK's) is used as it is."""
    offered = request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, ())
    if len(offered) < 2:
        return request
    headers = CIMultiDict(request.headers)
    headers[hdrs.SEC_WEBSOCKET_PROTOCOL] = ", ".join(offered)  # replaces every line with the one list
    return request.clone(headers=headers)


async def mqtt_over_websocket(request: web.Request) -> web.StreamResponse:
    """MQTT over WebSockets (``/$iothub/websocket``, and ``/`` or ``/mqtt`` for an upgrade), as the Azure SDKs use
    with websockets=True; subprotocol ``mqtt`` or ``MQTT`` (the C SDK's spelling; aiohttp compares exactly)."""
    if request.path in WEBSOCKET_ONLY_PATHS and request.headers.get("Upgrade", "").lower() != "websocket":
        raise web.HTTPNotFound()
    refusal = _websocket_refusal(request)
    if refusal is not None:
        return refusal
    mqtt = request.app[MQTT_SERVER]
    # a message larger than the MQTT core would hold is closed with 1009 as it arrives (it is read whole first)
    ws = web.WebSocketResponse(protocols=("mqtt", "MQTT"), max_msg_size=mqtt.max_websocket_message)
    await ws.prepare(_one_protocol_line(request))
    transport = request.transport
    chain = (transport.get_extra_info("peer_certificate_chain") if transport is not None else None) or []
    peer = transport.get_extra_info("peername") if transport is not None else None
    await mqtt.serve_websocket(ws, peer_certificate_chain=list(chain), peername=peer)
    return ws


async def private_answers(request: web.Request, response: web.StreamResponse) -> None:
    """What a credential was shown for is kept by no cache (``Cache-Control: no-store``, unless the route set its
    own): twins, enrollments, certificates and audit rows are the caller's alone, and a shared cache that stores
    an authorized answer against the spec's advice (RFC 9111 3.5) would give them to the next caller. ``nosniff``
    on every answer, so no browser reads a JSON body that echoes an id as markup."""
    if "Authorization" in request.headers and hdrs.CACHE_CONTROL not in response.headers:
        response.headers[hdrs.CACHE_CONTROL] = "no-store"
    response.headers.setdefault("X-Content-Type-Options", "nosniff")


def make_app(runtime: Runtime, authenticator: SasAuthenticator, mqtt: MqttServer) -> web.Application:
    """The HTTPS application; ``mqtt`` serves ``/$iothub/websocket``, ``/`` and ``/mqtt`` (the same server as the MQTT
    port)."""
    quiet_client_errors()
    app = web.Application(middlewares=[request_id_middleware, error_middleware, nul_middleware,
                                       sas_middleware(authenticator)], client_max_size=MAX_BODY)
    app[RUNTIME] = runtime
    app[MQTT_SERVER] = mqtt
    app.on_response_prepare.append(private_answers)
    openapi = json.dumps(build_openapi())

    async def openapi_handler(_request: web.Request) -> web.Response:
        return web.Response(text=openapi, content_type="application/json")

    async def health(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_get("/openapi.json", openapi_handler)
    app.router.add_get("/healthz", health)
    app.router.add_get("/$iothub/websocket", mqtt_over_websocket, name=DEVICE_ROUTE_PREFIX + "mqtt-websocket")
    add_status_routes(app)  # CRLs and OCSP, open: the same handlers as the plain-HTTP listener's
    app.add_routes(service_routes)
    app.add_routes(enrollment_routes)
    app.add_routes(hub_routes)
    end_event_streams_at_shutdown(app)  # a follower of /events does not hold a stopping server
    app.add_routes(audit_routes)
    app.add_routes(service_status_routes)  # GET /status, GET /metrics
    app.add_routes(fleet_routes)  # the dashboard's aggregates (ServiceConfig)
    app.add_routes(ui_routes)  # the dashboard's static files, open
    app.add_routes(device_routes)  # last: its paths start with a variable ID scope
    _add_spellings(app)
    for n, path in enumerate(WEBSOCKET_ONLY_PATHS):  # after the spellings: "/" has none ("//" is no path)
        app.router.add_get(path, mqtt_over_websocket, name=f"{DEVICE_ROUTE_PREFIX}mqtt-websocket.path{n}",
                           allow_head=False)
    return app


STATUS_MAX_BODY = 64 * 1024  # an OCSP request is ~100 octets


def make_status_app(runtime: Runtime) -> web.Application:
    """The plain-HTTP listener's application (``--http-port``): certificate status only — CRLs and OCSP, open, the
    same routes as on HTTPS — with the same Azure error bodies (an unknown CA's CRL is a 404)."""
    quiet_client_errors()
    # nul_middleware: a NUL in the path is a 400 here too (it was the CRL lookup's 404 "no CA publishes '\x00'")
    app = web.Application(middlewares=[error_middleware, nul_middleware], client_max_size=STATUS_MAX_BODY)
    app[RUNTIME] = runtime
    add_status_routes(app)
    return app


def make_metrics_app(runtime: Runtime) -> web.Application:
    """The ``--metrics-port`` listener's application: ``GET /metrics`` only, plain HTTP, no credentials (it binds
    loopback unless the operator gives ``--metrics-host``)."""
    quiet_client_errors()
    app = web.Application(middlewares=[error_middleware], client_max_size=1024)
    app[RUNTIME] = runtime
    app.router.add_get("/metrics", metrics_exposition, name=METRICS_ROUTE_PREFIX + "exposition")
    return app


ALIAS = ".spelling"  # route names of the spellings below end with it and a number


def _add_spellings(app: web.Application) -> None:
    """Azure's front end matches collection names case-insensitively and tolerates a trailing slash, and SDKs
    rely on it (Node sends ``/enrollmentgroups/...``; ``GET /devices/``): every route is also served with its
    static segments lower-cased and with a trailing slash, under the same route-name prefix."""
    for route in list(app.router.routes()):
        if route.method == "HEAD" or route.resource is None or route.resource.canonical in OPEN_PATHS \
                or (route.name or "").startswith((PKI_ROUTE_PREFIX, UI_ROUTE_PREFIX)):  # URLs leaves name; /ui/
            continue
        path = route.resource.canonical
        lowered = "/".join(part if part.startswith("{") else part.lower() for part in path.split("/"))
        spellings = {lowered, path + "/", lowered + "/"} - {path}
        for n, spelling in enumerate(sorted(spellings)):
            app.router.add_route(route.method, spelling, route.handler,
                                 name=f"{route.name}{ALIAS}{n}" if route.name else None)
