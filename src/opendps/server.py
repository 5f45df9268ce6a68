"""Process wiring for ``opendps serve``: listeners, signals, startup banner."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import platform
import signal
from collections.abc import Callable

from aiohttp import web

from opendps import logs
from opendps.audit.chain import printable
from opendps.frontends import FrontEnds, build, metrics
from opendps.frontends.http.app import make_metrics_app, make_status_app
from opendps.frontends.http.errors import AzureAppRunner
from opendps.instance import DB_PASSWORD_NOT_SAVED, Instance, Settings
from opendps.server_tls import keep_server_certificate
from opendps.transport import format_peer
from opendps.transport.tls import (
    ConnectionGate,
    connection_budgets,
    device_tls_context,
    discard_unsent,
    guard_accepts,
    http_keepalive_idle,
    raise_descriptor_limit,
    start_aiohttp_site,
    start_tls_server,
)

log = logging.getLogger("opendps")


MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Hold glibc's malloc to ``arenas`` arenas for this process; call before it starts threads.

    Why: glibc gives threads their own arenas (up to 8 per core), and memory freed in one is not reused by another:
    the domain threads that run every CONNECT's and registration's store calls kept ~2 KB per idle hub connection
    that the event loop's thread could not reuse (``opendps bench --scenario hub-idle``). Two arenas, as long-running
    services on glibc commonly set (``MALLOC_ARENA_MAX=2``); the threads mostly wait for the GIL anyway. An operator's
    ``MALLOC_ARENA_MAX`` wins. Returns whether the limit was set (False off glibc).
    """
    if "MALLOC_ARENA_MAX" in os.environ or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_ARENA_MAX, arenas))


def front_ends(instance: Instance) -> FrontEnds:
    """The front ends of ``instance`` (service tokens are accepted for its host name, with or without port)."""
    st = instance.settings
    return build(instance.services, service_hosts={st.service_host, st.hostname}, client_timeout=st.client_timeout)


def remember_settings(st: Settings) -> None:
    """Listening: now the options that worked are worth remembering (a failed start wrote nothing)."""
    if st.save():
        log.warning("%s", DB_PASSWORD_NOT_SAVED)
    for warning in st.warnings:
        log.warning("%s", warning)


def print_banner(instance: Instance) -> None:
    st = instance.settings
    print(f"opendps listening on https://{st.host}:{st.https_port} (public name {st.service_host})", flush=True)
    print(f"opendps MQTT (DPS and hubs) on mqtts://{st.host}:{st.mqtt_port}", flush=True)
    if st.amqp_port:
        print(f"opendps AMQP (hub service C2D) on amqps://{st.host}:{st.amqp_port}", flush=True)
    if st.http_port:
        print(f"opendps CRLs and OCSP (plain HTTP) on http://{st.host}:{st.http_port}", flush=True)
    print(f"opendps metrics (Prometheus) on https://{st.service_host}/metrics (loopback without credentials)"
          + (f" and http://{st.metrics_host}:{st.metrics_port}/metrics" if st.metrics_port else ""), flush=True)
    print(f"  ID scope:           {instance.id_scope}", flush=True)
    custody = instance.key_custody()
    pkcs11 = custody["pkcs11"]
    if isinstance(pkcs11, dict) and pkcs11["tokenLabel"]:
        where = f"on PKCS#11 token {pkcs11['tokenLabel']!r}" if custody["defaultKeyBackend"] == "pkcs11" else "in software"
        print(f"  CA keys:            new ones {where} (token module {pkcs11['module']})", flush=True)
    print(f"  trust this CA:      {instance.server_ca_path.resolve()}", flush=True)
    # the chain cannot show its newest entries cut (nothing in the database anchors the head): the head at each start,
    # in a log the database does not hold, is one an operator can check later with audit verify --expect-head
    seq, head = instance.services.audit.head()
    print(f"  audit log head:     {f'{seq}:{printable(head)}' if seq else 'no entries yet'}", flush=True)
    # secrets never go to the console or the log: say where to get them
    print("  owner connection:   opendps dps connection-string show", flush=True)
    print(f"  OpenAPI document:   https://{st.service_host}/openapi.json", flush=True)
    if instance.publication is not None:
        print(f"  certificate status: {instance.publication.base_url}/crl/<ca>.crl and "
              f"{instance.publication.ocsp_url} (as each certificate names them)", flush=True)


async def _plain_http(app: web.Application, host: str, port: int, name: str, budget: int, shared: bool,
                      client_timeout: float) -> web.AppRunner:
    """A plain-HTTP listener for ``app``, capped like the TLS ones (SO_REUSEPORT when shared by workers)."""
    runner = AzureAppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=client_timeout)
    await runner.setup()
    await GatedTCPSite(runner, host, port, gate=ConnectionGate(name, budget), reuse_port=shared,
                       write_timeout=client_timeout).start()
    return runner


