"""What every scenario shares: result rows, percentiles, the server under test, the ready/go load runner.

Why it is built this way:

* every scenario gets a fresh ``opendps serve --workers N`` subprocess (free ports, temporary data directory,
  a new PostgreSQL schema with ``--db``), so one scenario's data never slows the next and the server's CPU
  time can be read from ``/proc/<pid>/stat`` (utime + stime) and its peak RSS from ``VmHWM``: of the one
  process, or with ``--workers`` > 1 of the supervisor and every process below it (the workers and
  multiprocessing's resource tracker), summed;
* set-up (enrollments, keys, certificates, CSRs) happens before the clock starts;
* the load runs in a separate spawned process that builds everything, says "ready", and starts on "go";
  the server's CPU counters are read around the load only.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
QUICK_LEVELS, FULL_LEVELS = (32,), (1, 8, 32, 128)
QUICK_COUNT, FULL_COUNT = 64, 1000
QUICK_ROUNDS, FULL_ROUNDS = 3, 5


class BenchError(Exception):
    """A scenario could not run (set-up failed, a peer would not start); the message says why."""


@dataclass
class Result:
    """One row of the report: a system under one scenario at one load (None where a metric does not apply).

    ``system`` is what was measured: ``opendps``, or a peer (``cryptography`` for the in-process ceiling,
    ``cfssl``, ``mosquitto``). ``ratios`` holds opendps ÷ peer figures (computed by the scenario or by
    :func:`opendps.bench.run_bench`); ``extra`` holds scenario-specific figures (bytes per connection, ...).
    """

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
    cpu_seconds_per_op: float  # server CPU per operation (in-process CPU for the crypto ceiling)
    peak_rss_bytes: int | None  # the server's VmHWM, summed over its processes (the bench's for in-process scenarios)
    ops_per_cpu_second: float
    system: str = "opendps"
    workers: int | None = None  # ``opendps serve --workers`` of an opendps row (None: a peer or in-process)
    processes: int | None = None  # how many processes the server's CPU and peak RSS are summed over
    ceiling_ratio: float | None = None  # ops_per_cpu_second / the crypto ceiling's
    ratios: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    error_samples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Options:
    quick: bool
    db_url: str | None
    lint: bool
    count: int | None = None
    levels: tuple[int, ...] | None = None
    profile_dir: Path | None = None  # py-spy samples of every opendps server, one collapsed-stack file each
    worker_counts: tuple[int, ...] = (1,)  # ``--workers``: each scenario that starts a server runs once per count
    workers: int = 1  # the count the scenario running now starts its servers with
    #: peer rows (Mosquitto) by label, measured with the first worker count and reused by the next ones
    peer_rows: dict[str, Result] = field(default_factory=dict)
    rounds: int | None = None  # ``--rounds``: loads per system in the scenarios measured against a peer, taking turns

    @property
    def round_count(self) -> int:
        """Rounds per system where opendps and a peer take turns (hub connects and telemetry): ``--rounds``, else
        3 quick and 5 full. Why turns: this machine's speed drifts by ±20 % within minutes, and one load of each
        system one after the other put that drift into the ratio; alternated rounds put it into both."""
        return self.rounds or (QUICK_ROUNDS if self.quick else FULL_ROUNDS)

    def profile(self, label: str) -> Path | None:
        if self.profile_dir is None:
            return None
        return self.profile_dir / (f"{label}-w{self.workers}.txt" if len(self.worker_counts) > 1 else f"{label}.txt")

    @property
    def device_count(self) -> int:
        return self.count or (QUICK_COUNT if self.quick else FULL_COUNT)

    @property
    def concurrency_levels(self) -> tuple[int, ...]:
        return self.levels or (QUICK_LEVELS if self.quick else FULL_LEVELS)

    def count_at(self, level: int) -> int:
        """Operations at one concurrency level: ``--count``, or in full runs about 15 per slot (20 to 1000).

        Registration latency is bounded below by the server's Retry-After (2 s), so a closed loop at
        concurrency c completes about c / 2.3 s registrations per second; 15 per slot keeps every level
        near half a minute instead of 40 minutes at c = 1.
        """
        if self.count or self.quick:
            return self.device_count
        return max(20, min(FULL_COUNT, level * 15))


def warm_up_count(single: int, workers: int) -> int:
    """Unrecorded warm-up operations for a server of ``workers`` processes: ``single`` for one process (as before
    ``--workers``), else at least 8 per worker. The kernel spreads connections over the workers by address hash,
    and a worker's first operations pay its first-use imports (pkilint) and caches; with 8 per worker the chance
    that one gets none before the clock starts is below 0.2 % (N ≤ 8) instead of 25 % (2 on 2 workers)."""
    return single if workers <= 1 else max(single, 8) * workers


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (an observed value); 0 for no values so the JSON keeps its types."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def latency_summary(values: list[float]) -> dict[str, float]:
    return {name: round(percentile(values, q), 4) for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))}


def skipped(scenario: str, system: str, reason: str, *, transport: str | None = None,
            concurrency: int | None = None) -> Result:
    """A zero row that says why a system was not measured: no ops, so no ratio is taken from it, and the report
    shows the reason (with the same fields as a measured row, so every output format prints it)."""
    return Result(scenario=scenario, transport=transport, concurrency=concurrency, count=0, ok=0, errors=0,
                  wall_seconds=0.0, throughput=0.0, latency=latency_summary([]), server_cpu_seconds=None,
                  cpu_seconds_per_op=0.0, peak_rss_bytes=None, ops_per_cpu_second=0.0, system=system,
                  extra={"skipped": reason})


def error_samples(errors: list[str]) -> list[dict[str, Any]]:
    from collections import Counter

    return [{"message": m, "count": n} for m, n in Counter(errors).most_common(5)]


def load_row(scenario: str, transport: str | None, concurrency: int | None, count: int, outcome: dict[str, Any],
             cpu: float, pid: int, system: str = "opendps", **extra: Any) -> Result:
    """A row from a load outcome (``{"wall", "latencies", "errors"}``) and the server CPU spent during it.

    CPU comes from /proc in clock ticks (10 ms): a load that cost the server less than one tick reads as 0 and is
    marked ``extra["cpu_below_resolution"]`` (its per-op figures are 0, not a measurement; use a larger --count).
    Peak RSS is the sum of the VmHWM of ``pid`` and every process below it (:func:`tree_peak_rss`).
    """
    peak, processes = tree_peak_rss(pid)
    ok, wall = len(outcome["latencies"]), outcome["wall"]
    if round(cpu * CLK_TCK) < 1:  # a difference of two tick counts read as floats: 0.53 - 0.52 may be 0.0099...
        extra = {**extra, "cpu_below_resolution": True}
    per_op = cpu / ok if ok else 0.0
    return Result(scenario=scenario, transport=transport, concurrency=concurrency, count=count, ok=ok,
                  errors=len(outcome["errors"]), wall_seconds=round(wall, 3),
                  throughput=round(ok / wall, 3) if wall > 0 else 0.0, latency=latency_summary(outcome["latencies"]),
                  server_cpu_seconds=round(cpu, 3), cpu_seconds_per_op=round(per_op, 6),
                  peak_rss_bytes=peak, ops_per_cpu_second=round(1 / per_op, 2) if per_op else 0.0,
                  system=system, processes=processes, extra=extra, error_samples=error_samples(outcome["errors"]))


# ---------------------------------------------------------------- processes


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports, all bound at once while chosen: asked one by one, the kernel may hand out one
    just released again (a full run failed when a server's MQTT and HTTP ports came out the same)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (fields 14 and 15 of /proc/<pid>/stat; the name may contain spaces)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (of any of its threads), from ``/proc/<pid>/task/*/children``.

    Kernels without that file (no CONFIG_PROC_CHILDREN): the processes whose parent (stat field 4) is ``pid``.
    """
    children: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return []
    found_file = False
    for task in tasks:
        try:
            children.extend(int(c) for c in (task / "children").read_text().split())
            found_file = True
        except (OSError, ValueError):
            continue
    if found_file or not tasks:
        return sorted(set(children))
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2:].split()[1]) == pid:
            children.append(int(stat.parent.name))
    return sorted(children)


