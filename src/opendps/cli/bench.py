"""``opendps bench``: reproducible throughput, latency and server-cost numbers (issue 7).

Why it is built this way:

* every scenario gets a fresh ``opendps serve`` subprocess (free ports, temporary data directory, a new
  PostgreSQL schema with ``--db``), so one scenario's data never slows the next and the server's CPU
  time can be read from its own ``/proc/<pid>/stat`` (utime + stime) and its peak RSS from ``VmHWM``;
* enrollments, derived device keys and P-384 CSRs are prepared before the clock starts, so the numbers
  are the server's work, not the benchmark's set-up;
* the devices run in a separate load-generator process (one asyncio loop driving the device SDK),
  started and warmed up before the server's CPU counters are read; each device opens its own TLS
  connection, as a real fleet does;
* the server answers ``202`` with ``Retry-After: 2`` and the SDK honours it, so per-device latency
  includes that wait. Server CPU per registration does not depend on it and is the number to compare.

Scenarios are named entries of :data:`SCENARIOS`; a new one is a function returning result rows.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import multiprocessing
import os
import platform
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from opendps.cli import CliError

NAMESPACE, POLICY, GROUP = "bench", "bench-policy", "bench-fleet"
CLK_TCK = os.sysconf("SC_CLK_TCK")
QUICK_LEVELS, FULL_LEVELS = (8, 32), (1, 8, 32, 128)
QUICK_COUNT, FULL_COUNT = 100, 1000
QUICK_CRYPTO, FULL_CRYPTO = 200, 2000


# ---------------------------------------------------------------- results


@dataclass
class Result:
    """One row of the report: a scenario at one concurrency level (None where a metric does not apply)."""

    scenario: str
    transport: str | None
    concurrency: int | None
    count: int
    ok: int
    errors: int
    wall_seconds: float
    throughput: float  # operations per wall-clock second
    latency: dict[str, float]  # p50/p95/p99 seconds per operation
    server_cpu_seconds: float | None
    cpu_seconds_per_op: float  # server CPU per registration (in-process CPU for the crypto ceiling)
    peak_rss_bytes: int | None  # the server's VmHWM (the bench process's for in-process scenarios)
    ops_per_cpu_second: float
    ceiling_ratio: float | None = None  # ops_per_cpu_second / the crypto ceiling's
    error_samples: list[dict[str, Any]] = field(default_factory=list)


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (an observed value); 0 for no values so the JSON keeps its types."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def latency_summary(values: list[float]) -> dict[str, float]:
    return {name: round(percentile(values, q), 4) for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))}


# ---------------------------------------------------------------- the server under test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (fields 14 and 15 of /proc/<pid>/stat; the name may contain spaces)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_peak_rss(pid: int) -> int:
    """VmHWM (peak resident set) of ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def fresh_database(db_url: str | None, directory: Path) -> Iterator[str]:
    """SQLite in ``directory``, or a new schema in the given PostgreSQL database (dropped afterwards)."""
    if not db_url:
        yield f"sqlite+pysqlite:///{directory / 'opendps.db'}"
        return
    import psycopg

    admin = psycopg.connect(db_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True, connect_timeout=5)
    schema = f"bench_{secrets.token_hex(6)}"
    admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{db_url}{'&' if '?' in db_url else '?'}options=-csearch_path%3D{schema}"
    finally:
        admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        admin.close()


@dataclass
class Server:
    """A running ``opendps serve`` and what devices and the bench need to reach it."""

    proc: subprocess.Popen
    https_port: int
    mqtt_port: int
    id_scope: str
    ca_file: Path
    url: str
    owner_connection_string: str

    @property
    def pid(self) -> int:
        return self.proc.pid


