"""The IoT Hub query subset (opendps.hub.query), pure: parsing, refusals, three-valued evaluation, projection,
continuation tokens. The server tests (tests/test_cli_hub.py) check the same language through POST /devices/query."""

from __future__ import annotations

from typing import Any

import pytest

from opendps.errors import InvalidInput
from opendps.hub.query import (
    MAX_NESTING,
    MAX_QUERY_LENGTH,
    continuation_token,
    parse_query,
    read_continuation,
)

TWINS: list[dict[str, Any]] = [
    {"deviceId": "a", "status": "enabled", "connectionState": "Connected", "version": 4,
     "tags": {"site": "lab", "floor": 3, "owner": {"team": "ops"}, "beta": True, "name-with-dash": "x"},
     "properties": {"desired": {"interval": 5, "$version": 2}, "reported": {"temp": 21.5, "fw": "1.2.0", "$version": 3}}},
    {"deviceId": "b", "status": "disabled", "connectionState": "Disconnected", "version": 2,
     "tags": {"site": "plant", "floor": 1, "beta": False},
     "properties": {"desired": {"$version": 1}, "reported": {"temp": 30, "fw": "1.3.0", "$version": 1}}},
    {"deviceId": "c", "status": "enabled", "connectionState": "Disconnected", "version": 2,
     "tags": {"site": 7, "note": None},
     "properties": {"desired": {"$version": 1}, "reported": {"$version": 1}}},
    {"deviceId": "d", "status": "enabled", "connectionState": "Disconnected", "version": 2, "tags": {},
     "properties": {"desired": {"$version": 1}, "reported": {"temp": "warm", "$version": 1}}},
]


def selected(where: str) -> list[str]:
    q = parse_query(f"SELECT * FROM devices WHERE {where}")
    return [t["deviceId"] for t in TWINS if q.matches(t)]


def refusal(text: str) -> str:
    with pytest.raises(InvalidInput) as info:
        parse_query(text)
    assert info.value.status == 400
    return info.value.message


# ---------------------------------------------------------------- what is accepted


def test_select_star_returns_the_documents_and_is_a_twin_query():
    q = parse_query("SELECT * FROM devices")
    assert q.star and q.item_type == "Twin" and q.condition is None and q.top is None
    assert all(q.matches(t) and q.project(t) is t for t in TWINS)


def test_keywords_are_case_insensitive_and_property_names_are_not():
    assert selected("tags.site = 'lab'") == ["a"]
    q = parse_query("select * from DEVICES where tags.site = 'lab' and NOT tags.floor > 5 Or deviceId In ['d']")
    assert [t["deviceId"] for t in TWINS if q.matches(t)] == ["a", "d"]
    assert selected("TAGS.site = 'lab'") == [] and selected("tags.Site = 'lab'") == []


@pytest.mark.parametrize(("where", "expected"), [
    ("tags.floor = 3", ["a"]),
    ("tags.floor != 3", ["b"]),  # c and d have no floor: undefined, not selected
    ("tags.floor <> 3", ["b"]),
    ("tags.floor < 3", ["b"]),
    ("tags.floor <= 3", ["a", "b"]),
    ("tags.floor > 1", ["a"]),
    ("tags.floor >= 1", ["a", "b"]),
    ("properties.reported.temp > 25", ["b"]),  # d's "warm" is a string: undefined against a number
    ("properties.reported.temp = 21.5", ["a"]),
    ("properties.reported.temp >= -1.5e1", ["a", "b"]),
    ("properties.reported.fw < '1.3'", ["a"]),  # strings compare by code point
    ("tags.beta = true", ["a"]),
    ("tags.beta = false", ["b"]),
    ("tags.beta > false", []),  # ordering is for numbers and strings only
    ("tags.note = null", ["c"]),
    ("tags.site = 7", ["c"]),
    ("tags.site != 'lab'", ["b"]),  # c's 7 is another type: undefined
    ("status = 'enabled' AND connectionState = 'Connected'", ["a"]),
    ("version = 2", ["b", "c", "d"]),
    ("properties.desired.$version = 2", ["a"]),
    ("tags.owner.team = 'ops'", ["a"]),
    ("tags['name-with-dash'] = 'x'", ["a"]),
    ("'lab' = tags.site", ["a"]),
    ("tags.floor = tags.floor", ["a", "b"]),
    ("tags.owner = tags.owner", ["a"]),
    ("tags.missing.deeper = 1", []),
    ("tags.site.deeper = 1", []),  # a path through a string is missing
])
def test_comparisons(where, expected):
    assert selected(where) == expected


