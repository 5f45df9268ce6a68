"""Small Azure wire facts shared by the HTTP and MQTT front ends: the error body and topic queries."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
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
