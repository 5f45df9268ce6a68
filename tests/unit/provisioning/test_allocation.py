"""Allocation: weighted rendezvous hashing, static, and the custom webhook (a real HTTP server on loopback)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import func, select
from tests.unit.conftest import creds, register, symmetric_group

from opendps.hub import HubView
from opendps.provisioning import allocation
from opendps.store import HubDevice, Registration
from opendps.transport.sas import derive_device_key


def _hub(n: int, weight: int = 1, applies: bool = True) -> HubView:
    return HubView(n, f"hub{n}", f"hub{n}.test", weight, applies, "etag", datetime.now(UTC))


def test_hashing_is_deterministic_and_case_insensitive():
    hubs = [_hub(1), _hub(2), _hub(3)]
    assert allocation.hashed("Device-A", hubs) == allocation.hashed("device-a", list(reversed(hubs)))


def test_weights_share_devices_in_proportion():
    hubs = [_hub(1, weight=1), _hub(2, weight=3)]
    counts = Counter(allocation.hashed(f"dev-{i}", hubs).id for i in range(4000))
    assert 0.70 < counts[2] / 4000 < 0.80


def test_adding_a_hub_moves_only_the_devices_it_takes():
    before, after = [_hub(1), _hub(2)], [_hub(1), _hub(2), _hub(3)]
    moved = [i for i in range(2000) if allocation.hashed(f"d{i}", before).id != allocation.hashed(f"d{i}", after).id]
    assert moved and all(allocation.hashed(f"d{i}", after).id == 3 for i in moved)
    assert 0.25 < len(moved) / 2000 < 0.42


def test_candidates_are_the_listed_hubs_or_those_that_apply_allocation_policy():
    hubs = [_hub(1), _hub(2, weight=0), _hub(3, applies=False)]
    assert allocation.candidates({}, hubs) == [hubs[0]]
    assert allocation.candidates({"iotHubs": ["hub3.test", "gone.test"]}, hubs) == [hubs[2]]


@contextmanager
def webhook(answer: object, status: int = 200, delay: float = 0.0) -> Iterator[tuple[str, list[dict]]]:
    """A real webhook on loopback that records the AllocationRequests it receives (answering after ``delay`` s)."""
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            time.sleep(delay)
            body = (answer if isinstance(answer, bytes) else json.dumps(answer).encode())
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/allocate", seen
    finally:
        server.shutdown()
        server.server_close()


def _custom_group(services, url: str, timeout: int = 2) -> str:
    services.hubs.create("east", "east.hubs.test")
    return symmetric_group(services, "custom", allocationPolicy="custom", iotHubs=["east", "default"],
                           customAllocationDefinition={"webhookUrl": url, "apiVersion": "2021-10-01",
                                                       "timeoutInSeconds": timeout})


def test_the_webhook_chooses_the_hub_the_twin_and_the_payload(services):
    answer = {"iotHubHostName": "east.hubs.test", "initialTwin": {"tags": {"by": "webhook"}}, "payload": {"ok": 1}}
    with webhook(answer) as (url, seen):
        key = _custom_group(services, url)
        state = register(services, creds("dev-w1", key=derive_device_key(key, "dev-w1")),
                         payload={"model": "x"})["registrationState"]
    assert (state["assignedHub"], state["payload"]) == ("east.hubs.test", {"ok": 1})
    assert services.hubs.get_device("east", "dev-w1").tags == {"by": "webhook"}
    request = seen[0]
    assert request["deviceRuntimeContext"]["payload"] == {"model": "x"}
    assert request["enrollmentGroup"]["enrollmentGroupId"] == "custom"
    assert sorted(request["linkedHubs"]) == ["default.hubs.test", "east.hubs.test"]


@pytest.mark.parametrize(("answer", "status", "words"), [
    ({"iotHubHostName": "nowhere.test"}, 200, "not one of the enrollment's linked hubs"),
    ({}, 200, "lacks iotHubHostName"),
    (b"not json", 200, "answer is not valid JSON"),
    (b"[" * 5000 + b"]" * 5000, 200, "answer is nested more than 32 levels deep"),
    ({"iotHubHostName": "east.hubs.test"}, 500, "returned HTTP 500"),
])
def test_a_failing_webhook_is_a_failed_operation_that_writes_nothing(services, answer, status, words):
    with webhook(answer, status) as (url, _):
        key = _custom_group(services, url)
        result = register(services, creds("dev-w2", key=derive_device_key(key, "dev-w2")))
    assert result["status"] == "failed"
    assert result["registrationState"]["errorCode"] == 400208 and words in result["registrationState"]["errorMessage"]
    with services.store.session() as s:
        assert s.scalar(select(func.count()).select_from(Registration)) == 0
        assert s.scalar(select(func.count()).select_from(HubDevice)) == 0


def test_no_available_hub_fails_the_operation(services):
    services.hubs.create("idle", "idle.hubs.test", allocation_weight=0)
    key = symmetric_group(services, "nowhere", iotHubs=[])
    services.hubs.delete("default")
    result = register(services, creds("dev-w3", key=derive_device_key(key, "dev-w3")))
    assert result["status"] == "failed" and "no linked hub" in result["registrationState"]["errorMessage"]


@contextlib.contextmanager
def raw_webhook(send) -> Iterator[str]:
    """A webhook speaking raw HTTP: ``send(connection)`` writes whatever answer the test needs."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)  # the request (small)
                with contextlib.suppress(OSError):
                    send(conn, stop)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/allocate"
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def _endless(conn, stop) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"[" * 8192
    while not stop.is_set():
        conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))


