"""The hub session's C2D delivery (``HubSession._deliver_c2d``), in-process on both backends: a message the device
acknowledged is not sent again on the same connection, whatever the order of the store reads and the PUBACKs."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from opendps.frontends.mqtt.hub import HubSession
from opendps.frontends.runtime import Runtime
from opendps.hub import AuthenticatedDevice


class _Session:
    """The MQTT session as the hub session uses it for C2D: its subscriptions and QoS 1 publishes."""

    def __init__(self, device_id: str) -> None:
        self.subscriptions = {f"devices/{device_id}/messages/devicebound/#": 1}
        self.published: list[tuple[str, Any]] = []

    async def publish(self, topic: str, payload: bytes, qos: int = 0, *, on_ack: Any = None) -> None:
        self.published.append((topic, on_ack))


def test_a_message_acknowledged_while_the_queue_is_read_is_not_sent_again(services):
    """Found by a reconnect storm: a delivery's read of the queue began before the PUBACK of a message sent earlier on
    the connection was completed, so it returned that message, which was no longer "awaiting PUBACK", and it went out
    a second time after the device had acknowledged it."""
    services.hubs.create_device("default", "c2d-race")
    hub = services.hubs.get("default")
    runtime = Runtime(services)
    session = HubSession(runtime, AuthenticatedDevice(hub.id, hub.name, hub.host_name, "c2d-race", "c2d-race", "sas"))
    wire = _Session("c2d-race")
    session.session = wire  # type: ignore[assignment]
    real_pending = services.c2d.pending
    read, release = threading.Event(), threading.Event()

    def slow_pending(hub_id: int, device_key: str, **kwargs: Any) -> list:
        rows = real_pending(hub_id, device_key, **kwargs)
        read.set()
        release.wait(5)  # the store read is done; its answer comes back after the PUBACK below
        return rows

    async def main() -> list[str]:
        services.c2d.enqueue("default", "c2d-race", b"one", system={"message-id": "m1"})
        session.wake_c2d()
        while session.delivering:
            await asyncio.sleep(0.01)
        assert len(wire.published) == 1 and "%24.mid=m1&" in wire.published[0][0]
        services.c2d.enqueue("default", "c2d-race", b"two", system={"message-id": "m2"})
        services.c2d.pending = slow_pending  # type: ignore[method-assign]
        session.wake_c2d()  # a second message was queued: read the queue (m1 still in it, m2)
        await asyncio.get_running_loop().run_in_executor(None, read.wait, 5)
        await wire.published[0][1]()  # m1's PUBACK: completed (deleted from the store)
        release.set()
        while session.delivering:
            await asyncio.sleep(0.01)
        services.c2d.pending = real_pending  # type: ignore[method-assign]
        for _, ack in wire.published[1:]:
            await ack()
        while session.delivering:
            await asyncio.sleep(0.01)
        return [t.split("%24.mid=")[1].split("&")[0] for t, _ in wire.published]

    try:
        sent = asyncio.run(main())
    finally:
        runtime.domain.close()
    assert sent == ["m1", "m2"]  # m1 once: it was acknowledged before the second read's answer came back
    assert services.c2d.pending(hub.id, "c2d-race") == []
    assert session.sent is None and session.acked is None  # nothing kept once all is acknowledged and read past


def test_a_reconnect_right_after_a_puback_does_not_get_the_message_again(services):
    """A device that acknowledges a message and reconnects at once: the PUBACK's DELETE runs in the thread pool, and the
    new connection's first read of the queue ran before it, so the message went out again on the new connection
    within milliseconds. The new session now waits for this process's completions of the device under way."""
    services.hubs.create_device("default", "c2d-quick")
    hub = services.hubs.get("default")
    runtime = Runtime(services)
    device = AuthenticatedDevice(hub.id, hub.name, hub.host_name, "c2d-quick", "c2d-quick", "sas")
    old, new = HubSession(runtime, device), HubSession(runtime, device)
    old_wire, new_wire = _Session("c2d-quick"), _Session("c2d-quick")
    old.session, new.session = old_wire, new_wire  # type: ignore[assignment]
    real_complete = services.c2d.complete
    deleting, release = threading.Event(), threading.Event()

    def slow_complete(pk: int) -> None:
        deleting.set()
        release.wait(5)  # the DELETE is slow (a busy pool, a slow disk): the device has already reconnected
        real_complete(pk)

    async def main() -> list[str]:
        services.c2d.enqueue("default", "c2d-quick", b"once", system={"message-id": "q1"})
        old.wake_c2d()
        while old.delivering:
            await asyncio.sleep(0.01)
        assert len(old_wire.published) == 1
        services.c2d.complete = slow_complete  # type: ignore[method-assign]
        acknowledged = asyncio.ensure_future(old_wire.published[0][1]())  # the PUBACK, as the MQTT core runs it
        await asyncio.get_running_loop().run_in_executor(None, deleting.wait, 5)
        new.wake_c2d()  # the reconnect subscribed: its first read of the queue
        await asyncio.sleep(0.2)
        release.set()
        await acknowledged
        while new.delivering:
            await asyncio.sleep(0.01)
        return [t.split("%24.mid=")[1].split("&")[0] for t, _ in new_wire.published]

    try:
        again = asyncio.run(main())
    finally:
        services.c2d.complete = real_complete  # type: ignore[method-assign]
        runtime.domain.close()
    assert again == []
    assert services.c2d.pending(hub.id, "c2d-quick") == [] and HubSession.completing == {}


def test_messages_read_but_never_sent_before_the_connection_ended_are_not_counted_as_deliveries(services):
    """A delivery read counts every message it returns (maxDeliveryCount), but a connection that ends while they go
    out (a device that reads slowly, on a link that keeps dropping) sent only the first: after ten such reconnects the
    messages behind it were dead-lettered without ever reaching the device. What was not sent is given its count
    back; what was sent keeps it."""
    from opendps.hub import messaging
    from opendps.transport.mqtt.server import SessionClosed

    services.hubs.create_device("default", "c2d-drops")
    hub = services.hubs.get("default")
    runtime = Runtime(services)
    device = AuthenticatedDevice(hub.id, hub.name, hub.host_name, "c2d-drops", "c2d-drops", "sas")

    class _Dropping(_Session):
        async def publish(self, topic: str, payload: bytes, qos: int = 0, *, on_ack: Any = None) -> None:
            if self.published:
                raise SessionClosed("connection lost")  # the first went out, then the link dropped
            await super().publish(topic, payload, qos, on_ack=on_ack)

    async def reconnect() -> None:
        session = HubSession(runtime, device)
        session.session = _Dropping("c2d-drops")  # type: ignore[assignment]
        session.wake_c2d()
        while session.delivering:
            await asyncio.sleep(0.01)

    async def main() -> None:
        for n in range(3):
            services.c2d.enqueue("default", "c2d-drops", f"m{n}".encode(), system={"message-id": f"m{n}"})
        for _ in range(messaging.MAX_DELIVERY_COUNT + 2):
            await reconnect()

    try:
        asyncio.run(main())
    finally:
        runtime.domain.close()
    # the first went out on every connection: dead-lettered after ten; the others never went out and are still there
    left = services.c2d.pending(hub.id, "c2d-drops")  # this read counts too
    assert [(m.message_id, m.delivery_count) for m in left] == [("m1", 3), ("m2", 1)]
