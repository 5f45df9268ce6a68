"""What the front ends of one process share: the domain services, the one bridge from the event loop to
them, and the live hub state of this process.

Domain code is synchronous (SQLAlchemy sessions, ``cryptography``); front ends are asyncio. Every domain
call from a front end goes through :class:`DomainRunner`, a bounded thread pool, never onto the loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import ParamSpec, TypeVar

from opendps.cluster import Cluster, choose_bus
from opendps.hub import GroupCommit, LiveSessions, NatsRouter, PendingMessage, TelemetryBus
from opendps.hub.presence import Presence
from opendps.services import Services

P = ParamSpec("P")
T = TypeVar("T")


class DomainRunner:
    """The one bridge from the event loop to synchronous domain code: a bounded thread pool.

    Each call runs in a copy of the caller's context (``run_in_executor`` alone does not carry context variables
    into the thread): what the request set — who is acting, for the audit log (``opendps.audit.ACTOR``) — is what the
    domain code sees, and nothing a call sets leaks into the thread's next call."""

    def __init__(self, workers: int = 8) -> None:
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="opendps-domain")

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, functools.partial(context.run, fn, *args, **kwargs))

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


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
    cluster: Cluster | None = None  # this process as a node of the service (None: alone, e.g. in-process tests)

    def __post_init__(self) -> None:
        # telemetry from many sessions shares transactions (hub.telemetry.GroupCommit), in the domain's threads
        self.telemetry_writer = GroupCommit(self.services.telemetry, self.domain.run)
        self.telemetry_router = NatsRouter(self.services.routes, self.domain.run)

    async def queue_c2d(self, hub: str, device_id: str, body: bytes, *, system: dict[str, str],
                        properties: dict[str, str | None], ttl: timedelta | None) -> PendingMessage:
        """The one path from a front end (REST or AMQP) to the C2D queue: enqueue durably in the domain thread pool,
        then wake the device's live session. ``system`` uses the queue's names (``message-id``, ``correlation-id``,
        ``user-id``, ``ack``, ``content-type``, ``content-encoding``)."""
        message = await self.domain.run(self.services.c2d.enqueue, hub, device_id, body, properties=properties,
                                        system=system, ttl=ttl)
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
