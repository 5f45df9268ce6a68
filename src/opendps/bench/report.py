"""The report as a rich table (the JSON is the report itself)."""

from __future__ import annotations

from typing import Any


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}" if seconds >= 0.01 else f"{seconds * 1000:.2f}"


def _ratios(r: dict[str, Any]) -> str:
    parts = [] if r["ceiling_ratio"] is None else [f"ceiling {r['ceiling_ratio']:.0%}"]
    parts += [f"{peer} {ratio:.2f}×" for peer, ratio in r["ratios"].items()]
    return ", ".join(parts) or "-"


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    s = report["settings"]
    table = Table(title=f"opendps bench ({s['database']}, lint {'on' if s['lint'] else 'off'}, "
                        f"{report['machine']['cpus']} CPUs)", title_justify="left")
    for col in ("scenario", "system", "workers", "kind", "conc.", "ok/n", "err", "ops/s", "p50 ms", "p95 ms", "p99 ms",
                "CPU ms/op", "ops/CPU-s", "ratios", "peak RSS MB"):
        table.add_column(col, justify="left" if col in ("scenario", "system", "kind", "ratios") else "right")
    for r in report["results"]:
        lat = r["latency"]
        conc = r["concurrency"] if r["concurrency"] else (f"{r['extra']['offered_rate']:g}/s" if "offered_rate" in
                                                           r["extra"] else "-")
        table.add_row(r["scenario"], r["system"], str(r.get("workers") or "-"), r["transport"] or "-", str(conc),
                      f"{r['ok']}/{r['count']}",
                      str(r["errors"]), f"{r['throughput']:.1f}", *(_ms(lat[q]) for q in ("p50", "p95", "p99")),
                      f"{r['cpu_seconds_per_op'] * 1000:.2f}", f"{r['ops_per_cpu_second']:.0f}", _ratios(r),
                      "-" if r["peak_rss_bytes"] is None else f"{r['peak_rss_bytes'] / 2**20:.0f}")
    console = Console(width=200)
    console.print(table)
    printed = set()
    for r in report["results"]:
        notes = {k: v for k, v in r["extra"].items() if k not in ("offered_rate", "attestation")}
        line = f"{r['scenario']} ({r['system']}, {r['transport'] or '-'}): " + ", ".join(
            f"{k} = {v}" for k, v in notes.items())
        if notes and line not in printed:  # the same notes on every level of a scenario are said once
            printed.add(line)
            console.print(line, highlight=False)
    console.print("Provisioning latency is register to issued chain (answered in the register response when the "
                  "registration completes within 1 s, else after a Retry-After: 2 s poll wait); "
                  "CPU ms/op is the server's own CPU per operation (all its processes: with workers, the supervisor's "
                  "and every worker's; peak RSS is their sum) and does not depend on it. "
                  "Ratios: opendps ops per CPU second ÷ the peer's (ceiling = in-process cryptography); hub-connect "
                  f"and hub-telemetry rows pool {s.get('rounds', 1)} loads per system, opendps and Mosquitto taking "
                  "turns (round_ratios: each round's).", highlight=False)
    for label, costs in report.get("profiles", {}).items():
        console.print(f"profile of {label} ({costs['busy_samples']} busy samples): "
                      + "; ".join(f"{name} {share:.0%}" for name, share in costs["components"].items()), highlight=False)
        console.print("  top opendps functions (inclusive): "
                      + "; ".join(f"{name} {share:.0%}" for name, share in costs["functions"].items()), highlight=False)
    for r in report["results"]:
        for e in r["error_samples"]:
            workers = f" workers={r['workers']}" if r.get("workers") else ""
            console.print(f"[red]{r['scenario']} c={r['concurrency']}{workers}: {e['count']} ×[/red] {e['message']}",
                          highlight=False)
