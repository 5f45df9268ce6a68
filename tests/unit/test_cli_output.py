"""az's output rules for ``-o tsv`` (scripts depend on them), the ``--query`` compile error, and what a table or
``opendps status`` hands the terminal when a device chose the text."""

from __future__ import annotations

import click
import pytest

from opendps.cli.output import compile_query, print_table, tsv_lines
from opendps.cli.status import refusal_lines


def test_tsv_is_one_line_per_item_with_scalars_only():
    doc = {"name": "a", "enabled": True, "missing": None, "nested": {"x": 1}, "tags": ["t"], "count": 3}
    assert tsv_lines(doc) == ["a\tTrue\t\t3"]
    assert tsv_lines([doc, {"name": "b\tc"}]) == ["a\tTrue\t\t3", "b c"]
    assert tsv_lines(["x", 2, None]) == ["x", "2", ""]
    assert tsv_lines("scope") == ["scope"]
    assert tsv_lines([["a", "b", {"skip": 1}]]) == ["a\tb"]


def test_a_bad_query_is_a_usage_error_naming_the_option():
    assert compile_query("[].name").search([{"name": "n"}]) == ["n"]
    with pytest.raises(click.BadParameter, match="not a valid JMESPath expression"):
        compile_query("[?name==")


# what a hostile device can make the service store and a table show: its reported properties (a twin shown with
# --query properties.reported -o table), or the client id of a refused CONNECT (the refusal log)
HOSTILE = "[/bold] [link=https://evil.example]x[/link] \x1b[2J\x1b]0;PWNED\x07 \u202e"


def test_a_table_shows_a_devices_text_as_written_never_as_markup_or_terminal_control(capsys):
    """Rich markup in a cell was obeyed (a hyperlink planted; ``[/bold]`` alone was a MarkupError traceback) and an
    ESC went to the terminal raw; both are shown as written now, control characters escaped."""
    print_table([{"fw": HOSTILE, HOSTILE: "key"}])
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "[/bold] [link=https://evil.example]x[/link]" in out  # in the header and in the cell
    assert out.count("\\x1b[2J\\x1b]0;PWNED\\x07") == 2 and "\\u202e" in out


def test_status_refusal_lines_escape_the_refused_devices_id():
    """A refusal's id is whatever the refused device sent: ``opendps status`` printed its ESC sequences raw."""
    lines = refusal_lines([{"time": "2026-01-01T00:00:00Z", "kind": "hubConnect", "hub": "localhost",
                            "id": "evil\x1b[2J\x1b[31m", "reason": "unknown_device",
                            "message": "device 'evil\\x1b[2J' does not exist"}], 200)
    assert len(lines) == 1 and "\x1b" not in lines[0]
    assert "hub evil\\x1b[2J\\x1b[31m@localhost" in lines[0]
