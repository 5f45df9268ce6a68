"""Cloud-to-device messages: queued in the store until the device PUBACKs them.

Bounded like IoT Hub (50 pending per device) and with an expiry (default 1 hour, at most 2 days);
a message is deleted on PUBACK, so MQTT's at-least-once delivery holds across reconnects and restarts.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from sqlalchemy import delete, func, select, tuple_

from opendps.errors import InvalidInput, NotFound, OpenDPSError, PayloadTooLarge
from opendps.store import CloudToDeviceMessage, HubDevice, LinkedHub, Store

MAX_C2D_BYTES = 64 * 1024
MAX_PENDING = 50
MAX_MESSAGE_ID = 128  # IoT Hub's limit, and the column's
MAX_TOPIC_BYTES = 65535  # an MQTT topic name (2-byte length): the properties travel in it
DEFAULT_TTL = timedelta(hours=1)
MAX_TTL = timedelta(days=2)
MIN_TTL = timedelta(seconds=1)


def time_to_live(seconds: float) -> timedelta:
    """A message's time-to-live given in seconds (a header, an AMQP expiry): 1 second to 2 days, else InvalidInput
    (a non-finite or huge number is refused here rather than overflowing)."""
    if not math.isfinite(seconds) or not MIN_TTL.total_seconds() <= seconds <= MAX_TTL.total_seconds():
        raise InvalidInput("message time-to-live must be 1 second to 2 days")
    return timedelta(seconds=seconds)


class QueueFull(OpenDPSError):
    error_code = 403004


@dataclass(frozen=True)
class PendingMessage:
    pk: int
    message_id: str
    system: dict[str, Any]
    properties: dict[str, Any]
    body: bytes

    def topic(self, device_id: str) -> str:
        """``devices/{id}/messages/devicebound/{bag}`` as the Azure SDKs parse it (wire spec §6.3)."""
        parts = [f"%24.mid={quote(self.message_id, safe='')}",
                 f"%24.to={quote(f'/devices/{device_id}/messages/deviceBound', safe='')}"]
        for key, name in (("correlation-id", "cid"), ("user-id", "uid"), ("content-type", "ct"),
                          ("content-encoding", "ce"), ("absolute-expiry-time", "exp")):
            if self.system.get(key) is not None:
                parts.append(f"%24.{name}={quote(str(self.system[key]), safe='')}")
        if self.system.get("ack"):
            parts.append(f"iothub-ack={quote(str(self.system['ack']), safe='')}")
        for key, value in self.properties.items():
            parts.append(quote(key, safe="") if value is None else f"{quote(key, safe='')}={quote(str(value), safe='')}")
        return f"devices/{device_id}/messages/devicebound/" + "&".join(parts)


class CloudToDevice:
    def __init__(self, store: Store) -> None:
        self.store = store
        # told how many messages expired undelivered when a sweep deletes them (the wiring hands it the metrics)
        self.on_expired: Callable[[int], None] | None = None

    def enqueue(self, hub_name: str, device_id: str, body: bytes, *, properties: dict[str, Any] | None = None,
                system: dict[str, Any] | None = None, ttl: timedelta | None = None) -> PendingMessage:
        if len(body) > MAX_C2D_BYTES:
            raise PayloadTooLarge(f"cloud-to-device message is larger than {MAX_C2D_BYTES} bytes")
        ttl = DEFAULT_TTL if ttl is None else ttl
        if not MIN_TTL <= ttl <= MAX_TTL:
            raise InvalidInput("message time-to-live must be 1 second to 2 days")
        props = {str(k): (None if v is None else str(v)) for k, v in (properties or {}).items()}
        sysprops = {str(k): str(v) for k, v in (system or {}).items() if v is not None}
        given = sysprops.get("message-id")
        if given is not None and not (len(given) <= MAX_MESSAGE_ID and given.isascii() and given.isprintable()):
            raise InvalidInput(f"message id must be at most {MAX_MESSAGE_ID} printable ASCII characters")
        now = datetime.now(UTC)
        with self.store.session() as s:
            hub = s.scalars(select(LinkedHub).where(LinkedHub.name == hub_name)).first()
            if hub is None:
                raise NotFound(f"linked hub {hub_name!r} does not exist")
            device = s.scalars(select(HubDevice).where(HubDevice.hub_id == hub.id,
                                                       HubDevice.device_key == device_id.lower())).first()
            if device is None:
                raise NotFound(f"device {device_id!r} does not exist in hub {hub_name!r}")
            swept = s.execute(delete(CloudToDeviceMessage).where(CloudToDeviceMessage.expires_at <= now))
            expired = int(getattr(swept, "rowcount", 0) or 0)
            if expired and self.on_expired is not None:
                self.on_expired(expired)
            pending = s.scalar(select(func.count()).select_from(CloudToDeviceMessage).where(
                CloudToDeviceMessage.hub_id == hub.id, CloudToDeviceMessage.device_key == device.device_key)) or 0
            if pending >= MAX_PENDING:
                raise QueueFull(f"device {device_id!r} already has {MAX_PENDING} pending cloud-to-device messages")
            message_id = sysprops.pop("message-id", None) or str(uuid.uuid4())
            # the device receives the properties in the PUBLISH topic: one that cannot be sent would stay queued,
            # failing each delivery and holding back every message behind it (AMQP takes 256 KB of properties)
            try:
                size = len(PendingMessage(0, message_id, sysprops, props, body).topic(device.device_id).encode())
            except UnicodeEncodeError:  # a lone surrogate (an HTTP header's undecodable byte) cannot be quoted
                raise InvalidInput("cloud-to-device message properties must be Unicode text") from None
            if size > MAX_TOPIC_BYTES:
                raise PayloadTooLarge(f"cloud-to-device message properties too large: {size} bytes encoded, at most "
                                      f"{MAX_TOPIC_BYTES} with the device id")
            row = CloudToDeviceMessage(hub_id=hub.id, device_key=device.device_key, message_id=message_id,
                                       system_properties=sysprops, properties=props, body=body,
                                       expires_at=now + ttl, created_at=now)
            s.add(row)
            s.flush()
            return PendingMessage(row.id, message_id, sysprops, props, body)

    def pending(self, hub_id: int, device_key: str) -> list[PendingMessage]:
        now = datetime.now(UTC)
        with self.store.session() as s:
            rows = s.scalars(select(CloudToDeviceMessage).where(
                CloudToDeviceMessage.hub_id == hub_id, CloudToDeviceMessage.device_key == device_key,
                CloudToDeviceMessage.expires_at > now).order_by(CloudToDeviceMessage.id)).all()
            return [PendingMessage(r.id, r.message_id, r.system_properties, r.properties, r.body) for r in rows]

    def waiting(self, devices: list[tuple[int, str]]) -> set[tuple[int, str]]:
        """Of ``devices`` ((hub id, lower-cased device id)), those with messages waiting: one statement for a batch."""
        if not devices:
            return set()
        now = datetime.now(UTC)
        with self.store.session() as s:
            rows = s.execute(select(CloudToDeviceMessage.hub_id, CloudToDeviceMessage.device_key).where(
                tuple_(CloudToDeviceMessage.hub_id, CloudToDeviceMessage.device_key).in_(sorted(set(devices))),
                CloudToDeviceMessage.expires_at > now).distinct())
            return {(h, d) for h, d in rows}

    def complete(self, pk: int) -> None:
        with self.store.session() as s:
            s.execute(delete(CloudToDeviceMessage).where(CloudToDeviceMessage.id == pk))
