"""The erasure sweep: after a customer is erased, nothing in a service's
database schema may still name them. Every column of every table in the
schema is read as text (bytea decoded byte for byte, so an id inside a stored
protobuf or JSON body is found too) and matched against the customer's id
and any other value that identifies them.

It reads the schema's catalogue, not a list of known tables, so a table added
later that forgets to take part in the erasure fails the sweep at once; the
only tables allowed to name an erased customer are the tombstones a test lists
with its reason."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from converge.runtime.database import Connection

_TABLES = """
SELECT c.table_name, c.column_name, c.data_type
FROM information_schema.columns c
JOIN information_schema.tables t USING (table_schema, table_name)
WHERE c.table_schema = current_schema() AND t.table_type = 'BASE TABLE'
ORDER BY c.table_name, c.ordinal_position
"""


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _as_text(column: str, data_type: str) -> str:
    # bytea::text is hex ('\x..'); 'escape' keeps printable bytes as they are.
    if data_type == "bytea":
        return f"encode({_quoted(column)}, 'escape')"
    return f"{_quoted(column)}::text"


async def tables_of_schema(conn: Connection) -> dict[str, list[tuple[str, str]]]:
    """Every base table of the connection's schema (its search path): its
    columns and their types."""
    tables: dict[str, list[tuple[str, str]]] = {}
    for row in await conn.fetch(_TABLES):
        tables.setdefault(row["table_name"], []).append((row["column_name"], row["data_type"]))
    return tables


async def rows_naming(conn: Connection, needles: Sequence[str]) -> dict[str, int]:
    """Per table of the schema, how many rows hold any of `needles` in any
    column (case-insensitive substring); tables with none are left out."""
    patterns = [f"%{needle}%" for needle in needles]
    found: dict[str, int] = {}
    for table, columns in (await tables_of_schema(conn)).items():
        where = " OR ".join(
            f"{_as_text(name, kind)} ILIKE ANY($1::text[])" for name, kind in columns
        )
        count = await conn.fetchval(
            f"SELECT count(*) FROM {_quoted(table)} WHERE {where}", patterns
        )
        if count:
            found[table] = int(count)
    return found


async def tables_with_column(conn: Connection, column: str) -> set[str]:
    """The schema's base tables that have a column of this name."""
    return {
        table
        for table, columns in (await tables_of_schema(conn)).items()
        if any(name == column for name, _ in columns)
    }


def survivors(after: Mapping[str, int], tombstones: Mapping[str, str]) -> dict[str, int]:
    """What still names an erased customer, less the listed tombstones."""
    return {table: rows for table, rows in after.items() if table not in tombstones}
