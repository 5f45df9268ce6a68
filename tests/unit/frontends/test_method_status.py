"""A direct method's status as the device's response topic gives it."""

from __future__ import annotations

import pytest

from opendps.frontends.mqtt.hub import method_status


@pytest.mark.parametrize(("text", "status"), [("200", 200), ("0", 0), ("-1", -1), ("404", 404),
                                              ("999999999", 999999999)])
def test_plain_decimals_are_the_status(text, status):
    assert method_status(text) == status


@pytest.mark.parametrize("text", ["", "abc", "1_000", " 5", "5 ", "+5", "\u0663", "2.0", "1e3",
                                  "9999999999", "99999999999999999999", "--1", "-"])
def test_anything_else_is_500(text):
    """``int`` reads several of these (underscores, spaces, Arabic-Indic digits, numbers no 32-bit int holds)."""
    assert method_status(text) == 500
