"""Read-only DuckDB SQL over the LanceDB vector tables, bounded in rows, time and memory
(what ``ciea sql`` runs; its ``--help`` has the examples).

Every table of the database (:attr:`SqlConfig.db_uri`) is registered in an in-memory DuckDB
under its own name, at the tag :attr:`SqlConfig.at` names (or its latest version, with a
note). DuckDB scans the Lance dataset through the Arrow dataset interface, so only the
columns and rows a query needs are read.

Read-only, three ways over: :func:`check_read_only` lets exactly one ``SELECT``-type
statement through (DuckDB's own parser); the tables are registered Arrow datasets, which
DuckDB cannot write into, and no Lance writer is opened; the connection has external access
off and its configuration locked, spills nothing, and a missing database folder is refused,
not created.

Bounded, three ways over (:func:`run_sql`): the statement runs as a relation limited to
``max_rows + 1`` rows (so the caller can say *that* more exist without the full scan that
counting them would be), a timer interrupts it after ``timeout_s``, and DuckDB's
``memory_limit`` stops it rather than swapping the machine. Each stop is a :class:`SqlError`
that names the flag to change.
"""

from __future__ import annotations

import threading
from typing import Any

from pydantic import ConfigDict, Field

from pipelines.query.formatting import Format
from pipelines.store import storage as storage_mod


class SqlError(ValueError):
    """A statement ``ciea sql`` refuses or cannot run, with the fix."""


class SqlConfig(storage_mod.StorageOptionsConfig):
    """Where the tables are and how to print the result."""

    model_config = ConfigDict(extra="forbid")
    root: str = Field("data", description="data root; the LanceDB database is <root>/lancedb unless db is set")
    db: str | None = Field(None, description="LanceDB database folder, local or s3:// (default: <root>/lancedb)")
    tables: list[str] = Field(default_factory=list, description="expose only these tables (default: all)")
    at: str = Field("published", pattern=r"^[A-Za-z0-9_.-]+$",
                    description="read each table at this tag, or `latest` (a table without the tag: latest)")
    format: Format = Field("table", description="table (aligned text), csv, json or markdown")
    max_rows: int = Field(1000, ge=1, description="print at most this many rows; the query stops after one more "
                                                  "(a note then says more rows exist)")
    timeout_s: float = Field(60.0, gt=0, description="stop a query that runs longer than this (seconds)")
    memory_limit: str = Field("2GB", pattern=r"(?i)^\s*\d+(\.\d+)?\s*([kmgt]i?b|b)\s*$",
                              description="DuckDB memory_limit: a query that needs more stops (e.g. 512MB, 4GB)")
    width: int = Field(60, ge=8, description="table/markdown: longest cell shown before it is cut with …")

    @property
    def db_uri(self) -> str:
        return self.db or storage_mod.join(storage_mod.normalise_uri(self.root), "lancedb")


# ---------------------------------------------------------------------------------------
# Read-only statement check and the connection
# ---------------------------------------------------------------------------------------


def check_read_only(sql: str) -> str:
    """Returns ``sql`` when it is exactly one read-only statement (DuckDB's own parser).

    Raises:
        SqlError: a syntax error, no statement, several, or one that is not a SELECT.
    """
    import duckdb

    if not sql or not sql.strip():
        raise SqlError("no SQL given: pass one SELECT statement, e.g. \"SELECT count(*) FROM documents\"")
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise SqlError(f"the SQL does not parse: {one_line(e)}") from None
    if len(statements) != 1:
        kinds = ", ".join(s.type.name for s in statements) or "none"
        raise SqlError(f"ciea sql runs exactly one statement, got {len(statements)} ({kinds}): "
                       "pass a single SELECT (no `;` between statements)")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise SqlError(f"ciea sql is read-only: a {kind.name} statement is refused. Pass one SELECT "
                       "(or WITH … SELECT, DESCRIBE, SHOW, SUMMARIZE); tables change only through "
                       "`ciea embed` / `ciea reindex`")
    return sql


def _lance_at(table: Any, at: str) -> tuple[Any, int, str | None]:
    """The table's Lance dataset at tag ``at`` (or its latest version); (dataset, version, note)."""
    if at != "latest":
        tags = table.tags.list()
        if at in tags:
            entry = tags[at]
            version = int(entry["version"] if isinstance(entry, dict) else entry.version)
            table.checkout(version)
            return table.to_lance(), version, None
        note = f"table {table.name!r} has no tag {at!r}: reading its latest version {table.version}"
        return table.to_lance(), table.version, note
    return table.to_lance(), table.version, None


