"""Hubs.replace_twin (twin PUT) and Hubs.query (POST /devices/query) on the store, SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from opendps.errors import InvalidInput, NotFound, PayloadTooLarge, PreconditionFailed
from opendps.hub import registry
from opendps.hub.registry import merge_diff


def twin_of(d):
    return d.twin()


def test_merge_diff_turns_old_into_new_under_a_merge_patch():
    old = {"a": 1, "b": {"x": 1, "y": 2}, "c": True, "d": [1, 2], "e": {"k": 1}}
    new = {"a": 1, "b": {"x": 1, "z": 3}, "c": 1, "d": [1, 2], "e": 5, "f": {"g": 0}}
    patch = merge_diff(old, new)
    assert patch == {"b": {"y": None, "z": 3}, "c": 1, "e": 5, "f": {"g": 0}}  # True -> 1 is a change
    assert registry.merge_patch(old, patch, "x") == new
    assert merge_diff(new, new) == {}


def test_replace_twin_replaces_tags_and_desired_wholesale(services):
    hubs = services.hubs
    hubs.create_device("default", "rep-1")
    before = hubs.update_twin("default", "rep-1", tags={"site": "lab", "keep": 1}, desired={"a": 1, "b": {"x": 1}})
    hub_id = hubs.get("default").id
    hubs.patch_reported(hub_id, "rep-1", {"fw": "1.0"})
    ident, change = hubs.replace_twin("default", "rep-1", tags={"site": "plant"},
                                      desired={"b": {"y": 2}, "c": 3, "$version": 99, "$metadata": {"x": 1}})
    assert ident.tags == {"site": "plant"}  # "keep" is gone: replaced, not merged
    assert ident.desired == {"b": {"y": 2}, "c": 3}
    assert ident.desired_version == before.desired_version + 1
    assert ident.reported == {"fw": "1.0"} and ident.etag != before.etag
    assert change == {"a": None, "b": {"x": None, "y": 2}, "c": 3}
    # absent (or null) members are emptied; null members inside are dropped
    emptied, change = hubs.replace_twin("default", "rep-1", desired={"d": None, "e": 1}, if_match=ident.etag)
    assert emptied.tags == {} and emptied.desired == {"e": 1}
    assert change == {"b": None, "c": None, "e": 1}
    assert hubs.get_device("default", "rep-1").twin()["properties"]["desired"] == {"e": 1, "$version": 4}


def test_twin_property_names_follow_iot_hubs_rule_and_values_are_text(services):
    """IoT Hub refuses names with '.', '$', a space or a C0/C1 control character, and names over 1 KB; a lone
    surrogate is not text (no database stores it): each refused by name, in tags, desired and reported alike. (Values
    that are not text are refused where every JSON document is read: tests/unit/test_wire_json.py.)"""
    hubs = services.hubs
    hubs.create_device("default", "names-1")
    hub_id = hubs.get("default").id
    for bad in ("a.b", "a$b", "a b", "a\x00", "a\x1f", "a\x7f", "a\x85", "\ud800", "", "k" * 1025, "é" * 513):
        for kwargs in ({"tags": {bad: 1}}, {"desired": {"ok": {bad: 1}}}):
            with pytest.raises(InvalidInput, match="reserved or invalid"):
                hubs.replace_twin("default", "names-1", **kwargs)
        with pytest.raises(InvalidInput, match="reserved or invalid"):
            hubs.patch_reported(hub_id, "names-1", {bad: 1})
    fine = {"k" * 1024: 1, "é" * 512: "\U0001f600", "température_°C": {"niveau-2_x": "ok"}}
    replaced, _ = hubs.replace_twin("default", "names-1", tags=fine)
    assert replaced.tags == fine
    hubs.patch_reported(hub_id, "names-1", fine)
    assert hubs.get_device("default", "names-1").reported == fine


def test_replace_twin_refusals(services):
    hubs = services.hubs
    ident, _ = hubs.create_device("default", "rep-2")
    with pytest.raises(PreconditionFailed, match="does not match the twin of 'rep-2'"):
        hubs.replace_twin("default", "rep-2", tags={}, if_match='"stale"')
    for kwargs, words in (({"tags": [1]}, "tags must be a JSON object"),
                          ({"desired": "x"}, "desired properties must be a JSON object"),
                          ({"desired": {"$own": 1}}, "reserved or invalid"),
                          ({"tags": {"a": {"$b": 1}}}, "reserved or invalid"),
                          ({"desired": _nested(12)}, "nested more than 10 levels")):
        with pytest.raises(InvalidInput, match=words):
            hubs.replace_twin("default", "rep-2", **kwargs)
    hubs.replace_twin("default", "rep-2", desired=_nested(11))  # ten levels under desired are allowed
    with pytest.raises(PayloadTooLarge, match="tags would exceed"):
        hubs.replace_twin("default", "rep-2", tags={"big": "x" * 9000})
    with pytest.raises(NotFound, match="does not exist"):
        hubs.replace_twin("default", "rep-none", tags={})
    assert hubs.get_device("default", "rep-2").desired == _nested(11)  # the refusals changed nothing


def test_twin_depth_is_counted_below_the_section_as_iot_hub_documents(services):
    """IoT Hub's device twin page gives tags.one.two...ten = {"property": "value"} as valid (ten levels of objects
    under tags); it was refused as "nested more than 10 levels", because the section's own object was counted."""
    hubs = services.hubs
    hubs.create_device("default", "deep-1")
    hub_id = hubs.get("default").id
    documented: dict = {"property": "value"}
    for name in ("ten", "nine", "eight", "seven", "six", "five", "four", "three", "two", "one"):
        documented = {name: documented}
    ident = hubs.update_twin("default", "deep-1", tags=documented, desired=documented)
    assert ident.tags == documented and ident.desired == documented
    hubs.patch_reported(hub_id, "deep-1", documented)
    for kwargs in ({"tags": {"eleven": documented}}, {"desired": {"eleven": documented}}):
        with pytest.raises(InvalidInput, match="nested more than 10 levels"):
            hubs.update_twin("default", "deep-1", **kwargs)
    with pytest.raises(InvalidInput, match="nested more than 10 levels"):
        hubs.patch_reported(hub_id, "deep-1", {"eleven": documented})


