"""az's output rules for ``-o tsv`` (scripts depend on them) and the ``--query`` compile error."""

from __future__ import annotations

import click
import pytest

from opendps.cli.output import compile_query, tsv_lines


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
