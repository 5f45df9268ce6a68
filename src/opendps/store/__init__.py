"""The one persistence layer: SQLAlchemy 2 models and Alembic migrations.

SQLite (WAL) is the embedded default; PostgreSQL is chosen by URL for several nodes. Domain code
is synchronous and uses :meth:`Store.session`; async front ends run it in a thread pool.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

from opendps.store.models import (
    AccessPolicy,
    Base,
    CertificateAuthority,
    CloudToDeviceMessage,
    DeviceRecord,
    DpsCertificate,
    Enrollment,
    HubCertificate,
    HubDevice,
    InstanceSetting,
    IssuedCertificate,
    LinkedHub,
    Namespace,
    Operation,
    Policy,
    ProvenCaCertificate,
    Registration,
    TelemetryEvent,
    WrappedKey,
)

__all__ = [
    "AccessPolicy",
    "Base",
    "CertificateAuthority",
    "CloudToDeviceMessage",
    "DeviceRecord",
    "DpsCertificate",
    "Enrollment",
    "HubCertificate",
    "HubDevice",
    "InstanceSetting",
    "IssuedCertificate",
    "LinkedHub",
    "Namespace",
    "Operation",
    "Policy",
    "ProvenCaCertificate",
    "Registration",
    "Store",
    "TelemetryEvent",
    "WrappedKey",
    "add_setting",
    "sqlite_url",
]

MIGRATIONS = Path(__file__).parent / "migrations"


def sqlite_url(path: Path) -> str:
    return f"sqlite+pysqlite:///{path}"


def _sqlite_pragmas(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def add_setting(session: Session, name: str, value: str) -> None:
    """Add an instance setting inside a caller's transaction (with the rows it describes)."""
    session.add(InstanceSetting(name=name, value=value))


class Store:
    """Engine + session factory for one database URL."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 10}
        else:
            kwargs["pool_pre_ping"] = True
            kwargs["pool_size"] = 10
        self.engine: Engine = create_engine(url, **kwargs)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: commits on success, rolls back on any exception."""
        s = self._sessions()
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    # ---- instance settings: facts of the installation every node shares (ID scope, key check value...) ----
    def setting(self, name: str) -> str | None:
        with self.session() as s:
            row = s.get(InstanceSetting, name)
            return row.value if row else None

    def set_setting_if_absent(self, name: str, value: str) -> str:
        """Insert-if-missing; a concurrent node may win, so the stored value is returned."""
        try:
            with self.session() as s:
                if s.get(InstanceSetting, name) is None:
                    add_setting(s, name, value)
        except IntegrityError:
            pass  # another node stored it first
        stored = self.setting(name)
        assert stored is not None
        return stored

    def upgrade(self, revision: str = "head") -> None:
        """Apply Alembic migrations up to ``revision``."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)

    def current_revision(self) -> str | None:
        with self.engine.connect() as conn:
            try:
                return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            except Exception:  # noqa: BLE001 - table missing: never migrated
                return None

    def dispose(self) -> None:
        self.engine.dispose()
