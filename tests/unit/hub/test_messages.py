"""Telemetry and C2D rules in-process: what a device or the service sends cannot break readers (issue 12.5)."""

from __future__ import annotations

import math

import pytest

from opendps.errors import InvalidInput
from opendps.hub.messaging import time_to_live


def test_an_event_too_deep_to_decode_is_shown_as_text(services):
    hub = services.hubs.get("default")
    deep = b"[" * 30000 + b"]" * 30000
    services.telemetry.append_many([(hub.id, "dev-t1", {}, {}, deep), (hub.id, "dev-t1", {}, {}, b'{"ok": [1]}')])
    first, second = (e.to_wire()["event"]["payload"] for e in services.telemetry.read("default"))
    assert first == deep.decode() and second == {"ok": [1]}


@pytest.mark.parametrize("seconds", [math.inf, -math.inf, math.nan, 1e400, 1e300, 0.5, -5, 2 * 86400 + 1])
def test_a_time_to_live_out_of_range_is_refused_not_overflowed(seconds):
    with pytest.raises(InvalidInput, match="1 second to 2 days"):
        time_to_live(seconds)


def test_a_time_to_live_in_range():
    assert time_to_live(1).total_seconds() == 1 and time_to_live(172800).days == 2
