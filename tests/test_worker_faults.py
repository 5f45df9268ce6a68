"""``opendps serve --workers 2`` under real process failures: signals to the supervisor and to single workers.

Real processes and signals (SIGTERM, SIGKILL, SIGSTOP/SIGCONT), paho-mqtt devices, SQLite (the live bus is the
``live_messages`` table; nothing here depends on the store's kind). One server start per test: each test leaves its
server in a state of its own making. Waits are polls with deadlines; none is an assertion.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from tests.conftest import _run_server
from tests.test_device_api import svc
from tests.test_scale_out import _running, _spread, connect, nodes_of, presence, receive, stop_loops

from opendps.cluster import NODE_TIMEOUT

pytestmark = pytest.mark.timeout(240, func_only=True)


@pytest.fixture
def server(tmp_path) -> Iterator:
    """A fresh ``--workers 2`` server on SQLite, for one test (one that ends the supervisor)."""
    with contextlib.contextmanager(_run_server)(f"sqlite+pysqlite:///{tmp_path / 'opendps.db'}", tmp_path,
                                                extra_args=("--workers", "2")) as running:
        yield running


@pytest.fixture(scope="module")
def survivor(tmp_path_factory) -> Iterator:
    """A ``--workers 2`` server on SQLite shared by the tests after which it still serves with two workers (a worker
    killed and restarted, one stopped and resumed): each uses its own devices and looks only at them."""
    tmp_path = tmp_path_factory.mktemp("survivor")
    with contextlib.contextmanager(_run_server)(f"sqlite+pysqlite:///{tmp_path / 'opendps.db'}", tmp_path,
                                                extra_args=("--workers", "2")) as running:
        yield running


def _log(server) -> str:
    return (Path(server.data_dir).parent / "server.log").read_text()


def _until(check: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def _key(server, device_id: str) -> str:
    with svc(server) as c:
        return c.get(f"/devices/{device_id}").json()["authentication"]["symmetricKey"]["primaryKey"]


def _method(server, device_id: str, name: str, timeout: int, client_timeout: float) -> httpx.Response:
    with svc(server) as c:
        return c.post(f"/twins/{device_id}/methods", json={"methodName": name, "responseTimeoutInSeconds": timeout},
                      timeout=client_timeout)


def test_sigterm_repeated_while_stopping_still_exits_0_and_leaves_no_worker(server):
    """systemd (KillMode) or an operator sends SIGTERM again while the supervisor stops: it must still exit 0,
    within the stop bound, with no worker left and no traceback. Before: the interpreter's teardown (~0.5 s after
    the workers stopped) had reset the handler, and a second SIGTERM ended the supervisor with -15."""
    clients, _ = _spread(server, 2, "term")
    pids = [n["pid"] for n in nodes_of(server)]
    started = time.monotonic()
    try:
        while server.proc.poll() is None:
            assert time.monotonic() - started < 30, "the supervisor did not exit within 30 s of SIGTERM"
            with contextlib.suppress(ProcessLookupError):
                server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.01)
    finally:
        stop_loops(clients.values())
    assert server.proc.returncode == 0, _log(server)
    _until(lambda: not any(_running(p) for p in pids), 5, f"workers {pids} gone")
    log = _log(server)
    assert "Traceback" not in log and "opendps shutting down (SIGTERM)" in log, log


def test_a_restarted_worker_removes_its_dead_predecessor_and_the_devices_are_served(survivor):
    """A worker is killed with SIGKILL while devices are connected to both. Its restarted successor removes the dead
    node before it says it listens: a device that was on it and has not come back is Disconnected and a direct
    method to it a 404 at once (before: its presence row named the dead node until the 10 s node timeout, and the
    method waited its whole timeout for a 504). The devices that come back are served at once — methods, C2D and
    desired pushes — whichever worker they land on; the survivor's devices never noticed."""
    server = survivor
    clients, where = _spread(server, 4, "kill")
    victim_node = where["kill-0"]
    victim = next(n for n in nodes_of(server) if n["id"] == victim_node)
    gone = [d for d, n in where.items() if n == victim_node]
    stay = [d for d in clients if d not in gone]
    keys = {d: _key(server, d) for d in clients}
    os.kill(victim["pid"], signal.SIGKILL)
    try:
        for d in gone:
            assert clients[d].dropped.wait(10), f"{d} not dropped by the kill"
        stop_loops(clients[d] for d in gone)
        line = f"worker {victim['worker']} restarted (pid "
        _until(lambda: line in _log(server), 60, "the supervisor restarted the worker")
        # checked at once: the successor removed its predecessor before it said it listens
        assert not set(gone) & set(presence(server)), presence(server)
        listed = nodes_of(server)
        assert len(listed) == 2 and victim["pid"] not in {n["pid"] for n in listed}, listed
        started = time.monotonic()
        r = _method(server, gone[0], "anyone", timeout=20, client_timeout=30)
        assert r.status_code == 404 and time.monotonic() - started < 10, (r.status_code, r.text)
        with svc(server) as c:
            assert c.get(f"/devices/{gone[0]}").json()["connectionState"] == "Disconnected"
        back = {d: connect(server, d, keys[d]) for d in gone}
        clients.update(back)
        # presence is written in batches after the CONNACK (a CONNECT never waits for it): a few ms
        _until(lambda: set(gone) <= set(presence(server)), 10, "the returned devices' presence")
        for d in gone + stay:
            _serve_methods(clients[d])
            clients[d].subscribe(f"devices/{d}/messages/devicebound/#", "$iothub/twin/PATCH/properties/desired/#")
        for d in gone + stay:
            r = _method(server, d, "hello", timeout=10, client_timeout=30)
            assert r.status_code == 200 and r.json()["payload"] == {"echo": "hello"}, r.text
            with svc(server) as c:
                assert c.post(f"/devices/{d}/messages/deviceBound", content=d.encode()).status_code == 202
                assert c.patch(f"/twins/{d}", json={"properties": {"desired": {"v": d}}}).status_code == 200
            got = receive(clients[d], f"devices/{d}/messages/devicebound/", "$iothub/twin/PATCH/properties/desired/")
            assert got[f"devices/{d}/messages/devicebound/"] == d.encode()
            assert json.loads(got["$iothub/twin/PATCH/properties/desired/"])["v"] == d
        assert not any(clients[d].dropped.is_set() for d in stay)
    finally:
        stop_loops(clients.values())