def test_not_keeps_undefined_undefined():
    assert selected("tags.floor = 3") == ["a"]
    assert selected("NOT tags.floor = 3") == ["b"]  # c and d: NOT undefined is undefined
    assert selected("NOT (tags.floor = 3)") == ["b"]
    assert selected("NOT NOT tags.floor = 3") == ["a"]
    assert selected("NOT IS_DEFINED(tags.floor) OR tags.floor != 3") == ["b", "c", "d"]


def test_and_or_follow_sql_three_valued_logic():
    assert selected("tags.floor = 3 OR tags.site = 7") == ["a", "c"]  # undefined OR true is true
    assert selected("NOT (tags.floor = 9 AND tags.site = 'lab')") == ["a", "b"]  # false AND undefined is false
    assert selected("NOT (tags.floor = 9 OR tags.site = 'x')") == ["a", "b"]  # c: false OR undefined is undefined


def test_precedence_and_parentheses():
    # AND binds tighter than OR, NOT tighter than AND
    assert selected("deviceId = 'a' OR deviceId = 'b' AND status = 'enabled'") == ["a"]
    assert selected("(deviceId = 'a' OR deviceId = 'b') AND status = 'disabled'") == ["b"]
    assert selected("NOT deviceId = 'a' AND status = 'enabled'") == ["c", "d"]
    assert selected("NOT (deviceId = 'a' AND status = 'enabled')") == ["b", "c", "d"]
    assert selected("((((deviceId = 'c'))))") == ["c"]


def test_in_nin_and_not_in():
    assert selected("tags.site IN ['lab', 'plant']") == ["a", "b"]
    assert selected("tags.site IN ('lab', 7)") == ["a", "c"]
    assert selected("tags.site NIN ['lab']") == ["b"]  # c: 7 is another type (undefined); d: missing
    assert selected("tags.site NOT IN ['lab', 'plant']") == []
    assert selected("tags.floor in [1, 3, null]") == ["a", "b"]
    assert selected("deviceId IN ['b', 'd']") == ["b", "d"]


def test_type_checks_are_never_undefined():
    assert selected("IS_DEFINED(tags.floor)") == ["a", "b"]
    assert selected("NOT IS_DEFINED(tags.floor)") == ["c", "d"]
    assert selected("is_defined(properties.reported.temp)") == ["a", "b", "d"]
    assert selected("IS_NULL(tags.note)") == ["c"]
    assert selected("IS_NUMBER(properties.reported.temp)") == ["a", "b"]
    assert selected("IS_STRING(properties.reported.temp)") == ["d"]
    assert selected("IS_BOOL(tags.beta)") == ["a", "b"]
    assert selected("IS_OBJECT(tags.owner)") == ["a"]
    assert selected("IS_ARRAY(tags)") == []
    assert selected("IS_PRIMITIVE(tags.site)") == ["a", "b", "c"]


def test_startswith_and_endswith():
    assert selected("STARTSWITH(properties.reported.fw, '1.')") == ["a", "b"]
    assert selected("ENDSWITH(tags.site, 'ant')") == ["b"]
    assert selected("NOT STARTSWITH(tags.site, 'l')") == ["b"]  # c's number: undefined


def test_strings_take_escapes_and_either_quote():
    q = parse_query(r"""SELECT * FROM devices WHERE tags.q = 'it\'s' OR tags.q = "say \"hi\"" OR tags.q = '\u00e9'""")
    assert q.matches({"tags": {"q": "it's"}}) and q.matches({"tags": {"q": 'say "hi"'}}) and q.matches({"tags": {"q": "é"}})
    assert not q.matches({"tags": {"q": "its"}})


def test_count_with_and_without_alias():
    q = parse_query("SELECT COUNT() AS n FROM devices WHERE status = 'enabled'")
    assert (q.count, q.star, q.item_type) == ("n", False, "Raw")
    assert sum(q.matches(t) for t in TWINS) == 3
    assert parse_query("select count() from devices").count == "$1"


