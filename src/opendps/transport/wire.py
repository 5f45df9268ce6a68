"""Small Azure wire facts shared by front ends and the documents the domain returns: the error body, topic
queries and timestamps."""

from __future__ import annotations

import json
import math
import re
import sys
import uuid
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qs

from opendps.errors import InvalidInput


def error_body(error_code: int, message: str, info: dict | None = None) -> dict[str, Any]:
    """``{"errorCode", "trackingId", "message", "timestampUtc", "info"}`` (wire spec §1.7)."""
    return {"errorCode": error_code, "trackingId": str(uuid.uuid4()), "message": message,
            "timestampUtc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "info": info or {}}


def json_kind(value: object) -> str:
    """A parsed JSON value's type as JSON names it (``null``, ``boolean``, ``number``, ``string``, ``array``,
    ``object``): for refusals that say what was sent, and for comparisons that must not mix types."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


MAX_JSON_DEPTH = 32  # nesting levels of any JSON document opendps reads (Azure's own limits are lower)


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0, ``[]`` or ``{}`` is 1), without recursion."""
    depth, stack = 0, [(value, 0)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict | list):
            depth = max(depth, level + 1)
            stack.extend((child, level + 1) for child in (node.values() if isinstance(node, dict) else node))
    return depth


def _not_a_number(token: str) -> Any:
    raise ValueError(f"{token} is not a JSON number")


def _finite(token: str) -> float:
    value = float(token)
    if math.isinf(value):
        raise ValueError(f"number {token[:40]} is out of range")
    return value


def _whole(token: str) -> int:
    """A JSON integer within a double's range (json.loads reads any length up to int()'s 4,300-digit limit)."""
    if len(token) > _MAX_INT_TEXT or abs(value := int(token)) > sys.float_info.max:
        raise ValueError(f"number {token[:40]}{'...' if len(token) > 40 else ''} is out of range")
    return value


_MAX_INT_TEXT = 310  # a sign and the 309 digits of the largest double (1.8e308)


# where a lone UTF-16 surrogate can come from: a \\ud800-\\udfff escape, or (bytes) a surrogate encoded as UTF-8,
# which json.loads decodes with "surrogatepass"; (text) one already in the string
_SURROGATE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_SURROGATE_TEXT = re.compile("\\\\u[dD][89a-fA-F]|[\ud800-\udfff]")


def parse_json(data: bytes | str, what: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse untrusted JSON: invalid text or nesting deeper than ``max_depth`` raise InvalidInput naming ``what``
    (never RecursionError, which the standard parser raises for deep input). NaN, Infinity and numbers past a double
    (``1e309``) are not JSON (RFC 8259) although Python reads them: kept, they were written back as ``NaN`` (a twin no
    client could parse) or refused by PostgreSQL's json column (a traceback), so they are refused here; so is an
    integer past a double written out in digits (stored and given back, no JavaScript or C SDK reads it). So is a string
    holding a lone UTF-16 surrogate (not text, RFC 7493): no database's encoder takes it (a 500). A surrogate pair's
    escapes are one character and welcome; the whole value is checked only when the text holds a hint of one."""
    try:
        value = json.loads(data, parse_constant=_not_a_number, parse_float=_finite, parse_int=_whole)
    except RecursionError:
        raise InvalidInput(f"{what} is nested more than {max_depth} levels deep") from None
    except ValueError as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from exc
    if json_depth(value) > max_depth:
        raise InvalidInput(f"{what} is nested more than {max_depth} levels deep")
    if (_SURROGATE_BYTES if isinstance(data, bytes | bytearray) else _SURROGATE_TEXT).search(data):
        try:
            json.dumps(value, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise InvalidInput(f"{what} holds a lone UTF-16 surrogate (\\ud800-\\udfff): not text (RFC 7493)") from None
    return value


def topic_query(topic: str) -> dict[str, str]:
    """The ``?k=v&...`` part of an Azure MQTT topic (``$rid``, ``operationId``, ``$version``), URL-decoded."""
    _, _, qs = topic.partition("?")
    return {k: v[0] for k, v in parse_qs(qs, keep_blank_values=True).items()}


def decimal(text: str, digits: int = 9) -> int | None:
    """``text`` as a non-negative integer when it is 1 to ``digits`` ASCII digits, else None. ``str.isdigit`` alone
    lets through what ``int`` refuses ("²") and lengths past its 4,300-digit limit: a ValueError where a clear
    refusal was meant."""
    if not 0 < len(text) <= digits or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def iso8601(dt: datetime) -> str:
    """``2026-12-05T10:00:00.123456Z``: how Azure's JSON documents write an instant (UTC, ``Z``)."""
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def rfc1123(dt: datetime) -> str:
    """``Sat, 05 Dec 2026 10:00:00 GMT``: the certificate resources' dates (DPS service API)."""
    return format_datetime(dt.astimezone(UTC), usegmt=True)
