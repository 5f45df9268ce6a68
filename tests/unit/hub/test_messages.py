"""Telemetry and C2D rules in-process: what a device or the service sends cannot break readers (issue 12.5)."""

from __future__ import annotations

import math

import pytest

from opendps.errors import InvalidInput
from opendps.hub.messaging import time_to_live
from opendps.hub.telemetry import parse_property_bag


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


def test_a_message_id_the_column_cannot_hold_is_refused(services):
    """``iothub-messageid`` is at most 128 printable ASCII characters (IoT Hub's limit and the column's): longer was
    stored on SQLite and PostgreSQL's DataError (a 500) there."""
    services.hubs.create_device("default", "c2d-id")
    for bad in ("m" * 129, "a\x00b", "caf\u00e9"):
        with pytest.raises(InvalidInput, match="message id must be at most 128"):
            services.c2d.enqueue("default", "c2d-id", b"x", system={"message-id": bad})
    assert services.c2d.enqueue("default", "c2d-id", b"x", system={"message-id": "m" * 128}).message_id == "m" * 128


def test_a_time_to_live_in_range():
    assert time_to_live(1).total_seconds() == 1 and time_to_live(172800).days == 2


def test_property_bags_parse_alike_cached_or_not_and_each_caller_owns_its_dicts():
    sdk = "%24.ct=application%2Fjson&%24.ce=utf-8&alert=high%20temp&flag"
    expected = ({"content-type": "application/json", "content-encoding": "utf-8"}, {"alert": "high temp", "flag": None})
    first = parse_property_bag(sdk)
    assert first == expected
    first[0]["content-type"] = "changed"  # a caller's change does not reach the next message with the same bag
    first[1].clear()
    assert parse_property_bag(sdk) == expected
    long = sdk + "&" + "&".join(f"k{i}=v%20{i}" for i in range(60))  # past the cached size: parsed each time
    system, application = parse_property_bag(long)
    assert system == expected[0] and application["k59"] == "v 59" and len(application) == 62
