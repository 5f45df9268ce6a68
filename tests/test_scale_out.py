"""Several nodes on one PostgreSQL database, and ``--workers 2`` on SQLite and PostgreSQL (issue 15): live hub
state reaches a device on whichever process holds it.

Real processes, real clients: ``opendps serve`` nodes with their own ports (node B's data directory is a copy of
node A's: same master key), paho-mqtt devices connected to one node, the service API (REST, AMQP) called on the
other. The last test of each module kills a process with SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import ssl
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from proton import Delivery
from tests.conftest import _run_server, database
from tests.test_amqp import Amqp, c2d, hub_owner_token
from tests.test_device_api import device_sas, namespace, svc, sym_key
from tests.test_mqtt_hub import HUB, Client, hub_username, provision_over_mqtt
from tests.test_observability import samples, value

from opendps.store import HubConnection, Store
from opendps.transport import sas

pytestmark = pytest.mark.timeout(300, func_only=True)


# ---- helpers ----
def sas_device(node, device_id: str) -> str:
    """A SAS device in the default hub, made through ``node``; its primary key."""
    with svc(node) as c:
        r = c.put(f"/devices/{device_id}", json={"deviceId": device_id})
        assert r.status_code == 200, r.text
        return r.json()["authentication"]["symmetricKey"]["primaryKey"]


def connect(node, device_id: str, key: str) -> Client:
    """A paho device connected to ``node``; it never reconnects by itself (a test decides where it goes)."""
    client = Client(node, device_id, hub_username(device_id), password=sas.generate(f"{HUB}/devices/{device_id}", key))
    assert client.rc == 0
    client.c.reconnect_delay_set(min_delay=600, max_delay=600)
    client.dropped = threading.Event()
    client.c.on_disconnect = lambda *a: client.dropped.set()
    return client


def stop_loops(clients: Iterable[Client]) -> None:
    """``loop_stop()`` of every client, side by side: each waits for its network thread, which looks for the stop
    once a second (between its selects, or in a reconnect wait after the server dropped it): one by one, ~1 s each."""
    clients = list(clients)
    if clients:
        with ThreadPoolExecutor(len(clients)) as pool:
            list(pool.map(lambda client: client.c.loop_stop(), clients))


def answer_methods(client: Client, device_id: str) -> None:
    """The device answers every direct method with 200 and ``{"echo": <method name>, "payload": ...}``."""
    client.subscribe("$iothub/methods/POST/#")
    queued = client.c.on_message

    def on_message(c, userdata, message) -> None:
        if message.topic.startswith("$iothub/methods/POST/"):
            name, _, query = message.topic[len("$iothub/methods/POST/"):].partition("/?$rid=")
            if name != "silent":
                answer = json.dumps({"echo": name, "payload": json.loads(message.payload or b"null")})
                c.publish(f"$iothub/methods/res/200/?$rid={query}", answer, qos=0)
            return
        queued(c, userdata, message)

    client.c.on_message = on_message


def receive(client: Client, *prefixes: str, timeout: float = 5) -> dict[str, bytes]:
    """The first message of each topic prefix, in whatever order they come (a C2D wake-up reads the store first,
    a desired push does not)."""
    got: dict[str, bytes] = {}
    deadline = time.time() + timeout
    while len(got) < len(prefixes) and time.time() < deadline:
        with contextlib.suppress(queue.Empty):
            topic, payload = client.messages.get(timeout=0.1)
            for prefix in prefixes:
                if topic.startswith(prefix) and prefix not in got:
                    got[prefix] = payload
    assert set(got) == set(prefixes), f"within {timeout} s only {sorted(got)}"
    return got


def presence(node) -> dict[str, tuple[str, str]]:
    """device id -> (node id, session), as recorded."""
    store = Store(node.db_url)
    try:
        with store.session() as s:
            return {r.device_key: (r.node_id, r.session) for r in s.query(HubConnection).all()}
    finally:
        store.dispose()


def wait_connected(node, device_id: str, state: str = "Connected", timeout: float = 10) -> None:
    """The device's connectionState as ``node`` answers it (presence, across nodes)."""
    deadline = time.time() + timeout
    with svc(node) as c:
        while True:
            got = c.get(f"/devices/{device_id}").json()["connectionState"]
            if got == state or time.time() > deadline:
                assert got == state, f"{device_id} is {got} on {node.url}"
                return
            time.sleep(0.05)


