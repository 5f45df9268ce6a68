"""``opendps bench``: the command line over :mod:`opendps.bench` (scenarios, harness and report live there)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from opendps.bench import SCENARIOS, BenchError, Options, run_bench
from opendps.cli import CliError, output_option
from opendps.cli.output import emit


@click.command("bench")
@click.option("--quick", is_flag=True, default=False, help="Small counts and one concurrency level (under 3 minutes).")
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
@click.option("--workers", "worker_counts", multiple=True, type=click.IntRange(1, 256),
              help="Start the servers with opendps serve --workers N and run each scenario that starts one once per "
              "N (repeatable; default 1). CPU and peak RSS are summed over the supervisor and its workers.")
@click.option("--rounds", type=click.IntRange(1, 100), default=None,
              help="Loads per system where opendps and Mosquitto take turns (hub-connect, hub-telemetry; default 3 "
              "with --quick, else 5): rows pool their rounds, the opendps row lists each round's ratio.")
@click.option("--no-lint", is_flag=True, default=False, help="Start the servers with --no-lint (pre-issuance checks off).")
@click.option("--profile", "profile_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Sample every opendps server with py-spy into this directory and report its top costs.")
@output_option(default="table")
def bench(quick: bool, json_path: Path | None, db_url: str | None, scenarios: tuple[str, ...], count: int | None,
          levels: tuple[int, ...], worker_counts: tuple[int, ...], rounds: int | None, no_lint: bool, profile_dir: Path | None,
          output: str) -> None:
    """Benchmark opendps against fresh local servers and peers; exit 1 if any operation failed."""
    if not Path("/proc/self/stat").exists():
        raise CliError("opendps bench reads server CPU from /proc and needs Linux")
    counts = tuple(dict.fromkeys(worker_counts)) or (1,)  # in the order given, each once
    opts = Options(quick=quick, db_url=db_url, lint=not no_lint, count=count, levels=levels or None,
                   profile_dir=profile_dir, worker_counts=counts, workers=counts[0], rounds=rounds)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    # a bar on a terminal only, and only for the table output (never with -o json/yaml/tsv, never when piped)
    shown = console.is_terminal and output == "table"
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not shown, transient=True) as bar:
        task = bar.add_task("bench", total=None)

        def step(what: str, done: int, total: int) -> None:
            bar.update(task, description=f"bench: {what}", completed=done, total=total)

        def log(message: str) -> None:
            if shown:
                bar.console.print(message, highlight=False)  # above the bar
            else:
                click.echo(message, err=True)

        try:
            report = run_bench(list(scenarios) or list(SCENARIOS), opts, log=log, step=step)
        except BenchError as exc:
            raise CliError(str(exc)) from exc
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    if output != "table":
        emit(report, output)
    else:
        from opendps.bench.report import print_report

        print_report(report)
    failed = sum(r["errors"] for r in report["results"])
    if failed:
        raise CliError(f"{failed} operations failed (see error samples)")


def register(main: click.Group) -> None:
    """Attach ``opendps bench``."""
    main.add_command(bench)
