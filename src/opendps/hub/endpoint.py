"""The hub's device endpoint over MQTT (wire spec §6): telemetry, twin, direct methods, C2D and
certificate renewal, for devices authenticated by :mod:`opendps.hub.auth`.

Topic handlers translate and call domain code in the thread pool; live sessions are kept here so the
service side (methods, desired-property pushes, C2D, disabling a device) reaches a connected device.
This map is per process: several nodes would route through PostgreSQL NOTIFY or NATS (not yet).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from opendps.errors import OpenDPSError
from opendps.hub.auth import AuthenticatedDevice, HubAuthenticator, HubAuthFailed
from opendps.hub.registry import HubView
from opendps.hub.telemetry import GroupCommit, TelemetryBus, parse_property_bag
from opendps.pki.csr import decode_csr_text
from opendps.transport.mqtt.server import ConnectRequest, Session, SessionClosed
from opendps.transport.wire import error_body, topic_query

log = logging.getLogger("opendps.hub")
REFUSE = 0x80
MAX_SUBSCRIPTIONS = 5
_RID = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{2,34}[A-Za-z0-9])?$")


class DeviceOffline(OpenDPSError):
    error_code = 404103


class MethodTimeout(OpenDPSError):
    error_code = 504101


def error_payload(exc: OpenDPSError) -> bytes:
    """An Azure error body as an MQTT payload."""
    return json.dumps(error_body(exc.error_code, exc.message, exc.info)).encode()


@dataclass
class DeviceSession:
    """The SessionHandler of one connected device."""

    endpoint: HubEndpoint
    device: AuthenticatedDevice
    session: Session | None = None
    filters: set[str] = field(default_factory=set)
    renewing: bool = False
    sent: set[int] = field(default_factory=set)  # C2D messages published on this connection, awaiting PUBACK
    # C2D lives in the store until PUBACK, so a reconnect redelivers from there; the MQTT core keeps no copy
    persistent = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.device.hub_name, self.device.device_key)

    @property
    def session_key(self) -> str:
        """Hub sessions are keyed apart from DPS sessions that may use the same client id."""
        return f"hub:{self.device.hub_host}/{self.device.device_id}"

    async def on_connected(self, session: Session) -> None:
        self.session = session
        old = self.endpoint.live.get(self.key)
        self.endpoint.live[self.key] = self
        if old is not None and old.session is not None and old.session is not session:
            old.session.close("taken over by a new connection of the same device")
        log.info("device %r connected to hub %s (%s)", self.device.device_id, self.device.hub_host, self.device.auth_type)

    async def on_subscribe(self, session: Session, topic_filter: str, qos: int) -> int:
        d = self.device.device_id
        allowed = {f"devices/{d}/messages/devicebound/#", "$iothub/methods/POST/#", "$iothub/twin/res/#",
                   "$iothub/twin/PATCH/properties/desired/#", "$iothub/credentials/res/#", f"devices/{d}/messages/devicebound"}
        if topic_filter not in allowed or (topic_filter not in self.filters and len(self.filters) >= MAX_SUBSCRIPTIONS):
            log.info("device %r: subscription to %r refused", d, topic_filter)
            return REFUSE
        self.filters.add(topic_filter)
        if topic_filter.startswith("devices/"):
            asyncio.get_running_loop().call_soon(self.endpoint.schedule_c2d, self.key)
        return min(qos, 1)

    async def on_publish(self, session: Session, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        d = self.device.device_id
        events = f"devices/{d}/messages/events/"
        if topic.startswith(events) or topic == events.rstrip("/"):
            await self.endpoint.telemetry(self.device, topic[len(events):], payload)
        elif topic.startswith("$iothub/twin/GET/"):
            await self._twin_get(topic_query(topic).get("$rid"))
        elif topic.startswith("$iothub/twin/PATCH/properties/reported/"):
            await self._twin_reported(topic_query(topic).get("$rid"), payload)
        elif topic.startswith("$iothub/methods/res/"):
            status = topic[len("$iothub/methods/res/"):].split("/", 1)[0]
            self.endpoint.method_answered(self.key, topic_query(topic).get("$rid"), status, payload)
        elif topic.startswith("$iothub/credentials/POST/issueCertificate/"):
            await self._issue_certificate(topic_query(topic).get("$rid"), payload)
        else:
            log.info("device %r published to %r, which is not one of its topics: connection closed", d, topic)
            session.close(f"publish to a topic outside the device's own: {topic!r}")

    async def on_disconnected(self, session: Session, reason: str) -> None:
        if self.endpoint.live.get(self.key) is self:
            del self.endpoint.live[self.key]
        self.endpoint.fail_methods(self.key)
        log.info("device %r disconnected from hub %s: %s", self.device.device_id, self.device.hub_host, reason)

    # ---- twin ----
    async def _reply(self, topic: str, body: bytes = b"") -> None:
        if self.session is not None:
            with contextlib.suppress(SessionClosed):
                await self.session.publish(topic, body, qos=0)

    async def _twin_get(self, rid: str | None) -> None:
        if rid is None:
            return
        try:
            ident = await self.endpoint.run(self.endpoint.hubs.get_device, self.device.hub_name, self.device.device_id)
        except OpenDPSError as exc:
            await self._reply(f"$iothub/twin/res/{exc.status}/?$rid={rid}", error_payload(exc))
            return
        twin = ident.twin()["properties"]
        await self._reply(f"$iothub/twin/res/200/?$rid={rid}", json.dumps(twin).encode())

    async def _twin_reported(self, rid: str | None, payload: bytes) -> None:
        try:
            try:
                patch = json.loads(payload or b"null")
            except ValueError as exc:
                raise OpenDPSError(f"reported properties patch is not JSON: {exc}") from exc
            version = await self.endpoint.run(self.endpoint.hubs.patch_reported, self.device.hub_id, self.device.device_id,
                                              patch)
        except OpenDPSError as exc:
            if rid is not None:
                await self._reply(f"$iothub/twin/res/{exc.status}/?$rid={rid}", error_payload(exc))
            return
        if rid is not None:
            await self._reply(f"$iothub/twin/res/204/?$rid={rid}&$version={version}")

    # ---- certificate renewal through the hub (preview, wire spec §6.6) ----
    async def _issue_certificate(self, rid: str | None, payload: bytes) -> None:
        if rid is None or "$iothub/credentials/res/#" not in self.filters:
            return  # no subscription or no $rid: no response, as in IoT Hub
        base = "$iothub/credentials/res"
        try:
            if not _RID.match(rid):
                raise OpenDPSError("request id must be 4-36 letters, digits or '-', not starting or ending with '-'",
                                   error_code=400004)
            try:
                body = json.loads(payload)
            except ValueError as exc:
                raise OpenDPSError("issueCertificate body is not JSON", error_code=400004) from exc
            if not isinstance(body, dict) or set(body) - {"id", "csr", "replace"} or not {"id", "csr"} <= set(body):
                raise OpenDPSError("issueCertificate body must hold id and csr (and optionally replace) only",
                                   error_code=400004)
            if body["id"] != self.device.device_id:
                raise OpenDPSError(f"id {body['id']!r} is not the authenticated device", error_code=400006)
            if self.renewing:
                raise OpenDPSError("another certificate request of this device is active", error_code=409004,
                                   info={"requestId": rid})
            csr = decode_csr_text(body["csr"]) if isinstance(body["csr"], str) else b""
            self.renewing = True
        except OpenDPSError as exc:
            await self._reply(f"{base}/{exc.status}/?$rid={rid}", error_payload(exc))
            return
        correlation = str(uuid.uuid4())
        expires = (datetime.now(UTC) + timedelta(minutes=5)).isoformat().replace("+00:00", "Z")
        await self._reply(f"{base}/202/?$rid={rid}", json.dumps({"correlationId": correlation,
                                                                  "operationExpires": expires}).encode())
        try:
            chain = await self.endpoint.run(self.endpoint.renew, self.device, csr)
            await self._reply(f"{base}/200/?$rid={rid}", json.dumps({"correlationId": correlation, "certificates": [
                base64.b64encode(d).decode() for d in chain.der_chain()]}).encode())
        except OpenDPSError as exc:
            await self._reply(f"{base}/{exc.status}/?$rid={rid}", error_payload(exc))
        finally:
            self.renewing = False


class HubEndpoint:
    def __init__(self, instance, domain, bus: TelemetryBus):  # noqa: ANN001 - Instance, DomainRunner
        self.instance = instance
        self.hubs = instance.hubs
        self.domain = domain
        self.bus = bus
        self.auth = HubAuthenticator(instance.store, instance.hubs)
        self.telemetry_writer = GroupCommit(instance.telemetry, self.run)
        self.live: dict[tuple[str, str], DeviceSession] = {}
        self._methods: dict[tuple[tuple[str, str], str], asyncio.Future] = {}
        self._rids = itertools.count(1)
        self._c2d_busy: set[tuple[str, str]] = set()

    async def run(self, fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
        return await self.domain.run(fn, *args, **kwargs)

    # ---- CONNECT ----
    async def authenticate(self, request: ConnectRequest, hub: HubView, device_id: str) -> DeviceSession | int:
        try:
            device = await self.run(self.auth.authenticate, hub, device_id, request.client_id, request.password,
                                    list(request.peer_certificate_chain), datetime.now(UTC))
        except HubAuthFailed as exc:
            log.info("hub %s refused device %r: %s", hub.host_name, device_id, exc.message)
            return exc.return_code
        return DeviceSession(self, device)

    # ---- device → cloud ----
    async def telemetry(self, device: AuthenticatedDevice, bag: str, payload: bytes) -> None:
        system, application = parse_property_bag(bag)
        try:
            await self.telemetry_writer.append(device.hub_id, device.device_id, system, application, payload)
        except OpenDPSError as exc:
            log.info("telemetry of %r dropped: %s", device.device_id, exc.message)
            return
        self.bus.notify()

    def method_answered(self, key: tuple[str, str], rid: str | None, status: str, payload: bytes) -> None:
        future = self._methods.pop((key, rid or ""), None)
        if future is not None and not future.done():
            future.set_result((status, payload))

    def fail_methods(self, key: tuple[str, str]) -> None:
        for (k, rid), future in list(self._methods.items()):
            if k == key and not future.done():
                future.set_exception(DeviceOffline("device disconnected before answering the method"))
                self._methods.pop((k, rid), None)

    def renew(self, device: AuthenticatedDevice, csr: bytes):  # noqa: ANN201 - IssuedChain
        """Issue a new operational certificate under the policy that issued the device's current one."""
        return self.instance.provisioning.renew_through_hub(device.hub_host, device.device_id, csr)

    # ---- cloud → device ----
    def _live(self, hub_name: str, device_id: str) -> DeviceSession | None:
        return self.live.get((hub_name, device_id.lower()))

    def is_connected(self, hub_name: str, device_id: str) -> bool:
        return self._live(hub_name, device_id) is not None

    async def invoke_method(self, hub_name: str, device_id: str, method: str, payload: Any, *,
                            timeout: float = 30.0) -> tuple[int, Any]:
        """Direct method: (status, payload) from the device; DeviceOffline (404) or MethodTimeout (504)."""
        ds = self._live(hub_name, device_id)
        if ds is None or ds.session is None or "$iothub/methods/POST/#" not in ds.filters:
            raise DeviceOffline(f"device {device_id!r} is not connected and subscribed to methods")
        rid = str(next(self._rids))
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._methods[(ds.key, rid)] = future
        try:
            await ds.session.publish(f"$iothub/methods/POST/{method}/?$rid={rid}", json.dumps(payload).encode(), qos=0)
            status, body = await asyncio.wait_for(future, timeout)
        except TimeoutError as exc:
            raise MethodTimeout(f"device {device_id!r} did not answer method {method!r} within {timeout:g} s") from exc
        except SessionClosed as exc:
            raise DeviceOffline(f"device {device_id!r} disconnected") from exc
        finally:
            self._methods.pop((ds.key, rid), None)
        try:
            answer = json.loads(body) if body.strip() else None
        except ValueError:
            answer = body.decode("utf-8", "replace")
        try:
            code = int(status)
        except ValueError:
            code = 500
        return code, answer

    async def push_desired(self, hub_name: str, device_id: str, desired: dict, version: int) -> None:
        ds = self._live(hub_name, device_id)
        if ds is None or ds.session is None or "$iothub/twin/PATCH/properties/desired/#" not in ds.filters:
            return  # only sent while connected
        with contextlib.suppress(SessionClosed):
            await ds.session.publish(f"$iothub/twin/PATCH/properties/desired/?$version={version}",
                                     json.dumps({**desired, "$version": version}).encode(), qos=0)

    def schedule_c2d(self, key: tuple[str, str]) -> None:
        if key not in self._c2d_busy:
            self._c2d_busy.add(key)
            asyncio.get_running_loop().create_task(self._deliver_c2d(key))

    async def _deliver_c2d(self, key: tuple[str, str]) -> None:
        try:
            ds = self.live.get(key)
            if ds is None or ds.session is None:
                return
            if not any(f.startswith("devices/") for f in ds.filters):
                return
            for message in await self.run(self.instance.c2d.pending, ds.device.hub_id, key[1]):
                if message.pk in ds.sent:
                    continue
                ds.sent.add(message.pk)
                await ds.session.publish(message.topic(ds.device.device_id), message.body, qos=1,
                                         on_ack=self._completer(ds, message.pk))
        except SessionClosed:
            pass
        except Exception:  # noqa: BLE001 - a delivery failure must not kill the loop; the message stays queued
            log.exception("cloud-to-device delivery to %r failed", key[1])
        finally:
            self._c2d_busy.discard(key)

    def _completer(self, ds: DeviceSession, pk: int):  # noqa: ANN202
        async def done() -> None:
            await self.run(self.instance.c2d.complete, pk)
            ds.sent.discard(pk)
            self.schedule_c2d(ds.key)  # anything queued meanwhile goes out now
        return done

    async def notify_c2d(self, hub_name: str, device_id: str) -> None:
        self.schedule_c2d((hub_name, device_id.lower()))

    async def drop(self, hub_name: str, device_id: str, reason: str) -> None:
        """Disconnect a device now (disabled or deleted by the service)."""
        ds = self._live(hub_name, device_id)
        if ds is not None and ds.session is not None:
            ds.session.close(reason)
