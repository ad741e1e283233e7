"""A report's two INSERTs straight to the DBAPI cursor (issue 10's burst).

Through SQLAlchemy's `connection.execute`, every row of an executemany becomes a parameter
dict that its compiler walks key by key, and the idempotency rows' `INSERT … RETURNING` is
re-rendered for each batch ("insertmanyvalues"): in a burst of first reports that was more of
the daemon's CPU than the database's own work. Here each statement's text is written once per
dialect, with the driver's placeholders, and each value goes through the bind processor of its
column's type as SQLAlchemy would (`TypeEngine.dialect_impl(...).bind_processor`: the same
naive-UTC datetimes, JSON text, enum names and booleans), into a tuple in column order.
`connection.exec_driver_sql` still runs them in the connection's transaction, with its events
and its error wrapping (an IntegrityError is SQLAlchemy's).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Table
from sqlalchemy.engine import Dialect

# The DBAPI placeholder of each paramstyle that takes a sequence of values in order.
PLACEHOLDERS = {"qmark": "?", "format": "%s", "pyformat": "%s"}
ROWS_PER_STATEMENT = 100  # the RETURNING insert's rows per statement (SQLite: 32,766 variables)


@dataclass(frozen=True)
class RawInsert:
    """An INSERT of `columns` into `table` for one dialect: its text and value converters."""

    table: str
    columns: tuple[str, ...]
    placeholder: str
    converters: tuple[Callable[[Any], Any] | None, ...]

    @functools.cached_property  # the text written once (a frozen dataclass has a __dict__)
    def _head(self) -> str:
        # Names from our own table's metadata, values as parameters: no text from outside.
        return f"INSERT INTO {self.table} ({', '.join(self.columns)}) VALUES "  # noqa: S608

    @functools.cached_property
    def _row(self) -> str:
        return f"({', '.join([self.placeholder] * len(self.columns))})"

    def values(self, row: dict[str, Any]) -> tuple[Any, ...]:
        """A row (column name: Python value) as the driver's tuple, in column order."""
        return tuple(
            row[name] if convert is None else convert(row[name])
            for name, convert in zip(self.columns, self.converters, strict=True)
        )

    def many(self, connection: Connection, rows: Iterable[dict[str, Any]]) -> None:
        """INSERT every row (one executemany)."""
        connection.exec_driver_sql(self._head + self._row, [self.values(row) for row in rows])

    def returning_new(
        self, connection: Connection, rows: Sequence[dict[str, Any]], key: str
    ) -> set[Any]:
        """INSERT … ON CONFLICT DO NOTHING RETURNING `key`: the keys of the rows inserted now,
        a statement per ROWS_PER_STATEMENT rows."""
        done: set[Any] = set()
        head, one = self._head, self._row
        for start in range(0, len(rows), ROWS_PER_STATEMENT):
            page = rows[start : start + ROWS_PER_STATEMENT]
            sql = f"{head}{', '.join([one] * len(page))} ON CONFLICT DO NOTHING RETURNING {key}"
            flat = tuple(value for row in page for value in self.values(row))
            done.update(connection.exec_driver_sql(sql, flat).scalars())
        return done


def raw_insert(table: Table, columns: tuple[str, ...], dialect: Dialect) -> RawInsert | None:
    """The RawInsert of `columns`, or None for a driver whose paramstyle takes names only
    (the caller then goes through SQLAlchemy)."""
    placeholder = PLACEHOLDERS.get(dialect.paramstyle)
    if placeholder is None:
        return None
    converters = tuple(
        table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in columns
    )
    return RawInsert(table.name, columns, placeholder, converters)
