"""DPS device registration (wire spec §1-§4) over HTTPS or MQTT, with a CSR for an operational certificate.

Attestation: ``x509=(chain file, key file)`` presents the bootstrap chain in the TLS handshake;
``symmetric_key=`` signs Azure's SAS (``sr={idScope}/registrations/{id}``, ``skn=registration``);
``group_key=`` derives the device key locally (base64(HMAC-SHA256(group key, registration id))), so
the group key is the only secret a fleet image carries. ``tpm=`` (a :class:`~opendps.device.tpm.DeviceTpm`;
HTTPS only, as Azure DPS) sends ``tpm{endorsementKey, storageRootKey}``; DPS answers 401 with an
``authenticationKey`` that only this TPM can open, the key it carries is imported into the TPM (never leaving
it) and the register is sent again with a SAS the TPM signs; polls are signed by the TPM too; on ``assigned``,
``registrationState.tpm.authenticationKey`` (the hub key) is imported the same way — wire spec §3.4.

Flow: register (``PUT .../register`` or ``$dps/registrations/PUT/iotdps-register/``), then poll the
operation while it is ``assigning``, honouring the service's ``Retry-After`` (integer seconds,
clamped to ``[min_wait, max_wait]``: at least 1 s by default, smaller in tests). 429, 5xx and
connection errors are retried ``max_retries`` times with exponential backoff and jitter, so a fleet
that reboots at once does not hammer the service in lock-step; a 429 or 5xx with ``Retry-After`` (a 503
for a database outage says 5 s) is retried no sooner than it says, plus up to a fifth more of jitter, and
when the retries run out :attr:`ProvisioningError.retry_after` keeps it for the caller's own backoff.
A refusal (400/401/403/404...) or a ``failed`` operation raises :class:`ProvisioningError` with the
service's error code and message.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar
from urllib.parse import quote

import httpx
from cryptography import x509 as cx509

from opendps.device.keys import certificates_from_b64, derive_device_key
from opendps.device.mqtt import (
    ConnectionLost,
    ConnectRefused,
    MqttClient,
    MqttError,
    client_ssl_context,
    response_status,
    topic_query,
)
from opendps.transport import sas
from opendps.transport.mqtt.codec import Publish

if TYPE_CHECKING:
    from opendps.device.tpm import DeviceTpm

__all__ = [
    "DEFAULT_API_VERSION",
    "PREVIEW_API_VERSION",
    "KeySigner",
    "ProvisioningClient",
    "ProvisioningError",
    "RegistrationResult",
    "SasSigner",
]

PREVIEW_API_VERSION = "2025-07-01-preview"  # needed for "csr" / issuedCertificateChain
DEFAULT_API_VERSION = "2021-06-01"
USER_AGENT = "opendps-device/0.1"
RESPONSE_PREFIX = "$dps/registrations/res/"
T = TypeVar("T")


class SasSigner(Protocol):
    """Whatever signs the device's SAS tokens (DPS ``registration`` and hub ``devices/{id}``): a key in memory
    (:class:`KeySigner`) or a TPM-held key (:class:`~opendps.device.tpm.DeviceTpm`)."""

    def sas_token(self, resource_uri: str, expiry: int, key_name: str | None = None) -> str:
        """A ``SharedAccessSignature`` for ``resource_uri`` (unencoded) valid until ``expiry`` (Unix seconds)."""
        ...


class KeySigner:
    """A :class:`SasSigner` with a base64 symmetric key in memory."""

    def __init__(self, key_b64: str) -> None:
        self.key = key_b64

    def sas_token(self, resource_uri: str, expiry: int, key_name: str | None = None) -> str:
        return sas.token(resource_uri, sas.sign(self.key, f"{quote(resource_uri, safe='')}\n{expiry}"), expiry, key_name)


class ProvisioningError(Exception):
    """DPS refused or failed the registration.

    ``status`` is the HTTP (or MQTT response topic) status; for a ``failed`` operation it is the
    first three digits of ``error_code`` (Azure's six-digit codes start with the HTTP status). ``retry_after``:
    the seconds the service asked for in its last retryable answer, when the retries ran out (None otherwise).
    """

    def __init__(self, status: int, error_code: int | None, message: str, body: dict | None = None,
                 retry_after: float | None = None) -> None:
        self.status = status
        self.error_code = error_code
        self.message = message
        self.body = body or {}
        self.retry_after = retry_after
        super().__init__(f"{status} {error_code}: {message}" if error_code else f"{status}: {message}")


class _Retryable(Exception):
    """A transient failure: 429, 5xx (``status``) or a connection error (reported as 503)."""

    def __init__(self, message: str, retry_after: int | None = None, status: int = 503) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status


@dataclass
class RegistrationResult:
    """An ``assigned`` registration. ``issued_chain`` is [leaf, issuing CA, root] when a CSR was sent."""

    status: str
    assigned_hub: str | None
    device_id: str | None
    substatus: str | None
    payload: Any
    issued_chain: list[cx509.Certificate] = field(default_factory=list)
    raw: dict = field(default_factory=dict)


def _retry_after(value: str | None) -> int | None:
    """Integer seconds or None (an HTTP date or a fraction is ignored, as the Azure SDKs do)."""
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None


def _error_from(status: int, body: Any, fallback: str) -> ProvisioningError:
    if isinstance(body, dict):
        code = body.get("errorCode")
        return ProvisioningError(status, code if isinstance(code, int) else None,
                                 str(body.get("message") or body.get("errorMessage") or fallback), body)
    return ProvisioningError(status, None, fallback)


class ProvisioningClient:
    """Registers one device with DPS; create one per registration id (cheap; share ``ssl_context`` in fleets)."""

    def __init__(self, host: str, id_scope: str, registration_id: str, *, https_port: int = 443, mqtt_port: int = 8883,
                 ca_file: str | Path | None = None, transport: Literal["https", "mqtt"] = "https",
                 x509: tuple[str | Path, str | Path] | None = None, symmetric_key: str | None = None,
                 group_key: str | None = None, tpm: DeviceTpm | None = None, tpm_key_file: str | Path | None = None,
                 ssl_context: ssl.SSLContext | None = None, api_version: str | None = None,
                 max_retries: int = 5, backoff_base: float = 1.0, backoff_max: float = 30.0, min_wait: float = 1.0,
                 max_wait: float = 300.0, timeout: float = 30.0, poll_timeout: float = 300.0,
                 sas_ttl: int = 3600) -> None:
        if sum(x is not None for x in (x509, symmetric_key, group_key, tpm)) != 1:
            raise ValueError("give exactly one of x509=, symmetric_key=, group_key= or tpm=")
        if transport not in ("https", "mqtt"):
            raise ValueError(f"transport must be 'https' or 'mqtt', got {transport!r}")
        if tpm is not None and transport != "https":
            raise ValueError("TPM attestation works over HTTPS only (Azure DPS has no TPM over MQTT): use "
                             "transport='https'")
        if tpm_key_file is not None and tpm is None:
            raise ValueError("tpm_key_file= goes with tpm=")
        self.host = host
        self.id_scope = id_scope
        self.registration_id = registration_id
        self.https_port = https_port
        self.mqtt_port = mqtt_port
        self.transport = transport
        self.device_key = derive_device_key(group_key, registration_id) if group_key is not None else symmetric_key
        self.tpm = tpm
        self.tpm_key_file = Path(tpm_key_file) if tpm_key_file is not None else None
        self._signer: SasSigner | None = KeySigner(self.device_key) if self.device_key is not None else None
        self.ssl_context = ssl_context or client_ssl_context(ca_file, *(x509 or (None, None)))
        self.api_version = api_version
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.min_wait = min_wait
        self.max_wait = max_wait
        self.timeout = timeout
        self.poll_timeout = poll_timeout
        self.sas_ttl = sas_ttl

    # ---- public ----
    async def register(self, csr_b64: str | None = None, payload: Any = None) -> RegistrationResult:
        """Register (sending ``csr_b64`` if given) and wait for the outcome; raises ProvisioningError."""
        api_version = self.api_version or (PREVIEW_API_VERSION if csr_b64 else DEFAULT_API_VERSION)
        body: dict[str, Any] = {"registrationId": self.registration_id, "payload": payload}
        if csr_b64 is not None:
            body["csr"] = csr_b64
        if self.tpm is not None:
            body["tpm"] = {"endorsementKey": self.tpm.endorsement_key(), "storageRootKey": self.tpm.storage_root_key()}
            self._signer = None  # until this registration's challenge is activated: the first request has no SAS
        if self.transport == "https":
            doc = await self._register_https(body, api_version)
        else:
            doc = await self._register_mqtt(body, api_version)
        return self._result(doc)

    # ---- shared ----
    def _sas(self) -> str | None:
        if self._signer is None:
            return None
        return self._signer.sas_token(f"{self.id_scope}/registrations/{self.registration_id}",
                                      int(time.time()) + self.sas_ttl, "registration")

    def _activate(self, blob: str, what: str) -> None:
        """Open a DPS ``authenticationKey`` in the TPM: its key stays there (and in ``tpm_key_file``, wrapped)."""
        from opendps.device.tpm import TpmError

        assert self.tpm is not None
        try:
            self.tpm.activate(blob, key_file=self.tpm_key_file)
        except TpmError as exc:
            raise ProvisioningError(401, None, f"the TPM cannot open the {what}: {exc}") from exc
        self._signer = self.tpm

    def _clamp(self, seconds: float | None, default: float = 2.0) -> float:
        return min(self.max_wait, max(self.min_wait, default if seconds is None else seconds))

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.backoff_max, self.backoff_base * 2.0 ** min(attempt, 64))  # 2 ** 1024 overflows a float
        return random.uniform(ceiling / 2, ceiling)

    def _retry_wait(self, attempt: int, retry_after: int | None) -> float:
        """The backoff, but never sooner than the service's Retry-After (with jitter: a fleet told "5 s" at once
        must not come back in the same instant)."""
        backoff = self._backoff(attempt)
        if retry_after is None:
            return backoff
        return max(backoff, self._clamp(retry_after) * random.uniform(1.0, 1.2))

    async def _with_retries(self, attempt_fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt_fn`` until it returns or raises a non-retryable error; bounded, with backoff + jitter."""
        for attempt in range(self.max_retries + 1):
            try:
                return await attempt_fn()
            except _Retryable as exc:
                if attempt == self.max_retries:
                    raise ProvisioningError(exc.status, None, f"giving up after {attempt + 1} attempts: {exc}",
                                            retry_after=exc.retry_after) from exc
                await asyncio.sleep(self._retry_wait(attempt, exc.retry_after))
        raise AssertionError("unreachable")

    def _result(self, doc: dict) -> RegistrationResult:
        status = doc.get("status")
        state = doc.get("registrationState") or {}
        if status == "assigned":
            if self.tpm is not None:
                hub_key = (state.get("tpm") or {}).get("authenticationKey") if isinstance(state.get("tpm"), dict) else None
                if not hub_key:  # as the Azure SDKs: without it the device has no key for its hub
                    raise ProvisioningError(502, None, "DPS assigned the TPM device without "
                                                       "registrationState.tpm.authenticationKey (the hub key)", doc)
                self._activate(hub_key, "hub key (registrationState.tpm.authenticationKey)")
            return RegistrationResult(status, state.get("assignedHub"), state.get("deviceId"), state.get("substatus"),
                                      state.get("payload"), certificates_from_b64(state.get("issuedCertificateChain") or []),
                                      doc)
        code = state.get("errorCode")
        code = code if isinstance(code, int) else None
        http_status = code // 1000 if code else (403 if status == "disabled" else 400)
        raise ProvisioningError(http_status, code, str(state.get("errorMessage") or f"registration {status}"), doc)

    async def _poll(self, first: dict, retry_after: int | None, fetch: Callable[[str], Awaitable[tuple[dict, int | None]]]
                    ) -> dict:
        doc = first
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.poll_timeout
        while doc.get("status") in ("assigning", "unassigned"):
            operation_id = doc.get("operationId")
            if not operation_id:
                raise ProvisioningError(502, None, "DPS answered without an operationId", doc)
            if loop.time() >= deadline:
                raise ProvisioningError(408, None, f"registration still {doc.get('status')} after {self.poll_timeout:g} s",
                                        doc)
            await asyncio.sleep(self._clamp(retry_after))
            doc, retry_after = await fetch(operation_id)
        return doc

    # ---- HTTPS ----
    async def _register_https(self, body: dict, api_version: str) -> dict:
        base = f"/{quote(self.id_scope, safe='')}/registrations/{quote(self.registration_id, safe='')}"
        params = {"api-version": api_version}
        async with httpx.AsyncClient(base_url=f"https://{self.host}:{self.https_port}", verify=self.ssl_context,
                                     timeout=self.timeout, headers={"User-Agent": USER_AGENT}) as client:

            async def request(method: str, path: str, json_body: dict | None = None) -> tuple[dict, int | None]:
                async def attempt() -> tuple[dict, int | None]:
                    headers = {"Accept": "application/json"}
                    if (token := self._sas()) is not None:
                        headers["Authorization"] = token
                    try:
                        r = await client.request(method, base + path, params=params, json=json_body, headers=headers)
                    except httpx.TransportError as exc:
                        raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
                    retry_after = _retry_after(r.headers.get("Retry-After"))
                    try:
                        doc = r.json()
                    except ValueError:
                        doc = None
                    if r.status_code == 429 or r.status_code >= 500:
                        raise _Retryable(f"HTTP {r.status_code}", retry_after, r.status_code)
                    if r.status_code not in (200, 202) or not isinstance(doc, dict):
                        raise _error_from(r.status_code, doc, r.text[:200] or r.reason_phrase)
                    return doc, retry_after

                return await self._with_retries(attempt)

            try:
                first, retry_after = await request("PUT", "/register", body)
            except ProvisioningError as exc:
                challenge = exc.body.get("authenticationKey")
                if self.tpm is None or exc.status != 401 or not challenge or self._signer is not None:
                    raise
                self._activate(str(challenge), "DPS challenge (authenticationKey)")
                first, retry_after = await request("PUT", "/register", body)  # now with the TPM-signed SAS
            return await self._poll(first, retry_after,
                                    lambda op: request("GET", f"/operations/{quote(op, safe='')}"))

    # ---- MQTT ----
    async def _register_mqtt(self, body: dict, api_version: str) -> dict:
        waiting: dict[str, asyncio.Future] = {}

        def on_message(message: Publish) -> None:
            if not message.topic.startswith(RESPONSE_PREFIX):
                return
            fields = topic_query(message.topic)
            future = waiting.get(fields.get("$rid", ""))
            if future is not None and not future.done():
                future.set_result((response_status(message.topic, RESPONSE_PREFIX), fields, message.payload))

        username = (f"{self.id_scope}/registrations/{self.registration_id}/api-version={quote(api_version, safe='')}"
                    f"&ClientVersion={quote(USER_AGENT, safe='')}")
        client = MqttClient(self.host, self.mqtt_port, self.registration_id, username=username,
                            ssl_context=self.ssl_context, on_message=on_message, timeout=self.timeout)

        async def request(topic: str, payload: bytes, query: str = "") -> tuple[dict, int | None]:
            async def attempt() -> tuple[dict, int | None]:
                try:
                    if not client.connected:
                        client.password = (self._sas() or "").encode() or None
                        await client.connect()
                        await client.subscribe(RESPONSE_PREFIX + "#")
                    rid = str(uuid.uuid4())
                    waiting[rid] = asyncio.get_running_loop().create_future()
                    try:
                        await client.publish(f"{topic}?$rid={rid}{query}", payload, qos=1)
                        status, fields, raw = await asyncio.wait_for(waiting[rid], self.timeout)
                    finally:
                        waiting.pop(rid, None)
                except ConnectRefused as exc:
                    if exc.return_code in (4, 5):
                        raise ProvisioningError(401, None, str(exc)) from exc
                    raise _Retryable(str(exc)) from exc
                except (ConnectionLost, MqttError, OSError, TimeoutError) as exc:
                    if client.connected:
                        await client.disconnect()
                    raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
                try:
                    doc = json.loads(raw) if raw.strip() else None
                except ValueError:
                    doc = None
                retry_after = _retry_after(fields.get("retry-after"))
                if status == 429 or status >= 500:
                    raise _Retryable(f"status {status}", retry_after, status)
                if status not in (200, 202) or not isinstance(doc, dict):
                    raise _error_from(status, doc, raw[:200].decode("utf-8", "replace"))
                return doc, retry_after

            return await self._with_retries(attempt)

        try:
            first, retry_after = await request("$dps/registrations/PUT/iotdps-register/", json.dumps(body).encode())
            return await self._poll(first, retry_after, lambda op: request(
                "$dps/registrations/GET/iotdps-get-operationstatus/", b" ", f"&operationId={quote(op, safe='')}"))
        finally:
            await client.disconnect()
