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
counting them would be), a timer interrupts it after ``timeout_s``, and its memory is capped.
Each stop is a :class:`SqlError` that names the flag to change.

The memory cap holds for the whole query, not only for what DuckDB's buffer manager counts:
DuckDB's ``memory_limit`` leaves out the strings a vector holds (``repeat('x', 10_000_000)``
over a thousand rows is 10 GB in one vector, which no interrupt can stop half-way) and the
Arrow batches handed to Python. So the statement runs in a child process (a fresh
interpreter: the caller's threads, Lance's among them, are not forked), which this process
watches: the
child's resident memory above what it held once the tables were registered may not pass
``memory_limit`` (polled every :data:`WATCH_S`; the child is killed, whatever it is doing),
the fetched result's Arrow size may not either, and DuckDB's own ``memory_limit`` stops
its operators first with a clean error where it can. A run past ``timeout_s`` is killed the
same way should DuckDB not answer its interrupt.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from pydantic import ConfigDict, Field, field_validator

from pipelines.query.formatting import Format
from pipelines.store import storage as storage_mod


class SqlError(ValueError):
    """A statement ``ciea sql`` refuses or cannot run, with the fix."""


#: The longest ``--timeout`` (a day): a query is interactive, and a timer needs a finite time.
MAX_TIMEOUT_S = 86_400.0
#: The smallest ``--memory-limit``: below it DuckDB and Lance cannot register a table.
MIN_MEMORY_BYTES = 16 * 1000**2
#: How often the child's resident memory is read while a query runs (seconds).
WATCH_S = 0.002
#: After the timeout, how long DuckDB's own interrupt may take before the child is killed.
KILL_GRACE_S = 2.0
_SIZE = re.compile(r"^\s*(\d{1,15}(?:\.\d{1,6})?)\s*([kmgt]?i?b)\s*$", re.IGNORECASE)
#: DuckDB's spelling: KB, MB, … are powers of 1000, KiB, MiB, … of 1024.
_UNITS = {"b": 1, **{f"{p}b": 1000 ** (i + 1) for i, p in enumerate("kmgt")},
          **{f"{p}ib": 1024 ** (i + 1) for i, p in enumerate("kmgt")}}


def machine_memory() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_bytes(text: str) -> int:
    """``"512MB"`` → 512 000 000, ``"1GiB"`` → 1 073 741 824 (DuckDB's units).

    Raises:
        ValueError: not a size, or outside 16MB .. this machine's memory, with the fix.
    """
    m = _SIZE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError("not a size: give a number and a unit, e.g. 512MB or 4GB (KB/MB/GB/TB, or KiB/MiB/GiB/TiB)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    ram = machine_memory()
    if n < MIN_MEMORY_BYTES:
        raise ValueError(f"below the smallest limit a query can run in, {MIN_MEMORY_BYTES // 1000**2}MB")
    if n > ram:
        raise ValueError(f"more than this machine's memory ({ram / 1024**3:.1f} GiB): give at most "
                         f"{ram // 1000**2}MB")
    return n


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
    timeout_s: float = Field(60.0, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False,
                             description="stop a query that runs longer than this (seconds, at most 86400)")
    memory_limit: str = Field("2GB", description="memory the query may use (DuckDB, Lance's reads, the result): "
                                                 "one that needs more stops (e.g. 512MB, 4GB; 16MB .. the "
                                                 "machine's memory)")
    width: int = Field(60, ge=8, description="table/markdown: longest cell shown before it is cut with …")

    @field_validator("memory_limit")
    @classmethod
    def _memory_limit(cls, value: str) -> str:
        memory_bytes(value)
        return value.strip()

    @property
    def memory_limit_bytes(self) -> int:
        return memory_bytes(self.memory_limit)

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
        "autoload_known_extensions": False, "temp_directory": "",
        "memory_limit": f"{cfg.memory_limit_bytes}B"})
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
    # A fresh interpreter (not multiprocessing's spawn, which re-runs the caller's main
    # script): the request on its stdin, the answers on a pipe of their own.
    read_fd, write_fd = os.pipe()
    request = pickle.dumps({"path": sys.path, "cfg": cfg.model_dump(), "sql": sql, "fd": write_fd})
    try:
        child = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, pass_fds=(write_fd,))
    finally:
        os.close(write_fd)
    receive = Connection(read_fd, writable=False)
    try:
        assert child.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            child.stdin.write(request)
            child.stdin.close()
        return _watch(child, receive, cfg, notes)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        receive.close()


