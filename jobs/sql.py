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
* time: ``--timeout`` (default 60 s, at most 86400) interrupts the query
  (``connection.interrupt()`` from a timer), e.g. a self cross join that would run for hours;
* memory: ``--memory-limit`` (default 2GB; 16MB up to this machine's memory) caps the whole
  query: it runs in a child process that is stopped when it grows by more than that (DuckDB's
  own ``memory_limit`` leaves out strings and the result), and the fetched result may not
  pass it either — instead of swapping the machine.

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
import sys

from pipelines.query.formatting import render
from pipelines.query.sql import SqlConfig, SqlError, run_sql

from .common import STORAGE, job_overrides, job_parser, parse_job_config, yaml_str

PROG = "ciea sql"
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
