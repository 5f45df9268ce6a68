"""The MQTT CONNECT router: one listener serves DPS and every logical hub; the CONNECT username decides.

``{idScope}/registrations/{registrationId}/api-version=...`` goes to DPS (:class:`.dps.DpsSession`) once the
device proved its credential (:meth:`Provisioning.authenticate_connection`: a session without one could take
over the registration's), ``{hubHost}/{deviceId}/?api-version=...`` to that hub, whose authenticator decides
(:class:`opendps.hub.HubAuthenticator`). Refusals become CONNACK return codes here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from urllib.parse import parse_qs

from opendps.errors import InvalidCredentials, InvalidInput, OpenDPSError, ServiceUnavailable, Unauthorized
from opendps.frontends.mqtt.dps import DpsSession
from opendps.frontends.mqtt.hub import HubSession
from opendps.frontends.runtime import Runtime
from opendps.logs import REQUEST_ID, event, new_request_id
from opendps.provisioning.attestation import MQTT, DeviceCredentials
from opendps.transport import shown
from opendps.transport.mqtt.server import ConnectRequest, SessionHandler

log = logging.getLogger("opendps.mqtt")
# CONNACK return codes (MQTT 3.1.1 §3.2.2.3)
IDENTIFIER_REJECTED = 2
SERVER_UNAVAILABLE = 3
BAD_CREDENTIALS = 4
NOT_AUTHORIZED = 5

Authenticator = Callable[[ConnectRequest], Awaitable[SessionHandler | int]]


def connack_code(exc: OpenDPSError) -> int:
    """An error kind as the CONNACK return code a device sees."""
    if isinstance(exc, InvalidInput):
        return IDENTIFIER_REJECTED
    if isinstance(exc, InvalidCredentials):
        return BAD_CREDENTIALS
    if isinstance(exc, ServiceUnavailable):  # the database or an HSM away: the device is to retry, not to give up
        return SERVER_UNAVAILABLE
    return NOT_AUTHORIZED


def make_router(runtime: Runtime) -> Authenticator:
    """The authenticator the MQTT server calls for every CONNECT (see the module docstring)."""
    services = runtime.services

    async def route(request: ConnectRequest) -> SessionHandler | int:
        # one id for the connection: the CONNECT's log lines and every domain call of its session carry it (this runs in
        # the connection's task, whose context the session's handlers share)
        REQUEST_ID.set(new_request_id("m-"))
        username = request.username or ""
        parts = username.split("/", 3)
        if len(parts) >= 3 and parts[1] == "registrations":
            scope, rid = parts[0], parts[2]
            if scope.lower() != services.id_scope.lower():
                refused = Unauthorized(f"unknown ID scope {scope[:64]!r}", reason="unknown_scope")
                log.info("MQTT CONNECT for unknown ID scope %s refused", shown(scope),
                         extra=event("registration.refused", registration_id=rid[:128], transport=MQTT,
                                     outcome="refused", reason=refused.reason, error_code=refused.error_code))
                runtime.registration_refused(rid, MQTT, refused)
                return NOT_AUTHORIZED
            if request.client_id != rid:
                runtime.registration_refused(rid, MQTT, InvalidInput(
                    f"client id {request.client_id[:128]!r} is not the registration id", reason="client_id_mismatch"))
                return IDENTIFIER_REJECTED
            versions = parse_qs(parts[3] if len(parts) > 3 else "").get("api-version")
            password = request.password.decode("utf-8", "replace") if request.password is not None else None
            creds = DeviceCredentials(scope, rid, password, tuple(request.peer_certificate_chain), transport=MQTT)
            try:
                await runtime.domain.run(services.provisioning.authenticate_connection, creds)
            except OpenDPSError as exc:
                log.info("DPS refused the MQTT connection of %s: %s", shown(rid, 128), exc.message,
                         extra=event("registration.refused", registration_id=rid[:128], transport=MQTT,
                                     outcome="refused", reason=exc.reason, error_code=exc.error_code))
                runtime.registration_refused(rid, MQTT, exc)
                return connack_code(exc)
            return DpsSession(runtime, creds, versions[0] if versions else None)
        host, _, rest = username.partition("/")
        device_id = rest.split("/", 1)[0]
        if not host or not device_id:
            refused = Unauthorized("the username names no hub and device", reason="bad_username")
            log.info("MQTT CONNECT with a username that names no hub and device (%s) refused", shown(username, 200),
                     extra=event("hub.refused", outcome="refused", reason=refused.reason, error_code=refused.error_code))
            runtime.hub_refused(host[:255], username[:128], refused)
            return NOT_AUTHORIZED
        checked_since = time.monotonic()  # a drop heard after this may have missed the check (LiveSessions.attach)
        try:  # one step in the domain: the hub by host, the device, its credential
            device = await runtime.domain.run(services.hub_auth.connect, host, device_id, request.client_id,
                                              request.password, list(request.peer_certificate_chain), datetime.now(UTC))
        except OpenDPSError as exc:
            log.info("hub %s refused device %s: %s", host[:255], shown(device_id, 128), exc.message,
                     extra=event("hub.refused", hub=host[:255], device_id=device_id[:128], outcome="refused",
                                 reason=exc.reason, error_code=exc.error_code))
            runtime.hub_refused(host[:255], device_id[:128], exc)
            return connack_code(exc)
        session = HubSession(runtime, device, checked_since=checked_since, kept=device.subscriptions)
        if request.clean_session:
            await session.keep({})  # a clean session: what an earlier one kept ends, before the CONNACK
        return session

    return route
