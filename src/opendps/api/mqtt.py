"""MQTT front ends: the CONNECT router and DPS over MQTT (wire spec §2).

One listener serves DPS and every logical hub; the CONNECT username decides:
``{idScope}/registrations/{registrationId}/api-version=...`` goes to DPS, ``{hubHost}/{deviceId}/?api-version=...``
to that hub's device endpoint (:mod:`opendps.hub.endpoint`). DPS topics are translated to the same
:class:`~opendps.provisioning.registration.Provisioning` calls as the HTTPS device API.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from urllib.parse import parse_qs

from opendps.api.device import PollThrottle
from opendps.errors import InvalidInput, OpenDPSError
from opendps.hub.endpoint import HubEndpoint, error_payload
from opendps.provisioning.attestation import DeviceCredentials
from opendps.transport.mqtt.server import ConnectRequest, Session, SessionClosed, SessionHandler
from opendps.transport.wire import topic_query

log = logging.getLogger("opendps.dps")
REFUSE = 0x80
NOT_AUTHORIZED = 5
IDENTIFIER_REJECTED = 2
RESPONSE = "$dps/registrations/res"


@dataclass
class DpsSession:
    """One device's DPS conversation; attestation happens per request, exactly as over HTTPS."""

    instance: object
    domain: object
    throttle: PollThrottle
    credentials: DeviceCredentials
    api_version: str | None
    session: Session | None = None
    persistent = False  # DPS never persists sessions (it ignores CleanSession)

    @property
    def session_key(self) -> str:
        return f"dps:{self.credentials.registration_id.lower()}"

    async def on_connected(self, session: Session) -> None:
        self.session = session

    async def on_subscribe(self, session: Session, topic_filter: str, qos: int) -> int:
        return min(qos, 1) if topic_filter in ("$dps/registrations/res/#", f"{RESPONSE}/#") else REFUSE

    async def on_publish(self, session: Session, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        query = topic_query(topic)
        rid = query.get("$rid")
        if topic.startswith("$dps/registrations/PUT/iotdps-register/"):
            await self._answer(rid, self._register, payload)
        elif topic.startswith("$dps/registrations/GET/iotdps-get-operationstatus/"):
            await self._answer(rid, self._poll, query.get("operationId") or "")
        else:
            log.info("DPS client %r published to %r: connection closed", self.credentials.registration_id, topic)
            session.close(f"publish to an unknown DPS topic: {topic!r}")

    async def on_disconnected(self, session: Session, reason: str) -> None:
        self.session = None

    async def _answer(self, rid: str | None, step, argument) -> None:  # noqa: ANN001
        if rid is None:
            return  # nowhere to answer, as in DPS
        try:
            status, body, retry = await step(argument)
        except OpenDPSError as exc:
            status, body, retry = exc.status, error_payload(exc), exc.info.get("retryAfter")
        topic = f"{RESPONSE}/{status}/?$rid={rid}" + (f"&retry-after={retry}" if retry else "")
        if self.session is not None:
            with contextlib.suppress(SessionClosed):
                await self.session.publish(topic, body, qos=0)

    async def _register(self, payload: bytes) -> tuple[int, bytes, int | None]:
        try:
            body = json.loads(payload) if payload.strip() else {}
        except ValueError as exc:
            raise InvalidInput(f"registration body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise InvalidInput("registration body must be a JSON object (DeviceRegistration)")
        given = body.get("registrationId")
        if given is not None and str(given).lower() != self.credentials.registration_id.lower():
            raise InvalidInput(f"registrationId {given!r} in the body does not match the connection's")
        if body.get("tpm") is not None:
            raise InvalidInput("TPM attestation is not supported over MQTT")
        accepted = await self.domain.run(self.instance.provisioning.register, self.credentials,
                                         payload=body.get("payload"), csr=body.get("csr"), api_version=self.api_version)
        return 202, json.dumps(accepted.to_wire()).encode(), accepted.retry_after

    async def _poll(self, operation_id: str) -> tuple[int, bytes, int | None]:
        self.throttle.check(self.credentials.registration_id.lower())
        result = await self.domain.run(self.instance.provisioning.operation, self.credentials, operation_id)
        return (202 if result.get("status") == "assigning" else 200), json.dumps(result).encode(), None


def make_authenticator(instance, domain, hub_endpoint: HubEndpoint, throttle: PollThrottle):  # noqa: ANN001, ANN201
    """The MQTT CONNECT router (see the module docstring)."""

    async def authenticate(request: ConnectRequest) -> SessionHandler | int:
        username = request.username or ""
        parts = username.split("/", 3)
        if len(parts) >= 3 and parts[1] == "registrations":
            scope, rid = parts[0], parts[2]
            if scope.lower() != instance.id_scope.lower():
                log.info("MQTT CONNECT for unknown ID scope %r refused", scope)
                return NOT_AUTHORIZED
            if request.client_id != rid:
                return IDENTIFIER_REJECTED
            versions = parse_qs(parts[3] if len(parts) > 3 else "").get("api-version")
            password = request.password.decode("utf-8", "replace") if request.password is not None else None
            creds = DeviceCredentials(scope, rid, password, list(request.peer_certificate_chain))
            return DpsSession(instance, domain, throttle, creds, versions[0] if versions else None)
        host, _, rest = username.partition("/")
        device_id = rest.split("/", 1)[0]
        hub = await domain.run(instance.hubs.by_host, host) if host and device_id else None
        if hub is None:
            log.info("MQTT CONNECT for unknown hub or username %r refused", username[:200])
            return NOT_AUTHORIZED
        return await hub_endpoint.authenticate(request, hub, device_id)

    return authenticate
