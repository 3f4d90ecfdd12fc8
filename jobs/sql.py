"""``ciea sql``: read-only DuckDB SQL over the LanceDB vector tables, for analysts.

Every table of the LanceDB database (``--db``, default ``<root>/lancedb``) is exposed to an
in-memory DuckDB under its own name, at its ``published`` version (``--at`` picks another
tag, or ``latest``; a table without that tag is read at its latest version, with a note on
stderr). DuckDB scans the Lance dataset through the Arrow dataset interface, so only the
columns and rows a query needs are read.

Read-only, three ways over:

* the statement is parsed by DuckDB's own parser (``duckdb.extract_statements``) and must
  be exactly one ``SELECT`` (which covers ``WITH``, ``FROM``, ``VALUES``, ``DESCRIBE``,
  ``SHOW`` and ``SUMMARIZE``); anything else — ``INSERT``, ``COPY``, ``ATTACH``, ``SET``,
  a second statement after ``;`` — is refused before it runs;
* the tables are registered Arrow datasets: DuckDB cannot write into them, and no Lance
  writer is ever opened;
* the connection has external access off and its configuration locked, so a query can read
  no file and write none (``COPY``, ``read_csv('/etc/…')``); DuckDB spills nothing to disk
  either, and a missing ``--db`` folder is refused, not created.

Bounded, three ways over, each stop reported in one line that names the flag:

* rows: the statement runs as ``(statement) LIMIT max_rows + 1`` (a DuckDB relation
  limit, so ``DESCRIBE`` / ``SHOW`` / ``SUMMARIZE`` are wrapped alike): the scan stops once
  ``--max-rows`` rows and one more exist, and the note says *that* more rows exist, not how
  many — counting them would be the full scan the limit avoids (``SELECT count(*) …`` does);
* time: ``--timeout`` (default 60 s) interrupts the query (``connection.interrupt()`` from a
  timer), e.g. a self cross join that would run for hours;
* memory: ``--memory-limit`` (default 2GB) is DuckDB's ``memory_limit``; a query that needs
  more stops with DuckDB's out-of-memory error instead of swapping the machine.

Examples::

    ciea sql "SELECT modality, count(*) AS n FROM documents GROUP BY modality"
    ciea sql "DESCRIBE documents"
    ciea sql "SELECT doc_id, caption FROM documents WHERE caption ILIKE '%red%' LIMIT 5" --format markdown
    ciea sql "SELECT doc_id, source_version FROM documents" --format csv > versions.csv
    ciea sql "SHOW TABLES" --db s3://vectors/webqa --storage-option AWS_REGION=eu-west-1
    ciea sql "SELECT a.doc_id, b.doc_id FROM documents a, documents b" --timeout 10 --memory-limit 512MB
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import math
import sys
import threading
from collections.abc import Sequence
from datetime import date, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipelines.store import storage as storage_mod

from .common import job_overrides, job_parser, parse_job_config, yaml_str

Format = Literal["table", "csv", "json", "markdown"]


class SqlError(ValueError):
    """A statement ``ciea sql`` refuses or cannot run, with the fix."""


class SqlConfig(BaseModel):
    """Where the tables are and how to print the result."""

    model_config = ConfigDict(extra="forbid")
    root: str = Field("data", description="data root; the LanceDB database is <root>/lancedb unless db is set")
    db: str | None = Field(None, description="LanceDB database folder, local or s3:// (default: <root>/lancedb)")
    tables: list[str] = Field(default_factory=list, description="expose only these tables (default: all)")
    at: str = Field("published", pattern=r"^[A-Za-z0-9_.-]+$",
                    description="read each table at this tag, or `latest` (a table without the tag: latest)")
    storage_options: storage_mod.StorageOptions = Field(
        default_factory=dict, description="object-store settings (AWS_ENDPOINT_URL, AWS_REGION, ...); "
                                          "credentials only from the environment")
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


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split())  # one line per row: newlines and tabs become spaces
    return text if len(text) <= width else text[: width - 1] + "…"


def display(value: Any, width: int) -> str:
    """A value as one short human-readable cell (vectors and images summarised)."""
    if value is None:
        return "NULL"
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        if len(value) > 4 and all(isinstance(v, (int, float)) or v is None for v in value):
            head = ", ".join("NULL" if v is None else f"{v:.3g}" for v in value[:3])
            return f"[{head}, … {len(value)} values]"
        return _cut(json.dumps(value, default=str), width)
    if isinstance(value, dict):
        return _cut(json.dumps(value, default=str), width)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return _cut(str(value), width)


def _plain(value: Any) -> Any:
    """A value for csv / json: complete (not cut), bytes as base64, NaN as null."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _numeric(rows: Sequence[tuple], i: int) -> bool:
    vals = [r[i] for r in rows if r[i] is not None]
    return bool(vals) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)


