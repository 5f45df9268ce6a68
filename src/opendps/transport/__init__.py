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
