"""Cloud-to-device feedback: the outcome of each C2D message whose sender asked for it, for a service's receiver.

IoT Hub's contract (its "message feedback"; C#'s ``FeedbackReceiver``, Node's ``getFeedbackReceiver``): a message sent
with ``iothub-ack`` = ``positive`` gets a ``Success`` record when the device completes it, ``negative`` one of
``Expired``, ``DeliveryCountExceeded``, ``Rejected`` or ``Purged`` when it ends otherwise, ``full`` both; ``none`` (the
default) nothing. Records go out in batches on ``/messages/servicebound/feedback``: content type
``application/vnd.microsoft.iothub.feedback.json``, body a JSON array of ``{originalMessageId, description,
deviceGenerationId, deviceId, enqueuedTimeUtc, statusCode}``. A batch is locked while it is out; the receiver completes
it (AMQP accepted: deleted) or abandons it (any other outcome, or its link going away: delivered again), and a lock
that lapses (``LOCK_DURATION``, IoT Hub's default 60 s) frees it for another receiver: each record reaches a receiver
that settles it at least once.

Why a table and not a process's queue: the outcome happens where the device is connected (any worker, any node),
the receiver may be served anywhere else, and a restart must not lose what is owed. Bounded: records expire after
``FEEDBACK_TTL`` (IoT Hub's default feedback time to live, 1 hour) and a hub keeps at most ``MAX_PER_HUB`` (the
oldest go first: nobody reads them). Records are written in the transaction that deletes the messages, so an outcome
and its record commit together.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, insert, or_, select, tuple_, update
from sqlalchemy.orm import Session

from opendps.store import HubDevice, LinkedHub, Store
from opendps.store.models import CloudToDeviceFeedback

SUCCESS = "Success"
EXPIRED = "Expired"
DELIVERY_COUNT_EXCEEDED = "DeliveryCountExceeded"
REJECTED = "Rejected"  # not produced: MQTT devices cannot reject (kept for the wire's list)
PURGED = "Purged"
DESCRIPTIONS = {SUCCESS: "Success", EXPIRED: "Message expired",
                DELIVERY_COUNT_EXCEEDED: "Message delivery count exceeded", REJECTED: "Message rejected",
                PURGED: "Message purged"}
CONTENT_TYPE = "application/vnd.microsoft.iothub.feedback.json"
FEEDBACK_TTL = timedelta(hours=1)
LOCK_DURATION = timedelta(seconds=60)
MAX_PER_HUB = 10_000
BATCH = 64  # records per feedback message


def wanted(ack: Any, status: str) -> bool:
    """Whether a message sent with this ``iothub-ack`` asks for a record of ``status`` (case-insensitive, as the SDKs
    send lower case; anything else is ``none``)."""
    asked = str(ack).lower() if ack is not None else "none"
    return asked in ("full", "positive" if status == SUCCESS else "negative")


def record(s: Session, ended: Iterable[Sequence[Any]], status: str, now: datetime) -> int:
    """Record ``status`` for the messages in ``ended`` — rows (hub id, device key, message id, system properties) of
    messages just deleted in ``s`` — whose ``ack`` asks for it; how many were recorded. Nothing is read for messages
    without such an ack, the common case."""
    asked = [(hub_id, key, message_id) for hub_id, key, message_id, system in ended
             if wanted((system or {}).get("ack"), status)]
    if not asked:
        return 0
    devices = {(h, k): (d, g) for h, k, d, g in s.execute(
        select(HubDevice.hub_id, HubDevice.device_key, HubDevice.device_id, HubDevice.generation_id).where(
            tuple_(HubDevice.hub_id, HubDevice.device_key).in_(sorted({(h, k) for h, k, _ in asked}))))}
    s.execute(insert(CloudToDeviceFeedback), [
        {"hub_id": hub_id, "device_id": devices.get((hub_id, key), (key, ""))[0],
         "generation_id": devices.get((hub_id, key), (key, ""))[1], "message_id": message_id, "status": status,
         "enqueued_at": now, "expires_at": now + FEEDBACK_TTL} for hub_id, key, message_id in asked])
    for hub_id in {h for h, _, _ in asked}:
        s.execute(delete(CloudToDeviceFeedback).where(CloudToDeviceFeedback.hub_id == hub_id,
                                                      CloudToDeviceFeedback.expires_at <= now))
        held = s.scalar(select(func.count()).select_from(CloudToDeviceFeedback).where(
            CloudToDeviceFeedback.hub_id == hub_id)) or 0
        if held > MAX_PER_HUB:  # the oldest go: a hub nobody reads feedback for cannot grow the table without end
            oldest = select(CloudToDeviceFeedback.id).where(CloudToDeviceFeedback.hub_id == hub_id).order_by(
                CloudToDeviceFeedback.id).limit(held - MAX_PER_HUB).scalar_subquery()
            s.execute(delete(CloudToDeviceFeedback).where(CloudToDeviceFeedback.id.in_(oldest)))
    return len(asked)


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class FeedbackBatch:
    """Records claimed by one delivery: ``lock_token`` (32 hex digits; the AMQP delivery tag is its 16 bytes) settles
    them."""

    lock_token: str
    records: list[dict[str, str]]
    enqueued_at: datetime

    @property
    def tag(self) -> bytes:
        """The AMQP delivery tag: C#'s receiver reads it as a GUID (``new Guid(tag)``: exactly 16 bytes)."""
        return bytes.fromhex(self.lock_token)

    def body(self) -> bytes:
        return json.dumps(self.records, separators=(",", ":")).encode()