def test_projection_names_columns_by_alias_or_last_name_and_leaves_out_missing_values():
    q = parse_query("SELECT deviceId, tags.site, properties.reported.temp AS t, tags.owner FROM devices")
    assert q.item_type == "Raw"
    assert [q.project(t) for t in TWINS] == [
        {"deviceId": "a", "site": "lab", "t": 21.5, "owner": {"team": "ops"}},
        {"deviceId": "b", "site": "plant", "t": 30},
        {"deviceId": "c", "site": 7},
        {"deviceId": "d", "t": "warm"},
    ]
    assert parse_query("SELECT tags['name-with-dash'] FROM devices").project(TWINS[0]) == {"name-with-dash": "x"}


def test_top():
    assert parse_query("SELECT TOP 2 * FROM devices").top == 2
    assert parse_query("SELECT top 5 deviceId FROM devices WHERE tags.floor = 1").top == 5


# ---------------------------------------------------------------- what is refused, and how it is said


@pytest.mark.parametrize(("text", "words"), [
    ("SELECT * FROM devices GROUP BY tags.site", ["GROUP BY is not supported"]),
    ("SELECT COUNT() FROM devices WHERE status = 'enabled' GROUP BY status", ["GROUP BY is not supported"]),
    ("SELECT * FROM devices ORDER BY deviceId", ["ORDER BY is not supported", "device id order"]),
    ("SELECT * FROM devices.modules", ["FROM devices.modules is not supported", "only FROM devices"]),
    ("SELECT * FROM devices.jobs", ["FROM devices.jobs is not supported"]),
    ("SELECT * FROM jobs", ["FROM jobs is not supported"]),
    ("SELECT * FROM devices d WHERE d.status = 'enabled'", ["unexpected 'd'", "position 23"]),
    ("SELECT * FROM devices JOIN x", ["JOIN is not supported"]),
    ("SELECT DISTINCT deviceId FROM devices", ["SELECT DISTINCT is not supported"]),
    ("SELECT MAX(tags.floor) FROM devices", ["aggregate MAX() is not supported", "only COUNT()"]),
    ("SELECT LOWER(deviceId) FROM devices", ["function LOWER() is not supported in SELECT"]),
    ("SELECT COUNT(), deviceId FROM devices", ["COUNT() cannot be combined"]),
    ("SELECT deviceId, COUNT() FROM devices", ["COUNT() cannot be combined"]),
    ("SELECT COUNT(deviceId) FROM devices", ["COUNT() takes no argument"]),
    ("SELECT TOP 3 COUNT() FROM devices", ["TOP cannot be combined with COUNT()"]),
    ("SELECT TOP 0 * FROM devices", ["TOP needs a whole number of at least 1"]),
    ("SELECT TOP x * FROM devices", ["TOP needs a whole number"]),
    ("SELECT *, deviceId FROM devices", ["* cannot be combined"]),
    ("SELECT deviceId, * FROM devices", ["* cannot be combined"]),
    ("SELECT tags.x, properties.reported.x FROM devices", ["two selections are named 'x'", "AS"]),
    ("SELECT deviceId AS FROM devices", ["expected a name after AS"]),
    ("DELETE FROM devices", ["expected SELECT at the start"]),
    ("SELECT * devices", ["expected FROM after the selection", "'devices'"]),
    ("SELECT * FROM devices WHERE", ["expected a property path in the condition", "the end of the query"]),
    ("SELECT * FROM devices WHERE tags.x", ["expected a comparison", "after tags.x"]),
    ("SELECT * FROM devices WHERE tags.x IS NULL", ["IS is not supported", "IS_NULL(path)"]),
    ("SELECT * FROM devices WHERE tags.x LIKE 'a%'", ["LIKE is not supported"]),
    ("SELECT * FROM devices WHERE tags.x BETWEEN 1 AND 2", ["BETWEEN is not supported"]),
    ("SELECT * FROM devices WHERE tags.x + 1 = 2", ["arithmetic ('+') is not supported"]),
    ("SELECT * FROM devices WHERE tags.x = 1 + 1", ["unexpected '+'", "expected AND, OR or the end"]),
    ("SELECT * FROM devices WHERE LOWER(tags.x) = 'a'", ["function LOWER() is not supported", "IS_DEFINED"]),
    ("SELECT * FROM devices WHERE IS_DEFINED(tags.x, 1)", ["expected ')'"]),
    ("SELECT * FROM devices WHERE STARTSWITH(tags.x, 1)", ["STARTSWITH() needs a string"]),
    ("SELECT * FROM devices WHERE tags.x IN 'a'", ["expected a list"]),
    ("SELECT * FROM devices WHERE tags.x IN [tags.y]", ["IN lists hold values"]),
    ("SELECT * FROM devices WHERE tags.x IN ['a'", ["to close the IN list"]),
    ("SELECT * FROM devices WHERE tags.x = [1]", ["arrays and objects are not supported as values"]),
    ("SELECT * FROM devices WHERE tags.arr[0] = 1", ["array indexes are not supported"]),
    ("SELECT * FROM devices WHERE tags.1 = 1", ["expected a property name after '.'", "['name']"]),
    ("SELECT * FROM devices WHERE (tags.x = 1", ["expected ')' to close the parenthesis"]),
    ("SELECT * FROM devices WHERE tags.x = 'open", ["unterminated string", "position 38"]),
    ("SELECT * FROM devices WHERE tags.x = 'a\\q'", ["invalid escape"]),
    ("SELECT * FROM devices WHERE tags.x = 1e999", ["out of range"]),
    # past int()'s 4,300-digit limit (it raised ValueError: a 500 on the service API)
    ("SELECT * FROM devices WHERE tags.x = " + "9" * 5000, ["out of range", "(5000 digits)"]),
    ("SELECT TOP " + "9" * 4400 + " * FROM devices", ["out of range", "(4400 digits)"]),
    ("SELECT * FROM devices WHERE tags.x = " + "9" * 310, ["out of range", "(310 digits)"]),
    ("SELECT * FROM devices WHERE tags.x = 1 ; DROP TABLE hub_devices", ["unexpected character ';'", "position 40"]),
    ("SELECT * FROM devices WHERE AND = 1", ["expected a property path in the condition", "'AND'"]),
])
def test_refusals_name_the_unsupported_part(text, words):
    message = refusal(text)
    assert message.startswith("query: ")
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("text", [None, 42, "", "   "])
def test_an_empty_or_missing_query_is_refused(text):
    assert "the query text is empty" in refusal(text)


