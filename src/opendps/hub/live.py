"""Live hub state: which device is connected to this process, the direct-method calls waiting for its answer,
and — through :class:`Peers` — the devices connected to other processes and nodes. The service side (REST and
AMQP front ends) reaches a connected device only through :class:`LiveSessions`, wherever the device is.

A front end (MQTT today) attaches a :class:`DeviceLink` per connected device and detaches it when the
connection ends; the link turns the calls below into its wire (publishes on the device's topics). The local
map lives on the event loop. Each attach and detach is recorded as presence (``hub.presence``: which node holds
the device, written in batches after the CONNACK); a call for a device that is not here goes to the node that
presence names, over the cluster's bus (``opendps.cluster``), and comes back the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

from opendps.errors import GatewayTimeout, InvalidInput, NotFound, ServiceUnavailable
from opendps.hub.auth import AuthenticatedDevice, device_key
from opendps.hub.presence import Change, Displaced, Presence, PresenceWriter

log = logging.getLogger("opendps.hub")
METHODS = "methods"
DESIRED = "desired"
C2D = "c2d"
MAX_METHOD_NAME = 1024
# a direct method's name travels in the device's topic, $iothub/methods/POST/{name}/?$rid=..: IoT Hub's rule (US-ASCII
# printable, none of $ ( ) < > @ , ; : \ " / [ ] ? = { }, no space or tab), without # and + (MQTT's wildcards,
# which no PUBLISH topic may hold): RFC 7230's token characters but $ # +
_METHOD_NAME = re.compile(r"[!%&'*.0-9A-Z^_`a-z|~-]+")


def check_method_name(value: object) -> str:
    """A direct method's name, or InvalidInput naming what is wrong with it: checked before any device is looked for, so
    a name that cannot be a topic level is a 400, never a malformed PUBLISH (a NUL, a wildcard, past 64 KiB: a 500)."""
    if not isinstance(value, str) or not value:
        raise InvalidInput("methodName is required: the name of the device's method")
    if len(value) > MAX_METHOD_NAME or not _METHOD_NAME.fullmatch(value):
        raise InvalidInput(f"methodName {value[:40]!r}{'...' if len(value) > 40 else ''} is invalid: use 1-"
                           f"{MAX_METHOD_NAME} US-ASCII letters, digits and ! % & ' * - . ^ _ ` | ~")
    return value


# IoT Hub's bound on a direct method's request (and response) payload: a JSON document up to 128 KB
MAX_METHOD_PAYLOAD = 128 * 1024
# how often a call waiting for its device to connect (connectTimeoutInSeconds) looks for it on other nodes (seconds);
# a device that connects or subscribes here wakes it at once
DEVICE_LOOKUP_INTERVAL = 1.0


def check_method_payload(payload: object) -> None:
    """InvalidInput when a direct method's payload is over IoT Hub's 128 KB (its JSON text as UTF-8, compact): checked
    before any device is looked for, as IoT Hub refuses it, instead of handing the device what no hub would send."""
    size = len(json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode())
    if size > MAX_METHOD_PAYLOAD:
        raise InvalidInput(f"'payload' must be at most {MAX_METHOD_PAYLOAD} bytes of JSON (IoT Hub's limit); it is {size}")


class DeviceOffline(NotFound):
    error_code = 404103


class NotListening(DeviceOffline):
    """The device is not connected, or not subscribed to methods: the call was not handed to it, so a caller willing
    to wait for it (``connectTimeoutInSeconds``) may try again."""


class MethodTimeout(GatewayTimeout):
    """The device did not answer a direct method in time."""


class NodeUnreachable(ServiceUnavailable):
    """The device is connected to another node and the live bus to it is down: a call cannot reach it for now."""


class DeviceLink(Protocol):
    """One connected device as a front end carries it."""

    device: AuthenticatedDevice

    def subscribed(self, feature: str) -> bool:
        """Whether the device listens for ``methods``, ``desired`` property pushes or ``c2d`` messages."""
        ...

    async def send_method(self, method: str, request_id: str, payload: Any) -> None:
        """Deliver a direct-method request; raises DeviceOffline when the connection is gone."""
        ...

    async def send_desired(self, desired: dict[str, Any], version: int) -> None:
        """Push a desired-properties patch (best effort: only while connected)."""
        ...

    def wake_c2d(self) -> None:
        """Cloud-to-device messages are waiting in the store: deliver them."""
        ...

    def close(self, reason: str) -> None:
        """End the connection now."""
        ...


class Peers(Protocol):
    """The other server processes and nodes, as live sessions reach them (:class:`opendps.cluster.Cluster`)."""

    node_id: str

    async def alive(self, node_id: str) -> bool:
        ...

    async def send(self, message: dict[str, Any], to: str | None = None) -> bool:
        """To node ``to``, or to every other node (None); never raises: False when the carrier is down."""
        ...

    def alone(self) -> bool:
        """No other node was alive at the last heartbeat (a node seen since is found through presence)."""
        ...


_TAKEN_OVER = "taken over by a new connection of the same device on another node"
# desired-property pushes to one device not yet taken by its connection: past this it is cut off (it reconnects
# and reads the whole twin, as Azure's SDKs do), instead of queueing without bound
DESIRED_BACKLOG = 32
# how long a drop or revocation is remembered for the CONNECTs that were being checked when it was heard (seconds): a
# CONNECT checks in well under this; one that took longer is closed at its attach (it cannot be told safe)
HEARD_FOR = 300.0


# how long a desired push waits for the versions before it (seconds): their writes were made by other processes or
# nodes and are crossing the bus (milliseconds; SQLite's table bus is read every 50 ms)
DESIRED_REORDER_WAIT = 0.5


@dataclass(slots=True)
class _DesiredOrder:
    """A link's desired pushes in version order: the last version handed out, later ones held for a missing one."""

    last: int
    held: dict[int, dict[str, Any]] | None = None  # made when a push waits: a link holds one of these for its life
    timer: asyncio.TimerHandle | None = None


