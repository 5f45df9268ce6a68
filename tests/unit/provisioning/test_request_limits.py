"""The DPS request limits are shared through the store: two ``Store`` objects on one database stand for two server
processes (or nodes), and the limit holds across them, under concurrency too (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import text
from tests.conftest import installation
from tests.unit.conftest import creds, new_key, statements_run, symmetric_group
from tests.unit.provisioning.test_allocation import webhook

from opendps.errors import Throttled
from opendps.pki import KeyStore
from opendps.provisioning.attestation import AttestationFailed
from opendps.provisioning.throttle import PollThrottle, RegistrationLimit
from opendps.store import Store
from opendps.transport.sas import derive_device_key


@pytest.fixture
def second_store(store):
    """Another process on the same database."""
    other = Store(store.url)
    yield other
    other.dispose()


@pytest.fixture
def second_services(second_store, master_key):
    keys = KeyStore(second_store, master_key)
    keys.check_master_key()
    return installation(second_store, keys)


def _rows(store: Store) -> dict[tuple[str, str], str]:
    with store.engine.connect() as conn:
        return {(r.name, r.registration_key): r.arrivals
                for r in conn.execute(text("SELECT name, registration_key, arrivals FROM request_limits"))}


def _refused(check, *args, **kwargs) -> Throttled:
    with pytest.raises(Throttled) as info:
        check(*args, **kwargs)
    return info.value


def test_the_limit_holds_across_two_processes(store, second_store):
    a, b = PollThrottle(store), PollThrottle(second_store)
    for i in range(5):  # 5 polls per 10 s, wherever they land
        (a if i % 2 else b).check("Dev-1", now=1000.0 + i)
    error = _refused(b.check, "dev-1", now=1005.0)  # ids are case-insensitive
    assert error.status == 429 and error.info == {"retryAfter": "5"}
    assert error.message == "too many requests for registration 'dev-1': at most 5 per 10 s; retry after 5 s"
    assert _refused(a.check, "DEV-1", now=1005.5).info == {"retryAfter": "5"}  # A learns it from the store
    a.check("dev-2", now=1005.0)  # another id has its own allowance
    RegistrationLimit(store).check("dev-1", now=1005.0)  # and another limit its own row
    assert sorted(_rows(store)) == [("poll", "dev-1"), ("poll", "dev-2"), ("register", "dev-1")]


def test_the_window_slides_and_a_refusal_leaves_no_trace(store, second_store):
    a, b = PollThrottle(store, limit=3, window=10), PollThrottle(second_store, limit=3, window=10)
    for t in (1000.0, 1003.0, 1006.0):
        a.check("slider", now=t)
    assert _refused(a.check, "slider", now=1009.0).info == {"retryAfter": "1"}  # 1000 leaves at 1010
    assert _refused(b.check, "slider", now=1009.2).info == {"retryAfter": "1"}  # the store says so, not a's memory
    b.check("slider", now=1010.0)  # exactly a window after the oldest: it has left (a fixed window would wait)
    error = _refused(a.check, "slider", now=1011.0)  # 1003, 1006, 1010 are in (1001, 1011]
    assert "retry after 2 s" in error.message and error.info == {"retryAfter": "2"}  # 1003 leaves at 1013
    a.check("slider", now=1013.0)
    b.check("slider", now=1016.0)
    assert _refused(b.check, "slider", now=1016.5).info == {"retryAfter": "4"}  # 1010 leaves at 1020
    # refused requests were never counted: the log holds the last limit + 1 admitted arrivals only
    stamps = _rows(store)[("poll", "slider")]
    assert [int(stamps[i:i + 13]) for i in range(0, len(stamps), 13)] == [1006000, 1010000, 1013000, 1016000]


def test_the_log_stays_bounded(store):
    limit = PollThrottle(store, limit=2, window=10)
    for i in range(40):
        limit.check("steady", now=1000.0 + 6 * i)  # one every 6 s: never more than 2 in 10 s
    assert len(_rows(store)[("poll", "steady")]) == 3 * 13


def test_a_refusal_is_answered_from_memory_while_it_holds(store):
    limit = PollThrottle(store, limit=1, window=10)
    limit.check("known", now=1000.0)
    _refused(limit.check, "known", now=1001.0)
    statements, stop = statements_run(store)
    try:
        assert _refused(limit.check, "known", now=1002.0).info == {"retryAfter": "8"}
        assert _refused(limit.check_known, "known", now=1009.5).info == {"retryAfter": "1"}
        assert statements == []
        limit.check_known("known", now=1010.0)  # over: the store decides again
        limit.check("known", now=1010.0)
        assert len(statements) == 1
    finally:
        stop()


@pytest.mark.parametrize("limit_class", [PollThrottle, RegistrationLimit])
def test_concurrent_checks_never_let_more_than_the_limit_through(store, second_store, limit_class):
    """16 threads of two processes, each with its own limit object (no shared memory), half of them counting in
    a transaction of their caller's as a registration does: exactly ``limit`` get through."""
    allowed = 7
    admitted: list[int] = []
    refused: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(16)

    def worker(n: int) -> None:
        st = store if n % 2 else second_store
        limit = limit_class(st, limit=allowed, window=60)
        try:
            barrier.wait()
            for _ in range(4):
                try:
                    if n % 4 < 2:
                        limit.check("contended")
                    else:
                        with st.session() as s:
                            limit.check("contended", within=s)
                    admitted.append(n)
                except Throttled:
                    refused.append(n)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert (len(admitted), len(refused)) == (allowed, 64 - allowed)
    stamps = _rows(store)[(limit_class.name, "contended")]
    assert len(stamps) == allowed * 13  # only the admitted ones were written