def test_twin_size_is_iot_hubs_measure_not_the_length_of_escaped_json(services):
    """IoT Hub counts names and strings by their characters, numbers 8 and booleans 4 (its "Device twin size"). The
    size was the length of json.dumps, which writes every non-ASCII character as a 6-byte escape (an emoji 12): a
    device reporting 12,000 CJK characters (36 KB of JSON text as the wire sent it, 72 KB escaped) was refused
    413 where IoT Hub takes it."""
    from opendps.hub.registry import twin_size

    assert twin_size({"ab": "héllo", "n": 1.5, "i": 7, "b": True, "o": {"x": [1, "é"]}}) == 2 + 5 + 1 + 8 + 1 + 8 + 1 + 4 \
        + 1 + 1 + 8 + 1
    assert twin_size({"e": {}, "l": [], "s": "", "z": [None]}) == 4 + 4  # what holds nothing still counts
    hubs = services.hubs
    hubs.create_device("default", "size-1")
    hub_id = hubs.get("default").id
    text = "漢" * 12_000
    hubs.patch_reported(hub_id, "size-1", {"text": text})
    hubs.update_twin("default", "size-1", desired={"emoji": "\U0001f600" * 30_000}, tags={"ort": "Zürich" * 1300})
    assert hubs.get_device("default", "size-1").reported == {"text": text}
    with pytest.raises(PayloadTooLarge, match="reported properties would exceed 32768 bytes"):
        hubs.patch_reported(hub_id, "size-1", {"more": "漢" * 21_000})
    with pytest.raises(PayloadTooLarge, match="desired properties would exceed 32768 bytes"):  # 4,096 numbers: 32 KB+
        hubs.update_twin("default", "size-1", desired={f"n{i:04}": i for i in range(4_096)})
    with pytest.raises(PayloadTooLarge, match="tags would exceed 8192 bytes"):
        hubs.update_twin("default", "size-1", tags={"ort": None, "more": "x" * 8_200})
    assert hubs.get_device("default", "size-1").reported == {"text": text}  # the refusals changed nothing


