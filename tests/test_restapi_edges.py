"""Edges of the HTTP service APIs and the IoT Hub query language, found by fuzzing a live server: bad input is a 4xx
with an Azure error body naming the problem, never a 500, and nothing the hub's own rules refuse gets stored another
way. In-process on both stores (the ``services`` fixture); the HTTP checks run the real application on a loopback
socket (aiohttp's TestServer), as tests/unit/frontends/test_service_rights.py does.
"""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from tests.unit.provisioning.test_allocation import webhook

from opendps.errors import InvalidInput, PayloadTooLarge
from opendps.frontends import build
from opendps.frontends.http.audit import parse_time
from opendps.hub import DEFAULT_HUB, AuthenticatedDevice, HubView, LiveSessions
from opendps.hub.live import C2D, DESIRED, METHODS
from opendps.hub.query import continuation_token, parse_query, read_continuation
from opendps.provisioning import allocation
from opendps.provisioning.access import OWNER_POLICY, OWNER_RIGHTS
from opendps.transport import sas
from opendps.transport.wire import parse_json

SELECT_ALL = "SELECT * FROM devices"


def _token_of(query: str, data: object) -> str:
    """A continuation token as a client could forge one: any JSON, bound to the query (its fingerprint is public)."""
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# ---------------------------------------------------------------- query continuation tokens


def test_a_continuation_token_is_refused_unless_it_holds_a_device_key():
    """A token nested deep was json's RecursionError (a 500); one whose key holds a NUL was bound into the next
    page's comparison (PostgreSQL's DataError, a 500). Both are "not a token this service gave"."""
    q = parse_query(SELECT_ALL)
    given = continuation_token(q, "dev-7", 7)
    assert read_continuation(q, given) == ("dev-7", 7)
    for forged in (b"[" * 5000, b'{"a":' * 3000, {"q": q.fingerprint, "a": "dev\x00", "n": 1},
                   {"q": q.fingerprint, "a": "x" * 129, "n": 1}, {"q": q.fingerprint, "a": "\u2028", "n": 1}):
        with pytest.raises(InvalidInput, match="not a continuation token this service gave"):
            read_continuation(q, _token_of(SELECT_ALL, forged))


def test_a_forged_continuation_never_reaches_the_store(services):
    hubs = services.hubs
    hubs.create_device(DEFAULT_HUB, "qc-1")
    q = parse_query(SELECT_ALL)

    def page(token: str) -> Any:
        return hubs.query(DEFAULT_HUB, SELECT_ALL, lambda d: d.twin(), page_size=10, continuation=token)

    assert [row["deviceId"] for row in page(continuation_token(q, "", 0)).items] == ["qc-1"]
    for forged in (b"[" * 3000, {"q": q.fingerprint, "a": "qc\x00", "n": 0}):
        with pytest.raises(InvalidInput, match="x-ms-continuation"):
            page(_token_of(SELECT_ALL, forged))


def test_a_collection_after_from_is_a_name_not_a_string():
    """``FROM devices.'a\\x00'`` echoed the decoded string, NUL and all, into the refusal."""
    with pytest.raises(InvalidInput, match=r"collection name after 'devices\.', found the string \"a\\u0000\""):
        parse_query("SELECT * FROM devices.'a\x00'")
    with pytest.raises(InvalidInput, match="FROM devices.modules is not supported"):
        parse_query("SELECT * FROM devices.modules")


# ---------------------------------------------------------------- JSON numbers


@pytest.mark.parametrize("text", ["1" + "0" * 309, "-2" + "0" * 308, "1" + "0" * 400, '{"a": [1%s]}' % ("0" * 500)])
def test_integers_past_a_double_are_not_json_either(text):
    """1e309 was refused but a 310-digit integer was stored in a twin: no double-based reader (JavaScript, the C SDK's
    parson) can read it back."""
    with pytest.raises(InvalidInput, match="out of range"):
        parse_json(text, "body")


def test_integers_a_double_holds_are_read_exactly():
    largest = int(1.7976931348623157e308)
    assert parse_json(f"[{largest}, -{largest}, 0, -0, {2**64}]", "body") == [largest, -largest, 0, 0, 2**64]


# ---------------------------------------------------------------- audit log times


