"""The hub session's pipelined telemetry (``HubSession.begin_publish``), in-process on both backends: which PUBLISHes
it takes without being awaited, and that what it takes is stored, in order, before its future is done."""

from __future__ import annotations

import asyncio

from opendps.frontends.mqtt.hub import HubSession
from opendps.frontends.runtime import Runtime
from opendps.hub import AuthenticatedDevice
from opendps.hub.telemetry import MAX_MESSAGE_BYTES

TOPIC = "devices/pipe-dev/messages/events/"


def _session(services) -> tuple[Runtime, HubSession]:
    hub = next(h for h in services.hubs.list() if h.name == "default")
    runtime = Runtime(services)
    device = AuthenticatedDevice(hub.id, hub.name, hub.host_name, "pipe-dev", "pipe-dev", "sas")
    return runtime, HubSession(runtime, device)


def test_stored_only_telemetry_is_begun_and_stored_in_order(services):
    runtime, session = _session(services)

    async def main() -> tuple[list[bool], list[int]]:
        router = runtime.telemetry_router
        hub_id = session.device.hub_id
        unknown = session.begin_publish(None, TOPIC, b"first", 1, False)  # type: ignore[arg-type]
        await router._routes(hub_id)  # what on_publish's route lookup leaves behind: the hub has none
        other = [session.begin_publish(None, topic, b"{}", 1, False)  # type: ignore[arg-type]
                 for topic in ("$iothub/twin/PATCH/properties/reported/?$rid=1", "devices/other-dev/messages/events/")]
        too_big = session.begin_publish(None, TOPIC, b"x" * (MAX_MESSAGE_BYTES + 1), 1, False)  # type: ignore[arg-type]
        futures = [session.begin_publish(None, TOPIC + f"seq={i}&%24.ct=application%2Fjson", b'{"i": %d}' % i, 1,
                                         False) for i in range(20)]  # type: ignore[arg-type]
        assert len({id(f) for f in futures}) == 1  # queued before the writer ran: one transaction, one future
        await asyncio.gather(*futures)  # type: ignore[arg-type]
        return [unknown is None, *(o is None for o in other), too_big is None], futures

    try:
        refused, futures = asyncio.run(main())
    finally:
        runtime.domain.close()
    assert refused == [True, True, True, True]  # routes not known yet, not telemetry, not its own topic, too large
    assert all(f.done() and f.exception() is None for f in futures)
    stored = services.telemetry.read("default", device_id="pipe-dev", limit=50)
    assert [e.application for e in stored] == [{"seq": str(i)} for i in range(20)]
    assert {e.system["content-type"] for e in stored} == {"application/json"}
    assert [e.body for e in stored] == [b'{"i": %d}' % i for i in range(20)]


def test_a_hub_with_a_route_is_not_pipelined(services):
    services.routes.put("default", "r", {"properties": {"endpointType": "nats", "url": "nats://127.0.0.1:4222",
                                                        "subject": "fleet.telemetry"}})
    runtime, session = _session(services)

    async def main() -> object:
        await runtime.telemetry_router._routes(session.device.hub_id)
        return session.begin_publish(None, TOPIC, b"routed", 1, False)  # type: ignore[arg-type]

    try:
        assert asyncio.run(main()) is None  # on_publish stores it, then routes it before the PUBACK
    finally:
        runtime.domain.close()


def test_a_full_queue_is_not_pipelined(services):
    runtime, session = _session(services)
    runtime.telemetry_writer.max_pending_bytes = MAX_MESSAGE_BYTES

    async def main() -> tuple[object, object]:
        await runtime.telemetry_router._routes(session.device.hub_id)
        first = session.begin_publish(None, TOPIC, b"x" * (MAX_MESSAGE_BYTES - 10), 1, False)  # type: ignore[arg-type]
        second = session.begin_publish(None, TOPIC, b"y" * 20, 1, False)  # type: ignore[arg-type]
        assert first is not None
        await first
        return first, second

    try:
        _, second = asyncio.run(main())
    finally:
        runtime.domain.close()
    assert second is None  # on_publish waits for room instead (bounded memory)


def test_telemetry_topics_of_the_device_and_their_property_bags():
    """Which topics are the device's telemetry (``devices/{id}/messages/events`` with or without a bag; the C# SDK's
    trailing '/'), and nothing else: another device's, one whose id starts with this id, a longer last level."""
    session = HubSession(None, AuthenticatedDevice(1, "default", "hub.example", "dev", "dev", "sas"))  # type: ignore[arg-type]
    bags = {topic: session._telemetry_bag(topic) for topic in (
        "devices/dev/messages/events", "devices/dev/messages/events/", "devices/dev/messages/events/a=1&%24.ct=x",
        "devices/dev/messages/events/a=1/", "devices/dev/messages/eventsX", "devices/dev/messages/event",
        "devices/devX/messages/events/", "devices/de/messages/events/", "devices/other/messages/events/", "devices/dev",
        "$iothub/twin/GET/?$rid=1", "xdevices/dev/messages/events/", "")}
    assert bags == {
        "devices/dev/messages/events": "", "devices/dev/messages/events/": "",
        "devices/dev/messages/events/a=1&%24.ct=x": "a=1&%24.ct=x", "devices/dev/messages/events/a=1/": "a=1",
        "devices/dev/messages/eventsX": None, "devices/dev/messages/event": None, "devices/devX/messages/events/": None,
        "devices/de/messages/events/": None, "devices/other/messages/events/": None, "devices/dev": None,
        "$iothub/twin/GET/?$rid=1": None, "xdevices/dev/messages/events/": None, "": None}
