"""Untrusted JSON as every front end reads it (transport.wire.parse_json): what is refused by name."""

from __future__ import annotations

import pytest

from opendps.errors import InvalidInput
from opendps.transport.wire import parse_json


@pytest.mark.parametrize("data", [
    b'{"a": "x\\ud800y"}',  # a lone escape
    b'{"a": "\\uDFFF"}',
    b'{"\\ud83d": 1}',  # half a pair, as a key
    b'["\\ude00\\ud83d"]',  # a pair in the wrong order
    '{"a": "x\\ud800"}',  # text, escaped
    '{"a": "x\ud800"}',  # text holding one already
    b'{"a": "x\xed\xa0\x80y"}',  # a surrogate encoded as UTF-8, which json.loads decodes with surrogatepass
    b'{"a": "\xed\xa0\xbd\xed\xb8\x80"}',  # a pair encoded that way (CESU-8): two lone surrogates, not UTF-8
])
def test_a_lone_surrogate_is_not_text(data):
    with pytest.raises(InvalidInput, match="body holds a lone UTF-16 surrogate"):
        parse_json(data, "body")


@pytest.mark.parametrize(("data", "value"), [
    (b'{"smile": "\\ud83d\\ude00"}', {"smile": "\U0001f600"}),  # a pair's escapes are one character
    ('{"smile": "\\ud83d\\ude00"}', {"smile": "\U0001f600"}),
    ('{"smile": "\U0001f600"}'.encode(), {"smile": "\U0001f600"}),
    (b'{"path": "C:\\\\ud800"}', {"path": "C:\\ud800"}),  # an escaped backslash before "ud800" is plain text
])
def test_text_outside_the_basic_plane_is_welcome(data, value):
    assert parse_json(data, "body") == value


@pytest.mark.parametrize(("text", "words"), [("NaN", "NaN is not a JSON number"), ("[Infinity]", "Infinity"),
                                             ("1e309", "out of range"), ("[" * 40 + "]" * 40, "nested more than 32")])
def test_what_python_reads_but_json_is_not(text, words):
    with pytest.raises(InvalidInput, match=words):
        parse_json(text, "body")
