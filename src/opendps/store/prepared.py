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
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, cast

from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler


class Prepared:
    """One Core statement compiled for ``dialect``: its SQL, the order of its parameters, their conversions to the
    driver's values (a datetime as SQLite's text) and its rows' back (that text as a datetime), worked out once.
    Rows come back as named tuples (``row.device_id``), as SQLAlchemy's do."""

    __slots__ = ("sql", "_names", "_defaults", "_required", "_binds", "_results", "_row")

    def __init__(self, statement: ClauseElement, dialect: Dialect, columns: Collection[str] | None = None) -> None:
        """``columns``: for an INSERT or UPDATE without its own ``values()``, the columns it writes (as SQLAlchemy
        compiles such a statement for the parameters of each execution); their defaults are the columns' own."""
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect, column_keys=list(columns) if columns else None))
        binds = compiled.bind_names  # each parameter and its name in the SQL
        if any(b.expanding or b.literal_execute for b in binds) or getattr(compiled, "escaped_bind_names", None):
            raise ValueError("a prepared statement has fixed parameters: no IN lists, literal or escaped parameters")
        self.sql = compiled.string
        # positional drivers (sqlite3's ?) take a sequence in this order; named ones (psycopg's %(name)s) a mapping
        self._names: tuple[str, ...] | None = tuple(compiled.positiontup or ()) if compiled.positional else None
        self._defaults = dict(compiled.params)  # values the statement fixes itself (a literal False, SQLite's OFFSET 0)
        # a column left out of an INSERT (or an UPDATE) takes its Python-side default, as SQLAlchemy would give it
        for column in (*compiled.insert_prefetch, *compiled.update_prefetch):
            default = column.default if column in compiled.insert_prefetch else column.onupdate
            if default is None or not default.is_scalar:
                raise ValueError(f"column {column.key!r} has a default computed per row: give it a value")
            self._defaults[column.key] = cast(Any, default).arg
        self._required = frozenset(name for bind, name in binds.items() if bind.required)  # the caller's to give
        self._binds: dict[str, Callable[[Any], Any]] = {}
        for bind, name in binds.items():
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                self._binds[name] = process
        # a SELECT's columns, or what an INSERT / UPDATE ... RETURNING gives back
        returned: Sequence[Any] = getattr(statement, "selected_columns", None) or compiled.effective_returning or ()
        self._results: tuple[tuple[int, Callable[[Any], Any]], ...] = tuple(
            (i, process) for i, column in enumerate(returned)
            if (process := column.type.dialect_impl(dialect).result_processor(dialect, None)) is not None)
        self._row: Any = namedtuple("Row", [c.key for c in returned], rename=True) if returned else None

    def _parameters(self, values: Mapping[str, Any]) -> Sequence[Any] | dict[str, Any]:
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

    def many(self, cursor: Any, rows: Sequence[Mapping[str, Any]]) -> None:
        """Run the statement once per row, in one driver call (executemany)."""
        cursor.executemany(self.sql, [self._parameters(values) for values in rows])


_COMPILED: dict[tuple[int, str, str, frozenset[str] | None], tuple[ClauseElement, Prepared]] = {}
MAX_COMPILED = 4096  # far more than the module-level statements there are: past it, statements are compiled per call


def prepared(statement: ClauseElement, dialect: Dialect, columns: Collection[str] | None = None) -> Prepared:
    """``statement`` compiled for ``dialect`` (and, for an INSERT/UPDATE without ``values()``, these columns), once.

    Keyed by the statement object: for module-level statements, built once. The entry holds the statement, so its
    id is never another object's; a statement built per call is still correct, only compiled anew each time (and,
    once :data:`MAX_COMPILED` entries are kept, not kept: no growth without bound).
    """
    key = (id(statement), dialect.name, dialect.driver, frozenset(columns) if columns is not None else None)
    hit = _COMPILED.get(key)
    if hit is not None:
        return hit[1]
    compiled = Prepared(statement, dialect, columns)
    if len(_COMPILED) < MAX_COMPILED:
        _COMPILED.setdefault(key, (statement, compiled))
    return compiled


class Transaction:
    """A transaction's driver cursor and the prepared statements run on it (:func:`prepared`): what the hot paths'
    domain functions take, from :meth:`opendps.store.Store.transaction` (a driver transaction of its own) or
    :func:`opendps.store.joined` (a Session's, after its flush), so one implementation serves both.

    A driver error comes out as SQLAlchemy's (``IntegrityError``...), as from a Session: callers keep one ``except``.
    """

    __slots__ = ("cursor", "dialect", "_after_commit")

    def __init__(self, cursor: Any, dialect: Dialect, after_commit: Callable[[Callable[[], None]], None]) -> None:
        self.cursor = cursor
        self.dialect = dialect
        self._after_commit = after_commit

    def first(self, statement: ClauseElement, /, **values: Any) -> Any | None:
        """The first row (a named tuple) or None; ``values``: the statement's parameters (the columns an INSERT or
        UPDATE without ``values()`` writes, the bound parameters of anything else)."""
        p = prepared(statement, self.dialect, _columns(statement, values))
        try:
            return p.first(self.cursor, **values)
        except self.dialect.loaded_dbapi.Error as exc:
            raise self._error(p, exc) from exc

    def all(self, statement: ClauseElement, /, **values: Any) -> list[Any]:
        p = prepared(statement, self.dialect, _columns(statement, values))
        try:
            return p.all(self.cursor, **values)
        except self.dialect.loaded_dbapi.Error as exc:
            raise self._error(p, exc) from exc

    def run(self, statement: ClauseElement, /, **values: Any) -> int:
        """Run a statement that returns no rows; how many rows it changed."""
        p = prepared(statement, self.dialect, _columns(statement, values))
        try:
            return p.run(self.cursor, **values)
        except self.dialect.loaded_dbapi.Error as exc:
            raise self._error(p, exc) from exc

    def many(self, statement: ClauseElement, rows: Sequence[Mapping[str, Any]]) -> None:
        """Run a statement once per row (rows of the same keys), in one driver call."""
        if not rows:
            return
        p = prepared(statement, self.dialect, _columns(statement, rows[0]))
        try:
            p.many(self.cursor, rows)
        except self.dialect.loaded_dbapi.Error as exc:
            raise self._error(p, exc) from exc

    def after_commit(self, action: Callable[[], None]) -> None:
        """Run ``action`` once the transaction has committed (never if it rolls back): e.g. a log line saying so."""
        self._after_commit(action)

    def _error(self, p: Prepared, exc: Exception) -> DBAPIError:
        return cast(DBAPIError, DBAPIError.instance(p.sql, None, exc, self.dialect.loaded_dbapi.Error,
                                                    hide_parameters=True, dialect=self.dialect))


def _columns(statement: ClauseElement, values: Mapping[str, Any]) -> frozenset[str] | None:
    """The columns an INSERT or UPDATE without its own ``values()`` writes: the parameters given that name columns."""
    if getattr(statement, "is_dml", False) and not getattr(statement, "_values", None) \
            and not getattr(statement, "_multi_values", None) and hasattr(statement, "table"):
        return frozenset(values)
    return None
