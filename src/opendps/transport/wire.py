"""Small Azure wire facts shared by front ends and the documents the domain returns: the error body, topic
queries and timestamps."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qs


def error_body(error_code: int, message: str, info: dict | None = None) -> dict[str, Any]:
    """``{"errorCode", "trackingId", "message", "timestampUtc", "info"}`` (wire spec §1.7)."""
    return {"errorCode": error_code, "trackingId": str(uuid.uuid4()), "message": message,
            "timestampUtc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "info": info or {}}


def topic_query(topic: str) -> dict[str, str]:
    """The ``?k=v&...`` part of an Azure MQTT topic (``$rid``, ``operationId``, ``$version``), URL-decoded."""
    _, _, qs = topic.partition("?")
    return {k: v[0] for k, v in parse_qs(qs, keep_blank_values=True).items()}


def iso8601(dt: datetime) -> str:
    """``2026-12-05T10:00:00.123456Z``: how Azure's JSON documents write an instant (UTC, ``Z``)."""
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def rfc1123(dt: datetime) -> str:
    """``Sat, 05 Dec 2026 10:00:00 GMT``: the certificate resources' dates (DPS service API)."""
    return format_datetime(dt.astimezone(UTC), usegmt=True)
