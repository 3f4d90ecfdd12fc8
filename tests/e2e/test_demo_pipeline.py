"""``ciea demo`` end to end on the tiny preset: ingest → Ray Train → mine → stage 2 →
embed → evaluate → examples, through the real jobs and one local Ray; then a re-run,
which must repeat no work."""

from __future__ import annotations

import json
import math

import pytest

from jobs import demo
from pipelines.store.delta_tables import Tables

TINY_DOCS = 120 + 40


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    import ray

    out = tmp_path_factory.mktemp("demo")
    try:
        rc = demo.main(["--preset", "tiny", "--output-dir", str(out), "--no-progress", "--set", "num_cpus=2"])
        yield rc, out
    finally:
        ray.shutdown()


def test_demo_runs_every_stage(demo_run):
    rc, out = demo_run
    assert rc == 0
    summary = json.loads((out / "demo_summary.json").read_text())
    labels = [s["stage"] for s in summary["stages"]]
    assert labels[0] == "ingest the corpus into Delta"
    for variant in ("ciea", "text-only"):
        assert f"train {variant} (stage 1)" in labels and f"train {variant} (stage 2)" in labels
        assert f"embed with {variant}" in labels
        assert summary["models"][variant]["stage"] in (1, 2)
    assert labels[-1] == "evaluate on the test split"
    assert len(summary["examples"]) == 3


def test_demo_lands_in_delta_and_lancedb(demo_run):
    import lancedb

    _, out = demo_run
    assert Tables(str(out / "data")).read("documents").num_rows == TINY_DOCS
    db = lancedb.connect(str(out / "lancedb"))
    summary = json.loads((out / "demo_summary.json").read_text())
    for variant in ("ciea", "text-only"):
        table = db.open_table(demo.table_name(variant))
        assert table.count_rows() == TINY_DOCS
        assert set(table.to_arrow().column("model_id").to_pylist()) == {summary["models"][variant]["model_id"]}


def test_demo_report_compares_every_variant_and_bm25(demo_run):
    _, out = demo_run
    report = json.loads((out / "eval" / "report.json").read_text())
    text = json.dumps(report)
    for name in ("ciea", "text-only", "bm25"):
        assert f'"{name}"' in text
    assert (out / "eval" / "report.md").is_file()
    assert list((out / "eval").glob("*.png"))
    for value in _numbers(report):
        assert math.isfinite(value)


def test_demo_rerun_repeats_no_work(demo_run, capsys):
    _, out = demo_run
    trained = {p: p.stat().st_mtime_ns for p in (out / "train").glob("*/model/ciea_checkpoint.json")}
    assert len(trained) == 4
    capsys.readouterr()
    assert demo.main(["--preset", "tiny", "--output-dir", str(out), "--no-progress", "--set", "num_cpus=2"]) == 0
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
