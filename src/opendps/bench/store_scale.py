"""Scale of the store: registration latency and server CPU with 1k and with 1M existing devices (issue 7).

Why: every registration reads and writes indexed rows (registration state, hub identity, ADR record,
issued certificate, operation); if a lookup were a scan, or an index stopped fitting in cache, cost per
registration would grow with the fleet. The same load is run against two fresh servers that differ only
in how many registered devices the store already holds, and the large one is divided by the small one.

Seeding happens before the server starts (``running_server(before_start=...)``): the namespace, policy
and symmetric-key group are created through the domain code (as the API would), then per existing
device the rows one real registration writes (see ``Provisioning._commit``) are bulk-inserted in one
transaction with unique, realistic values and every index in place: ``registrations``, ``hub_devices``
(identity + twin), ``device_records`` (ADR), ``issued_certificates`` (one real leaf's DER reused; serial
and SHA-256 unique) and, for the share registered within the last 24 h, ``operations``. SQLite: Core
``insert()`` executemany with ``synchronous=OFF`` on the seeding connection only; PostgreSQL: COPY.

Measured per store: registrations of new devices, then re-registrations of seeded devices (the update
paths: existing registration, identity and record), each over HTTPS with a P-384 CSR.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import secrets
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from opendps.bench._harness import Options, Result, load_row, run_load, running_server, warm_up_count
from opendps.bench.provisioning import NAMESPACE, POLICY, SYMMETRIC_GROUP, _load_worker, prepare_devices

SCENARIO = "store-scale"
QUICK_SIZES, FULL_SIZES = (1_000, 3_000), (1_000, 1_000_000)  # quick: a smoke run (the tests)
CONCURRENCY = 8
QUICK_NEW, FULL_NEW = 16, 200  # new registrations per store
QUICK_AGAIN, FULL_AGAIN = 8, 48  # re-registrations of seeded devices per store
SEED_PREFIX = "seed"
SPREAD = dt.timedelta(days=30)  # seeded registrations are spread over the last 30 days ...
RECENT = dt.timedelta(hours=23)  # ... and those within this window (inside the 24 h TTL) still have an operation
BATCH = 20_000


def store_scale(opts: Options) -> list[Result]:
    """Per store size: one row of new registrations and one of re-registrations; the large rows get the ratios."""
    sizes = QUICK_SIZES if opts.quick else FULL_SIZES
    level = opts.levels[0] if opts.levels else CONCURRENCY
    new = opts.count or (QUICK_NEW if opts.quick else FULL_NEW)
    again = QUICK_AGAIN if opts.quick else FULL_AGAIN
    group_key = base64.b64encode(secrets.token_bytes(64)).decode()
    rows: list[Result] = []
    for existing in sizes:
        seeded: dict[str, Any] = {}

        def before_start(env: dict[str, str], n: int = existing, out: dict[str, Any] = seeded) -> None:
            out.update(seed(env, n, group_key, lint=opts.lint))

        with running_server(opts.db_url, opts.lint, before_start=before_start,
                            profile=opts.profile(f"{SCENARIO}-{existing}"), workers=opts.workers) as server, \
                tempfile.TemporaryDirectory() as tmp:
            base = {"ca_file": str(server.ca_file), "id_scope": server.id_scope, "https_port": server.https_port,
                    "mqtt_port": server.mqtt_port, "transport": "https", "concurrency": level}
            # warm-up, not recorded: first-use imports (pkilint) and the first operations sweep land here (every worker)
            run_load(_load_worker, {**base, "devices": prepare_devices(group_key, f"warm{existing}",
                                                                       warm_up_count(2, opts.workers), Path(tmp))},
                     server.pid)
            for kind, devices in (
                    ("new", prepare_devices(group_key, f"new{existing}", new, Path(tmp))),
                    ("re-register", _spread(group_key, existing, min(again, existing)))):
                outcome, cpu = run_load(_load_worker, {**base, "devices": devices}, server.cpu_seconds)
                rows.append(load_row(SCENARIO, "https", level, len(devices), outcome, cpu, server.pid,
                                     existing=existing, registration=kind, **seeded))
    _ratios(rows, sizes)
    return rows


def _spread(group_key: str, existing: int, count: int) -> list[dict[str, Any]]:
    """Seeded devices to re-register, spread over the whole id range (not only the first, most cached rows)."""
    from opendps.device.keys import derive_device_key, new_key_and_csr

    step = max(1, existing // max(1, count))
    return [{"rid": rid, "csr": new_key_and_csr(rid, "P-384")[1], "symmetric_key": derive_device_key(group_key, rid)}
            for rid in (f"{SEED_PREFIX}-{i * step}" for i in range(count))]


def _ratios(rows: list[Result], sizes: tuple[int, int]) -> None:
    """On each large-store row: ``ratios["1k"]`` = ops per CPU-second ÷ the small store's, and the p50 ratio."""
    small, large = sizes
    for kind in ("new", "re-register"):
        pair = [next((r for r in rows if r.extra["registration"] == kind and r.extra["existing"] == n), None)
                for n in (small, large)]
        lo, hi = pair
        if lo is None or hi is None:
            continue
        if lo.ops_per_cpu_second and hi.ops_per_cpu_second:
            hi.ratios[_label(small)] = round(hi.ops_per_cpu_second / lo.ops_per_cpu_second, 4)
        if lo.latency["p50"] and hi.latency["p50"]:
            hi.extra["p50_ratio"] = round(hi.latency["p50"] / lo.latency["p50"], 4)


