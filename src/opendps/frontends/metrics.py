"""Prometheus metrics: what the front ends see at the edge, the domain thread pool, and store gauges read at scrape
time (``GET /metrics``; docs/architecture.md, "Metrics").

Where metrics are recorded: front ends count what they translate — registrations (outcome, attestation type,
transport) and refusals (reason), hub CONNECTs and refusals, telemetry, C2D, direct methods — and
:class:`~opendps.frontends.runtime.DomainRunner` times every domain call (queue wait and run time). The domain does not
import prometheus: where only it knows (how long signing took, how many C2D messages expired) it reports to an
observer callable the wiring hands it. Gauges of the store (certificates per policy and by days to expiry) are read
at scrape time from the owning package (``pki.inventory``), cached a few seconds, so they are the whole service's,
whichever process answers.

Labels are bounded by the code or the configuration, never by what devices send: outcome, attestation type,
transport, a refusal's ``reason`` word (``OpenDPSError.reason``), auth type, hub name, policy (``namespace/policy``),
domain call name. Never a device or registration id.

Several processes (``serve --workers N``): prometheus_client's multiprocess mode. The supervisor sets
``PROMETHEUS_MULTIPROC_DIR`` (a fresh directory, emptied at start) before it spawns the workers, so every value a
worker records is in a memory-mapped file of its own; a scrape, answered by any worker, merges every file: counters
and histograms summed over all workers, dead ones included (a restarted worker's counts are not lost), current
connections and queue depths summed over the live ones (``livesum``: the supervisor calls ``mark_process_dead`` for an
exited worker). The default process collectors read the process answering the scrape, so in multiprocess mode
``process_*``, ``python_gc_*`` and ``python_info`` are not exported; each worker publishes its own CPU seconds,
resident memory and open descriptors instead, with a ``pid`` label (``opendps_worker_*``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from opendps.errors import OpenDPSError
from opendps.transport.wire import decimal

if TYPE_CHECKING:
    from opendps.services import Services

log = logging.getLogger("opendps.metrics")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST
STORE_CACHE_SECONDS = 5.0  # store gauges are read at most this often per process
SAMPLE_EVERY = 1.0  # seconds between samples of queue depths (and, in multiprocess mode, this worker's process stats)


def multiprocess_mode() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower()))


disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series: half the text, and Prometheus does not use them
# every metric of this process; in multiprocess mode the files are the record and this registry is never exposed
REGISTRY = CollectorRegistry(auto_describe=True)
if not multiprocess_mode():
    ProcessCollector(registry=REGISTRY)
    PlatformCollector(registry=REGISTRY)
    GCCollector(registry=REGISTRY)

_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SLOW = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# ---- DPS ----
REGISTRATIONS = Counter(
    "opendps_registrations", "DPS register requests by outcome (assigned, failed: a failed allocation, challenged: a "
    "TPM challenge sent, refused, error: a server error), attestation type presented and transport.",
    ["outcome", "attestation", "transport"], registry=REGISTRY)
REGISTRATION_REFUSALS = Counter(
    "opendps_registration_refusals", "DPS registrations (and DPS MQTT CONNECTs) refused, by reason and transport.",
    ["reason", "transport"], registry=REGISTRY)
REGISTRATION_DURATION = Histogram(
    "opendps_registration_duration_seconds", "Time to answer a DPS register request (attestation, issuance, "
    "assignment), by transport.", ["transport"], buckets=_SLOW, registry=REGISTRY)
# ---- the CA ----
ISSUANCE_DURATION = Histogram(
    "opendps_certificate_issuance_duration_seconds", "Time to issue an operational certificate (lint, sign, record), "
    "by policy; its _count is the certificates issued.", ["policy"], buckets=_SLOW, registry=REGISTRY)
# ---- hubs ----
HUB_CONNECTIONS = Gauge(
    "opendps_hub_connections", "Device sessions open on the hubs now (every process of this host).",
    registry=REGISTRY, multiprocess_mode="livesum")
HUB_CONNECTS = Counter(
    "opendps_hub_connects", "Hub CONNECTs accepted, by device authentication type.", ["auth"], registry=REGISTRY)
HUB_REFUSALS = Counter(
    "opendps_hub_connect_refusals", "Hub CONNECTs refused, by reason.", ["reason"], registry=REGISTRY)
TELEMETRY_MESSAGES = Counter(
    "opendps_telemetry_messages", "Device-to-cloud messages stored, by hub.", ["hub"], registry=REGISTRY)
TELEMETRY_BYTES = Counter(
    "opendps_telemetry_bytes", "Bytes of device-to-cloud message bodies stored, by hub.", ["hub"], registry=REGISTRY)
TELEMETRY_QUEUE_MESSAGES = Gauge(
    "opendps_telemetry_queue_messages", "Telemetry messages waiting for the group commit (every process).",
    registry=REGISTRY, multiprocess_mode="livesum")
TELEMETRY_QUEUE_BYTES = Gauge(
    "opendps_telemetry_queue_bytes", "Telemetry body bytes waiting for or in the group commit (every process).",
    registry=REGISTRY, multiprocess_mode="livesum")
C2D_QUEUED = Counter(
    "opendps_c2d_messages_queued", "Cloud-to-device messages accepted into the queue, by hub.", ["hub"],
    registry=REGISTRY)
C2D_DELIVERED = Counter(
    "opendps_c2d_messages_delivered", "Cloud-to-device messages acknowledged by their device, by hub.", ["hub"],
    registry=REGISTRY)
C2D_EXPIRED = Counter(
    "opendps_c2d_messages_expired", "Cloud-to-device messages deleted undelivered when their time to live ended.",
    registry=REGISTRY)
METHOD_CALLS = Counter(
    "opendps_direct_method_calls", "Direct method calls by outcome (success: the device answered 2xx, device_error: "
    "it answered another status, offline, timeout, error).", ["outcome"], registry=REGISTRY)
# ---- the domain thread pool and the store ----
DOMAIN_CALL_DURATION = Histogram(
    "opendps_domain_call_duration_seconds", "Time domain calls run in the domain thread pool (store reads and writes, "
    "signing), by call.", ["call"], buckets=_FAST, registry=REGISTRY)
DOMAIN_QUEUE_WAIT = Histogram(
    "opendps_domain_queue_wait_seconds", "Time a domain call waited for a thread of the domain pool.",
    buckets=_FAST, registry=REGISTRY)
DOMAIN_QUEUE_LENGTH = Gauge(
    "opendps_domain_queue_calls", "Domain calls waiting for a thread of the domain pool (every process).",
    registry=REGISTRY, multiprocess_mode="livesum")
REFUSAL_LOG_DROPPED = Counter(
    "opendps_refusal_log_dropped", "Refusals not written to the refusal log (over its per-process rate).",
    registry=REGISTRY)
# ---- each worker's own process (multiprocess mode: what the default collectors would say, per pid) ----
WORKER_CPU = Gauge("opendps_worker_cpu_seconds", "CPU seconds used by each worker process.",
                   registry=REGISTRY, multiprocess_mode="liveall")
WORKER_MEMORY = Gauge("opendps_worker_resident_memory_bytes", "Resident memory of each worker process.",
                      registry=REGISTRY, multiprocess_mode="liveall")
WORKER_FDS = Gauge("opendps_worker_open_fds", "Open file descriptors of each worker process.",
                   registry=REGISTRY, multiprocess_mode="liveall")

HUB_CONNECTIONS.set(0)
TELEMETRY_QUEUE_MESSAGES.set(0)
TELEMETRY_QUEUE_BYTES.set(0)
DOMAIN_QUEUE_LENGTH.set(0)


# ---- recording (front ends call these) ----
def registration(outcome: str, attestation: str, transport: str, seconds: float | None = None) -> None:
    REGISTRATIONS.labels(outcome, attestation, transport).inc()
    if seconds is not None:
        REGISTRATION_DURATION.labels(transport).observe(seconds)


def registration_refused(exc: OpenDPSError, transport: str) -> None:
    REGISTRATION_REFUSALS.labels(exc.reason, transport).inc()


def hub_connected(auth: str) -> None:
    HUB_CONNECTS.labels(auth).inc()
    HUB_CONNECTIONS.inc()


def hub_disconnected() -> None:
    HUB_CONNECTIONS.dec()


def hub_refused(reason: str) -> None:
    HUB_REFUSALS.labels(reason).inc()


def telemetry(hub: str, size: int, count: int = 1) -> None:
    """``count`` messages of ``size`` bytes in all were stored for ``hub``."""
    counters = _TELEMETRY_BY_HUB.get(hub)
    if counters is None:  # labels() takes a lock and builds a key: once per hub, not per message
        counters = _TELEMETRY_BY_HUB[hub] = (TELEMETRY_MESSAGES.labels(hub), TELEMETRY_BYTES.labels(hub))
    counters[0].inc(count)
    counters[1].inc(size)


_TELEMETRY_BY_HUB: dict[str, tuple[Any, Any]] = {}


def c2d_queued(hub: str) -> None:
    C2D_QUEUED.labels(hub).inc()


def c2d_delivered(hub: str) -> None:
    C2D_DELIVERED.labels(hub).inc()


def c2d_expired(count: int) -> None:
    """The C2D queue's observer (``CloudToDevice.on_expired``): messages deleted undelivered."""
    if count:
        C2D_EXPIRED.inc(count)