@pytest.mark.parametrize("value", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_an_audit_time_with_no_utc_instant_is_refused(value):
    """Valid ISO 8601 whose UTC time falls outside years 1-9999: the store's conversion raised OverflowError (a 500)."""
    with pytest.raises(InvalidInput, match=r"since .* is out of range"):
        parse_time(value, "since")
    assert parse_time("2026-12-06T11:00:00+01:00", "since") == datetime(2026, 12, 6, 10, tzinfo=UTC)


# ---------------------------------------------------------------- direct method names


class _Link:
    """A connected device as the MQTT front end carries it, recording what would be published to it."""

    def __init__(self, live: LiveSessions) -> None:
        self.live = live
        self.device = AuthenticatedDevice(1, DEFAULT_HUB, "localhost", "m-dev", "m-dev", "sas")
        self.sent: list[str] = []

    def subscribed(self, feature: str) -> bool:
        return feature in (METHODS, DESIRED, C2D)

    async def send_method(self, method: str, request_id: str, payload: Any) -> None:
        self.sent.append(method)  # the front end publishes $iothub/methods/POST/{method}/?$rid=...
        asyncio.get_running_loop().call_soon(self.live.method_answered, self, request_id, 200, None)

    async def send_desired(self, desired: dict[str, Any], version: int) -> None:
        pass

    def wake_c2d(self) -> None:
        pass

    def close(self, reason: str) -> None:
        self.live.detach(self)


@pytest.mark.parametrize("name", ["a#b", "a+b", "a\x00b", "x" * 70000, "a/b", "?x=1", "a b", "caf\u00e9", "$x"])
def test_a_method_name_that_cannot_be_a_topic_level_is_refused_before_it_is_sent(name):
    """The name goes into the device's topic: a NUL, MQTT's wildcards or a name past 64 KiB made the codec raise (a
    500); '/' and '?' made a topic the device reads as another method. IoT Hub's characters only, refused up front."""

    async def main() -> list[str]:
        live = LiveSessions()
        link = _Link(live)
        live.attach(link)
        with pytest.raises(InvalidInput, match="methodName"):
            await live.invoke_method(DEFAULT_HUB, "m-dev", name, None, timeout=1)
        assert await live.invoke_method(DEFAULT_HUB, "m-dev", "Reboot_now-2.0", None, timeout=1) == (200, None)
        return link.sent

    assert asyncio.run(main()) == ["Reboot_now-2.0"]


# ---------------------------------------------------------------- initial twins


def test_an_enrollments_initial_twin_follows_the_hubs_twin_rules(services):
    """An initial twin was stored as given, and the device placed with it: names the hub refuses ('a.b', '$x'),
    nesting past 10 levels, tags over 8 KB — after which every PATCH of the device's tags or desired properties was
    a 413. Now refused when the enrollment is written, as a twin PATCH would be; a valid one is normalised."""
    enrollments = services.enrollments
    deep: Any = 1
    for _ in range(11):
        deep = {"d": deep}
    for twin, refusal in (({"tags": {"a.b": 1}}, "initialTwin.tags: property name 'a.b'"),
                          ({"tags": {"$x": 1}}, "initialTwin.tags: property name '\\$x'"),
                          ({"properties": {"desired": {"deep": deep}}}, "initialTwin.properties.desired is nested"),
                          ({"tags": {"big": "x" * 9000}}, "initialTwin.tags would exceed 8192 bytes"),
                          ({"properties": []}, "initialTwin.properties must be a JSON object")):
        for kind in ("individual", "group"):
            with pytest.raises((InvalidInput, PayloadTooLarge), match=refusal):
                enrollments.put(kind, "twin-rules", {"attestation": {"type": "symmetricKey"}, "initialTwin": twin})
            assert enrollments.find(kind, "twin-rules") is None
    view, _ = enrollments.put("group", "twin-ok", {"attestation": {"type": "symmetricKey"}, "initialTwin": {
        "tags": {"$version": 3, "site": {"room": None, "floor": 2}},
        "properties": {"desired": {"$metadata": {}, "interval": 30}}}})
    assert view.document["initialTwin"] == {"tags": {"site": {"floor": 2}}, "properties": {"desired": {"interval": 30}}}


def test_a_custom_allocation_webhooks_initial_twin_follows_the_same_rules():
    hub = HubView(1, "east", "east.hubs.test", 1, True, "etag", datetime.now(UTC))
    with webhook({"iotHubHostName": "east.hubs.test", "initialTwin": {"tags": {"a.b": 1}}}) as (url, _), \
            pytest.raises(allocation.AllocationFailed, match="webhook's initialTwin.tags: property name 'a.b'"):
        allocation.custom(url, {}, [hub], timeout=5)
    twin = {"tags": {"by": "webhook", "gone": None}, "properties": {"desired": {"fw": "1.2"}}}
    with webhook({"iotHubHostName": "east.hubs.test", "initialTwin": twin}) as (url, _):
        assert allocation.custom(url, {}, [hub], timeout=5).initial_twin == {
            "tags": {"by": "webhook"}, "properties": {"desired": {"fw": "1.2"}}}


# ---------------------------------------------------------------- over HTTP


def test_the_http_api_answers_these_edges_with_azure_error_bodies(services):
    services.access_policies.ensure(OWNER_POLICY, OWNER_RIGHTS)
    token = sas.generate("localhost", services.access_policies.keys_of(OWNER_POLICY)[0], OWNER_POLICY)
    services.hubs.create_device(DEFAULT_HUB, "edge-dev")
    front = build(services, service_hosts={"localhost"})
    q = parse_query(SELECT_ALL)
    requests: list[tuple[str, str, Any, dict[str, str]]] = [
        ("POST", "/devices/query", {"query": SELECT_ALL}, {"x-ms-continuation": _token_of(SELECT_ALL, b"[" * 3000)}),
        ("POST", "/devices/query", {"query": SELECT_ALL},
         {"x-ms-continuation": _token_of(SELECT_ALL, {"q": q.fingerprint, "a": "e\x00", "n": 0})}),
        ("GET", "/auditLog?since=0001-01-01T00:00:00%2B01:00", None, {}),
        ("GET", "/auditLog?until=9999-12-31T23:59:59-01:00", None, {}),
        ("POST", "/twins/edge-dev/methods", {"methodName": "a#b"}, {}),
        ("PUT", "/enrollments/edge-twin", {"attestation": {"type": "symmetricKey"},
                                           "initialTwin": {"tags": {"a.b": 1}}}, {}),
        ("PATCH", "/twins/edge-dev", '{"tags": {"n": 1%s}}' % ("0" * 400), {"Content-Type": "application/json"}),
    ]

    async def run() -> list[tuple[int, Any]]:
        server = TestServer(front.http, host="127.0.0.1")
        await server.start_server()
        answers = []
        try:
            async with aiohttp.ClientSession() as http:
                for method, path, body, headers in requests:
                    data = body if isinstance(body, str) else json.dumps(body) if body is not None else None
                    async with http.request(method, str(server.make_url(path)), data=data,
                                            headers={"Authorization": token, "Content-Type": "application/json",
                                                     **headers}) as r:
                        answers.append((r.status, await r.json()))
        finally:
            await server.close()
        return answers

    answers = asyncio.run(run())
    assert [status for status, _ in answers] == [400] * len(requests), answers
    for (_, body), words in zip(answers, ["x-ms-continuation", "x-ms-continuation", "since", "until", "methodName",
                                          "initialTwin.tags", "out of range"], strict=True):
        assert body["errorCode"] == 400004 and words in body["message"] and body["trackingId"], body


def test_a_stopping_server_ends_its_event_streams(services):
    """A client following ``GET /events`` (``timeout=0``) held a SIGTERM'd server past aiohttp's 60 s shutdown
    timeout: the stop waited on the stream's handler. The stream now ends within a second of the shutdown."""
    services.access_policies.ensure(OWNER_POLICY, OWNER_RIGHTS)
    token = sas.generate("localhost", services.access_policies.keys_of(OWNER_POLICY)[0], OWNER_POLICY)
    front = build(services, service_hosts={"localhost"})

    async def run() -> bytes:
        server = TestServer(front.http, host="127.0.0.1")
        await server.start_server()
        async with aiohttp.ClientSession() as http, \
                http.get(str(server.make_url("/events?timeout=0")), headers={"Authorization": token}) as stream:
            assert stream.status == 200
            await asyncio.wait_for(server.close(), 15)  # it waited out the 60 s shutdown timeout
            return await asyncio.wait_for(stream.content.read(), 5)  # and the stream ended, not cut mid-line

    assert asyncio.run(run()) == b""
