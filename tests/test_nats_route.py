"""Telemetry routes to NATS JetStream, end to end: a real server, a real device over MQTT (paho), the real nats-server
on 127.0.0.1:4222 with JetStream, and a nats-py consumer. Both stores (the module's server fixture)."""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
import time

import httpx
from tests.conftest import service_missing
from tests.test_device_api import PREVIEW, device_sas, svc, sym_key
from tests.test_mqtt_hub import HUB, Client, events, hub_username

from opendps.transport import sas

SERVER_STORES = ("sqlite",)  # the wire is the subject; the domain runs on both stores in tests/unit (tests/conftest.py)

NATS_URL = "nats://127.0.0.1:4222"


def _nats(coro_factory):
    """Run ``coro_factory(js)`` against the local NATS server (skip locally / fail in CI when it is not there)."""
    import nats

    async def main():
        try:
            nc = await nats.connect(NATS_URL, connect_timeout=3, max_reconnect_attempts=0, allow_reconnect=False)
        except Exception as exc:  # noqa: BLE001 - any failure to reach it
            return ("missing", f"NATS not reachable at {NATS_URL}: {exc}")
        try:
            js = nc.jetstream()
            try:
                await js.account_info()
            except Exception as exc:  # noqa: BLE001
                return ("missing", f"NATS at {NATS_URL} has no JetStream: {exc}")
            return ("ok", await coro_factory(js))
        finally:
            await nc.close()

    state, value = asyncio.run(main())
    if state == "missing":
        service_missing(value)
    return value


def _device(server, name: str) -> Client:
    with svc(server) as c:
        key = sym_key(c, f"/enrollments/{name}", {"attestation": {"type": "symmetricKey"}})
    with httpx.Client(base_url=server.url, verify=ssl.create_default_context(cafile=server.ca_file), timeout=30) as d:
        assert d.put(f"/{server.id_scope}/registrations/{name}/register", params={"api-version": PREVIEW}, json={},
                     headers={"Authorization": device_sas(server.id_scope, name, key)}).status_code == 202
    return Client(server, name, hub_username(name), password=sas.generate(f"{HUB}/devices/{name}", key))


def test_a_durable_route_delivers_every_message_with_its_properties_to_jetstream(server):
    prefix = f"odtest{secrets.token_hex(4)}"
    stream = prefix.upper()
    _nats(lambda js: js.add_stream(name=stream, subjects=[f"{prefix}.>"]))
    try:
        created = server.cli("hub", "route", "create", "--route-name", "to-jetstream", "--nats-url", NATS_URL,
                             "--subject", f"{prefix}.telemetry", "-o", "json", check=True)
        assert json.loads(created.stdout)["properties"]["durable"] is True
        device = _device(server, "routed-dev.1")  # a '.' in the id: one subject token all the same
        for i in range(5):
            device.publish(f"devices/routed-dev.1/messages/events/seq={i}&%24.mid=m{i}&%24.ct=application%2Fjson",
                           json.dumps({"i": i}).encode())
        device.close()

        async def consume(js):
            sub = await js.pull_subscribe(f"{prefix}.>", durable=None, stream=stream)
            return await sub.fetch(5, timeout=10)

        messages = _nats(consume)
        assert [json.loads(m.data) for m in messages] == [{"i": i} for i in range(5)]  # each PUBACK came after its ack
        first = messages[0]
        assert first.subject == f"{prefix}.telemetry.default.routed-dev%2E1"
        assert first.headers["seq"] == "0" and first.headers["message-id"] == "m0"
        assert first.headers["content-type"] == "application/json"
        assert first.headers["iothub-connection-device-id"] == "routed-dev.1" and first.headers["iothub-hub-name"] == "default"
        assert int(first.headers["opendps-position"]) > 0
        assert len(events(server, "routed-dev.1", 5)) == 5  # the store keeps them too (monitor-events)
    finally:
        server.cli("hub", "route", "delete", "--route-name", "to-jetstream")
        _nats(lambda js: js.delete_stream(stream))


def test_a_durable_route_without_a_stream_withholds_the_puback(server):
    """No stream captures the subject: JetStream cannot acknowledge, so the device gets no PUBACK and is
    disconnected (it sends the message again on its next connection)."""
    prefix = f"odnostream{secrets.token_hex(4)}"
    _nats(lambda js: js.account_info())  # NATS itself is there
    server.cli("hub", "route", "create", "--route-name", "nowhere", "--nats-url", NATS_URL, "--subject", prefix, check=True)
    try:
        device = _device(server, "unrouted-dev")
        device.publish_refused("devices/unrouted-dev/messages/events/", b"lost?")
        listed = json.loads(server.cli("hub", "route", "list", "-o", "json", check=True).stdout)
        assert [r["name"] for r in listed] == ["nowhere"]
    finally:
        server.cli("hub", "route", "delete", "--route-name", "nowhere", check=True)


def test_telemetry_refused_while_a_durable_routes_nats_is_unreachable_is_not_stored(server):
    """A durable route whose NATS does not answer: the device is refused (no PUBACK) and the message is not stored
    either — it was stored before the route was tried, so each of a device's retries during an outage left a row."""
    from tests.conftest import free_port
    from tests.test_mqtt_hub import events

    from opendps.hub.routing import ROUTE_REFRESH

    nowhere = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    server.cli("hub", "route", "create", "--route-name", "away", "--nats-url", nowhere, "--subject", "odaway", check=True)
    try:
        time.sleep(ROUTE_REFRESH)  # a process sees route changes within ROUTE_REFRESH (the earlier tests' routes)
        device = _device(server, "away-dev")
        device.publish_refused("devices/away-dev/messages/events/", b"not now")
        assert events(server, "away-dev", 1, timeout=1) == []
    finally:
        server.cli("hub", "route", "delete", "--route-name", "away", check=True)


def test_route_refusals_are_one_line_cli_errors(server):
    bad = server.cli("hub", "route", "create", "--route-name", "bad", "--nats-url", "http://x:1", "--subject", "a.b")
    assert bad.returncode != 0 and "not a NATS server URL" in bad.stderr and "Traceback" not in bad.stderr
    missing = server.cli("hub", "route", "show", "--route-name", "absent")
    assert missing.returncode != 0 and "route 'absent' of hub 'default' does not exist" in missing.stderr