def invoke(node, device_id: str, method: str, payload=None, timeout: int = 5) -> httpx.Response:
    with svc(node) as c:
        return c.post(f"/twins/{device_id}/methods", json={"methodName": method, "payload": payload,
                                                           "responseTimeoutInSeconds": timeout})


def nodes_of(node) -> list[dict]:
    out = node.cli("info", "-o", "json", check=True)
    return json.loads(out.stdout)["nodes"]


def events(node, device_id: str) -> list[dict]:
    with svc(node) as c:
        r = c.get("/events", params={"from": "earliest", "timeout": "1", "deviceId": device_id})
        assert r.status_code == 200, r.text
        return [json.loads(line) for line in r.text.splitlines() if line.strip()]


def disable(node, device_id: str) -> None:
    with svc(node) as c:
        dev = c.get(f"/devices/{device_id}").json()
        dev["status"] = "disabled"
        assert c.put(f"/devices/{device_id}", json=dev, headers={"If-Match": "*"}).status_code == 200


# ---- the options, without a server ----
def test_workers_and_bus_options_are_checked_and_saved_without_credentials(tmp_path):
    from tests.conftest import invoke_cli

    env = {**os.environ, "OPENDPS_DATA_DIR": str(tmp_path / "data")}
    env.pop("OPENDPS_DB", None)
    env.pop("OPENDPS_BUS", None)
    bad_bus = invoke_cli(env, "serve", "--bus", "http://nats.example")
    assert bad_bus.returncode == 1 and bad_bus.stderr.strip().splitlines() == [
        "error: bus 'http://nats.example' is not a NATS server URL (nats://host:4222 or tls://host:4222)"]
    too_many = invoke_cli(env, "serve", "--workers", "999")
    assert too_many.returncode == 2 and "'--workers': 999 is not in the range 0<=x<=256" in too_many.stderr
    assert not (tmp_path / "data").exists()  # nothing written by a refused start
    done = invoke_cli(env, "init", "--workers", "3", "--bus", "nats://user:secret@127.0.0.1:4222")
    assert done.returncode == 0, done.stderr
    saved = json.loads((tmp_path / "data" / "config.json").read_text())
    assert saved["workers"] == 3 and saved["bus"] is None and "secret" not in json.dumps(saved)
    assert "OPENDPS_BUS" in done.stderr
    info = invoke_cli(env, "info", "-o", "table")
    assert info.returncode == 0 and "no server process is running" in info.stdout
    assert json.loads(invoke_cli(env, "info", "-o", "json").stdout)["nodes"] == []
    # a NATS URL given once is saved for the next start; --bus store goes back to the database's own carrier
    from opendps.instance import Settings

    Settings.load(tmp_path / "data", bus="nats://127.0.0.1:4222").save()
    assert Settings.load(tmp_path / "data").bus == "nats://127.0.0.1:4222"
    Settings.load(tmp_path / "data", bus="store").save()
    assert json.loads((tmp_path / "data" / "config.json").read_text())["bus"] is None
    assert Settings.load(tmp_path / "data").bus is None


def test_default_workers_follow_the_database():
    from opendps.workers import default_workers

    assert default_workers("sqlite+pysqlite:////tmp/x.db") == 1
    assert default_workers("postgresql+psycopg://u@h/db") == len(os.sched_getaffinity(0))


# ---- two nodes on one PostgreSQL database ----
@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """Node A (initialises) and node B (a copy of A's data directory: the same master key), one database."""
    tmp = tmp_path_factory.mktemp("nodes")
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    with database("postgresql", tmp) as db_url, contextlib.ExitStack() as stack:
        a = stack.enter_context(contextlib.contextmanager(_run_server)(
            db_url, tmp / "a", extra_args=("--workers", "1"), data_dir=tmp / "a" / "data"))
        shutil.copytree(tmp / "a" / "data", tmp / "b" / "data")
        b = stack.enter_context(contextlib.contextmanager(_run_server)(
            db_url, tmp / "b", extra_args=("--workers", "1"), data_dir=tmp / "b" / "data"))
        yield a, b


def test_two_nodes_are_one_service(two_nodes):
    a, b = two_nodes
    assert a.id_scope == b.id_scope and a.url != b.url
    listed = nodes_of(a)
    assert len(listed) == 2 and {n["endpoints"]["https"] for n in listed} == {int(a.url.rsplit(":", 1)[1]),
                                                                              int(b.url.rsplit(":", 1)[1])}
    with svc(a) as c:
        sym_key(c, "/enrollments/made-on-a", {"attestation": {"type": "symmetricKey"}})
    with svc(b) as c:
        assert c.get("/enrollments/made-on-a").status_code == 200


