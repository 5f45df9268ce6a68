"""Telemetry and C2D rules in-process: what a device or the service sends cannot break readers (issue 12.5); the C2D
queue's IoT Hub semantics (bound, delivery count, purge, a deleted device's queue)."""

from __future__ import annotations

import json
import math
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event, select, update

from opendps.errors import InvalidInput, NotFound
from opendps.hub import feedback, messaging
from opendps.hub.messaging import MAX_PENDING, QueueFull, time_to_live
from opendps.hub.registry import DeviceCredential
from opendps.hub.telemetry import parse_property_bag
from opendps.store import CloudToDeviceMessage
from opendps.store.models import CloudToDeviceFeedback


def test_an_event_too_deep_to_decode_is_shown_as_text(services):
    hub = services.hubs.get("default")
    deep = b"[" * 30000 + b"]" * 30000
    services.telemetry.append_many([(hub.id, "dev-t1", {}, {}, deep), (hub.id, "dev-t1", {}, {}, b'{"ok": [1]}')])
    first, second = (e.to_wire()["event"]["payload"] for e in services.telemetry.read("default"))
    assert first == deep.decode() and second == {"ok": [1]}


@pytest.mark.parametrize("seconds", [math.inf, -math.inf, math.nan, 1e400, 1e300, 0.5, -5, 2 * 86400 + 1])
def test_a_time_to_live_out_of_range_is_refused_not_overflowed(seconds):
    with pytest.raises(InvalidInput, match="1 second to 2 days"):
        time_to_live(seconds)


def test_a_message_id_the_column_cannot_hold_is_refused(services):
    """``iothub-messageid`` is at most 128 printable ASCII characters (IoT Hub's limit and the column's): longer was
    stored on SQLite and PostgreSQL's DataError (a 500) there."""
    services.hubs.create_device("default", "c2d-id")
    for bad in ("m" * 129, "a\x00b", "caf\u00e9"):
        with pytest.raises(InvalidInput, match="message id must be at most 128"):
            services.c2d.enqueue("default", "c2d-id", b"x", system={"message-id": bad})
    assert services.c2d.enqueue("default", "c2d-id", b"x", system={"message-id": "m" * 128}).message_id == "m" * 128


def test_a_time_to_live_in_range():
    assert time_to_live(1).total_seconds() == 1 and time_to_live(172800).days == 2


def test_property_bags_parse_alike_cached_or_not_and_each_caller_owns_its_dicts():
    sdk = "%24.ct=application%2Fjson&%24.ce=utf-8&alert=high%20temp&flag"
    expected = ({"content-type": "application/json", "content-encoding": "utf-8"}, {"alert": "high temp", "flag": None})
    first = parse_property_bag(sdk)
    assert first == expected
    first[0]["content-type"] = "changed"  # a caller's change does not reach the next message with the same bag
    first[1].clear()
    assert parse_property_bag(sdk) == expected
    long = sdk + "&" + "&".join(f"k{i}=v%20{i}" for i in range(60))  # past the cached size: parsed each time
    system, application = parse_property_bag(long)
    assert system == expected[0] and application["k59"] == "v 59" and len(application) == 62


def test_deleting_a_device_deletes_its_queue(services):
    """A device deleted with messages waiting kept them (no foreign key ties the queue to the identity), and a device
    created again with that id — a new device to IoT Hub, with a new generation id — was handed the old one's."""
    services.hubs.create_device("default", "C2D-Gone")
    services.c2d.enqueue("default", "c2d-gone", b"for the old device")
    services.hubs.delete_device("default", "c2d-gone")
    services.hubs.create_device("default", "c2d-gone")
    assert services.c2d.pending(services.hubs.get("default").id, "c2d-gone") == []
    with pytest.raises(NotFound):
        services.c2d.enqueue("default", "nobody-here", b"x")


def test_concurrent_senders_cannot_pass_the_bound_of_50(services):
    """The count and the insert did not take turns: 20 senders at once to a device with 45 queued left 57 on
    PostgreSQL. They now hold the device's row until their commit."""
    services.hubs.create_device("default", "c2d-race")
    for _ in range(45):
        services.c2d.enqueue("default", "c2d-race", b"x")
    refused: list[str] = []
    start = threading.Barrier(20)

    def send() -> None:
        start.wait()
        try:
            services.c2d.enqueue("default", "c2d-race", b"y")
        except QueueFull:
            refused.append("full")

    senders = [threading.Thread(target=send) for _ in range(20)]
    for t in senders:
        t.start()
    for t in senders:
        t.join(30)
    assert len(services.c2d.pending(services.hubs.get("default").id, "c2d-race")) == MAX_PENDING
    assert len(refused) == 20 - (MAX_PENDING - 45)


