"""Time buckets in SQL, the same text on both backends: aggregates group rows by UTC day or minute in the database
(one ``GROUP BY``), never by reading the rows into Python.

SQLite keeps a :class:`opendps.store.models.UtcDateTime` as UTC text (``YYYY-MM-DD HH:MM:SS.ffffff``), PostgreSQL as
``timestamptz``; both buckets come back as ``YYYY-MM-DD`` / ``YYYY-MM-DDTHH:MM`` strings in UTC whatever the
session's time zone.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func

DAY_FORMAT = "%Y-%m-%d"
MINUTE_FORMAT = "%Y-%m-%dT%H:%M"
_POSTGRES = {DAY_FORMAT: "YYYY-MM-DD", MINUTE_FORMAT: 'YYYY-MM-DD"T"HH24:MI'}


def utc_bucket(column: Any, dialect: str, fmt: str) -> Any:
    """``column`` (a UtcDateTime) as the text of its UTC day (:data:`DAY_FORMAT`) or minute (:data:`MINUTE_FORMAT`)."""
    if dialect == "postgresql":
        return func.to_char(func.timezone("UTC", column), _POSTGRES[fmt])
    return func.strftime(fmt, column)


def utc_day(column: Any, dialect: str) -> Any:
    return utc_bucket(column, dialect, DAY_FORMAT)


def utc_minute(column: Any, dialect: str) -> Any:
    return utc_bucket(column, dialect, MINUTE_FORMAT)