@contextlib.contextmanager
def running_server(db_url: str | None, lint: bool) -> Iterator[Server]:
    """Start ``opendps serve`` on free ports with a throw-away data directory; stop and remove it on exit."""
    work = Path(tempfile.mkdtemp(prefix="opendps-bench-"))
    try:
        with fresh_database(db_url, work) as url:
            env = {k: v for k, v in os.environ.items() if not k.startswith("OPENDPS_")}
            env.update(OPENDPS_DATA_DIR=str(work / "data"), OPENDPS_DB=url)
            https_port, mqtt_port = free_port(), free_port()
            args = [sys.executable, "-m", "opendps", "serve", "--host", "127.0.0.1", "--https-port", str(https_port),
                    "--mqtt-port", str(mqtt_port), *([] if lint else ["--no-lint"])]
            with open(work / "server.log", "wb") as log:
                proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                _wait_listening(proc, (https_port, mqtt_port), work / "server.log")
                info = subprocess.run([sys.executable, "-m", "opendps", "info", "-o", "json"], env=env,
                                      capture_output=True, text=True, check=False)
                if info.returncode != 0:
                    raise CliError(f"opendps info failed: {info.stderr.strip()}")
                data = json.loads(info.stdout)
                yield Server(proc, https_port, mqtt_port, data["idScope"], Path(data["serverCaCertificate"]),
                             data["endpoints"]["https"]["url"], data["connectionStrings"]["provisioningServiceOwner"])
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _wait_listening(proc: subprocess.Popen, ports: tuple[int, ...], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(ports)
    while waiting:
        if proc.poll() is not None:
            raise CliError(f"opendps serve exited {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        if time.monotonic() > deadline:
            raise CliError(f"opendps serve did not listen on {waiting} within {timeout:g} s")
        try:
            with socket.create_connection(("127.0.0.1", waiting[0]), timeout=0.5):
                waiting.pop(0)
        except OSError:
            time.sleep(0.1)


def create_fleet_group(server: Server) -> str:
    """Namespace + credential policy and a symmetric-key enrollment group; returns the group key."""
    import httpx

    from opendps.transport import sas

    conn = sas.parse_connection_string(server.owner_connection_string)
    token = sas.generate(conn["HostName"], conn["SharedAccessKey"], key_name=conn["SharedAccessKeyName"])
    group_key = base64.b64encode(secrets.token_bytes(64)).decode()
    with httpx.Client(base_url=server.url, verify=ssl.create_default_context(cafile=server.ca_file),
                      headers={"Authorization": token}, timeout=60) as c:
        for path, doc in ((f"/namespaces/{NAMESPACE}", {"properties": {"policyName": POLICY}}),
                          (f"/enrollmentGroups/{GROUP}", {
                              "attestation": {"type": "symmetricKey",
                                              "symmetricKey": {"primaryKey": group_key, "secondaryKey": group_key}},
                              "credentialPolicyName": POLICY})):
            r = c.put(path, json=doc)
            if r.status_code not in (200, 201):
                raise CliError(f"set-up PUT {path} failed: {r.status_code} {r.text[:300]}")
    return group_key


# ---------------------------------------------------------------- the load generator (its own process)


def prepare_devices(group_key: str, prefix: str, count: int) -> list[tuple[str, str, str]]:
    """(registration id, derived device key, P-384 CSR) for each device, made before any timing."""
    from opendps.device.keys import derive_device_key, new_key_and_csr

    devices = []
    for i in range(count):
        rid = f"{prefix}-{i}"
        devices.append((rid, derive_device_key(group_key, rid), new_key_and_csr(rid, "P-384")[1]))
    return devices


def _load_worker(conn: Any, spec: dict[str, Any]) -> None:
    """Entry of the load-generator process: import and build everything, report ready, run on "go"."""
    from opendps.device.mqtt import client_ssl_context
    from opendps.device.provisioning import ProvisioningClient

    context = client_ssl_context(spec["ca_file"])  # shared context, no session reuse: a full handshake per device
    clients = [(ProvisioningClient("localhost", spec["id_scope"], rid, symmetric_key=key, ssl_context=context,
                                   https_port=spec["https_port"], mqtt_port=spec["mqtt_port"], transport=spec["transport"],
                                   max_retries=3, timeout=60), csr) for rid, key, csr in spec["devices"]]

    async def run() -> dict[str, Any]:
        slots = asyncio.Semaphore(spec["concurrency"])
        loop = asyncio.get_running_loop()

        async def one(client: ProvisioningClient, csr: str) -> tuple[float | None, str | None]:
            async with slots:
                started = loop.time()
                try:
                    result = await client.register(csr)
                    if not result.issued_chain:
                        return None, "assigned without an issued certificate"
                    return loop.time() - started, None
                except Exception as exc:  # noqa: BLE001 - one device's failure is counted, not fatal
                    return None, f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}".replace(
                        client.registration_id, "<id>")

        begin = time.perf_counter()
        outcomes = await asyncio.gather(*(one(c, csr) for c, csr in clients))
        return {"wall": time.perf_counter() - begin, "latencies": [t for t, _ in outcomes if t is not None],
                "errors": [e for _, e in outcomes if e is not None]}

    conn.send("ready")
    if conn.recv() == "go":
        conn.send(asyncio.run(run()))
    conn.close()


