"""Service-API authentication by shared access signature of an access policy.

Two policies: ``provisioningserviceowner`` (audience: this service's host, with or without the port)
may call every management route; ``iothubowner`` (audience: a linked hub's host name, any port) may
call only the hub service routes (named ``hub:*``), and only for the hub its audience names. The HMAC
is checked against the policy's primary then secondary key. Device routes (``device:*``) and a few
open paths skip this: attestation or nothing authenticates them. :class:`SasAuthenticator` is the one
token check; the HTTP middleware and the AMQP CBS ``put-token`` handler (:mod:`opendps.api.amqp`) use it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import unquote

from aiohttp import web

from opendps.errors import Forbidden, Unauthorized
from opendps.transport import sas

OPEN_PATHS = {"/openapi.json", "/healthz"}
DEVICE_ROUTE_PREFIX = "device:"
HUB_ROUTE_PREFIX = "hub:"
SERVICE_POLICY = "provisioningserviceowner"
HUB_POLICY = "iothubowner"


def _host(audience: str) -> str:
    """``host[:port][/]`` → host, lower-cased."""
    host = audience.lower().rstrip("/")
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host


@dataclass(frozen=True)
class SasPrincipal:
    """Who a verified service token speaks for: its policy, the hub it is bound to (None: the DPS
    owner, who may address any hub) and its expiry (``se``, unix seconds)."""

    policy: str
    hub: str | None
    expiry: int


class SasAuthenticator:
    """The one check of service tokens, shared by the HTTP middleware and the AMQP CBS handler.

    ``hub_by_host(host)`` returns the name of the linked hub with that host name, or None.
    """

    def __init__(self, service_hosts: set[str], policy_keys: Callable[[str], tuple[str, str]],
                 hub_by_host: Callable[[str], Awaitable[str | None]]) -> None:
        self.hosts = {_host(h) for h in service_hosts}
        self.policy_keys = policy_keys
        self.hub_by_host = hub_by_host

    async def authenticate(self, header: str | None,
                           permit: Callable[[SasPrincipal], None] | None = None) -> SasPrincipal:
        """Parse, resolve the audience, then verify the signature (primary, then secondary key) and expiry.

        ``permit`` runs once the audience is resolved and before the keys are tried; it raises to refuse
        what this caller does not allow (the middleware's route check). Raises Unauthorized (401002).
        """
        if not header:
            raise Unauthorized("missing Authorization header: a SharedAccessSignature is required",
                               error_code=401002)
        try:
            token = sas.parse(header)
        except sas.SasError as exc:
            raise Unauthorized(f"invalid SharedAccessSignature: {exc}", error_code=401002) from exc
        audience = _host(unquote(token.raw_resource))
        if token.key_name == SERVICE_POLICY:
            if audience not in self.hosts:
                raise Unauthorized(f"SharedAccessSignature audience {token.resource!r} is not this service",
                                   error_code=401002)
            principal = SasPrincipal(SERVICE_POLICY, None, token.expiry)  # may address any hub
        elif token.key_name == HUB_POLICY:
            hub = await self.hub_by_host(audience)
            if hub is None:
                raise Unauthorized(f"SharedAccessSignature audience {token.resource!r} is not a hub of this service",
                                   error_code=401002)
            principal = SasPrincipal(HUB_POLICY, hub, token.expiry)
        else:
            raise Unauthorized(f"SharedAccessSignature policy {token.key_name!r} is not authorised here",
                               error_code=401002)
        if permit is not None:
            permit(principal)
        try:
            primary, secondary = self.policy_keys(token.key_name)
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
        return principal


def make_sas_middleware(authenticator: SasAuthenticator):  # noqa: ANN201
    """The aiohttp middleware: open and device routes pass; others need a token; ``iothubowner`` only ``hub:*``."""

    @web.middleware
    async def sas_middleware(request: web.Request, handler):  # noqa: ANN001, ANN202
        route_name = request.match_info.route.name or ""
        if request.path in OPEN_PATHS or route_name.startswith(DEVICE_ROUTE_PREFIX):
            return await handler(request)  # open, or the device API (attestation authenticates it)

        def permit(principal: SasPrincipal) -> None:
            if principal.policy == HUB_POLICY and not route_name.startswith(HUB_ROUTE_PREFIX):
                raise Forbidden(f"policy {HUB_POLICY!r} may only use the hub service API", error_code=403002)

        principal = await authenticator.authenticate(request.headers.get("Authorization"), permit)
        request["sas_hub"] = principal.hub
        return await handler(request)

    return sas_middleware
