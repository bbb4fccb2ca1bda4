"""Typed view rows and the two ways projections write them: COPY and one upsert.

A row type is a frozen ``Row`` struct whose field order is its table's column
order, so no tuple is ever aligned by hand. ``copy_rows`` appends rows with
COPY; an ``Upsert`` names a row type's conflict key and how every other column
merges with the row already there, and writes a whole batch in one
``insert ... select * from unnest(...) on conflict ... do update`` statement.

SQL text is built from identifiers in code only (table names the runtime,
replay or verify chose, field names of row types), checked against a strict
pattern, and cached per (upsert, table): values always travel as parameters.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import asyncpg
import msgspec

_IDENT = re.compile(r"[a-z_][a-z0-9_]*")
_TABLE = re.compile(r"(?:[a-z_][a-z0-9_]*\.)?[a-z_][a-z0-9_]*")


class Row(msgspec.Struct, frozen=True):
    """A view row: subclasses' fields are the table's columns, in order."""


R = TypeVar("R", bound=Row)


def columns(row: type[Row]) -> tuple[str, ...]:
    return row.__struct_fields__


def _pg_type(t: msgspec.inspect.Type) -> str:
    """The PostgreSQL array element type ``unnest`` casts a field's column to."""
    if isinstance(t, msgspec.inspect.UnionType):  # only ``X | None``: NULLs need no type
        (inner,) = [u for u in t.types if not isinstance(u, msgspec.inspect.NoneType)]
        return _pg_type(inner)
    for kind, name in _PG_TYPES:
        if isinstance(t, kind):
            return name
    raise TypeError(f"no PostgreSQL type for a field of type {t!r}")


# Exact types only: money is Decimal (numeric), never float.
_PG_TYPES: tuple[tuple[type[msgspec.inspect.Type], str], ...] = (
    (msgspec.inspect.StrType, "text"),
    (msgspec.inspect.BoolType, "bool"),
    (msgspec.inspect.IntType, "bigint"),
    (msgspec.inspect.DecimalType, "numeric"),
    (msgspec.inspect.DateTimeType, "timestamptz"),
    (msgspec.inspect.DateType, "date"),
)


async def copy_rows(conn: asyncpg.Connection, table: str, row: type[R], rows: Sequence[R]) -> None:
    """Append ``rows`` to ``table`` (``schema.table`` or ``table``) with COPY."""
    if not rows:
        return
    _check_table(table)
    schema, _, name = table.rpartition(".")
    await conn.copy_records_to_table(
        name,
        records=[msgspec.structs.astuple(r) for r in rows],
        columns=columns(row),
        schema_name=schema or None,
    )


@dataclass(frozen=True, slots=True)
class Upsert(Generic[R]):
    """Insert rows of ``row``; on a ``key`` conflict merge each other column.

    ``add`` columns are summed with the stored value, ``least`` / ``greatest``
    keep the smaller / larger (NULL-ignoring, as PostgreSQL's functions do), and
    every remaining non-key column is replaced by the incoming value.
    """

    row: type[R]
    key: tuple[str, ...]
    add: tuple[str, ...] = ()
    least: tuple[str, ...] = ()
    greatest: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        cols = columns(self.row)
        named = [*self.key, *self.add, *self.least, *self.greatest]
        if not self.key:
            raise ValueError(f"{self.row.__name__}: an upsert needs a conflict key")
        if unknown := [c for c in named if c not in cols]:
            raise ValueError(f"{self.row.__name__} has no column {unknown}")
        if len(set(named)) != len(named):
            raise ValueError(f"{self.row.__name__}: a column is named twice in {named}")
        if bad := [c for c in cols if not _IDENT.fullmatch(c)]:
            raise ValueError(f"{self.row.__name__}: not a plain column name {bad}")
        self.types()  # every column must map to a PostgreSQL type: fail at import, not mid-batch

    def types(self) -> tuple[str, ...]:
        info = msgspec.inspect.type_info(self.row)
        assert isinstance(info, msgspec.inspect.StructType)
        return tuple(_pg_type(f.type) for f in info.fields)

    def sql(self, table: str) -> str:
        return _upsert_sql(self, table)

    async def run(self, conn: asyncpg.Connection, table: str, rows: Sequence[R]) -> None:
        """Write ``rows`` to ``table`` in one statement (nothing when empty).

        Keys must be distinct within ``rows`` (PostgreSQL refuses to update one
        row twice in a statement): aggregate a batch by key first.
        """
        if not rows:
            return
        arrays = [list(c) for c in zip(*(msgspec.structs.astuple(r) for r in rows), strict=True)]
        await conn.execute(self.sql(table), *arrays)


def _check_table(table: str) -> None:
    if not _TABLE.fullmatch(table):
        raise ValueError(f"not a plain table name: {table!r}")


@functools.lru_cache(maxsize=256)  # bounded: every as-of replay writes into a schema of its own
def _upsert_sql(spec: Upsert[Any], table: str) -> str:
    _check_table(table)
    cols = columns(spec.row)
    merged = set(spec.key)
    sets: list[str] = []
    for c in spec.add:
        sets.append(f"{c} = {table}.{c} + excluded.{c}")
    for fn, names in (("least", spec.least), ("greatest", spec.greatest)):
        sets.extend(f"{c} = {fn}({table}.{c}, excluded.{c})" for c in names)
    merged.update(spec.add, spec.least, spec.greatest)
    sets.extend(f"{c} = excluded.{c}" for c in cols if c not in merged)
    arrays = ", ".join(f"${i}::{t}[]" for i, t in enumerate(spec.types(), start=1))
    action = f"do update set {', '.join(sets)}" if sets else "do nothing"
    return (
        f"insert into {table} ({', '.join(cols)}) select * from unnest({arrays}) "
        f"on conflict ({', '.join(spec.key)}) {action}"
    )
