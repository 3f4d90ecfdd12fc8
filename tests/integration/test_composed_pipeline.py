"""Composed queries end to end (issue 25 items 3 and 5): the synthetic corpus with composed
queries through ``ciea ingest`` → ``ciea train`` (Ray Train, the tiny preset) → ``ciea embed``
→ ``ciea evaluate`` on a local Ray. The queries table carries the pictures, training takes
them (picture queries counted in the run's steps), and the report has a ``kind=composed``
group and the composed baselines side by side, for the table and the in-process checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from jobs import evaluate, ingest, train
from pipelines.store.delta_tables import Tables
from pipelines.store.splits import read_split

sys.path.insert(0, str(Path(__file__).parent))
from embed_helpers import run_embed  # noqa: E402

pytestmark = pytest.mark.usefixtures("ray_local")

COMPOSED = (32, 12, 12)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("composed")
    root = tmp / "data"
    rc = ingest.main(["--preset", "tiny", "--root", str(root), "--run-dir", str(tmp / "ingest"), "--no-progress",
                      "--set", f"source.synthetic.num_composed=[{','.join(map(str, COMPOSED))}]"])
    assert rc == 0
    runs = tmp / "runs"
    rc = train.main(["--preset", "tiny", "--root", str(root), "--storage-path", str(runs), "--name", "s1",
                     "--no-progress", "--set", "train.epochs=2", "--set", "train.eval_every=100"])
    assert rc == 0
    summary = json.loads((runs / "s1" / "summary.json").read_text())
    model_dir = str(runs / "s1" / "model")
    rc, embedded = run_embed(tmp, root, model_dir, "docs")
    assert rc == 0
    return {"tmp": tmp, "root": root, "runs": runs, "summary": summary, "model": model_dir,
            "db": str(root / "lancedb"), "embedded": embedded}


def test_ingest_stores_the_composed_queries_with_their_pictures(env):
    summary = json.loads((env["tmp"] / "ingest" / "latest.json").read_text())
    test = read_split(Tables(str(env["root"])), "test")
    composed = [q for q in test.queries if q["metadata"].get("kind") == "composed"]
    assert len(composed) == COMPOSED[2] and all(q["image"] for q in composed)
    assert all(q["image"] is None for q in test.queries if q["metadata"].get("kind") != "composed")
    for split, n in zip(("train", "dev", "test"), (60, 20, 20), strict=True):
        counts = summary["queries"][split]
        assert counts["read"] == counts["accepted"] == n + COMPOSED[("train", "dev", "test").index(split)]
        assert counts["quarantined"] == 0


def test_training_took_the_composed_queries(env):
    data = env["summary"]["data"]
    # The tiny preset's 60 train queries and the composed ones all have a positive; the
    # dev split (early stopping) holds its composed queries too.
    assert data["used"] == data["rows"] == 60 + COMPOSED[0], data
    assert data["dev_queries"] == 20 + COMPOSED[1], data


def test_the_report_has_a_composed_group_and_the_baselines(env):
    out = env["tmp"] / "eval"
    rc = evaluate.main(["--root", str(env["root"]), "--out", str(out), "--no-progress", "--set", "search.threads=1",
                        "--variant", f"table=table:{env['db']}/docs", "--variant", f"inproc=checkpoint:{env['model']}",
                        "--variant", f"bm25=fts:{env['db']}/docs", "--set", "metrics.recall=[1,10,100]"])
    assert rc == 0
    doc = json.loads((out / "report.json").read_text())
    for name in ("table", "inproc"):
        v = doc["variants"][name]
        assert v["group_counts"]["kind=composed"] == COMPOSED[2]
        for enc in ("image-only", "text-only", "late-fusion", "model"):
            assert v["group_counts"][f"composed={enc}"] == COMPOSED[2], (name, enc)
        assert v["by_group"]["composed=model"] == pytest.approx(v["by_group"]["kind=composed"])
    # The table and the in-process encoder agree on the composed queries.
    t, i = doc["variants"]["table"]["by_group"], doc["variants"]["inproc"]["by_group"]
    for enc in ("image-only", "late-fusion", "model"):
        assert t[f"composed={enc}"]["Recall@100"] == pytest.approx(i[f"composed={enc}"]["Recall@100"], abs=1e-6)
    # Full-text search ranks the composed queries by their text; no baselines.
    assert "composed=model" not in doc["variants"]["bm25"]["by_group"]
    assert doc["variants"]["bm25"]["group_counts"]["kind=composed"] == COMPOSED[2]
