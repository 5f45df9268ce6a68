"""``opendps status``: the service on one screen — a client of ``GET /status`` (docs/api.md, "Service status"), the
same numbers as the dashboard's top row. ``-o json`` (or yaml, tsv) prints the document as the server sent it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from opendps.cli import output_option
from opendps.cli._client import Client
from opendps.cli.management import lazy_api_command
from opendps.cli.output import emit, terminal_safe


def register(main: click.Group) -> None:
    main.add_command(status)


@click.command("status")
@click.option("--refusals", "refusals", type=click.IntRange(0, 100), default=5, show_default=True,
              help="How many recent refusals to list.")
@lazy_api_command(output=output_option(default="table"))
def status(connect: Callable[[], Client], output: str, refusals: int) -> None:
    """A one-screen summary: namespaces and policies, enrollments, devices provisioned and connected now, certificates
    expiring within 7 and 30 days, registrations and refusals of the last hour, the latest refusals."""
    data = connect().exchange("GET", "/status", params={"refusals": str(refusals)})[0] or {}
    if output != "table":
        emit(data, output)
        return
    print_status(data)


def _n(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def status_lines(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) rows of the summary."""
    e, d, c, r, f = (data.get(k, {}) for k in ("enrollments", "devices", "certificates", "registrations", "refusals"))
    return [
        ("configuration", f"{_n(data.get('namespaces', 0))} namespaces, {_n(data.get('policies', 0))} policies, "
                          f"{_n(data.get('linkedHubs', 0))} linked hubs"),
        ("enrollments", f"{_n(e.get('individual', 0))} individual, {_n(e.get('groups', 0))} groups"
                        + (f" ({_n(e['disabled'])} disabled)" if e.get("disabled") else "")),
        ("devices", f"{_n(d.get('provisioned', 0))} provisioned, {_n(d.get('connected', 0))} connected now"),
        ("certificates", f"{_n(c.get('valid', 0))} valid; {_n(c.get('expiringIn7Days', 0))} expire within 7 days, "
                         f"{_n(c.get('expiringIn30Days', 0))} within 30"),
        ("last hour", f"{_n(r.get('lastHour', 0))} registrations ({_n(r.get('assignedLastHour', 0))} assigned, "
                      f"{_n(r.get('failedLastHour', 0))} failed), {_n(f.get('lastHour', 0))} refusals"),
    ]


def print_status(data: dict[str, Any]) -> None:
    """The summary for a person: rich on a terminal (colour), plain text when piped."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    console.print(f"[bold]opendps status[/bold]  {data.get('time', '')}")
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    for label, text in status_lines(data):
        warn = label == "certificates" and (data.get("certificates") or {}).get("expiringIn7Days")
        summary.add_row(label, f"[yellow]{text}[/yellow]" if warn else text)
    console.print(summary)
    recent = (data.get("refusals") or {}).get("recent") or []
    if recent:
        console.print("[bold]recent refusals[/bold]")
        for line in refusal_lines(recent, console.width):
            console.print(line, markup=False)


def refusal_lines(recent: list[dict[str, Any]], width: int = 80) -> list[str]:
    """One line per refusal — time, who, reason in aligned columns, then the message shortened to the width. The id
    is the one the refused device sent, whatever it was (an ESC, a bell): shown escaped (:func:`terminal_safe`)."""
    rows = []
    for row in recent:
        who = f"{row.get('id', '')}@{row['hub']}" if row.get("hub") else str(row.get("id", ""))
        kind = "hub" if row.get("kind") == "hubConnect" else "dps"
        rows.append((str(row.get("time", ""))[11:19], terminal_safe(f"{kind} {who}"),
                     terminal_safe(str(row.get("reason", ""))),
                     terminal_safe(" ".join(str(row.get("message", "")).split()))))
    who_w = max(len(r[1]) for r in rows)
    reason_w = max(len(r[2]) for r in rows)
    lines = []
    for when, who, reason, message in rows:
        head = f"  {when}  {who:<{who_w}}  {reason:<{reason_w}}  "
        room = max(20, width - len(head))
        lines.append(head + (message if len(message) <= room else message[:room - 1] + "…"))
    return lines