def test_methods_c2d_desired_and_state_reach_a_device_on_the_other_node(two_nodes):
    a, b = two_nodes
    key = sas_device(b, "roamer")
    device = connect(a, "roamer", key)
    try:
        answer_methods(device, "roamer")
        device.subscribe("devices/roamer/messages/devicebound/#", "$iothub/twin/PATCH/properties/desired/#")
        wait_connected(b, "roamer")  # B sees the device A holds
        # direct method through B, answered by the device on A
        r = invoke(b, "roamer", "reboot", {"delay": 3})
        assert r.status_code == 200, r.text
        assert r.json() == {"status": 200, "payload": {"echo": "reboot", "payload": {"delay": 3}}}
        # 504 when the device does not answer in time (the method times out on A; B reports it)
        r = invoke(b, "roamer", "silent", timeout=1)
        assert r.status_code == 504 and r.json()["errorCode"] == 504101, r.text
        # C2D over REST on B is pushed at once to the device on A
        with svc(b) as c:
            assert c.post("/devices/roamer/messages/deviceBound", content=b"via-b").status_code == 202
        _, payload = device.expect("devices/roamer/messages/devicebound/", timeout=5)
        assert payload == b"via-b"
        # ... and over AMQP on B
        amqp = Amqp(b)
        try:
            assert amqp.put_token(hub_owner_token(b))[0] == 200
            state, cond, _ = amqp.send(amqp.devicebound(), c2d("roamer", b"via-b-amqp", id="m-amqp"))
            assert (state, cond) == (Delivery.ACCEPTED, None)
        finally:
            amqp.close()
        _, payload = device.expect("devices/roamer/messages/devicebound/", timeout=5)
        assert payload == b"via-b-amqp"
        # a desired-property change made on B is pushed to the device on A
        with svc(b) as c:
            assert c.patch("/twins/roamer", json={"properties": {"desired": {"fw": "2.1"}}}).status_code == 200
        topic, payload = device.expect("$iothub/twin/PATCH/properties/desired/", timeout=5)
        assert json.loads(payload)["fw"] == "2.1"
        # the device query on B counts it connected
        with svc(b) as c:
            r = c.post("/devices/query", json={"query": "SELECT * FROM devices WHERE connectionState = 'Connected'"})
            assert "roamer" in {d["deviceId"] for d in r.json()}
    finally:
        device.close()
    wait_connected(b, "roamer", "Disconnected")
    r = invoke(b, "roamer", "reboot")
    assert r.status_code == 404 and r.json()["errorCode"] == 404103, r.text


def test_disable_and_delete_on_one_node_drop_the_session_on_the_other_within_a_second(two_nodes):
    a, b = two_nodes
    keys = {d: sas_device(a, d) for d in ("to-disable", "to-delete")}
    devices = {d: connect(a, d, k) for d, k in keys.items()}
    try:
        for d in devices:
            wait_connected(b, d)
        disable(b, "to-disable")
        assert devices["to-disable"].dropped.wait(1.0), "disabled device still connected to the other node"
        with svc(b) as c:
            assert c.delete("/devices/to-delete").status_code == 204
        assert devices["to-delete"].dropped.wait(1.0), "deleted device still connected to the other node"
    finally:
        stop_loops(devices.values())


def test_a_new_connection_on_one_node_takes_over_from_the_other(two_nodes):
    a, b = two_nodes
    key = sas_device(a, "twice")
    first = connect(a, "twice", key)
    try:
        wait_connected(b, "twice")
        second = connect(b, "twice", key)
        try:
            assert first.dropped.wait(3), "the old session on node A was not closed"
            assert not second.dropped.is_set()
            answer_methods(second, "twice")
            r = invoke(a, "twice", "where")  # A routes to B now
            assert r.status_code == 200 and r.json()["payload"]["echo"] == "where", r.text
        finally:
            second.close()
    finally:
        first.c.loop_stop()


