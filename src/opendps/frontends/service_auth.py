"""Service-side authentication by shared access signature of an access policy (the owners' API, not devices).

Two kinds of token. A DPS access policy's (any policy of :class:`opendps.provisioning.AccessPolicies`; audience:
this service's host, with or without the port): the principal carries the policy's effective rights, which the
HTTP middleware checks per route; ``provisioningserviceowner`` (holding ServiceConfig) may also address any hub's
service API. ``iothubowner`` (audience: a linked hub's host name, any port) may call only the hub service routes,
and only for the hub its audience names. The HMAC is checked against the policy's primary then secondary key,
before anything is said about rights. :class:`SasAuthenticator` is the one token check; the HTTP middleware
(:mod:`opendps.frontends.http.app`) and the AMQP CBS ``put-token`` handler (:mod:`opendps.frontends.amqp`) use it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import unquote

from opendps.errors import NotFound, Unauthorized
from opendps.provisioning.access import HUB_OWNER_POLICY, OWNER_POLICY, SERVICE_CONFIG, PolicyCredentials
from opendps.transport import sas, shown

SERVICE_POLICY = OWNER_POLICY
HUB_POLICY = HUB_OWNER_POLICY


def _host(audience: str) -> str:
    """``host[:port][/]`` → host, lower-cased."""
    host = audience.lower().rstrip("/")
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host


@dataclass(frozen=True)
class SasPrincipal:
    """Who a verified service token speaks for: its policy, the hub it is bound to (None: a DPS policy, which
    addresses hubs only as the owner), its expiry (``se``, unix seconds) and the policy's effective rights
    (empty for a hub's ``iothubowner``)."""

    policy: str
    hub: str | None
    expiry: int
    rights: frozenset[str] = field(default_factory=frozenset)


def hub_service_only(principal: SasPrincipal) -> None:
    """The hub service API (REST ``hub:*`` routes, AMQP C2D): a hub's ``iothubowner``, or the DPS owner policy while
    it holds ServiceConfig. Other DPS policies are refused (401), whatever their rights."""
    if principal.hub is not None:
        return
    if principal.policy != SERVICE_POLICY:
        raise Unauthorized(f"access policy {principal.policy!r} may not use the hub service API: use the hub's "
                           f"{HUB_POLICY} or {SERVICE_POLICY}")
    if SERVICE_CONFIG not in principal.rights:
        raise Unauthorized(f"access policy {principal.policy!r} lacks the {SERVICE_CONFIG} right the hub service "
                           "API needs")


class SasAuthenticator:
    """The one check of service tokens, shared by the HTTP middleware and the AMQP CBS handler.

    ``policy(name)``: the DPS access policy of that name (keys and effective rights), or None — answered from the
    access policies' short cache (:meth:`opendps.provisioning.AccessPolicies.credentials`); ``hub_by_host(host)``:
    the name of the linked hub with that host name, or None; ``hub_keys(hub)``: that hub's own ``iothubowner``
    keys — a token names its hub in ``sr`` and must be signed with that hub's key, never another's.
    """

    def __init__(self, service_hosts: set[str], policy: Callable[[str], Awaitable[PolicyCredentials | None]],
                 hub_by_host: Callable[[str], Awaitable[str | None]],
                 hub_keys: Callable[[str], Awaitable[tuple[str, str]]]) -> None:
        self.hosts = {_host(h) for h in service_hosts}
        self.policy = policy
        self.hub_by_host = hub_by_host
        self.hub_keys = hub_keys

    async def authenticate(self, header: str | None,
                           permit: Callable[[SasPrincipal], None] | None = None) -> SasPrincipal:
        """Parse, resolve the audience and the policy, then verify the signature (primary, then secondary key) and
        expiry.

        ``permit`` runs once the token is verified; it raises to refuse what this caller does not allow (the
        middleware's route and rights check), so nothing about rights is said to an unverified caller.
        Raises Unauthorized (401002).
        """
        if not header:
            raise Unauthorized("missing Authorization header: a SharedAccessSignature is required")
        try:
            token = sas.parse(header)
        except sas.SasError as exc:
            raise Unauthorized(f"invalid SharedAccessSignature: {exc}") from exc
        audience = _host(unquote(token.raw_resource))
        if token.key_name == HUB_POLICY:
            hub = await self.hub_by_host(audience)
            if hub is None:
                raise Unauthorized(f"SharedAccessSignature audience {shown(token.resource)} is not a hub of this service")
            try:
                primary, secondary = await self.hub_keys(hub)
            except (KeyError, NotFound) as exc:  # unlinked meanwhile
                raise Unauthorized(f"SharedAccessSignature audience {shown(token.resource)} is not a hub of this "
                                   "service") from exc
            principal = SasPrincipal(HUB_POLICY, hub, token.expiry)
        else:
            if audience not in self.hosts:
                raise Unauthorized(f"SharedAccessSignature audience {shown(token.resource)} is not this service")
            if not token.key_name:
                raise Unauthorized("SharedAccessSignature lacks 'skn' (the access policy name)")
            credentials = await self.policy(token.key_name)
            if credentials is None:
                raise Unauthorized(f"SharedAccessSignature policy {shown(token.key_name)} is not an access policy of "
                                   "this service")
            primary, secondary = credentials.primary_key, credentials.secondary_key
            principal = SasPrincipal(credentials.name, None, token.expiry, credentials.rights)
        try:
            try:
                sas.verify(token, primary)
            except sas.SasError as first:
                if "expired" in str(first):
                    raise
                sas.verify(token, secondary)
        except sas.SasError as exc:
            raise Unauthorized(f"unauthorized: {exc}") from exc
        if permit is not None:
            permit(principal)
        return principal
