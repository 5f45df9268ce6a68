"""Smoke test of ``opendps bench``: it runs end to end and its JSON has every field with sane types.

No timed assertions: the numbers depend on the machine; only their shape and consistency are checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import service_missing

from opendps.bench import hub as bench_hub

pytestmark = pytest.mark.timeout(120, func_only=True)

FIELDS = {"scenario": str, "concurrency": int, "count": int, "ok": int, "errors": int, "wall_seconds": float,
          "throughput": float, "latency": dict, "server_cpu_seconds": float, "cpu_seconds_per_op": float,
          "peak_rss_bytes": int, "ops_per_cpu_second": float, "error_samples": list}


def test_bench_quick_provisioning_reports_every_field_and_relates_to_the_crypto_ceiling(tmp_path: Path) -> None:
    """One bench run (each bench run starts its servers: one run for both provisioning scenarios)."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "opendps", "bench", "--quick", "--scenario", "crypto-ceiling",
                           "--scenario", "provision-https", "--scenario", "provision-mqtt-x509", "--count", "20",
                           "--json", str(out), "-o", "json"], capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert json.loads(proc.stdout) == report
    assert report["settings"]["quick"] is True and report["settings"]["database"] == "sqlite"
    assert report["machine"]["cpus"] >= 1
    rows = report["results"]
    assert [(r["scenario"], r["system"], r["transport"]) for r in rows] == [
        ("crypto-ceiling", "cryptography", "csr-issue"), ("crypto-ceiling", "cryptography", "mtls-handshake"),
        ("provision-https", "opendps", "https"), ("provision-mqtt-x509", "opendps", "mqtt")]
    ceiling, _handshake, https, x509 = rows
    assert ceiling["ok"] == ceiling["count"] == 20 and ceiling["ops_per_cpu_second"] > 0
    assert https["concurrency"] == 32
    for r in (https, x509):
        for name, kind in FIELDS.items():
            assert isinstance(r[name], kind), (name, r[name])
        assert r["count"] == r["ok"] == 20 and r["errors"] == 0 and r["error_samples"] == []
        assert r["throughput"] > 0 and r["wall_seconds"] > 0
        lat = r["latency"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
        assert r["server_cpu_seconds"] > 0 and r["cpu_seconds_per_op"] > 0 and r["ops_per_cpu_second"] > 0
        assert r["peak_rss_bytes"] > 10 * 2**20
        assert r["ratios"] == {}  # no peer scenario in this run
        assert r["workers"] == 1 and r["processes"] == 1  # the default: one server process, as before --workers
        # the ratio is what the two rows say, not a constant
        assert r["ceiling_ratio"] == round(r["ops_per_cpu_second"] / ceiling["ops_per_cpu_second"], 4)
    assert x509["extra"]["attestation"] == "x509"
    assert report["settings"]["workers"] == [1]
    # where the run's time went, per scenario (setup included): no more than the whole run took
    assert list(report["seconds"]) == ["crypto-ceiling", "provision-https", "provision-mqtt-x509"]
    assert all(t > 0 for t in report["seconds"].values()) and sum(report["seconds"].values()) < 110
    assert "provision-https took" in proc.stderr


def test_bench_workers_2_sums_cpu_and_memory_over_the_supervisor_and_its_workers(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "opendps", "bench", "--quick", "--scenario", "provision-https",
                           "--count", "10", "--workers", "2", "-o", "json"], capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["settings"]["workers"] == [2]
    rows = report["results"]
    assert [(r["scenario"], r["system"], r["concurrency"], r["workers"]) for r in rows] == [
        ("provision-https", "opendps", 32, 2)]
    (r,) = rows
    for name, kind in FIELDS.items():
        assert isinstance(r[name], kind), (name, r[name])
    assert r["ok"] == r["count"] == 10 and r["errors"] == 0
    assert r["server_cpu_seconds"] > 0 and r["cpu_seconds_per_op"] > 0
    # the supervisor and both workers (and multiprocessing's resource tracker): the bench checked that
    # opendps info lists 2 nodes, both children of the supervisor, before it started the load
    assert r["processes"] >= 3
    assert r["peak_rss_bytes"] > 3 * 10 * 2**20  # a sum: three Python processes at least


def test_run_bench_runs_server_scenarios_per_worker_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """Serverless scenarios run once; the others once per count, their opendps rows tagged; a reused peer row once."""
    import opendps.bench as bench
    from opendps.bench import Options, Result

    def row(scenario: str, system: str) -> Result:
        return Result(scenario=scenario, transport="x", concurrency=1, count=1, ok=1, errors=0, wall_seconds=1.0,
                      throughput=1.0, latency={"p50": 1.0, "p95": 1.0, "p99": 1.0}, server_cpu_seconds=0.1,
                      cpu_seconds_per_op=0.1, peak_rss_bytes=1, ops_per_cpu_second=10.0, system=system)

    calls: list[tuple[str, int]] = []

    def fake(name: str) -> object:
        def run(opts: Options) -> list[Result]:
            calls.append((name, opts.workers))
            if name == "crypto-ceiling":
                return [row(name, "cryptography")]
            peer = opts.peer_rows.setdefault(name, row(name, "mosquitto"))
            return [row(name, "opendps"), row(name, "opendps+nats"), peer]
        return run

    monkeypatch.setattr(bench, "scenario", fake)
    steps: list[tuple[str, int, int]] = []  # what the CLI's progress bar hears (issue 19)
    report = bench.run_bench(["crypto-ceiling", "hub-telemetry"],
                             Options(quick=True, db_url=None, lint=True, worker_counts=(1, 2)),
                             step=lambda what, done, total: steps.append((what, done, total)))
    assert calls == [("crypto-ceiling", 1), ("hub-telemetry", 1), ("hub-telemetry", 2)]
    assert steps == [("crypto-ceiling", 0, 3), ("hub-telemetry with --workers 1", 1, 3),
                     ("hub-telemetry with --workers 2", 2, 3), ("done", 3, 3)]
    assert [(r["scenario"], r["system"], r["workers"]) for r in report["results"]] == [
        ("crypto-ceiling", "cryptography", None), ("hub-telemetry", "opendps", 1), ("hub-telemetry", "opendps+nats", 1),
        ("hub-telemetry", "mosquitto", None), ("hub-telemetry", "opendps", 2), ("hub-telemetry", "opendps+nats", 2)]
    assert report["settings"]["workers"] == [1, 2]


def test_top_costs_reads_stacks_of_every_worker(tmp_path: Path) -> None:
    """py-spy --subprocesses roots each stack in process frames; a worker's command line holds a ';'."""
    from opendps.bench._harness import top_costs

    supervisor = 'process 10:"python -m opendps serve --workers 2"'
    worker = 'process 11:"python -B -c from multiprocessing.spawn import spawn_main; spawn_main(pipe_handle=9)"'
    raw = tmp_path / "raw.txt"
    raw.write_text("\n".join([
        f"{supervisor};{worker};register (opendps/provisioning/registration.py:10);sign (cryptography/x509.py:5) 3",
        f"{supervisor};{worker};run (asyncio/base_events.py:1);select (selectors.py:468) 50",
        f"{supervisor};{worker} 40",  # a thread without Python frames: idle, as without --subprocesses
        f"{supervisor};execute (sqlalchemy/engine/base.py:1) 1"]) + "\n")
    costs = top_costs(raw)
    assert costs["busy_samples"] == 4
    assert costs["components"] == {"cryptography (CSR verify, signing, HMAC)": 0.75, "store (SQLAlchemy + driver)": 0.25}
    assert costs["functions"] == {"register (opendps/provisioning/registration.py)": 0.75}


def test_process_tree_readings_and_wait_listening_waits_for_the_banner(tmp_path: Path) -> None:
    """CPU and peak RSS of a process and its child are summed; a listening port alone is not enough with a banner."""
    import contextlib
    import os
    import signal
    import socket
    import time

    from opendps.bench._harness import (
        CLK_TCK,
        free_port,
        proc_cpu_seconds,
        proc_peak_rss,
        proc_tree,
        stop_process,
        tree_cpu_seconds,
        tree_peak_rss,
        wait_listening,
    )

    port = free_port()
    log = tmp_path / "server.log"
    script = (
        "import socket, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time\\nx = sum(range(3_000_000))\\ntime.sleep(60)'])\n"
        f"s = socket.create_server(('127.0.0.1', {port}))\n"
        "time.sleep(1.0)\n"
        "print('opendps listening on https://127.0.0.1', flush=True)\n"
        "time.sleep(60)\n")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while len(proc_tree(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        with socket.socket() as probe:  # the port accepts long before the banner ...
            while probe.connect_ex(("127.0.0.1", port)) != 0 and time.monotonic() < deadline:
                time.sleep(0.05)
        assert "listening" not in log.read_text()
        wait_listening(proc, (port,), log, timeout=20, banner="opendps listening on")  # ... and it waits for that
        assert "opendps listening on" in log.read_text()
        tree = proc_tree(proc.pid)
        assert len(tree) == 2 and tree[0] == proc.pid
        peak, count = tree_peak_rss(proc.pid)
        assert count == 2 and peak == sum(proc_peak_rss(p) for p in tree)
        ticks = [round(proc_cpu_seconds(p) * CLK_TCK) for p in tree]  # integers: no float sums to compare
        assert round(tree_cpu_seconds(proc.pid) * CLK_TCK) >= sum(ticks) > ticks[0]  # read last: counters only grow
    finally:
        children = proc_tree(proc.pid)[1:]
        stop_process(proc)
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)


def test_bench_help_lists_scenarios() -> None:
    from click.testing import CliRunner

    from opendps.cli import main

    result = CliRunner().invoke(main, ["bench", "--help"])
    assert result.exit_code == 0
    for name in ("crypto-ceiling", "provision-https", "provision-mqtt", "provision-https-x509", "peer-cfssl",
                 "hub-connect", "hub-idle", "hub-telemetry", "store-scale", "--quick", "--json", "--db"):
        assert name in result.output


def test_bench_quick_peer_cfssl_and_store_scale(tmp_path: Path) -> None:
    import shutil

    from opendps.bench import Result, _relate
    from opendps.bench.peer import SKIPPED, skipped_row
    from opendps.bench.report import print_report

    # without cfssl the scenario is one zero row with a note: no ratio from it, and the table still prints
    fake = Result(scenario="provision-https", transport="https", concurrency=None, count=1, ok=1, errors=0,
                  wall_seconds=1.0, throughput=1.0, latency={"p50": 1.0, "p95": 1.0, "p99": 1.0},
                  server_cpu_seconds=0.1, cpu_seconds_per_op=0.1, peak_rss_bytes=1, ops_per_cpu_second=10.0)
    skipped = skipped_row()
    _relate([skipped, fake])
    assert fake.ratios == {} and skipped.extra == {"skipped": SKIPPED}
    from dataclasses import asdict

    # so is the telemetry row routed to NATS when no NATS server answers (it printed a KeyError traceback)
    from opendps.bench._harness import skipped as skipped_for
    no_nats = skipped_for("hub-telemetry", "opendps+nats", "NATS is not reachable", transport="mqtt", concurrency=100)
    print_report({"settings": {"database": "sqlite", "lint": True}, "machine": {"cpus": 1},
                  "results": [asdict(skipped), asdict(fake), asdict(no_nats)]})

    if shutil.which("cfssl") is None:
        pytest.skip("cfssl is not installed (apt-get install golang-cfssl); peer-cfssl would only report 'skipped'")
    proc = subprocess.run([sys.executable, "-m", "opendps", "bench", "--quick", "--scenario", "peer-cfssl",
                           "--scenario", "store-scale", "-o", "json"], capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["results"]
    cfssl = [r for r in rows if r["scenario"] == "peer-cfssl"]
    assert [(r["system"], r["transport"], r["concurrency"]) for r in cfssl] == [("cfssl", "https", 32)]
    store = [r for r in rows if r["scenario"] == "store-scale"]
    assert [(r["extra"]["existing"], r["extra"]["registration"]) for r in store] == [
        (1000, "new"), (1000, "re-register"), (3000, "new"), (3000, "re-register")]
    for r in rows:
        for name, kind in FIELDS.items():
            assert isinstance(r[name], kind), (r["scenario"], name, r[name])
        assert r["errors"] == 0 and r["ok"] == r["count"] > 0 and r["error_samples"] == [], r
        assert r["server_cpu_seconds"] > 0 and r["ops_per_cpu_second"] > 0
    assert cfssl[0]["extra"]["csr"] == "P-384" and cfssl[0]["ratios"] == {}  # ratios go on provisioning rows
    for r in store:
        assert r["extra"]["seed_seconds"] >= 0 and r["system"] == "opendps"
    small, large = store[:2], store[2:]
    for lo, hi in zip(small, large, strict=True):
        assert lo["ratios"] == {}
        # the ratio is what the two rows say, not a constant
        assert hi["ratios"]["1k"] == round(hi["ops_per_cpu_second"] / lo["ops_per_cpu_second"], 4)
        assert hi["extra"]["p50_ratio"] == round(hi["latency"]["p50"] / lo["latency"]["p50"], 4)


@pytest.mark.timeout(170, func_only=True)
def test_bench_quick_hub_scenarios_against_mosquitto() -> None:
    import shutil

    from opendps.bench._harness import CLK_TCK

    mosquitto = shutil.which("mosquitto") is not None or Path("/usr/sbin/mosquitto").exists()
    proc = subprocess.run([sys.executable, "-m", "opendps", "bench", "--quick", "--scenario", "hub-connect",
                           "--scenario", "hub-idle", "--scenario", "hub-telemetry", "--count", "40", "--rounds", "2",
                           "-o", "json"], capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["results"]
    systems = ["opendps", "mosquitto"] if mosquitto else ["opendps"]
    # telemetry is measured twice on opendps: the store sink alone, then with a durable NATS JetStream route
    assert [(r["scenario"], r["system"]) for r in rows] == [
        (name, system) for name in ("hub-connect", "hub-idle", "hub-telemetry")
        for system in (systems[:1] + ["opendps+nats"] + systems[1:] if name == "hub-telemetry" else systems)]
    routed = next(r for r in rows if r["system"] == "opendps+nats")
    if routed["extra"].get("skipped"):
        service_missing(f"the NATS-route telemetry row was skipped: {routed['extra']['skipped']}")
    for r in rows:
        for name, kind in FIELDS.items():
            assert isinstance(r[name], kind), (r["scenario"], r["system"], name, r[name])
        assert r["transport"] == "mqtt"
        # connects and telemetry: two rounds of 40 per system, taking turns (the NATS-route row: one load after them)
        turns = 2 if r["scenario"] != "hub-idle" and r["system"] != "opendps+nats" else 1
        assert r["errors"] == 0 and r["ok"] == r["count"] == 40 * turns and r["error_samples"] == [], r
        # a load that cost the server less than one clock tick (40 QoS 1 messages) is flagged instead of measured
        measured = not r["extra"].get("cpu_below_resolution")
        assert measured == (r["server_cpu_seconds"] * CLK_TCK >= 1), r
        assert r["throughput"] > 0 and (not measured or (r["cpu_seconds_per_op"] > 0 and r["ops_per_cpu_second"] > 0))
        assert 0 < r["latency"]["p50"] <= r["latency"]["p95"] <= r["latency"]["p99"]
        assert r["ceiling_ratio"] is None  # no crypto-ceiling in this run
    by = {(r["scenario"], r["system"]): r for r in rows}
    assert not by["hub-connect", "opendps"]["extra"].get("cpu_below_resolution")  # 40 mTLS handshakes always register
    idle = by["hub-idle", "opendps"]
    assert idle["extra"]["devices"] == 40 and idle["extra"]["bytes_per_connection"] > 0
    assert idle["extra"]["rss_after"] > idle["extra"]["rss_before"] > 0
    assert by["hub-telemetry", "opendps"]["extra"]["devices"] == 40  # --count 40: 40 devices × 1 message
    if not mosquitto:
        assert all(r["ratios"] == {} and "mosquitto" in r["extra"] for r in rows)
        return
    for name, system in (("hub-connect", "opendps"), ("hub-telemetry", "opendps"), ("hub-telemetry", "opendps+nats")):
        ours, peer = by[name, system], by[name, "mosquitto"]
        assert peer["ratios"] == {} and peer["extra"]["version"]
        if any(r["extra"].get("cpu_below_resolution") for r in (ours, peer)):
            assert "mosquitto" not in ours["ratios"]  # no ratio from an unmeasured figure
            continue
        # the ratio is what the two rows say, not a constant
        assert ours["ratios"]["mosquitto"] == round(ours["ops_per_cpu_second"] / peer["ops_per_cpu_second"], 4)
        if system == "opendps":  # each round's ratio, from that round's loads alone
            assert len(ours["extra"]["round_ratios"]) == len(ours["extra"]["round_ops_per_cpu_second"]) == 2
            assert len(peer["extra"]["round_ops_per_cpu_second"]) == 2
    peer = by["hub-idle", "mosquitto"]
    assert peer["extra"]["bytes_per_connection"] > 0
    # memory is inverted so that below 1 still means opendps is worse
    assert idle["ratios"]["mosquitto"] == round(peer["extra"]["bytes_per_connection"]
                                                / idle["extra"]["bytes_per_connection"], 4)


def test_bench_hub_connect_at_scale_compares_a_small_and_a_large_store() -> None:
    """Issue 14: the same CONNECT load against a store with 2k more devices and 200 more enrollments (quick; the full
    run compares 100k and 10k)."""
    proc = subprocess.run([sys.executable, "-m", "opendps", "bench", "--quick", "--scenario", "hub-connect-scale",
                           "--count", "20", "-o", "json"], capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr
    small, large = json.loads(proc.stdout)["results"]
    assert small["scenario"] == large["scenario"] == "hub-connect-scale"
    assert small["ok"] == large["ok"] == 20 and small["errors"] == large["errors"] == 0
    warm = bench_hub.WARM_UP
    assert small["extra"]["devices"] == 20 + warm and small["extra"]["enrollments"] == 1
    assert large["extra"]["devices"] == 20 + warm + 2_000 and large["extra"]["enrollments"] == 201
    if small["ops_per_cpu_second"] and large["ops_per_cpu_second"]:
        assert large["ratios"]["small store"] == round(large["ops_per_cpu_second"] / small["ops_per_cpu_second"], 4)


def test_hub_rounds_take_turns_with_their_own_devices_and_pool(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Rounds against opendps and Mosquitto alternate (opendps first, then Mosquitto first, ...), a connect round
    uses its own devices (each CONNECT a device's first) plus the warm-up ones, and each row pools its rounds."""
    import contextlib
    from types import SimpleNamespace

    from opendps.bench import Options

    warm = bench_hub.WARM_UP
    devices = [(f"d{i}", f"d{i}.pem") for i in range(3 * 4 + warm)]
    seeded: list[int] = []

    def seed(env: dict[str, str], count: int, directory: Path, *, lint: bool) -> dict[str, object]:
        seeded.append(count)
        return {"hub_host": "hub", "devices": devices[:count], "ca_chain": b"", "seed_seconds": 0.0}

    @contextlib.contextmanager
    def server(db_url: object, lint: bool, before_start: object, profile: object, workers: int):
        before_start({})  # type: ignore[operator]
        yield SimpleNamespace(mqtt_port=1, pid=11, postgres=False, ca_file=tmp_path / "ca.pem")

    @contextlib.contextmanager
    def mosquitto(binary: str, directory: Path, ca_chain: bytes, srv: object):
        yield SimpleNamespace(pid=22), 2, "2.0.11"

    loads: list[tuple[int, list[str]]] = []
    cpu = iter([0.4, 0.2, 0.1, 0.5, 0.4, 0.2])  # seconds per load, in the order the loads run

    def load(spec: dict[str, object], pid: int) -> dict[str, object]:
        loads.append((spec["port"], [d for d, _ in spec["devices"]]))  # type: ignore[misc,union-attr]
        return {"wall": 1.0, "server_cpu": next(cpu), "latencies": [0.01] * 4, "errors": []}

    monkeypatch.setattr(bench_hub, "seed", seed)
    monkeypatch.setattr(bench_hub, "running_server", server)
    monkeypatch.setattr(bench_hub, "running_mosquitto", mosquitto)
    monkeypatch.setattr(bench_hub, "_mosquitto_binary", lambda: "/usr/sbin/mosquitto")
    monkeypatch.setattr(bench_hub, "_load", load)
    rows = bench_hub.connects(Options(quick=True, db_url=None, lint=True, count=4, rounds=3))
    assert seeded == [3 * 4 + warm]
    warm_ids = [d for d, _ in devices[12:]]
    own = [[f"d{i}" for i in range(r * 4, r * 4 + 4)] for r in range(3)]
    assert loads == [(1, own[0] + warm_ids), (2, own[0] + warm_ids), (2, own[1] + warm_ids), (1, own[1] + warm_ids),
                     (1, own[2] + warm_ids), (2, own[2] + warm_ids)]
    ours, peer = rows
    assert (ours.system, peer.system) == ("opendps", "mosquitto")
    assert ours.count == ours.ok == peer.count == peer.ok == 12
    assert ours.server_cpu_seconds == 1.3 and peer.server_cpu_seconds == 0.5  # 0.4 + 0.5 + 0.4; 0.2 + 0.1 + 0.2
    assert ours.extra["round_ops_per_cpu_second"] == [10.0, 8.0, 10.0]
    assert peer.extra["round_ops_per_cpu_second"] == [20.0, 40.0, 20.0]
    assert ours.extra["round_ratios"] == [0.5, 0.2, 0.5]
    assert ours.ratios["mosquitto"] == round(ours.ops_per_cpu_second / peer.ops_per_cpu_second, 4)
