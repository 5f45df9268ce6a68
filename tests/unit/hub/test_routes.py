"""Telemetry routes as configuration: validation, If-Match, and the per-process cache of a hub's enabled routes."""

from __future__ import annotations

import pytest

from opendps.errors import InvalidInput, NotFound, PreconditionFailed
from opendps.hub.routing import subject_token


def _body(**props):
    return {"properties": {"endpointType": "nats", "url": "nats://127.0.0.1:4222", "subject": "fleet.telemetry", **props}}


def test_a_route_is_created_replaced_listed_and_deleted(services):
    routes = services.routes
    view, created = routes.put("default", "to-nats", _body())
    assert created and view.durable and view.enabled and view.subject == "fleet.telemetry"
    with pytest.raises(PreconditionFailed):
        routes.put("default", "to-nats", _body(durable=False), if_match="stale")
    replaced, created = routes.put("default", "to-nats", _body(durable=False), if_match=view.etag)
    assert not created and not replaced.durable and replaced.etag != view.etag
    assert [r.name for r in routes.list("default")] == ["to-nats"]
    assert routes.get("default", "to-nats").to_wire()["properties"]["durable"] is False
    routes.delete("default", "to-nats", if_match=replaced.etag)
    assert routes.list("default") == []
    with pytest.raises(NotFound, match="route 'to-nats' of hub 'default' does not exist"):
        routes.get("default", "to-nats")
    with pytest.raises(NotFound, match="linked hub 'nowhere' does not exist"):
        routes.put("nowhere", "r", _body())


@pytest.mark.parametrize(("props", "words"), [
    ({"url": "http://127.0.0.1:4222"}, "not a NATS server URL"),
    ({"url": ""}, "must be a NATS server URL"),
    ({"url": "nats://127.0.0.1:99999"}, "invalid port"),
    ({"subject": "fleet.*"}, "without wildcards"),
    ({"subject": "fleet..x"}, "NATS subject prefix"),
    ({"subject": "has space"}, "NATS subject prefix"),
    ({"endpointType": "kafka"}, "endpointType 'kafka' is not supported"),
    ({"durable": "yes"}, "durable must be true or false"),
    ({"isEnabled": 1}, "isEnabled must be true or false"),
    ({"url": "nats://a:4222,ftp://b:21"}, "'ftp://b:21' is not a NATS server URL"),
    ({"url": 4222}, "must be a NATS server URL"),
    ({"url": "nats://[::1"}, "is not a NATS server URL: Invalid IPv6 URL"),  # urlsplit raises: it was a 500
    ({"url": "nats://127.0.0.1:4222\n"}, "must be a NATS server URL"),  # urlsplit drops the newline; it was stored
    ({"url": "nats://127.0.0.1:4222/\x00"}, "must be a NATS server URL"),  # PostgreSQL cannot hold it: a 500
    ({"subject": "fleet.x\n"}, "NATS subject prefix"),  # '$' matches before a final newline: it was stored
])
def test_bad_routes_are_refused_naming_the_problem(services, props, words):
    with pytest.raises(InvalidInput, match=words):
        services.routes.put("default", "bad", _body(**props))
    assert services.routes.list("default") == []


def test_a_body_without_properties_or_with_a_bad_name_is_refused(services):
    with pytest.raises(InvalidInput, match="object with 'properties'"):
        services.routes.put("default", "r", {"url": "nats://127.0.0.1:4222"})
    with pytest.raises(InvalidInput, match="route name 'has space' is invalid"):
        services.routes.put("default", "has space", _body())
    view, _ = services.routes.put("default", "several", _body(url="nats://a:4222, tls://b:4443"))
    assert view.url == "nats://a:4222, tls://b:4443"


