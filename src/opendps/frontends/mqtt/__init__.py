"""The MQTT front end: one listener (and MQTT over WebSockets) for DPS and every hub, routed at CONNECT
(:mod:`.router`) to a DPS session (:mod:`.dps`) or a hub device session (:mod:`.hub`). The MQTT 3.1.1
server core itself is in :mod:`opendps.transport.mqtt`."""

from __future__ import annotations

import json
from collections.abc import Mapping

from opendps.errors import OpenDPSError
from opendps.transport import shown
from opendps.transport.mqtt.server import MqttRefused
from opendps.transport.wire import error_body

# far above any SDK's request ids (numbers, 36-character UUIDs), far below the 65,535 bytes of the answer's topic name
MAX_REQUEST_ID_BYTES = 4096


def error_payload(exc: OpenDPSError) -> bytes:
    """An error as the Azure error body both DPS and hub topics answer with (``res/{status}`` topics)."""
    return json.dumps(error_body(exc.error_code, exc.message, exc.info)).encode()


def request_id(query: Mapping[str, str]) -> str | None:
    """The ``$rid`` of a request topic's query (:func:`~opendps.transport.wire.topic_query`), which the answer's topic
    echoes; None without one (no answer). Checked before the request is acted on: an id no topic name can carry once
    URL-decoded (``%23`` is ``#``, ``%2B`` ``+``, ``%00`` U+0000) or one too long for the answer's topic made the answer
    fail in the MQTT core after the work was done (a traceback, a twin patched without a reply). MqttRefused: the
    connection is closed with one line saying why, as for any other malformed request."""
    rid = query.get("$rid")
    if rid is None:
        return None
    if "+" in rid or "#" in rid or "\x00" in rid:
        raise MqttRefused(f"request id {shown(rid)} holds '+', '#' or U+0000, which no topic name can carry")
    if len(rid.encode("utf-8", "replace")) > MAX_REQUEST_ID_BYTES:
        raise MqttRefused(f"request id is longer than {MAX_REQUEST_ID_BYTES} bytes")
    return rid
