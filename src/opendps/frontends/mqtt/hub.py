"""The hub's device endpoint over MQTT (wire spec §6): telemetry, twin, direct methods, C2D and certificate
renewal, for devices the hub authenticated at CONNECT (:class:`opendps.hub.HubAuthenticator`).

One :class:`HubSession` per connected device: it is the MQTT session's handler (topics in) and the device's
:class:`~opendps.hub.DeviceLink` in the process's live sessions (methods, desired pushes, C2D and drops out).
Topic handlers translate and call domain code in the thread pool; they decide nothing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

from opendps.errors import Conflict, InvalidInput, OpenDPSError
from opendps.frontends import metrics
from opendps.frontends.mqtt import error_payload, request_id
from opendps.frontends.runtime import Runtime, wall_clock_timer
from opendps.hub import AuthenticatedDevice, DeviceOffline, HubAuthenticator, PendingMessage
from opendps.hub.live import C2D, DESIRED, METHODS
from opendps.hub.telemetry import parse_property_bag
from opendps.logs import event
from opendps.pki import decode_csr_text
from opendps.transport import shown
from opendps.transport.mqtt.server import MqttRefused, Session, SessionClosed
from opendps.transport.wire import error_body, iso8601, parse_json, topic_query

log = logging.getLogger("opendps.hub")
REFUSE = 0x80
MAX_SUBSCRIPTIONS = 5
_METHOD_STATUS = re.compile(r"-?[0-9]{1,9}")  # ASCII digits that fit the 32-bit int a service SDK holds it in


def method_status(text: str) -> int:
    """A direct method's status from its response topic (``$iothub/methods/res/{status}/``); 500 for anything that is
    not a plain decimal of at most 9 digits. Why not ``int``: it also reads ``1_000``, `` 5``, Arabic-Indic digits and
    numbers no service SDK can hold."""
    return int(text) if _METHOD_STATUS.fullmatch(text) else 500


_RID = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{2,34}[A-Za-z0-9])?$")
CREDENTIALS_RESPONSE = "$iothub/credentials/res"
FEATURES = {METHODS: "$iothub/methods/POST/#", DESIRED: "$iothub/twin/PATCH/properties/desired/#"}
# the filters a device may hold, in the order of their bits in hub_devices.subscriptions (bit 8 + i: granted QoS 1);
# "{d}" is the device id
KEPT_FILTERS = ("devices/{d}/messages/devicebound/#", "devices/{d}/messages/devicebound", "$iothub/methods/POST/#",
                "$iothub/twin/res/#", "$iothub/twin/PATCH/properties/desired/#", f"{CREDENTIALS_RESPONSE}/#")


def subscription_mask(device_id: str, filters: Mapping[str, int]) -> int:
    """``filters`` (filter -> granted QoS) as the bit mask a device's row keeps; filters not allowed are left out."""
    mask = 0
    for i, pattern in enumerate(KEPT_FILTERS):
        qos = filters.get(pattern.replace("{d}", device_id))
        if qos is not None:
            mask |= 1 << i | (1 << (8 + i) if qos else 0)
    return mask


def subscriptions_of(device_id: str, mask: int) -> dict[str, int]:
    """The filters (-> granted QoS) of a kept bit mask."""
    return {pattern.replace("{d}", device_id): 1 if mask >> (8 + i) & 1 else 0
            for i, pattern in enumerate(KEPT_FILTERS) if mask >> i & 1}


