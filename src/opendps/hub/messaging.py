"""Cloud-to-device messages: queued in the store until the device PUBACKs them.

Bounded like IoT Hub (50 pending per device, also against concurrent senders: they take turns on the device's row)
and with an expiry (default 1 hour, at most 2 days); a message is deleted on PUBACK, so MQTT's at-least-once delivery
holds across reconnects and restarts. Each delivery counts (MQTT cannot reject or abandon: a connection that ends
before the PUBACK abandons it); a message delivered ``MAX_DELIVERY_COUNT`` times without a PUBACK is dead-lettered
(deleted) instead of going out again, as IoT Hub's ``maxDeliveryCount`` (default 10): a message that makes the device
crash before it acknowledges no longer comes back on every reconnect until it expires. A device's queue goes with its
identity (``Hubs.delete_device``) and can be purged (``purge``: ``DELETE /devices/{id}/commands``).

Each way a message leaves the queue — PUBACK (``complete``: Success), expiry (the sweeps: Expired), dead-letter
(DeliveryCountExceeded), ``purge`` (Purged) — deletes it with ``RETURNING`` and records its feedback, when its
``iothub-ack`` asked, in the same transaction (:mod:`opendps.hub.feedback`): a message that two connections complete at
once gets one record, and no outcome is recorded without its delete or lost with it.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from sqlalchemy import bindparam, delete, func, select, tuple_, update
from sqlalchemy.orm import Session

from opendps.errors import InvalidInput, NotFound, OpenDPSError, PayloadTooLarge
from opendps.hub import feedback
from opendps.hub.feedback import FeedbackQueue
from opendps.store import CloudToDeviceMessage, HubDevice, LinkedHub, Store, table_of

MAX_C2D_BYTES = 64 * 1024
MAX_PENDING = 50
MAX_MESSAGE_ID = 128  # IoT Hub's limit, and the column's
MAX_TOPIC_BYTES = 65535  # an MQTT topic name (2-byte length): the properties travel in it
DEFAULT_TTL = timedelta(hours=1)
MAX_TTL = timedelta(days=2)
MIN_TTL = timedelta(seconds=1)
MAX_DELIVERY_COUNT = 10  # IoT Hub's default maxDeliveryCount
DELIVERY_COUNT = "delivery-count"  # kept in a row's system properties; never taken from a sender
SWEEP_INTERVAL = 60.0  # seconds between sweeps of every device's expired messages (each enqueue sweeps its device's)
log = logging.getLogger("opendps.hub")
# what a delete returns for the feedback it may owe (opendps.hub.feedback.record)
_ENDED = (CloudToDeviceMessage.hub_id, CloudToDeviceMessage.device_key, CloudToDeviceMessage.message_id,
          CloudToDeviceMessage.system_properties)
# a delivery's count, by primary key for a batch (executemany). A Core statement, not the ORM's bulk UPDATE: that one
# raises StaleDataError when a row is gone, and one read by ``pending`` may be deleted before it is counted
_MESSAGES = table_of(CloudToDeviceMessage)
_COUNT_DELIVERY = update(_MESSAGES).where(_MESSAGES.c.id == bindparam("b_id")).values(
    system_properties=bindparam("b_system", type_=_MESSAGES.c.system_properties.type))


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
    delivery_count: int = 0  # this delivery's number (1 = the first)

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
        self._next_sweep = 0.0  # time.monotonic() of the next sweep of every device's expired messages
        self.feedback = FeedbackQueue(store)

    def enqueue(self, hub_name: str, device_id: str, body: bytes, *, properties: dict[str, Any] | None = None,
                system: dict[str, Any] | None = None, ttl: timedelta | None = None) -> PendingMessage:
        if len(body) > MAX_C2D_BYTES:
            raise PayloadTooLarge(f"cloud-to-device message is larger than {MAX_C2D_BYTES} bytes")
        ttl = DEFAULT_TTL if ttl is None else ttl
        if not MIN_TTL <= ttl <= MAX_TTL:
            raise InvalidInput("message time-to-live must be 1 second to 2 days")
        props = {str(k): (None if v is None else str(v)) for k, v in (properties or {}).items()}
        sysprops = {str(k): str(v) for k, v in (system or {}).items() if v is not None and k != DELIVERY_COUNT}
        given = sysprops.get("message-id")
        if given is not None and not (len(given) <= MAX_MESSAGE_ID and given.isascii() and given.isprintable()):
            raise InvalidInput(f"message id must be at most {MAX_MESSAGE_ID} printable ASCII characters")
        now = datetime.now(UTC)
        with self.store.session() as s:
            hub = s.scalars(select(LinkedHub).where(LinkedHub.name == hub_name)).first()
            if hub is None:
                raise NotFound(f"linked hub {hub_name!r} does not exist")
            # the device's row held to the commit (PostgreSQL's row lock; on SQLite the DELETE below takes the write
            # lock): concurrent senders take turns, so the count below is not read by two at once (20 senders at 45
            # queued left 57 on PostgreSQL); NO KEY UPDATE: foreign-key checks of other tables do not wait for it
            device = s.scalars(select(HubDevice).where(HubDevice.hub_id == hub.id,
                                                       HubDevice.device_key == device_id.lower())
                               .with_for_update(key_share=True)).first()
            if device is None:
                raise NotFound(f"device {device_id!r} does not exist in hub {hub_name!r}")
            self._sweep(s, now, (hub.id, device.device_key))
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

    def _sweep(self, s: Session, now: datetime, device: tuple[int, str] | None) -> None:
        """Delete expired messages (recording Expired feedback where asked): the device's always (through its index,
        so an enqueue's cost does not grow with the table), everyone's at most every ``SWEEP_INTERVAL`` seconds
        (there is no index on the expiry: a scan of the whole table each enqueue was slow at scale and made senders
        to different devices wait on each other's deletes). ``device`` None: only everyone's, when due."""
        where = [CloudToDeviceMessage.expires_at <= now]
        if time.monotonic() < self._next_sweep:
            if device is None:
                return
            where += [CloudToDeviceMessage.hub_id == device[0], CloudToDeviceMessage.device_key == device[1]]
        else:
            self._next_sweep = time.monotonic() + SWEEP_INTERVAL
        swept = s.execute(delete(CloudToDeviceMessage).where(*where).returning(*_ENDED)).all()
        feedback.record(s, swept, feedback.EXPIRED, now)
        if swept and self.on_expired is not None:
            self.on_expired(len(swept))

    def sweep_expired(self) -> None:
        """Every device's expired messages deleted, when the last sweep is ``SWEEP_INTERVAL`` old: their Expired
        feedback is owed even when nothing is sent to the hub any more (a feedback receiver's poll calls this)."""
        if time.monotonic() < self._next_sweep:
            return
        with self.store.session() as s:
            self._sweep(s, datetime.now(UTC), None)

    def pending(self, hub_id: int, device_key: str, *, skip: frozenset[int] | set[int] = frozenset()
                ) -> list[PendingMessage]:
        """The device's messages to deliver now, oldest first, each counted as delivered once more; ``skip``: those
        this connection has out already (not counted again). A message already delivered ``MAX_DELIVERY_COUNT`` times
        is dead-lettered (deleted) instead."""
        now = datetime.now(UTC)
        with self.store.session() as s:
            rows = s.execute(select(CloudToDeviceMessage.id, CloudToDeviceMessage.message_id,
                                    CloudToDeviceMessage.system_properties, CloudToDeviceMessage.properties,
                                    CloudToDeviceMessage.body).where(
                CloudToDeviceMessage.hub_id == hub_id, CloudToDeviceMessage.device_key == device_key,
                CloudToDeviceMessage.expires_at > now).order_by(CloudToDeviceMessage.id)).all()
            out: list[PendingMessage] = []
            counted: list[dict[str, Any]] = []
            dead: list[int] = []
            for pk, message_id, stored, properties, body in rows:
                if pk in skip:
                    continue
                system = dict(stored)
                count = system.pop(DELIVERY_COUNT, 0)
                count = count if isinstance(count, int) else 0
                if count >= MAX_DELIVERY_COUNT:
                    dead.append(pk)
                    log.info("cloud-to-device message %s for %r dead-lettered: delivered %d times without an "
                             "acknowledgement", message_id, device_key, count)
                    continue
                counted.append({"b_id": pk, "b_system": {**system, DELIVERY_COUNT: count + 1}})
                out.append(PendingMessage(pk, message_id, system, properties, body, count + 1))
            if counted:  # by primary key, one statement for the batch
                matched = getattr(s.execute(_COUNT_DELIVERY, counted), "rowcount", -1)  # -1: the driver cannot say
                if matched != len(counted):  # deleted since the read (purged, acknowledged elsewhere, swept): not sent
                    there = set(s.scalars(select(CloudToDeviceMessage.id).where(
                        CloudToDeviceMessage.id.in_([c["b_id"] for c in counted]))))
                    out = [m for m in out if m.pk in there]
            if dead:
                ended = s.execute(delete(CloudToDeviceMessage).where(CloudToDeviceMessage.id.in_(dead))
                                  .returning(*_ENDED)).all()
                feedback.record(s, ended, feedback.DELIVERY_COUNT_EXCEEDED, now)
            return out

    def not_delivered(self, messages: list[PendingMessage]) -> None:
        """Messages :meth:`pending` counted that were never sent (the connection ended first: a device that reads
        slowly, on a link that keeps dropping): their count goes back, so they are not dead-lettered for deliveries
        the device never got. A row gone meanwhile (acknowledged, purged) is left alone."""
        if messages:
            with self.store.session() as s:
                s.execute(_COUNT_DELIVERY, [{"b_id": m.pk, "b_system": {**m.system, DELIVERY_COUNT: m.delivery_count - 1}}
                                            for m in messages])

    def purge(self, hub_name: str, device_id: str) -> int:
        """Delete every message waiting for the device (IoT Hub's purge of its command queue); how many there were
        (expired ones not counted)."""
        now = datetime.now(UTC)
        with self.store.session() as s:
            hub = s.scalars(select(LinkedHub).where(LinkedHub.name == hub_name)).first()
            if hub is None:
                raise NotFound(f"linked hub {hub_name!r} does not exist")
            key = s.scalar(select(HubDevice.device_key).where(HubDevice.hub_id == hub.id,
                                                              HubDevice.device_key == device_id.lower()))
            if key is None:
                raise NotFound(f"device {device_id!r} does not exist in hub {hub_name!r}")
            self._sweep(s, now, (hub.id, key))  # expired ones are Expired (and counted so), not purged
            purged = s.execute(delete(CloudToDeviceMessage).where(
                CloudToDeviceMessage.hub_id == hub.id, CloudToDeviceMessage.device_key == key).returning(*_ENDED)).all()
            feedback.record(s, purged, feedback.PURGED, now)
            return len(purged)

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
        """The device acknowledged the message: deleted, with Success feedback if its sender asked."""
        with self.store.session() as s:
            ended = s.execute(delete(CloudToDeviceMessage).where(CloudToDeviceMessage.id == pk).returning(*_ENDED)).all()
            feedback.record(s, ended, feedback.SUCCESS, datetime.now(UTC))
