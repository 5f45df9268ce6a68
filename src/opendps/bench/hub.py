"""Hub scenarios: mTLS connects, idle connections held, QoS 1 telemetry; opendps against Mosquitto 2 (issue 7).

Why a peer: what an MQTT CONNECT or a QoS 1 message costs opendps means little alone; Mosquitto is the
reference MQTT broker, so the same devices, certificates and packets are sent to a Mosquitto started by
the benchmark on a free port (mTLS listener, ``require_certificate``, CA = the instance's issuing CA + root)
and every row pair is reported as a ratio oriented so that below 1 means opendps is worse:
connects and telemetry ``opendps ops/CPU-s ÷ mosquitto ops/CPU-s``; memory ``mosquitto bytes per
connection ÷ opendps bytes per connection``. Connects and telemetry run in rounds (``--rounds``), the two servers
taking turns while both run, and each row pools its rounds (:func:`_pair`): one load of each, minutes apart, put
the machine's drift (±20 % here) into the ratio.

Set-up outside the timing, before the opendps server starts (``running_server(before_start=...)``): the
namespace, policy and a group linking the policy to the default hub through the domain code (so the hub
trusts the policy's issuing CA, as after real provisioning), then per device a fresh P-384 key and an
operational certificate from :func:`opendps.pki.profiles.leaf_builder` signed with the policy's issuing
CA key, and in bulk the rows a registration writes that hub authentication reads (``hub_devices`` with
``certificateAuthority`` auth, ``device_records``, ``issued_certificates`` with the real DER, plus
``registrations``). Provisioning 10k devices through the DPS API would take minutes (Retry-After 2 s).

The load generator is one spawned process and one asyncio loop. Its device connection is a small
``asyncio.Protocol`` running :class:`ssl.SSLObject` on memory BIOs and the shared MQTT codec: asyncio's
own TLS transport (Python 3.11) allocates and zero-fills a 256 KiB read buffer per connection, 2.5 GB for
10k idle devices, and the SDK's client runs three tasks per connection. The server's CPU is read by the
load generator itself from ``/proc`` (plus PostgreSQL's with ``--db``) around exactly the phase measured:
connects, the set-up of the idle connections, or the publishing. With ``--workers`` > 1 the server's CPU and
RSS are summed over the supervisor and its workers; Mosquitto is measured with the first worker count only and
its row is related to every opendps row of the scenario.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import os
import resource
import secrets
import shutil
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opendps.bench._harness import (
    CLK_TCK,
    BenchError,
    Options,
    Result,
    Server,
    free_port,
    load_row,
    postgres_cpu_seconds,
    proc_children,
    run_load,
    running_server,
    service_client,
    skipped,
    stop_process,
    tree_cpu_seconds,
    tree_rss,
    wait_listening,
    warm_up_count,
)
from opendps.hub import DEFAULT_HUB
from opendps.transport import nats_client
from opendps.transport.nats_client import NatsUnreachable

if TYPE_CHECKING:
    from opendps.pki import Signer

CONNECT, IDLE, TELEMETRY = "hub-connect", "hub-idle", "hub-telemetry"
API_VERSION = "2021-04-12"
CONCURRENCY = 32  # connects in flight (hub-connect, and the set-up of hub-idle)
QUICK_CONNECTS, FULL_CONNECTS = 200, 2000
# idle fleets: 1,000 at least even when quick, since 200 connections are ~8 MB of growth, where the allocators' steps
# (256 KB Python arenas, glibc's heap) move the figure per connection by about ±1.5 KB for both servers
QUICK_IDLE, FULL_IDLE = (1_000,), (1_000, 10_000)
TELEMETRY_DEVICES = 100
QUICK_MESSAGES, FULL_MESSAGES = 200, 500  # per device (quick: 20,000 messages, ~1 s of opendps CPU: shorter runs
# were mostly the machine's noise; see docs/benchmarks.md)
WINDOW = 4  # QoS 1 publishes in flight per device
# devices that connect (and publish) once, unrecorded and all at once, before "ready" (more with workers:
# warm_up_count): at once, so that the server's domain threads and their store connections (each thread's first use
# opens one: ~0.2 MB) exist before the clock and the memory baseline, as they would in a server that has run a while
WARM_UP = 16
SETTLE = 1.0  # seconds after the last CONNACK before the server's RSS is read
KEEPALIVE = 240  # as the Azure SDKs; held connections send nothing for far less than 1.5 × this
TIMEOUT = 60.0
PAYLOAD = b'{"temperature": 21.5, "humidity": 43, "seq": %d}'
TELEMETRY_BAG = "%24.ct=application%2Fjson&%24.ce=utf-8"  # the property bag the Azure SDKs add for JSON
MOSQUITTO_SKIPPED = "mosquitto not installed (apt-get install mosquitto): opendps rows only, no ratios"
MEMORY_RATIO = "ratios.mosquitto = mosquitto bytes per connection ÷ opendps' (below 1: opendps uses more memory)"


# ---------------------------------------------------------------- scenarios


def connects(opts: Options) -> list[Result]:
    """Closed loop at ``CONCURRENCY``: fresh mTLS connect + CONNECT/CONNACK + DISCONNECT per device, in rounds that
    take turns with Mosquitto (each round its own devices: every CONNECT is a device's first, as in round one)."""
    count = opts.count or (QUICK_CONNECTS if opts.quick else FULL_CONNECTS)
    level = opts.levels[0] if opts.levels else CONCURRENCY
    spec = {"mode": "connect", "count": count, "concurrency": level}
    rounds = opts.round_count

    def row(system: str, outcome: dict[str, Any], pid: int, extra: dict[str, Any]) -> Result:
        return load_row(CONNECT, "mqtt", level, count * outcome["rounds"], outcome, outcome["server_cpu"], pid,
                        system=system, certificate="P-384 operational, chain leaf + issuing CA", **extra)

    rows = _pair(opts, CONNECT, count, spec, row, rounds=rounds, fresh_devices=True)
    _ratio(rows, lambda r: r.ops_per_cpu_second, higher_is_better=True)
    return rows


CONNECT_SCALE = "hub-connect-scale"
QUICK_FLEETS, FULL_FLEETS = ((0, 0), (2_000, 200)), ((0, 0), (100_000, 10_000))  # (extra devices, enrollments)
SCALE_CONNECTS = 400


def connects_at_scale(opts: Options) -> list[Result]:
    """The same CONNECT load against a small store and against one that also holds 100k more registered devices
    and 10k more enrollments (issue 14: CONNECT cost must not grow with the fleet); the large row gets
    ``ratios["small store"]`` = its connects per CPU second ÷ the small store's (below 1: a CONNECT costs more)."""
    count = opts.count or (QUICK_CONNECTS if opts.quick else SCALE_CONNECTS)
    level = opts.levels[0] if opts.levels else CONCURRENCY
    rows: list[Result] = []
    warm = warm_up_count(WARM_UP, opts.workers)
    for extra_devices, enrollments in (QUICK_FLEETS if opts.quick else FULL_FLEETS):
        with tempfile.TemporaryDirectory(prefix="opendps-bench-hub-") as tmp:
            fleet: dict[str, Any] = {}

            def seed_fleet(env: dict[str, str], n: int = extra_devices, e: int = enrollments,
                           out: dict[str, Any] = fleet, where: str = tmp) -> None:
                out.update(seed(env, count + warm, Path(where), lint=opts.lint, extra_devices=n, enrollments=e))

            with running_server(opts.db_url, opts.lint, before_start=seed_fleet,
                                profile=opts.profile(f"{CONNECT_SCALE}-{extra_devices}"),
                                workers=opts.workers) as server:
                spec = {"mode": "connect", "count": count, "concurrency": level, "host": "127.0.0.1",
                        "server_hostname": "localhost", "ca_file": str(server.ca_file), "hub_host": fleet["hub_host"],
                        "devices": fleet["devices"], "warm_up": warm, "port": server.mqtt_port, "pid": server.pid,
                        "postgres": server.postgres}
                outcome = _load(spec, server.pid)
                rows.append(load_row(CONNECT_SCALE, "mqtt", level, count, outcome, outcome["server_cpu"], server.pid,
                                     devices=count + warm + extra_devices, enrollments=enrollments + 1,
                                     seed_seconds=fleet["seed_seconds"]))
    small, large = rows[0], rows[-1]
    if small.ops_per_cpu_second and large.ops_per_cpu_second:
        large.ratios["small store"] = round(large.ops_per_cpu_second / small.ops_per_cpu_second, 4)
    return rows


def idle(opts: Options) -> list[Result]:
    """Per fleet size: hold that many connections and divide the server's RSS growth by it."""
    sizes = (opts.count,) if opts.count else (QUICK_IDLE if opts.quick else FULL_IDLE)
    level = opts.levels[0] if opts.levels else CONCURRENCY
    rows: list[Result] = []
    for size in sizes:
        spec = {"mode": "idle", "count": size, "concurrency": level, "settle": SETTLE}

        def row(system: str, outcome: dict[str, Any], pid: int, extra: dict[str, Any], k: int = size) -> Result:
            held = len(outcome["latencies"])
            grown = outcome["rss_after"] - outcome["rss_before"]
            return load_row(IDLE, "mqtt", level, k, outcome, outcome["server_cpu"], pid, system=system, devices=k,
                            bytes_per_connection=round(grown / held) if held else 0,
                            rss_before=outcome["rss_before"], rss_after=outcome["rss_after"],
                            load_generator_peak_rss=outcome["load_generator_peak_rss"],
                            **({"ratio": MEMORY_RATIO} if system == "opendps" else {}), **extra)

        pair = _pair(opts, f"{IDLE}-{size}", size, spec, row)
        _ratio(pair, lambda r: r.extra["bytes_per_connection"], higher_is_better=False)
        rows.extend(pair)
    return rows


def telemetry(opts: Options) -> list[Result]:
    """100 connected devices publish QoS 1 telemetry, ``WINDOW`` in flight each; publish → PUBACK per message."""
    if opts.count:
        devices = min(TELEMETRY_DEVICES, opts.count)
        per_device = max(1, opts.count // devices)
    else:
        devices, per_device = TELEMETRY_DEVICES, QUICK_MESSAGES if opts.quick else FULL_MESSAGES
    spec = {"mode": "telemetry", "count": devices, "messages": per_device, "window": WINDOW}

    def row(system: str, outcome: dict[str, Any], pid: int, extra: dict[str, Any]) -> Result:
        store = ("every message appended to the store (telemetry_events) before its PUBACK" if system == "opendps"
                 else "no subscriber, persistence off: PUBACK without storing")
        return load_row(TELEMETRY, "mqtt", devices, devices * per_device * outcome["rounds"], outcome,
                        outcome["server_cpu"], pid,
                        system=system, devices=devices, messages_per_device=per_device, qos=1, window=WINDOW,
                        payload_bytes=len(PAYLOAD % 0), durability=store, **extra)

    def routed(server: Server, base: dict[str, Any]) -> list[Result]:
        """The same load again with a durable NATS JetStream route on the hub (the local nats-server)."""
        stream = f"OPENDPSBENCH{secrets.token_hex(4).upper()}"
        prefix = stream.lower()
        problem = _jetstream(lambda js: js.add_stream(name=stream, subjects=[f"{prefix}.>"]))
        if problem:
            return [skipped(TELEMETRY, ROUTED, problem, transport="mqtt", concurrency=devices)]
        try:
            with service_client(server) as c:
                r = c.put(f"/linkedHubs/{DEFAULT_HUB}/routes/bench", json={"properties": {
                    "endpointType": "nats", "url": NATS_URL, "subject": prefix, "durable": True}})
                if r.status_code not in (200, 201):
                    raise BenchError(f"route create failed: {r.status_code} {r.text[:200]}")
            outcome = _load({**base, "port": server.mqtt_port, "pid": server.pid, "postgres": server.postgres},
                            server.pid)
            outcome["rounds"] = 1
            result = row(ROUTED, outcome, server.pid, {"route": f"JetStream stream {stream}, acknowledged before PUBACK"})
            result.extra["durability"] += "; then published to NATS JetStream and acknowledged by the stream before the PUBACK"
            return [result]
        finally:
            _jetstream(lambda js: js.delete_stream(stream))

    rows = _pair(opts, TELEMETRY, devices, spec, row, also=routed, rounds=opts.round_count)
    _ratio(rows, lambda r: r.ops_per_cpu_second, higher_is_better=True)
    _ratio(rows, lambda r: r.ops_per_cpu_second, higher_is_better=True, ours_system=ROUTED)
    return rows


ROUTED = "opendps+nats"  # the telemetry row with a durable JetStream route
NATS_URL = "nats://127.0.0.1:4222"


def _jetstream(action: Any) -> str | None:
    """Run ``action(jetstream)`` on the local NATS server; a reason when there is none (or no JetStream)."""
    async def main() -> str | None:
        try:
            nc = await nats_client.connect(NATS_URL, name="opendps-bench", within=3)
        except NatsUnreachable as exc:  # no NATS here: the routed row is skipped, with the reason
            return str(exc)
        try:
            await action(nc.jetstream())
            return None
        except Exception as exc:  # noqa: BLE001
            return f"JetStream at {NATS_URL}: {type(exc).__name__}: {exc}"
        finally:
            await nc.close()

    return asyncio.run(main())


def _pair(opts: Options, label: str, devices: int, spec: dict[str, Any], row: Any, also: Any = None, *,
          rounds: int = 1, fresh_devices: bool = False) -> list[Result]:
    """One fresh opendps seeded with ``devices`` (+ warm-up) devices and a Mosquitto beside it; the load against
    each, ``rounds`` times, taking turns (opendps first in even rounds, Mosquitto first in odd ones), so that the
    machine's drift over the minutes of a run falls on both; a row per system pooled over its rounds (operations
    ÷ CPU seconds of all of them), with each round's figure in ``extra["round_ops_per_cpu_second"]`` and the
    rounds' ratios in the opendps row's ``extra["round_ratios"]``. ``fresh_devices``: each
    round its own devices (seeded ``rounds`` times as many; a CONNECT costs more the first time a device makes it).

    Mosquitto runs once per ``label``: later worker counts reuse its row from ``opts.peer_rows`` (returned again
    for the ratios; :func:`opendps.bench.run_bench` reports it once), and their opendps rounds run alone.
    ``also(server, base)``: more rows from the same server and fleet after the rounds (the NATS route).
    """
    _raise_nofile()  # the server and Mosquitto inherit it
    mosquitto = _mosquitto_binary()
    warm = warm_up_count(WARM_UP, opts.workers)
    with tempfile.TemporaryDirectory(prefix="opendps-bench-hub-") as tmp:
        fleet: dict[str, Any] = {}
        seeded = devices * (rounds if fresh_devices else 1)

        def seed_fleet(env: dict[str, str]) -> None:
            fleet.update(seed(env, seeded + warm, Path(tmp), lint=opts.lint))

        with running_server(opts.db_url, opts.lint, before_start=seed_fleet, profile=opts.profile(label),
                            workers=opts.workers) as server, contextlib.ExitStack() as peer_stack:
            base = {**spec, "host": "127.0.0.1", "server_hostname": "localhost", "ca_file": str(server.ca_file),
                    "hub_host": fleet["hub_host"], "devices": fleet["devices"][:devices] + fleet["devices"][seeded:],
                    "warm_up": warm}
            targets: dict[str, dict[str, Any] | None] = {
                "opendps": {"port": server.mqtt_port, "pid": server.pid, "postgres": server.postgres},
                "mosquitto": None}
            version = ""
            if mosquitto is not None and label not in opts.peer_rows:
                proc, port, version = peer_stack.enter_context(running_mosquitto(mosquitto, Path(tmp),
                                                                                 fleet["ca_chain"], server))
                targets["mosquitto"] = {"port": port, "pid": proc.pid, "postgres": False}
            outcomes: dict[str, list[dict[str, Any]]] = {"opendps": [], "mosquitto": []}
            for turn in range(rounds):
                mine = fleet["devices"][turn * devices:(turn + 1) * devices] if fresh_devices else base["devices"][:devices]
                round_spec = {**base, "devices": mine + fleet["devices"][seeded:]}
                for system in ("opendps", "mosquitto") if turn % 2 == 0 else ("mosquitto", "opendps"):
                    if (target := targets[system]) is not None:
                        outcomes[system].append(_load({**round_spec, **target}, target["pid"]))
            peer = targets["mosquitto"]
            rows = [row("opendps", _pooled(outcomes["opendps"]), server.pid, {"seed_seconds": fleet["seed_seconds"]})]
            if also is not None:  # another opendps configuration on the same server and fleet
                rows.extend(also(server, base))
            if mosquitto is None:
                rows[0].extra["mosquitto"] = MOSQUITTO_SKIPPED
            elif peer is None:
                rows.append(opts.peer_rows[label])
            else:
                rows.append(row("mosquitto", _pooled(outcomes["mosquitto"]), peer["pid"], {"version": version}))
                opts.peer_rows[label] = rows[-1]
            if rounds > 1:
                for result in (rows[0], rows[-1]) if peer is not None else (rows[0],):
                    result.extra["round_ops_per_cpu_second"] = [round(_rate(o), 2) for o in outcomes[result.system]]
                if peer is not None:  # the spread of the pooled ratio
                    rows[0].extra["round_ratios"] = [round(_rate(a) / _rate(b), 4) if _rate(a) and _rate(b) else None
                                                     for a, b in zip(outcomes["opendps"], outcomes["mosquitto"],
                                                                     strict=True)]
    return rows


def _pooled(outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    """One outcome from a system's rounds: their walls, server CPU, latencies and errors together; ``rounds``: how
    many. Pooled, not a median of rounds: the row's operations ÷ CPU seconds stays what its own figures say."""
    return {"wall": sum(o["wall"] for o in outcomes), "server_cpu": sum(o["server_cpu"] for o in outcomes),
            "latencies": [x for o in outcomes for x in o["latencies"]],
            "errors": [e for o in outcomes for e in o["errors"]], "rounds": len(outcomes),
            **{k: v for k, v in outcomes[-1].items() if k.startswith(("rss_", "load_generator"))}}


def _rate(outcome: dict[str, Any]) -> float:
    """One round's operations per server CPU second; 0 where the CPU read below one clock tick."""
    cpu = outcome["server_cpu"]
    return len(outcome["latencies"]) / cpu if round(cpu * CLK_TCK) >= 1 else 0.0


def _load(spec: dict[str, Any], pid: int) -> dict[str, Any]:
    outcome, _ = run_load(_worker, spec, pid)  # the worker reads the server's CPU around the measured phase itself
    return outcome


def _ratio(rows: list[Result], metric: Any, *, higher_is_better: bool, ours_system: str = "opendps") -> None:
    """``ratios["mosquitto"]`` on the opendps row, oriented so that below 1 means opendps is worse."""
    ours = next((r for r in rows if r.system == ours_system and r.count), None)
    peer = next((r for r in rows if r.system == "mosquitto"), None)
    if ours is None or peer is None or any(r.extra.get("cpu_below_resolution") for r in (ours, peer)):
        return  # no ratio from a figure the clock could not measure
    a, b = metric(ours), metric(peer)
    if a > 0 and b > 0:
        ours.ratios["mosquitto"] = round(a / b if higher_is_better else b / a, 4)


def _raise_nofile() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: 10k connections need 10k descriptors on each side."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))


# ---------------------------------------------------------------- seeding (before the server starts)


def seed(env: dict[str, str], count: int, directory: Path, *, lint: bool, extra_devices: int = 0,
         enrollments: int = 0) -> dict[str, Any]:
    """Namespace, policy and group through the domain code; ``count`` devices with operational certificates in bulk.

    Returns the hub host, the device list ``[(device id, PEM file)]`` for the load generator, the issuing
    CA + root PEM (Mosquitto's CA file) and how long it took. Each device file holds the key, the leaf and
    the issuing CA: what a provisioned device presents to the hub (``chain.pem``).
    """
    from cryptography.hazmat.primitives import serialization

    from opendps.bench.store_scale import seeded_fleet

    started = time.perf_counter()
    with seeded_fleet(env, base64.b64encode(secrets.token_bytes(64)).decode(), lint=lint) as (inst, t):
        # the issuing CA's signer from the key store: the leaf profile signed without lint (the engine lints)
        signer = inst.keys.signer(t["issuing_key_id"])
        devices, rows = _issue(t, signer, count, directory, sqlite=inst.store.engine.dialect.name == "sqlite")
        _insert(inst.store.engine, rows)
        if extra_devices:  # registered devices that never connect: store_scale's bulk rows (one shared leaf DER)
            from opendps.bench.store_scale import _insert_all, _template

            _insert_all(inst.store.engine, _template(inst, t), extra_devices)
        if enrollments:
            _enrollments(inst.store.engine, t, enrollments)
    from cryptography import x509

    ca_chain = b"".join(x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM)
                        for d in (t["issuing_der"], t["root_der"]))
    return {"hub_host": t["hub_host"], "devices": devices, "ca_chain": ca_chain,
            "seed_seconds": round(time.perf_counter() - started, 2)}


def _issue(t: dict[str, Any], signer: Signer, count: int, directory: Path, *,
           sqlite: bool) -> tuple[list[tuple[str, str]], dict[str, list[tuple[Any, ...]]]]:
    """Keys, leaves (the opendps leaf profile, signed by the issuing CA), device files and the rows to insert."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from opendps.bench.store_scale import COLUMNS, registered_device
    from opendps.pki.profiles import leaf_builder, sign_builder

    issuing = x509.load_der_x509_certificate(t["issuing_der"])
    issuing_pem = issuing.public_bytes(serialization.Encoding.PEM)
    issuer_public = signer.public_key()
    folder = directory / f"devices-{secrets.token_hex(4)}"
    folder.mkdir(mode=0o700)
    now = dt.datetime.now(dt.UTC)
    ts = (lambda d: d.strftime("%Y-%m-%d %H:%M:%S.%f")) if sqlite else (lambda d: d)
    c = ts(now)
    rows: dict[str, list[tuple[Any, ...]]] = {name: [] for name in COLUMNS if name != "operations"}
    devices: list[tuple[str, str]] = []
    for i in range(count):
        device_id = f"hub-{i:05d}"
        key = ec.generate_private_key(ec.SECP384R1())
        leaf = sign_builder(leaf_builder(key.public_key(), device_id, issuing, issuer_public, t["days"], now=now),
                            signer, lint=False)
        der = leaf.public_bytes(serialization.Encoding.DER)
        serial, sha = format(leaf.serial_number, "x"), hashlib.sha256(der).hexdigest()
        path = folder / f"{device_id}.pem"
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())
                         + leaf.public_bytes(serialization.Encoding.PEM) + issuing_pem)
        devices.append((device_id, str(path)))
        e = base64.b64encode(os.urandom(24)).decode()
        for table, row in zip(("registrations", "hub_devices", "device_records", "issued_certificates"),
                              registered_device(t, device_id, serial=serial, sha256=sha, der=der,
                                                not_before=ts(leaf.not_valid_before_utc),
                                                not_after=ts(leaf.not_valid_after_utc), created=c,
                                                etags=(e[:12], e[12:24], e[24:]), generation=secrets.token_hex(8)),
                              strict=True):
            rows[table].append(row)
    return devices, rows


def _enrollments(engine: Any, t: dict[str, Any], count: int) -> None:
    """``count`` individual enrollments on the fleet's policy (X.509 with a pinned thumbprint; none connects)."""
    from sqlalchemy import JSON, DateTime, column, insert, table

    from opendps.bench.provisioning import POLICY

    # the table by name, as store_scale's bulk rows: the bench seeds rows, it does not own them
    enrollments = table("enrollments", column("kind"), column("enrollment_id"), column("attestation_type"),
                        column("policy_id"), column("provisioning_status"), column("document", JSON), column("secret"),
                        column("etag"), column("created_at", DateTime(timezone=True)),
                        column("updated_at", DateTime(timezone=True)))

    now = dt.datetime.now(dt.UTC)
    rows = []
    for i in range(count):
        rid = f"enrolled-{i:06d}"
        doc = {"registrationId": rid, "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {
            "info": {"sha256Thumbprint": secrets.token_hex(32).upper()}}}}}, "credentialPolicyName": POLICY}
        rows.append({"kind": "individual", "enrollment_id": rid, "attestation_type": "x509", "policy_id": t["policy_id"],
                     "provisioning_status": "enabled", "document": doc, "secret": None, "etag": secrets.token_hex(6),
                     "created_at": now, "updated_at": now})
    with engine.connect() as conn, conn.begin():
        conn.execute(insert(enrollments), rows)


