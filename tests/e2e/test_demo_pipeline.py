"""``ciea demo`` end to end on the tiny preset: ingest → Ray Train → mine → stage 2 →
embed → evaluate → examples (with ``ciea pretrain-vision`` before stage 1), through the real jobs and one local Ray, run as a user runs
it (``python -m jobs.demo ... --no-progress``, its terminal captured); then a re-run, which
must repeat no work.

≈ 4 min (four Ray Train runs, two minings and embeds): the slow tier (CI). Every stage has
its own faster integration test in the loop."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import demo
from pipelines.store.delta_tables import Tables

TINY_DOCS = 120 + 40
REPO = Path(__file__).resolve().parents[2]
#: The one line still let through, declared: the driver's C++ core worker prints it (at
#: error level, straight to stderr, past Python's logging) for every Ray Data actor pool;
#: harmless, not actionable, and Ray's own bug (ray-project/ray#57733, #57838).
KNOWN_RAY_LINE = re.compile(r"core_worker\.cc:\d+: Actor with class name: 'MapWorker\(.*has constructor arguments "
                            r"in the object store and max_restarts > 0")
#: What Ray, Ray Data or the C++ core write when they reach a terminal: a run under
#: --no-progress must print none of it (its run log has it all).
RAY_NOISE = re.compile(r"Parquet dataset sampling|core_worker|\.cc:\d+\]|\(raylet\)|\((pid|\w+ pid)=\d+|"
                       r"Running Dataset|Dataset \w+ execution|INFO (worker|streaming_executor|logging)\.py|"
                       r"Registered dataset logger|UserWarning|it/s\]|row/s\]")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    done = subprocess.run(
        [sys.executable, "-m", "jobs.demo", "--preset", "tiny", "--output-dir", str(out), "--no-progress",
         "--set", "num_cpus=2"],
        cwd=REPO, capture_output=True, text=True, timeout=1800,
        env={**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    return done.returncode, out, done.stdout + done.stderr


@pytest.mark.slow
def test_no_progress_keeps_rays_own_lines_off_the_terminal(demo_run):
    rc, _, terminal = demo_run
    assert rc == 0, terminal[-3000:]
    noisy = [line for line in terminal.splitlines() if RAY_NOISE.search(line) and not KNOWN_RAY_LINE.search(line)]
    assert noisy == [], "\n".join(noisy[:20])
    assert "── train ciea (stage 1)" in terminal and "Done in" in terminal  # ours still reach it


@pytest.mark.slow
def test_demo_runs_every_stage(demo_run):
    rc, out, terminal = demo_run
    assert rc == 0, terminal[-3000:]
    summary = json.loads((out / "demo_summary.json").read_text())
    labels = [s["stage"] for s in summary["stages"]]
    assert labels[0] == "ingest the corpus into Delta"
    # MARVEL's visual pretraining runs once, before the first stage 1 (ciea starts from it;
    # text-only has no projector)
    assert labels[1] == "pretrain the visual module (stage 0)"
    assert "$ ciea pretrain-vision --preset tiny" in terminal
    assert re.search(r"\$ ciea train --preset tiny .*train\.init_from=\S*pretrain-vision/model", terminal)
    for variant in ("ciea", "text-only"):
        assert f"train {variant} (stage 1)" in labels and f"train {variant} (stage 2)" in labels
        assert f"embed with {variant}" in labels
        assert summary["models"][variant]["stage"] in (1, 2)
    assert labels[-1] == "evaluate on the test split"
    assert len(summary["examples"]) == 3
    # One composed query of the test split (the tiny corpus has 12), with CIEA's top 3 and
    # where the baselines rank its first relevant document, on the terminal and in the summary.
    composed = summary["composed_example"]
    assert composed and composed["qid"] and composed["reference_doc_id"].startswith("img-")
    assert len(composed["top"]) == 3
    assert set(composed["first_relevant"]) == {"ciea", "late fusion", "the picture alone"}
    assert f"[picture of {composed['reference_doc_id']}] “{composed['query']}”" in terminal
    report = json.loads((out / "eval" / "report.json").read_text())
    assert "composed" in json.dumps(report)  # scored as its own group


@pytest.mark.slow
def test_demo_lands_in_delta_and_lancedb(demo_run):
    import lancedb

    _, out, _ = demo_run
    assert Tables(str(out / "data")).read("documents").num_rows == TINY_DOCS
    db = lancedb.connect(str(out / "lancedb"))
    summary = json.loads((out / "demo_summary.json").read_text())
    for variant in ("ciea", "text-only"):
        table = db.open_table(demo.table_name(variant))
        assert table.count_rows() == TINY_DOCS
        assert set(table.to_arrow().column("model_id").to_pylist()) == {summary["models"][variant]["model_id"]}


@pytest.mark.slow
def test_demo_report_compares_every_variant_and_bm25(demo_run):
    _, out, _ = demo_run
    report = json.loads((out / "eval" / "report.json").read_text())
    text = json.dumps(report)
    for name in ("ciea", "text-only", "bm25"):
        assert f'"{name}"' in text
    assert (out / "eval" / "report.md").is_file()
    assert list((out / "eval").glob("*.png"))
    for value in _numbers(report):
        assert math.isfinite(value)


@pytest.mark.slow
def test_demo_rerun_repeats_no_work(demo_run, capsys):
    _, out, _ = demo_run
    trained = {p: p.stat().st_mtime_ns for p in (out / "train").glob("*/model/ciea_checkpoint.json")}
    assert len(trained) == 5  # stage 0, then two stages for each of the two variants
    capsys.readouterr()
    import ray

    try:
        assert demo.main(["--preset", "tiny", "--output-dir", str(out), "--no-progress", "--set", "num_cpus=2"]) == 0
    finally:
        ray.shutdown()
    printed = capsys.readouterr().out
    assert printed.count("nothing to do: the table already holds this version") == 2
    assert {p: p.stat().st_mtime_ns for p in (out / "train").glob("*/model/ciea_checkpoint.json")} == trained
    summary = json.loads((out / "demo_summary.json").read_text())
    assert not any(s["stage"].startswith("mine negatives") for s in summary["stages"]), "negatives reused"


@pytest.mark.parametrize(("override", "field"), [
    ("variants=[text-only]", "variants"), ("variants=[ciea,ciea]", "variants"),
    ("vision_pretrain.pairs=10", "vision_pretrain"), ("train.stage1_epochs=0", "train.stage1_epochs"),
])
def test_demo_rejects_bad_config_before_running(tmp_path, override, field):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--preset", "tiny", "--output-dir", str(tmp_path), "--set", override])
    assert field in str(exc.value)
    assert not (tmp_path / "data").exists()


def _numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield float(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
