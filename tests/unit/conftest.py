"""Domain tests: the services wired in-process on the store fixture (SQLite and PostgreSQL), no server process.

Helpers here speak to the domain the way front ends do: :func:`creds` is what a front end extracts from a
device request, :func:`register` what the HTTPS routes call.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable
from typing import Any

import pytest
from tests.conftest import TEST_ID_SCOPE, database, migrated_store

from opendps.provisioning.attestation import HTTPS, DeviceCredentials
from opendps.provisioning.registration import Accepted
from opendps.services import Services
from opendps.store import Store
from opendps.transport import sas


def new_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def device_sas(rid: str, key: str, scope: str = TEST_ID_SCOPE) -> str:
    return sas.generate(f"{scope}/registrations/{rid}", key, "registration")


def creds(rid: str, *, key: str | None = None, chain: tuple = (), evidence: dict[str, Any] | None = None,
          transport: str = HTTPS, scope: str = TEST_ID_SCOPE) -> DeviceCredentials:
    return DeviceCredentials(scope, rid, device_sas(rid, key, scope) if key else None, tuple(chain), evidence or {},
                             transport)


def register(services: Services, credentials: DeviceCredentials, **kwargs: Any) -> dict[str, Any]:
    """Register, then read the operation's final result as a poll would."""
    accepted = services.provisioning.register(credentials, **kwargs)
    assert isinstance(accepted, Accepted), accepted
    return services.provisioning.operation(credentials, accepted.operation_id)


def symmetric_group(services: Services, group_id: str, **doc: Any) -> str:
    """A symmetric-key enrollment group; returns its primary key."""
    view, _ = services.enrollments.put("group", group_id, {"attestation": {"type": "symmetricKey"}, **doc})
    assert view.keys is not None
    return view.keys[0]


def statements_run(store: Store, *, prepared: bool = True) -> tuple[list[str], Callable[[], None]]:
    """The SQL statements run from now until the returned ``stop()``: through SQLAlchemy and, with ``prepared``, on
    the driver's cursor (opendps.store.Prepared, which SQLAlchemy's events do not see)."""
    from sqlalchemy import event

    from opendps.store import Prepared
    seen: list[str] = []

    def record(conn, cursor, sql, *args) -> None:
        seen.append(" ".join(sql.split()))

    originals = {method: getattr(Prepared, method) for method in ("first", "all", "run", "many")} if prepared else {}
    for method, run in originals.items():
        def recorded(self, cursor, *args, _run=run, **values):
            seen.append(" ".join(self.sql.split()))
            return _run(self, cursor, *args, **values)
        setattr(Prepared, method, recorded)

    def stop() -> None:
        event.remove(store.engine, "before_cursor_execute", record)
        for method, run in originals.items():
            setattr(Prepared, method, run)

    event.listen(store.engine, "before_cursor_execute", record)
    return seen, stop


@pytest.fixture
def pg_store(tmp_path):
    """A migrated store on a PostgreSQL database of its own (the test skips without PostgreSQL, fails in CI)."""
    with database("postgresql", tmp_path) as url:
        s = migrated_store(url)
        yield s
        s.dispose()