def _insert(engine: Any, rows: dict[str, list[tuple[Any, ...]]]) -> None:
    """Every row in one transaction (executemany on SQLite, COPY on PostgreSQL; store_scale's bulk path)."""
    from opendps.bench.store_scale import _bulk

    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn, conn.begin():
        for table, batch in rows.items():
            _bulk(conn, table, batch, sqlite=sqlite)


# ---------------------------------------------------------------- Mosquitto


def _mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found is None and os.access("/usr/sbin/mosquitto", os.X_OK):
        found = "/usr/sbin/mosquitto"
    return found


@contextlib.contextmanager
def running_mosquitto(binary: str, directory: Path, ca_chain: bytes,
                      server: Server) -> Iterator[tuple[subprocess.Popen, int, str]]:
    """Mosquitto on a free 127.0.0.1 port: mTLS with ``require_certificate``, CA = the issuing CA + root.

    Its server certificate is opendps' own (P-256, SAN localhost), so both servers do the same handshake.
    Persistence off (nothing is retained or queued in these scenarios), default logging to a file.
    """
    work = directory / f"mosquitto-{secrets.token_hex(4)}"
    work.mkdir(mode=0o700)
    tls = Path(server.env["OPENDPS_DATA_DIR"]) / "tls"
    (work / "ca.pem").write_bytes(ca_chain)
    shutil.copyfile(tls / "server.pem", work / "server.pem")
    shutil.copyfile(tls / "server.key", work / "server.key")
    port = free_port()
    conf = [
        "per_listener_settings false", "persistence false", "allow_anonymous false",
        f"log_dest file {work / 'mosquitto.log'}", f"pid_file {work / 'mosquitto.pid'}",
        *(["user root"] if os.geteuid() == 0 else []),  # else it drops to user mosquitto, who cannot read these files
        f"listener {port} 127.0.0.1", "max_connections -1",
        f"cafile {work / 'ca.pem'}", f"certfile {work / 'server.pem'}", f"keyfile {work / 'server.key'}",
        "require_certificate true", "use_identity_as_username true",
        "set_tcp_nodelay true",  # as asyncio (opendps) does; Nagle + delayed ACKs would add 40 ms stalls
    ]
    (work / "mosquitto.conf").write_text("\n".join(conf) + "\n")
    version = subprocess.run([binary, "-h"], capture_output=True, text=True, check=False).stdout.split("\n", 1)[0]
    with open(work / "stdout.log", "wb") as log:
        proc = subprocess.Popen([binary, "-c", str(work / "mosquitto.conf")], stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=_raise_nofile)  # no threads of ours touch the fork
    try:
        try:
            wait_listening(proc, (port,), work / "stdout.log", timeout=30)
        except BenchError as exc:
            log_file = work / "mosquitto.log"
            raise BenchError(f"{exc}; {log_file.read_text(errors='replace')[-1000:] if log_file.exists() else ''}") from exc
        yield proc, port, version.removeprefix("mosquitto version ").strip() or "unknown"
    finally:
        stop_process(proc)