def _label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


# ---------------------------------------------------------------- seeding


@contextlib.contextmanager
def seeded_fleet(env: dict[str, str], group_key: str, *, lint: bool) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Open the instance ``opendps init`` made, create the fleet through the domain code (namespace, policy,
    symmetric-key group on it — which also makes the default hub trust the policy's issuing CA), and yield
    (instance, the ids and CA material the bulk rows refer to). Shared by every scenario that seeds."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from opendps.hub import DEFAULT_HUB
    from opendps.instance import Settings, open_instance
    from opendps.provisioning.enrollments import GROUP

    settings = Settings.load(Path(env["OPENDPS_DATA_DIR"]), db=env["OPENDPS_DB"], lint=lint)
    inst = open_instance(settings, create=False)
    services = inst.services
    try:
        services.registry.create_namespace(NAMESPACE, POLICY)
        view, _ = services.enrollments.put(GROUP, SYMMETRIC_GROUP, {
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": group_key, "secondaryKey": group_key}},
            "credentialPolicyName": POLICY})
        assert view.policy_id is not None
        issuer = services.registry.issuer(view.policy_id)
        hub = services.hubs.get(DEFAULT_HUB)
        ids = {"policy_id": issuer.policy_id, "namespace_id": services.registry.namespace_of(issuer.policy_id),
               "issuing_ca_id": issuer.ca_id, "issuing_key_id": issuer.key_id,
               "issuing_der": issuer.certificate.public_bytes(Encoding.DER), "root_der": issuer.root.public_bytes(Encoding.DER),
               "days": issuer.validity_days, "hub_id": hub.id, "hub_host": hub.host_name, "issuer": issuer}
        yield inst, ids
    finally:
        inst.close()


def seed(env: dict[str, str], existing: int, group_key: str, *, lint: bool) -> dict[str, Any]:
    """The fleet, then ``existing`` registered devices in bulk; what the row reports (seconds, operations)."""
    with seeded_fleet(env, group_key, lint=lint) as (inst, ids):
        template = _template(inst, ids)
        started = time.perf_counter()
        operations = _insert_all(inst.store.engine, template, existing)
        return {"seed_seconds": round(time.perf_counter() - started, 2), "seeded_operations": operations}


def _template(inst: Any, ids: dict[str, Any]) -> dict[str, Any]:
    """The fleet's ids plus one real leaf (signed by the policy's issuing CA) whose DER the seeded rows reuse."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from opendps.device.keys import csr_b64, generate_key, make_csr
    from opendps.pki import IssuanceEngine

    rid = "seed-template"
    chain = IssuanceEngine(inst.store, inst.keys, lint=False).issue(
        ids["issuer"], base64.b64decode(csr_b64(make_csr(generate_key("P-384"), rid))), rid)
    return {**ids, "der": chain.leaf.public_bytes(Encoding.DER),
            "chain_b64": [base64.b64encode(d).decode() for d in chain.der_chain()]}


#: columns written per table, in the order :func:`_device_rows` fills them
COLUMNS = {
    "registrations": ("registration_key", "registration_id", "enrollment_kind", "enrollment_id", "attestation_type",
                      "device_id", "assigned_hub", "status", "substatus", "certificate_serial", "etag", "created_at",
                      "updated_at"),
    "hub_devices": ("hub_id", "device_id", "device_key", "auth_type", "status", "generation_id", "etag", "twin_tags",
                    "twin_desired", "twin_reported", "desired_version", "reported_version", "created_at",
                    "updated_at"),
    "device_records": ("namespace_id", "device_id", "device_key", "registration_id", "hub_host_name", "policy_id",
                       "certificate_serial", "certificate_sha256", "certificate_not_after", "etag", "created_at",
                       "updated_at"),
    "issued_certificates": ("serial", "sha256", "der", "policy_id", "issuing_ca_id", "registration_id", "not_before",
                            "not_after", "created_at"),
    "operations": ("operation_id", "registration_key", "status", "result", "created_at"),
}


def _insert_all(engine: Any, t: dict[str, Any], existing: int) -> int:
    """Insert every seeded row in one transaction, BATCH devices at a time; the number of operations seeded.

    Rows are built as driver-ready tuples (timestamps in SQLAlchemy's SQLite text format, JSON pre-encoded):
    SQLAlchemy's per-value bind processing was two thirds of the seeding time at 1M devices.
    """
    sqlite = engine.dialect.name == "sqlite"
    operations = 0
    with engine.connect() as conn:
        if sqlite:  # this connection only; the server opens its own
            conn.exec_driver_sql("PRAGMA synchronous=OFF")
            conn.exec_driver_sql("PRAGMA cache_size=-1048576")  # 1 GiB: random-order unique indexes stay in memory
            conn.commit()
        with conn.begin():
            for start in range(0, existing, BATCH):
                batch = _device_rows(t, start, min(existing, start + BATCH), existing, sqlite=sqlite)
                operations += len(batch["operations"])
                for table, rows in batch.items():
                    if rows:
                        _bulk(conn, table, rows, sqlite=sqlite)
    return operations


def _bulk(conn: Any, table: str, rows: list[tuple[Any, ...]], *, sqlite: bool) -> None:
    """executemany on SQLite; COPY on PostgreSQL (several times faster than INSERT there)."""
    columns = COLUMNS[table]
    if sqlite:
        conn.exec_driver_sql(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                             rows)
        return
    cursor = conn.connection.driver_connection.cursor()
    with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def _hex(count: int, nbytes: int) -> Iterator[str]:
    blob = os.urandom(count * nbytes).hex()
    width = nbytes * 2
    return (blob[i:i + width] for i in range(0, len(blob), width))


def _etags(count: int) -> Iterator[str]:
    """Like :func:`opendps.ids.new_etag` (base64 of 8 random bytes), drawn in bulk."""
    blob = os.urandom(count * 8)
    return (base64.b64encode(blob[i:i + 8]).decode() for i in range(0, len(blob), 8))


def registered_device(t: dict[str, Any], rid: str, *, serial: str, sha256: str, der: bytes, not_before: Any,
                      not_after: Any, created: Any, etags: tuple[str, str, str], generation: str,
                      reported: str = "{}") -> tuple[tuple[Any, ...], ...]:
    """The rows one group registration with an issued certificate leaves (``Provisioning._commit``), in
    :data:`COLUMNS` order: registration, hub identity with its twin, ADR record, issued certificate.
    Timestamps already in the driver's form."""
    host = t["hub_host"]
    return ((rid, rid, "group", SYMMETRIC_GROUP, "symmetricKey", rid, host, "assigned", "initialAssignment", serial,
             etags[0], created, created),
            (t["hub_id"], rid, rid, "certificateAuthority", "enabled", generation, etags[1], "{}", "{}", reported,
             1, 2 if reported != "{}" else 1, created, created),
            (t["namespace_id"], rid, rid, rid, host, t["policy_id"], serial, sha256, not_after, etags[2], created,
             created),
            (serial, sha256, der, t["policy_id"], t["issuing_ca_id"], rid, not_before, not_after, created))


def _device_rows(t: dict[str, Any], start: int, stop: int, existing: int, *,
                 sqlite: bool) -> dict[str, list[tuple[Any, ...]]]:
    """Rows of devices ``start`` … ``stop - 1`` per table, as one registration writes them."""
    now = dt.datetime.now(dt.UTC)
    count = stop - start
    rows: dict[str, list[tuple[Any, ...]]] = {name: [] for name in COLUMNS}
    regs, devices, records, certs, ops = rows.values()
    serials, digests, generations, etags = _hex(count, 16), _hex(count, 32), _hex(count, 8), _etags(3 * count)
    # SQLite: SQLAlchemy's DATETIME text format, in UTC; PostgreSQL: aware datetimes for COPY
    ts = (lambda d: d.strftime("%Y-%m-%d %H:%M:%S.%f")) if sqlite else (lambda d: d)
    reported = json.dumps({"firmwareVersion": "1.4.2", "telemetryIntervalSeconds": 60})
    for i in range(start, stop):
        rid = f"{SEED_PREFIX}-{i}"
        created = now - SPREAD * (existing - i) / existing
        c = ts(created)
        reg, device, record, cert = registered_device(
            t, rid, serial=format(int(next(serials), 16) | 1 << 127, "x"), sha256=next(digests), der=t["der"],
            not_before=ts(created - dt.timedelta(minutes=5)), not_after=ts(created + dt.timedelta(days=30)),
            created=c, etags=(next(etags), next(etags), next(etags)), generation=next(generations), reported=reported)
        regs.append(reg)
        devices.append(device)
        records.append(record)
        certs.append(cert)
        if now - created <= RECENT:
            ops.append(_operation(t, rid, created, c))
    return rows


def _operation(t: dict[str, Any], rid: str, created: dt.datetime, stamp: Any) -> tuple[Any, ...]:
    """An ``operations`` row as ``Provisioning._commit`` stores it (the poll's answer, with the issued chain)."""
    from opendps.ids import new_etag
    from opendps.provisioning.registration import new_operation_id
    from opendps.transport.wire import iso8601

    op = new_operation_id()
    iso = iso8601(created)
    state = {"registrationId": rid, "createdDateTimeUtc": iso, "assignedHub": t["hub_host"], "deviceId": rid,
             "status": "assigned", "substatus": "initialAssignment", "lastUpdatedDateTimeUtc": iso,
             "etag": new_etag(), "symmetricKey": {"enrollmentGroupId": SYMMETRIC_GROUP},
             "issuedCertificateChain": t["chain_b64"]}
    return op, rid, "assigned", json.dumps({"operationId": op, "status": "assigned", "registrationState": state}), stamp
