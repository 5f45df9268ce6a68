"""DPS over MQTT (wire spec §2): one device's registration conversation.

Topics are translated to the same :class:`~opendps.provisioning.registration.Provisioning` calls as the HTTPS
device API; attestation happens per request (the CONNECT credentials are kept as sent), answers go to
``$dps/registrations/res/{status}/?$rid=...``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from urllib.parse import parse_qs

from opendps.errors import InvalidInput, OpenDPSError
from opendps.frontends.device_request import parse_registration_body
from opendps.frontends.mqtt import error_payload, request_id
from opendps.frontends.runtime import Runtime, registration_counted
from opendps.provisioning.attestation import Challenge, DeviceCredentials
from opendps.transport import shown
from opendps.transport.mqtt.server import Session, SessionClosed
from opendps.transport.wire import error_body, topic_query

log = logging.getLogger("opendps.dps")
REFUSE = 0x80
RESPONSE = "$dps/registrations/res"

Answer = tuple[int, bytes, str | None]  # status, body, retry-after


def operation_id(topic: str) -> str:
    """The one ``operationId`` of a poll topic. Missing or empty it was looked up as '' (a 404 naming no operation);
    given twice the last one was polled: both are the device's mistake, answered 400 saying so."""
    values = parse_qs(topic.partition("?")[2], keep_blank_values=True).get("operationId", [])
    if len(values) > 1:
        raise InvalidInput(f"operationId is given {len(values)} times in the operation status request; give it once")
    if not values or not values[0]:
        raise InvalidInput("operationId is missing from the operation status request "
                           "($dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={id})")
    return values[0]


@dataclass
class DpsSession:
    """One device's DPS conversation (a :class:`~opendps.transport.mqtt.server.SessionHandler`)."""

    runtime: Runtime
    credentials: DeviceCredentials
    api_version: str | None
    session: Session | None = None
    persistent = False  # DPS never persists sessions (it ignores CleanSession)

    @property
    def max_keepalive(self) -> int:
        """A registration conversation is short: silence longer than the client timeout (keepalive 0 included)
        ends it, so idle DPS connections cannot pile up."""
        return max(1, int(self.runtime.client_timeout))

    @property
    def session_key(self) -> str:
        return f"dps:{self.credentials.registration_id.lower()}"

    async def on_connected(self, session: Session) -> None:
        self.session = session

    async def on_subscribe(self, session: Session, topic_filter: str, qos: int) -> int:
        return min(qos, 1) if topic_filter == f"{RESPONSE}/#" else REFUSE

    async def on_publish(self, session: Session, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        query = topic_query(topic)
        if topic.startswith("$dps/registrations/PUT/iotdps-register/"):
            await self._answer(request_id(query), lambda: self._register(payload))
        elif topic.startswith("$dps/registrations/GET/iotdps-get-operationstatus/"):
            await self._answer(request_id(query), lambda: self._poll(operation_id(topic)))
        else:
            log.info("DPS client %r published to %s: connection closed", self.credentials.registration_id, shown(topic))
            session.close(f"publish to an unknown DPS topic: {shown(topic)}")

    async def on_disconnected(self, session: Session, reason: str) -> None:
        self.session = None

    async def _answer(self, rid: str | None, step: Callable[[], Awaitable[Answer]]) -> None:
        if rid is None:
            return  # nowhere to answer, as in DPS
        try:
            status, body, retry = await step()
        except OpenDPSError as exc:
            status, body, retry = exc.status, error_payload(exc), exc.info.get("retryAfter")
        except Exception:  # a bug: answered as the HTTPS device API answers it (500 + tracking id, traceback logged),
            # not by closing the connection unacknowledged, which only had the device send the same request again
            tracking = str(uuid.uuid4())
            log.exception("DPS request of %r failed (trackingId %s)", self.credentials.registration_id, tracking)
            wire = {**error_body(500000, f"internal server error (trackingId {tracking})"), "trackingId": tracking}
            status, body, retry = 500, json.dumps(wire).encode(), None
        topic = f"{RESPONSE}/{status}/?$rid={rid}" + (f"&retry-after={retry}" if retry else "")
        if self.session is not None:
            # at the QoS granted for the response filter (1 for every SDK, as Azure answers): the C# SDK PUBACKs every
            # response, and a QoS 0 one would make it acknowledge packet id 0; the core tracks the QoS 1 in-flight
            qos = self.session.subscriptions.get(f"{RESPONSE}/#", 0)
            with contextlib.suppress(SessionClosed):
                await self.session.publish(topic, body, qos=qos)

    async def _register(self, payload: bytes) -> Answer:
        body = parse_registration_body(payload, self.credentials.registration_id)
        credentials = replace(self.credentials, evidence=body.evidence)
        with registration_counted(self.runtime, credentials) as counted:
            result = await self.runtime.domain.run(self.runtime.services.provisioning.register, credentials,
                                                   payload=body.payload, csr=body.csr, api_version=self.api_version)
            counted(result)
        if isinstance(result, Challenge):
            return result.status, json.dumps(result.body).encode(), None
        retry = str(result.retry_after) if result.status == 202 else None
        return result.status, json.dumps(result.to_wire()).encode(), retry

    async def _poll(self, operation_id: str) -> Answer:
        result = await self.runtime.domain.run(self.runtime.services.provisioning.operation, self.credentials,
                                               operation_id)
        return (202 if result.get("status") == "assigning" else 200), json.dumps(result).encode(), None