def method_call(status: int | None, error: OpenDPSError | None = None) -> None:
    """A direct method's outcome: the device's status, or the error instead (404 offline, 504 timeout)."""
    if error is not None:
        outcome = "offline" if error.status == 404 else "timeout" if error.status == 504 else "error"
    else:
        outcome = "success" if status is not None and 200 <= status < 300 else "device_error"
    METHOD_CALLS.labels(outcome).inc()


def issued(policy: str, seconds: float) -> None:
    """The CA's observer (``IssuanceEngine.observer``): one certificate signed and recorded under ``policy``."""
    ISSUANCE_DURATION.labels(policy).observe(seconds)


def call_name(fn: Callable[..., Any]) -> str:
    """A domain call's label: its qualified name (``Provisioning.register``), bounded by the code."""
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    return str(name)[:80]


def domain_call(name: str, waited: float, ran: float) -> None:
    DOMAIN_QUEUE_WAIT.observe(waited)
    DOMAIN_CALL_DURATION.labels(name).observe(ran)


# ---- sampling: queue depths (and each worker's process stats) ----
def sample(*, telemetry_messages: int, telemetry_bytes: int, domain_waiting: int) -> None:
    TELEMETRY_QUEUE_MESSAGES.set(telemetry_messages)
    TELEMETRY_QUEUE_BYTES.set(telemetry_bytes)
    DOMAIN_QUEUE_LENGTH.set(domain_waiting)
    if multiprocess_mode():
        for family in _PROCESS.collect():
            for s in family.samples:
                target = {"process_cpu_seconds_total": WORKER_CPU, "process_resident_memory_bytes": WORKER_MEMORY,
                          "process_open_fds": WORKER_FDS}.get(s.name)
                if target is not None:
                    target.set(s.value)


