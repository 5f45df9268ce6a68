"""Service-API authentication by shared access signature of an access policy (e.g. provisioningserviceowner).

``sr`` must name this service's host (with or without the port, case-insensitive); the HMAC is
checked against the policy's primary then secondary key.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import unquote

from aiohttp import web

from opendps.errors import Unauthorized
from opendps.transport import sas

OPEN_PATHS = {"/openapi.json", "/healthz"}
DEVICE_ROUTE_PREFIX = "device:"


def make_sas_middleware(service_hosts: set[str], policy_keys: Callable[[str], tuple[str, str]],
                        allowed_policies: set[str]):  # noqa: ANN201
    hosts = {h.lower() for h in service_hosts}

    @web.middleware
    async def sas_middleware(request: web.Request, handler):  # noqa: ANN001, ANN202
        route_name = request.match_info.route.name or ""
        if request.path in OPEN_PATHS or route_name.startswith(DEVICE_ROUTE_PREFIX):
            return await handler(request)  # open, or the device API (attestation authenticates it)
        header = request.headers.get("Authorization")
        if not header:
            raise Unauthorized("missing Authorization header: a SharedAccessSignature is required",
                               error_code=401002)
        try:
            token = sas.parse(header)
        except sas.SasError as exc:
            raise Unauthorized(f"invalid SharedAccessSignature: {exc}", error_code=401002) from exc
        if unquote(token.raw_resource).lower().rstrip("/") not in hosts:
            raise Unauthorized(f"SharedAccessSignature audience {token.resource!r} is not this service",
                               error_code=401002)
        if token.key_name not in allowed_policies:
            raise Unauthorized(f"SharedAccessSignature policy {token.key_name!r} is not authorised here",
                               error_code=401002)
        try:
            primary, secondary = policy_keys(token.key_name)
        except KeyError as exc:
            raise Unauthorized(f"unknown access policy {token.key_name!r}", error_code=401002) from exc
        try:
            try:
                sas.verify(token, primary)
            except sas.SasError as first:
                if "expired" in str(first):
                    raise
                sas.verify(token, secondary)
        except sas.SasError as exc:
            raise Unauthorized(f"unauthorized: {exc}", error_code=401002) from exc
        return await handler(request)

    return sas_middleware