def test_a_message_delivered_max_delivery_count_times_without_an_ack_is_dead_lettered(services):
    """MQTT cannot reject: a device that crashes on a message before its PUBACK got it on every reconnect until it
    expired (up to 2 days). IoT Hub dead-letters it after maxDeliveryCount (10) deliveries; the others stay."""
    services.hubs.create_device("default", "c2d-poison")
    hub = services.hubs.get("default")
    poison = services.c2d.enqueue("default", "c2d-poison", b"crashes the device")
    counts = []
    for _ in range(messaging.MAX_DELIVERY_COUNT):  # each reconnect reads the queue and sends it again
        [message] = services.c2d.pending(hub.id, "c2d-poison")
        counts.append(message.delivery_count)
        assert "delivery" not in message.topic("c2d-poison")  # the count is the queue's, not a property sent
    assert counts == list(range(1, messaging.MAX_DELIVERY_COUNT + 1))
    later = services.c2d.enqueue("default", "c2d-poison", b"fine")
    # a read that skips what its connection has out already counts only what it sends
    assert [m.message_id for m in services.c2d.pending(hub.id, "c2d-poison", skip={later.pk})] == []
    [left] = services.c2d.pending(hub.id, "c2d-poison")
    assert left.message_id == later.message_id != poison.message_id and left.delivery_count == 1
    # a sender cannot set the count
    spoofed = services.c2d.enqueue("default", "c2d-poison", b"z", system={messaging.DELIVERY_COUNT: "99"})
    assert [m.delivery_count for m in services.c2d.pending(hub.id, "c2d-poison") if m.pk == spoofed.pk] == [1]