def test_a_policy_made_on_one_node_is_trusted_by_the_other_nodes_hub_without_restart(two_nodes, tmp_path):
    a, b = two_nodes
    with svc(a) as c:
        namespace(c, "late-ns", "late-p")
        key = sym_key(c, "/enrollments/late-dev", {"attestation": {"type": "symmetricKey"},
                                                    "credentialPolicyName": "late-p"})
    from tests.test_device_api import device_sas

    _, chain, op_key = provision_over_mqtt(b, "late-dev", tmp_path, password=device_sas(b.id_scope, "late-dev", key))
    device = Client(b, "late-dev", hub_username("late-dev"), cert=chain, key=op_key)
    try:
        assert device.rc == 0  # B's hub trusts the issuing CA that A made after B started
    finally:
        device.close()


def test_a_killed_node_loses_no_acknowledged_telemetry_and_its_devices_move_on(two_nodes):
    """Last in the module: node A is killed with SIGKILL."""
    a, b = two_nodes
    keys = {d: sas_device(a, d) for d in ("survivor-1", "survivor-2")}
    devices = {d: connect(a, d, k) for d, k in keys.items()}
    for d, client in devices.items():
        for n in range(20):
            client.publish(f"devices/{d}/messages/events/", f"{d}-{n}")  # returns after the PUBACK
    os.kill(a.proc.pid, signal.SIGKILL)
    a.proc.wait(10)
    for client in devices.values():
        assert client.dropped.wait(10)
    stop_loops(devices.values())
    moved = {d: connect(b, d, k) for d, k in keys.items()}
    try:
        for d, client in moved.items():
            client.publish(f"devices/{d}/messages/events/", f"{d}-after")
            bodies = [e["event"]["payload"] for e in events(b, d)]
            assert bodies == [f"{d}-{n}" for n in range(20)] + [f"{d}-after"], bodies
            answer_methods(client, d)
            r = invoke(b, d, "hello")
            assert r.status_code == 200, r.text
        # A's row goes once its heartbeat is older than the node timeout; B stays
        deadline = time.time() + 30
        while len(nodes_of(b)) != 1 and time.time() < deadline:
            time.sleep(0.5)
        assert [n["endpoints"]["https"] for n in nodes_of(b)] == [int(b.url.rsplit(":", 1)[1])]
    finally:
        for client in moved.values():
            client.close()


# ---- --workers 2 ----
NATS_URL = "nats://127.0.0.1:4222"


def _nats_reachable() -> None:
    """Skip locally, fail in CI, when no NATS server listens on 127.0.0.1:4222."""
    import socket

    from tests.conftest import service_missing

    try:
        socket.create_connection(("127.0.0.1", 4222), timeout=2).close()
    except OSError as exc:
        service_missing(f"NATS not reachable at {NATS_URL}: {exc}")


@pytest.fixture(scope="module", params=["sqlite", "postgresql", "sqlite+nats"])
def workers(request, tmp_path_factory):
    """``--workers 2``: on SQLite (the live_messages table), on PostgreSQL (LISTEN/NOTIFY), and on SQLite with the
    live state carried by NATS (``--bus``)."""
    kind, _, bus = request.param.partition("+")
    extra: tuple[str, ...] = ("--workers", "2")
    if bus:
        _nats_reachable()
        extra += ("--bus", NATS_URL)
    tmp = tmp_path_factory.mktemp(f"workers-{kind}{'-' + bus if bus else ''}")
    with database(kind, tmp) as db_url:
        yield from _run_server(db_url, tmp, extra_args=extra)


def _spread(node, count: int, prefix: str) -> tuple[dict[str, Client], dict[str, str]]:
    """At least ``count`` connected devices and where each is, with both workers holding some: the kernel spreads
    connections by a hash, so a few more are connected until it has (at most 24)."""
    clients: dict[str, Client] = {}
    where: dict[str, str] = {}
    while len(clients) < count or len(set(where.values())) < 2:
        assert len(clients) < 24, f"24 connections all landed on one worker: {where}"
        d = f"{prefix}-{len(clients)}"
        clients[d] = connect(node, d, sas_device(node, d))
        deadline = time.time() + 10
        while d not in where and time.time() < deadline:
            where = {k: n for k, (n, _) in presence(node).items() if k in clients}
            time.sleep(0.02)
        assert d in where, f"{d}'s presence was not recorded"
    return clients, where