#: What the query process runs: the request from stdin, then :func:`_child`.
_CHILD = ("import pickle, sys; r = pickle.load(sys.stdin.buffer); sys.path[:] = r['path']; "
          "from pipelines.query.sql import _child; _child(r['cfg'], r['sql'], r['fd'])")


def _memory_error(cfg: SqlConfig) -> SqlError:
    return SqlError(f"the query needed more memory than --memory-limit {cfg.memory_limit} and was stopped; "
                    "add a WHERE or a LIMIT, aggregate in fewer groups, or raise --memory-limit")


def _timeout_error(cfg: SqlConfig) -> SqlError:
    return SqlError(f"the query ran past --timeout {cfg.timeout_s:g} s and was stopped; add a LIMIT or a WHERE, "
                    "or raise --timeout")


def _resident(pid: int | str = "self") -> int | None:
    """Resident memory of a process in bytes (``None`` where ``/proc`` cannot tell)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _watch(child: Any, receive: Any, cfg: SqlConfig, notes: list[str] | None) -> tuple[list[str], list[tuple], bool]:
    """Waits for the child's answer, killing it past the memory cap or the timeout."""
    cap = cfg.memory_limit_bytes
    baseline: int | None = None
    deadline: float | None = None
    while True:
        if receive.poll(WATCH_S):
            try:
                kind, *payload = receive.recv()
            except EOFError:  # it died between two polls: judged below
                kind, payload = "gone", []
            if kind == "ready":
                baseline, table_notes = payload
                if notes is not None:
                    notes.extend(table_notes)
                deadline = time.monotonic() + cfg.timeout_s + KILL_GRACE_S
                continue
            if kind == "ok":
                columns, batches, more = payload
                rows = [tuple(r[c] for c in columns) for batch in batches for r in batch.to_pylist()]
                return columns, rows, more
            if kind == "error":
                raise SqlError(payload[0])
        if baseline is not None:
            rss = _resident(child.pid)
            if rss is not None and rss - baseline > cap:
                child.kill()
                raise _memory_error(cfg)
        if deadline is not None and time.monotonic() > deadline:
            child.kill()
            raise _timeout_error(cfg)
        if child.poll() is not None and not receive.poll():
            if child.returncode == -signal.SIGKILL:  # the kernel's OOM killer
                raise _memory_error(cfg)
            raise SqlError(f"the query process stopped unexpectedly (exit code {child.returncode}); run it again, "
                           "or with a lower --memory-limit")


def _child(cfg_data: dict[str, Any], sql: str, fd: int) -> None:
    """The query process: registers the tables, says how much memory that took, runs the
    statement and sends the Arrow batches back (or one error line) on ``fd``."""
    cfg = SqlConfig.model_validate(cfg_data)  # validated by the caller already
    send = Connection(fd, readable=False)
    try:
        notes: list[str] = []
        con, _ = connect(cfg, notes)
        try:
            send.send(("ready", _resident() or 0, notes))
            send.send(("ok", *_fetch(con, sql, cfg)))
        finally:
            con.close()
    except SqlError as e:
        send.send(("error", str(e)))
    except MemoryError:
        send.send(("error", str(_memory_error(cfg))))
    except Exception as e:  # noqa: BLE001  (a Lance or Arrow failure: one line, never a traceback)
        send.send(("error", f"{type(e).__name__}: {one_line(e)}"))
    finally:
        send.close()


def _fetch(con: Any, sql: str, cfg: SqlConfig) -> tuple[list[str], list[Any], bool]:
    """The first ``max_rows`` rows of ``sql`` as Arrow batches, whether more exist;
    interrupted after ``timeout_s``, stopped once the batches' Arrow size passes the cap."""
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
        batches, rows, size = [], 0, 0
        for batch in reader:
            size += batch.nbytes
            if size > cfg.memory_limit_bytes:
                raise _memory_error(cfg)
            batches.append(batch.slice(0, max(0, cfg.max_rows - rows)))
            rows += batch.num_rows
    except duckdb.InterruptException:
        if expired.is_set():
            raise _timeout_error(cfg) from None
        raise SqlError("the query was interrupted") from None
    except duckdb.OutOfMemoryException:
        raise _memory_error(cfg) from None
    except duckdb.Error as e:
        raise SqlError(f"DuckDB: {one_line(e)}") from None
    finally:
        timer.cancel()
        timer.join()  # a firing timer finishes before the caller closes the connection
    return columns, batches, rows > cfg.max_rows