_PROCESS = ProcessCollector(registry=None)


async def sample_forever(read: Callable[[], dict[str, int]], every: float = SAMPLE_EVERY) -> None:
    """Every ``every`` seconds, the depths ``read`` gives (its keys: :func:`sample`'s)."""
    while True:
        with contextlib.suppress(Exception):  # a sample must never end the task
            sample(**read())
        await asyncio.sleep(every)


# ---- the store gauges, read at scrape time ----
class StoreGauges:
    """``opendps_certificates_valid{policy}`` and ``opendps_certificates_expiring{policy,within_days}``: the
    service's valid certificates and how many expire within 1, 7, 14, 30, 60, 90 days (cumulative), from one
    ``GROUP BY`` in pki (``CertificateInventory.expiry``), at most every :data:`STORE_CACHE_SECONDS` per process."""

    def __init__(self, services: Services, ttl: float = STORE_CACHE_SECONDS) -> None:
        self.services = services
        self.ttl = ttl
        self._at = -1e18
        self._families: list[Metric] = []

    def collect(self) -> Iterator[Metric]:  # runs in the domain thread pool (the scrape renders there)
        now = time.monotonic()
        if now - self._at >= self.ttl:
            try:
                self._families = self._read()
            except Exception:  # a scrape still answers the other metrics; the next one tries again
                log.warning("metrics: cannot read the certificate inventory", exc_info=True)
                self._families = []
            self._at = now
        yield from self._families

    def _read(self) -> list[Metric]:
        inventory = self.services.inventory
        names = inventory.registry.policy_names()
        rows = inventory.certificates.expiry()
        valid = GaugeMetricFamily("opendps_certificates_valid", "Operational certificates neither revoked nor expired, "
                                  "by policy (namespace/policy).", labels=["policy"])
        expiring = GaugeMetricFamily("opendps_certificates_expiring", "Valid operational certificates that expire "
                                     "within the number of days of within_days (cumulative), by policy.",
                                     labels=["policy", "within_days"])
        for row in rows:
            policy = names.get(row.policy_id, "(deleted)") if row.policy_id is not None else "(deleted)"
            valid.add_metric([policy], row.valid)
            for days, count in sorted(row.within.items()):
                expiring.add_metric([policy, str(days)], count)
        return [valid, expiring]


