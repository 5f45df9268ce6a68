"""The long-running device agent: onboard once, stay connected, renew the operational certificate in time.

What a device runs as its main loop (the seed's "Certificate Renewal": the device watches ``validUntil``
itself, the service sends no reminder). :class:`DeviceAgent` ties the SDK together:

1. **Onboarding** — if the :class:`~opendps.device.store.CertificateStore` holds no usable set, register
   with DPS using the bootstrap credential (X.509, symmetric key or group key) and a CSR for a fresh
   P-384 key; the issued chain is stored and the assignment (hub, device id) kept in ``agent.json`` next
   to it.
2. **Operation** — connect to the assigned hub with the operational chain, report the certificate summary
   in the twin (``{"certificate": {...}}``), answer methods / desired / C2D through the user's callbacks
   and send telemetry at an interval. The agent answers two methods of its own, ``getStatus`` (its
   :class:`AgentStatus`) and ``renewCertificate`` (starts a renewal and answers 202 at once: the renewal
   reconnects, and a hub fails a method whose device disconnects before answering); the user's methods
   of the same name take precedence.
3. **Renewal** — at the renewal time (see :func:`renewal_due_time`, minus a per-certificate random
   jitter so a fleet issued at once does not renew at once): new key + CSR, a new chain from DPS
   (``renewal_method="dps"``, the seed's method) or from the hub's ``$iothub/credentials`` topic
   (``"hub"``), ``save`` (the previous set is kept), ``switch_credentials`` on the live hub client
   (queued telemetry stays queued), then ``confirm`` — or ``rollback`` if the hub refuses the new
   certificate. Failures keep the old certificate and retry with exponential backoff and jitter;
   :attr:`DeviceAgent.status` says what happened (last renewal, next renewal, last error). A certificate issued
   while the hub cannot be reached (neither it nor the old one connects) is kept, as the store's pending set (a
   restart tries it first), and switched to as soon as the hub client reconnects, rather than asking for another
   one at every attempt; nothing is asked for while the store cannot be written (a full or read-only disk).
4. **Re-provisioning** — when the hub refuses the certificate in use with CONNACK 5 (not authorized: revoked,
   superseded, or the hub identity was disabled or deleted; a revocation also closes the live session, and
   the reconnect is refused), the agent registers again with DPS with its onboarding credential (never
   deleted) and a fresh key and CSR, stores the new set, connects with it and reports the re-provisioning in
   the twin (``{"reprovisioning": {...}}``) and as events. Other refusals do not re-provision: an unreachable
   hub (a network error), CONNACK 2 (identifier rejected: the client id and user name the agent builds from
   the assignment disagree, which a new certificate does not change), 4 (bad user name or password: the
   agent sends no password, so the hub did not get the certificate — TLS, not the certificate) and 3
   (server unavailable) are retried with backoff and shown in the status. A DPS refusal (401/403/404: the
   enrollment is disabled or deleted) puts the agent in state ``refused`` and backs off; every later attempt
   waits the backoff and first tries the newest certificate again (a device re-enabled connects without a new
   certificate). After ``reprovision_limit`` freshly issued certificates refused in a row the fault is not
   the certificate: the agent stops asking DPS and only retries the connection, backing off (until the
   certificate expires).

Clocks: the schedule is kept in the issuer's time. Devices without a battery-backed clock boot in
1970, and tests move a fake clock: when a certificate arrives and the local clock is not within
``clock_tolerance`` after its notBefore (the issuer's "now" minus its small backdating), the difference
is taken as the offset between the two clocks, so a fresh certificate is never "already due".
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from cryptography import x509 as cx509

from opendps.device.hub import C2dCallback, C2dMessage, DesiredCallback, HubClient, MethodHandler, _call
from opendps.device.keys import Curve, certificate_summary, new_key_and_csr, public_keys_match
from opendps.device.mqtt import ConnectRefused, MqttError
from opendps.device.provisioning import ProvisioningClient, ProvisioningError
from opendps.device.store import TPM_KEY, CertificateStore, StoredCredentials, StoreError
from opendps.transport.mqtt.codec import CONNACK_NOT_AUTHORIZED, CONNACK_SERVER_UNAVAILABLE

if TYPE_CHECKING:
    from opendps.device.tpm import DeviceTpm

__all__ = [
    "AgentConfig",
    "AgentError",
    "AgentStatus",
    "DeviceAgent",
    "renewal_due_time",
]

log = logging.getLogger("opendps.device.agent")

TPM_KEY_FILE = TPM_KEY  # in store_dir: the TPM-held DPS/hub key, wrapped by the TPM's SRK (useless elsewhere)

RenewalMethod = Literal["dps", "hub"]
EventCallback = Callable[[str, "AgentStatus", dict[str, Any]], None]
"""``(event, status, details)``. Lifecycle events (provisioned, connected, switching, renewed, rolled-back,
renewal-failed, certificate-refused, reprovisioned, reprovision-failed) have empty details; traffic events say what
happened: ``method`` (method, request, status), ``c2d`` (messageId, body, properties), ``desired`` (patch),
``disconnected`` (reason), ``reconnected`` (reconnects so far), ``connect-refused`` (returnCode, reason: a refusal
that is not about the certificate, retried)."""
DPS_REFUSALS = (401, 403, 404)  # DPS will not register the device (enrollment disabled, deleted, credential refused)
TelemetrySource = Callable[[int], Any]


class AgentError(Exception):
    """The agent cannot go on as configured (e.g. DPS assigned no certificate chain)."""


_T = TypeVar("_T")


class _Stopped(AgentError):
    """:meth:`DeviceAgent.stop` was called while a request was under way: the request was abandoned."""


@dataclass(frozen=True)
class _Unused:
    """A renewed set stored (the store's pending set) but not used yet: the hub was away when it arrived."""

    credentials: StoredCredentials
    assignment: tuple[str, str]
    offset: timedelta  # the device/issuer clock offset measured when it arrived


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _retry_after(exc: BaseException) -> float | None:
    """The Retry-After a DPS failure carried (503 for a database outage, 429), or None."""
    return exc.retry_after if isinstance(exc, ProvisioningError) else None


def renewal_due_time(cert: cx509.Certificate, renew_before: timedelta = timedelta(days=7),
                     at_fraction: float = 0.8) -> datetime:
    """When a certificate is due for renewal, in the issuer's time (before any jitter).

    ``renew_before`` notAfter (the seed recommends 7 days), but never later than ``at_fraction`` of the
    lifetime. ``renew_before`` only counts when the certificate lives at least twice as long: for
    short-lived certificates (a 1-day policy) "7 days before" would fall before issuance and the
    device would renew in a loop, so they renew at ``at_fraction`` alone (1 day → 19.2 h).
    """
    if not 0 < at_fraction <= 1:
        raise ValueError("at_fraction must be in (0, 1]")
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    lifetime = end - start
    due = start + lifetime * at_fraction
    if renew_before * 2 <= lifetime:
        due = min(due, end - renew_before)
    return due


@dataclass
class AgentConfig:
    """Everything the agent needs; exactly one onboarding credential (X.509 files, symmetric key or group key)."""

    dps_host: str
    id_scope: str
    registration_id: str
    store_dir: str | Path
    https_port: int = 443
    mqtt_port: int = 8883
    ca_file: str | Path | None = None
    x509_cert_file: str | Path | None = None  # bootstrap chain (leaf first) presented to DPS
    x509_key_file: str | Path | None = None
    symmetric_key: str | None = None
    group_key: str | None = None
    tpm: DeviceTpm | None = None  # TPM attestation (HTTPS only); its DPS/hub key file goes to store_dir/tpm-hmac.key
    transport: Literal["https", "mqtt"] = "https"  # for DPS registration
    hub_port: int | None = None  # default: mqtt_port (opendps serves DPS and hub MQTT on one port)
    hub_address: str | None = None  # where to dial when the hub name does not resolve
    renewal_method: RenewalMethod = "dps"
    renew_before: timedelta = timedelta(days=7)
    renew_at_fraction: float = 0.8
    jitter_fraction: float = 0.1  # renew up to this share of the lifetime before the due time
    retry_base: float = 60.0  # seconds; doubled per consecutive failure
    retry_max: float = 3600.0
    reprovision_limit: int = 3  # fresh certificates the hub may refuse in a row before the agent stops asking DPS
    check_interval: float = 3600.0  # re-check the schedule at least this often (clock jumps)
    telemetry_interval: float | None = None  # seconds; None = no periodic telemetry
    curve: Curve = "P-384"
    payload: Any = None  # registration payload sent to DPS
    clock_tolerance: timedelta = timedelta(hours=1)
    provisioning_options: dict[str, Any] = field(default_factory=dict)  # extra ProvisioningClient keywords
    hub_options: dict[str, Any] = field(default_factory=dict)  # extra HubClient keywords

    def __post_init__(self) -> None:
        if (self.x509_cert_file is None) != (self.x509_key_file is None):
            raise ValueError("give both x509_cert_file and x509_key_file, or neither")
        given = sum(x is not None for x in (self.x509_cert_file, self.symmetric_key, self.group_key, self.tpm))
        if given != 1:
            raise ValueError("give exactly one onboarding credential: x509_cert_file/x509_key_file, symmetric_key, "
                             "group_key or tpm")
        if self.renewal_method not in ("dps", "hub"):
            raise ValueError(f"renewal_method must be 'dps' or 'hub', got {self.renewal_method!r}")
        if self.transport not in ("https", "mqtt"):
            raise ValueError(f"transport must be 'https' or 'mqtt', got {self.transport!r}")
        if not 0 < self.renew_at_fraction <= 1:
            raise ValueError("renew_at_fraction must be in (0, 1]")
        if not 0 <= self.jitter_fraction < self.renew_at_fraction:
            raise ValueError("jitter_fraction must be in [0, renew_at_fraction)")
        if self.retry_base <= 0 or self.retry_max < self.retry_base:
            raise ValueError("need 0 < retry_base <= retry_max")
        if self.reprovision_limit < 1:
            raise ValueError("reprovision_limit must be at least 1")
        if self.check_interval <= 0:
            raise ValueError("check_interval must be positive")
        if self.telemetry_interval is not None and self.telemetry_interval <= 0:
            raise ValueError("telemetry_interval must be positive")
        self.store_dir = Path(self.store_dir)


@dataclass
class AgentStatus:
    """What the agent is doing, for the CLI and for monitoring (times are the device's clock, UTC)."""

    registration_id: str
    renewal_method: str
    # starting | provisioning | connecting | connected | renewing | reprovisioning | refused (DPS or the hub refuses
    # the device; waiting for next_retry) | stopped
    state: str = "stopped"
    device_id: str | None = None
    assigned_hub: str | None = None
    certificate: dict[str, str] | None = None  # certificate_summary() of the certificate in use
    connected: bool = False
    last_renewal: datetime | None = None
    next_renewal: datetime | None = None
    renewals: int = 0
    failures: int = 0  # consecutive failed renewal (or onboarding, or re-provisioning) attempts
    last_error: str | None = None
    last_error_at: datetime | None = None
    last_check: datetime | None = None  # when the serving loop last looked at the schedule (liveness)
    reprovisions: int = 0  # re-provisionings after the hub refused the certificate (since the agent started)
    last_reprovision: datetime | None = None
    reprovision_reason: str | None = None
    refused_certificates: int = 0  # certificates the hub refused (CONNACK 5) since the last connection
    next_retry: datetime | None = None  # when a backed-off provisioning or connection attempt comes next

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (ISO 8601 times) for ``-o json`` output."""
        doc = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("last_renewal", "next_renewal", "last_error_at", "last_check", "last_reprovision", "next_retry"):
            doc[name] = _iso(doc[name])
        return doc


class DeviceAgent:
    """Runs one device: onboarding, hub connection, telemetry, callbacks and certificate renewal.

    ``clock`` and ``sleep`` are injected so tests (and simulators) can move time without waiting;
    ``rng`` draws the renewal jitter and the retry backoff, so a seeded one gives a reproducible schedule.
    """

    def __init__(self, config: AgentConfig, *, clock: Callable[[], datetime] = _utcnow,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep, rng: random.Random | None = None,
                 methods: Mapping[str | None, MethodHandler] | None = None, on_desired: DesiredCallback | None = None,
                 on_c2d: C2dCallback | None = None, telemetry: TelemetrySource | None = None,
                 on_event: EventCallback | None = None) -> None:
        self.config = config
        self.store = CertificateStore(config.store_dir)
        self._status = AgentStatus(config.registration_id, config.renewal_method)
        self.hub: HubClient | None = None
        self._clock = clock
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        self._methods: dict[str | None, MethodHandler] = {"getStatus": self._get_status,
                                                          "renewCertificate": self._renew_certificate,
                                                          None: self._no_such_method, **(methods or {})}
        self._on_desired = on_desired
        self._on_c2d = on_c2d
        self._telemetry = telemetry
        self._on_event = on_event
        self._credentials: StoredCredentials | None = None
        self._offset = timedelta(0)  # device clock minus issuer clock
        self._renew_at: datetime | None = None  # device clock
        self._report_pending = False
        self._forced: list[asyncio.Future] = []
        self._wake = asyncio.Event()  # renew_now() or stop()
        self._stop_event = asyncio.Event()
        self._stopping = False
        self._running = False
        self._ready = asyncio.Event()
        self._done = asyncio.Event()
        self._telemetry_seq = 0
        self._background: set[asyncio.Future[Any]] = set()  # renewals started by the renewCertificate method
        self._refused: ConnectRefused | None = None  # the hub refused a reconnect with CONNACK 5: re-provision
        self._reprovisioning: dict[str, Any] | None = None  # the twin's reported "reprovisioning", once there is one
        self._at_least: float | None = None  # DPS's Retry-After from a failed re-provisioning, for the next backoff
        self._unused: _Unused | None = None  # a renewed set the hub was away for: switched to once it is back

    # ---------------------------------------------------------------- public API
    @property
    def status(self) -> AgentStatus:
        """The live status (``connected`` is read from the hub client now)."""
        self._status.connected = self.hub is not None and self.hub.connected
        return self._status

    @property
    def credentials(self) -> StoredCredentials | None:
        """The credential set the hub connection uses."""
        return self._credentials

    async def run(self) -> None:
        """Onboard if needed, connect, then serve until :meth:`stop` (renewing when due)."""
        if self._running:
            raise RuntimeError("the agent is already running")
        self._running, self._stopping = True, False
        self._stop_event.clear()
        self._done.clear()
        telemetry_task: asyncio.Task | None = None
        try:
            self._set_state("starting")
            if not await self._start():
                return
            if self.config.telemetry_interval is not None:
                telemetry_task = asyncio.get_running_loop().create_task(self._telemetry_loop(),
                                                                        name=f"agent-telemetry:{self.config.registration_id}")
            self._ready.set()
            await self._serve()
        finally:
            if telemetry_task is not None:
                telemetry_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await telemetry_task
            for future in self._forced:
                if not future.done():
                    future.set_exception(AgentError("the agent stopped before the renewal"))
            self._forced.clear()
            if self.hub is not None:
                await self.hub.disconnect()
            self._ready.clear()
            self._running = False
            self._set_state("stopped")
            self._done.set()

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the agent is connected to its hub (the certificate report is sent, or retried if that failed)."""
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def renew_now(self) -> dict[str, str]:
        """Renew at once (CLI ``--renew-now``, quickstart); returns the new certificate summary or raises the error.

        Needs a running :meth:`run`; called before it got connected, the renewal happens as soon as it is.
        A failed forced renewal does not move an existing schedule forward.
        """
        future = asyncio.get_running_loop().create_future()
        self._forced.append(future)
        self._wake.set()
        return await future

    async def stop(self, drain_timeout: float = 5.0) -> None:
        """Stop serving: give queued telemetry up to ``drain_timeout`` s to be acknowledged, then disconnect."""
        if self.hub is not None and drain_timeout > 0:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + drain_timeout
            while self.hub.pending_telemetry and self.hub.connected and loop.time() < deadline:
                await asyncio.sleep(0.02)
        self._stopping = True
        self._wake.set()
        self._stop_event.set()
        if self._running:
            await self._done.wait()

    def queue_telemetry(self, body: bytes | str | dict | list, properties: dict[str, Any] | None = None,
                        **options: Any) -> asyncio.Future:
        """Queue a message on the hub connection (kept across reconnects and certificate switches)."""
        if self.hub is None:
            raise RuntimeError("the agent is not connected to a hub yet (await wait_ready())")
        return self.hub.queue_telemetry(body, properties, **options)

    # ---------------------------------------------------------------- start-up
    async def _start(self) -> bool:
        """Load or obtain credentials and connect; False when stopped meanwhile."""
        creds, assignment = self._load()
        if creds is None or assignment is None:
            result = await self._onboard()
            if result is None:
                return False
            creds, assignment = result
        while not self._stopping:
            try:
                await self._connect(creds, assignment)
                return True
            except ConnectRefused as exc:
                if self.store.pending:  # an unconfirmed renewal: back to the confirmed set first
                    self._record_error(f"hub {assignment[0]} refused the certificate (CONNACK {exc.return_code})")
                    creds = self.store.rollback()
                    self._emit("rolled-back")
                    continue
                if exc.return_code == CONNACK_NOT_AUTHORIZED:  # the hub no longer takes this set: re-provision
                    return await self._recover(exc, creds, assignment)
                self._record_error(f"hub {assignment[0]} refused the connection ({exc}); not a certificate refusal: "
                                   "retrying")
                self._emit("connect-refused", returnCode=exc.return_code, reason=str(exc))
                await self._backoff_sleep()
            except (MqttError, OSError, TimeoutError) as exc:
                self._record_error(f"cannot reach hub {assignment[0]}: {type(exc).__name__}: {exc}")
                await self._backoff_sleep()
        return False

    def _load(self) -> tuple[StoredCredentials | None, tuple[str, str] | None]:
        """The stored set and assignment if usable: complete, matching, and not expired."""
        for tmp in self.store.sweep():  # a kill -9 mid-write: its temporary copies (a private key among them) go
            log.info("%s: removed %s, left by an interrupted write", self.config.registration_id, tmp.name)
        try:
            creds = self.store.current()
        except StoreError as exc:
            log.warning("%s", exc)
            if not self.store.pending:
                return None, None
            creds = self.store.rollback()  # an interrupted renewal: the confirmed set is the one to use
        assignment = self.store.assignment()
        if creds is None or assignment is None:
            return creds, None
        # after a restart the device clock is trusted unless it is before the certificate's issuance (no RTC, 1970):
        # then assume the certificate is as fresh as possible rather than never renewing it
        issued = creds.certificate.not_valid_before_utc
        now = self._clock()
        self._offset = now - issued if now < issued else timedelta(0)
        if self._issuer_now() >= creds.certificate.not_valid_after_utc:
            log.info("%s: stored certificate expired; onboarding again", self.config.registration_id)
            return None, None
        return creds, assignment

    async def _onboard(self) -> tuple[StoredCredentials, tuple[str, str]] | None:
        """Register with DPS (fresh key + CSR) until it works or the agent stops; failures back off."""
        self._set_state("provisioning")
        while not self._stopping:
            try:
                creds, assignment = await self._register()
            except _Stopped:
                return None
            except Exception as exc:  # noqa: BLE001 - a daemon keeps trying (the operator may fix the enrollment)
                log.warning("%s: provisioning failed: %s", self.config.registration_id, exc)
                self._record_error(f"provisioning {self._dps_failure(exc)}: {type(exc).__name__}: {exc}")
                await self._backoff_sleep(_retry_after(exc))
                self._set_state("provisioning")
                continue
            self._emit("provisioned")
            return creds, assignment
        return None

    async def _register(self) -> tuple[StoredCredentials, tuple[str, str]]:
        self.store.check_writable()
        key, csr = new_key_and_csr(self.config.registration_id, self.config.curve)
        result = await self._unless_stopped(self._provisioning_client().register(csr, self.config.payload))
        if not result.issued_chain or not result.assigned_hub or not result.device_id:
            raise AgentError("DPS assigned the device without an operational certificate chain (does the enrollment "
                             "have a credentialPolicyName?)")
        if not public_keys_match(key, result.issued_chain[0]):
            raise AgentError("DPS returned a certificate for another key")
        creds = self.store.save(key, result.issued_chain)
        self._adopt(creds.certificate)
        assignment = (result.assigned_hub, result.device_id)
        self.store.save_assignment(*assignment)
        return creds, assignment

    def _provisioning_client(self) -> ProvisioningClient:
        c = self.config
        credential: dict[str, Any]
        if c.x509_cert_file is not None:
            credential = {"x509": (c.x509_cert_file, c.x509_key_file)}
        elif c.symmetric_key is not None:
            credential = {"symmetric_key": c.symmetric_key}
        elif c.tpm is not None:
            credential = {"tpm": c.tpm, "tpm_key_file": Path(c.store_dir) / TPM_KEY_FILE}
        else:
            credential = {"group_key": c.group_key}
        return ProvisioningClient(c.dps_host, c.id_scope, c.registration_id, https_port=c.https_port,
                                  mqtt_port=c.mqtt_port, ca_file=c.ca_file, transport=c.transport,
                                  **credential, **c.provisioning_options)

    def _new_hub(self, creds: StoredCredentials, assignment: tuple[str, str]) -> HubClient:
        """A hub client whose every callback also reports a traffic event (what an operator follows)."""
        c = self.config
        hub = HubClient(assignment[0], assignment[1], port=c.hub_port or c.mqtt_port, ca_file=c.ca_file,
                        x509=creds.tls_identity, address=c.hub_address, **c.hub_options)
        for name, handler in self._methods.items():
            hub.on_method(name, self._reported_method(handler))
        if self._on_desired is not None or self._on_event is not None:
            hub.on_desired(self._desired_arrived)
        if self._on_c2d is not None or self._on_event is not None:
            hub.on_c2d(self._c2d_arrived)
        hub.on_connection(self._connection_changed)
        hub.on_refused(self._hub_refused)
        return hub

    # ---------------------------------------------------------------- traffic (methods, desired, C2D)
    def _reported_method(self, handler: MethodHandler) -> MethodHandler:
        async def answer(name: str, request: Any) -> tuple[int, Any]:
            try:
                status, response = await _call(handler, name, request)
            except Exception as exc:  # re-raised: the hub client answers 500; the operator sees why here too
                self._emit("method", method=name, request=request, status=500, error=f"{type(exc).__name__}: {exc}")
                raise
            self._emit("method", method=name, request=request, status=status)
            return status, response
        return answer

    def _get_status(self, _name: str, _request: Any) -> tuple[int, Any]:
        return 200, self.status.to_dict()

    def _renew_certificate(self, _name: str, _request: Any) -> tuple[int, Any]:
        """Start a renewal; its outcome comes as the renewed / renewal-failed event and in the twin."""
        future = asyncio.ensure_future(self.renew_now())
        self._background.add(future)
        future.add_done_callback(self._renewal_finished)
        return 202, {"message": "renewal started; the twin's reported certificate changes when it is done",
                     "certificate": self._status.certificate}

    def _renewal_finished(self, future: asyncio.Future[Any]) -> None:
        self._background.discard(future)
        if not future.cancelled():
            future.exception()  # already recorded and reported as renewal-failed

    def _no_such_method(self, name: str, _request: Any) -> tuple[int, Any]:
        known = sorted(n for n in self._methods if n is not None)
        return 404, {"message": f"method {name!r} is not implemented by this device (it answers {', '.join(known)})"}

    async def _desired_arrived(self, patch: dict[str, Any]) -> None:
        self._emit("desired", patch=patch)
        if self._on_desired is not None:
            await _call(self._on_desired, patch)

    async def _c2d_arrived(self, message: C2dMessage) -> None:
        try:
            body: Any = message.body.decode()
        except UnicodeDecodeError:
            body = {"base64": base64.b64encode(message.body).decode()}
        self._emit("c2d", messageId=message.message_id, body=body, properties=message.properties)
        if self._on_c2d is not None:
            await _call(self._on_c2d, message)

    def _connection_changed(self, connected: bool, reason: str | None) -> None:
        if connected:
            self._emit("reconnected", reconnects=self.hub.reconnects if self.hub is not None else 0)
            if self._unused is not None:  # the hub is back: switch to the certificate issued while it was away, now
                self._renew_at = self._status.next_renewal = self._clock()
                self._wake.set()
        else:
            self._emit("disconnected", reason=reason)

    async def _connect(self, creds: StoredCredentials, assignment: tuple[str, str]) -> None:
        self._set_state("connecting")
        if self.hub is not None:
            await self.hub.disconnect()
        self.hub = self._new_hub(creds, assignment)
        await self.hub.connect()
        self.store.confirm()  # this set connected: it is the known-good one now
        self._credentials = creds
        self._status.device_id, self._status.assigned_hub = assignment[1], assignment[0]
        self._status.failures = self._status.refused_certificates = 0
        self._status.next_retry = None
        self._adopt(creds.certificate, fresh=False)
        self._report_pending = True
        await self._report()
        self._set_state("connected")
        self._emit("connected")

    # ---------------------------------------------------------------- re-provisioning (refused certificate)
    def _hub_refused(self, exc: ConnectRefused) -> bool:
        """The hub client's reconnect was refused. CONNACK 5 is about the certificate: stop reconnecting and let the
        serving loop re-provision. Other codes are not (see the module docstring): the client goes on reconnecting."""
        if exc.return_code == CONNACK_NOT_AUTHORIZED:
            self._refused = exc
            self._wake.set()
            return True
        host = self.hub.hub_host if self.hub is not None else "?"
        self._record_error(f"hub {host} refused the connection ({exc}); not a certificate refusal: reconnecting",
                           count=False)
        self._emit("connect-refused", returnCode=exc.return_code, reason=str(exc))
        return False

    async def _recover(self, refused: ConnectRefused, creds: StoredCredentials, assignment: tuple[str, str]) -> bool:
        """The hub refused ``creds`` with CONNACK 5: register again with DPS (onboarding credential, fresh key and CSR),
        store the new set, connect with it and report it. Retries as the module docstring says (backoff, the newest
        certificate first, ``reprovision_limit``). False when the agent was stopped meanwhile."""
        refused_serial = f"{creds.certificate.serial_number:X}"
        cause = (f"hub {assignment[0]} refused certificate {refused_serial} (CONNACK {refused.return_code}, not "
                 "authorized: revoked, superseded, or the device is disabled or deleted in the hub)")
        reason = {"reason": "hubRefusedCertificate", "returnCode": refused.return_code,
                  "refusedSerialNumber": refused_serial, "hub": assignment[0]}
        log.warning("%s: %s; re-provisioning through DPS", self.config.registration_id, cause)
        if self._take_unused() is not None:  # issued before the refusal (revoked with it, or for the same device): gone
            self.store.rollback()
        self._status.failures = 0  # a new episode: the first re-provisioning is immediate, the backoff starts over
        self._status.refused_certificates += 1
        self._record_error(cause, count=False)
        self._set_state("reprovisioning")
        self._emit("certificate-refused")
        fresh_refused = 0  # re-provisioned certificates the hub refused too, in a row
        first = True
        while not self._stopping:
            if not first:
                at_least, self._at_least = self._at_least, None
                if not await self._backoff_sleep(at_least):
                    break
                error = await self._try_connect(creds, assignment)  # the newest set first (a device re-enabled)
                if error is None:
                    return await self._recovered(creds, assignment, refused_serial, cause, reason)
                if not self._refuses_certificate(error):
                    self._record_error(f"cannot connect to hub {assignment[0]}: {type(error).__name__}: {error}")
                    self._emit("reprovision-failed")
                    continue
            first = False
            expired = self._issuer_now() >= creds.certificate.not_valid_after_utc
            if fresh_refused >= self.config.reprovision_limit and not expired:
                self._set_state("refused")
                self._record_error(f"hub {assignment[0]} refused {fresh_refused} freshly issued certificates in a row: "
                                   "not re-provisioning again, retrying the connection (is the device disabled or "
                                   "deleted in the hub, or does the hub not trust the issuing CA?)")
                self._emit("reprovision-failed")
                continue
            self._set_state("reprovisioning")
            try:
                creds, assignment = await self._register()
            except _Stopped:
                break
            except Exception as exc:  # noqa: BLE001 - reported and retried with backoff, the credential is kept
                log.warning("%s: re-provisioning failed: %s", self.config.registration_id, exc)
                self._record_error(f"re-provisioning {self._dps_failure(exc)}: {type(exc).__name__}: {exc}")
                self._emit("reprovision-failed")
                self._at_least = _retry_after(exc)  # the next backoff waits at least what DPS asked for
                continue
            self.store.confirm()  # the refused set is of no use any more: nothing to roll back to
            self._credentials = creds
            self._emit("provisioned")
            error = await self._try_connect(creds, assignment)
            if error is None:
                return await self._recovered(creds, assignment, refused_serial, cause, reason)
            if self._refuses_certificate(error):
                fresh_refused += 1
                self._status.refused_certificates += 1
                message = (f"hub {assignment[0]} refused the re-provisioned certificate "
                           f"{creds.certificate.serial_number:X} too ({error})")
            else:
                message = f"cannot connect to hub {assignment[0]}: {type(error).__name__}: {error}"
            self._set_state("reprovisioning")
            self._record_error(message)
            self._emit("reprovision-failed")
        return False

    @staticmethod
    def _refuses_certificate(error: Exception) -> bool:
        return isinstance(error, ConnectRefused) and error.return_code == CONNACK_NOT_AUTHORIZED

    async def _try_connect(self, creds: StoredCredentials, assignment: tuple[str, str]) -> Exception | None:
        """Connect with ``creds`` and never fall back to the refused set; the error, or None when connected."""
        self._set_state("connecting")
        hub = self.hub
        try:
            if hub is None or (hub.hub_host, hub.device_id) != assignment:
                if hub is not None:
                    if hub.pending_telemetry:
                        log.warning("%s: %d queued messages were for device %r on %s and are dropped",
                                    self.config.registration_id, hub.pending_telemetry, hub.device_id, hub.hub_host)
                    await hub.disconnect()
                hub = self.hub = self._new_hub(creds, assignment)
            else:
                await hub.switch_credentials(x509=creds.tls_identity, fallback=False)  # queued telemetry stays
            await hub.connect()  # (re)starts the client's send and callback tasks
        except (MqttError, OSError, TimeoutError) as exc:
            return exc
        return None

    async def _recovered(self, creds: StoredCredentials, assignment: tuple[str, str], refused_serial: str, cause: str,
                         reason: dict[str, Any]) -> bool:
        self.store.confirm()
        self._credentials = creds
        self._refused = None
        self._status.assigned_hub, self._status.device_id = assignment
        self._status.failures = self._status.refused_certificates = 0
        self._status.next_retry = None
        self._adopt(creds.certificate, fresh=False)
        reprovisioned = f"{creds.certificate.serial_number:X}" != refused_serial
        if reprovisioned:
            now = self._clock()
            self._status.reprovisions += 1
            self._status.last_reprovision, self._status.reprovision_reason = now, cause
            self._reprovisioning = {"lastReprovisioned": _iso(now), **reason}
        self._report_pending = True
        await self._report()
        self._set_state("connected")
        self._emit("reprovisioned" if reprovisioned else "connected")
        return True

    # ---------------------------------------------------------------- main loop
    async def _serve(self) -> None:
        while not self._stopping:
            refused, self._refused = self._refused, None
            if refused is not None and self.hub is not None and self._credentials is not None:
                if not await self._recover(refused, self._credentials, (self.hub.hub_host, self.hub.device_id)):
                    return
                continue
            if self._report_pending:
                await self._report()
            now = self._clock()
            self._status.last_check = now
            forced, self._forced = self._forced, []
            due = self._renew_at is not None and now >= self._renew_at
            if forced or due:
                await self._renew_and_record(forced, due)
                continue
            delay = self.config.check_interval
            if self._renew_at is not None:
                delay = min(delay, (self._renew_at - now).total_seconds())
            await self._interruptible_sleep(delay)

    async def _renew_and_record(self, forced: list[asyncio.Future], due: bool) -> None:
        try:
            summary = await self._renew()
        except _Stopped as exc:  # nothing was stored: the next start renews if it is still due
            for future in forced:
                if not future.done():
                    future.set_exception(exc)
            return
        except Exception as exc:  # noqa: BLE001 - every failure is reported and retried, the agent goes on
            log.warning("%s: certificate renewal failed: %s", self.config.registration_id, exc)
            self._record_error(f"{self._method()} renewal failed: {type(exc).__name__}: {exc}")
            if due or self._status.failures > 1:
                delay = max(self._backoff(), _retry_after(exc) or 0.0)  # never sooner than DPS's Retry-After
                self._renew_at = self._clock() + timedelta(seconds=delay)
                self._status.next_renewal = self._renew_at
            self._set_state("connected")
            self._emit("renewal-failed")
            for future in forced:
                if not future.done():
                    future.set_exception(exc)
            return
        for future in forced:
            if not future.done():
                future.set_result(summary)

    def _method(self) -> RenewalMethod:
        """Hub renewal needs a live connection: an expired certificate can only be replaced through DPS."""
        creds = self._credentials
        if creds is not None and self._issuer_now() >= creds.certificate.not_valid_after_utc:
            return "dps"
        return self.config.renewal_method

    async def _renew(self) -> dict[str, str]:
        assert self.hub is not None and self._credentials is not None
        self._set_state("renewing")
        unused = self._take_unused()
        if unused is not None:  # issued while the hub was away: switch to it rather than ask for yet another one
            new, assignment, offset = unused.credentials, unused.assignment, unused.offset
        else:
            method = self._method()
            self.store.check_writable()
            key, csr = new_key_and_csr(self.config.registration_id, self.config.curve)
            assignment = (self.hub.hub_host, self.hub.device_id)
            if method == "dps":
                result = await self._unless_stopped(self._provisioning_client().register(csr, self.config.payload))
                if not result.issued_chain or not result.assigned_hub or not result.device_id:
                    raise AgentError("DPS answered without an operational certificate chain")
                chain = result.issued_chain
                assignment = (result.assigned_hub, result.device_id)
            else:
                chain = await self._unless_stopped(self.hub.renew_certificate(csr))
            if not public_keys_match(key, chain[0]):
                raise AgentError(f"{'DPS' if method == 'dps' else 'the hub'} returned a certificate for another key")
            offset = self._arrival_offset(chain[0])
            new = self.store.save(key, chain)  # the confirmed set moves to previous/
        self._emit("switching")
        try:
            await self._switch(new, assignment)
        except BaseException as exc:
            if self._hub_away(exc):
                self._unused = _Unused(new, assignment, offset)
                raise AgentError(f"cannot reach hub {assignment[0]} ({type(exc).__name__}: {exc}); the new certificate "
                                 f"{new.certificate.serial_number:X} is kept and used once the hub is back") from exc
            self.store.rollback()
            self._emit("rolled-back")
            if isinstance(exc, ConnectRefused):
                raise AgentError(f"the hub refused the renewed certificate (CONNACK {exc.return_code}); "
                                 "kept the previous one") from exc
            raise
        self.store.confirm()
        self._credentials = new
        if assignment != (self._status.assigned_hub, self._status.device_id):
            self._status.assigned_hub, self._status.device_id = assignment
        self._adopt(new.certificate, offset=offset)
        self.store.save_assignment(*assignment)
        self._status.renewals += 1
        self._status.last_renewal = self._clock()
        self._status.failures = 0
        self._report_pending = True
        await self._report()
        self._set_state("connected")
        self._emit("renewed")
        return certificate_summary(new.certificate)

    def _hub_away(self, exc: BaseException) -> bool:
        """Whether a failed switch says nothing about the new certificate: the hub answered neither it nor the old one
        (a network failure, no CONNACK, or CONNACK 3, server unavailable), so the new set is worth keeping. When the old
        certificate still connects, the hub is there and did not take the new one, however it said so (a CONNACK code,
        or a TLS alert that reads like a lost connection): that set goes."""
        if isinstance(exc, ConnectRefused):
            return exc.return_code == CONNACK_SERVER_UNAVAILABLE and not (self.hub is not None and self.hub.connected)
        return isinstance(exc, MqttError | OSError | TimeoutError) and not (self.hub is not None and self.hub.connected)

    def _take_unused(self) -> _Unused | None:
        """The set a renewal stored but could not switch to (the hub was away), if it is still the store's pending set
        and not expired; an expired one is rolled back (the confirmed set is what a restart should find)."""
        unused, self._unused = self._unused, None
        if unused is None or not self.store.pending:
            return None
        try:
            current = self.store.current()
        except StoreError:
            return None
        if current is None or current.certificate != unused.credentials.certificate:
            return None  # something else replaced it meanwhile (a re-provisioning)
        if self._clock() - unused.offset >= unused.credentials.certificate.not_valid_after_utc:
            self.store.rollback()
            return None
        return unused

    async def _switch(self, new: StoredCredentials, assignment: tuple[str, str]) -> None:
        """Move the live connection to the new set; a changed hub or device id gets a new client."""
        hub = self.hub
        assert hub is not None
        if assignment == (hub.hub_host, hub.device_id):
            await hub.switch_credentials(x509=new.tls_identity)
            return
        replacement = self._new_hub(new, assignment)
        await replacement.connect()  # raises (old client untouched) if the new hub refuses
        if hub.pending_telemetry:
            log.warning("%s: %d queued messages were for device %r on %s and are dropped", self.config.registration_id,
                        hub.pending_telemetry, hub.device_id, hub.hub_host)
        await hub.disconnect()
        self.hub = replacement

    async def _report(self) -> None:
        """Twin reported ``certificate`` = the summary of the certificate in use, and ``reprovisioning`` (the last
        re-provisioning after a refused certificate: when, why, the refused serial) once there was one; retried
        later if offline."""
        if self.hub is None or self._credentials is None:
            return
        patch: dict[str, Any] = {"certificate": certificate_summary(self._credentials.certificate)}
        if self._reprovisioning is not None:
            patch["reprovisioning"] = self._reprovisioning
        try:
            await self.hub.patch_reported(patch)
        except Exception as exc:  # noqa: BLE001 - retried on the next wake-up
            log.info("%s: could not report the certificate yet: %s", self.config.registration_id, exc)
            return
        self._report_pending = False

    async def _telemetry_loop(self) -> None:
        interval = self.config.telemetry_interval
        assert interval is not None
        while True:
            await self._sleep(interval)
            if self.hub is None:
                continue
            self._telemetry_seq += 1
            seq = self._telemetry_seq
            body = self._telemetry(seq) if self._telemetry is not None else {"seq": seq}
            if inspect.isawaitable(body):
                body = await body
            if body is None:
                continue
            self.hub.queue_telemetry(body, message_id=f"{self.config.registration_id}-{seq}")

    # ---------------------------------------------------------------- scheduling
    def _issuer_now(self) -> datetime:
        return self._clock() - self._offset

    def _arrival_offset(self, cert: cx509.Certificate) -> timedelta:
        """The device/issuer clock offset a certificate that arrives now says: zero while the device clock is within
        ``clock_tolerance`` after its notBefore (the issuer's "now"), else the difference."""
        now, issued = self._clock(), cert.not_valid_before_utc
        return timedelta(0) if issued <= now <= issued + self.config.clock_tolerance else now - issued

    def _adopt(self, cert: cx509.Certificate, *, fresh: bool = True, offset: timedelta | None = None) -> None:
        """Schedule the renewal of ``cert``; a fresh one also measures the device/issuer clock offset (``offset``: as
        measured when it arrived, for a certificate used later than that)."""
        if offset is not None:
            self._offset = offset
        elif fresh:
            self._offset = self._arrival_offset(cert)
        if self._credentials is not None and self._renew_at is not None and not fresh \
                and self._status.certificate == certificate_summary(cert):
            return  # the same certificate, already scheduled (a reconnect)
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        due = renewal_due_time(cert, self.config.renew_before, self.config.renew_at_fraction)
        jitter = lifetime * self.config.jitter_fraction * self._rng.random()
        self._renew_at = max(cert.not_valid_before_utc, due - jitter) + self._offset
        self._status.next_renewal = self._renew_at
        self._status.certificate = certificate_summary(cert)

    def _backoff(self) -> float:
        """Exponential in the consecutive failures, with jitter: a fleet refused at once retries spread out.

        The exponent is capped: ``2 ** 1024`` does not fit a float, and an agent whose hub stays away long enough
        must go on retrying at ``retry_max``, not die of an OverflowError."""
        exponent = min(max(self._status.failures - 1, 0), 64)
        ceiling = min(self.config.retry_max, self.config.retry_base * 2.0 ** exponent)
        return ceiling * (0.5 + 0.5 * self._rng.random())

    async def _backoff_sleep(self, at_least: float | None = None) -> bool:
        """Wait :meth:`_backoff`, or ``at_least`` (the service's Retry-After) if longer (cut short by :meth:`stop`),
        with the time of the next attempt in the status; False when the agent is stopping."""
        delay = max(self._backoff(), at_least or 0.0)
        self._status.next_retry = self._clock() + timedelta(seconds=delay)
        await self._stoppable_sleep(delay)
        self._status.next_retry = None
        return not self._stopping

    async def _interruptible_sleep(self, seconds: float) -> None:
        """The injected sleep, cut short by :meth:`renew_now` and :meth:`stop` (the serving loop)."""
        if self._stopping or self._forced or self._refused is not None:
            return
        await self._sleep_until(seconds, self._wake)

    async def _stoppable_sleep(self, seconds: float) -> None:
        """The injected sleep, cut short only by :meth:`stop` (start-up retries)."""
        if not self._stopping:
            await self._sleep_until(seconds, self._stop_event)

    async def _unless_stopped(self, work: Awaitable[_T]) -> _T:
        """``work``, abandoned (cancelled) when :meth:`stop` is called meanwhile: raises :class:`_Stopped` then.

        Why: a DPS request may wait out a Retry-After of minutes (a 429, a 503 while the service's store is away) and a
        renewal through the hub waits for its operation; ``stop`` must not wait for them (a device shutting down, a
        service manager's stop timeout)."""
        task = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(self._stop_event.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():  # stopped, or this wait itself was cancelled
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            stopped.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stopped
        if task.cancelled():
            raise _Stopped("the agent stopped during the request")
        return task.result()

    async def _sleep_until(self, seconds: float, event: asyncio.Event) -> None:
        sleeper = asyncio.ensure_future(self._sleep(max(seconds, 0.0)))
        waker = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, waker):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            self._wake.clear()

    # ---------------------------------------------------------------- status and state file
    def _set_state(self, state: str) -> None:
        self._status.state = state

    def _record_error(self, message: str, *, count: bool = True) -> None:
        """``count``: a failed attempt (the backoff grows); otherwise only what the status shows."""
        if count:
            self._status.failures += 1
        self._status.last_error = message
        self._status.last_error_at = self._clock()

    def _dps_failure(self, exc: Exception) -> str:
        """Sets the state for a failed registration and names it: refused by DPS, or failed (retried the same way)."""
        if isinstance(exc, ProvisioningError) and exc.status in DPS_REFUSALS:
            self._set_state("refused")
            return "refused by DPS"
        return "failed"

    def _emit(self, event: str, **details: Any) -> None:
        if details:
            log.info("%s: %s %s", self.config.registration_id, event, details)
        else:
            log.info("%s: %s (next renewal %s)", self.config.registration_id, event, _iso(self._status.next_renewal))
        if self._on_event is not None:
            try:
                self._on_event(event, self.status, details)
            except Exception:
                log.exception("%s: event callback failed", self.config.registration_id)
