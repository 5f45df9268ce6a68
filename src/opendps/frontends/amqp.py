"""The hubs' AMQP front end: service-side cloud-to-device messages as IoT Hub takes them over AMQP 1.0.

What azure-iot-hub's ``IoTHubRegistryManager.send_c2d_message`` (uamqp) does, and what this answers:

1. TLS to port 5671 (``--amqp-port``), SASL ``MSSBCBS`` (what uamqp asks for) or ``ANONYMOUS`` — neither
   carries a credential (the engine, :mod:`opendps.transport.amqp`) — or no SASL layer at all (Node). The C
   service SDK uses SASL ``PLAIN`` instead of CBS: authcid ``{keyName}@sas.root.{hubName}``, password = a
   SharedAccessSignature, checked exactly as a put-token's (below; the authcid decides nothing, the token's
   audience picks the hub) and granting the same authorisation; a refused token gets the SASL outcome ``auth``
   and the connection closes.
2. Claims-based security: a link pair on ``$cbs`` and a ``put-token`` request (application properties
   ``operation``, ``type``, ``name``; body = ``SharedAccessSignature sr=...``). The token is checked by
   :class:`opendps.frontends.service_auth.SasAuthenticator`, the same code as the HTTP middleware: ``iothubowner`` for
   the hub its audience names, or ``provisioningserviceowner`` for the default hub (other DPS access policies are
   refused whatever their rights: :func:`~opendps.frontends.service_auth.hub_service_only`). The answer carries
   ``status-code`` (int, 200 or 401) and ``status-description``, correlated to the request's message id.
   The authorisation lasts until the token's ``se`` (plus the same clock skew the HTTP check allows); a
   later put-token renews it; when it lapses, devicebound links are detached with
   ``amqp:unauthorized-access``.
3. A link to ``/messages/devicebound`` (also as ``amqps://{host}/messages/devicebound``; node names match
   case-insensitively, as Azure's); each message's ``to`` is ``/devices/{id}/messages/devicebound`` (C# and C
   spell it ``deviceBound``; Node and C# URL-encode the id). It is accepted once it is in the durable C2D queue
   (:meth:`opendps.frontends.runtime.Runtime.queue_c2d`, the REST route's path too), else rejected with an AMQP error:
   ``amqp:not-found`` (unknown device), ``amqp:resource-limit-exceeded`` (50 pending),
   ``amqp:link:message-size-exceeded``, ``amqp:invalid-field`` (bad ``to``, expiry, an application property without a
   faithful text form: :func:`property_text`), ``amqp:decode-error``,
   ``com.microsoft:timeout`` (the database away for now: the condition the SDKs retry). A put-token or a SASL PLAIN
   credential that cannot be judged for now gets status 503 or the SASL outcome ``sys-temp``.

4. A receiver link on ``/messages/servicebound/feedback`` (C#'s ``ServiceClient.OpenAsync`` and C's
   ``IoTHubMessaging_LL_Open`` always attach it; C#'s ``GetFeedbackReceiver``, Node's ``getFeedbackReceiver``
   read it) gets the hub's C2D feedback (:mod:`opendps.hub.feedback`): while the peer grants credit, the hub's
   oldest records are claimed (locked) and sent as one message — content type
   ``application/vnd.microsoft.iothub.feedback.json``, ``user-id`` the hub's name, the message annotation
   ``iothub-enqueuedtime`` (C# casts it to a DateTime, so it must be there), a 16-byte delivery tag (C# reads it as
   the batch's lock token GUID) — one batch at a time. Accepted completes (deletes) the records; released, rejected,
   modified or the link ending first abandons them (sent again); a receiver that never settles holds them until the
   lock lapses. The store is polled (``feedback_poll``) because the records are written wherever the device is
   connected, on any worker or node. ``/messages/servicebound/filenotifications`` is accepted and stays idle: there
   is no file upload.

Not served: AMQP over WebSockets and device AMQP — attaches to other nodes are refused with ``amqp:not-found``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from urllib.parse import unquote, urlsplit
from uuid import UUID

from opendps.errors import (
    GatewayTimeout,
    InvalidInput,
    NotFound,
    OpenDPSError,
    PayloadTooLarge,
    ServiceUnavailable,
    Throttled,
    Unauthorized,
)
from opendps.frontends.runtime import Runtime, wall_clock_timer
from opendps.frontends.service_auth import SasAuthenticator, SasPrincipal, hub_service_only
from opendps.hub import DEFAULT_HUB, QueueFull
from opendps.hub.feedback import CONTENT_TYPE as FEEDBACK_CONTENT_TYPE
from opendps.hub.feedback import FeedbackBatch
from opendps.hub.messaging import time_to_live
from opendps.hub.registry import check_device_id
from opendps.transport import sas, shown
from opendps.transport.amqp import (
    ACCEPTED,
    INTERNAL_ERROR,
    INVALID_FIELD,
    MESSAGE_SIZE_EXCEEDED,
    NOT_FOUND,
    RESOURCE_LIMIT,
    SASL_AUTH,
    SASL_OK,
    SASL_SYS_TEMP,
    UNAUTHORIZED,
    AmqpConnection,
    AmqpError,
    AmqpLimits,
    AmqpLink,
    Message,
    PlainCredentials,
    content_type,
    decimal32,
    decimal64,
    decimal128,
    int32,
    symbol,
    timestamp,
)

log = logging.getLogger("opendps.amqp")

CBS_NODE = "$cbs"
DEVICEBOUND = "/messages/devicebound"
FEEDBACK = "/messages/servicebound/feedback"
# receivers the SDKs open alongside C2D sends: feedback is served, file notifications idle (no file upload exists)
IDLE_SOURCES = (FEEDBACK, "/messages/servicebound/filenotifications")
ENQUEUED_TIME = symbol("iothub-enqueuedtime")
FORCED = "amqp:connection:forced"
SAS_TOKEN_TYPES = {"servicebus.windows.net:sastoken", "azure-devices.net:sastoken"}
ACK_PROPERTY = "iothub-ack"
# IoT Hub's vendor conditions for a refusal worth retrying. The service SDKs map ``com.microsoft:timeout`` to an error
# their retry policies retry (Node azure-iothub: ServiceUnavailableError; C#: a TimeoutException, in v2 a transient
# 408; uamqp retries any vendor condition), and ``device-container-throttled`` to their throttling error (retried with
# back-off). ``amqp:internal-error`` is not retried by Node's or C#'s service client; ``com.microsoft:server-busy`` is
# Event Hubs' and Service Bus', which the IoT Hub SDKs do not know (a generic, permanent error).
TIMEOUT = "com.microsoft:timeout"
THROTTLED = "com.microsoft:device-container-throttled"


def node(address: str | None) -> str:
    """A link address reduced to its node: ``amqps://host:5671/messages/devicebound`` → ``/messages/devicebound``."""
    if not address:
        return ""
    if "://" in address:
        try:
            address = urlsplit(address).path
        except ValueError:  # an unbalanced IPv6 bracket ("amqps://[x/y"): no node of ours, refused as not served
            return address
    return address.rstrip("/").lower() if address != CBS_NODE else address