def _nested(levels: int) -> dict:
    doc: dict = {"leaf": 1}
    for _ in range(levels - 1):
        doc = {"n": doc}
    return doc


def _fleet(services, count: int = 9) -> None:
    services.hubs.create("q-hub")
    hub_id = services.hubs.get("q-hub").id
    for n in range(count):
        device_id = f"Q-{n:02d}" if n % 2 else f"q-{n:02d}"  # mixed case: ordered by the lower-cased key
        services.hubs.create_device("q-hub", device_id)
        services.hubs.update_twin("q-hub", device_id, tags={"site": "lab" if n % 3 else "plant", "n": n})
        services.hubs.patch_reported(hub_id, device_id, {"temp": 20 + n})


def _all_pages(services, text: str, size: int) -> tuple[list, list]:
    rows, tokens, token = [], [], None
    while True:
        page = services.hubs.query("q-hub", text, twin_of, page_size=size, continuation=token)
        rows += page.items
        token = page.continuation
        if token is None:
            return rows, tokens
        tokens.append(token)


def test_query_pages_in_device_id_order_across_scan_batches(services, monkeypatch):
    monkeypatch.setattr(registry, "QUERY_BATCH", 2)  # several batches per page, and pages across batches
    _fleet(services)
    services.hubs.create_device("default", "q-elsewhere")  # another hub's devices are never seen
    text = "SELECT deviceId, tags.n FROM devices WHERE tags.site = 'lab'"
    rows, tokens = _all_pages(services, text, 2)
    assert rows == [{"deviceId": f"{'Q' if n % 2 else 'q'}-{n:02d}", "n": n} for n in (1, 2, 4, 5, 7, 8)]
    assert len(tokens) == 2  # 2 + 2 + 2: the last page says there is no more
    first = services.hubs.query("q-hub", text, twin_of, page_size=4)
    assert (len(first.items), first.item_type) == (4, "Raw") and first.continuation is not None
    rest = services.hubs.query("q-hub", text, twin_of, page_size=4, continuation=first.continuation)
    assert [r["n"] for r in rest.items] == [7, 8] and rest.continuation is None

    star = services.hubs.query("q-hub", "SELECT * FROM devices WHERE properties.reported.temp >= 27", twin_of,
                               page_size=100)
    assert star.item_type == "Twin" and [t["deviceId"] for t in star.items] == ["Q-07", "q-08"]
    assert star.items[0]["tags"] == {"site": "lab", "n": 7}


def test_query_top_count_and_refusals(services, monkeypatch):
    monkeypatch.setattr(registry, "QUERY_BATCH", 3)
    _fleet(services)
    rows, tokens = _all_pages(services, "SELECT TOP 5 deviceId FROM devices", 2)
    assert [r["deviceId"] for r in rows] == ["q-00", "Q-01", "q-02", "Q-03", "q-04"] and len(tokens) == 2
    count = services.hubs.query("q-hub", "SELECT COUNT() AS n FROM devices WHERE tags.site = 'plant'", twin_of,
                                page_size=1)
    assert (count.items, count.continuation, count.item_type) == ([{"n": 3}], None, "Raw")
    assert services.hubs.query("q-hub", "SELECT COUNT() FROM devices", twin_of, page_size=1).items == [{"$1": 9}]
    assert services.hubs.query("q-hub", "SELECT * FROM devices WHERE tags.site = 'moon'", twin_of,
                               page_size=5).items == []
    token = services.hubs.query("q-hub", "SELECT * FROM devices", twin_of, page_size=2).continuation
    with pytest.raises(InvalidInput, match="belongs to another query"):
        services.hubs.query("q-hub", "SELECT deviceId FROM devices", twin_of, page_size=2, continuation=token)
    with pytest.raises(InvalidInput, match="GROUP BY is not supported"):
        services.hubs.query("q-hub", "SELECT COUNT() FROM devices GROUP BY tags.site", twin_of, page_size=2)
    with pytest.raises(NotFound, match="linked hub 'nowhere' does not exist"):
        services.hubs.query("nowhere", "SELECT * FROM devices", twin_of, page_size=2)