async def serve(instance: Instance, *, ready: asyncio.Event | None = None, banner: bool = True, worker: int = 0,
                workers: int = 1, on_ready: Callable[[str], None] | None = None,
                stop_when: asyncio.Event | None = None, replaces: str | None = None) -> None:
    """Run the HTTPS, MQTT and (unless their port is 0) AMQP and plain-HTTP (CRLs and OCSP) listeners until
    cancelled, signalled or ``stop_when`` is set. As one of ``workers`` processes (``opendps.workers``) the
    listeners use SO_REUSEPORT. The process is a node of the cluster (``opendps.cluster``) from the moment it
    listens; ``on_ready`` is told its node id, ``replaces`` names the node of the dead worker this one restarts."""
    st = instance.settings
    fe = front_ends(instance)
    shared = workers > 1
    # every connection holds a descriptor: raise the soft limit, and cap each listener below it together
    raise_descriptor_limit()
    # ... and a listener that hits the limit anyway (a burst is accepted before the caps close its excess) pauses
    # for a second instead of spinning and logging each failed accept()
    guard_accepts(asyncio.get_running_loop())
    budget = connection_budgets(["HTTPS", "MQTT"] + ["AMQP"] * bool(st.amqp_port) + ["HTTP"] * bool(st.http_port)
                                + ["metrics"] * bool(st.metrics_port))
    # keepalive_timeout: an HTTPS connection must send a whole request header within it (aiohttp arms it at
    # connect and after each response), so idle and slow-header connections are closed
    # AzureAppRunner: what aiohttp's parser refuses is answered with an Azure error body too
    runner = AzureAppRunner(fe.http, access_log=None, handle_signals=False, keepalive_timeout=st.client_timeout)
    await runner.setup()
    # one HTTPS listener for the management and device APIs: the device TLS layer requests (never
    # requires) a client certificate and hands the sent chain to attestation (docs/architecture.md, "TLS")
    ctx = device_tls_context(instance.server_cert_path, instance.server_key_path, alpn=[b"http/1.1"])
    deadline = fe.runtime.connect_deadline  # to finish the handshake (then the CONNECT, the AMQP open)
    # write_timeout: a client that leaves our answers unread (a big one asked for and never read) for the client
    # timeout is cut off, on every listener: else it holds its slot, its buffers and whoever waits to write to it
    # idle: when it is full, a keep-alive connection waiting between requests is closed for a new one
    https_gate = ConnectionGate("HTTPS", budget["HTTPS"], idle=http_keepalive_idle)
    await start_aiohttp_site(runner, st.host, st.https_port, ctx, gate=https_gate,
                             reuse_port=shared, handshake_timeout=deadline, write_timeout=st.client_timeout)
    # MQTT (DPS and every hub) on its own port, same TLS layer: the CONNECT username routes the session
    mqtt_ctx = device_tls_context(instance.server_cert_path, instance.server_key_path, alpn=[b"mqtt"])
    fe.mqtt.add_listener(await start_tls_server(fe.mqtt.protocol_factory, st.host, st.mqtt_port, mqtt_ctx,
                                                gate=ConnectionGate("MQTT", budget["MQTT"]), reuse_port=shared,
                                                handshake_timeout=deadline, write_timeout=st.client_timeout))
    # AMQP 1.0 (service-side C2D, as azure-iot-hub sends it) on its own port, same TLS layer; 0 = off
    if st.amqp_port:
        amqp_ctx = device_tls_context(instance.server_cert_path, instance.server_key_path, alpn=[b"amqp"])
        fe.amqp.add_listener(await start_tls_server(fe.amqp.protocol_factory, st.host, st.amqp_port, amqp_ctx,
                                                    gate=ConnectionGate("AMQP", budget["AMQP"]), reuse_port=shared,
                                                    handshake_timeout=deadline, write_timeout=st.client_timeout))
    # CRLs and OCSP over plain HTTP (relying parties fetch them without TLS); the same routes are on HTTPS; 0 = off
    status_runner = await _plain_http(make_status_app(fe.runtime), st.host, st.http_port, "HTTP", budget["HTTP"], shared,
                                      st.client_timeout) if st.http_port else None
    # GET /metrics over plain HTTP for Prometheus (loopback by default: --metrics-host opens it); 0 = off
    metrics_runner = await _plain_http(make_metrics_app(fe.runtime), st.metrics_host, st.metrics_port, "metrics",
                                       budget["metrics"], shared, st.client_timeout) if st.metrics_port else None
    # a node of the service from now on: live hub state reaches devices here from any process or node
    cluster = await fe.runtime.join_cluster(bus_url=st.bus, worker=worker, replaces=replaces, endpoints={
        "bind": st.host, "https": st.https_port, "mqtt": st.mqtt_port, "amqp": st.amqp_port, "http": st.http_port})
    if not shared:  # a worker's supervisor does it once for all of them
        remember_settings(st)
    settle_heap()
    if banner:
        print_banner(instance)
    log.info("listening%s (pid %d)", f" as worker {worker} of {workers}" if shared else "", os.getpid())
    stop = asyncio.Event()
    received: list[str] = []
    loop = asyncio.get_running_loop()

    def on_signal(name: str) -> None:
        received.append(name)
        stop.set()

    # a worker leaves Ctrl-C (sent to the whole process group) to its supervisor, which stops it with SIGTERM
    for sig in (signal.SIGTERM,) if shared else (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # non-main thread / Windows
            loop.add_signal_handler(sig, on_signal, sig.name)
    # a hub linked or re-named while serving gets its host name into the certificate (docs/architecture.md, "TLS")
    tls_contexts = [ctx, mqtt_ctx, *([amqp_ctx] if st.amqp_port else [])]
    certificate_keeper = asyncio.create_task(keep_server_certificate(instance, tls_contexts))
    sampler = asyncio.create_task(metrics.sample_forever(fe.runtime.sample))  # queue depths for the gauges
    orphan_watch = loop.create_task(stop_when.wait()) if stop_when is not None else None  # held: tasks are weak
    if orphan_watch is not None:
        orphan_watch.add_done_callback(lambda _t: stop.set())
    if ready is not None:
        ready.set()
    if on_ready is not None:
        on_ready(cluster.node_id)
    try:
        await stop.wait()
    finally:
        certificate_keeper.cancel()
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await certificate_keeper
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        if banner:
            print(f"opendps shutting down{f' ({received[0]})' if received else ''}", flush=True)
        await fe.runtime.leave_cluster()  # first: the others stop routing here
        if status_runner is not None:
            await status_runner.cleanup()  # before the HTTPS runner's, which closes the domain thread pool
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await runner.cleanup()  # the app's cleanup closes the MQTT and AMQP listeners and their connections too


class _Gated(asyncio.Protocol):
    """A plain TCP connection admitted by a :class:`ConnectionGate` (TLS listeners get theirs from
    ``transport.tls``); over the cap it is closed at once, else ``inner`` (aiohttp's request handler) sees it all.
    With ``write_timeout``, a client that leaves our answers unread that long is cut off (as ``transport.tls`` does).
    Never "answered" (aiohttp writes to the socket's transport itself): when the listener is full, its oldest
    connection makes room — certificate-status and metrics fetches are short, and HTTP lets a server close a
    keep-alive connection at any time."""

    def __init__(self, inner: asyncio.Protocol, gate: ConnectionGate, write_timeout: float | None = None) -> None:
        self.inner, self.gate, self.admitted = inner, gate, False
        self.holds_slot = False  # until released, or evicted (the slot went to a newer connection)
        self.write_timeout = write_timeout
        self.transport: asyncio.BaseTransport | None = None
        self.stalled: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.gate.admit(self):
            transport.abort()
            return
        self.admitted = self.holds_slot = True
        self.transport = transport
        self.inner.connection_made(transport)

    def evict(self) -> None:
        self.holds_slot = False
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.admitted:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.admitted else None

    def pause_writing(self) -> None:
        if self.admitted:
            if self.write_timeout is not None and self.stalled is None:
                self.stalled = asyncio.get_running_loop().call_later(self.write_timeout, self._cut_off)
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.admitted:
            self._cancel_stalled()
            self.inner.resume_writing()

    def _cut_off(self) -> None:
        self.stalled = None
        if self.admitted and self.transport is not None:
            log.info("HTTP connection from %s closed: it read nothing we sent for %g s",
                     format_peer(self.transport.get_extra_info("peername")), self.write_timeout)
            discard_unsent(self.transport)
            self.transport.abort()

    def _cancel_stalled(self) -> None:
        if self.stalled is not None:
            self.stalled.cancel()
            self.stalled = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_stalled()
        if self.holds_slot:
            self.holds_slot = False
            self.gate.release(self)
        if self.admitted:
            self.admitted = False
            self.inner.connection_lost(exc)


class GatedTCPSite(web.TCPSite):
    """aiohttp's plain TCP site with a connection cap (the plain-HTTP listener: certificate status)."""

    __slots__ = ("_gate", "_write_timeout")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, gate: ConnectionGate,
                 reuse_port: bool = False, write_timeout: float | None = None) -> None:
        super().__init__(runner, host, port, backlog=1024, reuse_address=True, reuse_port=reuse_port or None)
        self._gate = gate
        self._write_timeout = write_timeout

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site; TCPSite.start would bind without the gate
        handler = self._runner.server
        assert handler is not None
        gate, write_timeout = self._gate, self._write_timeout
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Gated(handler(), gate, write_timeout), self._host, self._port, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port)


def settle_heap() -> None:
    """What start-up made (modules, the configuration, TLS contexts, listeners) lives as long as the process: after
    one full collection it is moved out of the collector's generations (``gc.freeze``), so the collections serving
    sets off every few hundred allocations do not walk it again each time (~2 % of a hub CONNECT's CPU)."""
    gc.collect()
    gc.freeze()


def run(instance: Instance) -> None:
    """``opendps serve``: one process, or a supervisor of ``--workers N`` (``opendps.workers``)."""
    from opendps.workers import default_workers, run_workers

    count = instance.settings.workers or default_workers(instance.settings.db_url)
    if count > 1:
        run_workers(instance, count)
        return
    logs.configure(instance.settings.log_format)
    asyncio.run(serve(instance))
