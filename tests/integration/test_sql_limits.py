"""``ciea sql`` stays bounded: a row cap pushed into the query, a timeout that interrupts
it, and a memory cap on the whole query process (DuckDB's limit leaves strings and the
result out) — each stop one line on stderr that names its flag; limits out of range are
refused in one line.

A real LanceDB table of 100 000 rows (no Ray: ``ciea sql`` reads tables, it starts
nothing). Its self cross join holds 10^10 pairs: minutes to hours of DuckDB work, which is
what the timeout has to stop and what the pushed-down row cap has to never start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from jobs import sql as sql_job
from pipelines.query.sql import SqlConfig, run_sql

ROWS = 100_000
TABLE = "docs"
REPO = Path(__file__).resolve().parents[2]
#: A cross join no pair of which matches: DuckDB must build and test every pair.
CROSS_JOIN = f"SELECT count(*) AS n FROM {TABLE} a, {TABLE} b WHERE a.caption || b.caption = 'no such pair'"


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("sql-limits") / "lancedb"
    n = np.arange(ROWS)
    lancedb.connect(str(path)).create_table(TABLE, pa.table({
        "doc_id": [f"doc-{i:06d}" for i in n], "caption": [f"caption number {i}" for i in n], "n": n}))
    return str(path)


def run(capsys, *argv: str) -> tuple[int, str, list[str], float]:
    """``ciea sql`` in-process: (exit code, stdout, stderr lines, seconds)."""
    t0 = time.perf_counter()
    rc = sql_job.main(list(argv))
    seconds = time.perf_counter() - t0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if line.strip() and "has no tag 'published'" not in line]
    return rc, captured.out, notes, seconds


def test_a_self_cross_join_stops_at_the_timeout(db, capsys):
    # The rate on 1/500 of the pairs: the whole join would run for far longer than the timeout.
    cfg = SqlConfig(db=db, timeout_s=600)
    t0 = time.perf_counter()
    _, rows, _ = run_sql(cfg, CROSS_JOIN.replace("WHERE", "WHERE b.n < 200 AND"))
    full_estimate = (time.perf_counter() - t0) * ROWS / 200
    assert rows == [(0,)] and full_estimate > 30, full_estimate

    # The query runs in a fresh interpreter: what starting one costs here is not query time.
    *_, overhead = run(capsys, "SELECT 1", "--db", db)
    rc, out, err, seconds = run(capsys, CROSS_JOIN, "--db", db, "--timeout", "2")
    assert rc != 0 and out == ""
    assert err == ["ciea sql: the query ran past --timeout 2 s and was stopped; add a LIMIT or a WHERE, "
                   "or raise --timeout"]
    assert 2 <= seconds < overhead + 13, (seconds, overhead)


def test_the_default_timeout_is_60_seconds_and_must_be_positive(db):
    assert sql_job.parse_config(["SELECT 1", "--db", db])[0].timeout_s == 60
    assert sql_job.parse_config(["SELECT 1", "--db", db, "--timeout", "2.5"])[0].timeout_s == 2.5
    assert sql_job.parse_config(["SELECT 1", "--db", db, "--timeout", "86400"])[0].timeout_s == 86400
    for bad in ("0", "-1", "soon", "1e308", "inf", "nan", "86401"):
        with pytest.raises(SystemExit, match="timeout_s") as e:
            sql_job.parse_config(["SELECT 1", "--db", db, "--timeout", bad])
        assert "\n" not in str(e.value)


def test_memory_limits_are_bounded_and_one_line(db):
    assert sql_job.parse_config(["SELECT 1", "--db", db, "--memory-limit", "64MB"])[0].memory_limit_bytes == 64 * 10**6
    assert sql_job.parse_config(["SELECT 1", "--db", db, "--memory-limit", "1GiB"])[0].memory_limit_bytes == 2**30
    for bad, why in (("lots", "not a size"), ("1MB", "below the smallest"), ("1e999MB", "not a size"),
                     ("999999TB", "more than this machine's memory"), ("64 XB", "not a size")):
        with pytest.raises(SystemExit, match="memory_limit") as e:
            sql_job.parse_config(["SELECT 1", "--db", db, "--memory-limit", bad])
        assert "\n" not in str(e.value) and why in str(e.value), str(e.value)


#: Runs a small query, then one whose strings would take 10 GB, and reports the query
#: processes' peak memory (each run's child is waited for, so RUSAGE_CHILDREN sees it).
#: RLIMIT_AS is a guard for this machine should the cap not hold: the test then fails.
PEAK_SCRIPT = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (12 * 2**30, 12 * 2**30))
from pipelines.query.sql import SqlConfig, SqlError, run_sql
cfg = SqlConfig(db=sys.argv[1], memory_limit="64MB", timeout_s=120)
run_sql(cfg, "SELECT 1")
peak = lambda who: resource.getrusage(who).ru_maxrss * 1024
base, own = peak(resource.RUSAGE_CHILDREN), peak(resource.RUSAGE_SELF)
try:
    run_sql(cfg, "SELECT repeat('x', 10_000_000) AS s FROM range(1000)")
    error = None
except SqlError as e:
    error = str(e)
print(json.dumps({"base": base, "peak": peak(resource.RUSAGE_CHILDREN), "own": own,
                  "own_after": peak(resource.RUSAGE_SELF), "error": error}))
"""


