"""Running ``ciea ingest`` in-process and reading what it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from jobs import ingest
from pipelines.store.delta_tables import Tables


def run_ingest(tmp: Path, root: Path | str, *args: str) -> dict:
    """``ciea ingest ... --root root``; returns the run summary."""
    run_dir = tmp / "runs"
    rc = ingest.main([*args, "--root", str(root), "--run-dir", str(run_dir), "--no-progress"])
    assert rc == 0
    return json.loads((run_dir / "latest.json").read_text())


def rows_by_id(table: pa.Table, key: str = "doc_id") -> dict[str, dict]:
    return {r[key]: r for r in table.to_pylist()}


def reconcile(summary: dict) -> None:
    d = summary["documents"]
    assert d["read"] == d["accepted"] + d["quarantined"]
    assert d["accepted"] == d["inserted"] + d["updated"] + d["unchanged"]
    assert sum(d["quarantined_by_reason"].values()) == d["quarantined"]


def content(tables: Tables, uri: str, drop: tuple[str, ...], key: str) -> list[dict]:
    """Rows without their run bookkeeping columns, sorted by ``key``."""
    t = tables.read(uri)
    t = t.drop_columns([c for c in drop if c in t.column_names])
    return sorted(t.to_pylist(), key=lambda r: r[key])