def format_text_table(columns: Sequence[str], rows: Sequence[tuple], width: int = 60) -> str:
    """An aligned plain-text table (numbers right-aligned)."""
    cells = [[display(v, width) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    right = [_numeric(rows, i) for i in range(len(columns))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True)).rstrip()

    return "\n".join([line(columns), line(["─" * w for w in widths]), *(line(r) for r in cells)])


def format_markdown(columns: Sequence[str], rows: Sequence[tuple], width: int = 60) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    right = [_numeric(rows, i) for i in range(len(columns))]
    out = ["| " + " | ".join(esc(c) for c in columns) + " |",
           "| " + " | ".join("---:" if r else "---" for r in right) + " |"]
    out += ["| " + " | ".join(esc(display(v, width)) for v in r) + " |" for r in rows]
    return "\n".join(out)


def format_csv(columns: Sequence[str], rows: Sequence[tuple]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if v is None else json.dumps(p) if isinstance(p := _plain(v), (list, dict)) else p for v in r])
    return buf.getvalue().rstrip("\n")


def format_json(columns: Sequence[str], rows: Sequence[tuple]) -> str:
    return json.dumps([{c: _plain(v) for c, v in zip(columns, r, strict=True)} for r in rows], indent=1,
                      ensure_ascii=False)


def render(columns: Sequence[str], rows: Sequence[tuple], fmt: Format, width: int = 60) -> str:
    if fmt == "csv":
        return format_csv(columns, rows)
    if fmt == "json":
        return format_json(columns, rows)
    if fmt == "markdown":
        return format_markdown(columns, rows, width)
    return format_text_table(columns, rows, width)


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


PROG = "ciea sql"
STORAGE = "storage_options"
#: Flags of this job → config keys (the shared ones are in ``jobs/common.py``).
FLAGS = {"root": "root", "db": "db", "at": "at", "format": "format", "max_rows": "max_rows",
         "timeout": "timeout_s", "memory_limit": "memory_limit"}


def _parser() -> argparse.ArgumentParser:
    p = job_parser(PROG, __doc__, SqlConfig, storage=STORAGE, progress=None, verbose=False, set_example="width=80")
    p.add_argument("sql", help="one read-only statement: SELECT / WITH / DESCRIBE / SHOW / SUMMARIZE")
    p.add_argument("--root", help="data root (root; the database is <root>/lancedb)")
    p.add_argument("--db", help="LanceDB database folder, local or s3:// (db)")
    p.add_argument("--table", action="append", default=[], help="expose only this table; repeatable (tables)")
    p.add_argument("--at", help="tag to read each table at, or `latest` (at; default published)")
    p.add_argument("--format", choices=["table", "csv", "json", "markdown"], help="output format (format)")
    p.add_argument("--max-rows", type=int, help="print at most this many rows; the query stops there (max_rows)")
    # Text, not type=float: the config validates it, so "soon" or 0 gets the one-line config
    # error naming timeout_s and its rule rather than argparse's usage dump.
    p.add_argument("--timeout", metavar="SECONDS", help="stop the query after this long (timeout_s; default 60)")
    p.add_argument("--memory-limit", metavar="SIZE", help="DuckDB memory limit, e.g. 512MB (memory_limit; default 2GB)")
    return p


def parse_config(argv: list[str] | None) -> tuple[SqlConfig, argparse.Namespace]:
    """The command line → the validated config (nothing opened yet); exits with the errors."""
    args = _parser().parse_args(argv)
    tables = ["tables=[" + ", ".join(yaml_str(t) for t in args.table) + "]"] if args.table else []
    overrides = job_overrides(args, FLAGS, storage=STORAGE, extra=tables)
    return parse_job_config(PROG, SqlConfig, args, overrides, storage=STORAGE), args


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv)
    notes: list[str] = []
    try:
        columns, rows, more = run_sql(cfg, args.sql, notes)
    except SqlError as e:
        print(f"ciea sql: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"ciea sql: {note}", file=sys.stderr)
    print(render(columns, rows, cfg.format, cfg.width))
    if more:
        print(f"ciea sql: more rows exist than the {cfg.max_rows} shown (--max-rows {cfg.max_rows}; the query "
              "stopped there): add a LIMIT or a WHERE, or raise --max-rows", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