def _serve_methods(client, seen: list[str] | None = None) -> None:
    """The device answers every direct method with 200 ``{"echo": name}``; ``seen`` collects the names."""
    client.subscribe("$iothub/methods/POST/#")
    queued = client.c.on_message

    def on_message(c, userdata, message) -> None:
        if message.topic.startswith("$iothub/methods/POST/"):
            name, _, query = message.topic[len("$iothub/methods/POST/"):].partition("/?$rid=")
            if seen is not None:
                seen.append(name)
            c.publish(f"$iothub/methods/res/200/?$rid={query}", json.dumps({"echo": name}), qos=0)
            return
        queued(c, userdata, message)

    client.c.on_message = on_message


def test_a_stalled_worker_does_not_run_methods_whose_callers_timed_out(survivor):
    """The worker holding a device is stopped (SIGSTOP: a hung process); direct methods for the device through the
    other worker time out (504), as they must. When the stalled worker resumes (SIGCONT) it reads those calls from
    the bus: it must not run them now — their callers were told they failed and may have retried. Before, the device
    received every one of them when its worker woke."""
    server = survivor
    clients, where = _spread(server, 2, "stall")
    device = "stall-0"
    stalled = next(n for n in nodes_of(server) if n["id"] == where[device])
    seen: list[str] = []
    _serve_methods(clients[device], seen)
    answered: list[str] = []
    for cycle in range(3):
        # the device reachable (again: a cycle that found no call to the other worker let the stalled one resume)
        _until(lambda: _method(server, device, "before", timeout=5, client_timeout=30).status_code == 200, 60,
               "the device answers before its worker is stopped")
        os.kill(stalled["pid"], signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            # a new connection per call, six at once: the kernel's hash sends some to the stopped worker, whose
            # backlog holds them (their clients give up; the worker runs them when it resumes, as any server runs a
            # request it read), the others to the other worker, which answers 504 once the method's timeout and the
            # bus's 2 s grace have passed. All within NODE_TIMEOUT of the stop: a worker silent that long is taken for
            # dead (its devices' presence goes, a call is a 404) — calls made one after another, each hanging 6 s on
            # the stopped worker, outlasted it
            def late(name: str) -> str | None:
                with contextlib.suppress(httpx.TimeoutException):
                    r = _method(server, device, name, timeout=1, client_timeout=NODE_TIMEOUT - 4)
                    assert r.status_code == 504, r.text  # the other worker: the device's worker does not answer
                    return name
                return None

            with ThreadPoolExecutor(6) as pool:
                answered = [name for name in pool.map(late, [f"late-{cycle}-{n}" for n in range(6)]) if name]
            assert time.monotonic() - stopped < NODE_TIMEOUT
        finally:
            os.kill(stalled["pid"], signal.SIGCONT)
        if answered:
            break
    assert answered, "in three cycles every call landed on the stopped worker"
    # the resumed worker reads the bus in order: once a later call is answered, the late ones were read before it
    _until(lambda: _method(server, device, "after", timeout=5, client_timeout=30).status_code == 200, 60,
           "a method reaches the device after SIGCONT")
    assert "after" in seen and not set(answered) & set(seen), (answered, seen)
    stop_loops(clients.values())


def test_workers_outlive_nothing_after_sigkill_of_the_supervisor(server):
    """The supervisor is killed with SIGKILL while devices are connected: the workers notice (their pipe ends),
    stop cleanly (each leaves the cluster) and free the ports, so a new ``opendps serve`` can start on them."""
    clients, _ = _spread(server, 2, "orphan")
    pids = [n["pid"] for n in nodes_of(server)]
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    try:
        _until(lambda: not any(_running(p) for p in pids), 20, f"workers {pids} outlived their supervisor")
        assert nodes_of(server) == []  # each left: no row waits for the sweep
        out = subprocess.run(["ss", "-ltnH", f"sport = :{server.mqtt_port}"], capture_output=True, text=True)
        assert out.returncode != 0 or out.stdout.strip() == "", out.stdout
    finally:
        stop_loops(clients.values())


def test_a_worker_hung_while_restarting_is_killed_and_started_again(tmp_path, monkeypatch, caplog):
    """The supervisor's own loop, in this process, with a real spawned worker: the worker is killed, and its
    replacement hangs before it listens (SIGSTOP: a start stuck on a lock, a disk, a token). Past the start timeout
    the supervisor must kill it and start another (with the crash-loop delay), saying why once. Before, it logged
    "did not restart" and left the hung process in the slot for good: one worker fewer until someone noticed."""
    from tests.conftest import free_ports, invoke_cli

    from opendps import workers
    from opendps.instance import Settings

    data = tmp_path / "data"
    https, mqtt, amqp, http = free_ports(4)
    env = {**os.environ, "OPENDPS_DATA_DIR": str(data), "OPENDPS_DB": f"sqlite+pysqlite:///{tmp_path / 'opendps.db'}"}
    env.pop("OPENDPS_CONNECTION_STRING", None)
    env.pop("OPENDPS_MASTER_KEY", None)
    done = invoke_cli(env, "init", "--host", "127.0.0.1", "--https-port", str(https), "--mqtt-port", str(mqtt),
                      "--amqp-port", str(amqp), "--http-port", str(http))
    assert done.returncode == 0, done.stderr
    monkeypatch.setenv("OPENDPS_DB", env["OPENDPS_DB"])
    monkeypatch.setattr(workers, "START_TIMEOUT", 10.0)
    caplog.set_level("INFO", logger="opendps")
    sup = workers.Supervisor(Settings.load(data), 1)
    watcher: list[BaseException] = []

    def watch() -> None:
        try:
            sup._watch()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            watcher.append(exc)

    thread = threading.Thread(target=watch, daemon=True)
    sup._start(0)
    try:
        first = sup._await_ready([0])[0]
        sup.start_timeout = 3.0  # what the hung start is given (and waits out): read as each start begins
        thread.start()
        os.kill(first, signal.SIGKILL)
        hung = _until(lambda: sup.procs[0].pid != first and sup.procs[0].pid, 30, "a replacement was spawned")
        os.kill(hung, signal.SIGSTOP)  # before it listens: spawning and importing take far longer than this poll
        _until(lambda: "could not start" in caplog.text, 30, f"the hung start was given up: {caplog.text}")
        sup.start_timeout = 60.0  # the next start (after the crash-loop delay, 2 s) gets a loaded machine's time
        _until(lambda: "restarted (pid" in caplog.text, 60, f"a worker replaced the hung one: {caplog.text}")
        assert sup.procs[0].pid != hung and sup.procs[0].is_alive() and not _running(hung)
        assert caplog.text.count("could not start") == 1, caplog.text
        assert not watcher, watcher
    finally:
        sup.stopping = "test"
        for proc in sup.procs.values():
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(proc.pid, signal.SIGCONT)
        if thread.is_alive():
            thread.join(15)
        sup._stop_all()
