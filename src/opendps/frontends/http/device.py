"""DPS device API over HTTPS, exactly Azure's (wire spec §1): register, poll, status lookup.

Routes translate only: the TLS layer hands over the client chain (``peer_certificate_chain``), the body
is parsed by :mod:`opendps.frontends.device_request` (shared with MQTT), and
:class:`opendps.provisioning.registration.Provisioning` decides — including the per-device request limit.
Routes are named ``device:*``: the service SAS middleware lets them through (attestation authenticates them).
"""

from __future__ import annotations

from aiohttp import web

from opendps.errors import InvalidInput, PayloadTooLarge
from opendps.frontends.device_request import MAX_DEVICE_BODY, RegistrationBody, parse_registration_body
from opendps.frontends.http.wire import run, runtime, send, services
from opendps.frontends.runtime import registration_counted
from opendps.provisioning.attestation import HTTPS, Challenge, DeviceCredentials

routes = web.RouteTableDef()
DEVICE_ROUTE_PREFIX = "device:"


def credentials(request: web.Request, body: RegistrationBody | None = None) -> DeviceCredentials:
    transport = request.transport
    chain = (transport.get_extra_info("peer_certificate_chain") if transport is not None else None) or []
    return DeviceCredentials(request.match_info["idScope"], request.match_info["registrationId"],
                             request.headers.get("Authorization"), tuple(chain),
                             body.evidence if body is not None else {}, HTTPS)


async def registration_body(request: web.Request) -> RegistrationBody:
    if request.content_length is not None and request.content_length > MAX_DEVICE_BODY:
        raise PayloadTooLarge(f"registration body is larger than {MAX_DEVICE_BODY} bytes")
    # read(n) returns what has arrived, up to n: a body longer than one TLS record (16 KB) came in parts, and the
    # first part alone was parsed (a valid 20 KB body answered "not valid JSON"); read to the end or past the bound
    raw = b""
    while len(raw) <= MAX_DEVICE_BODY:
        chunk = await request.content.read(MAX_DEVICE_BODY + 1 - len(raw))
        if not chunk:
            break
        raw += chunk
    return parse_registration_body(raw, request.match_info["registrationId"])


@routes.put("/{idScope}/registrations/{registrationId}/register", name=DEVICE_ROUTE_PREFIX + "register")
async def register(request: web.Request) -> web.Response:
    """Register (wire spec §1.2): always 202, as Azure answers, because the C# SDK refuses any other status (it throws
    on 200). A registration assigned at once carries its final state in that body (every SDK reads the body's status
    and polls only on ``assigning``/``unassigned``); otherwise the body is the operation to poll, with Retry-After.
    Or the mechanism's challenge."""
    body = await registration_body(request)
    creds = credentials(request, body)
    with registration_counted(runtime(request), creds) as counted:
        result = await run(request, services(request).provisioning.register, creds,
                           payload=body.payload, csr=body.csr, api_version=request.query.get("api-version"))
        counted(result)
    if isinstance(result, Challenge):
        return send(result.body, result.status)
    wire = result.to_wire()
    if wire.get("status") in ("assigning", "unassigned"):
        return send(wire, 202, headers={"Retry-After": str(result.retry_after)})
    return send(wire, 202)


@routes.get("/{idScope}/registrations/{registrationId}/operations/{operationId}", name=DEVICE_ROUTE_PREFIX + "operation")
async def operation_status(request: web.Request) -> web.Response:
    """Poll an operation (wire spec §1.3): 202 while assigning, then the final registration state."""
    result = await run(request, services(request).provisioning.operation, credentials(request),
                       request.match_info["operationId"])
    if result.get("status") == "assigning":
        return send(result, 202, headers={"Retry-After": "2"})
    return send(result)


@routes.post("/{idScope}/registrations/{registrationId}", name=DEVICE_ROUTE_PREFIX + "status")
async def registration_status(request: web.Request) -> web.Response:
    """Registration status lookup (wire spec §1.4)."""
    body = await registration_body(request)
    if body.csr is not None:
        raise InvalidInput("csr is not accepted by the registration status lookup; use PUT .../register")
    state = await run(request, services(request).provisioning.status, credentials(request, body))
    return send(state)
