"""A PostgreSQL transaction aborted in a conflict with a concurrent one (a deadlock) is a retryable refusal, not a 500.

Why: unlinking a hub cascades over its devices while a device's session writes its connection state (its row, then
the hub's key): PostgreSQL found the deadlock and aborted the unlink, which answered 500 with a traceback (a CI run,
tests/test_management_races.py). The aborted transaction wrote nothing: a call whose one transaction is the whole of
it runs again (``Hubs.delete``), and any other is refused as retryable (HTTP 503, Retry-After). Real deadlocks here:
two connections updating two rows in opposite orders.
"""

from __future__ import annotations

import asyncio
import threading

from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from opendps.frontends.runtime import DomainRunner, StoreConflict
from opendps.store import Store, conflicted, unavailable


def _deadlock(store: Store) -> BaseException:
    """The error PostgreSQL gives the transaction it aborts to break a real deadlock."""
    with store.engine.begin() as setup:
        setup.execute(text("CREATE TABLE IF NOT EXISTS deadlock_probe (id int PRIMARY KEY, v int)"))
        setup.execute(text("INSERT INTO deadlock_probe VALUES (1, 0), (2, 0) ON CONFLICT DO NOTHING"))
    first, second = store.engine.connect(), store.engine.connect()
    errors: list[BaseException] = []
    try:
        first.execute(text("UPDATE deadlock_probe SET v = v + 1 WHERE id = 1"))
        second.execute(text("UPDATE deadlock_probe SET v = v + 1 WHERE id = 2"))

        def crossing() -> None:
            try:
                first.execute(text("UPDATE deadlock_probe SET v = v + 1 WHERE id = 2"))
            except Exception as exc:  # noqa: BLE001 - kept for the assertion
                errors.append(exc)
                first.rollback()

        thread = threading.Thread(target=crossing)
        thread.start()
        try:
            second.execute(text("UPDATE deadlock_probe SET v = v + 1 WHERE id = 1"))
        except Exception as exc:  # noqa: BLE001 - kept for the assertion
            errors.append(exc)
            second.rollback()
        thread.join(30)
    finally:
        first.close()
        second.close()
    assert len(errors) == 1, errors  # one of the two is aborted, the other goes on
    return errors[0]


def test_a_deadlock_is_a_conflict_not_an_outage_nor_bad_data(pg_store):
    aborted = _deadlock(pg_store)
    assert conflicted(aborted) and not unavailable(aborted)
    duplicate = IntegrityError("INSERT", {}, Exception("duplicate key"))
    assert not conflicted(duplicate) and not conflicted(RuntimeError("other"))


def test_a_domain_call_aborted_by_a_deadlock_is_a_retryable_refusal(pg_store):
    """Through the domain runner: a 503 with Retry-After, not the driver's error (a 500 and a traceback)."""
    runner = DomainRunner(2)

    def call() -> None:
        raise _deadlock(pg_store)

    async def main() -> BaseException:
        try:
            await runner.run(call)
        except Exception as exc:  # noqa: BLE001 - what the front end would map
            return exc
        raise AssertionError("the call did not fail")

    try:
        refused = asyncio.run(main())
    finally:
        runner.close()
    assert isinstance(refused, StoreConflict) and refused.status == 503 and refused.info["retryAfter"] == "1"
    assert not runner.outage.since  # not an outage: nothing says the database went away
