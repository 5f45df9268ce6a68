"""Device-to-cloud telemetry: a durable sink (the store) and a live wake-up for consumers.

The store is the only source of truth: every message gets a position (its row id) when it is
appended, and consumers read "everything after position N" — live consumers are woken by
:class:`TelemetryBus` instead of polling, a consumer started later reads from any position.
"""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

from sqlalchemy import func, select

from opendps.errors import InvalidInput, PayloadTooLarge
from opendps.store import LinkedHub, Store, TelemetryEvent

MAX_MESSAGE_BYTES = 256 * 1024
# system property names of the MQTT property bag ($.x) and their names in an event
SYSTEM_PROPERTIES = {"$.mid": "message-id", "$.cid": "correlation-id", "$.uid": "user-id", "$.ct": "content-type",
                     "$.ce": "content-encoding", "$.exp": "absolute-expiry-time", "$.on": "output-name",
                     "$.ifid": "dt-interface-id", "$.sub": "dt-subject"}


def parse_property_bag(bag: str) -> tuple[dict[str, str], dict[str, str]]:
    """``k=v&$.mid=..`` (keys and values URL-encoded; ``k`` alone means null) → (system, application)."""
    system: dict[str, str] = {}
    application: dict[str, str] = {}
    for part in bag.split("&"):
        if not part:
            continue
        name, sep, value = part.partition("=")
        key = unquote(name)
        val = unquote(value) if sep else None
        if key.startswith("$."):
            system[SYSTEM_PROPERTIES.get(key, key[2:])] = val if val is not None else ""
        else:
            application[key] = val  # type: ignore[assignment]
    return system, application


@dataclass(frozen=True)
class Event:
    position: int
    hub: str
    device_id: str
    system: dict[str, str]
    application: dict[str, Any]
    body: bytes
    enqueued_at: datetime

    def to_wire(self) -> dict[str, Any]:
        """Shaped like ``az iot hub monitor-events`` output (payload decoded as JSON or text when it can be)."""
        try:
            text = self.body.decode("utf-8")
            try:
                payload: Any = json.loads(text)
            except ValueError:
                payload = text
        except UnicodeDecodeError:
            payload = {"base64": base64.b64encode(self.body).decode()}
        system = {**self.system, "iothub-connection-device-id": self.device_id,
                  "iothub-enqueuedtime": self.enqueued_at.astimezone(UTC).isoformat().replace("+00:00", "Z")}
        return {"event": {"origin": self.device_id, "module": "", "payload": payload,
                          "properties": {"system": system, "application": self.application}},
                "position": self.position, "hub": self.hub}


class TelemetryBus:
    """Wakes live consumers when something was appended (in this process)."""

    def __init__(self) -> None:
        self._waiters: set[asyncio.Event] = set()

    def notify(self) -> None:
        for event in list(self._waiters):
            event.set()

    async def wait(self, timeout: float) -> None:
        event = asyncio.Event()
        self._waiters.add(event)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self._waiters.discard(event)


class TelemetrySink:
    def __init__(self, store: Store):
        self.store = store

    def append(self, hub_id: int, device_id: str, system: dict, application: dict, body: bytes) -> int:
        if len(body) > MAX_MESSAGE_BYTES:
            raise PayloadTooLarge(f"telemetry message is larger than {MAX_MESSAGE_BYTES} bytes")
        with self.store.session() as s:
            row = TelemetryEvent(hub_id=hub_id, device_id=device_id, system_properties=system, properties=application,
                                 body=body, enqueued_at=datetime.now(UTC))
            s.add(row)
            s.flush()
            return row.id

    def read(self, hub_name: str, *, after: int = 0, device_id: str | None = None, limit: int = 100) -> list[Event]:
        with self.store.session() as s:
            hub = s.scalars(select(LinkedHub).where(LinkedHub.name == hub_name)).first()
            if hub is None:
                raise InvalidInput(f"linked hub {hub_name!r} does not exist")
            q = select(TelemetryEvent).where(TelemetryEvent.hub_id == hub.id, TelemetryEvent.id > after)
            if device_id is not None:
                q = q.where(TelemetryEvent.device_id == device_id)
            rows = s.scalars(q.order_by(TelemetryEvent.id).limit(limit)).all()
            return [Event(r.id, hub.name, r.device_id, r.system_properties, r.properties, r.body, r.enqueued_at)
                    for r in rows]

    def last_position(self, hub_name: str) -> int:
        with self.store.session() as s:
            hub = s.scalars(select(LinkedHub).where(LinkedHub.name == hub_name)).first()
            if hub is None:
                raise InvalidInput(f"linked hub {hub_name!r} does not exist")
            return s.scalar(select(func.max(TelemetryEvent.id)).where(TelemetryEvent.hub_id == hub.id)) or 0