@dataclass(slots=True)
class HubSession:
    """One connected device: the MQTT session handler and the device's link in the live sessions."""

    runtime: Runtime
    device: AuthenticatedDevice
    session: Session | None = None
    renewing: bool = False
    sent: set[int] | None = None  # C2D messages published on this connection, awaiting PUBACK (made by the first)
    # C2D messages acknowledged (deleted from the store) while a delivery was under way: its read of the queue may have
    # begun before the delete and still hold them; the next read begins after it, so it forgets them
    acked: set[int] | None = None
    delivering: bool = False
    counted: bool = False  # in opendps_hub_connections (on_connected ran)
    refusal_logged: bool = False  # a refused subscription was logged at INFO: later ones go to DEBUG
    _delivery: asyncio.Task[None] | None = None  # held: the loop keeps only a weak reference to tasks
    # when its CONNECT began to be checked (time.monotonic()): a drop or revocation heard since closes it at its attach
    checked_since: float | None = None
    # the subscriptions kept in the device's row (subscription_mask): read at CONNECT, rewritten when they change
    kept: int = 0
    # a SAS session's timer: the connection closes when its token expires (token_expired); None for X.509 sessions
    _expiry: asyncio.TimerHandle | None = None
    # C2D lives in the store until PUBACK, so a reconnect redelivers from there; the MQTT core keeps no copy; the
    # subscriptions are kept in the store (kept_subscriptions), as IoT Hub keeps a clean-session-0 session's
    persistent: ClassVar[bool] = False
    # IoT Hub's bound (keepalive 0 included): a silent device is dropped after 1.5x that
    max_keepalive: ClassVar[int] = 1767
    # at most this long (seconds) between looks at the wall clock while a SAS token stands: the timer is the loop's
    # (monotonic) and se is wall-clock time, so a clock stepped back is waited for; a day keeps a ten-year token's
    # timer to one wake-up a day
    expiry_check: ClassVar[float] = 86400.0
    # this process's C2D completions under way ((hub id, device key) -> each one's end): a PUBACK's DELETE runs in the
    # thread pool, and a device that acknowledges and reconnects at once had its new session read the message before
    # the delete and get it again; the new session's first read waits for them (another node's is not seen here)
    completing: ClassVar[dict[tuple[int, str], set[asyncio.Future[None]]]] = {}

    @property
    def filters(self) -> Mapping[str, int]:
        """The topic filters the device holds: the MQTT session's own (the core adds a filter once on_subscribe
        granted it and removes one before the UNSUBACK: SDKs unsubscribe to turn a feature off, e.g. Node's
        ``disableC2D``), not a second copy per connection."""
        return self.session.subscriptions if self.session is not None else {}

    @property
    def kept_subscriptions(self) -> dict[str, int]:
        """What the device's last clean-session-0 session subscribed to, restored by the MQTT core (session present
        1) when this CONNECT asks for clean session 0: as IoT Hub does, and Microsoft's Node.js SDK relies on it (its
        SAS renewal reconnects with clean session 0 and does not subscribe again: desired patches, methods and C2D
        were lost from then on). Kept in the store, so the reconnect may reach any process or node."""
        return subscriptions_of(self.device.device_id, self.kept)

    @property
    def session_key(self) -> str:
        """Hub sessions are keyed apart from DPS sessions that may use the same client id."""
        return f"hub:{self.device.hub_host}/{self.device.device_id}"

    # ---- MQTT session handler ----
    async def on_connected(self, session: Session) -> None:
        self.session = session
        self.runtime.hub_names[self.device.hub_id] = self.device.hub_name  # for the telemetry counters' label
        self.runtime.live.attach(self, checked_since=self.checked_since)
        self.checked_since = None  # only the attach needs it: an idle session holds no float for it
        self._arm_expiry()
        metrics.hub_connected(self.device.auth_type)
        self.counted = True
        log.info("device %r connected to hub %s (%s)", self.device.device_id, self.device.hub_host, self.device.auth_type,
                 extra=event("hub.connected", hub=self.device.hub_host, device_id=self.device.device_id,
                             auth=self.device.auth_type, outcome="connected"))
        if self.filters:  # subscriptions restored (kept_subscriptions): C2D waiting goes out
            asyncio.get_running_loop().call_soon(self.wake_c2d)
        if self.device.superseded:  # its renewed certificate's first session: older ones are revoked, drop their sessions
            log.info("device %r: certificate(s) %s superseded", self.device.device_id, ", ".join(self.device.superseded))
            await self.runtime.live.revoke(set(self.device.superseded))

    async def on_subscribe(self, session: Session, topic_filter: str, qos: int) -> int:
        d = self.device.device_id
        allowed = {f"devices/{d}/messages/devicebound/#", "$iothub/methods/POST/#", "$iothub/twin/res/#",
                   "$iothub/twin/PATCH/properties/desired/#", f"{CREDENTIALS_RESPONSE}/#", f"devices/{d}/messages/devicebound"}
        if topic_filter not in allowed or (topic_filter not in self.filters and len(self.filters) >= MAX_SUBSCRIPTIONS):
            # one INFO line per connection: a single SUBSCRIBE may carry 60,000 filters, each refused (60,000 lines)
            log.log(logging.DEBUG if self.refusal_logged else logging.INFO, "device %r: subscription to %s refused", d,
                    shown(topic_filter))
            self.refusal_logged = True
            return REFUSE
        granted = min(qos, 1)
        if not session.request.clean_session:  # a clean session's subscriptions end with it
            await self.keep({**self.filters, topic_filter: granted})
        if topic_filter.startswith("devices/"):  # after any await: the core holds the filter before this runs
            asyncio.get_running_loop().call_soon(self.wake_c2d)
        elif topic_filter == FEATURES[METHODS]:  # a call waiting for the device to subscribe (connectTimeoutInSeconds)
            asyncio.get_running_loop().call_soon(self.runtime.live.listening, self)
        return granted

    async def on_unsubscribe(self, session: Session, topic_filter: str) -> None:
        if not session.request.clean_session:
            await self.keep(self.filters)  # the core removed the filter before this

    async def keep(self, filters: Mapping[str, int]) -> None:
        """Keep ``filters`` in the device's row for its next clean-session-0 connection, when they differ from what
        it holds (a device's first SUBSCRIBE writes; the same subscriptions on later connections write nothing).
        Awaited before the SUBACK or UNSUBACK, and for a clean-session CONNECT (``{}``: nothing kept) before its
        CONNACK (the router): a reconnect right after any of them reads what it wrote."""
        mask = subscription_mask(self.device.device_id, filters)
        if mask == self.kept:
            return
        try:
            await self.runtime.domain.run(self.runtime.services.hubs.keep_subscriptions, self.device.hub_id,
                                          self.device.device_id, mask)
        except Exception as exc:  # noqa: BLE001 - the session goes on; only a later clean-session-0 reconnect loses
            log.warning("device %r: its subscriptions could not be kept for its next connection: %s",
                        self.device.device_id, exc)
            return
        self.kept = mask

    def _telemetry_bag(self, topic: str) -> str | None:
        """The property bag of a telemetry topic of this device (``devices/{id}/messages/events/{bag}``), else None.
        The C# SDK ends the topic with '/' after a property bag (and Java module telemetry): not part of the last
        value."""
        device_id = self.device.device_id
        end = 8 + len(device_id) + 16  # "devices/" + id + "/messages/events", compared in place (no string built)
        if topic.startswith("devices/") and topic.startswith(device_id, 8) and topic.startswith("/messages/events",
                                                                                              end - 16):
            if len(topic) == end:
                return ""
            if topic[end] == "/":
                return topic[end + 1:].removesuffix("/")
        return None

    async def on_publish(self, session: Session, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        d = self.device.device_id
        bag = self._telemetry_bag(topic)
        if bag is not None:
            await self._telemetry(bag, payload)
        elif topic.startswith("$iothub/twin/GET/"):
            await self._twin_get(request_id(topic_query(topic)))
        elif topic.startswith("$iothub/twin/PATCH/properties/reported/"):
            await self._twin_reported(request_id(topic_query(topic)), payload)
        elif topic.startswith("$iothub/methods/res/"):
            self._method_answered(topic, payload)
        elif topic.startswith("$iothub/credentials/POST/issueCertificate/"):
            await self._issue_certificate(request_id(topic_query(topic)), payload)
        else:
            log.info("device %r published to %s, which is not one of its topics: connection closed", d, shown(topic))
            session.close(f"publish to a topic outside the device's own: {shown(topic)}")

    def begin_publish(self, session: Session, topic: str, payload: bytes, qos: int,
                      retain: bool) -> asyncio.Future[None] | None:
        """Telemetry of a hub without routes, queued for the group commit at once (``PipeliningHandler``): the MQTT
        core reads the device's next PUBLISH while this one waits for its transaction, so a device with several
        messages in flight has them stored together and acknowledged in one write. Anything else (a twin request, a
        routed hub's telemetry, a full queue): None, and ``on_publish`` handles it."""
        rt, device = self.runtime, self.device
        bag = self._telemetry_bag(topic)
        if bag is None or not rt.telemetry_router.unrouted(device.hub_id):
            return None  # not telemetry; or routes (or not known yet): on_publish stores, then routes before the PUBACK
        system, application = parse_property_bag(bag)
        return rt.telemetry_writer.submit(device.hub_id, device.device_id, system, application, payload)

    async def on_disconnected(self, session: Session, reason: str) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self.runtime.live.detach(self)
        if self.counted:
            self.counted = False
            metrics.hub_disconnected()
        log.info("device %r disconnected from hub %s: %s", self.device.device_id, self.device.hub_host, reason,
                 extra=event("hub.disconnected", hub=self.device.hub_host, device_id=self.device.device_id))

    # ---- SAS token lifetime ----
    def _arm_expiry(self) -> None:
        """Close the session when its SAS token lapses, as IoT Hub does (its 401003 troubleshooting page: "IoT Hub
        notices the expiration, and disconnects the device"; some SDKs renew their token only then). The token was
        checked at CONNECT only: a session used to outlive it for as long as the device stayed connected — days after
        its key was regenerated, or after its TPM was replaced."""
        until = HubAuthenticator.valid_until(self.device)
        if until is not None and self.session is not None:
            self._expiry = wall_clock_timer(until, self._token_expired, check=self.expiry_check)

    def _token_expired(self) -> None:
        """The timer fired: closed if the token has lapsed by the wall clock, else (a long token, a clock stepped
        back) looked at again later."""
        self._expiry = None
        until = HubAuthenticator.valid_until(self.device)
        if until is not None and time.time() < until:
            self._arm_expiry()
            return
        self.close("SharedAccessSignature expired: reconnect with a renewed token")

    # ---- device link (the service side, through the live sessions) ----
    def subscribed(self, feature: str) -> bool:
        if feature == C2D:
            return any(f.startswith("devices/") for f in self.filters)
        return FEATURES.get(feature) in self.filters

    async def send_method(self, method: str, request_id: str, payload: Any) -> None:
        if self.session is None:
            raise DeviceOffline(f"device {self.device.device_id!r} disconnected")
        try:
            await self.session.publish(f"$iothub/methods/POST/{method}/?$rid={request_id}", json.dumps(payload).encode(),
                                       qos=0)
        except SessionClosed as exc:
            raise DeviceOffline(f"device {self.device.device_id!r} disconnected") from exc

    async def send_desired(self, desired: dict[str, Any], version: int) -> None:
        await self._reply(f"$iothub/twin/PATCH/properties/desired/?$version={version}",
                          json.dumps({**desired, "$version": version}).encode())

    def wake_c2d(self) -> None:
        if not self.delivering:
            self.delivering = True
            self._delivery = asyncio.get_running_loop().create_task(self._deliver_c2d())

    def close(self, reason: str) -> None:
        if self.session is not None:
            self.session.close(reason)

    # ---- device → cloud ----
    async def _telemetry(self, bag: str, payload: bytes) -> None:
        system, application = parse_property_bag(bag)
        try:  # stored, then routed (a durable route acknowledges before the PUBACK); not stored while it cannot
            await self.runtime.telemetry_router.ready(self.device.hub_id)
            position = await self.runtime.telemetry_writer.append(self.device.hub_id, self.device.device_id, system,
                                                                  application, payload)
            await self.runtime.telemetry_router.deliver(self.device.hub_id, self.device.device_id, system, application,
                                                        payload, position)
        except OpenDPSError as exc:  # not durable, so not acknowledged: the connection closes, as IoT Hub does
            raise MqttRefused(f"telemetry of {self.device.device_id!r} not accepted: {exc.message}") from exc

    def _method_answered(self, topic: str, payload: bytes) -> None:
        status = topic[len("$iothub/methods/res/"):].split("/", 1)[0]
        try:
            answer: Any = parse_json(payload, "method response") if payload.strip() else None
        except InvalidInput:
            answer = payload.decode("utf-8", "replace")
        self.runtime.live.method_answered(self, topic_query(topic).get("$rid"), method_status(status), answer)

    # ---- twin ----
    async def _reply(self, topic: str, body: bytes = b"") -> None:
        if self.session is not None:
            with contextlib.suppress(SessionClosed):
                await self.session.publish(topic, body, qos=0)

    async def _twin_get(self, rid: str | None) -> None:
        if rid is None:
            return
        try:
            ident = await self.runtime.domain.run(self.runtime.services.hubs.get_device, self.device.hub_name,
                                                  self.device.device_id)
        except OpenDPSError as exc:
            await self._reply(f"$iothub/twin/res/{exc.status}/?$rid={rid}", error_payload(exc))
            return
        twin = ident.twin()["properties"]
        await self._reply(f"$iothub/twin/res/200/?$rid={rid}", json.dumps(twin).encode())

    async def _twin_reported(self, rid: str | None, payload: bytes) -> None:
        try:
            patch = parse_json(payload or b"null", "reported properties patch")
            version = await self.runtime.domain.run(self.runtime.services.hubs.patch_reported, self.device.hub_id,
                                                    self.device.device_id, patch)
        except OpenDPSError as exc:
            if rid is not None:
                await self._reply(f"$iothub/twin/res/{exc.status}/?$rid={rid}", error_payload(exc))
            return
        if rid is not None:
            await self._reply(f"$iothub/twin/res/204/?$rid={rid}&$version={version}")

    # ---- certificate renewal through the hub (preview, wire spec §6.6) ----
    def _renewal_request(self, rid: str, payload: bytes) -> bytes:
        """The CSR of an ``issueCertificate`` request, or the refusal the device gets instead."""
        if not _RID.fullmatch(rid):
            raise InvalidInput("request id must be 4-36 letters, digits or '-', not starting or ending with '-'")
        body = parse_json(payload, "issueCertificate body")
        if not isinstance(body, dict) or set(body) - {"id", "csr", "replace"} or not {"id", "csr"} <= set(body):
            raise InvalidInput("issueCertificate body must hold id and csr (and optionally replace) only")
        if body["id"] != self.device.device_id:
            raise InvalidInput(f"id {body['id']!r} is not the authenticated device", error_code=400006)
        if self.renewing:
            raise Conflict("another certificate request of this device is active", error_code=409004,
                           info={"requestId": rid})
        if not isinstance(body["csr"], str):  # refused now, not after a 202 (the CA would only say "cannot be parsed")
            raise InvalidInput("csr must be a string: base64 DER or PEM")
        return decode_csr_text(body["csr"])

    async def _issue_certificate(self, rid: str | None, payload: bytes) -> None:
        if rid is None or f"{CREDENTIALS_RESPONSE}/#" not in self.filters:
            return  # no subscription or no $rid: no response, as in IoT Hub
        try:
            csr = self._renewal_request(rid, payload)
        except OpenDPSError as exc:
            await self._reply(f"{CREDENTIALS_RESPONSE}/{exc.status}/?$rid={rid}", error_payload(exc))
            return
        self.renewing = True
        correlation = str(uuid.uuid4())
        expires = iso8601(datetime.now(UTC) + timedelta(minutes=5))
        await self._reply(f"{CREDENTIALS_RESPONSE}/202/?$rid={rid}", json.dumps({"correlationId": correlation,
                                                                                 "operationExpires": expires}).encode())
        try:
            chain = await self.runtime.domain.run(self.runtime.services.provisioning.renew_through_hub,
                                                  self.device.hub_host, self.device.device_id, csr)
            await self._reply(f"{CREDENTIALS_RESPONSE}/200/?$rid={rid}", json.dumps({"correlationId": correlation,
                              "certificates": [base64.b64encode(d).decode() for d in chain.der_chain()]}).encode())
        except OpenDPSError as exc:
            await self._reply(f"{CREDENTIALS_RESPONSE}/{exc.status}/?$rid={rid}", error_payload(exc))
        except Exception:  # a bug: the device holds a 202, so it gets a final answer (as the DPS session answers 500)
            tracking = str(uuid.uuid4())
            log.exception("certificate request %s of %r failed (trackingId %s)", rid, self.device.device_id, tracking)
            await self._reply(f"{CREDENTIALS_RESPONSE}/500/?$rid={rid}", json.dumps({
                **error_body(500000, f"internal server error (trackingId {tracking})"), "trackingId": tracking}).encode())
        finally:
            self.renewing = False

    # ---- cloud → device ----
    async def _deliver_c2d(self) -> None:
        rt = self.runtime
        unsent: list[PendingMessage] = []
        try:
            if self.session is None or not self.subscribed(C2D):
                return
            key = (self.device.hub_id, self.device.device_key)
            while key in HubSession.completing:  # acknowledged on this or an older connection, not yet deleted
                await asyncio.wait(set(HubSession.completing[key]))
            self.acked = None  # acknowledged before this read begins: it cannot return them
            out = frozenset(self.sent or ())  # out on this connection already: neither sent nor counted again
            read = await rt.domain.run(rt.services.c2d.pending, self.device.hub_id, self.device.device_key, skip=out)
            for position, message in enumerate(read):
                unsent = read[position:]  # counted by the read, not (yet) handed to the connection
                if self.acked is not None and message.pk in self.acked:
                    continue  # read before its PUBACK was completed: the device has it
                if self.sent is None:
                    self.sent = set()
                elif message.pk in self.sent:
                    continue
                self.sent.add(message.pk)
                await self.session.publish(message.topic(self.device.device_id), message.body, qos=1,
                                           on_ack=self._completer(message.pk))
            unsent = []
        except SessionClosed:
            if unsent:  # the connection ended before these went out: not deliveries (maxDeliveryCount)
                try:
                    await rt.domain.run(rt.services.c2d.not_delivered, unsent)
                except Exception as exc:  # noqa: BLE001 - the counts stay as read: at worst an earlier dead-letter
                    log.warning("cloud-to-device messages for %r not sent before the connection ended keep their "
                                "delivery count (%s: %s)", self.device.device_id, type(exc).__name__, exc)
        except Exception:  # a delivery failure must not kill the loop; the message stays queued
            log.exception("cloud-to-device delivery to %r failed", self.device.device_id)
        finally:
            self.delivering = False

    def _completer(self, pk: int) -> Callable[[], Awaitable[None]]:
        def acknowledged() -> Awaitable[None]:
            """Called as the PUBACK is read: the completion is known to be under way before anything else runs, so a
            reconnect's delivery waits for it (``completing``) rather than reading the message before it is deleted
            and sending it again within milliseconds."""
            key = (self.device.hub_id, self.device.device_key)
            finished = asyncio.get_running_loop().create_future()
            HubSession.completing.setdefault(key, set()).add(finished)
            return done(key, finished)

        async def done(key: tuple[int, str], finished: asyncio.Future[None]) -> None:
            try:
                await self.runtime.domain.run(self.runtime.services.c2d.complete, pk)
            finally:
                finished.set_result(None)
                waiting = HubSession.completing.get(key)
                if waiting is not None:
                    waiting.discard(finished)
                    if not waiting:
                        del HubSession.completing[key]
            metrics.c2d_delivered(self.device.hub_name)
            if self.delivering:  # that delivery's read may predate the delete: it must not send this one again
                if self.acked is None:
                    self.acked = set()
                self.acked.add(pk)
            if self.sent is not None:
                self.sent.discard(pk)
                if not self.sent:
                    self.sent = None
            self.wake_c2d()  # anything queued meanwhile goes out now
        return acknowledged