def _dribble(conn, stop) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
    while not stop.is_set():
        conn.sendall(b" ")
        time.sleep(0.2)


def _dribble_headers(conn, stop) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    while not stop.is_set():
        conn.sendall(b"a")
        time.sleep(0.2)


@pytest.mark.parametrize(("send", "words"), [(_endless, "larger than 65536 bytes"), (_dribble, "did not answer within 1 s"),
                                             (_dribble_headers, "did not answer within 1 s")])
def test_a_webhook_that_answers_without_end_is_cut_off_by_size_and_time(services, send, words):
    """A webhook sending without end is stopped at the size bound as it reads (it was read whole into memory first),
    and one sending a byte at a time, in its body or its headers, at the timeout measured from the request (each read
    was bounded, not the whole: 1,000 bytes at 0.2 s apart held a domain thread 200 s; a header line 0.2 s a byte,
    up to the 64 KiB httpx reads of headers, hours)."""
    with raw_webhook(send) as url:
        # the dribbles wait the timeout out: the smallest a group may set
        key = _custom_group(services, url, timeout=2 if send is _endless else 1)
        started = time.monotonic()
        result = register(services, creds("dev-w3", key=derive_device_key(key, "dev-w3")))
        took = time.monotonic() - started
    assert result["status"] == "failed" and words in result["registrationState"]["errorMessage"], result
    assert took < 6, took


def test_a_burst_against_a_quick_webhook_takes_turns_for_its_slots_and_is_not_refused():
    """At most WEBHOOK_CALLS_AT_ONCE calls wait on webhooks at once; a burst of twice that against a webhook that
    answers in 0.2 s waits its turn for a slot (WebhookBusy only when the slots stay taken: tests/test_exhaustion.py)."""
    hubs = [_hub(1), _hub(2)]
    results: list[object] = []
    with webhook({"iotHubHostName": "hub2.test"}, delay=0.2) as (url, seen):
        def one() -> None:
            try:
                results.append(allocation.custom(url, {"deviceRuntimeContext": {}}, hubs, timeout=5).hub.host_name)
            except Exception as exc:  # noqa: BLE001 - recorded: the assertion names it
                results.append(exc)

        threads = [threading.Thread(target=one) for _ in range(2 * allocation.WEBHOOK_CALLS_AT_ONCE)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    assert results == ["hub2.test"] * 2 * allocation.WEBHOOK_CALLS_AT_ONCE and len(seen) == len(results)
