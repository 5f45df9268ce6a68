"""The MQTT front end: one listener (and MQTT over WebSockets) for DPS and every hub, routed at CONNECT
(:mod:`.router`) to a DPS session (:mod:`.dps`) or a hub device session (:mod:`.hub`). The MQTT 3.1.1
server core itself is in :mod:`opendps.transport.mqtt`."""

from __future__ import annotations

import json

from opendps.errors import OpenDPSError
from opendps.transport.wire import error_body


def error_payload(exc: OpenDPSError) -> bytes:
    """An error as the Azure error body both DPS and hub topics answer with (``res/{status}`` topics)."""
    return json.dumps(error_body(exc.error_code, exc.message, exc.info)).encode()
