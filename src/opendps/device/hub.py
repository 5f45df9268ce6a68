"""IoT hub device client over MQTT (wire spec §6): telemetry, twin, direct methods, C2D and certificate renewal.

Built on :class:`opendps.device.mqtt.MqttClient`. CONNECT as the Azure SDKs do: client id = device
id, username ``{hub}/{device}/?api-version=2021-04-12``, the operational chain in the TLS handshake
(``x509=``) or a SAS password ``sr={hub}%2Fdevices%2F{device}`` signed with a key in memory (``symmetric_key=``)
or by another :class:`~opendps.device.provisioning.SasSigner` (``signer=``: a TPM-held key, a
:class:`~opendps.device.tpm.DeviceTpm` that imported its hub key during provisioning).

Telemetry goes through an outgoing queue that survives reconnects: a message leaves the queue only
when its PUBACK arrived, so nothing is lost while the client reconnects after a network failure or
switches to a renewed certificate (:meth:`HubClient.switch_credentials`). Delivery is at least once
(a message whose PUBACK was lost is sent again). Twin and renewal requests are not queued: they fail
with :class:`~opendps.device.mqtt.ConnectionLost` when the connection drops, and the caller retries.

Reconnection (on by default) uses exponential backoff with jitter, so a fleet cut off by one outage
does not reconnect in lock-step. A reconnect the hub refuses (a CONNACK code, e.g. 5 for a revoked
certificate) goes to the :meth:`HubClient.on_refused` callbacks, which may end the reconnecting (the
device agent does, to re-provision through DPS); without one, it is retried like a network failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random
import ssl
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from cryptography import x509 as cx509

from opendps.device.keys import certificate_summary, certificates_from_b64
from opendps.device.mqtt import (
    AckTimeout,
    ConnectionLost,
    ConnectRefused,
    MqttClient,
    MqttError,
    client_ssl_context,
    response_status,
    topic_query,
)
from opendps.device.provisioning import KeySigner, SasSigner
from opendps.transport.mqtt.codec import Publish

__all__ = ["C2dMessage", "HubClient", "HubError", "encode_property_bag", "decode_property_bag"]

log = logging.getLogger("opendps.device.hub")

HUB_API_VERSION = "2021-04-12"
TWIN_RES = "$iothub/twin/res/"
DESIRED = "$iothub/twin/PATCH/properties/desired/"
METHODS = "$iothub/methods/POST/"
CREDENTIALS_RES = "$iothub/credentials/res/"

MethodHandler = Callable[[str, Any], "tuple[int, Any] | Awaitable[tuple[int, Any]]"]
DesiredCallback = Callable[[dict], "Awaitable[None] | None"]
C2dCallback = Callable[["C2dMessage"], "Awaitable[None] | None"]
ConnectionCallback = Callable[[bool, "str | None"], None]  # (connected, why it was lost)
RefusedCallback = Callable[[ConnectRefused], "bool | None"]  # True: stop reconnecting (the owner takes over)


class HubError(Exception):
    """The hub answered a twin or renewal request with an error status (body: Azure's error body)."""

    def __init__(self, status: int, error_code: int | None, message: str, body: Any = None) -> None:
        self.status = status
        self.error_code = error_code
        self.message = message
        self.body = body
        super().__init__(f"{status} {error_code}: {message}" if error_code else f"{status}: {message}")


@dataclass
class C2dMessage:
    """A cloud-to-device message; ``system`` holds the ``$.`` properties without the prefix (``mid``, ``to``...)."""

    body: bytes
    system: dict[str, str | None] = field(default_factory=dict)
    properties: dict[str, str | None] = field(default_factory=dict)
    topic: str = ""

    @property
    def message_id(self) -> str | None:
        return self.system.get("mid")

    @property
    def content_type(self) -> str | None:
        return self.system.get("ct")


def encode_property_bag(properties: dict[str, Any] | None = None, *, message_id: str | None = None,
                        correlation_id: str | None = None, content_type: str | None = None,
                        content_encoding: str | None = None) -> str:
    """``%24.mid=..&%24.ct=..&k=v`` as the Azure SDKs write it: every key and value URL-encoded, None = key alone."""
    parts = [f"%24.{name}={quote(value, safe='')}" for name, value in
             (("mid", message_id), ("cid", correlation_id), ("ct", content_type), ("ce", content_encoding))
             if value is not None]
    for key, value in (properties or {}).items():
        parts.append(quote(str(key), safe="") if value is None else f"{quote(str(key), safe='')}={quote(str(value), safe='')}")
    return "&".join(parts)


def decode_property_bag(bag: str) -> tuple[dict[str, str | None], dict[str, str | None]]:
    """Property bag → (system without ``$.``, application); ``iothub-ack`` counts as system property ``ack``."""
    system: dict[str, str | None] = {}
    application: dict[str, str | None] = {}
    for part in bag.split("&"):
        if not part:
            continue
        raw_key, sep, raw_value = part.partition("=")
        key, value = unquote(raw_key), (unquote(raw_value) if sep else None)
        if key.startswith("$."):
            system[key[2:]] = value
        elif key == "iothub-ack":
            system["ack"] = value
        else:
            application[key] = value
    return system, application


def _error(status: int, payload: bytes) -> HubError:
    try:
        body = json.loads(payload) if payload.strip() else None
    except ValueError:
        body = None
    if isinstance(body, dict):
        code = body.get("errorCode")
        return HubError(status, code if isinstance(code, int) else None, str(body.get("message") or ""), body)
    return HubError(status, None, payload[:200].decode("utf-8", "replace"), None)


async def _call(fn: Callable[..., Any], *args: Any) -> Any:
    result = fn(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


@dataclass
class _Outgoing:
    topic: str
    payload: bytes
    done: asyncio.Future


def _one_credential(x509: Any, symmetric_key: str | None, signer: SasSigner | None) -> None:
    if sum(x is not None for x in (x509, symmetric_key, signer)) != 1:
        raise ValueError("give exactly one of x509=, symmetric_key= or signer=")


def _signer(symmetric_key: str | None, signer: SasSigner | None) -> SasSigner | None:
    return KeySigner(symmetric_key) if symmetric_key is not None else signer


#: seconds before a SAS token's expiry that the client reconnects with a fresh one (at most a fifth of its lifetime);
#: Microsoft's Python SDK renews 120 s before
TOKEN_RENEWAL_MARGIN = 120.0


class HubClient:
    """One device's connection to its IoT hub (``hub_host`` is the ``assignedHub`` DPS returned)."""

    def __init__(self, hub_host: str, device_id: str, *, port: int = 8883, ca_file: str | Path | None = None,
                 x509: tuple[str | Path, str | Path] | None = None, symmetric_key: str | None = None,
                 signer: SasSigner | None = None,
                 ssl_context: ssl.SSLContext | None = None, address: str | None = None, keepalive: int = 60,
                 reconnect: bool = True, backoff_base: float = 1.0, backoff_max: float = 60.0, timeout: float = 30.0,
                 renewal_timeout: float = 120.0, api_version: str = HUB_API_VERSION, sas_ttl: int = 3600) -> None:
        _one_credential(x509, symmetric_key, signer)
        self.hub_host = hub_host
        self.device_id = device_id
        self.port = port
        self.ca_file = ca_file
        self.address = address
        self.keepalive = keepalive
        self.reconnect = reconnect
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.timeout = timeout
        self.renewal_timeout = renewal_timeout
        self.api_version = api_version
        self.sas_ttl = sas_ttl
        self._x509 = x509
        self._signer = _signer(symmetric_key, signer)
        self._ssl_context = ssl_context or client_ssl_context(ca_file, *(x509 or (None, None)))
        self._client: MqttClient | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self._switching = False
        self._reconnect_task: asyncio.Task | None = None
        self._sender_task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self._outbox: deque[_Outgoing] = deque()
        self._outbox_changed = asyncio.Event()
        self._twin_waiting: dict[str, asyncio.Future] = {}
        self._credential_waiting: dict[str, asyncio.Queue] = {}
        self._desired: list[DesiredCallback] = []
        self._methods: dict[str | None, MethodHandler] = {}
        self._c2d: C2dCallback | None = None
        self._connection: list[ConnectionCallback] = []
        self._refused: list[RefusedCallback] = []
        self._jobs: asyncio.Queue = asyncio.Queue()
        self._worker_task: asyncio.Task | None = None
        self._filters: set[str] = {TWIN_RES + "#"}
        self._token_renewal: asyncio.TimerHandle | None = None
        self.reconnects = 0
        self.token_renewals = 0  # reconnects made to present a fresh SAS token before the last one expired

    # ---- connection ----
    @property
    def connected(self) -> bool:
        return self._connected.is_set() and self._client is not None and self._client.connected

    @property
    def username(self) -> str:
        return f"{self.hub_host}/{self.device_id}/?api-version={self.api_version}"

    async def connect(self) -> None:
        """Connect and subscribe; raises ConnectRefused (e.g. 5 for an untrusted certificate) without retrying."""
        self._closing = False
        if not self.connected:
            await self._open()
        loop = asyncio.get_running_loop()
        if self._sender_task is None or self._sender_task.done():
            self._sender_task = loop.create_task(self._send_loop(), name=f"hub-send:{self.device_id}")
        if self._worker_task is None or self._worker_task.done():
            self._worker_task = loop.create_task(self._callback_worker(), name=f"hub-callbacks:{self.device_id}")

    async def disconnect(self) -> None:
        """Clean DISCONNECT; queued telemetry stays queued for a later :meth:`connect`."""
        self._closing = True
        for task in (self._reconnect_task, self._sender_task, self._worker_task, *self._background):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        self._reconnect_task = self._sender_task = self._worker_task = None
        self._cancel_token_renewal()
        if self._client is not None:
            await self._client.disconnect()
        self._connected.clear()

    async def switch_credentials(self, *, x509: tuple[str | Path, str | Path] | None = None,
                                 symmetric_key: str | None = None, signer: SasSigner | None = None,
                                 ssl_context: ssl.SSLContext | None = None, fallback: bool = True) -> None:
        """Reconnect with new credentials (a renewed certificate). If the hub refuses them, the old ones are
        reconnected and the error is raised, so the caller can roll its :class:`CertificateStore` back.
        Queued telemetry is kept and sent on whichever connection comes up.

        ``fallback=False``: the old credentials are known to be refused (a revoked certificate): the client keeps
        the new ones even if the hub refuses them, raises, and schedules no reconnect (the caller retries)."""
        _one_credential(x509, symmetric_key, signer)
        old = (self._x509, self._signer, self._ssl_context)
        self._switching = True
        try:
            if self._reconnect_task is not None:
                self._reconnect_task.cancel()
                self._reconnect_task = None
            if self._client is not None:
                await self._client.disconnect()
            self._x509, self._signer = x509, _signer(symmetric_key, signer)
            self._ssl_context = ssl_context or client_ssl_context(self.ca_file, *(x509 or (None, None)))
            try:
                await self._open()
            except Exception:
                if not fallback:
                    raise
                self._x509, self._signer, self._ssl_context = old
                try:
                    await self._open()
                except (MqttError, OSError, TimeoutError):
                    self._schedule_reconnect()
                raise
        finally:
            self._switching = False

    async def _open(self) -> None:
        password = None
        self._cancel_token_renewal()
        if self._signer is not None:  # a fresh token for every CONNECT (reconnects too)
            password = self._signer.sas_token(f"{self.hub_host}/devices/{self.device_id}", int(time.time()) + self.sas_ttl)
        client = MqttClient(self.hub_host, self.port, self.device_id, username=self.username, password=password,
                            ssl_context=self._ssl_context, address=self.address, keepalive=self.keepalive,
                            clean_session=False, on_message=self._on_message, on_disconnect=self._on_disconnect,
                            timeout=self.timeout, auto_ack=False)
        await client.connect()
        self._client = client
        try:
            await self._subscribe(sorted(self._filters))
        except BaseException:
            await client.disconnect()
            raise
        self._connected.set()
        if password is not None:
            self._token_renewal = asyncio.get_running_loop().call_later(
                self.sas_ttl - min(TOKEN_RENEWAL_MARGIN, self.sas_ttl / 5), self._renew_token)

    def _cancel_token_renewal(self) -> None:
        if self._token_renewal is not None:
            self._token_renewal.cancel()
            self._token_renewal = None

    def _renew_token(self) -> None:
        """The SAS token nears its expiry: reconnect with a fresh one, as Microsoft's SDKs do (IoT Hub closes a
        connection whose token expired, and opendps' hub does too). Subscriptions are made again; queued telemetry
        stays queued and goes out on the new connection; a twin request in flight fails with ConnectionLost."""
        self._token_renewal = None
        if self._closing or self._switching or not self.connected:
            return  # disconnected meanwhile: the next CONNECT signs a fresh token anyway
        self._spawn(self._reconnect_for_token())

    async def _reconnect_for_token(self) -> None:
        self._switching = True  # the DISCONNECT below is ours: no reconnect loop, no "connection lost" callback
        try:
            if self._client is not None:
                await self._client.disconnect()
            await self._open()
            self.token_renewals += 1
        except ConnectRefused as exc:
            log.info("%s: reconnect with a renewed SAS token refused: %s", self.device_id, exc)
            if not self._notify_refused(exc) and self.reconnect:
                self._schedule_reconnect()
        except (MqttError, OSError, TimeoutError) as exc:
            log.info("%s: reconnect with a renewed SAS token failed: %s; retrying", self.device_id, exc)
            if self.reconnect:
                self._schedule_reconnect()
        finally:
            self._switching = False

    async def _subscribe(self, filters: list[str]) -> None:
        if not filters or self._client is None:
            return
        codes = await self._client.subscribe(*filters, qos=1)
        refused = [f for f, code in zip(filters, codes, strict=False) if code == 0x80]
        if refused:
            raise MqttError(f"hub refused subscription(s) {refused}")

    def _on_disconnect(self, error: Exception | None) -> None:
        self._connected.clear()
        lost = ConnectionLost(f"connection to the hub lost: {error}")
        for future in self._twin_waiting.values():
            if not future.done():
                future.set_exception(lost)
        for queue in self._credential_waiting.values():
            queue.put_nowait(lost)
        if error is not None and not self._closing and not self._switching:
            self._notify_connection(False, str(error))
            if self.reconnect:
                log.info("%s: connection lost (%s); reconnecting", self.device_id, error)
                self._schedule_reconnect()

    def _notify_connection(self, connected: bool, reason: str | None) -> None:
        for callback in list(self._connection):
            try:
                callback(connected, reason)
            except Exception:
                log.exception("%s: connection callback failed", self.device_id)

    def _notify_refused(self, exc: ConnectRefused) -> bool:
        stop = False
        for callback in list(self._refused):
            try:
                stop = bool(callback(exc)) or stop
            except Exception:
                log.exception("%s: refused callback failed", self.device_id)
        return stop

    def _schedule_reconnect(self) -> None:
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect_loop(),
                                                                          name=f"hub-reconnect:{self.device_id}")

    def _backoff(self, attempt: int) -> float:
        """Exponential with jitter; the exponent is capped (``2 ** 1024`` overflows a float: after ~1000 refused
        reconnects, some 17 hours of an outage at the default 60 s ceiling, the reconnect task died and the client
        never came back)."""
        ceiling = min(self.backoff_max, self.backoff_base * 2.0 ** min(attempt, 64))
        return random.uniform(ceiling / 2, ceiling)

    async def _reconnect_loop(self) -> None:
        attempt = 0
        while not self._closing:
            await asyncio.sleep(self._backoff(attempt))
            try:
                await self._open()
            except ConnectRefused as exc:
                log.info("%s: reconnect attempt %d refused: %s", self.device_id, attempt + 1, exc)
                if self._notify_refused(exc):
                    return  # an on_refused callback took over (e.g. re-provisioning a revoked certificate)
                attempt += 1
                continue
            except (MqttError, OSError, TimeoutError) as exc:
                log.info("%s: reconnect attempt %d failed: %s", self.device_id, attempt + 1, exc)
                attempt += 1
                continue
            self.reconnects += 1
            self._notify_connection(True, None)
            return

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _ensure_filter(self, topic_filter: str) -> None:
        if topic_filter not in self._filters:
            self._filters.add(topic_filter)
            if self.connected:
                self._spawn(self._subscribe([topic_filter]))

    # ---- telemetry ----
    def queue_telemetry(self, body: bytes | str | dict | list, properties: dict[str, Any] | None = None, *,
                        content_type: str | None = None, content_encoding: str | None = None,
                        message_id: str | None = None, correlation_id: str | None = None) -> asyncio.Future:
        """Put a message in the outgoing queue; the future completes when the hub acknowledged it.

        A dict or list body is sent as JSON (content type application/json, encoding utf-8 unless given).
        """
        if isinstance(body, dict | list):
            payload = json.dumps(body).encode()
            content_type = content_type or "application/json"
            content_encoding = content_encoding or "utf-8"
        else:
            payload = body.encode() if isinstance(body, str) else bytes(body)
        bag = encode_property_bag(properties, message_id=message_id, correlation_id=correlation_id,
                                  content_type=content_type, content_encoding=content_encoding)
        done = asyncio.get_running_loop().create_future()
        self._outbox.append(_Outgoing(f"devices/{self.device_id}/messages/events/{bag}", payload, done))
        self._outbox_changed.set()
        return done

    async def send_telemetry(self, body: bytes | str | dict | list, properties: dict[str, Any] | None = None,
                             content_type: str | None = None, message_id: str | None = None, *,
                             content_encoding: str | None = None, correlation_id: str | None = None,
                             timeout: float | None = None) -> None:
        """Queue a message and wait for its PUBACK (``timeout`` None = as long as it takes; it stays queued anyway)."""
        done = self.queue_telemetry(body, properties, content_type=content_type, content_encoding=content_encoding,
                                    message_id=message_id, correlation_id=correlation_id)
        await asyncio.wait_for(asyncio.shield(done), timeout)

    @property
    def pending_telemetry(self) -> int:
        """Messages not yet acknowledged by the hub."""
        return len(self._outbox)

    async def _send_loop(self) -> None:
        while True:
            if not self._outbox:
                self._outbox_changed.clear()
                await self._outbox_changed.wait()
                continue
            await self._connected.wait()
            item, client = self._outbox[0], self._client
            if client is None:
                continue
            try:
                await client.publish(item.topic, item.payload, qos=1)
            except AckTimeout as exc:
                await client.close(ConnectionLost(str(exc)))  # a silent connection: reconnect, then resend
                continue
            except (ConnectionLost, MqttError, OSError):
                if self._client is client and not client.connected:
                    self._connected.clear()  # resend once a connection is up again
                await asyncio.sleep(0)
                continue
            self._outbox.popleft()
            if not item.done.done():
                item.done.set_result(None)

    # ---- twin ----
    async def _twin_request(self, topic: str, payload: bytes) -> tuple[int, dict[str, str], bytes]:
        if not self.connected or self._client is None:
            raise ConnectionLost("not connected to the hub")
        rid = uuid.uuid4().hex[:16]
        future = asyncio.get_running_loop().create_future()
        self._twin_waiting[rid] = future
        try:
            await self._client.publish(f"{topic}?$rid={rid}", payload, qos=1)
            return await asyncio.wait_for(future, self.timeout)
        finally:
            self._twin_waiting.pop(rid, None)

    async def get_twin(self) -> dict:
        """``{"desired": {..., "$version"}, "reported": {..., "$version"}}``."""
        status, _, payload = await self._twin_request("$iothub/twin/GET/", b" ")
        if status != 200:
            raise _error(status, payload)
        return json.loads(payload)

    async def patch_reported(self, patch: dict) -> int:
        """JSON merge patch of the reported properties (None deletes); returns the new reported version."""
        status, query, payload = await self._twin_request("$iothub/twin/PATCH/properties/reported/", json.dumps(patch).encode())
        if status not in (200, 204):
            raise _error(status, payload)
        return int(query.get("$version", "0"))

    async def report_certificate(self, cert: cx509.Certificate) -> int:
        """Report ``{"certificate": {validFrom, validUntil, serialNumber, thumbprint, issuer}}`` so operators see expiry."""
        return await self.patch_reported({"certificate": certificate_summary(cert)})

    # ---- callbacks ----
    def on_desired(self, callback: DesiredCallback) -> None:
        """Call ``callback(patch)`` (with ``$version``) for every desired-properties change pushed while connected."""
        self._desired.append(callback)
        self._ensure_filter(DESIRED + "#")

    def on_method(self, name: str | None, handler: MethodHandler) -> None:
        """Answer direct method ``name`` (None = any other) with ``handler(name, payload) -> (status, payload)``."""
        self._methods[name] = handler
        self._ensure_filter(METHODS + "#")

    def on_connection(self, callback: ConnectionCallback) -> None:
        """Call ``callback(False, reason)`` when the connection is lost and ``callback(True, None)`` when it is back.

        Only unplanned changes: :meth:`connect`, :meth:`disconnect` and :meth:`switch_credentials` say nothing.
        """
        self._connection.append(callback)

    def on_refused(self, callback: RefusedCallback) -> None:
        """Call ``callback(ConnectRefused)`` when the hub refuses a reconnect with a CONNACK code (not for a network
        failure, nor for :meth:`connect` and :meth:`switch_credentials`, which raise it). A callback that returns
        True ends the reconnecting: the client stays disconnected until :meth:`connect` or :meth:`switch_credentials`;
        otherwise the client retries with its backoff."""
        self._refused.append(callback)

    def on_c2d(self, callback: C2dCallback) -> None:
        """Receive cloud-to-device messages; a message is acknowledged (removed at the hub) after the callback."""
        self._c2d = callback
        self._ensure_filter(f"devices/{self.device_id}/messages/devicebound/#")

    # ---- renewal (wire spec §6.6) ----
    async def renew_certificate(self, csr_b64: str, *, replace: str | None = None) -> list[cx509.Certificate]:
        """Ask the hub for a new operational certificate; returns [leaf, issuing CA, root]. Raises HubError."""
        topic_filter = CREDENTIALS_RES + "#"
        if topic_filter not in self._filters:
            self._filters.add(topic_filter)
            if self.connected:
                await self._subscribe([topic_filter])
        if not self.connected or self._client is None:
            raise ConnectionLost("not connected to the hub")
        rid = str(uuid.uuid4())
        queue: asyncio.Queue = asyncio.Queue()
        self._credential_waiting[rid] = queue
        body: dict[str, str] = {"id": self.device_id, "csr": csr_b64}
        if replace is not None:
            body["replace"] = replace
        try:
            await self._client.publish(f"$iothub/credentials/POST/issueCertificate/?$rid={rid}", json.dumps(body).encode(),
                                       qos=1)
            deadline = asyncio.get_running_loop().time() + self.renewal_timeout
            while True:
                remaining = deadline - asyncio.get_running_loop().time()
                try:
                    item = await asyncio.wait_for(queue.get(), max(remaining, 0))
                except TimeoutError:
                    raise TimeoutError(f"no certificate from the hub within {self.renewal_timeout:g} s") from None
                if isinstance(item, Exception):
                    raise item
                status, payload = item
                if status == 202:
                    continue
                if status == 200:
                    return certificates_from_b64(json.loads(payload)["certificates"])
                raise _error(status, payload)
        finally:
            self._credential_waiting.pop(rid, None)

    # ---- incoming ----
    async def _on_message(self, message: Publish) -> None:
        """Runs in the MQTT dispatch loop: answers go to their waiters at once, user code goes to the worker.

        User callbacks never run here, because one that awaits a twin request would wait for a
        response queued behind itself. A C2D message is acknowledged only after its callback ran.
        """
        client, topic = self._client, message.topic
        if topic.startswith(f"devices/{self.device_id}/messages/devicebound"):
            _, _, bag = topic.partition("/devicebound/")
            system, properties = decode_property_bag(bag)
            self._jobs.put_nowait((self._c2d, C2dMessage(message.payload, system, properties, topic), client, message))
            return
        if client is not None:
            await client.ack(message)
        if topic.startswith(TWIN_RES):
            future = self._twin_waiting.get(topic_query(topic).get("$rid", ""))
            if future is not None and not future.done():
                future.set_result((response_status(topic, TWIN_RES), topic_query(topic), message.payload))
        elif topic.startswith(CREDENTIALS_RES):
            queue = self._credential_waiting.get(topic_query(topic).get("$rid", ""))
            if queue is not None:
                queue.put_nowait((response_status(topic, CREDENTIALS_RES), message.payload))
        elif topic.startswith(DESIRED):
            try:
                patch = json.loads(message.payload)
            except ValueError:
                log.warning("%s: desired patch is not JSON; ignored", self.device_id)
                return
            for callback in list(self._desired):
                self._jobs.put_nowait((callback, patch, None, None))
        elif topic.startswith(METHODS):
            name, _, _ = topic[len(METHODS):].partition("/")
            self._spawn(self._answer_method(name, topic_query(topic).get("$rid", ""), message.payload))
        else:
            log.debug("%s: message on unexpected topic %r ignored", self.device_id, topic)

    async def _callback_worker(self) -> None:
        """Runs desired and C2D callbacks one at a time, in arrival order; acknowledges C2D afterwards."""
        while True:
            callback, argument, client, message = await self._jobs.get()
            try:
                if callback is not None:
                    await _call(callback, argument)
            except Exception:
                log.exception("%s: callback failed", self.device_id)
            if client is not None and message is not None:
                await client.ack(message)  # after a reconnect this is a no-op: the hub redelivers

    async def _answer_method(self, name: str, rid: str, payload: bytes) -> None:
        handler = self._methods.get(name) or self._methods.get(None)
        if handler is None:
            status, answer = 404, {"message": f"method {name!r} is not implemented by this device"}
        else:
            try:
                argument = json.loads(payload) if payload.strip() else None
                status, answer = await _call(handler, name, argument)
            except Exception as exc:
                log.exception("%s: method %r failed", self.device_id, name)
                status, answer = 500, {"message": f"{type(exc).__name__}: {exc}"}
        client = self._client
        if client is not None and client.connected:
            with contextlib.suppress(MqttError, OSError):
                await client.publish(f"$iothub/methods/res/{int(status)}/?$rid={rid}", json.dumps(answer).encode(), qos=1)
