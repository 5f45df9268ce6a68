"""What the front ends of one process share: the domain services, the one bridge from the event loop to
them, and the live hub state of this process.

Domain code is synchronous (SQLAlchemy sessions, ``cryptography``); front ends are asyncio. Every domain
call from a front end goes through :class:`DomainRunner`, a bounded thread pool, never onto the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, ParamSpec, TypeVar

from opendps.audit.refusals import HUB_CONNECT, REGISTRATION
from opendps.cluster import Cluster, choose_bus
from opendps.errors import OpenDPSError
from opendps.frontends import metrics
from opendps.frontends.refusals import RefusalRecorder
from opendps.hub import GroupCommit, LiveSessions, NatsRouter, PendingMessage, TelemetryBus
from opendps.hub.presence import Presence
from opendps.provisioning.attestation import Challenge, DeviceCredentials
from opendps.services import Services

P = ParamSpec("P")
T = TypeVar("T")


class DomainRunner:
    """The one bridge from the event loop to synchronous domain code: a bounded thread pool.

    Each call runs in a copy of the caller's context (``run_in_executor`` alone does not carry context variables
    into the thread): what the request set — who is acting, for the audit log (``opendps.audit.ACTOR``), the request
    id its log lines carry (``opendps.logs.REQUEST_ID``) — is what the domain code sees, and nothing a call sets leaks
    into the thread's next call.

    Calls go to a few core threads (``core``; by default the CPU count, 2-4): a burst queues there rather than wake
    eight threads that take turns at the GIL, each hand-off a context switch (8 threads cost ~10 % more CPU per hub
    CONNECT than 2 on this project's 2-CPU machine). When the core threads are held by slow calls — a custom-allocation
    webhook, a database lock wait — a call waiting behind them goes to a spare thread (``workers`` in all) once no
    core call has finished for ``stall`` seconds, so a slow call never holds the others up for longer than that.

    Every call is timed (``opendps_domain_queue_wait_seconds``: waiting for a thread; ``opendps_domain_call_duration_
    seconds{call}``: running, store and signing included), and ``waiting`` counts the calls not yet started."""

    def __init__(self, workers: int = 8, *, core: int | None = None, stall: float = 0.025) -> None:
        self.core_size = min(workers, core if core is not None else max(2, min(4, os.cpu_count() or 2)))
        self.core = ThreadPoolExecutor(max_workers=self.core_size, thread_name_prefix="opendps-domain")
        self.spare = (ThreadPoolExecutor(max_workers=workers - self.core_size, thread_name_prefix="opendps-domain-spare")
                      if workers > self.core_size else None)
        self.stall = stall
        self.waiting = 0  # calls submitted, not yet started (read by the metrics sampler)
        self._lock = threading.Lock()
        self._core_busy = 0  # calls given to the core threads, not finished
        self._core_progress = time.monotonic()  # when a core call last finished

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        context = contextvars.copy_context()
        submitted = time.perf_counter()
        state = ["queued"]  # -> running, or abandoned (the caller went away before a thread took it)
        with self._lock:
            self.waiting += 1
            crowded = self._core_busy >= self.core_size
            self._core_busy += 1

        def timed() -> T:
            started = time.perf_counter()
            with self._lock:
                if state[0] == "queued":
                    self.waiting -= 1
                state[0] = "running"
            try:
                return context.run(fn, *args, **kwargs)
            finally:
                metrics.domain_call(metrics.call_name(fn), started - submitted, time.perf_counter() - started)

        loop = asyncio.get_running_loop()
        job = self.core.submit(timed)
        job.add_done_callback(self._core_done)
        try:
            future = asyncio.wrap_future(job, loop=loop)
            if crowded and self.spare is not None:
                future = await self._unless_stuck(job, future, timed, loop)
            return await future
        except asyncio.CancelledError:
            job.cancel()  # not started yet: it never will (as run_in_executor does)
            raise
        finally:
            with self._lock:
                if state[0] == "queued":
                    self.waiting -= 1
                    state[0] = "abandoned"

    async def _unless_stuck(self, job: Future[T], future: asyncio.Future[T], timed: Callable[[], T],
                            loop: asyncio.AbstractEventLoop) -> asyncio.Future[T]:
        """``future`` (the core's), or a spare thread's if the core threads stop finishing calls before ``job`` starts."""
        wait = self.stall
        while not future.done():
            await asyncio.wait({future}, timeout=wait)
            wait = min(wait * 2, 8 * self.stall)  # a long queue behind busy core threads: fewer and fewer checks
            with self._lock:
                stuck = time.monotonic() - self._core_progress > self.stall
            if not future.done() and stuck and job.cancel():
                assert self.spare is not None
                return asyncio.wrap_future(self.spare.submit(timed), loop=loop)
        return future

    def _core_done(self, job: Future[Any]) -> None:
        with self._lock:
            self._core_busy -= 1
            if not job.cancelled():
                self._core_progress = time.monotonic()

    def close(self) -> None:
        for executor in (self.core, self.spare):
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def registration_counted(runtime: Runtime, credentials: DeviceCredentials) -> Iterator[Callable[[object], None]]:
    """Around a register request (HTTPS or MQTT): counts it by outcome, the attestation type it presented and its
    transport, times it, and hands a refusal to :meth:`Runtime.registration_refused`. The body calls the function it
    is given with the answer (an ``Accepted`` or a ``Challenge``)."""
    started = time.perf_counter()
    outcome = ["error"]

    def answered(result: object) -> None:
        outcome[0] = "challenged" if isinstance(result, Challenge) else getattr(result, "outcome", "assigned")

    try:
        yield answered
    except OpenDPSError as exc:
        outcome[0] = "refused"
        runtime.registration_refused(credentials.registration_id, credentials.transport, exc)
        raise
    finally:
        attestation = runtime.services.provisioning.mechanism_presented(credentials)
        metrics.registration(outcome[0], attestation, credentials.transport, time.perf_counter() - started)


@dataclass
class Runtime:
    """Built once per process by :func:`opendps.frontends.build`; every front end gets this, typed."""

    services: Services
    domain: DomainRunner = field(default_factory=DomainRunner)
    # seconds a client may stay silent: an HTTPS connection between requests (or sending a request header), a DPS
    # MQTT session (its keepalive is bounded by it, "none" included)
    client_timeout: float = 60.0
    live: LiveSessions = field(default_factory=LiveSessions)
    telemetry_bus: TelemetryBus = field(default_factory=TelemetryBus)
    telemetry_writer: GroupCommit = field(init=False)
    telemetry_router: NatsRouter = field(init=False)
    refusals: RefusalRecorder = field(init=False)  # device requests refused, to the refusal log (batched)
    store_gauges: metrics.StoreGauges = field(init=False)  # /metrics' gauges read from the store (cached)
    status_cache: dict[int, tuple[float, dict[str, Any]]] = field(default_factory=dict)  # GET /status, a few seconds
    cluster: Cluster | None = None  # this process as a node of the service (None: alone, e.g. in-process tests)

    def __post_init__(self) -> None:
        # telemetry from many sessions shares transactions (hub.telemetry.GroupCommit), in the domain's threads
        self.telemetry_writer = GroupCommit(self.services.telemetry, self.domain.run)
        self.telemetry_router = NatsRouter(self.services.routes, self.domain.run)
        self.refusals = RefusalRecorder(self.services.inventory.refusals, self.domain.run)
        self.store_gauges = metrics.StoreGauges(self.services)

    def registration_refused(self, registration_id: str, transport: str, exc: OpenDPSError) -> None:
        """A DPS request (register, poll, status, a DPS MQTT CONNECT) was refused: counted by reason and logged in the
        refusal log."""
        metrics.registration_refused(exc, transport)
        self.refusals.add(REGISTRATION, registration_id, transport, exc)

    def hub_refused(self, host: str, device_id: str, exc: OpenDPSError) -> None:
        """A hub CONNECT was refused: counted by reason and logged in the refusal log."""
        metrics.hub_refused(exc.reason)
        self.refusals.add(HUB_CONNECT, device_id, "mqtt", exc, hub=host)

    def sample(self) -> dict[str, int]:
        """The queue depths the metrics sampler publishes (``metrics.sample_forever``)."""
        return {"telemetry_messages": self.telemetry_writer.pending_messages,
                "telemetry_bytes": self.telemetry_writer.pending_bytes, "domain_waiting": self.domain.waiting}

    async def queue_c2d(self, hub: str, device_id: str, body: bytes, *, system: dict[str, str],
                        properties: dict[str, str | None], ttl: timedelta | None) -> PendingMessage:
        """The one path from a front end (REST or AMQP) to the C2D queue: enqueue durably in the domain thread pool,
        then wake the device's live session. ``system`` uses the queue's names (``message-id``, ``correlation-id``,
        ``user-id``, ``ack``, ``content-type``, ``content-encoding``)."""
        message = await self.domain.run(self.services.c2d.enqueue, hub, device_id, body, properties=properties,
                                        system=system, ttl=ttl)
        metrics.c2d_queued(hub)
        await self.live.notify_c2d(hub, device_id)
        return message

    async def join_cluster(self, *, bus_url: str | None = None, worker: int = 0,
                           endpoints: dict[str, object] | None = None) -> Cluster:
        """Become a node: recorded in ``cluster_nodes``, heartbeating, live sessions routed over the store's bus (or
        NATS at ``bus_url``) to and from the other processes and nodes."""
        store = self.services.store
        bus = choose_bus(store, self.domain.run, self.services.id_scope, bus_url)
        cluster = Cluster(store, bus, self.domain.run, worker=worker, endpoints=dict(endpoints or {}))
        self.live.join(cluster, Presence(store, self.services.hubs), self.domain.run)
        cluster.on_rejoin = self.live.rejoin
        await cluster.start(self._on_peer_message)
        self.cluster = cluster
        return cluster

    def _on_peer_message(self, message: dict[str, object]) -> None:
        if message.get("op") == "access-policies-changed":
            self.services.access_policies.forget()
        else:
            self.live.on_peer_message(message)

    async def access_policies_changed(self) -> None:
        """A shared access policy was created, changed or deleted here: every other process empties its token-check
        cache now (without this message they would see it within the cache's 5 s)."""
        if self.cluster is not None:
            await self.cluster.send({"op": "access-policies-changed"})

    async def leave_cluster(self) -> None:
        if self.cluster is not None:
            await self.cluster.stop()
            self.cluster = None