class FeedbackQueue:
    """Claim, complete and abandon a hub's feedback records (the store's, shared by every worker and node)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def claim(self, hub_name: str, limit: int = BATCH) -> FeedbackBatch | None:
        """Lock up to ``limit`` of the hub's oldest records that are free (never claimed, abandoned, or their lock
        lapsed) for ``LOCK_DURATION``; None when there are none. Safe against concurrent claimers on any backend: the
        UPDATE takes only rows still free, and the batch is what it took. A look that finds nothing only reads (it
        runs every second per receiver: a write each time would take SQLite's write lock from everyone else);
        expired records are deleted when something is claimed or recorded."""
        now = datetime.now(UTC)
        token = uuid.uuid4().hex
        with self.store.session() as s:
            hub_id = s.scalar(select(LinkedHub.id).where(LinkedHub.name == hub_name))
            if hub_id is None:
                return None
            mine = CloudToDeviceFeedback.hub_id == hub_id
            free = or_(CloudToDeviceFeedback.lock_token.is_(None), CloudToDeviceFeedback.locked_until <= now)
            ids = s.scalars(select(CloudToDeviceFeedback.id).where(mine, free, CloudToDeviceFeedback.expires_at > now)
                            .order_by(CloudToDeviceFeedback.id).limit(limit).with_for_update(skip_locked=True)).all()
            if not ids:
                return None
            s.execute(delete(CloudToDeviceFeedback).where(mine, CloudToDeviceFeedback.expires_at <= now))
            s.execute(update(CloudToDeviceFeedback).where(CloudToDeviceFeedback.id.in_(ids), free).values(
                lock_token=token, locked_until=now + LOCK_DURATION))
            rows = s.scalars(select(CloudToDeviceFeedback).where(CloudToDeviceFeedback.lock_token == token)
                             .order_by(CloudToDeviceFeedback.id)).all()
            if not rows:
                return None
            return FeedbackBatch(token, [{
                "originalMessageId": r.message_id, "description": DESCRIPTIONS.get(r.status, r.status),
                "deviceGenerationId": r.generation_id, "deviceId": r.device_id,
                "enqueuedTimeUtc": _utc(r.enqueued_at), "statusCode": r.status} for r in rows], now)

    def complete(self, lock_token: str) -> int:
        """The receiver accepted the batch: its records are deleted, also if the lock lapsed meanwhile; records another
        receiver claimed after that lapse carry its token, so they stay and arrive there too (at least once); how
        many."""
        with self.store.session() as s:
            done = s.execute(delete(CloudToDeviceFeedback).where(CloudToDeviceFeedback.lock_token == lock_token))
            return int(getattr(done, "rowcount", 0) or 0)

    def abandon(self, lock_token: str) -> int:
        """The receiver released, rejected or dropped the batch: its records are free again (those another claim took
        after the lock lapsed stay that claim's); how many."""
        with self.store.session() as s:
            freed = s.execute(update(CloudToDeviceFeedback).where(CloudToDeviceFeedback.lock_token == lock_token)
                              .values(lock_token=None, locked_until=None))
            return int(getattr(freed, "rowcount", 0) or 0)
