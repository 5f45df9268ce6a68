"""Service-side authentication by shared access signature of an access policy (the owners' API, not devices).

Two policies: ``provisioningserviceowner`` (audience: this service's host, with or without the port)
may call every management route; ``iothubowner`` (audience: a linked hub's host name, any port) may
call only the hub service routes, and only for the hub its audience names. The HMAC is checked
against the policy's primary then secondary key. :class:`SasAuthenticator` is the one token check;
the HTTP middleware (:mod:`opendps.frontends.http.app`) and the AMQP CBS ``put-token`` handler
(:mod:`opendps.frontends.amqp`) use it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import unquote

from opendps.errors import Unauthorized
from opendps.transport import sas

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

    ``policy_keys(name)``: the keys of the service's own access policy; ``hub_by_host(host)``: the name of the
    linked hub with that host name, or None; ``hub_keys(hub)``: that hub's own ``iothubowner`` keys — a token
    names its hub in ``sr`` and must be signed with that hub's key, never another's.
    """

    def __init__(self, service_hosts: set[str], policy_keys: Callable[[str], tuple[str, str]],
                 hub_by_host: Callable[[str], Awaitable[str | None]],
                 hub_keys: Callable[[str], Awaitable[tuple[str, str]]]) -> None:
        self.hosts = {_host(h) for h in service_hosts}
        self.policy_keys = policy_keys
        self.hub_by_host = hub_by_host
        self.hub_keys = hub_keys

    async def authenticate(self, header: str | None,
                           permit: Callable[[SasPrincipal], None] | None = None) -> SasPrincipal:
        """Parse, resolve the audience, then verify the signature (primary, then secondary key) and expiry.

        ``permit`` runs once the audience is resolved and before the keys are tried; it raises to refuse
        what this caller does not allow (the middleware's route check). Raises Unauthorized (401002).
        """
        if not header:
            raise Unauthorized("missing Authorization header: a SharedAccessSignature is required")
        try:
            token = sas.parse(header)
        except sas.SasError as exc:
            raise Unauthorized(f"invalid SharedAccessSignature: {exc}") from exc
        audience = _host(unquote(token.raw_resource))
        if token.key_name == SERVICE_POLICY:
            if audience not in self.hosts:
                raise Unauthorized(f"SharedAccessSignature audience {token.resource!r} is not this service")
            principal = SasPrincipal(SERVICE_POLICY, None, token.expiry)  # may address any hub
        elif token.key_name == HUB_POLICY:
            hub = await self.hub_by_host(audience)
            if hub is None:
                raise Unauthorized(f"SharedAccessSignature audience {token.resource!r} is not a hub of this service")
            principal = SasPrincipal(HUB_POLICY, hub, token.expiry)
        else:
            raise Unauthorized(f"SharedAccessSignature policy {token.key_name!r} is not authorised here")
        if permit is not None:
            permit(principal)
        try:
            if principal.hub is not None:
                primary, secondary = await self.hub_keys(principal.hub)
            else:
                primary, secondary = self.policy_keys(token.key_name)
        except KeyError as exc:
            raise Unauthorized(f"unknown access policy {token.key_name!r}") from exc
        try:
            try:
                sas.verify(token, primary)
            except sas.SasError as first:
                if "expired" in str(first):
                    raise
                sas.verify(token, secondary)
        except sas.SasError as exc:
            raise Unauthorized(f"unauthorized: {exc}") from exc
        return principal