class _Families:
    """A collector over a callable that yields metric families (this process's registry, the store gauges)."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


def render(store_gauges: StoreGauges | None = None) -> bytes:
    """The exposition text: every process's metrics (multiprocess mode: every file merged) and the store gauges.
    Blocking (files, the store): front ends call it in the domain thread pool."""
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_mode():
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(_Families(REGISTRY.collect))
    if store_gauges is not None:
        registry.register(_Families(store_gauges.collect))
    return generate_latest(registry)


# ---- who may scrape without credentials ----
FORWARDING_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


def is_loopback(peer: str | None, headers: Any) -> bool:
    """A request from this machine that no proxy forwarded: its peer address is loopback and it carries none of
    the forwarding headers (a reverse proxy on loopback passes on requests from anywhere)."""
    if peer is None or any(h in headers for h in FORWARDING_HEADERS):
        return False
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


# ---- multiprocess set-up (the supervisor) ----
def prepare_multiprocess_dir(path: Path | None = None) -> Path:
    """Before spawning workers: the directory their value files go to (``PROMETHEUS_MULTIPROC_DIR`` if set, else a
    fresh one under the system's temporary directory), emptied of an earlier run's files, and put in the
    environment the workers inherit."""
    import tempfile

    given = path or (Path(os.environ[MULTIPROC_ENV]) if os.environ.get(MULTIPROC_ENV) else None)
    if given is None:
        remove_orphaned_dirs(Path(tempfile.gettempdir()))
    directory = given or Path(tempfile.mkdtemp(prefix=f"opendps-metrics-{os.getpid()}-"))
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    os.environ[MULTIPROC_ENV] = str(directory)
    return directory


def remove_orphaned_dirs(parent: Path) -> list[Path]:
    """The directories of supervisors that are gone without removing theirs (SIGKILL, a crash): named with the
    supervisor's pid, removed when no process has that pid (one that does, even another program, keeps its own)."""
    removed = []
    for directory in parent.glob("opendps-metrics-*-*"):
        pid = decimal(directory.name.split("-")[2], 10)
        if pid is None or not directory.is_dir() or directory.stat().st_uid != os.getuid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
        except OSError:  # a process of another user: alive
            continue
    return removed


def worker_exited(pid: int | None) -> None:
    """A worker is gone: its live gauges (connections, queue depths, process stats) leave the sums; its counters
    stay (they were counted)."""
    if pid is not None and os.environ.get(MULTIPROC_ENV):
        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def remove_multiprocess_dir(directory: Path, *, ours: bool) -> None:
    """At the supervisor's exit: a directory it made is removed; an operator's is emptied."""
    if ours:
        shutil.rmtree(directory, ignore_errors=True)
    else:
        for stale in directory.glob("*.db"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
