"""Statements run on the driver's own cursor, compiled by SQLAlchemy once.

Why: through a Session or a Core connection every statement costs 40-100 microseconds of SQLAlchemy's Python (the
compiled-cache lookup, parameter and result set-up, the session's transaction bookkeeping) where the driver itself
needs 5-10; on a path run for every CONNECT that was most of its cost in the database (4 statements: ~370 us in all,
31 us on the driver). The statements stay SQLAlchemy Core expressions, owned by their domain modules and compiled
for whichever dialect the store runs on; only their execution skips the layers in between. For fixed-shape statements
on hot paths; everything else goes through :meth:`opendps.store.Store.session`.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Sequence
from typing import Any, cast

from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler


class Prepared:
    """One Core statement compiled for ``dialect``: its SQL, the order of its parameters, their conversions to the
    driver's values (a datetime as SQLite's text) and its rows' back (that text as a datetime), worked out once.
    Rows come back as named tuples (``row.device_id``), as SQLAlchemy's do."""

    __slots__ = ("sql", "_names", "_defaults", "_required", "_binds", "_results", "_row")

    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect))
        binds = compiled.bind_names  # each parameter and its name in the SQL
        if any(b.expanding or b.literal_execute for b in binds) or getattr(compiled, "escaped_bind_names", None):
            raise ValueError("a prepared statement has fixed parameters: no IN lists, literal or escaped parameters")
        self.sql = compiled.string
        # positional drivers (sqlite3's ?) take a sequence in this order; named ones (psycopg's %(name)s) a mapping
        self._names: tuple[str, ...] | None = tuple(compiled.positiontup or ()) if compiled.positional else None
        self._defaults = dict(compiled.params)  # values the statement fixes itself (a literal False, SQLite's OFFSET 0)
        self._required = frozenset(name for bind, name in binds.items() if bind.required)  # the caller's to give
        self._binds: dict[str, Callable[[Any], Any]] = {}
        for bind, name in binds.items():
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                self._binds[name] = process
        columns: Sequence[Any] = getattr(statement, "selected_columns", ())
        self._results: tuple[tuple[int, Callable[[Any], Any]], ...] = tuple(
            (i, process) for i, column in enumerate(columns)
            if (process := column.type.dialect_impl(dialect).result_processor(dialect, None)) is not None)
        self._row: Any = namedtuple("Row", [c.key for c in columns], rename=True) if columns else None

    def _parameters(self, values: dict[str, Any]) -> Sequence[Any] | dict[str, Any]:
        if values.keys() != self._required:  # a misspelt or forgotten parameter would be a silent NULL
            raise TypeError(f"parameters {sorted(values)} given, {sorted(self._required)} expected")
        merged = {**self._defaults, **values}
        for name, process in self._binds.items():
            merged[name] = process(merged[name])
        return merged if self._names is None else [merged[name] for name in self._names]

    def _shaped(self, raw: Sequence[Any]) -> Any:
        assert self._row is not None, "a statement without columns has no rows"
        if self._results:
            raw = list(raw)
            for i, process in self._results:
                raw[i] = process(raw[i])
        return self._row._make(raw)

    def first(self, cursor: Any, **values: Any) -> Any | None:
        """The first row (a named tuple) or None."""
        cursor.execute(self.sql, self._parameters(values))
        raw = cursor.fetchone()
        return None if raw is None else self._shaped(raw)

    def all(self, cursor: Any, **values: Any) -> list[Any]:
        cursor.execute(self.sql, self._parameters(values))
        return [self._shaped(raw) for raw in cursor.fetchall()]

    def run(self, cursor: Any, **values: Any) -> int:
        """Run a statement that returns no rows (an UPDATE); how many rows it changed."""
        cursor.execute(self.sql, self._parameters(values))
        return int(cursor.rowcount)
