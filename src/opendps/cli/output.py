"""How CLI verbs print their result: az's output formats (json, table, tsv, yaml, none) after ``--query``.

The verb hands :func:`emit` the service's JSON answer; ``--query`` (JMESPath, as az) runs first, so scripts
written for az (``--query "[].deviceId" -o tsv``) port over.
"""

from __future__ import annotations

import json
from typing import Any

import click
import jmespath
import yaml
from jmespath.exceptions import JMESPathError
from jmespath.parser import ParsedResult
from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = ["compile_query", "emit", "print_table", "terminal_safe", "tsv_lines"]


def compile_query(expression: str) -> ParsedResult:
    """A JMESPath expression, compiled once; a syntax error is a usage error naming the problem."""
    try:
        return jmespath.compile(expression)
    except JMESPathError as exc:
        message = " ".join(str(exc).split())
        raise click.BadParameter(f"not a valid JMESPath expression: {message}", param_hint="'--query'") from exc


def _query(data: Any) -> tuple[Any, bool]:
    """``data`` after the running command's ``--query`` (if any), and whether one was applied."""
    from opendps.cli import QUERY_META

    ctx = click.get_current_context(silent=True)
    compiled = ctx.meta.get(QUERY_META) if ctx is not None else None
    if compiled is None:
        return data, False
    try:
        return compiled.search(data), True
    except JMESPathError as exc:  # e.g. a function applied to the wrong type
        from opendps.cli import CliError

        # jmespath quotes the whole value it could not use (a list's item: a twin, an enrollment): cut to a line
        message = " ".join(str(exc).split())
        raise CliError(f"--query failed on this result: {message[:300]}{'...' if len(message) > 300 else ''}") from exc


def emit(data: Any, output: str, columns: list[str] | None = None) -> None:
    """Print ``data`` (the answer: a dict, a list or a scalar) in ``output`` format after ``--query``.

    ``columns`` choose the table's columns; after a ``--query`` the table shows what the query kept.
    """
    data, queried = _query(data)
    if output == "none":
        return
    if output == "json":
        click.echo(json.dumps(data, indent=2))
    elif output == "yaml":
        click.echo(yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False), nl=False)
    elif output == "tsv":
        for line in tsv_lines(data):
            click.echo(line)
    else:
        rows = data if isinstance(data, list) else [data]
        print_table([_flatten(r) for r in rows], None if queried else columns)


def _tsv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)  # True/False, as az prints them
    return str(value).replace("\t", " ").replace("\n", " ")


def tsv_lines(data: Any) -> list[str]:
    """az's tsv: one line per list item, an object's scalar values tab-separated in order (nested objects and
    lists are left out), a list of scalars one per line, a scalar alone."""
    items = data if isinstance(data, list) else [data]
    lines = []
    for item in items:
        if isinstance(item, dict):
            lines.append("\t".join(_tsv_value(v) for v in item.values() if not isinstance(v, dict | list)))
        elif isinstance(item, list):
            lines.append("\t".join(_tsv_value(v) for v in item if not isinstance(v, dict | list)))
        else:
            lines.append(_tsv_value(item))
    return lines


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


def terminal_safe(text: str) -> str:
    """``text`` as a terminal may be handed it: each character that is not printable (an ESC starting a control
    sequence, a bell, a bidi override, a lone surrogate) written as its escape (``\\x1b``), line breaks kept. What a
    table shows can come from a device (a refusal's id, a reported property), and a raw ESC would let it clear the
    screen, retitle the window or plant a hyperlink in the operator's terminal."""
    from opendps.audit.chain import printable

    return printable(text, None, keep="\n")


def _cell(value: Any) -> str:
    """A table cell: nothing for None, lists as comma-separated items (not Python's ['a', 'b'])."""
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    return str(value)


def print_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    """The rows as a table; headers and cells are plain text (``Text``), never rich markup: ``[link=...]`` or
    ``[/]`` in a value (a device picks its reported properties) is shown as written, not obeyed or an error."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    table = Table(show_header=True, header_style="bold")
    for c in columns:
        table.add_column(Text(terminal_safe(c.split(".")[-1] if c.count(".") > 1 else c)), overflow="fold")
    for r in rows:
        table.add_row(*[Text(terminal_safe(_cell(r.get(c)))) for c in columns])
    Console(width=200).print(table)
