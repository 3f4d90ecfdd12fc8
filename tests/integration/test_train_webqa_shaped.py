"""The rows Ray Train's workers train on, for a corpus shaped like WebQA (issue 27, items 1–2).

The corpus goes through the real ``ciea ingest --source webqa`` from the release layout
(``tests/webqa_shaped.py``: no query names a target; image queries with two image
positives; text queries with three text positives), then ``ciea train`` runs two epochs on
two workers with ``debug.trace_rows``, so each worker writes down every example exactly as
its step collates it. A fault is injected in the second epoch: Ray Train restarts the worker
group from the epoch-end checkpoint, and the steps trained again after the restart must
train the very rows the uninterrupted run had trained at those steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from webqa_shaped import IMAGES, TRAIN, positives, write_webqa_shaped

from jobs import ingest, train

pytestmark = pytest.mark.usefixtures("ray_local")

EPOCHS = 2


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("webqa-shaped")
    source = write_webqa_shaped(tmp / "webqa")
    assert ingest.main(["--source", "webqa", "--path", str(source), "--root", str(tmp / "data"),
                        "--run-dir", str(tmp / "ingest"), "--no-progress"]) == 0
    return tmp / "data"


def _trace(run_dir: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(run_dir.glob("trace-rank*.jsonl")) for line in f.read_text().splitlines()]


#: 10 queries, 4 per step over 2 workers: 3 steps an epoch; the fault comes at step 5, in
#: the second epoch, after the epoch-end checkpoint at step 3.
FAULT_STEP = 5


@pytest.fixture(scope="module")
def traces(data_root, tmp_path_factory) -> dict[str, list[dict]]:
    runs = tmp_path_factory.mktemp("runs")
    assert train.main(["--preset", "tiny", "--root", str(data_root), "--storage-path", str(runs), "--name", "wq",
                       "--no-progress", "--set", f"train.epochs={EPOCHS}", "--set", "train.batch_size=4",
                       "--set", "train.eval_every=100", "--set", "debug.trace_rows=true",
                       "--set", f"debug.fail_at_step={FAULT_STEP}", "--set", "debug.fail_rank=1",
                       "--set", "run.max_failures=1"]) == 0
    records = _trace(runs / "wq")
    # Steps 4..FAULT_STEP ran twice: before the fault (the uninterrupted run's rows) and
    # after the restart. The file keeps both, in order; "plain" is the run as finished.
    seen: dict[tuple, dict] = {}
    first, again = [], []
    for r in records:
        key = (r["epoch"], r["qid"])
        (again if key in seen else first).append(r)
        seen.setdefault(key, r)
    return {"plain": first, "again": again, "all": records}


def _by_query(trace: list[dict]) -> dict[tuple[int, str], dict]:
    return {(r["epoch"], r["qid"]): r for r in trace}


def test_every_query_is_trained_once_per_epoch(traces):
    plain = traces["plain"]
    assert sorted((r["epoch"], r["qid"]) for r in plain) == sorted(
        (e, q["qid"]) for e in range(EPOCHS) for q in TRAIN)
    assert {r["step"] for r in traces["again"]} == set(range(4, FAULT_STEP + 1)), "only the lost steps ran twice"


def test_two_image_positives_both_lose_their_caption_tokens(traces):
    rows = _by_query(traces["plain"])
    for q in TRAIN:
        if len(q["img_posFacts"]) < 2:
            continue
        captions = sorted(IMAGES[p] for p in q["img_posFacts"])
        for e in range(EPOCHS):
            r = rows[(e, q["qid"])]
            assert r["positive"] in positives(q)
            assert r["comp_captions"] == captions, (q["qid"], e)  # both captions, whichever was drawn
            words = set(r["q_comp"].split())
            assert "night" in words and not words & set(" ".join(captions).split()), r["q_comp"]


def test_positives_are_redrawn_each_epoch_among_their_kind(traces):
    rows = _by_query(traces["plain"])
    multi = [q for q in TRAIN if len(positives(q)) > 1]
    for q in multi:
        kind = q["img_posFacts"] and "image" or "text"
        for e in range(EPOCHS):
            picked = rows[(e, q["qid"])]["positive"]
            assert picked in positives(q), (q["qid"], picked)
            if kind == "text":
                assert rows[(e, q["qid"])]["comp_captions"] == [] and rows[(e, q["qid"])]["q_comp"] is None
    # Not always the first listed positive, and not the same one in both epochs for all.
    picks = [rows[(e, q["qid"])]["positive"] for q in multi for e in range(EPOCHS)]
    assert any(p != positives(q)[0] for q in multi for p in (rows[(e, q["qid"])]["positive"] for e in range(EPOCHS)))
    assert any(rows[(0, q["qid"])]["positive"] != rows[(1, q["qid"])]["positive"] for q in multi), picks
    text_picks = {rows[(e, q["qid"])]["positive"] for q in multi if q["txt_posFacts"] for e in range(EPOCHS)}
    assert len(text_picks) > 4, "the text positive is drawn, not always the first of each query"


def test_a_restarted_worker_group_trains_the_same_rows(traces):
    plain, again = _by_query(traces["plain"]), traces["again"]
    assert again, "the fault made the group restart and train some steps again"
    for r in again:
        p = plain[(r["epoch"], r["qid"])]
        assert (r["step"], r["positive"], r["comp_captions"], r["q_comp"]) == (
            p["step"], p["positive"], p["comp_captions"], p["q_comp"])


def test_the_map_side_and_the_hash_joins_give_the_same_training_rows(data_root):
    """The two routes of ``epoch_dataset`` on the shapes WebQA takes (no target, two image
    positives, several text positives), with mined negatives that include a document not in
    the corpus (a null slot) and the caption lists ``q_comp`` needs."""
    from pipelines.store.delta_tables import Tables
    from pipelines.train.dataset import build_train_shards, read_queries
    from pipelines.train.draws import DrawSettings

    tables = Tables(str(data_root), {})
    docs = tables.read(tables.documents, columns=["doc_id", "modality"]).to_pylist()
    by_kind = {m: sorted(d["doc_id"] for d in docs if d["modality"] == m) for m in ("image", "text")}
    queries = read_queries(tables, "train")
    mined = {q["qid"]: {"image": by_kind["image"][i % 3:], "text": by_kind["text"][i % 5:]}
             for i, q in enumerate(queries)}
    mined[queries[0]["qid"]]["image"] = ["gone"]  # mined, then deleted from the corpus
    rows = {}
    for mb in (64, 0):
        shards, counts = build_train_shards(tables, "train", epochs=[0, 1], num_shards=2, mined=mined,
                                            settings=DrawSettings(seed=7), broadcast_mb=mb, num_partitions=1)
        rows[mb] = {name: [dict(sorted(r.items())) for r in shard.take_all()] for name, shard in shards.items()}
    assert rows[64] == rows[0]
    flat = [r for shard in rows[0].values() for r in shard]
    assert len(flat) == 2 * len(TRAIN) and all(r["pos_modality"] for r in flat)
    assert any(r["positive_captions"] and len(r["positive_captions"]) == 2 for r in flat), "q_comp's caption lists"
    gone = [r for r in flat if r["qid"] == queries[0]["qid"]]
    assert [(r["neg0_id"], r["neg0_modality"]) for r in gone] == [("gone", None)] * 2, "a left outer join's null slot"
    assert all(r["neg1_modality"] == "text" for r in flat if r["neg1_id"] is not None)
