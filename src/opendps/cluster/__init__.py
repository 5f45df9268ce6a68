"""This server process as one node of the service: its row in ``cluster_nodes`` (heartbeat, endpoints, shown by
``opendps info``), which other nodes are alive, and the bus that carries live hub state between them
(:mod:`.bus`). The hub's live sessions use it through ``hub.live.Peers``; nothing here decides about devices.

Every process is a node, whether it is one of ``--workers N`` on a host or a host of its own: the store is what
they share, and the bus is chosen from it — PostgreSQL ``LISTEN``/``NOTIFY`` on PostgreSQL, the
``live_messages`` table on SQLite, or NATS when the operator names a NATS server (docs/architecture.md,
"Process model").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from opendps.cluster.bus import Bus, NatsBus, PostgresBus, TableBus
from opendps.cluster.nodes import NodeInfo, Nodes
from opendps.store import Store

__all__ = ["NODE_TIMEOUT", "Bus", "Cluster", "NatsBus", "NodeInfo", "Nodes", "PostgresBus", "TableBus", "choose_bus"]

log = logging.getLogger("opendps.cluster")
HEARTBEAT = 2.0  # seconds between heartbeats
NODE_TIMEOUT = 10.0  # a node silent this long is dead: its row and its devices' presence are deleted
Run = Callable[..., Awaitable[Any]]


def choose_bus(store: Store, run: Run, installation: str, bus_url: str | None = None) -> Bus:
    """The carrier for this store: NATS when ``bus_url`` names one, else the store's own. ``installation`` (the ID
    scope) names the channel or subjects, so installations sharing a PostgreSQL database or a NATS server stay apart."""
    nodes = Nodes(store)
    name = re.sub(r"[^a-z0-9]", "_", installation.lower())
    if bus_url:
        return NatsBus(bus_url, f"opendps.{name}.live")
    if store.dialect == "postgresql":
        return PostgresBus(store.url, nodes, run, f"opendps_live_{name}"[:63])
    return TableBus(nodes, run)


class Cluster:
    """One node: joins at :meth:`start`, heartbeats, sweeps dead nodes, leaves at :meth:`stop`."""

    def __init__(self, store: Store, bus: Bus, run: Run, *, worker: int = 0,
                 endpoints: dict[str, Any] | None = None, heartbeat: float = HEARTBEAT,
                 timeout: float = NODE_TIMEOUT) -> None:
        self.nodes = Nodes(store)
        self.bus = bus
        self.run = run
        self.worker = worker
        self.endpoints = endpoints or {}
        self.heartbeat = heartbeat
        self.timeout = timeout
        self.node_id = str(uuid.uuid4())
        self._alive: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._deliver: Callable[[dict[str, Any]], None] = lambda _m: None
        self.on_rejoin: Callable[[], Awaitable[None]] | None = None  # the row was swept: presence must be re-recorded
        # the bus works again after an outage: what its lost messages would have done is caught up
        self.on_resumed: Callable[[], Awaitable[None]] | None = None
        self._unsent = 0  # live messages not sent since the last one that was (an outage is told once)

    # ---- lifecycle ----
    def _info(self) -> NodeInfo:
        now = datetime.now(UTC)
        return NodeInfo(self.node_id, socket.gethostname(), os.getpid(), self.worker, self.endpoints, now, now)

    async def start(self, deliver: Callable[[dict[str, Any]], None], *, replaces: str | None = None) -> None:
        """Join (the row exists before any presence refers to it), start hearing messages, and heartbeat.

        ``replaces``: the node of the process this one restarts (``opendps.workers`` knows it died: it reaped it).
        Its row goes now, with its devices' presence, instead of after the node timeout: until then the devices it
        held looked connected, and a direct method for one went to the dead node and was a 504 after the whole
        timeout instead of a 404 at once."""
        self._deliver = deliver
        self.bus.on_resumed = self._resumed
        await self.run(self.nodes.join, self._info())
        if replaces is not None and replaces != self.node_id:
            try:
                await self.run(self.nodes.leave, replaces)
                log.info("node %s (this worker's previous process) removed, with its devices' presence", replaces)
            except Exception as exc:  # noqa: BLE001 - the sweep removes it after the node timeout
                log.warning("node %s of this worker's previous process not removed (%s); the sweep will", replaces, exc)
        try:
            await self.bus.start(self.node_id, self._receive)
        except BaseException:
            with contextlib.suppress(Exception):  # the bus's error is the one to tell; the sweep removes the row
                await self.run(self.nodes.leave, self.node_id)  # never joined: the others need not wait to sweep it
            raise
        await self._refresh()
        self._task = asyncio.get_running_loop().create_task(self._beat())
        log.info("node %s (worker %d, pid %d) joined; bus: %s; %d node(s) alive", self.node_id, self.worker,
                 os.getpid(), self.bus.name, len(self._alive))

    async def stop(self) -> None:
        """Leave: the row and this node's presence rows are deleted, so others stop routing here at once."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.bus.close()
        try:
            await self.run(self.nodes.leave, self.node_id)
        except Exception as exc:  # noqa: BLE001 - the store is away: the others sweep this row after the timeout
            log.warning("node %s could not leave cleanly: %s", self.node_id, exc)

    async def _beat(self) -> None:
        beats = failures = 0
        while True:
            await asyncio.sleep(self.heartbeat)
            beats += 1
            try:
                if not await self.run(self.nodes.beat, self.node_id):
                    log.warning("node %s was taken for dead (its heartbeat stopped for %g s); joining again",
                                self.node_id, self.timeout)
                    await self.run(self.nodes.join, self._info())
                    if self.on_rejoin is not None:
                        await self.on_rejoin()
                if beats % 3 == 0:
                    swept = await self.run(self.nodes.sweep, self.timeout)
                    if swept:
                        log.info("%d silent node(s) removed, with their devices' presence", swept)
                await self._refresh()
                if failures:
                    log.info("node %s heartbeat resumed after %d failed", self.node_id, failures)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the store is busy or away: beat again next time
                failures += 1  # said once, not every heartbeat while the store is away
                (log.warning if failures == 1 else log.debug)("node %s heartbeat failed: %s", self.node_id, exc)

    async def _refresh(self) -> None:
        self._alive = {n.id for n in await self.run(self.nodes.alive, self.timeout)} | {self.node_id}
        self.bus.peers(len(self._alive) - 1)

    # ---- what the live sessions use ----
    async def alive(self, node_id: str) -> bool:
        """Whether ``node_id`` heartbeated within the timeout: from the list read at the last heartbeat, read again
        for a node not on it (one that joined since)."""
        if node_id not in self._alive:
            await self._refresh()
        return node_id in self._alive

    def alone(self) -> bool:
        """No other node was alive at the last heartbeat's read (:meth:`alive` reads again for a node not seen)."""
        return self._alive <= {self.node_id}

    async def send(self, message: dict[str, Any], to: str | None = None) -> bool:
        """Send to node ``to`` (None: every other node); a carrier failure is logged, not raised: live messages
        are hints whose loss the caller survives (timeouts, the store's state). False: not sent (a caller waiting for
        an answer says so at once)."""
        if to == self.node_id:
            self._deliver(message)
            return True
        try:
            await self.bus.publish({**message, "from": self.node_id}, to)
        except Exception as exc:  # noqa: BLE001 - see above
            self._unsent += 1  # said once, not for every message while the carrier is away
            (log.warning if self._unsent == 1 else log.debug)("live message %r not sent: %s", message.get("op"), exc)
            return False
        if self._unsent:
            log.info("live messages sent again (%d were not)", self._unsent)
            self._unsent = 0
        return True

    async def _resumed(self) -> None:
        if self.on_resumed is not None:
            await self.on_resumed()

    def _receive(self, message: dict[str, Any]) -> None:
        if message.get("from") == self.node_id:
            return  # our own broadcast
        try:
            self._deliver(message)
        except Exception:  # a bad message must not stop the bus
            log.exception("live message %r could not be handled", message.get("op"))