def test_purge_empties_one_device_queue_and_says_how_many(services):
    for device in ("c2d-purge", "c2d-keep"):
        services.hubs.create_device("default", device)
        for n in range(3):
            services.c2d.enqueue("default", device, f"m{n}".encode())
    services.c2d.enqueue("default", "c2d-purge", b"gone soon", ttl=timedelta(seconds=1))
    hub = services.hubs.get("default")
    with services.store.session() as s:  # the short-lived one has expired: not counted as purged
        s.execute(update(CloudToDeviceMessage).where(CloudToDeviceMessage.body == b"gone soon").values(
            expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    assert services.c2d.purge("default", "C2D-PURGE") == 3
    assert services.c2d.pending(hub.id, "c2d-purge") == [] and len(services.c2d.pending(hub.id, "c2d-keep")) == 3
    assert services.c2d.purge("default", "c2d-purge") == 0
    with pytest.raises(NotFound):
        services.c2d.purge("default", "nobody-here")


def test_a_device_reprovisioned_to_another_hub_leaves_no_queue_behind(services):
    """A registration that moves the device to another hub deletes its identity in the old one, and with it the old
    hub's queue: linked again there later, it would otherwise be handed messages meant for its earlier life."""
    old = services.hubs.get("default")
    new = services.hubs.create("c2d-other")
    services.hubs.create_device("default", "c2d-mover")
    services.c2d.enqueue("default", "c2d-mover", b"meant for the old placement")
    with services.store.session() as s:
        services.hubs.place_device(s, new, "c2d-mover", DeviceCredential("certificateAuthority"),
                                   previous=(old, "c2d-mover"))
    services.hubs.create_device("default", "c2d-mover")  # back in the first hub, a new identity
    assert services.c2d.pending(old.id, "c2d-mover") == []


def _feedback_rows(services) -> list[CloudToDeviceFeedback]:
    with services.store.session() as s:
        rows = s.scalars(select(CloudToDeviceFeedback).order_by(CloudToDeviceFeedback.id)).all()
        s.expunge_all()
        return list(rows)


def test_feedback_records_each_outcome_its_sender_asked_for(services):
    """IoT Hub's message feedback: ``iothub-ack`` positive → Success when the device completes it, negative → the
    failures (Expired, DeliveryCountExceeded, Purged), full → both, none/absent → nothing. Nothing was recorded: a
    service's feedback receiver waited empty for every outcome."""
    device, _ = services.hubs.create_device("default", "Fb-Dev")
    hub = services.hubs.get("default")
    sent = {}
    for ack in ("none", "positive", "negative", "FULL", None):
        for outcome in ("done", "expire", "dead", "purge"):
            system = {"message-id": f"{outcome}-{ack}"} | ({"ack": ack} if ack else {})
            sent[(outcome, ack)] = services.c2d.enqueue("default", "fb-dev", b"x", system=system)
    for (outcome, _), message in sent.items():  # each "done" one acknowledged by the device (PUBACK)
        if outcome == "done":
            services.c2d.complete(message.pk)
    with services.store.session() as s:
        s.execute(update(CloudToDeviceMessage).where(CloudToDeviceMessage.message_id.like("expire-%")).values(
            expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    services.c2d._next_sweep = 0.0  # the sweep is due
    services.c2d.sweep_expired()
    for _ in range(messaging.MAX_DELIVERY_COUNT + 1):  # the "dead" ones (and "purge" ones) delivered without PUBACK
        services.c2d.pending(hub.id, "fb-dev", skip={m.pk for (o, _), m in sent.items() if o == "purge"})
    assert services.c2d.purge("default", "fb-dev") == 5
    batch = services.c2d.feedback.claim("default")
    assert batch is not None and len(batch.tag) == 16
    got = {(r["originalMessageId"], r["statusCode"]) for r in batch.records}
    assert got == {("done-positive", "Success"), ("done-FULL", "Success"),
                   ("expire-negative", "Expired"), ("expire-FULL", "Expired"),
                   ("dead-negative", "DeliveryCountExceeded"), ("dead-FULL", "DeliveryCountExceeded"),
                   ("purge-negative", "Purged"), ("purge-FULL", "Purged")}
    record = next(r for r in batch.records if r["originalMessageId"] == "done-positive")
    assert record["deviceId"] == "Fb-Dev" and record["deviceGenerationId"] == device.generation_id
    assert record["description"] == "Success"
    assert datetime.strptime(record["enqueuedTimeUtc"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC) <= \
        datetime.now(UTC)
    assert json.loads(batch.body()) == batch.records
    assert services.c2d.feedback.claim("other-hub-none") is None


def test_feedback_batches_are_locked_until_completed_or_abandoned(services):
    """Each record reaches a receiver that settles it at least once: a claimed batch is not handed to another
    receiver while locked; abandoned (or its lock lapsed) it comes again; completed it is gone."""
    services.hubs.create_device("default", "fb-lock")
    for n in range(3):
        message = services.c2d.enqueue("default", "fb-lock", b"x", system={"message-id": f"lock-{n}", "ack": "full"})
        services.c2d.complete(message.pk)
    queue = services.c2d.feedback
    first = queue.claim("default", limit=2)
    assert first is not None and [r["originalMessageId"] for r in first.records] == ["lock-0", "lock-1"]
    second = queue.claim("default")
    assert second is not None and [r["originalMessageId"] for r in second.records] == ["lock-2"]
    assert queue.claim("default") is None  # all locked
    assert queue.abandon(first.lock_token) == 2
    again = queue.claim("default")
    assert again is not None and [r["originalMessageId"] for r in again.records] == ["lock-0", "lock-1"]
    assert queue.abandon(first.lock_token) == 0  # a stale token frees nothing another claim holds
    assert queue.complete(again.lock_token) == 2
    with services.store.session() as s:  # the lock lapses: delivered again to whoever asks
        s.execute(update(CloudToDeviceFeedback).values(locked_until=datetime.now(UTC) - timedelta(seconds=1)))
    lapsed = queue.claim("default")
    assert lapsed is not None and [r["originalMessageId"] for r in lapsed.records] == ["lock-2"]
    assert queue.complete(second.lock_token) == 0 and queue.complete(lapsed.lock_token) == 1
    assert _feedback_rows(services) == [] and queue.claim("default") is None


def test_feedback_is_bounded_by_its_time_to_live_and_a_cap_per_hub(services, monkeypatch):
    monkeypatch.setattr(feedback, "MAX_PER_HUB", 3)
    services.hubs.create_device("default", "fb-cap")
    for n in range(5):
        message = services.c2d.enqueue("default", "fb-cap", b"x", system={"message-id": f"cap-{n}", "ack": "positive"})
        services.c2d.complete(message.pk)
    assert [r.message_id for r in _feedback_rows(services)] == ["cap-2", "cap-3", "cap-4"]  # the oldest went
    with services.store.session() as s:
        s.execute(update(CloudToDeviceFeedback).where(CloudToDeviceFeedback.message_id == "cap-2").values(
            expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    batch = services.c2d.feedback.claim("default")
    assert batch is not None and [r["originalMessageId"] for r in batch.records] == ["cap-3", "cap-4"]
    assert [r.message_id for r in _feedback_rows(services)] == ["cap-3", "cap-4"]  # the expired one deleted


def test_a_delivery_read_survives_messages_deleted_before_it_counts_them(services):
    """``pending`` reads the queue, then counts the delivery of what it read by primary key (ORM bulk UPDATE). A
    message deleted in between — purged, acknowledged on the device's other connection, expired by a sweep — made
    that UPDATE match fewer rows: StaleDataError, so the delivery failed and nothing at all went out to the device.
    Now the read goes on without them (and does not send what was purged)."""
    services.hubs.create_device("default", "c2d-stale")
    hub = services.hubs.get("default")
    for n in range(3):
        services.c2d.enqueue("default", "c2d-stale", f"m{n}".encode())
    armed = [True]

    def purge_after_the_read(conn, cursor, statement, parameters, context, executemany) -> None:
        if armed[0] and statement.lstrip().upper().startswith("SELECT") and "FROM c2d_messages" in statement \
                and "ORDER BY" in statement:
            armed[0] = False
            assert services.c2d.purge("default", "c2d-stale") == 3  # another connection, committed
            services.c2d.enqueue("default", "c2d-stale", b"after the purge")

    event.listen(services.store.engine, "after_cursor_execute", purge_after_the_read)
    try:
        got = services.c2d.pending(hub.id, "c2d-stale")
    finally:
        event.remove(services.store.engine, "after_cursor_execute", purge_after_the_read)
    assert not armed[0] and got == []  # what was read is gone: nothing purged is sent
    [later] = services.c2d.pending(hub.id, "c2d-stale")
    assert later.body == b"after the purge" and later.delivery_count == 1