def device_of(to: str | None) -> str:
    """``/devices/{id}/messages/devicebound`` → id; InvalidInput otherwise.

    ``messages/deviceBound`` matches in any case (C# and C send it so) and the id is URL-decoded (Node's
    ``encodeURIComponent``, C#'s ``WebUtility.UrlEncode``; Java and C send it raw), then held to the registry's
    device id rule."""
    parts = (to or "").split("/")
    if (len(parts) != 5 or parts[0] or parts[1] != "devices" or not parts[2]
            or [p.lower() for p in parts[3:]] != ["messages", "devicebound"]):
        raise InvalidInput(f"message 'to' must be /devices/{{deviceId}}/messages/devicebound, not {to!r}")
    return check_device_id(unquote(parts[2]))


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def property_text(key: str, value: Any) -> str | None:
    """An application property's value as the text the device receives. AMQP 1.0 (3.2.5) allows simple types only;
    proton decodes its typed numbers as ``int32``, ``uint``, ``timestamp``... whose ``str`` is their repr: a Node
    client's ``count: 5`` reached the device as ``count=int32(5)``, a list as ``[1, 2]``. Binary must be UTF-8 (it
    was decoded with replacement characters); a value without a faithful text form is InvalidInput."""
    if value is None or isinstance(value, str):  # str: also symbol and char
        return None if value is None else str(value)
    if isinstance(value, decimal32 | decimal64 | decimal128):
        raise InvalidInput(f"application property {shown(key)} is an AMQP decimal, which has no text form here")
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return repr(float(value))
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode()
        except UnicodeDecodeError:
            raise InvalidInput(f"application property {shown(key)} is binary that is not UTF-8") from None
    kind = {list: "list", dict: "map"}.get(type(value), "described value or array")
    raise InvalidInput(f"application property {shown(key)} is a {kind}: values must be of a simple type (string, "
                       "number, boolean, uuid, binary)")