def test_long_and_deep_queries_are_refused_cleanly():
    assert f"longer than {MAX_QUERY_LENGTH}" in refusal("SELECT * FROM devices WHERE " + "x" * MAX_QUERY_LENGTH)
    deep = "SELECT * FROM devices WHERE " + "(" * (MAX_NESTING + 1) + "tags.x = 1" + ")" * (MAX_NESTING + 1)
    assert f"nested more than {MAX_NESTING} levels" in refusal(deep)
    nots = "SELECT * FROM devices WHERE " + "NOT " * 2000 + "tags.x = 1"  # no RecursionError
    assert f"nested more than {MAX_NESTING} levels" in refusal(nots)
    ok = "SELECT * FROM devices WHERE " + "(" * MAX_NESTING + "deviceId = 'a'" + ")" * MAX_NESTING
    assert [t["deviceId"] for t in TWINS if parse_query(ok).matches(t)] == ["a"]
    largest = "SELECT * FROM devices WHERE tags.floor < " + "9" * 309  # the largest double's digits: a number
    assert [t["deviceId"] for t in TWINS if parse_query(largest).matches(t)] == ["a", "b"]
    long_or = "SELECT * FROM devices WHERE " + " OR ".join(f"tags.floor = {n}" for n in range(300))
    assert [t["deviceId"] for t in TWINS if parse_query(long_or).matches(t)] == ["a", "b"]  # flat, not nested


# ---------------------------------------------------------------- continuation tokens


def test_continuation_tokens_round_trip_and_are_bound_to_their_query():
    q = parse_query("SELECT * FROM devices WHERE tags.site = 'lab'")
    token = continuation_token(q, "dev-0042", 7)
    assert "dev-0042" not in token  # opaque
    assert read_continuation(q, token) == ("dev-0042", 7)
    other = parse_query("SELECT * FROM devices")
    with pytest.raises(InvalidInput, match="belongs to another query"):
        read_continuation(other, token)
    for bad in ("not-a-token", "e30", "!!!", continuation_token(q, "x", 1)[:-3]):
        with pytest.raises(InvalidInput, match="not a continuation token"):
            read_continuation(q, bad)