def test_old_rows_are_swept(store):
    limit = PollThrottle(store, limit=2, window=10)
    limit.check("old", now=1000.0)
    limit.check("new", now=1012.0)
    RegistrationLimit(store).check("old", now=1000.0)  # a 60 s window: kept until 1060
    assert limit.sweep(now=1015.0) == 1  # old's poll row: its newest arrival left its window at 1010
    assert sorted(_rows(store)) == [("poll", "new"), ("register", "old")]
    limit.sweep_every = 0.0  # the check path sweeps every few minutes; now at once
    limit.check("other", now=1061.0)
    assert sorted(_rows(store)) == [("poll", "other")]


def test_registrations_are_limited_across_two_processes(services, second_services):
    """10 attested registrations a minute per id, counted in each registration's own write transaction."""
    key = symmetric_group(services, "limited")
    rid = "roaming"
    good = creds(rid, key=derive_device_key(key, rid))
    with pytest.raises(AttestationFailed):  # without the credential nothing is counted
        second_services.provisioning.register(creds(rid, key=new_key()))
    for i in range(10):
        (services if i % 2 else second_services).provisioning.register(good)
    error = _refused(second_services.provisioning.register, good)
    assert error.status == 429 and "at most 10 per 60 s" in error.message and int(error.info["retryAfter"]) >= 50
    _refused(services.provisioning.register, good)
    with services.store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM operations")).scalar() == 10  # refusals rolled back
    services.provisioning.register(creds("neighbour", key=derive_device_key(key, "neighbour")))


def test_polls_are_limited_across_two_processes(services, second_services):
    key = symmetric_group(services, "polled")
    device = creds("poller", key=derive_device_key(key, "poller"))
    services.provisioning.register(device)
    for i in range(5):
        assert (services if i % 2 else second_services).provisioning.status(device)["status"] == "assigned"
    error = _refused(services.provisioning.status, device)
    assert error.message.startswith("too many requests for registration 'poller': at most 5 per 10 s")


def test_a_failed_allocation_counts_and_a_known_refusal_spares_the_webhook(services):
    with webhook({}, 500) as (url, seen):
        services.hubs.create("east", "east.hubs.test")
        key = symmetric_group(services, "hooked", allocationPolicy="custom", iotHubs=["east"],
                              customAllocationDefinition={"webhookUrl": url, "apiVersion": "2021-10-01"})
        device = creds("hooked-1", key=derive_device_key(key, "hooked-1"))
        for _ in range(10):
            services.provisioning.register(device)  # a failed operation each time
        _refused(services.provisioning.register, device)  # the 11th: the webhook was asked, then the store refused
        _refused(services.provisioning.register, device)  # this process knows now: no webhook call, no statement
    assert len(seen) == 11


@pytest.mark.parametrize("limit_class", [PollThrottle, RegistrationLimit])
def test_a_clock_stepped_back_does_not_lock_a_device_out_for_the_step(store, limit_class):
    """NTP steps the clock back an hour after a device used its allowance: its arrivals lie an hour in the future and
    each request was refused with Retry-After 3610 until the clock caught up (this process remembered the refusal
    too). Now arrivals a step left more than a window ahead count for nothing: the device is answered as if new."""
    limit = limit_class(store)
    for i in range(limit.limit):
        limit.check("dev-step", now=10_000.0 + i * 0.1)
    assert int(_refused(limit.check, "dev-step", now=10_000.9).info["retryAfter"]) <= limit.window  # holds before
    stepped = 10_000.0 - 3600
    limit.check_known("dev-step", now=stepped)  # the refusal remembered before the step is forgotten
    for i in range(limit.limit):
        limit.check("dev-step", now=stepped + i * 0.1)
    _refused(limit.check, "dev-step", now=stepped + 1)  # and the limit holds again on the new clock
