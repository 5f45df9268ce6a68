"""DPS device API over HTTPS, exactly Azure's (wire spec §1): register, poll, status lookup.

Routes translate only: the TLS layer hands over the client chain (``peer_certificate_chain``),
:class:`opendps.provisioning.registration.Provisioning` decides. Per-device polling is limited as
in Azure (5 requests per 10 s per registration id, then 429 with Retry-After).
"""

from __future__ import annotations

import json
import time
from collections import deque

from aiohttp import web

from opendps.api.auth import DEVICE_ROUTE_PREFIX
from opendps.api.enrollments import send
from opendps.api.service import run
from opendps.errors import InvalidInput, PayloadTooLarge, Throttled
from opendps.provisioning.attestation import DeviceCredentials

routes = web.RouteTableDef()
MAX_DEVICE_BODY = 32 * 1024
POLL_LIMIT = 5
POLL_WINDOW = 10.0


class PollThrottle:
    """Sliding-window limit per registration id (per node, in memory)."""

    def __init__(self, limit: int = POLL_LIMIT, window: float = POLL_WINDOW, max_tracked: int = 100_000):
        self.limit, self.window, self.max_tracked = limit, window, max_tracked
        self._hits: dict[str, deque[float]] = {}

    def check(self, key: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        hits = self._hits.get(key)
        if hits is None:
            if len(self._hits) >= self.max_tracked:
                self._prune(now)
            hits = self._hits[key] = deque()
        while hits and hits[0] <= now - self.window:
            hits.popleft()
        if len(hits) >= self.limit:
            retry = max(1, int(hits[0] + self.window - now + 0.999))
            raise Throttled(f"too many requests for registration {key!r}: at most {self.limit} per "
                            f"{self.window:g} s; retry after {retry} s", info={"retryAfter": str(retry)})
        hits.append(now)

    def _prune(self, now: float) -> None:
        for k in [k for k, h in self._hits.items() if not h or h[-1] <= now - self.window]:
            del self._hits[k]


def credentials(request: web.Request) -> DeviceCredentials:
    transport = request.transport
    chain = (transport.get_extra_info("peer_certificate_chain") if transport is not None else None) or []
    return DeviceCredentials(request.match_info["idScope"], request.match_info["registrationId"],
                             request.headers.get("Authorization"), list(chain))


async def device_body(request: web.Request) -> dict:
    if request.content_length is not None and request.content_length > MAX_DEVICE_BODY:
        raise PayloadTooLarge(f"request body is larger than {MAX_DEVICE_BODY} bytes")
    raw = await request.content.read(MAX_DEVICE_BODY + 1)
    if len(raw) > MAX_DEVICE_BODY:
        raise PayloadTooLarge(f"request body is larger than {MAX_DEVICE_BODY} bytes")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object (DeviceRegistration)")
    given = body.get("registrationId")
    if given is not None and str(given).lower() != request.match_info["registrationId"].lower():
        raise InvalidInput(f"registrationId {given!r} in the body does not match the path")
    if body.get("tpm") is not None:
        raise InvalidInput("TPM attestation is not supported yet; use X.509 or a symmetric key")
    return body


def _throttle(request: web.Request) -> None:
    request.app["poll_throttle"].check(request.match_info["registrationId"].lower())


@routes.put("/{idScope}/registrations/{registrationId}/register", name=DEVICE_ROUTE_PREFIX + "register")
async def register(request: web.Request) -> web.Response:
    body = await device_body(request)
    creds = credentials(request)
    accepted = await run(request, request.app["instance"].provisioning.register, creds, payload=body.get("payload"),
                         csr=body.get("csr"), api_version=request.query.get("api-version"))
    return send(accepted.to_wire(), 202, headers={"Retry-After": str(accepted.retry_after)})


@routes.get("/{idScope}/registrations/{registrationId}/operations/{operationId}", name=DEVICE_ROUTE_PREFIX + "operation")
async def operation_status(request: web.Request) -> web.Response:
    _throttle(request)
    result = await run(request, request.app["instance"].provisioning.operation, credentials(request),
                       request.match_info["operationId"])
    if result.get("status") == "assigning":
        return send(result, 202, headers={"Retry-After": "2"})
    return send(result)


@routes.post("/{idScope}/registrations/{registrationId}", name=DEVICE_ROUTE_PREFIX + "status")
async def registration_status(request: web.Request) -> web.Response:
    _throttle(request)
    body = await device_body(request)
    if body.get("csr") is not None:
        raise InvalidInput("csr is not accepted by the registration status lookup; use PUT .../register")
    state = await run(request, request.app["instance"].provisioning.status, credentials(request))
    return send(state)