def c2d_fields(message: Message) -> tuple[bytes, dict[str, str], dict[str, str | None], timedelta | None]:
    """AMQP message → (body, system properties in the queue's names, application properties, ttl)."""
    body = message.body
    if body is None:
        data = b""
    elif isinstance(body, bytes | memoryview | bytearray):
        data = bytes(body)
    elif isinstance(body, str):
        data = body.encode()
    else:
        raise InvalidInput("the message body must be binary data or a string")
    system: dict[str, str] = {}
    mime, encoding = content_type(message)  # None when absent (message.content_type would be the text 'None')
    for name, value in (("message-id", message.id), ("correlation-id", message.correlation_id),
                        ("user-id", message.user_id or None), ("content-type", mime), ("content-encoding", encoding)):
        text = _text(value)
        if text:
            system[name] = text
    properties: dict[str, str | None] = {}
    for key, value in (message.properties or {}).items():
        if not isinstance(key, str):  # AMQP 1.0 3.2.5: the keys are strings (a null key was queued as "None")
            raise InvalidInput(f"application property key {shown(key)} is not a string")
        text = property_text(key, value)
        if key.lower() == ACK_PROPERTY:
            if text is not None:
                system["ack"] = text
        else:
            properties[str(key)] = text  # a symbol key as plain text
    ttl = None
    if message.expiry_time:  # absolute-expiry-time, seconds since the epoch
        ttl = time_to_live(message.expiry_time - time.time())
    return data, system, properties, ttl


def amqp_error(exc: OpenDPSError) -> AmqpError:
    """A domain refusal as the AMQP error condition a sender sees in the rejected outcome."""
    if isinstance(exc, NotFound):
        condition = NOT_FOUND
    elif isinstance(exc, QueueFull):
        condition = RESOURCE_LIMIT
    elif isinstance(exc, PayloadTooLarge):
        condition = MESSAGE_SIZE_EXCEEDED
    elif isinstance(exc, InvalidInput):
        condition = INVALID_FIELD
    elif exc.status in (401, 403):
        condition = UNAUTHORIZED
    elif isinstance(exc, Throttled):
        condition = THROTTLED
    elif isinstance(exc, ServiceUnavailable | GatewayTimeout):  # the database away for now (StoreUnavailable) included
        condition = TIMEOUT
    else:
        condition = INTERNAL_ERROR
    return AmqpError(condition, f"{exc.message} ({exc.error_code})")


