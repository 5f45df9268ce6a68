"""What the front ends of one process share: the domain services, the one bridge from the event loop to
them, and the live hub state of this process.

Domain code is synchronous (SQLAlchemy sessions, ``cryptography``); front ends are asyncio. Every domain
call from a front end goes through :class:`DomainRunner`, a bounded thread pool, never onto the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, ParamSpec, TypeVar

from opendps.audit.refusals import HUB_CONNECT, REGISTRATION
from opendps.cluster import Cluster, choose_bus
from opendps.errors import OpenDPSError, ServiceUnavailable
from opendps.frontends import metrics
from opendps.frontends.refusals import RefusalRecorder
from opendps.hub import GroupCommit, LiveSessions, NatsRouter, PendingMessage, TelemetryBus
from opendps.hub.presence import Presence
from opendps.hub.telemetry import Message
from opendps.provisioning.attestation import Challenge, DeviceCredentials
from opendps.services import Services
from opendps.store import conflicted, driver_message, short_of_room, unavailable

P = ParamSpec("P")
T = TypeVar("T")
store_log = logging.getLogger("opendps.store")
STORE_RETRY_AFTER = 5  # seconds a client refused for a database outage is told to wait (Retry-After)
STORE_QUIET = 10.0  # seconds without a refused call before a database short of room is told to store again


class StoreUnavailable(ServiceUnavailable):
    """The database cannot be reached for now (:func:`opendps.store.unavailable`: a lost or refused connection, a server
    restarting, SQLite locked past its busy timeout): a retryable refusal — HTTP 503 with Retry-After, MQTT CONNACK 3,
    a DPS MQTT ``res/503`` — instead of a 500 and a traceback per request."""

    def __init__(self) -> None:
        super().__init__("the database is unavailable for now; retry later", info={"retryAfter": str(STORE_RETRY_AFTER)},
                         reason="store_unavailable")


class StoreConflict(ServiceUnavailable):
    """The database aborted the call's transaction in a conflict with a concurrent one (:func:`opendps.store.
    conflicted`: a deadlock): it wrote nothing; a retryable refusal (HTTP 503 with Retry-After 1) instead of a 500 and
    a traceback. Domain code retries where one transaction is the whole call (e.g. unlinking a hub)."""

    def __init__(self) -> None:
        super().__init__("the database aborted this request in a conflict with a concurrent one (a deadlock); retry",
                         info={"retryAfter": "1"}, reason="store_conflict")


class StoreOutage:
    """Says once that the database went away and once that it answers again, however many calls failed meanwhile
    (every request and background loop of a busy node fails within the same second).

    A database short of room (:func:`opendps.store.short_of_room`: its disk full) still answers reads, and even some
    writes (SQLite reuses a checkpointed WAL's room): such an outage is over only once no call has been refused for
    ``quiet`` seconds (the heartbeat writes every 2 s), not at the first read that succeeds — else each read and the
    next refused write told the outage's end and start again, two lines per request."""

    def __init__(self, quiet: float = STORE_QUIET) -> None:
        self._lock = threading.Lock()
        self.quiet = quiet
        self.since: float | None = None  # when the first call failed, while the outage lasts
        self.refused = 0
        self.short = False  # the outage is the database's want of room, not its absence
        self.last_refused = 0.0

    def failed(self, exc: BaseException) -> None:
        short = short_of_room(exc)
        with self._lock:
            now = time.monotonic()
            first = self.since is None
            if first:
                self.since = now
            self.refused += 1
            self.last_refused = now
            self.short = self.short or short
        if first and short:
            store_log.warning("the database cannot store for now (%s): is its disk full? Writes are refused as retryable "
                              "(HTTP 503, MQTT CONNACK 3 or no PUBACK) until it stores again", driver_message(exc))
        elif first:
            store_log.warning("the database is unavailable (%s): requests are refused as retryable (HTTP 503, MQTT "
                              "CONNACK 3) until it answers again", driver_message(exc))

    def answered(self) -> None:
        """A domain call succeeded: if an outage was on, it is over (one of want of room: if none failed lately)."""
        if self.since is None:  # the usual case: one attribute read per call
            return
        with self._lock:
            if self.since is None:
                return
            now = time.monotonic()
            if self.short and now - self.last_refused < self.quiet:
                return
            took, refused, short = now - self.since, self.refused, self.short
            self.since, self.refused, self.short = None, 0, False
        store_log.info("the database %s again after %.1f s (%d call(s) refused meanwhile)",
                       "stores" if short else "answers", took, refused)



class DomainRunner:
    """The one bridge from the event loop to synchronous domain code: a few threads of its own.

    Each call runs in a copy of the caller's context (``run_in_executor`` alone does not carry context variables
    into the thread): what the request set — who is acting, for the audit log (``opendps.audit.ACTOR``), the request
    id its log lines carry (``opendps.logs.REQUEST_ID``) — is what the domain code sees, and nothing a call sets leaks
    into the thread's next call.

    Calls go to a few core threads (``core``; by default the CPU count, 2-4; ``build`` asks for one on SQLite, where
    writers take turns at the file anyway and a second thread only contended for the GIL): a burst queues there rather than wake
    eight threads that take turns at the GIL, each hand-off a context switch (8 threads cost ~10 % more CPU per hub
    CONNECT than 2 on this project's 2-CPU machine). When the core threads are held by slow calls — a custom-allocation
    webhook, a database lock wait — a call waiting behind them is offered to the spare threads too (``workers`` in
    all) once no core call has finished for ``stall`` seconds; whichever thread takes it first runs it, so a slow call
    never holds the others up for longer than that.

    Why not ``concurrent.futures``: every hub CONNECT and registration makes two or three domain calls, and a
    ``ThreadPoolExecutor`` call (a ``Future`` with its ``Condition``, a work item, ``wrap_future``'s second future and
    its callbacks, one wake-up of the loop per result) cost about as much Python as the CONNECT's own store work. Here a
    call is one small object and one asyncio future; results that finish while the loop is busy come back with one
    wake-up (:class:`_Inbox`).

    Every call is timed (``opendps_domain_queue_wait_seconds``: waiting for a thread; ``opendps_domain_call_duration_
    seconds{call}``: running, store and signing included), and ``waiting`` counts the calls not yet started."""

    def __init__(self, workers: int = 8, *, core: int | None = None, stall: float = 0.025) -> None:
        self.core_size = min(workers, core if core is not None else max(2, min(4, os.cpu_count() or 2)))
        self.spare_size = workers - self.core_size
        self.stall = stall
        self.waiting = 0  # calls submitted, not yet started (read by the metrics sampler)
        self.outage = StoreOutage()  # database errors become StoreUnavailable here, for every front end at once
        self._lock = threading.Lock()
        self._core: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._spare: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._spare_started = False
        self._closed = False
        self._core_busy = 0  # calls given to the core threads that no core thread has taken off its queue yet or ended
        self._core_progress = time.monotonic()  # when a core call last finished
        self._inbox: _Inbox | None = None
        # threads hold the queues, not the runner: a runner nobody closed (a test's) lets its threads end when collected
        self._stop = weakref.finalize(self, _stop, self._core, self._spare, self._threads)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        inbox = self._inbox
        if inbox is None or inbox.loop is not loop:
            inbox = self._inbox = _Inbox(loop)
        call = _Call(self, fn, args, kwargs, inbox)
        with self._lock:
            if self._closed:
                raise RuntimeError("the domain runner is closed")
            if not self._threads:
                self._start(self._core, self.core_size, "opendps-domain")
            self.waiting += 1
            crowded = self._core_busy >= self.core_size
            self._core_busy += 1
        self._core.put(call)
        try:
            if crowded and self.spare_size:
                await self._unless_stuck(call)
            result: T = await call.future
            return result
        except BaseException:
            call.abandon()  # the caller left: if no thread took the call yet, none will (as run_in_executor does)
            raise

    async def _unless_stuck(self, call: _Call) -> None:
        """Wait while ``call`` waits behind core threads that still finish calls; if they stop, offer it to the spares."""
        wait = self.stall
        while not call.future.done():
            await asyncio.wait({call.future}, timeout=wait)
            wait = min(wait * 2, 8 * self.stall)  # a long queue behind busy core threads: fewer and fewer checks
            with self._lock:
                stuck = call.state is _QUEUED and time.monotonic() - self._core_progress > self.stall
                if stuck and not self._spare_started:
                    self._spare_started = True
                    self._start(self._spare, self.spare_size, "opendps-domain-spare")
            if stuck:
                self._spare.put(call)  # the first thread to take it runs it; the core's copy is then skipped
                return
            if call.state is not _QUEUED:
                return

    def _start(self, lane: queue.SimpleQueue[_Call | None], count: int, name: str) -> None:
        for i in range(count):
            thread = threading.Thread(target=_work, args=(lane, lane is self._core), name=f"{name}_{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _taken(self, call: _Call, core: bool) -> bool:
        """A thread took ``call`` off its queue: True if it is to run it (no other thread did, its caller still waits).
        A core call counts as busy from its submission until a core thread ended it or skipped it."""
        with self._lock:
            if call.state is not _QUEUED:
                if core:
                    self._core_busy -= 1
                return False
            call.state = _RUNNING
            self.waiting -= 1
            return True

    def _ended(self, core: bool) -> None:
        if core:
            with self._lock:
                self._core_busy -= 1
                self._core_progress = time.monotonic()

    def close(self) -> None:
        """Stop taking calls; calls not started are cancelled; waits for the running ones to end."""
        with self._lock:
            self._closed = True
        for lane in (self._core, self._spare):
            while True:
                try:
                    call = lane.get_nowait()
                except queue.Empty:
                    break
                if call is not None:
                    call.abandon(notify=True)
        self._stop()
        current = threading.current_thread()
        for thread in self._threads:
            if thread is not current:
                thread.join()


_QUEUED, _RUNNING, _ABANDONED = "queued", "running", "abandoned"


class _Call:
    """One domain call on its way through a thread and back to its caller's loop."""

    __slots__ = ("runner", "fn", "args", "kwargs", "context", "future", "inbox", "submitted", "state", "result", "error")

    def __init__(self, runner: DomainRunner, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 inbox: _Inbox) -> None:
        self.runner = runner
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.context = contextvars.copy_context()
        self.future: asyncio.Future[Any] = inbox.loop.create_future()
        self.inbox = inbox
        self.submitted = time.perf_counter()
        self.state = _QUEUED
        self.result: Any = None
        self.error: BaseException | None = None

    def execute(self, core: bool) -> None:
        """In a domain thread: run unless another thread did or the caller left, then send the outcome back."""
        runner = self.runner
        if not runner._taken(self, core):
            return
        started = time.perf_counter()
        try:
            self.result = self.context.run(self.fn, *self.args, **self.kwargs)
        except StopIteration as exc:  # a future cannot hold StopIteration (as asyncio's tasks say)
            self.error = RuntimeError(f"domain call raised StopIteration: {exc}")
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, as concurrent.futures does
            self.error = exc
            if isinstance(exc, Exception) and not isinstance(exc, OpenDPSError) and unavailable(exc):
                runner.outage.failed(exc)
                self.error = StoreUnavailable()
                self.error.__cause__ = exc
            elif isinstance(exc, Exception) and not isinstance(exc, OpenDPSError) and conflicted(exc):
                store_log.info("a database transaction was aborted in a conflict with a concurrent one (%s): "
                               "refused as retryable", driver_message(exc))
                self.error = StoreConflict()
                self.error.__cause__ = exc
        else:
            runner.outage.answered()
        finally:
            runner._ended(core)
            metrics.domain_call(metrics.call_name(self.fn), started - self.submitted, time.perf_counter() - started)
        self.inbox.post(self)

    def abandon(self, *, notify: bool = False) -> None:
        """The caller left (or the runner closed) before a thread took the call: it never runs."""
        runner = self.runner
        with runner._lock:
            if self.state is not _QUEUED:
                return
            self.state = _ABANDONED
            runner.waiting -= 1
        if notify:
            self.error = asyncio.CancelledError()
            self.inbox.post(self)

    def settle(self) -> None:
        """On the loop: hand the outcome to the caller, unless it left."""
        future = self.future
        if future.done():
            return
        if isinstance(self.error, asyncio.CancelledError):
            future.cancel()
        elif self.error is not None:
            future.set_exception(self.error)
        else:
            future.set_result(self.result)


class _Inbox:
    """Calls that finished, on their way back to one event loop: whatever finishes while the loop is busy comes back
    with one wake-up (one write to the loop's self-pipe), not one each."""

    __slots__ = ("loop", "_done", "_lock", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._done: list[_Call] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, call: _Call) -> None:
        with self._lock:
            self._done.append(call)
            if self._scheduled:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            done, self._done = self._done, []
            self._scheduled = False
        for call in done:
            try:
                call.settle()
            except Exception as exc:  # noqa: BLE001 - one outcome a future refuses must not strand the other callers
                if not call.future.done():
                    call.future.set_exception(RuntimeError(f"the domain call's outcome could not be handed over: {exc!r}"))


def _work(lane: queue.SimpleQueue[_Call | None], core: bool) -> None:
    """A domain thread: takes calls off its lane's queue until told to stop (None)."""
    while (call := lane.get()) is not None:
        call.execute(core)
        del call  # nothing of the last call (its arguments, result, error) stays alive while the thread waits


def _stop(core: queue.SimpleQueue[_Call | None], spare: queue.SimpleQueue[_Call | None],
          threads: list[threading.Thread]) -> None:
    for thread in threads:
        (core if not thread.name.startswith("opendps-domain-spare") else spare).put(None)


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


def wall_clock_timer(until: float, callback: Callable[[], None], *, check: float,
                     clock: Callable[[], float] = time.time) -> asyncio.TimerHandle:
    """Call ``callback`` when the wall clock reaches ``until`` (unix seconds: a SAS token's expiry), or after ``check``
    seconds at the latest, for the callback to look at the clock again and re-arm: the loop's timers run on the
    monotonic clock, so a wall clock stepped back is waited for and one stepped forward is seen at the next look.
    ``until`` may be any number: compared before subtracting (10**400 minus a float overflows)."""
    now = clock()
    delay = check if until > now + check else max(0.0, until - now)
    return asyncio.get_running_loop().call_later(delay, callback)


CONNECT_DEADLINE = 10.0  # seconds to connect (TLS, then CONNECT or SASL and open); see Runtime.connect_deadline


@dataclass
class Runtime:
    """Built once per process by :func:`opendps.frontends.build`; every front end gets this, typed."""

    services: Services
    domain: DomainRunner = field(default_factory=DomainRunner)
    # seconds a client may stay silent: an HTTPS connection between requests (or sending a request header), a DPS
    # MQTT session (its keepalive is bounded by it, "none" included); and at most CONNECT_DEADLINE to connect
    client_timeout: float = 60.0
    live: LiveSessions = field(default_factory=LiveSessions)
    telemetry_bus: TelemetryBus = field(default_factory=TelemetryBus)
    telemetry_writer: GroupCommit = field(init=False)
    telemetry_router: NatsRouter = field(init=False)
    refusals: RefusalRecorder = field(init=False)  # device requests refused, to the refusal log (batched)
    store_gauges: metrics.StoreGauges = field(init=False)  # /metrics' gauges read from the store (cached)
    status_cache: dict[int, tuple[float, dict[str, Any]]] = field(default_factory=dict)  # GET /status, a few seconds
    cluster: Cluster | None = None  # this process as a node of the service (None: alone, e.g. in-process tests)
    hub_names: dict[int, str] = field(default_factory=dict)  # hub id -> name, of hubs with a device session here

    @property
    def connect_deadline(self) -> float:
        """Seconds a new connection gets to finish its TLS handshake, and then its MQTT CONNECT or its AMQP SASL and
        open: :data:`CONNECT_DEADLINE`, or the client timeout when that is shorter (a client is silent while it does
        not connect either: an operator who shortens the one to shed silent connections sooner shortens both)."""
        return min(CONNECT_DEADLINE, self.client_timeout)

    def __post_init__(self) -> None:
        # telemetry from many sessions shares transactions (hub.telemetry.GroupCommit), in the domain's threads
        self.telemetry_writer = GroupCommit(self.services.telemetry, self.domain.run, on_stored=self._telemetry_stored)
        self.telemetry_router = NatsRouter(self.services.routes, self.domain.run)
        self.refusals = RefusalRecorder(self.services.inventory.refusals, self.domain.run)
        self.store_gauges = metrics.StoreGauges(self.services)

    def _telemetry_stored(self, messages: list[Message]) -> None:
        """A group commit stored a batch: live consumers are woken once, the counters counted per hub."""
        self.telemetry_bus.notify()
        by_hub: dict[int, list[int]] = {}
        for hub_id, _, _, _, body in messages:
            counted = by_hub.get(hub_id)
            if counted is None:
                by_hub[hub_id] = [1, len(body)]
            else:
                counted[0] += 1
                counted[1] += len(body)
        for hub_id, (count, size) in by_hub.items():
            metrics.telemetry(self.hub_names.get(hub_id) or str(hub_id), size, count)

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
                           endpoints: dict[str, object] | None = None, replaces: str | None = None) -> Cluster:
        """Become a node: recorded in ``cluster_nodes``, heartbeating, live sessions routed over the store's bus (or
        NATS at ``bus_url``) to and from the other processes and nodes. ``replaces``: the node of the dead process
        this one restarts (see :meth:`Cluster.start`)."""
        store = self.services.store
        bus = choose_bus(store, self.domain.run, self.services.id_scope, bus_url)
        cluster = Cluster(store, bus, self.domain.run, worker=worker, endpoints=dict(endpoints or {}))
        self.live.join(cluster, Presence(store, self.services.hubs), self.domain.run, self.services.c2d.waiting,
                       recheck=self.services.hub_auth.no_longer_allowed)
        cluster.on_rejoin = self.live.rejoin
        cluster.on_resumed = self.live.resumed
        # a NATS bus that is not there yet connects in the background
        await cluster.start(self._on_peer_message, replaces=replaces)
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
