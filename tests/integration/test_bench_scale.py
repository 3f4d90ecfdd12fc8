"""``bench/scale.py`` in its test-sized form: the real jobs (ingest, embed, index, search,
reindex) and the baselines at 500 documents, so the script cannot rot. The 1M run is a
benchmark (BENCHMARKS.md, docs/scale.md), not a test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SIZE, QUERIES = 500, 4
STAGES = ("ingest", "embed", "index", "search", "reindex")


@pytest.fixture(scope="module")
def scale_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("scale-out")
    work = tmp_path_factory.mktemp("scale-work")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, "-m", "bench.scale", "--sizes", str(SIZE), "--queries", str(QUERIES),
                           "--baselines", "--out", str(out), "--work", str(work)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The work folder (tables, checkpoint) is removed afterwards.
    assert list(work.iterdir()) == []
    return json.loads((out / f"scale_{SIZE}.json").read_text()), out


@pytest.mark.slow
def test_every_stage_measured_with_positive_numbers(scale_run: tuple[dict, Path]) -> None:
    res, out = scale_run
    assert set(res["stages"]) == set(STAGES)
    for name, st in res["stages"].items():
        assert st["wall_s"] > 0 and st["cpu_s"] > 0 and st["cpu_s_per_unit"] > 0, name
        assert st["peak_rss_mib"]["driver"] > 50, name  # a Python process with pyarrow at least
        # Private memory is part of the peak, never more (shared pages are the rest).
        assert 30 < st["peak_private_rss_mib"]["driver"] <= st["peak_rss_mib"]["driver"], name
        assert st["peak_tree_pss_mib"] > 0, name
    # Jobs that start Ray are measured with Ray's processes: workers and daemons show up.
    for name in ("ingest", "embed"):
        roles = res["stages"][name]["cpu_s_by_role"]
        assert roles.get("workers", 0) > 0 and roles.get("ray daemons", 0) > 0, (name, roles)
        assert res["stages"][name]["peak_rss_mib"]["workers"] > 0, name
    assert res["stages"]["search"]["units"] == QUERIES
    assert res["stages"]["reindex"]["units"] == res["change"]["changed"] == 5  # 1 % of 500
    for stage in ("embed", "index", "reindex"):
        assert res["disk"][stage]["lance"]["bytes_per_doc"] > 0
        assert res["disk"][stage]["delta"]["bytes_per_doc"] > 0
    assert (out / "scale_per_doc.png").stat().st_size > 10_000
    assert (out / "logs" / str(SIZE) / "embed.log").is_file()


@pytest.mark.slow
def test_row_counts_reconcile_across_stages(scale_run: tuple[dict, Path]) -> None:
    res, _ = scale_run
    assert res["reconciled"] and all(res["reconciled"].values()), res["reconciled"]
    ch, rei = res["change"], res["stages"]["reindex"]["rows"]
    assert ch["updated"] + ch["deleted"] + ch["inserted"] == ch["changed"]
    assert rei["rows"] == SIZE - ch["deleted"] + ch["inserted"]
    assert res["stages"]["search"]["rows"]["hits"] == QUERIES * 10


@pytest.mark.slow
def test_baselines_ran_side_by_side(scale_run: tuple[dict, Path]) -> None:
    b = scale_run[0]["baselines"]
    assert b["ingest_plain"]["rows"]["table_rows"] == SIZE
    assert b["embed_loop"]["rows"]["rows_written"] == SIZE
    assert b["embed_1x2"]["rows"]["rows_written"] == SIZE
    assert b["embed_1x2"]["rows"]["resources"]["actors"] == 1
    for key in ("ingest_vs_plain_wall", "embed_vs_loop_docs_per_s", "layout_2x1_vs_1x2_cpu"):
        assert b[key] > 0, key


@pytest.mark.slow
def test_embed_only_compares_the_job_the_loop_and_the_layout(tmp_path: Path) -> None:
    """``--embed-only``: ingest, then the bare loop, the job and one two-thread actor."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, "-m", "bench.scale", "--sizes", "300", "--embed-only",
                           "--out", str(tmp_path / "out"), "--work", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "embed_vs_loop_300.json").read_text())
    assert res["embed_loop"]["rows"]["rows_written"] == res["embed"]["rows"]["rows_written"] == 300
    assert res["embed_1x2"]["rows"]["resources"]["actors"] == 1
    for key in ("embed_vs_loop_docs_per_s", "embed_vs_loop_cpu", "layout_2x1_vs_1x2_wall"):
        assert res[key] > 0, key
    assert not (tmp_path / "out" / "scale_per_doc.png").exists()  # no plot for this mode