def test_the_enabled_routes_of_a_hub_follow_every_change_at_once(services):
    hub = services.hubs.get("default")
    assert services.routes.enabled(hub.id) == []
    view, _ = services.routes.put("default", "a", _body())
    assert [r.name for r in services.routes.enabled(hub.id)] == ["a"]
    services.routes.put("default", "a", _body(isEnabled=False), if_match=view.etag)
    assert services.routes.enabled(hub.id) == []  # cached per configuration counter: the change is seen at once
    east = services.hubs.create("east")
    services.routes.put("east", "b", _body())
    assert [r.name for r in services.routes.enabled(east.id)] == ["b"] and services.routes.enabled(hub.id) == []
    services.hubs.delete("east")  # its routes go with it
    assert services.routes.enabled(east.id) == []
    with pytest.raises(NotFound, match="linked hub 'east' does not exist"):
        services.routes.list("east")


def test_hub_names_and_device_ids_become_single_subject_tokens():
    assert subject_token("dev-1_a") == "dev-1_a"
    assert subject_token("a.b*c>d e") == "a%2Eb%2Ac%3Ed%20e"
    assert "." not in subject_token("x.y.z")


def test_a_route_to_a_nats_that_is_down_fails_in_bounded_time_then_at_once(services, monkeypatch, caplog):
    """nats-py retries a first connection forever: a route whose NATS is down held its hub's telemetry. Now the
    first attempt is bounded (PUBLISH_TIMEOUT), a durable route refuses (no PUBACK), a plain one drops, and for
    RETRY_AFTER s after a failure messages fail without another attempt. A real closed port on loopback."""
    import asyncio
    import logging
    import time

    from tests.conftest import free_port

    from opendps.errors import ServiceUnavailable
    from opendps.hub import routing

    monkeypatch.setattr(routing, "PUBLISH_TIMEOUT", 0.5)
    dead = f"nats://127.0.0.1:{free_port()}"
    services.routes.put("default", "durable", _body(url=dead))
    hub_id = services.hubs.list()[0].id

    async def run(fn, *args):
        return fn(*args)

    async def scenario() -> None:
        router = routing.NatsRouter(services.routes, run)
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="did not acknowledge.*NatsUnreachable.*answered within 0.5 s"):
            await router.deliver(hub_id, "d1", {}, {}, b"x", 1)
        assert time.monotonic() - started < 3
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="answered within"):
            await router.deliver(hub_id, "d1", {}, {}, b"x", 2)
        assert time.monotonic() - started < 0.2  # remembered: no second attempt
        services.routes.put("default", "durable", _body(url=dead, durable=False), if_match="*")
        router._known.clear()
        await router.deliver(hub_id, "d1", {}, {}, b"x", 3)  # a plain route drops the message, the PUBACK goes out
        await router.close()

    with caplog.at_level(logging.INFO, logger="opendps.hub.routing"):
        asyncio.run(scenario())
    said = [r.getMessage() for r in caplog.records if r.name == "opendps.hub.routing"]
    assert len([m for m in said if "answered within" in m]) == 1, said  # once per attempt, not once per message


def test_the_nats_bus_away_at_start_does_not_stop_the_server(services, monkeypatch, caplog):
    """`opendps serve --bus` with no NATS there: the node joins and serves after connect_within s with one warning (the
    bus connects in the background, tests/test_nats_outage.py), not a start that waits forever nor an exit: live
    messages are hints, and a worker restarted while NATS was down stopped the whole service."""
    import asyncio
    import logging

    from tests.conftest import free_port

    from opendps.cluster import Nodes
    from opendps.cluster.bus import NatsBus
    from opendps.frontends.runtime import Runtime

    monkeypatch.setattr(NatsBus, "connect_within", 0.5)  # the class's: join_cluster makes its own bus
    runtime = Runtime(services)

    async def scenario() -> None:
        cluster = await runtime.join_cluster(bus_url=f"nats://127.0.0.1:{free_port()}")
        assert [n.id for n in Nodes(services.store).alive(60)] == [cluster.node_id]
        await cluster.stop()

    try:
        with caplog.at_level(logging.INFO, logger="opendps.cluster"):
            asyncio.run(scenario())
    finally:
        runtime.domain.close()
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and "serving without it" in said[0] and "answered within 0.5 s" in said[0], said
    assert Nodes(services.store).alive(60) == []