def test_workers_share_the_ports_and_show_in_info(workers):
    listed = nodes_of(workers)
    bus = "nats" if "--bus" in workers.proc.args else "postgresql" if workers.db_url.startswith("postgresql") else "sqlite"
    assert len(listed) == 2 and sorted(n["worker"] for n in listed) == [0, 1]
    assert len({n["pid"] for n in listed}) == 2 and workers.proc.pid not in {n["pid"] for n in listed}
    log = (Path(workers.data_dir).parent / "server.log").read_text()
    assert "workers:            2" in log and "listening as worker 0 of 2" in log and "listening as worker 1 of 2" in log
    assert log.count(f"bus: {bus};") == 2, log


def test_every_live_feature_works_whichever_worker_holds_the_device(workers):
    clients, where = _spread(workers, 6, "spread")
    try:
        assert len(set(where.values())) == 2, where
        for d, client in clients.items():
            answer_methods(client, d)
            client.subscribe(f"devices/{d}/messages/devicebound/#", "$iothub/twin/PATCH/properties/desired/#")
        for d, client in clients.items():
            # each HTTPS request lands on either worker: every feature is exercised both ways across the six
            for attempt in range(2):
                r = invoke(workers, d, "ping", attempt)
                assert r.status_code == 200 and r.json()["payload"] == {"echo": "ping", "payload": attempt}, r.text
            with svc(workers) as c:
                assert c.post(f"/devices/{d}/messages/deviceBound", content=d.encode()).status_code == 202
                assert c.patch(f"/twins/{d}", json={"properties": {"desired": {"v": d}}}).status_code == 200
            got = receive(client, f"devices/{d}/messages/devicebound/", "$iothub/twin/PATCH/properties/desired/")
            assert got[f"devices/{d}/messages/devicebound/"] == d.encode()
            assert json.loads(got["$iothub/twin/PATCH/properties/desired/"])["v"] == d
        for d in list(clients)[:3]:
            disable(workers, d)
            assert clients[d].dropped.wait(1.0), f"disabled {d} still connected"
    finally:
        stop_loops(clients.values())


def test_a_revocation_drops_certificate_sessions_on_every_worker_within_a_second(workers, tmp_path):
    """Issue 17: devices holding certificates of one policy are connected to both workers; revoking the policy's
    certificates through either worker drops every one of those sessions within 1 s (the `revoked` message names
    their issuer, carried by the bus: NOTIFY, the table or NATS), and a reconnect is refused (CONNACK 5)."""
    ns = "rv-ns"  # each variant of the fixture has its own database
    with svc(workers) as c:
        namespace(c, ns, "rv-p")
    clients: dict[str, Client] = {}
    files: dict[str, tuple[Path, Path]] = {}
    where: dict[str, str] = {}
    while len(clients) < 2 or len(set(where.values())) < 2:
        assert len(clients) < 12, f"12 connections all landed on one worker: {where}"
        d = f"{ns}-d{len(clients)}"
        with svc(workers) as c:
            key = sym_key(c, f"/enrollments/{d}", {"attestation": {"type": "symmetricKey"}, "credentialPolicyName": "rv-p"})
        _, chain, op_key = provision_over_mqtt(workers, d, tmp_path, password=device_sas(workers.id_scope, d, key))
        files[d] = (chain, op_key)
        client = Client(workers, d, hub_username(d), cert=chain, key=op_key)
        assert client.rc == 0
        client.c.reconnect_delay_set(min_delay=600, max_delay=600)
        client.dropped = threading.Event()
        client.c.on_disconnect = lambda *a, e=client.dropped: e.set()
        clients[d] = client
        deadline = time.time() + 10
        while d not in where and time.time() < deadline:
            where = {k: n for k, (n, _) in presence(workers).items() if k in clients}
            time.sleep(0.02)
        assert d in where, f"{d}'s presence was not recorded"
    try:
        with svc(workers) as c:
            r = c.post(f"/namespaces/{ns}/credentials/default/policies/rv-p/revokeCertificates",
                       json={"reason": "keyCompromise"})
        revoked_at = time.monotonic()
        assert r.status_code == 200 and r.json() == {"revokedCertificateCount": len(clients)}, r.text
        for d, client in clients.items():
            assert client.dropped.wait(max(0.0, revoked_at + 1.0 - time.monotonic())), \
                f"{d} on {where[d]} still connected 1 s after the revocation"
        first = next(iter(clients))
        refused = Client(workers, first, hub_username(first), cert=files[first][0], key=files[first][1])
        assert refused.rc == 5
        refused.close()
    finally:
        stop_loops(clients.values())


