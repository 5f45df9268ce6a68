"""``opendps bench``: reproducible throughput, latency and server-cost numbers, as ratios in one run (issue 7).

Each scenario is a function ``(Options) -> list[Result]`` in its own module, named in :data:`SCENARIOS`
and imported only when it runs. :func:`run_bench` runs them in order — a scenario that starts an opendps
server once per ``--workers`` count, its opendps rows saying the count — and then relates rows across
scenarios: provisioning to the crypto ceiling and to cfssl, hub connects to the mTLS handshake ceiling.
The shared machinery (fresh servers, the ready/go load process, /proc readings) is in ``_harness``.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from opendps.bench._harness import BenchError, Options, Result, top_costs

__all__ = ["SCENARIOS", "SERVERLESS", "BenchError", "Options", "Result", "run_bench"]

#: name → "module:function" under opendps.bench, in the order a full run takes them
SCENARIOS: dict[str, str] = {
    "crypto-ceiling": "ceiling:crypto_ceiling",
    "hsm-issue": "hsm:hsm_issue",
    "provision-https": "provisioning:https_symmetric",
    "provision-mqtt": "provisioning:mqtt_symmetric",
    "provision-https-x509": "provisioning:https_x509",
    "provision-mqtt-x509": "provisioning:mqtt_x509",
    "peer-cfssl": "peer:cfssl",
    "hub-connect": "hub:connects",
    "hub-connect-scale": "hub:connects_at_scale",
    "hub-idle": "hub:idle",
    "hub-telemetry": "hub:telemetry",
    "store-scale": "store_scale:store_scale",
}
#: scenarios that start no opendps server (in-process, or a peer alone): run once whatever ``--workers`` says
SERVERLESS = frozenset({"crypto-ceiling", "hsm-issue", "peer-cfssl"})


def scenario(name: str) -> Callable[[Options], list[Result]]:
    module, function = SCENARIOS[name].split(":")
    return getattr(importlib.import_module(f"opendps.bench.{module}"), function)


def _relate(rows: list[Result]) -> None:
    """Ratios across scenarios: opendps ÷ the in-process ceiling, and ÷ cfssl at the same concurrency."""
    ceiling = {r.transport: r.ops_per_cpu_second for r in rows if r.scenario == "crypto-ceiling"}
    cfssl = {r.concurrency: r.ops_per_cpu_second for r in rows if r.system == "cfssl" and r.ops_per_cpu_second}
    for r in rows:
        if r.system != "opendps" or not r.ops_per_cpu_second:
            continue
        if r.scenario.startswith("provision-"):
            if ceiling.get("csr-issue"):
                r.ceiling_ratio = round(r.ops_per_cpu_second / ceiling["csr-issue"], 4)
            if r.concurrency in cfssl:
                r.ratios["cfssl"] = round(r.ops_per_cpu_second / cfssl[r.concurrency], 4)
        elif r.scenario == "hub-connect" and ceiling.get("mtls-handshake"):
            r.ceiling_ratio = round(r.ops_per_cpu_second / ceiling["mtls-handshake"], 4)


def run_bench(names: list[str], opts: Options, log: Callable[[str], None] = lambda _m: None,
              step: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Run the named scenarios in order; the report JSON (rows plus machine and settings).

    A scenario that starts a server runs once per ``opts.worker_counts`` (its servers started with
    ``--workers N``) and its opendps rows get ``workers`` = N; a peer row a scenario reuses for a later count
    (Mosquitto, measured once) is reported once. ``step(description, done, total)`` hears of each run as it starts
    and once more when all are done (the CLI's progress bar).
    """
    rows: list[Result] = []
    seen: set[int] = set()
    took: dict[str, float] = {}  # wall seconds per run, setup and peers included: where a run's time goes
    runs = [(name, workers) for name in names for workers in ((None,) if name in SERVERLESS else opts.worker_counts)]
    for done, (name, workers) in enumerate(runs):
        what = (f"{name}" if workers is None or len(opts.worker_counts) == 1 else f"{name} with --workers {workers}")
        log(f"running {what} ...")
        if step is not None:
            step(what, done, len(runs))
        started = time.monotonic()
        for row in scenario(name)(opts if workers is None else dataclasses.replace(opts, workers=workers)):
            if id(row) in seen:
                continue
            seen.add(id(row))
            if workers is not None and row.system.startswith("opendps"):
                row.workers = workers
            rows.append(row)
        took[what] = round(time.monotonic() - started, 1)
        log(f"{what} took {took[what]:.0f} s")
    if step is not None:
        step("done", len(runs), len(runs))
    _relate(rows)
    from importlib.metadata import version

    return {
        "opendps": version("opendps"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "cpu_model": _cpu_model()},
        "settings": {"quick": opts.quick, "database": "postgresql" if opts.db_url else "sqlite", "lint": opts.lint,
                     "count": opts.device_count, "concurrency": list(opts.concurrency_levels),
                     "workers": list(opts.worker_counts), "rounds": opts.round_count, "scenarios": names},
        "results": [asdict(r) for r in rows],
        "seconds": took,
        **({"profiles": {f.stem: top_costs(f) for f in sorted(opts.profile_dir.glob("*.txt"))}}
           if opts.profile_dir else {}),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
