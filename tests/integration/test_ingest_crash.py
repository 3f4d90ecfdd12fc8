"""Crash safety: an ingest killed with SIGKILL — midway through the Ray read, or between
its Delta commits — and then re-run leaves the same tables as one clean run. Both kills hit
a first ingest, i.e. the bulk load (append instead of MERGE): killed mid-stream it commits
nothing and the re-run bulk-loads again; killed after its commit the re-run merges."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from ingest_fixtures import write_bad_manifest
from ingest_helpers import content, run_ingest
from process_tree import kill_tree

from pipelines.store.delta_tables import Tables

pytestmark = pytest.mark.usefixtures("ray_local")

REPO = Path(__file__).resolve().parents[2]
SYNTH = ["--set", "source.synthetic.num_image_docs=2400", "--set", "source.synthetic.num_text_docs=600",
         "--set", "source.synthetic.num_queries=[50,10,10]", "--set", "source.synthetic.image_size=32",
         "--set", "source.rows_per_shard=100"]
DOC_DROP = ("run_id", "ingested_at")
Q_DROP = ("run_id", "quarantined_at")


def _spawn(args: list[str], tmp: Path, extra_env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    ray_tmp = tempfile.mkdtemp(prefix="ray-crash-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(extra_env)
    cmd = [sys.executable, "-m", "jobs.ingest", *args, "--run-dir", str(tmp / "runs-killed"),
           "--num-cpus", "2", "--set", f"ray.temp_dir={ray_tmp}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    return proc, ray_tmp


def _reap(proc: subprocess.Popen, ray_tmp: str) -> None:
    """Kill what the killed job left behind: its whole process tree and any Ray daemon
    started with its session folder, frozen first (:func:`process_tree.kill_tree`)."""
    kill_tree(proc.pid, also_matching=ray_tmp)
    proc.wait(timeout=30)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _compare(a: Tables, b: Tables, splits: tuple[str, ...]) -> None:
    assert content(a, a.documents, DOC_DROP, "doc_id") == content(b, b.documents, DOC_DROP, "doc_id")
    assert content(a, a.quarantine, Q_DROP, "quarantine_id") == content(b, b.quarantine, Q_DROP, "quarantine_id")
    for split in splits:
        assert content(a, a.queries(split), DOC_DROP, "qid") == content(b, b.queries(split), DOC_DROP, "qid")
        assert content(a, a.qrels(split), ("run_id",), "qid") == content(b, b.qrels(split), ("run_id",), "qid")


def _run_killed(args: list[str], tmp: Path, failpoint: str) -> None:
    proc, ray_tmp = _spawn(args, tmp, {"CIEA_INGEST_FAILPOINT": failpoint})
    try:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == -signal.SIGKILL, err.decode()[-3000:]
        assert f"failpoint {failpoint}" in err.decode()
    finally:
        _reap(proc, ray_tmp)


def test_killed_midway_through_the_read_then_rerun_equals_a_clean_run(tmp_path):
    root = tmp_path / "killed"
    # SIGKILL once 1,500 of 3,000 records have streamed from the Ray workers into the merge.
    _run_killed([*SYNTH, "--root", str(root)], tmp_path, "documents_after_rows=1500")
    killed = Tables(str(root))
    # Nothing committed: at most the empty table that the run created first.
    assert killed.version(killed.documents) in (None, 0)
    assert killed.version(killed.documents) is None or killed.read(killed.documents).num_rows == 0

    rerun = run_ingest(tmp_path, root, *SYNTH)
    assert rerun["documents"]["write"] == "append"  # still empty: bulk-loaded again
    clean_root = tmp_path / "clean"
    clean = run_ingest(tmp_path, clean_root, *SYNTH)
    assert rerun["documents"]["inserted"] == clean["documents"]["inserted"] == 3000
    _compare(killed, Tables(str(clean_root)), ("train", "dev", "test"))


def test_killed_between_commits_then_rerun_equals_a_clean_run(tmp_path):
    write_bad_manifest(tmp_path / "src")
    args = ["--source", "manifest", "--path", str(tmp_path / "src")]
    root = tmp_path / "killed"
    _run_killed([*args, "--root", str(root)], tmp_path, "after_documents")
    killed = Tables(str(root))
    assert killed.version(killed.documents) == 1  # documents committed (a bulk append) ...
    assert killed.open(killed.documents).history(1)[0]["operation"] == "WRITE"
    assert killed.version(killed.quarantine) is None  # ... quarantine not yet

    rerun = run_ingest(tmp_path, root, *args)
    assert rerun["documents"]["write"] == "merge"  # the appended rows are compared, not re-added
    assert rerun["documents"]["unchanged"] == 3 and rerun["quarantine"]["inserted"] == 10
    clean_root = tmp_path / "clean"
    run_ingest(tmp_path, clean_root, *args)
    _compare(killed, Tables(str(clean_root)), ())