class _Live(NamedTuple):
    """A device's connection to this process."""

    link: DeviceLink
    session: str  # its id in presence
    since: datetime  # when it began: the newest connection wins across nodes


def _key(hub_name: str, device_id: str) -> tuple[str, str]:
    return hub_name, device_key(device_id)


class LiveSessions:
    """Connected devices by (hub, device id) and pending direct-method calls; one per process. Without
    :meth:`join` it knows only this process (tests, a single embedded server)."""

    def __init__(self) -> None:
        self._links: dict[tuple[str, str], _Live] = {}
        # pending direct methods: (device key, request id) -> (the answer, the link the request went out on)
        self._methods: dict[tuple[tuple[str, str], str], tuple[asyncio.Future[tuple[int, Any]], DeviceLink]] = {}
        self._request_ids = itertools.count(1)
        self.peers: Peers | None = None
        self.presence: Presence | None = None
        self._writer: PresenceWriter | None = None
        self._run: Callable[..., Awaitable[Any]] | None = None
        self._remote: dict[str, asyncio.Future[tuple[int, Any]]] = {}  # our method calls out on other nodes
        self._tasks: set[asyncio.Task[Any]] = set()
        self._c2d_waiting: Callable[[list[tuple[int, str]]], set[tuple[int, str]]] | None = None
        self._recheck: Callable[[list[AuthenticatedDevice]], list[tuple[AuthenticatedDevice, str]]] | None = None
        self._hub_names: dict[int, str] = {}  # hub id -> name, of the hubs whose devices attached here
        # pushes on their way to a link, by id(link) (links need not be hashable; a task holds each one counted)
        self._desired_waiting: dict[int, int] = {}
        # the desired version each link was handed last and the pushes held for earlier ones (by id(link), until detach)
        self._desired_order: dict[int, _DesiredOrder] = {}
        # drops and revocations heard lately (monotonic time, oldest first), for :meth:`attach`: a CONNECT checked
        # before one was made attaches after it was carried out, and would stay connected
        self._heard: dict[Any, float] = {}
        self._revocations: list[tuple[float, frozenset[str], frozenset[str]]] = []
        # direct-method calls waiting for their device to connect and subscribe here (connectTimeoutInSeconds), by
        # device key: woken by attach and :meth:`listening`; a key goes with its last waiter
        self._awaited: dict[tuple[str, str], list[asyncio.Future[None]]] = {}
        # twin writes of a device under way in this process, each with its desired push (:meth:`twin_turn`): the
        # lock and how many hold or wait for it; a key goes with its last writer
        self._twin_turns: dict[tuple[str, str], tuple[asyncio.Lock, list[int]]] = {}

    def join(self, peers: Peers, presence: Presence, run: Callable[..., Awaitable[Any]],
             c2d_waiting: Callable[[list[tuple[int, str]]], set[tuple[int, str]]] | None = None, *,
             recheck: Callable[[list[AuthenticatedDevice]], list[tuple[AuthenticatedDevice, str]]] | None = None,
             ) -> None:
        """Take part in the cluster: record presence, reach devices on other nodes through ``peers``.
        ``c2d_waiting`` (``CloudToDevice.waiting``) names the devices with cloud-to-device messages queued;
        ``recheck`` (``HubAuthenticator.no_longer_allowed``) the sessions CONNECT would refuse now."""
        self.peers, self.presence, self._run = peers, presence, run
        self._c2d_waiting = c2d_waiting
        self._recheck = recheck
        self._writer = PresenceWriter(presence, peers.node_id, run, self._displaced, on_recorded=self._recorded)

    async def flush(self) -> None:
        """Presence recorded so far is in the store (tests; a clean stop)."""
        if self._writer is not None:
            await self._writer.flush()

    async def rejoin(self) -> None:
        """Our node row was swept (a long stall): record every local session again."""
        if self._writer is not None:
            for link, session, since in list(self._links.values()):
                self._writer.add(Change(link.device.hub_id, link.device.device_key.lower(), session, True, since))

    async def resumed(self) -> None:
        """The bus works again after an outage: what its lost messages would have done is caught up. Drops and
        revocations: the sessions here that CONNECT would refuse now (the device disabled or deleted, its certificate
        revoked meanwhile) are closed — else a disabled device stayed connected until it reconnected. C2D wake-ups:
        the sessions here with messages waiting are woken. One read of each kind per 500 sessions. Lost desired
        pushes are not made up: a device reads its twin when it reconnects, as with IoT Hub."""
        if self._writer is None:
            return
        live = list(self._links.values())
        for start in range(0, len(live), 500):
            chunk = live[start:start + 500]
            if self._recheck is not None and self._run is not None:
                try:
                    refused = await self._run(self._recheck, [link.device for link, _, _ in chunk])
                except Exception as exc:  # noqa: BLE001 - the store is away too: the next outage's end checks again
                    log.warning("sessions not re-checked after the live bus came back: %s", exc)
                    refused = []
                sessions = {id(link.device): session for link, session, _ in chunk}
                for device, reason in refused:  # the session checked only: the device may have reconnected meanwhile
                    self._drop_here(device.hub_name, device.device_key, reason, sessions[id(device)])
            await self._recorded([Change(link.device.hub_id, link.device.device_key.lower(), session, True, since)
                                  for link, session, since in chunk])

    # ---- front end side ----
    def attach(self, link: DeviceLink, *, checked_since: float | None = None) -> None:
        """``link`` is the device's connection from now on; an older one of the same device is closed, here or on
        another node. ``checked_since``: when (``time.monotonic()``) its CONNECT began to be checked. A drop or
        revocation heard since then may have been made after the check read the store and carried out before this
        attach found the link (a device disabled, deleted, its hub unlinked or its certificate revoked while it
        connected): the link is closed at once instead of staying connected."""
        key = _key(link.device.hub_name, link.device.device_key)  # the key the device holds: no second string
        old = self._links.get(key)
        session, since = uuid.uuid4().hex, datetime.now(UTC)
        self._links[key] = _Live(link, session, since)
        self._hub_names[link.device.hub_id] = link.device.hub_name
        if old is not None and old[0] is not link:
            old[0].close("taken over by a new connection of the same device")
        if self._writer is not None:
            self._writer.add(Change(link.device.hub_id, key[1], session, True, since))
        if checked_since is not None:
            missed = self._missed(link.device, checked_since)
            if missed is not None:
                link.close(missed)
                return
        self._wake(key)

    def listening(self, link: DeviceLink) -> None:
        """The front end granted ``link`` a subscription: a direct-method call waiting for the device to subscribe
        (``connectTimeoutInSeconds``) looks again now."""
        self._wake(_key(link.device.hub_name, link.device.device_key))

    def _wake(self, key: tuple[str, str]) -> None:
        for waiter in self._awaited.pop(key, ()):
            if not waiter.done():
                waiter.set_result(None)

    def _hear(self, what: Any) -> None:
        """Remember a drop (``what``: ("device", hub name, key) or ("hub", hub id)) for :meth:`attach`."""
        now = time.monotonic()
        self._heard.pop(what, None)
        self._heard[what] = now  # newest last
        self._forget(now)

    def _forget(self, now: float) -> None:
        horizon = now - HEARD_FOR
        while self._heard:
            oldest = next(iter(self._heard))
            if self._heard[oldest] >= horizon:
                break
            del self._heard[oldest]
        while self._revocations and self._revocations[0][0] < horizon:
            self._revocations.pop(0)

    def _missed(self, device: AuthenticatedDevice, checked_since: float) -> str | None:
        """Why a session whose CONNECT was checked from ``checked_since`` on must not stay: a drop or revocation of
        it heard since then, or a check older than what is remembered; else None."""
        now = time.monotonic()
        self._forget(now)
        if checked_since < now - HEARD_FOR:
            return "its CONNECT was checked too long ago"
        heard = self._heard.get(("hub", device.hub_id))
        if heard is not None and heard >= checked_since:
            return f"hub {device.hub_name} was unlinked while the device connected"
        heard = self._heard.get(("device", device.hub_name, device.device_key))
        if heard is not None and heard >= checked_since:
            return "disabled or deleted by the service while the device connected"
        serial = device.certificate_serial
        if serial is not None:
            for at, serials, issuers in reversed(self._revocations):
                if at < checked_since:
                    break
                if serial in serials or device.issuer_key_id in issuers:
                    return f"certificate {serial} was revoked while the device connected"
        return None

    def detach(self, link: DeviceLink) -> None:
        """The connection ended: forget it, and fail the method calls it will never answer."""
        key = _key(link.device.hub_name, link.device.device_id)
        order = self._desired_order.pop(id(link), None)
        if order is not None and order.timer is not None:
            order.timer.cancel()
        current = self._links.get(key)
        if current is not None and current[0] is link:
            del self._links[key]
            if self._writer is not None:
                self._writer.add(Change(link.device.hub_id, key[1], current[1], False))
        for pending, (future, sent_on) in list(self._methods.items()):
            if sent_on is link:
                self._methods.pop(pending, None)
                if not future.done():
                    future.set_exception(DeviceOffline("device disconnected before answering the method"))

    def method_answered(self, link: DeviceLink, request_id: str | None, status: int, payload: Any) -> None:
        """The device's answer to a direct method (unknown or late answers are ignored)."""
        pending = self._methods.get((_key(link.device.hub_name, link.device.device_id), request_id or ""))
        if pending is not None and pending[1] is link and not pending[0].done():
            pending[0].set_result((status, payload))

    # ---- service side ----
    def link(self, hub_name: str, device_id: str) -> DeviceLink | None:
        """The device's connection to this process, if any."""
        current = self._links.get(_key(hub_name, device_id))
        return current[0] if current is not None else None

    def is_connected(self, hub_name: str, device_id: str) -> bool:
        """Connected to this process (see :meth:`connected_anywhere` for the whole service)."""
        return self.link(hub_name, device_id) is not None

    def connected(self, hub_name: str) -> frozenset[str]:
        """Lower-cased ids of the hub's devices connected to this process: a snapshot taken on the loop, for work
        (a query) that runs in the domain thread pool, where this map must not be read."""
        return frozenset(device for hub, device in self._links if hub == hub_name)

    async def connected_anywhere(self, hub_name: str, device_ids: list[str] | None = None) -> frozenset[str]:
        """Lower-cased ids of the hub's devices (of ``device_ids``) connected to any process or node."""
        here = self.connected(hub_name)
        if device_ids is not None:
            wanted = {d.lower() for d in device_ids}
            here = here & wanted
            if here == wanted or self.presence is None:
                return here
        if self.presence is None or self._run is None:
            return here
        found: frozenset[str] = await self._run(self.presence.connected, hub_name, device_ids)
        return here | found

    async def _locate(self, hub_name: str, device_id: str) -> str | None:
        """The live node, other than this one, that holds the device's session."""
        if self.presence is None or self._run is None or self.peers is None:
            return None
        found = await self._run(self.presence.locate, hub_name, device_id)
        if found is None or found[0] == self.peers.node_id or not await self.peers.alive(found[0]):
            return None
        return str(found[0])

    async def invoke_method(self, hub_name: str, device_id: str, method: str, payload: Any, *,
                            timeout: float = 30.0, connect_timeout: float = 0.0) -> tuple[int, Any]:
        """Direct method: (status, payload) from the device, wherever it is connected; DeviceOffline (404) or
        MethodTimeout (504). ``connect_timeout`` (IoT Hub's ``connectTimeoutInSeconds``, 0: the device must be
        listening already): how long to wait for a device that is not connected, or not subscribed to methods, to be
        so — then ``timeout`` runs from when the call is handed to it."""
        check_method_name(method)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + connect_timeout
        while True:
            try:
                return await self._invoke_once(hub_name, device_id, method, payload, timeout)
            except NotListening as exc:
                left = give_up - loop.time()
                if left <= 0:
                    if connect_timeout > 0:
                        raise DeviceOffline(f"timed out waiting for device {device_id!r} to connect and subscribe to "
                                            f"methods within {connect_timeout:g} s",
                                            info={"timeout": f"{connect_timeout:g}"}) from exc
                    raise
                await self._await_device(_key(hub_name, device_id), min(left, DEVICE_LOOKUP_INTERVAL))

    async def _invoke_once(self, hub_name: str, device_id: str, method: str, payload: Any,
                           timeout: float) -> tuple[int, Any]:
        if self.link(hub_name, device_id) is None:
            node = await self._locate(hub_name, device_id)
            if node is not None:
                return await self._invoke_remote(node, hub_name, device_id, method, payload, timeout)
        return await self._invoke_here(hub_name, device_id, method, payload, timeout)

    async def _await_device(self, key: tuple[str, str], wait: float) -> None:
        """Until the device attaches or subscribes here, or ``wait`` seconds (it may connect to another node)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._awaited.setdefault(key, []).append(waiter)
        try:
            await asyncio.wait_for(waiter, wait)
        except TimeoutError:
            pass
        finally:
            waiters = self._awaited.get(key)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._awaited[key]

    async def _invoke_here(self, hub_name: str, device_id: str, method: str, payload: Any,
                           timeout: float) -> tuple[int, Any]:
        link = self.link(hub_name, device_id)
        if link is None or not link.subscribed(METHODS):
            raise NotListening(f"device {device_id!r} is not connected and subscribed to methods")
        key = _key(hub_name, device_id)
        rid = str(next(self._request_ids))
        future: asyncio.Future[tuple[int, Any]] = asyncio.get_running_loop().create_future()
        self._methods[(key, rid)] = (future, link)

        async def call() -> tuple[int, Any]:
            await link.send_method(method, rid, payload)
            return await future

        try:
            # the send is within the timeout too: a device that reads nothing has its connection's buffer full, and
            # the publish waits for it — the caller was held until the write deadline cut the device off, then
            # answered 404; a request not sent in time is not sent at all
            return await asyncio.wait_for(call(), timeout)
        except TimeoutError as exc:
            raise MethodTimeout(f"device {device_id!r} did not answer method {method!r} within {timeout:g} s") from exc
        finally:
            self._methods.pop((key, rid), None)

    async def _invoke_remote(self, node: str, hub_name: str, device_id: str, method: str, payload: Any,
                             timeout: float) -> tuple[int, Any]:
        assert self.peers is not None
        call = uuid.uuid4().hex
        future: asyncio.Future[tuple[int, Any]] = asyncio.get_running_loop().create_future()
        self._remote[call] = future
        try:
            # "expires" (wall clock, as presence's connected_at trusts the nodes' clocks): a node that reads the call
            # after it (stalled: SIGSTOP, a long GC or swap) must not run it, its caller was answered 504 already
            sent = await self.peers.send({"op": "method", "call": call, "reply": self.peers.node_id, "hub": hub_name,
                                          "device": device_id, "method": method, "payload": payload,
                                          "timeout": timeout, "expires": time.time() + timeout}, node)
            if sent is False:  # said now, not as a 504 after the whole timeout
                raise NodeUnreachable(f"device {device_id!r} is connected to another node and the live bus to it is "
                                      "down; retry")
            # the other node times the device out; the margin covers the bus, and a node that died meanwhile
            return await asyncio.wait_for(future, timeout + 2.0)
        except TimeoutError as exc:
            raise MethodTimeout(f"device {device_id!r} did not answer method {method!r} within {timeout:g} s") from exc
        finally:
            self._remote.pop(call, None)

    @contextlib.asynccontextmanager
    async def twin_turn(self, hub_name: str, device_id: str) -> AsyncIterator[None]:
        """One service write of a device's twin at a time in this process, from before its transaction to its
        desired push (:meth:`push_desired`, made inside the turn). Why: concurrent writes of one twin take turns at
        its row, but each returns to the loop from its own domain thread, and a later version's push went out before
        an earlier one's about 1 in 80 concurrent PATCHes — a device applying patches in the order received ended
        with the older value of a property both set. The row's lock serialises the writes anyway: nothing is lost."""
        key = _key(hub_name, device_id)
        turn = self._twin_turns.get(key)
        if turn is None:
            turn = self._twin_turns[key] = (asyncio.Lock(), [0])
        turn[1][0] += 1
        try:
            async with turn[0]:
                yield
        finally:
            turn[1][0] -= 1
            if not turn[1][0]:
                del self._twin_turns[key]

    async def push_desired(self, hub_name: str, device_id: str, desired: dict[str, Any], version: int) -> None:
        """Desired properties changed: a connected, subscribed device hears of it now (others read the twin).

        With other nodes alive the patch is told to every one of them, not to the node presence names: a device
        moving between nodes has its new session attached (and its twin read) on another node before that node's
        presence write lands (the writer's linger), while the row still names its old session's node — this one,
        where it may still look connected, or none. A push routed by presence then reached only the old session, and
        the device never heard of that change while it stayed connected. Each node pushes to the session it holds
        (on PostgreSQL and SQLite a message for one node is read by every node anyway); a node that attaches the
        device after the message reads the twin after the change."""
        link = self.link(hub_name, device_id)
        if link is not None:
            self._push_desired(link, desired, version)
        if self.peers is None:
            return
        message = {"op": "desired", "hub": hub_name, "device": device_id, "desired": desired, "version": version}
        if not self.peers.alone():
            await self.peers.send(message)
        elif link is None:  # alone as last seen: a node that joined since holds the device only if presence says so
            node = await self._locate(hub_name, device_id)
            if node is not None:
                await self.peers.send(message, node)

    def _push_desired(self, link: DeviceLink, desired: dict[str, Any], version: int) -> None:
        """Hand a desired patch to ``link`` in version order. A patch whose version is past the next one the link
        expects waits (at most :data:`DESIRED_REORDER_WAIT` s) for the versions before it: writes made by other
        processes or nodes reach this one over the bus, in no set order (one PATCH in ~30 went out of order with
        two workers), and a device applying patches as they come kept an older value. An older version than one
        already handed out (after that wait, or right after the device connected) goes out as it comes."""
        if not link.subscribed(DESIRED):
            return
        order = self._desired_order.get(id(link))
        if order is not None and version > order.last + 1:
            if order.held is None:
                order.held = {}
            if len(order.held) >= DESIRED_BACKLOG:
                link.close(f"does not read its desired property updates ({len(order.held)} waiting)")
                return
            order.held[version] = desired
            if order.timer is None:
                order.timer = asyncio.get_running_loop().call_later(DESIRED_REORDER_WAIT, self._release_held, link)
            return
        if order is None:
            order = self._desired_order[id(link)] = _DesiredOrder(version)
        order.last = max(order.last, version)
        self._hand_desired(link, desired, version)
        held = order.held
        if held is None:
            return
        while order.last + 1 in held and self._desired_order.get(id(link)) is order:
            order.last += 1
            self._hand_desired(link, held.pop(order.last), order.last)
        if not held:
            order.held = None
            if order.timer is not None:
                order.timer.cancel()
                order.timer = None

    def _release_held(self, link: DeviceLink) -> None:
        """The versions a held push waited for did not come (a change that pushes nothing, such as a reprovisioning's
        twin reset, or a message lost): what waits goes out, in version order."""
        order = self._desired_order.get(id(link))
        if order is None:
            return
        order.timer = None
        held, order.held = order.held or {}, None
        for version in sorted(held):
            if self._desired_order.get(id(link)) is not order:  # cut off meanwhile
                return
            order.last = max(order.last, version)
            self._hand_desired(link, held[version], version)

    def _hand_desired(self, link: DeviceLink, desired: dict[str, Any], version: int) -> None:
        """Send in the background, in call order. Why not awaited: a device that reads nothing held the service's twin
        update until the write deadline cut it off; its pushes now wait here, at most :data:`DESIRED_BACKLOG` of
        them, then the device is cut off."""
        waiting = self._desired_waiting.get(id(link), 0)
        if waiting >= DESIRED_BACKLOG:
            link.close(f"does not read its desired property updates ({waiting} waiting)")
            return
        self._desired_waiting[id(link)] = waiting + 1
        self._spawn(self._send_desired(link, desired, version))

    async def _send_desired(self, link: DeviceLink, desired: dict[str, Any], version: int) -> None:
        try:
            await link.send_desired(desired, version)
        except Exception as exc:  # noqa: BLE001 - best effort, as the link's own contract says: one line, no traceback
            log.debug("desired properties push to %s failed: %s", link.device.device_id, exc)
        finally:
            left = self._desired_waiting.pop(id(link), 1) - 1
            if left:
                self._desired_waiting[id(link)] = left

    async def notify_c2d(self, hub_name: str, device_id: str) -> None:
        """A cloud-to-device message was queued: a connected device gets it now, others at their next connect."""
        link = self.link(hub_name, device_id)
        if link is not None:
            link.wake_c2d()
            return
        node = await self._locate(hub_name, device_id)
        if node is not None and self.peers is not None:
            await self.peers.send({"op": "c2d", "hub": hub_name, "device": device_id}, node)

    async def drop(self, hub_name: str, device_id: str, reason: str) -> None:
        """Disconnect a device now (disabled or deleted by the service), on whichever node holds it: told to every
        node, so a session whose presence is not recorded yet goes too."""
        self._drop_here(hub_name, device_id, reason, None)
        if self.peers is not None:
            await self.peers.send({"op": "drop", "hub": hub_name, "device": device_id, "reason": reason})

    async def drop_hub(self, hub_id: int, hub_name: str, reason: str) -> None:
        """A hub was unlinked: every session of it closes, here and on every node. Its identities went with it, so
        no CONNECT would let them in, and their telemetry and presence rows name a hub that is gone."""
        self._drop_hub_here(hub_id, reason)
        if self.peers is not None:
            await self.peers.send({"op": "drop-hub", "hub": hub_name, "hubId": hub_id, "reason": reason})

    def _drop_hub_here(self, hub_id: int, reason: str) -> None:
        self._hear(("hub", hub_id))
        for link, _session, _since in list(self._links.values()):
            if link.device.hub_id == hub_id:
                link.close(reason)

    async def revoke(self, serials: set[str], *, issuers: set[str] | None = None) -> None:
        """Certificates were revoked: close every session that authenticated with one of them, here and — told to
        every node — everywhere. ``serials`` as :func:`opendps.pki.serial_hex` writes them (any case); ``issuers``:
        hex key identifiers of CAs all of whose certificates were revoked (a policy's, a revoked issuing CA's), so
        a revocation of millions is one short message, matched on each session's Authority Key Identifier."""
        wanted = {s.upper() for s in serials}
        by = {i.lower() for i in issuers or ()}
        if not wanted and not by:
            return
        self._revoke_here(wanted, by)
        if self.peers is not None:
            await self.peers.send({"op": "revoked", "serials": sorted(wanted), "issuers": sorted(by)})

    def _revoke_here(self, serials: set[str], issuers: frozenset[str] | set[str] = frozenset()) -> None:
        now = time.monotonic()
        self._revocations.append((now, frozenset(serials), frozenset(issuers)))
        self._forget(now)
        for link, _session, _since in list(self._links.values()):
            serial = link.device.certificate_serial
            if serial is None:
                continue
            if serial in serials or (issuers and link.device.issuer_key_id in issuers):
                link.close(f"certificate {serial} was revoked")

    def _drop_here(self, hub_name: str, device_id: str, reason: str, session: str | None) -> None:
        key = _key(hub_name, device_id)
        if session is None:  # the device's every session, also one attaching later whose CONNECT was checked before
            self._hear(("device", *key))
        current = self._links.get(key)
        if current is not None and (session is None or current[1] == session):
            current[0].close(reason)

    async def _recorded(self, batch: list[Change]) -> None:
        """Presence of ``batch`` is written. A C2D message queued on another node meanwhile found no row naming this
        node (or an older session's node), so nothing woke the device's session: the ones still here that have
        messages waiting are woken now (one read for the batch). Later messages find the row."""
        if self._c2d_waiting is None or self._run is None:
            return
        attached: dict[tuple[int, str], str] = {}
        for c in batch:
            if c.attached:
                attached[(c.hub_id, c.device_key)] = c.session
            else:
                attached.pop((c.hub_id, c.device_key), None)
        live = {k: s for k, s in attached.items() if self._current(k, s) is not None}
        if not live:
            return
        try:
            waiting = await self._run(self._c2d_waiting, list(live))
        except Exception as exc:  # noqa: BLE001 - the store is away: the next message or connect wakes them
            log.warning("cloud-to-device messages of %d new session(s) not looked up: %s", len(live), exc)
            return
        for key in waiting:
            current = self._current(key, live.get(key))
            if current is not None:
                current.link.wake_c2d()

    def _current(self, key: tuple[int, str], session: str | None) -> _Live | None:
        """The device's live session here, if it is still ``session``."""
        name = self._hub_names.get(key[0])
        current = self._links.get((name, key[1])) if name is not None else None
        return current if current is not None and current.session == session else None

    # ---- from other nodes ----
    async def _displaced(self, displaced: list[Displaced]) -> None:
        """Sessions that a newer connection replaced: ours (another node's newer one was recorded first) are closed
        here; other nodes are told to close theirs."""
        if self.peers is None:
            return
        names = {live.link.device.hub_id: live.link.device.hub_name for live in self._links.values()}
        for d in displaced:
            if d.node_id == self.peers.node_id:
                if d.hub_id in names:
                    self._drop_here(names[d.hub_id], d.device_key, _TAKEN_OVER, d.session)
            elif d.hub_id in names and await self.peers.alive(d.node_id):
                await self.peers.send({"op": "displace", "hub": names[d.hub_id], "device": d.device_key,
                                       "session": d.session}, d.node_id)

    def on_peer_message(self, message: dict[str, Any]) -> None:
        """A message from another node (on the event loop)."""
        op, hub, device = message.get("op"), str(message.get("hub", "")), str(message.get("device", ""))
        if op == "drop":
            self._drop_here(hub, device, str(message.get("reason") or "dropped by the service"), None)
        elif op == "drop-hub":
            hub_id = message.get("hubId")
            if isinstance(hub_id, int):
                self._drop_hub_here(hub_id, str(message.get("reason") or f"hub {hub} was unlinked"))
        elif op == "revoked":
            self._revoke_here({str(s).upper() for s in message.get("serials") or ()},
                              {str(i).lower() for i in message.get("issuers") or ()})
        elif op == "displace":
            self._drop_here(hub, device, _TAKEN_OVER, str(message.get("session")))
        elif op == "c2d":
            link = self.link(hub, device)
            if link is not None:
                link.wake_c2d()
        elif op == "desired":
            link = self.link(hub, device)
            if link is not None and isinstance(message.get("desired"), dict):
                self._push_desired(link, message["desired"], int(message.get("version") or 0))
        elif op == "method":
            self._spawn(self._serve_method(message))
        elif op == "method-result":
            future = self._remote.get(str(message.get("call")))
            if future is not None and not future.done():
                error = message.get("error")
                if error == "offline":
                    offline = NotListening if message.get("reached") is False else DeviceOffline
                    future.set_exception(offline(str(message.get("message"))))
                elif error == "timeout":
                    future.set_exception(MethodTimeout(str(message.get("message"))))
                else:
                    future.set_result((int(message.get("status") or 0), message.get("payload")))

    async def _serve_method(self, message: dict[str, Any]) -> None:
        """Another node's direct-method call for a device connected here."""
        reply: dict[str, Any] = {"op": "method-result", "call": message.get("call")}
        timeout = float(message.get("timeout") or 30.0)
        expires = message.get("expires")
        if isinstance(expires, (int, float)):  # a node without it (an older version) keeps the whole timeout
            timeout = min(timeout, float(expires) - time.time())
        try:
            if timeout <= 0:  # read late (this process was stalled): the caller has its 504, the device gets nothing
                raise MethodTimeout(f"method {str(message.get('method'))!r} for device {str(message.get('device'))!r} "
                                    "reached this node after its timeout: not run")
            status, payload = await self._invoke_here(
                str(message.get("hub")), str(message.get("device")), str(message.get("method")),
                message.get("payload"), timeout)
            reply.update(status=status, payload=payload)
        except MethodTimeout as exc:
            reply.update(error="timeout", message=exc.message)
        except DeviceOffline as exc:  # "reached": whether the call was handed to the device (a caller may retry if not)
            reply.update(error="offline", message=exc.message, reached=not isinstance(exc, NotListening))
        if self.peers is not None:
            await self.peers.send(reply, str(message.get("reply")))

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
