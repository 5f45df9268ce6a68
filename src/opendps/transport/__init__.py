"""Protocol plumbing shared by the front ends and the device SDK: TLS, MQTT, AMQP, shared access signatures,
Azure wire facts.

Nothing in here knows about enrollments, hubs or policies.
"""

from __future__ import annotations

from typing import Any


def format_peer(peername: Any) -> str:
    """A socket's peer as a log shows it: ``host:port``, ``[v6]:port``, or ``unknown peer``."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peername) if peername else "unknown peer"


def shown(value: object, limit: int = 96) -> str:
    """A peer's value in a log line or an answer: its repr, cut to about ``limit`` characters (the peer chose its
    length). Text keeps its quotes, so the reader sees where the value ends."""
    if isinstance(value, str):
        return repr(value if len(value) <= limit else value[:limit] + "...")
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
