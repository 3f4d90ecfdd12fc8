"""``ciea evaluate``'s scored runs (ties left to trec_eval) and the release's WebQA-Image
protocol (image-answer queries ranked against the image documents alone)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from pipelines.query import evaluation as E
from pipelines.query import evaluation_run
from pipelines.query import report as R
from pipelines.query.config import EvaluateConfig
from pipelines.query.metrics import evaluate_run
from pipelines.store.delta_tables import Tables
from tests.unit.test_evaluate_report import root  # noqa: F401  (the Delta fixture)


def _read_run(path) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for line in path.read_text().splitlines():
        qid, _, doc, _, score, _ = line.split()
        out[qid][doc] = float(score)
    return dict(out)


def test_scored_trec_file_keeps_the_ties_trec_eval_breaks(tmp_path):
    import pytrec_eval

    # Float32 cosines with a three-way tie: trec_eval ranks z, m, a (doc id descending).
    scores = np.array([[0.1, 0.7, 0.7, 0.3, 0.7]], dtype=np.float32)
    ids = ["a", "q", "m", "b", "z"]
    run = dict(zip(["q1"], E.topk_from_scores(scores, ids, 5, with_scores=True), strict=True))
    assert list(run["q1"]) == ["z", "q", "m", "b", "a"]
    qrels = {"q1": {"m": 1}}
    rep = evaluate_run(run, qrels, (10,), (10,), (1, 5), ks_success=(1, 3))
    assert rep.per_query["q1"]["MRR@10"] == pytest.approx(1 / 3)  # z, q, m: corpus order would give 1/2
    assert rep.per_query["q1"]["Success@1"] == 0.0 and rep.per_query["q1"]["Success@3"] == 1.0
    evaluation_run.write_trec(tmp_path, qrels, {"sys": run})
    back = _read_run(tmp_path / "runs" / "sys.txt")
    assert back == {"q1": {d: float(np.float32(s)) for d, s in run["q1"].items()}}
    lib = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank", "success.1,3"}).evaluate(back)["q1"]
    assert lib["recip_rank"] == pytest.approx(1 / 3) and lib["success_3"] == 1.0


def test_image_doc_ids_and_image_only_corpus(root):  # noqa: F811
    assert E.image_doc_ids(Tables(str(root))) == {"i1", "i2"}
    corpus = E.EncodedCorpus(["i1", "t1", "i2"], np.eye(3, dtype=np.float32))
    part = E.image_only(corpus, {"i1", "i2"})
    assert part.doc_ids == ["i1", "i2"]
    np.testing.assert_array_equal(part.vectors, np.eye(3, dtype=np.float32)[[0, 2]])


def test_add_image_index_group_scores_only_those_queries():
    report = evaluate_run({"q1": ["t1", "i1"], "q2": ["t2"]}, {"q1": {"i1"}, "q2": {"t2"}}, (10,), (), (1,))
    E.add_image_index_group(report, {"q1": {"i2": 0.9, "i1": 0.8}}, {"q1": {"i1"}, "q2": {"t2"}}, (10,), (), (1,),
                            ks_success=(1,))
    assert report.group_counts["image-index"] == 1
    assert report.by_group["image-index"] == {"MRR@10": 0.5, "Recall@1": 0.0, "Success@1": 0.0}
    assert report.metrics["MRR@10"] == pytest.approx(0.75)  # the shared index's means are untouched


def test_release_protocol_end_to_end_on_a_checkpoint(root, make_model, tmp_path):  # noqa: F811
    import pytrec_eval

    from ciea_model.checkpoint import save_checkpoint

    model, processor = make_model("ciea")
    save_checkpoint(model, processor, tmp_path / "ckpt")
    out = tmp_path / "out"
    cfg = EvaluateConfig(input={"root": str(root), "split": "test"}, progress=False, max_missing_fraction=0.5,
                         variants=[{"name": "c", "checkpoint": str(tmp_path / "ckpt")}],
                         metrics={"webqa_image_protocol": "release", "charts": []}, output={"out": str(out)})
    doc = evaluation_run.run(cfg)
    v = doc["variants"]["c"]
    # q1 is the only query whose relevant documents are all images.
    assert v["group_counts"]["image-index"] == 1 and doc["meta"]["webqa_image_protocol"] == "release"
    image_run = _read_run(out / "runs" / "c.image-index.txt")
    assert set(image_run) == {"q1"} and set(image_run["q1"]) == {"i1", "i2"}
    lib = pytrec_eval.RelevanceEvaluator({"q1": {"i1": 1}}, {"recip_rank", "success.1"}).evaluate(image_run)["q1"]
    assert v["by_group"]["image-index"]["MRR@10"] == pytest.approx(lib["recip_rank"])
    assert v["by_group"]["image-index"]["Success@1"] == lib["success_1"]
    assert "Success@1" in doc["metrics"] and "Recall@1" in doc["metrics"]
    # The shared index's run ranks every document for the same query.
    assert set(_read_run(out / "runs" / "c.txt")["q1"]) == {"i1", "i2", "t1", "t2"}
    md = (out / "report.md").read_text()
    assert "## `image-index`: image-answer queries ranked against the image documents alone" in md
    assert "Success@k is 1 when any relevant document is in the top k" in md
    assert R.IMAGE_INDEX_GROUP == E.IMAGE_INDEX_GROUP


def test_shared_index_protocol_is_the_default_and_adds_no_group(root, make_model, tmp_path):  # noqa: F811
    from ciea_model.checkpoint import save_checkpoint

    model, processor = make_model("ciea")
    save_checkpoint(model, processor, tmp_path / "ckpt")
    cfg = EvaluateConfig(input={"root": str(root), "split": "test"}, progress=False, max_missing_fraction=0.5,
                         variants=[{"name": "c", "checkpoint": str(tmp_path / "ckpt")}],
                         metrics={"charts": []}, output={"out": str(tmp_path / "out")})
    assert cfg.metrics.webqa_image_protocol == "shared-index"
    doc = evaluation_run.run(cfg)
    assert "image-index" not in doc["groups"] and "modality=image" in doc["groups"]
    assert not (tmp_path / "out" / "runs" / "c.image-index.txt").exists()


def test_protocol_flag_parses_and_a_bad_value_is_refused():
    from jobs import evaluate as job

    cfg, _ = job.parse_config(["--variant", "a=table:db/t", "--set", "metrics.webqa_image_protocol=release"])
    assert cfg.metrics.webqa_image_protocol == "release"
    assert cfg.metrics.names[-4:] == ["Success@1", "Success@5", "Success@20", "Success@100"]
    with pytest.raises(SystemExit) as e:
        job.parse_config(["--variant", "a=table:db/t", "--set", "metrics.webqa_image_protocol=image-only"])
    assert "shared-index" in str(e.value) and "release" in str(e.value)