class HubConnection:
    """One AMQP connection's state: its CBS authorisation and its links (an :class:`AmqpHandler`).

    A token's expiry is wall-clock time and the timer that closes its links is the loop's (monotonic): the timer
    looks at the wall clock at least every :attr:`expiry_check` seconds, so a clock stepped forward closes them
    within that, and one stepped back is waited for (the timer firing early re-arms instead of giving up)."""

    expiry_check = 60.0  # seconds: at most this long between looks at a token's expiry
    feedback_poll = 1.0  # seconds between looks for feedback records while a feedback link has credit

    def __init__(self, front: AmqpFrontEnd, conn: AmqpConnection) -> None:
        self.front = front
        self.conn = conn
        self.principal: SasPrincipal | None = None
        self.valid_until: float = 0.0  # unix time; an int as exact as the token's se (any integer)
        self.clock: Callable[[], float] = time.time  # the wall clock se is read against
        self.links: list[AmqpLink] = []
        self._expiry: asyncio.TimerHandle | None = None
        self._feeders: set[asyncio.Task[None]] = set()  # one per feedback link; each ends with its link
        self._closed = asyncio.Event()

    # --- AmqpHandler --------------------------------------------------------------------------------

    def attach(self, link: AmqpLink) -> AmqpError | None:
        # links the peer detached leave here (no handler call says so): attached and detached in a loop, even $cbs
        # without any token, they piled up for the connection's life
        self.links = [lk for lk in self.links if lk.open]
        target = node(link.address)
        if target == CBS_NODE:
            self.links.append(link)
            return None
        if (link.incoming and target == DEVICEBOUND) or (not link.incoming and target in IDLE_SOURCES):
            if not self.authorised():
                return AmqpError(UNAUTHORIZED, "no valid token: put a SharedAccessSignature on $cbs first")
            self.links.append(link)
            if target == FEEDBACK:  # starts once the attach is answered (this call returns first)
                feeder = asyncio.get_running_loop().create_task(self._feed(link))
                self._feeders.add(feeder)
                feeder.add_done_callback(self._feeders.discard)
            return None
        # the address cut short (shown): the peer's, up to a frame long, and the detach must fit its max-frame-size
        return AmqpError(NOT_FOUND, f"node {shown(link.address)} is not served: opendps takes $cbs, {DEVICEBOUND} "
                                    f"(to send) and {', '.join(IDLE_SOURCES)} (to receive)")

    async def message(self, link: AmqpLink, message: Message) -> AmqpError | None:
        if node(link.address) == CBS_NODE:
            await self._cbs(link, message)
            return None
        return await self._c2d(message)

    async def sasl_plain(self, credentials: PlainCredentials) -> int:
        """SASL PLAIN (the C service SDK): the password is judged as a CBS put-token's body is, so both ways in
        grant the same thing. Only the check's own reason is logged, never the password. A token that cannot be
        judged for now (the database away) gets the transient outcome ``sys-temp``, not ``auth``: the credential may
        well be good."""
        try:
            principal = await self.front.authenticator.authenticate(credentials.password, hub_service_only)
        except Unauthorized as exc:
            log.info("AMQP SASL PLAIN from %s refused: %s", self.conn.peer, exc.message)
            return SASL_AUTH
        except OpenDPSError as exc:
            log.info("AMQP SASL PLAIN from %s not judged: %s", self.conn.peer, exc.message)
            return SASL_SYS_TEMP
        self._grant(principal)
        return SASL_OK

    def closed(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self.links.clear()
        self._closed.set()  # feeders stop (not cancelled: a batch's abandon still runs)

    # --- feedback ----------------------------------------------------------------------------------

    async def _feed(self, link: AmqpLink) -> None:
        """Serve one feedback link: while it is open and the peer grants credit, claim the hub's oldest records,
        send them as one message and wait for its outcome before the next (C#'s receiver settles one at a time).
        Each look also sweeps expired C2D messages when due, so their Expired records appear without a new send."""
        runtime = self.front.runtime
        c2d = runtime.services.c2d
        loop = asyncio.get_running_loop()

        def claim(hub: str) -> FeedbackBatch | None:
            c2d.sweep_expired()
            return c2d.feedback.claim(hub)

        while link.open and not self._closed.is_set():
            batch = None
            if link.credit > 0 and self.authorised():
                assert self.principal is not None
                hub = self.principal.hub or DEFAULT_HUB
                try:
                    batch = await runtime.domain.run(claim, hub)
                except OpenDPSError as exc:  # the database away for now: look again later
                    log.info("AMQP feedback for %s not read: %s", self.conn.peer, exc.message)
                except Exception:
                    log.exception("AMQP feedback for %s failed", self.conn.peer)
            if batch is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), self.feedback_poll)
                continue
            outcome: asyncio.Future[int | None] = loop.create_future()
            if link.open:
                link.send(feedback_message(batch, hub), tag=batch.tag,
                          on_outcome=lambda state, f=outcome: f.done() or f.set_result(state))
            else:
                outcome.set_result(None)
            state = await outcome
            try:
                if state == ACCEPTED:
                    await runtime.domain.run(c2d.feedback.complete, batch.lock_token)
                else:  # released, rejected, modified or never settled: delivered again
                    await runtime.domain.run(c2d.feedback.abandon, batch.lock_token)
            except OpenDPSError as exc:  # the lock lapses on its own: the batch is delivered again then
                log.info("AMQP feedback batch %s from %s not settled in the store: %s", batch.lock_token,
                         self.conn.peer, exc.message)
            except Exception:
                log.exception("AMQP feedback batch %s from %s not settled in the store", batch.lock_token,
                              self.conn.peer)
            if state != ACCEPTED:  # not again at once: a receiver that releases each batch had it back in a tight
                # loop (a claim and an abandon written per turn, hundreds a second from one client)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), self.feedback_poll)

    # --- CBS -------------------------------------------------------------------------------------

    def authorised(self) -> bool:
        return self.principal is not None and self.clock() < self.valid_until

    async def _cbs(self, link: AmqpLink, request: Message) -> None:
        props = request.properties or {}
        operation, token_type = props.get("operation"), props.get("type")
        if operation != "put-token":
            status, description = 400, f"unsupported CBS operation {shown(operation)}: only put-token"
        elif not isinstance(token_type, str) or token_type not in SAS_TOKEN_TYPES:  # a map or list cannot be looked up
            status, description = 400, f"unsupported token type {shown(token_type)}: a SharedAccessSignature is required"
        else:
            token = _text(request.body)
            try:
                principal = await self.front.authenticator.authenticate(token, hub_service_only)
            except Unauthorized as exc:
                status, description = 401, exc.message
                log.info("AMQP put-token from %s refused: %s", self.conn.peer, exc.message)
            except OpenDPSError as exc:  # not judged for now (the database away: 503), answered as AMQP management does
                status, description = exc.status, exc.message
                log.info("AMQP put-token from %s not judged: %s", self.conn.peer, exc.message)
            else:
                status, description = 200, "OK"
                self._grant(principal)
        self._reply(link, request, status, description)

    def _grant(self, principal: SasPrincipal) -> None:
        self.principal = principal
        self.valid_until = principal.expiry + sas.DEFAULT_SKEW_SECONDS  # the HTTP check's tolerance too
        self._arm()

    def _arm(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry = wall_clock_timer(self.valid_until, self._expire, check=self.expiry_check, clock=self.clock)

    def _expire(self) -> None:
        """The token lapsed: every link it authorised goes; $cbs stays open for a new put-token. Still valid by the
        wall clock (a later look, or the clock stepped back): look again."""
        self._expiry = None
        if self.authorised():
            self._arm()
            return
        for link in [lk for lk in self.links if node(lk.address) != CBS_NODE]:
            self.links.remove(link)
            link.close(AmqpError(UNAUTHORIZED, "the SharedAccessSignature expired"))

    def _reply(self, request_link: AmqpLink, request: Message, status: int, description: str) -> None:
        """Answer on the peer's receiving ``$cbs`` link: ``reply-to`` if it names one, else the one in this session."""
        outgoing = [lk for lk in self.links if not lk.incoming and lk.open and node(lk.address) == CBS_NODE]
        chosen = next((lk for lk in outgoing if request.reply_to and lk.target == request.reply_to), None)
        chosen = chosen or next((lk for lk in outgoing if lk.session == request_link.session), None)
        if chosen is None:
            log.info("AMQP put-token from %s has no receiving $cbs link to answer on", self.conn.peer)
            return
        response = Message(correlation_id=request.id, address=request.reply_to,
                           properties={"status-code": int32(status), "status-description": description})
        chosen.send(response)

    # --- C2D -------------------------------------------------------------------------------------

    async def _c2d(self, message: Message) -> AmqpError | None:
        if not self.authorised():
            return AmqpError(UNAUTHORIZED, "the SharedAccessSignature expired or was never given")
        assert self.principal is not None
        hub = self.principal.hub or DEFAULT_HUB  # the DPS owner speaks for the default hub, as over REST
        try:
            device_id = device_of(message.address)
            data, system, properties, ttl = c2d_fields(message)
            queued = await self.front.runtime.queue_c2d(hub, device_id, data, system=system, properties=properties,
                                                        ttl=ttl)
        except OpenDPSError as exc:
            return amqp_error(exc)
        except Exception:  # the sender gets a rejection; the log has the cause
            log.exception("AMQP C2D message from %s failed", self.conn.peer)
            return AmqpError(INTERNAL_ERROR, "the message could not be queued")
        log.debug("AMQP C2D message %s queued for %s/%s", queued.message_id, hub, device_id)
        return None


def feedback_message(batch: FeedbackBatch, hub: str) -> Message:
    """A feedback batch as IoT Hub sends it: the JSON records in a data section, the content type the SDKs check,
    the hub as ``user-id`` (C#'s ``FeedbackBatch.UserId``) and ``iothub-enqueuedtime`` (its ``EnqueuedTime``)."""
    return Message(id=batch.lock_token, body=batch.body(), inferred=True, content_type=FEEDBACK_CONTENT_TYPE,
                   user_id=hub.encode(), annotations={
                       ENQUEUED_TIME: timestamp(int(batch.enqueued_at.timestamp() * 1000))})


class AmqpFrontEnd:
    """Every hub's AMQP endpoint: one listener (``--amqp-port``), connections tracked for shutdown."""

    def __init__(self, runtime: Runtime, authenticator: SasAuthenticator, limits: AmqpLimits | None = None) -> None:
        self.runtime = runtime
        self.authenticator = authenticator
        self.limits = limits or AmqpLimits()
        self._listeners: list[asyncio.AbstractServer] = []
        self._connections: set[AmqpConnection] = set()
        self._closing = False

    def protocol_factory(self) -> AmqpConnection:
        """One engine per connection, for :func:`opendps.transport.tls.start_tls_server`."""
        return AmqpConnection(self._handler, self.limits, tracker=self._connections)

    def _handler(self, conn: AmqpConnection) -> HubConnection:
        if self._closing:  # its TLS handshake finished during shutdown
            asyncio.get_running_loop().call_soon(conn.close, AmqpError(FORCED, "server shutting down"))
        return HubConnection(self, conn)

    def add_listener(self, listener: asyncio.AbstractServer) -> None:
        self._listeners.append(listener)

    async def close(self, timeout: float = 3.0) -> None:
        """Stop listening, close every connection (amqp:connection:forced), abort those that linger."""
        self._closing = True
        for listener in self._listeners:
            listener.close()
        for conn in list(self._connections):
            conn.close(AmqpError(FORCED, "server shutting down"))
        deadline = asyncio.get_running_loop().time() + timeout
        while self._connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self._connections):
            conn.abort()
        for listener in self._listeners:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(listener.wait_closed(), 1.0)
        self._listeners.clear()
