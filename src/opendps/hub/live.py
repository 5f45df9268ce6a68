"""Live hub state of this process: which device is connected here, and the direct-method calls waiting for
its answer. The service side (REST and AMQP front ends) reaches a connected device only through this map.

A front end (MQTT today) attaches a :class:`DeviceLink` per connected device and detaches it when the
connection ends; the link turns the calls below into its wire (publishes on the device's topics). The
map is per process and lives on the event loop: it is the one piece of hub state that is not in the
store, so several processes or nodes need it routed (a later change; see docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any, Protocol

from opendps.errors import GatewayTimeout, NotFound
from opendps.hub.auth import AuthenticatedDevice

log = logging.getLogger("opendps.hub")
METHODS = "methods"
DESIRED = "desired"
C2D = "c2d"


class DeviceOffline(NotFound):
    error_code = 404103


class MethodTimeout(GatewayTimeout):
    """The device did not answer a direct method in time."""


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


def _key(hub_name: str, device_id: str) -> tuple[str, str]:
    return hub_name, device_id.lower()


class LiveSessions:
    """Connected devices by (hub, device id) and pending direct-method calls; one per process."""

    def __init__(self) -> None:
        self._links: dict[tuple[str, str], DeviceLink] = {}
        # pending direct methods: (device key, request id) -> (the answer, the link the request went out on)
        self._methods: dict[tuple[tuple[str, str], str], tuple[asyncio.Future[tuple[int, Any]], DeviceLink]] = {}
        self._request_ids = itertools.count(1)

    # ---- front end side ----
    def attach(self, link: DeviceLink) -> None:
        """``link`` is the device's connection from now on; an older one of the same device is closed."""
        key = _key(link.device.hub_name, link.device.device_id)
        old = self._links.get(key)
        self._links[key] = link
        if old is not None and old is not link:
            old.close("taken over by a new connection of the same device")

    def detach(self, link: DeviceLink) -> None:
        """The connection ended: forget it, and fail the method calls it will never answer."""
        key = _key(link.device.hub_name, link.device.device_id)
        if self._links.get(key) is link:
            del self._links[key]
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
        return self._links.get(_key(hub_name, device_id))

    def is_connected(self, hub_name: str, device_id: str) -> bool:
        return self.link(hub_name, device_id) is not None

    def connected(self, hub_name: str) -> frozenset[str]:
        """Lower-cased ids of the hub's devices connected to this process: a snapshot taken on the loop, for work
        (a query) that runs in the domain thread pool, where this map must not be read."""
        return frozenset(device for hub, device in self._links if hub == hub_name)

    async def invoke_method(self, hub_name: str, device_id: str, method: str, payload: Any, *,
                            timeout: float = 30.0) -> tuple[int, Any]:
        """Direct method: (status, payload) from the device; DeviceOffline (404) or MethodTimeout (504)."""
        link = self.link(hub_name, device_id)
        if link is None or not link.subscribed(METHODS):
            raise DeviceOffline(f"device {device_id!r} is not connected and subscribed to methods")
        key = _key(hub_name, device_id)
        rid = str(next(self._request_ids))
        future: asyncio.Future[tuple[int, Any]] = asyncio.get_running_loop().create_future()
        self._methods[(key, rid)] = (future, link)
        try:
            await link.send_method(method, rid, payload)
            return await asyncio.wait_for(future, timeout)
        except TimeoutError as exc:
            raise MethodTimeout(f"device {device_id!r} did not answer method {method!r} within {timeout:g} s") from exc
        finally:
            self._methods.pop((key, rid), None)

    async def push_desired(self, hub_name: str, device_id: str, desired: dict[str, Any], version: int) -> None:
        """Desired properties changed: a connected, subscribed device hears of it now (others read the twin)."""
        link = self.link(hub_name, device_id)
        if link is not None and link.subscribed(DESIRED):
            await link.send_desired(desired, version)

    def notify_c2d(self, hub_name: str, device_id: str) -> None:
        """A cloud-to-device message was queued: a connected device gets it now, others at their next connect."""
        link = self.link(hub_name, device_id)
        if link is not None:
            link.wake_c2d()

    def drop(self, hub_name: str, device_id: str, reason: str) -> None:
        """Disconnect a device now (disabled or deleted by the service)."""
        link = self.link(hub_name, device_id)
        if link is not None:
            link.close(reason)