def test_a_second_connection_on_the_other_worker_takes_over(workers):
    key = sas_device(workers, "hopper")
    for _ in range(10):  # connections spread by the kernel's hash: try until the two land on different workers
        first = connect(workers, "hopper", key)
        wait_connected(workers, "hopper")
        deadline = time.time() + 5  # the worker holding it says Connected at once; its presence row follows
        while "hopper" not in presence(workers) and time.time() < deadline:
            time.sleep(0.02)
        before = presence(workers)["hopper"]
        second = connect(workers, "hopper", key)
        deadline = time.time() + 5
        while presence(workers).get("hopper", before)[1] == before[1] and time.time() < deadline:
            time.sleep(0.05)
        if presence(workers)["hopper"][0] != before[0]:
            assert first.dropped.wait(3), "the old session on the other worker was not closed"
            assert not second.dropped.is_set()
            first.c.loop_stop()
            second.close()
            return
        first.c.loop_stop()
        second.close()
        deadline = time.time() + 5  # the next pair's first row must be its own, not this pair's before its detach
        while "hopper" in presence(workers) and time.time() < deadline:
            time.sleep(0.02)
    pytest.fail("ten pairs of connections all landed on one worker")


def test_metrics_add_up_over_the_workers(workers):
    """One scrape, whichever worker answers it, sums every worker's counters (prometheus_client's multiprocess mode,
    issue 19): CONNECTs landed on both workers are all counted, in every scrape; each worker publishes its own process
    gauges (a pid label) instead of the default collectors."""
    if "--bus" in workers.proc.args:
        pytest.skip("the metrics do not depend on the bus: checked on SQLite and PostgreSQL")
    ca = ssl.create_default_context(cafile=workers.ca_file)

    def scrape() -> dict:
        r = httpx.get(f"{workers.url}/metrics", verify=ca, timeout=30)  # a new connection: either worker answers
        assert r.status_code == 200, r.text
        return samples(r.text)

    before = value(scrape(), "opendps_hub_connects_total", auth="sas")
    clients, where = _spread(workers, 2, "metrics")
    try:
        assert len(set(where.values())) == 2, where
        for _ in range(4):
            now = scrape()
            assert value(now, "opendps_hub_connects_total", auth="sas") - before == len(clients), where
        pids = {labels for (name, labels) in now if name == "opendps_worker_resident_memory_bytes"}
        assert len(pids) >= 2 and not any(name.startswith("process_") for name, _ in now), sorted(pids)
    finally:
        for client in clients.values():
            client.close()


def test_a_killed_worker_is_restarted(workers):
    """Last in the module: one worker is killed with SIGKILL; the supervisor starts another, the service goes on.
    (Once, on SQLite: the supervisor depends on neither the store nor the bus, a restarted worker joins the cluster as
    every worker does — on both stores at every start of this module — and a restart costs seconds.)"""
    if "--bus" in workers.proc.args or workers.db_url.startswith("postgresql"):
        pytest.skip("the restart depends on neither the store nor the bus: checked once, on SQLite")
    before = nodes_of(workers)
    victim = before[0]
    os.kill(victim["pid"], signal.SIGKILL)
    deadline = time.time() + 60
    while time.time() < deadline:
        now = nodes_of(workers)
        pids = {n["pid"] for n in now}
        if len(now) == 2 and victim["pid"] not in pids:
            break
        time.sleep(0.5)
    assert len(now) == 2 and victim["pid"] not in pids, now
    log = (Path(workers.data_dir).parent / "server.log").read_text()
    assert f"worker {victim['worker']} (pid {victim['pid']}) exited with -9; restarting it" in log
    key = sas_device(workers, "after-restart")
    client = connect(workers, "after-restart", key)
    client.close()


def test_workers_stop_when_their_supervisor_is_killed(workers):
    """Last in the module: the supervisor is killed with SIGKILL; its workers notice the pipe close and stop (no
    orphan keeps the ports). Once, on SQLite: it does not depend on the store or the bus."""
    if workers.db_url.startswith("postgresql") or "--bus" in workers.proc.args:
        pytest.skip("checked once, on SQLite: the supervisor's pipe does not depend on the store or the bus")
    pids = [n["pid"] for n in nodes_of(workers)]
    os.kill(workers.proc.pid, signal.SIGKILL)
    workers.proc.wait(10)
    deadline = time.time() + 15
    alive = pids
    while alive and time.time() < deadline:
        alive = [p for p in pids if _running(p)]
        time.sleep(0.1)
    assert alive == [], f"workers {alive} outlived their supervisor"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) is not running
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
