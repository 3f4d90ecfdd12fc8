"""The library-backed metrics (pytrec_eval) on hand-worked cases: trec_eval's tie rule,
Success@k beside Recall@k, graded qrels, nothing retrieved, a query without positives, a
WebQA-style query with several positives; and a property against a tiny reference formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.query.metrics import (
    evaluate_run,
    graded_ndcg_at_k,
    metric_names,
    mrr_at_k,
    ndcg_at_k,
    recall_at_k,
    success_at_k,
    topk_from_scores,
)


def _ks(*ks):
    return {"ks_mrr": ks, "ks_ndcg": ks, "ks_recall": ks, "ks_success": ks, "ks_graded_ndcg": ks}


def test_ties_broken_by_doc_id_descending():
    # a, b, c tie; trec_eval orders c, b, a (doc id descending), not a, b, c (corpus order).
    run = {"q": {"a": 0.5, "b": 0.5, "c": 0.5, "d": 0.9}}
    rep = evaluate_run(run, {"q": {"a"}}, **_ks(1, 2, 4))
    v = rep.per_query["q"]
    # ranking d, c, b, a: the relevant a is at rank 4.
    assert v["MRR@4"] == pytest.approx(1 / 4) and v["MRR@2"] == 0.0
    assert v["Success@1"] == 0.0 and v["Success@2"] == 0.0 and v["Success@4"] == 1.0
    assert v["NDCG@4"] == pytest.approx(1 / math.log2(5))
    # the same ranking as a list keeps its order: a first.
    assert mrr_at_k(["a", "b", "c", "d"], {"a"}, 1) == 1.0
    assert mrr_at_k({"a": 1.0, "b": 1.0, "z": 1.0}, {"a"}, 10) == pytest.approx(1 / 3)
    assert mrr_at_k({"a": 1.0, "b": 1.0, "z": 1.0}, {"z"}, 1) == 1.0


def test_topk_keeps_what_trec_eval_ranks_first_on_the_full_run():
    rng = np.random.default_rng(7)
    scores = rng.integers(0, 3, size=(20, 30)).astype(np.float32)
    ids = [f"d{i:02d}" for i in range(30)]
    qrels = {f"q{r}": {ids[j] for j in rng.choice(30, 3, replace=False)} for r in range(20)}
    full = {f"q{r}": dict(zip(ids, map(float, scores[r]), strict=True)) for r in range(20)}
    cut = dict(zip(qrels, topk_from_scores(scores, ids, 5, with_scores=True), strict=True))
    listed = dict(zip(qrels, topk_from_scores(scores, ids, 5), strict=True))
    a, b, c = (evaluate_run(r, qrels, **_ks(1, 5)).per_query for r in (full, cut, listed))
    assert a == b == c


def test_success_beside_recall_with_several_positives():
    # WebQA-style: three positives (two images, one text fact), one retrieved first.
    ranked = ["img1", "x", "txt1", "y", "img2"]
    rel = {"img1", "img2", "txt1"}
    assert recall_at_k(ranked, rel, 1) == pytest.approx(1 / 3)  # ours: divided by #positives
    assert success_at_k(ranked, rel, 1) == 1.0  # the release's "Recall@1"
    assert recall_at_k(ranked, rel, 3) == pytest.approx(2 / 3)
    assert recall_at_k(ranked, rel, 5) == 1.0
    assert mrr_at_k(ranked, rel, 10) == 1.0
    dcg = 1 + 1 / math.log2(4) + 1 / math.log2(6)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(ranked, rel, 5) == pytest.approx(dcg / idcg)
    assert success_at_k(["x", "y"], rel, 2) == 0.0


def test_graded_qrels_hand_worked():
    grades = {"a": 2, "b": 1, "c": 0}
    ranked = ["b", "c", "a"]
    # DCG = 1/log2(2) + 0 + 2/log2(4) = 2; IDCG = 2 + 1/log2(3)
    assert graded_ndcg_at_k(ranked, grades, 3) == pytest.approx(2 / (2 + 1 / math.log2(3)))
    # binary NDCG: relevant b and a (grade > 0), gain 1 each: (1 + 1/2) / (1 + 1/log2(3))
    assert ndcg_at_k(ranked, grades, 3) == pytest.approx(1.5 / (1 + 1 / math.log2(3)))
    assert recall_at_k(ranked, grades, 1) == 0.5 and success_at_k(ranked, grades, 1) == 1.0
    with pytest.raises(ValueError, match="whole number"):
        graded_ndcg_at_k(ranked, {"a": 0.5}, 3)


def test_nothing_relevant_retrieved_and_nothing_retrieved():
    rep = evaluate_run({"q1": ["x", "y"], "q2": []}, {"q1": {"a"}, "q2": {"a"}}, **_ks(1, 10))
    assert rep.num_queries == 2
    for qid in ("q1", "q2"):
        assert set(rep.per_query[qid].values()) == {0.0}, qid


def test_query_without_positives_library_vs_report():
    """trec_eval scores a judged query with no positive 0 on every measure; the report leaves
    it out of the means (and counts it), so it cannot drag them down."""
    import pytrec_eval

    qrels = {"q1": {"a": 1}, "q2": {"a": 0}}
    run = {"q1": {"a": 1.0}, "q2": {"a": 1.0}}
    lib = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank", "success.1"}).evaluate(run)
    assert lib["q2"] == {"recip_rank": 0.0, "success_1": 0.0}
    rep = evaluate_run(run, qrels, **_ks(1))
    assert list(rep.per_query) == ["q1"] and rep.num_skipped_no_qrels == 1
    assert rep.metrics["Success@1"] == 1.0 and rep.metrics["MRR@1"] == 1.0
    assert success_at_k(["a"], {"a": 0}, 1) == 0.0


def test_metric_names_success_after_recall():
    assert metric_names((10,), (), (1,), (), (1, 5)) == ["MRR@10", "Recall@1", "Success@1", "Success@5"]
    assert not any(n.startswith("Success") for n in metric_names())


# --------------------------------------------------------------------------- property


def _reference(ranked: list[str], rel: set[str], k: int) -> dict[str, float]:
    top = ranked[:k]
    hits = [i for i, d in enumerate(top) if d in rel]
    idcg = sum(1 / math.log2(i + 2) for i in range(min(k, len(rel))))
    return {
        f"MRR@{k}": 1 / (hits[0] + 1) if hits else 0.0,
        f"NDCG@{k}": sum(1 / math.log2(i + 2) for i in hits) / idcg,
        f"Recall@{k}": len(hits) / len(rel),
        f"Success@{k}": 1.0 if hits else 0.0,
    }


@settings(max_examples=150, deadline=None)
@given(
    n_docs=st.integers(1, 25),
    data=st.data(),
)
def test_library_equals_reference_formula_without_ties(n_docs, data):
    docs = [f"d{i}" for i in range(n_docs)]
    ranked = data.draw(st.permutations(docs))
    ranked = ranked[: data.draw(st.integers(0, n_docs))]
    rel = set(data.draw(st.lists(st.sampled_from(docs), min_size=1, max_size=n_docs, unique=True)))
    k = data.draw(st.integers(1, 30))
    # distinct scores in the ranking's order (no ties): the library must agree with the formula
    scores = {d: float(len(ranked) - i) + 0.5 for i, d in enumerate(ranked)}
    got = evaluate_run({"q": scores}, {"q": rel}, **{**_ks(k), "ks_graded_ndcg": ()}).per_query["q"]
    assert got == pytest.approx(_reference(ranked, rel, k), abs=1e-12)