def connect(cfg: SqlConfig, notes: list[str] | None = None) -> tuple[Any, dict[str, int]]:
    """An in-memory DuckDB with every (selected) LanceDB table registered read-only.

    Args:
        cfg: the database, the tables, the tag to read them at and the memory limit.
        notes: when given, gets one line per table read at its latest version because it
            has no ``cfg.at`` tag.

    Returns:
        ``(connection, {table name: version})``.

    Raises:
        SqlError: no such database (missing, or a file) or table, with the fix.
    """
    import duckdb

    from pipelines.query.search import DatabaseNotFoundError, check_database
    from pipelines.store.lance_tables import connect as connect_lance

    try:
        check_database(cfg.db_uri)  # before connecting: lancedb.connect creates a missing folder
    except DatabaseNotFoundError as e:
        raise SqlError(str(e)) from None
    db = connect_lance(cfg.db_uri, cfg.storage_options)
    names = sorted(db.list_tables().tables)
    missing = [t for t in cfg.tables if t not in names]
    if missing:
        raise SqlError(f"no table {', '.join(map(repr, missing))} in {cfg.db_uri}: tables there are "
                       f"{', '.join(names) or '(none)'}; pass --db (or --root) to point at another database")
    if not names:
        raise SqlError(f"no LanceDB tables in {cfg.db_uri}: run `ciea embed` first, or pass --db / --root")
    con = duckdb.connect(":memory:", config={
        # No file, extension or network access from a query, whatever it calls; no spill files
        # either (an in-memory DuckDB spills to ./.tmp): over the memory limit, a query stops.
        "enable_external_access": False, "autoinstall_known_extensions": False,
        "autoload_known_extensions": False, "temp_directory": "", "memory_limit": cfg.memory_limit})
    versions: dict[str, int] = {}
    for name in cfg.tables or names:
        ds, version, note = _lance_at(db.open_table(name), cfg.at)
        if note and notes is not None:
            notes.append(note)
        con.register(name, ds)
        versions[name] = version
    con.execute("SET lock_configuration = true")
    return con, versions


def one_line(error: BaseException) -> str:
    """DuckDB's message without its source excerpt (``LINE 1: …`` and the caret under it)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    cut = next((i for i, line in enumerate(lines) if line.startswith("LINE ")), len(lines))
    return " ".join(lines[:cut] or lines[:1]) or type(error).__name__


def run_sql(cfg: SqlConfig, sql: str, notes: list[str] | None = None) -> tuple[list[str], list[tuple], bool]:
    """Runs one read-only statement within the row, time and memory limits.

    Args:
        cfg: where the tables are and the limits (``max_rows``, ``timeout_s``, ``memory_limit``).
        sql: the statement.
        notes: as for :func:`connect`.

    Returns:
        ``(column names, up to max_rows rows, whether more rows exist)``.

    Raises:
        SqlError: refused, failed or stopped statement, with the fix.
    """
    check_read_only(sql)
    con, _ = connect(cfg, notes)
    try:
        return _fetch(con, sql, cfg)
    finally:
        con.close()


def _fetch(con: Any, sql: str, cfg: SqlConfig) -> tuple[list[str], list[tuple], bool]:
    """The first ``max_rows + 1`` rows of ``sql``, interrupted after ``timeout_s``."""
    import duckdb

    expired = threading.Event()

    def stop() -> None:
        expired.set()
        try:
            con.interrupt()
        except duckdb.Error:  # the query ended (and the connection closed) as the timer fired
            pass

    timer = threading.Timer(cfg.timeout_s, stop)
    timer.daemon = True
    timer.start()
    try:
        # A relation limit wraps any SELECT-type statement (DESCRIBE, SUMMARIZE too) as a
        # subquery: DuckDB stops the scan once it has the rows, where reading on would not.
        reader = con.sql(sql).limit(cfg.max_rows + 1).to_arrow_reader(1024)
        columns = list(reader.schema.names)
        rows = [tuple(r[c] for c in columns) for batch in reader for r in batch.to_pylist()]
    except duckdb.InterruptException:
        if expired.is_set():
            raise SqlError(f"the query ran past --timeout {cfg.timeout_s:g} s and was stopped; add a LIMIT or a "
                           "WHERE, or raise --timeout") from None
        raise SqlError("the query was interrupted") from None
    except duckdb.OutOfMemoryException:
        raise SqlError(f"the query needed more memory than --memory-limit {cfg.memory_limit} and was stopped; "
                       "add a WHERE or a LIMIT, aggregate in fewer groups, or raise --memory-limit") from None
    except duckdb.Error as e:
        raise SqlError(f"DuckDB: {one_line(e)}") from None
    finally:
        timer.cancel()
        timer.join()  # a firing timer finishes before the caller closes the connection
    return columns, rows[: cfg.max_rows], len(rows) > cfg.max_rows