# ---------------------------------------------------------------- the load generator (its own process)


class _Device(asyncio.Protocol):
    """One device connection: TLS through :class:`ssl.SSLObject` on memory BIOs, MQTT through the shared codec.

    Nothing runs per connection but this object's callbacks: no tasks, no stream buffers (see the module
    docstring), so 10k held connections stay cheap in the load generator.
    """

    def __init__(self, context: ssl.SSLContext, server_hostname: str, connect: bytes) -> None:
        from opendps.transport.mqtt.codec import Decoder

        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_hostname=server_hostname)
        self._connect = connect
        self._decoder = Decoder(1 << 16)
        self._handshaken = False
        self._next_pid = 0
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.acks: dict[int, asyncio.Future[None]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._step()

    def data_received(self, data: bytes) -> None:
        self._in.write(data)
        self._step()

    def eof_received(self) -> bool:
        self._fail(ConnectionError("the server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"connection lost: {exc!r}" if exc else "the server closed the connection"))

    def _step(self) -> None:
        from opendps.transport.mqtt.codec import MqttProtocolError

        try:
            if not self._handshaken:
                self._tls.do_handshake()
                self._handshaken = True
                self._tls.write(self._connect)
            while True:
                chunk = self._tls.read(65536)
                if not chunk:
                    raise ConnectionError("TLS closed by the server")
                for packet in self._decoder.feed(chunk):
                    self._handle(packet)
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLError, MqttProtocolError, ConnectionError) as exc:
            self._flush()
            self._fail(exc)
            return
        self._flush()

    def _handle(self, packet: Any) -> None:
        from opendps.transport.mqtt.codec import Connack, Puback

        if isinstance(packet, Connack):
            if not self.connack.done():
                self.connack.set_result(packet.return_code)
        elif isinstance(packet, Puback):
            future = self.acks.pop(packet.packet_id, None)
            if future is not None and not future.done():
                future.set_result(None)

    def _flush(self) -> None:
        data = self._out.read()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _fail(self, exc: Exception) -> None:
        if not self.connack.done():
            self.connack.set_exception(exc)
        for future in self.acks.values():
            if not future.done():
                future.set_exception(exc)
        self.acks.clear()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def send(self, packet: Any) -> None:
        from opendps.transport.mqtt.codec import encode

        if self.transport is None or self.transport.is_closing():
            raise ConnectionError("not connected")
        self._tls.write(encode(packet))
        self._flush()

    def publish(self, topic: str, payload: bytes) -> asyncio.Future[None]:
        """A QoS 1 PUBLISH; the future completes on its PUBACK."""
        from opendps.transport.mqtt.codec import Publish

        self._next_pid = self._next_pid % 0xFFFF + 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.acks[self._next_pid] = future
        self.send(Publish(topic, payload, 1, False, False, self._next_pid))
        return future

    def close(self) -> None:
        """DISCONNECT and close, as a device that leaves cleanly."""
        from opendps.transport.mqtt.codec import Disconnect

        with contextlib.suppress(ConnectionError, ssl.SSLError):
            self.send(Disconnect())
        if self.transport is not None:
            self.transport.close()


async def _open(spec: dict[str, Any], context: ssl.SSLContext, device_id: str) -> _Device:
    """TCP + TLS (the device's chain) + CONNECT as an Azure device; returns once CONNACK 0 arrived."""
    from opendps.transport.mqtt.codec import Connect, encode

    connect = encode(Connect(device_id, True, KEEPALIVE, f"{spec['hub_host']}/{device_id}/?api-version={API_VERSION}"))
    loop = asyncio.get_running_loop()
    _, device = await asyncio.wait_for(loop.create_connection(
        lambda: _Device(context, spec["server_hostname"], connect), spec["host"], spec["port"]), TIMEOUT)
    try:
        code = await asyncio.wait_for(asyncio.shield(device.connack), TIMEOUT)
    except BaseException:
        device._fail(ConnectionError("gave up waiting for CONNACK"))
        raise
    if code != 0:
        device._fail(ConnectionError(f"CONNACK return code {code}"))
        raise ConnectionError(f"CONNECT refused with return code {code}")
    return device


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def _worker(conn: Any, spec: dict[str, Any]) -> None:
    """Load-generator process: SSL contexts (and for telemetry the connections) before "ready", the load on "go".

    Reports ``{"wall", "latencies", "errors", "server_cpu"}`` (+ ``rss_before``/``rss_after`` when idle).
    """
    loop = asyncio.new_event_loop()
    try:
        _raise_nofile()
        with open(spec["ca_file"]) as f:
            ca_data = f.read()

        def context(path: str) -> ssl.SSLContext:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # host name checked, chain verified, no session reuse
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_verify_locations(cadata=ca_data)
            ctx.load_cert_chain(path)
            return ctx

        devices = [(device_id, context(path)) for device_id, path in spec["devices"]]
        warm, devices = devices[-spec["warm_up"]:], devices[:-spec["warm_up"]]
        held = loop.run_until_complete(_prepare(spec, devices, warm))
    except Exception as exc:  # noqa: BLE001 - reported to the parent instead of "ready"
        conn.send(_error(exc))
        conn.close()
        loop.close()
        return

    def server_cpu() -> float:
        return _cpu_seconds(spec["pid"]) + (postgres_cpu_seconds() if spec["postgres"] else 0.0)

    conn.send("ready")
    if conn.recv() == "go":
        run = {"connect": _connects, "idle": _hold, "telemetry": _publish}[spec["mode"]]
        try:
            outcome = loop.run_until_complete(run(spec, devices, held, server_cpu))
        except Exception as exc:  # noqa: BLE001 - an outcome the parent can report, instead of a silent hour
            outcome = {"wall": 0.0, "latencies": [], "errors": [_error(exc)], "server_cpu": 0.0, "rss_before": 0,
                       "rss_after": 0, "load_generator_peak_rss": 0}
        conn.send(outcome)
        for device in held:
            device.close()
        if held:  # their closes go out before the process ends (the parent waits for it: nothing to wait for else)
            loop.run_until_complete(asyncio.sleep(0.2))
    conn.close()
    loop.close()


def _cpu_seconds(pid: int) -> float:
    """The server's CPU: utime + stime of its processes (:func:`tree_cpu_seconds`: an opendps supervisor and its
    workers), or for a single-threaded server without children (Mosquitto) its exact run time.

    Mosquitto spends about 20 µs per QoS 1 message, so a quick run is a few 10 ms clock ticks of
    utime + stime; ``/proc/<pid>/schedstat`` counts nanoseconds. It covers only the thread it names, so
    it is used only while the process has exactly one thread (then no exited thread's time is missing).
    """
    try:
        if len(os.listdir(f"/proc/{pid}/task")) == 1 and not proc_children(pid):
            runtime = int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
            if runtime > 0:
                return runtime / 1e9
    except (OSError, ValueError, IndexError):
        pass
    return tree_cpu_seconds(pid)


async def _prepare(spec: dict[str, Any], devices: list[tuple[str, ssl.SSLContext]],
                   warm: list[tuple[str, ssl.SSLContext]]) -> list[_Device]:
    """Warm-up connects (first-use imports and caches on the server), and for telemetry the connected fleet."""
    async def warm_up(device_id: str, ctx: ssl.SSLContext) -> None:
        device = await _open(spec, ctx, device_id)
        if spec["mode"] == "telemetry":
            await device.publish(_topic(device_id), PAYLOAD % 0)
        device.close()

    await asyncio.gather(*(warm_up(device_id, ctx) for device_id, ctx in warm))
    if spec["mode"] != "telemetry":
        await asyncio.sleep(0.3)
        return []
    held = await asyncio.gather(*(_open(spec, ctx, device_id) for device_id, ctx in devices))
    await asyncio.gather(*(d.publish(_topic(i), PAYLOAD % 0) for d, (i, _) in zip(held, devices, strict=True)))
    await asyncio.sleep(0.3)
    return list(held)


def _topic(device_id: str) -> str:
    return f"devices/{device_id}/messages/events/{TELEMETRY_BAG}"


async def _connect_all(spec: dict[str, Any], devices: list[tuple[str, ssl.SSLContext]], count: int,
                       keep: bool) -> tuple[list[float], list[str], list[_Device]]:
    """``count`` connects, ``concurrency`` in flight (devices reused round robin); closed at once unless ``keep``."""
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(spec["concurrency"])
    latencies: list[float] = []
    errors: list[str] = []
    kept: list[_Device] = []

    async def one(i: int) -> None:
        device_id, ctx = devices[i % len(devices)]
        async with slots:
            started = loop.time()
            try:
                device = await _open(spec, ctx, device_id)
            except Exception as exc:  # noqa: BLE001 - one device's failure is counted, not fatal
                errors.append(_error(exc).replace(device_id, "<id>"))
                return
            latencies.append(loop.time() - started)
            if keep:
                kept.append(device)
            else:
                device.close()

    await asyncio.gather(*(one(i) for i in range(count)))
    return latencies, errors, kept


async def _connects(spec: dict[str, Any], devices: list[tuple[str, ssl.SSLContext]], _held: list[_Device],
                    server_cpu: Any) -> dict[str, Any]:
    cpu = server_cpu()
    begin = time.perf_counter()
    latencies, errors, _ = await _connect_all(spec, devices, spec["count"], keep=False)
    wall = time.perf_counter() - begin
    await asyncio.sleep(0.5)  # the server finishes closing the last sessions: part of a connect's cost
    return {"wall": wall, "latencies": latencies, "errors": errors, "server_cpu": server_cpu() - cpu}


async def _hold(spec: dict[str, Any], devices: list[tuple[str, ssl.SSLContext]], held: list[_Device],
                server_cpu: Any) -> dict[str, Any]:
    """Connect every device and keep it; the server's RSS before and ``settle`` seconds after the last CONNACK."""
    rss_before, cpu = tree_rss(spec["pid"]), server_cpu()
    begin = time.perf_counter()
    latencies, errors, kept = await _connect_all(spec, devices, spec["count"], keep=True)
    wall = time.perf_counter() - begin
    await asyncio.sleep(spec["settle"])
    outcome = {"wall": wall, "latencies": latencies, "errors": errors, "server_cpu": server_cpu() - cpu,
               "rss_before": rss_before, "rss_after": tree_rss(spec["pid"]),
               "load_generator_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    held.extend(kept)  # closed by the worker after the outcome is sent
    return outcome


async def _publish(spec: dict[str, Any], devices: list[tuple[str, ssl.SSLContext]], held: list[_Device],
                   server_cpu: Any) -> dict[str, Any]:
    """Every connected device publishes ``messages`` QoS 1 messages, ``window`` unacknowledged at most."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    errors: list[str] = []

    async def device_load(device: _Device, device_id: str) -> None:
        window = asyncio.Semaphore(spec["window"])
        topic = _topic(device_id)

        async def one(seq: int) -> None:
            async with window:
                started = loop.time()
                try:
                    await asyncio.wait_for(device.publish(topic, PAYLOAD % seq), TIMEOUT)
                except Exception as exc:  # noqa: BLE001 - counted, not fatal
                    errors.append(_error(exc).replace(device_id, "<id>"))
                    return
                latencies.append(loop.time() - started)

        await asyncio.gather(*(one(seq) for seq in range(1, spec["messages"] + 1)))

    cpu = server_cpu()
    begin = time.perf_counter()
    await asyncio.gather(*(device_load(d, device_id) for d, (device_id, _) in zip(held, devices, strict=True)))
    wall = time.perf_counter() - begin
    return {"wall": wall, "latencies": latencies, "errors": errors, "server_cpu": server_cpu() - cpu}


__all__ = ["connects", "idle", "seed", "telemetry"]
