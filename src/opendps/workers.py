"""``opendps serve --workers N``: N server processes on the same ports, kept running by this one.

Why processes: domain work (attestation, signing, the store) holds Python's GIL, so one process uses one core.
Each worker is a whole server — every listener, its own event loop, domain thread pool and store connections —
and a node of the cluster (``opendps.cluster``): live hub state reaches a device on whichever worker holds it.

Why SO_REUSEPORT (each worker binds its own listening sockets) and not one socket shared by all: the kernel
spreads new connections evenly over the workers by their address hash, where a shared socket lets the first
worker to wake take a whole burst of connects (asyncio accepts up to its backlog per wake-up) — and hub
connections stay for days. Before starting workers the supervisor binds each port once *without* SO_REUSEPORT
and closes it: a port held by another program, or by another opendps, fails the start with a clear message
instead of being shared. A restarted worker binds afresh; connections queued on a dead worker's socket are
refused and the clients retry.

The supervisor opens the installation first (migrations, the server certificate), so workers only open it. It
restarts a worker that exits unexpectedly (after 1 s, doubling up to 30 s while it keeps dying within 10 s of
its start; one that does not say it listens within the start timeout is killed and restarted the same way), and on
SIGTERM or SIGINT stops them all (SIGTERM, then SIGKILL after 15 s). A restarted worker is told its predecessor's
node id, and removes that node at once (``Cluster.start``): the devices the dead process held are not shown as
connected, nor routed to it, until the node timeout. Once the workers are stopped, further SIGTERM/SIGINT are
ignored: a second one (systemd, an impatient operator) must not kill the exiting supervisor (exit status -15).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from multiprocessing.connection import Connection, wait
from typing import Any

from opendps import logs
from opendps.errors import ConfigurationError
from opendps.frontends import metrics
from opendps.instance import Instance, Settings

log = logging.getLogger("opendps")
START_TIMEOUT = 120.0
STOP_TIMEOUT = 15.0
QUICK_DEATH = 10.0  # a worker that dies this soon after its start is restarted with a growing delay


def default_workers(db_url: str) -> int:
    """One per core on PostgreSQL; one on SQLite (docs/architecture.md, "Process model": SQLite has one writer
    and workers would contend for its lock; ``--workers N`` still runs N on SQLite when asked)."""
    if not db_url.startswith("postgresql"):
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def probe_ports(st: Settings) -> None:
    """Bind each port once without SO_REUSEPORT: an OSError names a port that is taken (or a bad address)."""
    ports = [("HTTPS", st.host, st.https_port), ("MQTT", st.host, st.mqtt_port)] \
        + ([("AMQP", st.host, st.amqp_port)] if st.amqp_port else []) \
        + ([("HTTP", st.host, st.http_port)] if st.http_port else []) \
        + ([("metrics", st.metrics_host, st.metrics_port)] if st.metrics_port else [])
    for name, host, port in ports:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _name, address in infos:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(address)
                except OSError as exc:
                    raise OSError(exc.errno, f"{name} port {port}: {exc.strerror}") from exc


def _worker_main(settings: Settings, index: int, count: int, parent: Connection, replaces: str | None = None) -> None:
    """A worker process: open the installation, serve until SIGTERM or until the supervisor is gone."""
    import asyncio

    from opendps.instance import open_instance
    from opendps.server import limit_malloc_arenas, serve

    limit_malloc_arenas()
    logs.configure(settings.log_format, who=f"worker {index}", worker=index)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the supervisor decides
    try:
        inst = open_instance(settings, create=False, migrate=False, persist=False)
    except Exception as exc:  # noqa: BLE001 - reported to the supervisor as one line
        parent.send(("failed", index, str(exc)))
        sys.exit(1)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        orphaned = asyncio.Event()

        def parent_gone() -> None:
            loop.remove_reader(parent.fileno())
            orphaned.set()

        loop.add_reader(parent.fileno(), parent_gone)  # the pipe ends when the supervisor dies (even by kill -9)

        def ready(node_id: str) -> None:
            with contextlib.suppress(OSError):  # the supervisor died meanwhile: the orphan watch stops us cleanly
                parent.send(("ready", index, os.getpid(), node_id))

        await serve(inst, banner=False, worker=index, workers=count, on_ready=ready, stop_when=orphaned,
                    replaces=replaces)

    try:
        asyncio.run(main())
    except OSError as exc:
        with contextlib.suppress(OSError):
            parent.send(("failed", index, f"cannot listen: {exc.strerror or exc}"))
        sys.exit(1)
    except ConfigurationError as exc:  # e.g. the live bus is not reachable: the operator's to fix, one line
        with contextlib.suppress(OSError):
            parent.send(("failed", index, str(exc)))
        sys.exit(1)
    finally:
        inst.close()


class Supervisor:
    """Starts, watches and stops the workers."""

    def __init__(self, settings: Settings, count: int) -> None:
        self.settings = settings
        self.count = count
        self.context = multiprocessing.get_context("spawn")  # no fork of a process with an engine and threads
        self.procs: dict[int, Any] = {}
        self.pipes: dict[int, Connection] = {}
        self.started: dict[int, float] = {}
        self.deaths: dict[int, int] = {}
        self.nodes: dict[int, str] = {}  # each worker's cluster node id, as it said when ready
        self.failure: dict[int, str] = {}  # why a worker's last start failed, told once while it repeats
        self.stopping: str | None = None
        self.start_timeout = START_TIMEOUT

    def _start(self, index: int) -> None:
        ours, theirs = self.context.Pipe(duplex=False)
        # the node of the slot's last process, which is dead (reaped) by now; kept until a successor is ready
        replaces = self.nodes.get(index)
        proc = self.context.Process(target=_worker_main, args=(self.settings, index, self.count, theirs, replaces),
                                    name=f"opendps-worker-{index}", daemon=False)
        proc.start()
        theirs.close()
        self.procs[index], self.pipes[index], self.started[index] = proc, ours, time.monotonic()

    def _await_ready(self, indexes: list[int]) -> list[int]:
        """Wait until the workers say they listen; their pids. ConfigurationError when one cannot start."""
        pids: dict[int, int] = {}
        deadline = time.monotonic() + self.start_timeout
        while len(pids) < len(indexes):
            pending = [self.pipes[i] for i in indexes if i not in pids]
            if self.stopping or time.monotonic() > deadline:
                raise ConfigurationError("the workers did not start within "
                                         f"{self.start_timeout:g} s" if not self.stopping else "stopped while starting")
            for conn in wait(pending, timeout=0.5):
                try:
                    message = conn.recv()
                except EOFError:
                    index = next(i for i, c in self.pipes.items() if c is conn)
                    raise ConfigurationError(f"worker {index} exited while starting (see the log above)") from None
                if message[0] == "failed":
                    raise ConfigurationError(f"worker {message[1]}: {message[2]}")
                pids[message[1]] = message[2]
                self.nodes[message[1]] = message[3]
        return [pids[i] for i in indexes]

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stopping = signal.Signals(signum).name

    def run(self, instance: Instance, *, banner: bool = True) -> None:
        st = self.settings
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        try:
            for i in range(self.count):
                self._start(i)
            pids = self._await_ready(list(range(self.count)))
        except BaseException:
            self._stop_all()
            raise
        from opendps.server import print_banner, remember_settings

        remember_settings(st)
        if banner:

            print_banner(instance)
            print(f"  workers:            {self.count} (pids {', '.join(map(str, pids))}; supervisor {os.getpid()})",
                  flush=True)
        try:
            self._watch()
        finally:
            if banner:
                print(f"opendps shutting down{f' ({self.stopping})' if self.stopping else ''}", flush=True)
            self._stop_all()
            # stopped: from here to the exit (the interpreter's teardown resets our handlers to the default, and
            # takes ~0.5 s) a second SIGTERM or Ctrl-C would end the process with -15 instead of 0
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)

    def _watch(self) -> None:
        """Restart a worker that exits while we are not stopping."""
        restart_at: dict[int, float] = {}
        while not self.stopping:
            sentinels = {self.procs[i].sentinel: i for i in self.procs if i not in restart_at}
            wait(list(sentinels), timeout=0.5)
            now = time.monotonic()
            for i, proc in list(self.procs.items()):
                if i in restart_at or proc.is_alive() or self.stopping:
                    continue
                self.pipes[i].close()
                quick = now - self.started[i] < QUICK_DEATH or i in self.failure  # never listened: backs off too
                self.deaths[i] = self.deaths.get(i, 0) + 1 if quick else 0
                delay = min(30.0, 2 ** self.deaths[i] / 2) if quick else 0.0
                if i in self.failure:  # it could not start, and said why (once while the reason stays the same)
                    log.debug("worker %d (pid %s) exited with %s; trying again in %g s", i, proc.pid, proc.exitcode,
                              delay)
                else:
                    log.warning("worker %d (pid %s) exited with %s; restarting it in %g s", i, proc.pid,
                                proc.exitcode, delay)
                metrics.worker_exited(proc.pid)  # its live gauges leave the sums; its counters stay
                restart_at[i] = now + delay
            for i, at in list(restart_at.items()):
                if now >= at and not self.stopping:
                    del restart_at[i]
                    self._start(i)
                    try:
                        pid = self._await_ready([i])[0]
                    except ConfigurationError as exc:
                        self._failed_start(i, str(exc))
                    else:
                        failed = self.failure.pop(i, None) is not None
                        log.info("worker %d restarted (pid %d)%s", i, pid, " after failed starts" if failed else "")

    def _failed_start(self, index: int, reason: str) -> None:
        """A restart that did not reach "listening": said once per reason (a crash loop is told once, then backs
        off quietly); a worker still running (hung past the start timeout, stopped) is killed, so that the watch
        restarts it with the growing delay instead of leaving the slot empty for good."""
        if self.stopping:
            return
        reason = reason.removeprefix(f"worker {index}: ")
        if self.failure.get(index) != reason:
            log.warning("worker %d could not start: %s; retrying with a growing delay (at most 30 s)", index, reason)
        self.failure[index] = reason
        proc = self.procs[index]
        if proc.is_alive():
            proc.kill()
            proc.join(5)

    def _stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("worker pid %s did not stop within %g s: killed", proc.pid, STOP_TIMEOUT)
                proc.kill()
                proc.join(5)
        for conn in self.pipes.values():
            conn.close()


def run_workers(instance: Instance, count: int) -> None:
    """Serve with ``count`` worker processes until SIGTERM/SIGINT (the calling process supervises).

    Metrics: the workers record into prometheus_client's multiprocess files, in a directory set up here before any
    worker is spawned (``PROMETHEUS_MULTIPROC_DIR``: the operator's, emptied, or a fresh one removed at exit), so a
    scrape answered by any worker sums them all (``opendps.frontends.metrics``)."""
    logs.configure(instance.settings.log_format, who="supervisor")
    probe_ports(instance.settings)
    settings = instance.settings
    given = bool(os.environ.get(metrics.MULTIPROC_ENV))
    directory = metrics.prepare_multiprocess_dir()
    try:
        Supervisor(settings, count).run(instance)
    finally:
        metrics.remove_multiprocess_dir(directory, ours=not given)
        if not given:
            os.environ.pop(metrics.MULTIPROC_ENV, None)