def test_the_memory_cap_holds_for_strings_duckdb_does_not_count(db):
    # DuckDB's memory_limit alone let this reach 2.2 GB: its strings live outside the buffer
    # manager. The query process may grow by the cap over a small query's peak, plus what it
    # can allocate between two reads of its memory (WATCH_S, longer on a loaded machine).
    cap, margin = 64 * 10**6, 128 * 2**20
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, db], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["error"] == ("the query needed more memory than --memory-limit 64MB and was stopped; add a WHERE or "
                            "a LIMIT, aggregate in fewer groups, or raise --memory-limit")
    assert got["peak"] < got["base"] + cap + margin, got
    assert got["own_after"] - got["own"] < 32 * 2**20, got  # the caller never held the strings either


def test_a_result_over_the_cap_stops_in_one_line(db, capsys):
    # Rows DuckDB makes cheaply but whose Arrow size passes the cap: stopped while fetching.
    rc, out, err, _ = run(capsys, "SELECT repeat('x', 100_000) AS s FROM range(5000)", "--db", db,
                          "--memory-limit", "64MB", "--max-rows", "5000", "--format", "csv")
    assert rc != 0 and out == ""
    assert err == ["ciea sql: the query needed more memory than --memory-limit 64MB and was stopped; add a WHERE "
                   "or a LIMIT, aggregate in fewer groups, or raise --memory-limit"]


def test_max_rows_is_pushed_into_the_query(db, capsys):
    # 10^10 rows: only a LIMIT inside the query lets this return.
    *_, overhead = run(capsys, "SELECT 1", "--db", db)
    rc, out, err, seconds = run(capsys, f"SELECT a.doc_id, b.n FROM {TABLE} a CROSS JOIN {TABLE} b", "--db", db,
                                "--max-rows", "5", "--format", "csv")
    assert rc == 0 and seconds < overhead + 10, (seconds, overhead)
    lines = out.splitlines()
    assert lines[0] == "doc_id,n" and len(lines) == 6
    assert err == ["ciea sql: more rows exist than the 5 shown (--max-rows 5; the query stopped there): add a LIMIT "
                   "or a WHERE, or raise --max-rows"]


@pytest.mark.parametrize(("where", "more"), [("n < 5", False), ("n < 6", True), ("n < 0", False)])
def test_the_more_rows_flag_is_truthful(db, where, more):
    cfg = SqlConfig(db=db, max_rows=5)
    columns, rows, has_more = run_sql(cfg, f"SELECT n FROM {TABLE} WHERE {where} ORDER BY n")
    assert columns == ["n"] and has_more is more
    assert rows == [(i,) for i in range(min(5, int(where.split("<")[1])))]


def test_describe_show_and_summarize_still_work_under_the_cap(db, capsys):
    rc, out, err, _ = run(capsys, f"DESCRIBE {TABLE}", "--db", db, "--format", "json")
    assert rc == 0 and err == [] and "caption" in out and "BIGINT" in out
    rc, out, err, _ = run(capsys, "SHOW TABLES", "--db", db, "--format", "csv")
    assert rc == 0 and out.splitlines() == ["name", TABLE]
    rc, out, err, _ = run(capsys, f"SUMMARIZE {TABLE}", "--db", db, "--max-rows", "2", "--format", "csv")
    assert rc == 0 and [line.split(",")[0] for line in out.splitlines()] == ["column_name", "doc_id", "caption"]
    assert len(err) == 1 and "more rows exist" in err[0]


def test_a_query_over_the_memory_limit_stops_with_one_line(db, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an in-memory DuckDB would spill to ./.tmp: nothing may appear
    groups = (f"SELECT a.caption || b.n AS k, count(*) AS c FROM {TABLE} a, "
              f"(SELECT n FROM {TABLE} WHERE n < 30) b GROUP BY k")  # 3 million groups
    rc, out, err, _ = run(capsys, groups, "--db", db, "--memory-limit", "32MB", "--max-rows", "1")
    assert rc != 0 and out == ""
    assert err == ["ciea sql: the query needed more memory than --memory-limit 32MB and was stopped; add a WHERE or "
                   "a LIMIT, aggregate in fewer groups, or raise --memory-limit"]
    assert os.listdir(tmp_path) == []
    # The same query within the default limit (2GB) runs: the limit, not the query, stopped it.
    rc, out, err, _ = run(capsys, groups, "--db", db, "--max-rows", "1", "--format", "csv")
    assert rc == 0 and out.splitlines()[0] == "k,c" and len(err) == 1 and "more rows exist" in err[0]
    with pytest.raises(SystemExit, match="memory_limit"):
        sql_job.parse_config(["SELECT 1", "--db", db, "--memory-limit", "lots"])


def test_duckdb_errors_are_one_line(db, capsys):
    rc, _, err, _ = run(capsys, f"SELECT nope FROM {TABLE}", "--db", db)
    assert rc == 2 and len(err) == 1 and err[0].startswith("ciea sql: DuckDB: Binder Error:") and "nope" in err[0]
    rc, _, err, _ = run(capsys, f"SELECT doc_id FROM {TABLE} WHERE", "--db", db)
    assert rc == 2 and len(err) == 1 and "syntax error" in err[0] and "LINE" not in err[0]
