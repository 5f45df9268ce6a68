"""Output helpers shared by CLI verbs: JSON (default) and rich tables."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.console import Console
from rich.table import Table


def emit(data: Any, output: str, columns: list[str] | None = None) -> None:
    """Print ``data`` (a dict or list of dicts) as JSON or as a table of ``columns``."""
    if output == "json":
        click.echo(json.dumps(data, indent=2))
        return
    rows = data if isinstance(data, list) else [data]
    print_table([_flatten(r) for r in rows], columns)


def _flatten(row: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(row, dict):
        return {prefix or "value": row}
    out: dict[str, Any] = {}
    for k, v in row.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _cell(value: Any) -> str:
    """A table cell: nothing for None, lists as comma-separated items (not Python's ['a', 'b'])."""
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    return str(value)


def print_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    table = Table(show_header=True, header_style="bold")
    for c in columns:
        table.add_column(c.split(".")[-1] if c.count(".") > 1 else c, overflow="fold")
    for r in rows:
        table.add_row(*[_cell(r.get(c)) for c in columns])
    Console(width=200).print(table)