def drive(server: Server, spec: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """Run one load in a fresh process; returns its outcome and the server CPU seconds spent during it."""
    ctx = multiprocessing.get_context("spawn")  # no inherited state, no fork of the bench's threads
    parent, child = ctx.Pipe()
    worker = ctx.Process(target=_load_worker, args=(child, spec), daemon=True)
    worker.start()
    try:
        if not parent.poll(120) or parent.recv() != "ready":
            raise CliError("the load generator did not start")
        cpu_before = proc_cpu_seconds(server.pid)
        parent.send("go")
        outcome = parent.recv()
        cpu = proc_cpu_seconds(server.pid) - cpu_before
    finally:
        worker.join(30)
        if worker.is_alive():
            worker.kill()
    return outcome, cpu


# ---------------------------------------------------------------- scenarios


@dataclass
class Options:
    quick: bool
    db_url: str | None
    lint: bool
    count: int | None = None
    levels: tuple[int, ...] | None = None

    @property
    def device_count(self) -> int:
        return self.count or (QUICK_COUNT if self.quick else FULL_COUNT)

    @property
    def concurrency_levels(self) -> tuple[int, ...]:
        return self.levels or (QUICK_LEVELS if self.quick else FULL_LEVELS)


def provisioning(transport: str) -> Callable[[Options], list[Result]]:
    """Symmetric-key (group-derived) registration with a P-384 CSR, one row per concurrency level."""

    def scenario(opts: Options) -> list[Result]:
        rows = []
        with running_server(opts.db_url, opts.lint) as server:
            group_key = create_fleet_group(server)
            for level in opts.concurrency_levels:
                devices = prepare_devices(group_key, f"{transport}-c{level}", opts.device_count)
                spec = {"ca_file": str(server.ca_file), "id_scope": server.id_scope, "https_port": server.https_port,
                        "mqtt_port": server.mqtt_port, "transport": transport, "concurrency": level, "devices": devices}
                outcome, cpu = drive(server, spec)
                ok, wall = len(outcome["latencies"]), outcome["wall"]
                per_op = cpu / ok if ok else 0.0
                rows.append(Result(
                    scenario=f"provision-{transport}", transport=transport, concurrency=level, count=len(devices), ok=ok,
                    errors=len(outcome["errors"]), wall_seconds=round(wall, 3),
                    throughput=round(ok / wall, 3) if wall > 0 else 0.0, latency=latency_summary(outcome["latencies"]),
                    server_cpu_seconds=round(cpu, 3), cpu_seconds_per_op=round(per_op, 5),
                    peak_rss_bytes=proc_peak_rss(server.pid), ops_per_cpu_second=round(1 / per_op, 2) if per_op else 0.0,
                    error_samples=[{"message": m, "count": n} for m, n in Counter(outcome["errors"]).most_common(5)]))
        return rows

    return scenario


def crypto_ceiling(opts: Options) -> list[Result]:
    """What ``cryptography`` alone does per CPU second: parse + verify a P-384 CSR, issue a P-384 leaf.

    The same library the server signs with, so the ratio of opendps' registrations per server CPU second
    to this says how much of the server's cost is the unavoidable cryptography.
    """
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from opendps.device.keys import new_key_and_csr

    n = opts.count or (QUICK_CRYPTO if opts.quick else FULL_CRYPTO)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench issuing CA")])
    ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    csrs = [base64.b64decode(new_key_and_csr(f"crypto-{i}", "P-384")[1]) for i in range(n)]
    latencies = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for der in csrs:
        started = time.perf_counter()
        csr = x509.load_der_x509_csr(der)
        if not csr.is_signature_valid:
            raise CliError("a freshly made CSR does not verify")
        now = dt.datetime.now(dt.UTC)
        (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(ca_name).public_key(csr.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + dt.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
         .sign(ca_key, hashes.SHA384()))
        latencies.append(time.perf_counter() - started)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    per_op = cpu / n
    return [Result(scenario="crypto-ceiling", transport=None, concurrency=1, count=n, ok=n, errors=0,
                   wall_seconds=round(wall, 3), throughput=round(n / wall, 2), latency=latency_summary(latencies),
                   server_cpu_seconds=None, cpu_seconds_per_op=round(per_op, 6), peak_rss_bytes=proc_peak_rss(os.getpid()),
                   ops_per_cpu_second=round(1 / per_op, 1) if per_op else 0.0)]


SCENARIOS: dict[str, Callable[[Options], list[Result]]] = {
    "crypto-ceiling": crypto_ceiling,
    "provision-https": provisioning("https"),
    "provision-mqtt": provisioning("mqtt"),
}


def run_bench(names: list[str], opts: Options, log: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Run the named scenarios in order; the report JSON (rows plus machine and settings)."""
    rows: list[Result] = []
    for name in names:
        log(f"running {name} ...")
        rows.extend(SCENARIOS[name](opts))
    ceiling = next((r.ops_per_cpu_second for r in rows if r.scenario == "crypto-ceiling"), None)
    for r in rows:
        if ceiling and r.scenario != "crypto-ceiling" and r.ops_per_cpu_second:
            r.ceiling_ratio = round(r.ops_per_cpu_second / ceiling, 4)
    from importlib.metadata import version

    return {
        "opendps": version("opendps"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "settings": {"quick": opts.quick, "database": "postgresql" if opts.db_url else "sqlite", "lint": opts.lint,
                     "count": opts.device_count, "concurrency": list(opts.concurrency_levels)},
        "results": [asdict(r) for r in rows],
    }


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    s = report["settings"]
    table = Table(title=f"opendps bench ({s['database']}, lint {'on' if s['lint'] else 'off'}, "
                        f"{report['machine']['cpus']} CPUs)", title_justify="left")
    for col in ("scenario", "conc.", "ok/n", "errors", "ops/s", "p50 ms", "p95 ms", "p99 ms", "CPU ms/op",
                "ops/CPU-s", "vs ceiling", "peak RSS MB"):
        table.add_column(col, justify="left" if col == "scenario" else "right")
    for r in report["results"]:
        lat = r["latency"]
        table.add_row(r["scenario"], str(r["concurrency"] or "-"), f"{r['ok']}/{r['count']}", str(r["errors"]),
                      f"{r['throughput']:.1f}", *(f"{lat[q] * 1000:.0f}" if lat[q] >= 0.01 else f"{lat[q] * 1000:.2f}"
                                                  for q in ("p50", "p95", "p99")),
                      f"{r['cpu_seconds_per_op'] * 1000:.2f}", f"{r['ops_per_cpu_second']:.0f}",
                      "-" if r["ceiling_ratio"] is None else f"{r['ceiling_ratio']:.0%}",
                      "-" if r["peak_rss_bytes"] is None else f"{r['peak_rss_bytes'] / 2**20:.0f}")
    console = Console(width=160)
    console.print(table)
    console.print("Provisioning latency includes the server's Retry-After: 2 s poll wait, honoured by the SDK; "
                  "CPU ms/op is the server process's own CPU per registration and does not depend on it. "
                  "crypto-ceiling is in-process (cryptography: CSR parse+verify + P-384 leaf issue).", highlight=False)
    for r in report["results"]:
        for e in r["error_samples"]:
            console.print(f"[red]{r['scenario']} c={r['concurrency']}: {e['count']} ×[/red] {e['message']}", highlight=False)


@click.command("bench")
@click.option("--quick", is_flag=True, default=False, help="Small counts and two concurrency levels (under 3 minutes).")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write the report as JSON to this file.")
@click.option("--db", "db_url", default=None, help="PostgreSQL URL (postgresql+psycopg://...); each scenario gets a "
              "fresh schema in it (default: SQLite in a temporary directory).")
@click.option("--scenario", "scenarios", multiple=True, type=click.Choice(list(SCENARIOS)),
              help="Run only this scenario (repeatable; default all).")
@click.option("--count", type=click.IntRange(1, 1_000_000), default=None,
              help="Operations per concurrency level (overrides --quick / full defaults).")
@click.option("--concurrency", "levels", multiple=True, type=click.IntRange(1, 10_000),
              help="Concurrency level (repeatable; overrides the defaults).")
@click.option("--no-lint", is_flag=True, default=False, help="Start the servers with --no-lint (pre-issuance checks off).")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def bench(quick: bool, json_path: Path | None, db_url: str | None, scenarios: tuple[str, ...], count: int | None,
          levels: tuple[int, ...], no_lint: bool, output: str) -> None:
    """Benchmark provisioning against fresh local servers; exit 1 if any operation failed."""
    if not Path("/proc/self/stat").exists():
        raise CliError("opendps bench reads server CPU from /proc and needs Linux")
    opts = Options(quick=quick, db_url=db_url, lint=not no_lint, count=count, levels=levels or None)
    report = run_bench(list(scenarios) or list(SCENARIOS), opts, log=lambda m: click.echo(m, err=True))
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    if output == "json":
        click.echo(json.dumps(report, indent=2))
    else:
        print_report(report)
    failed = sum(r["errors"] for r in report["results"])
    if failed:
        raise CliError(f"{failed} operations failed (see error samples)")


def register(main: click.Group) -> None:
    """Attach ``opendps bench``."""
    main.add_command(bench)