def proc_tree(pid: int) -> list[int]:
    """``pid`` and every live process below it: ``opendps serve --workers N`` is a supervisor whose children are
    the N workers (and multiprocessing's resource tracker); one worker is one process and the list is ``[pid]``."""
    tree, queue = [pid], [pid]
    while queue:
        for child in proc_children(queue.pop(0)):
            if child not in tree:
                tree.append(child)
                queue.append(child)
    return tree


def tree_cpu_seconds(pid: int) -> float:
    """The CPU of ``pid`` and every process below it: each live one's utime + stime + cutime + cstime.

    cutime/cstime (fields 16, 17) hold the CPU of children that exited and were reaped (a worker the supervisor
    restarted), so the sum keeps growing as a process tree's total should; a live child's CPU is not in its
    parent's cutime, so nothing is counted twice. A process that exits between two reads is skipped.
    """
    total = 0
    for p in proc_tree(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += sum(int(f) for f in fields[11:15])
    return total / CLK_TCK


def postgres_cpu_seconds() -> float:
    """CPU of every ``postgres`` process on this machine (backends, checkpointer, WAL writer).

    With ``--db`` the queries run there, not in the server process; a benchmark runs alone, so the delta
    over a load is that load's database cost.
    """
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if text[text.index("(") + 1:text.rindex(")")] == "postgres":
            fields = text[text.rindex(")") + 2:].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def proc_peak_rss(pid: int) -> int:
    """VmHWM (peak resident set) of ``pid`` in bytes."""
    return _status_kib(pid, "VmHWM:") * 1024


def proc_rss(pid: int) -> int:
    """VmRSS (current resident set) of ``pid`` in bytes."""
    return _status_kib(pid, "VmRSS:") * 1024


def tree_peak_rss(pid: int) -> tuple[int, int]:
    """The sum of VmHWM over ``pid`` and every process below it, and how many processes that is.

    A sum of each process's own peak: an upper bound of the tree's peak at any one moment (the processes need
    not peak together), and shared pages (the interpreter, libraries) are counted once per process.
    """
    total = count = 0
    for p in proc_tree(pid):
        try:
            total += proc_peak_rss(p)
        except OSError:
            continue
        count += 1
    return total, count


def tree_rss(pid: int) -> int:
    """The sum of VmRSS over ``pid`` and every process below it."""
    total = 0
    for p in proc_tree(pid):
        with contextlib.suppress(OSError):
            total += proc_rss(p)
    return total


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def wait_listening(proc: subprocess.Popen, ports: tuple[int, ...], log: Path, timeout: float = 120,
                   banner: str | None = None) -> None:
    """Until every port accepts a TCP connection and, given ``banner``, the log holds it; a clear error if the
    process exits or time runs out.

    ``opendps serve --workers N`` prints its banner ("opendps listening on") only after all N workers said they
    listen, while a port accepts as soon as the first one does: the banner is what says the whole server is up.
    """
    deadline = time.monotonic() + timeout
    waiting = list(ports)
    announced = banner is None
    while waiting or not announced:
        if proc.poll() is not None:
            raise BenchError(f"{Path(str(proc.args[0])).name} exited {proc.returncode}: "
                             f"{log.read_text(errors='replace')[-2000:]}")
        if time.monotonic() > deadline:
            raise BenchError(f"nothing listened on {waiting} within {timeout:g} s" if waiting else
                             f"{banner!r} was not logged within {timeout:g} s: {log.read_text(errors='replace')[-2000:]}")
        if waiting:
            try:
                with socket.create_connection(("127.0.0.1", waiting[0]), timeout=0.5):
                    waiting.pop(0)
                continue
            except OSError:
                pass
        elif banner is not None and banner in log.read_text(errors="replace"):
            announced = True
            continue
        time.sleep(0.1)


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- the server under test


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
    env: dict[str, str]  # OPENDPS_DATA_DIR / OPENDPS_DB for ``opendps`` commands against the same instance
    workdir: Path
    postgres: bool = False
    workers: int = 1
    worker_pids: list[int] = field(default_factory=list)  # as ``opendps info`` listed the nodes at the start

    @property
    def pid(self) -> int:
        """The ``opendps serve`` process: the server, or with several workers their supervisor."""
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """The CPU of the server's processes (supervisor + workers, :func:`tree_cpu_seconds`), plus PostgreSQL's
        when the store is there (SQLite's work is in-process already)."""
        return tree_cpu_seconds(self.pid) + (postgres_cpu_seconds() if self.postgres else 0.0)


@contextlib.contextmanager
def running_server(db_url: str | None, lint: bool, before_start: Callable[[dict[str, str]], None] | None = None,
                   profile: Path | None = None, workers: int = 1) -> Iterator[Server]:
    """Start ``opendps serve --workers <workers>`` on free ports with a throw-away data directory; stop and remove
    it on exit.

    ``--workers`` is always given (also 1): the server's own default is one worker per core on PostgreSQL.
    ``before_start(env)`` runs after ``opendps init`` (done in this process) and before the server starts (e.g. bulk
    seeding). ``opendps info`` is read in this process too, once the server says it listens.
    ``profile``: sample the server (and its workers) with py-spy for its whole life into this collapsed-stack file.
    """
    work = Path(tempfile.mkdtemp(prefix="opendps-bench-"))
    try:
        with fresh_database(db_url, work) as url, contextlib.ExitStack() as stack:
            env = {k: v for k, v in os.environ.items() if not k.startswith("OPENDPS_")}
            env.update(OPENDPS_DATA_DIR=str(work / "data"), OPENDPS_DB=url)
            https_port, mqtt_port, http_port = free_ports(3)
            ports = ["--host", "127.0.0.1", "--https-port", str(https_port), "--mqtt-port", str(mqtt_port),
                     "--amqp-port", "0", "--http-port", str(http_port), *([] if lint else ["--no-lint"])]
            if before_start is not None:
                _init(env, host="127.0.0.1", https_port=https_port, mqtt_port=mqtt_port, amqp_port=0,
                      http_port=http_port, lint=None if lint else False)
                before_start(env)
            with open(work / "server.log", "wb") as log:
                proc = subprocess.Popen([sys.executable, "-m", "opendps", "serve", *ports, "--workers", str(workers)],
                                        env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_listening(proc, (https_port, mqtt_port), work / "server.log", banner="opendps listening on")
                data = _info(env)
                pids = sorted(n["pid"] for n in data.get("nodes", []))
                expected = sorted(proc_children(proc.pid)) if workers > 1 else [proc.pid]
                if len(pids) != workers or not set(pids) <= set(expected):
                    raise BenchError(f"opendps serve --workers {workers} (pid {proc.pid}) runs nodes {pids}: "
                                     f"{(work / 'server.log').read_text(errors='replace')[-2000:]}")
                stack.enter_context(sampled(proc.pid, profile))
                yield Server(proc, https_port, mqtt_port, data["idScope"], Path(data["serverCaCertificate"]),
                             data["endpoints"]["https"]["url"], data["connectionStrings"]["provisioningServiceOwner"],
                             env, work, postgres=bool(db_url), workers=workers, worker_pids=pids)
            finally:
                stop_process(proc)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _init(env: dict[str, str], **settings: Any) -> None:
    """What ``opendps init <settings>`` does, in this process (as the seeding after it): an interpreter start and the
    imports (~1 s a server) saved. Same code: the settings, then the instance opened with ``create``."""
    from opendps.errors import ConfigurationError
    from opendps.instance import Settings, open_instance

    try:
        open_instance(Settings.load(Path(env["OPENDPS_DATA_DIR"]), db=env["OPENDPS_DB"], **settings)).close()
    except ConfigurationError as exc:
        raise BenchError(f"opendps init failed: {exc}") from exc


def _info(env: dict[str, str]) -> dict[str, Any]:
    """What ``opendps info --show-secrets -o json`` prints, in this process (read-only, as that command: no
    migration): endpoints, ID scope, server CA, owner connection string, the live nodes."""
    from opendps.errors import ConfigurationError
    from opendps.instance import Settings, open_instance

    try:
        inst = open_instance(Settings.load(Path(env["OPENDPS_DATA_DIR"]), db=env["OPENDPS_DB"]), create=False,
                             migrate=False)
    except ConfigurationError as exc:
        raise BenchError(f"opendps info failed: {exc}") from exc
    try:
        return dict(inst.info(secrets=True))  # JSON types already: the command prints it as it is
    finally:
        inst.close()


@contextlib.contextmanager
def sampled(pid: int, output: Path | None) -> Iterator[None]:
    """py-spy (``pip install py-spy``) samples ``pid`` from outside, without pausing it, until the block ends."""
    if output is None:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise BenchError("--profile needs py-spy (pip install py-spy)")
    output.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--subprocesses", "--rate", "250", "--nonblocking",
                             "--format", "raw", "--output", str(output)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.send_signal(2)  # SIGINT: py-spy writes the file and exits
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


#: where a sample's innermost Python frame lives → what the time is spent on (first match wins)
COMPONENTS = (
    (("sqlalchemy/", "sqlite3/", "psycopg/", "opendps/store/"), "store (SQLAlchemy + driver)"),
    (("pkilint/", "pyasn1"), "pre-issuance lint (pkilint)"),
    (("cryptography/", "opendps/pki/csr.py", "opendps/pki/keys.py", "hmac.py", "opendps/transport/sas.py"),
     "cryptography (CSR verify, signing, HMAC)"),
    (("OpenSSL/", "opendps/transport/tls.py", "ssl.py"), "TLS"),
    (("aiohttp/", "multidict/", "yarl/", "json/"), "HTTP + JSON (aiohttp)"),
    (("opendps/transport/mqtt/",), "MQTT"),
    (("asyncio/", "selectors.py", "concurrent/futures/", "threading.py"), "event loop + worker threads"),
    (("opendps/",), "opendps domain code"),
)
#: innermost frames that are waiting, not working: the selector, idle worker threads blocked on their queue
IDLE = ("(selectors.py:", "(threading.py:", "_worker (concurrent/futures/thread.py:")
#: the root frames py-spy --subprocesses adds, which process a stack was sampled in: ``process <pid>:"<command
#: line>"`` (a worker's command line holds a ";", the frame separator, so they are cut off before splitting)
PROCESS_FRAMES = re.compile(r'(?:process \d+:"[^"]*"(?:;|$))+')


def top_costs(collapsed: Path, limit: int = 10) -> dict[str, Any]:
    """What a py-spy raw file says the server was busy with.

    ``components``: share of busy samples by where the innermost Python frame is (time in C and Rust
    extensions counts for the Python function that called them). ``functions``: opendps functions by
    inclusive share (them and everything below). Idle samples (the event loop waiting in ``select``,
    idle worker threads) are left out, so shares are of busy time. py-spy's ``--subprocesses`` puts
    ``process <pid>:"<command line>"`` frames (the supervisor, the worker) at the root of each stack: they are
    dropped, and a sample with nothing else (a thread without Python frames) counts as idle, as it did before.
    """
    components: dict[str, int] = {}
    functions: dict[str, int] = {}
    busy = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        python = stack[m.end():] if (m := PROCESS_FRAMES.match(stack)) else stack
        frames = python.split(";") if python else []
        if not frames or any(x in frames[-1] for x in IDLE):
            continue
        n = int(count)
        busy += n
        leaf = frames[-1]
        kind = next((name for needles, name in COMPONENTS if any(x in leaf for x in needles)), "other Python")
        components[kind] = components.get(kind, 0) + n
        for name in {f.split(":")[0] + ")" for f in frames if "opendps/" in f and "opendps/cli/" not in f
                     and "opendps/server.py" not in f and "opendps/__main__" not in f}:
            functions[name] = functions.get(name, 0) + n
    if not busy:
        return {"busy_samples": 0, "components": {}, "functions": {}}
    return {"busy_samples": busy,
            "components": {k: round(v / busy, 3) for k, v in sorted(components.items(), key=lambda kv: -kv[1])},
            "functions": {k: round(v / busy, 3) for k, v in sorted(functions.items(), key=lambda kv: -kv[1])[:limit]}}


def service_client(server: Server) -> Any:
    """An httpx client for the management API with a fresh owner SAS."""
    import ssl

    import httpx

    from opendps.transport import sas

    conn = sas.parse_connection_string(server.owner_connection_string)
    token = sas.generate(conn["HostName"], conn["SharedAccessKey"], key_name=conn["SharedAccessKeyName"])
    return httpx.Client(base_url=server.url, verify=ssl.create_default_context(cafile=server.ca_file),
                        headers={"Authorization": token}, timeout=60)


def put_all(server: Server, documents: list[tuple[str, dict[str, Any]]]) -> None:
    """PUT each (path, document) to the management API; a clear error on the first refusal."""
    with service_client(server) as c:
        for path, doc in documents:
            r = c.put(path, json=doc)
            if r.status_code not in (200, 201):
                raise BenchError(f"set-up PUT {path} failed: {r.status_code} {r.text[:300]}")


# ---------------------------------------------------------------- the load generator (its own process)


_LOAD_MODULES = ["opendps.bench.hub", "opendps.bench.provisioning", "opendps.bench.peer", "opendps.bench.store_scale"]


def _load_context() -> Any:
    """Load generators fork from multiprocessing's fork server, which imported the load code once: no inherited
    state and no fork of the bench's own threads (as with spawn), without a ~1 s interpreter start and import per
    load run."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_LOAD_MODULES)
    return ctx


def run_load(worker: Callable[[Any, dict[str, Any]], None], spec: dict[str, Any],
             measured: int | Callable[[], float], timeout: float = 3600) -> tuple[Any, float]:
    """Run ``worker(conn, spec)`` in a fresh process with the ready/go handshake.

    The worker builds everything, sends ``"ready"``, waits for ``"go"``, runs, and sends its outcome.
    Returns the outcome and the CPU seconds ``measured`` (a pid, or a reader such as
    :meth:`Server.cpu_seconds`) spent between "go" and the outcome.
    """
    cpu_seconds = measured if callable(measured) else (lambda: proc_cpu_seconds(measured))
    ctx = _load_context()
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=worker, args=(child, spec), daemon=True)
    proc.start()
    try:
        deadline = time.monotonic() + 300
        while not parent.poll(0.05):  # a worker that died (bad spawn, import error) is reported at once
            if not proc.is_alive():
                raise BenchError(f"the load generator exited ({proc.exitcode}) before it was ready")
            if time.monotonic() > deadline:
                raise BenchError("the load generator did not get ready within 300 s")
        if (msg := parent.recv()) != "ready":
            raise BenchError(f"the load generator failed to start: {msg}")
        cpu_before = cpu_seconds()
        parent.send("go")
        if not parent.poll(timeout):
            raise BenchError(f"the load did not finish within {timeout:g} s")
        outcome = parent.recv()
        cpu = cpu_seconds() - cpu_before
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    return outcome, cpu
