"""Unit tests for pipelines.query.metrics (fast, no Ray)."""

from __future__ import annotations

import logging
import math
import random

import numpy as np
import pytest

from pipelines.query.metrics import (
    OVERALL,
    RetrievalReport,
    evaluate_run,
    format_table,
    metric_names,
    mrr_at_k,
    ndcg_at_k,
    recall_at_k,
    topk_from_scores,
)

# --------------------------------------------------------------------------- hand-computed


def test_mrr_hand_computed():
    ranked = ["a", "b", "c", "d"]
    assert mrr_at_k(ranked, {"c"}, 10) == pytest.approx(1 / 3)
    assert mrr_at_k(ranked, {"c", "d"}, 10) == pytest.approx(1 / 3)
    assert mrr_at_k(ranked, {"a"}, 1) == 1.0
    assert mrr_at_k(ranked, {"c"}, 2) == 0.0  # first relevant is below the cutoff
    assert mrr_at_k(ranked, {"c"}, 3) == pytest.approx(1 / 3)


def test_ndcg_hand_computed():
    # 2 relevant at ranks 1 and 3: DCG = 1/log2(2) + 1/log2(4) = 1 + 0.5
    # IDCG (2 relevant at ranks 1, 2) = 1 + 1/log2(3)
    ranked = ["r1", "n1", "r2", "n2", "n3"]
    expected = (1.0 + 0.5) / (1.0 + 1.0 / math.log2(3))
    assert ndcg_at_k(ranked, {"r1", "r2"}, 10) == pytest.approx(expected, abs=1e-15)
    assert ndcg_at_k(ranked, {"r1", "r2"}, 3) == pytest.approx(expected, abs=1e-15)
    # cutoff 2: only rank 1 counts; ideal has min(2, 2) = 2 relevant
    assert ndcg_at_k(ranked, {"r1", "r2"}, 2) == pytest.approx(1.0 / (1.0 + 1.0 / math.log2(3)))
    # cutoff 1: ideal truncated to 1 relevant -> perfect
    assert ndcg_at_k(ranked, {"r1", "r2"}, 1) == 1.0


def test_ndcg_ideal_truncated_at_k():
    # 5 relevant docs, cutoff 2: IDCG uses min(k, R) = 2 ideal docs.
    relevant = {"a", "b", "c", "d", "e"}
    assert ndcg_at_k(["a", "b", "x"], relevant, 2) == pytest.approx(1.0)
    # single relevant at rank 2 of 2
    expected = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k(["x", "a"], relevant, 2) == pytest.approx(expected)


def test_recall_hand_computed():
    ranked = ["a", "b", "c", "d", "e"]
    relevant = {"b", "e", "z", "y"}
    assert recall_at_k(ranked, relevant, 1) == 0.0
    assert recall_at_k(ranked, relevant, 2) == pytest.approx(1 / 4)
    assert recall_at_k(ranked, relevant, 5) == pytest.approx(2 / 4)


def test_graded_mapping_qrels_are_binarised():
    relevant = {"a": 0, "b": 2, "c": 1}
    assert recall_at_k(["a", "b", "c"], relevant, 3) == 1.0
    assert mrr_at_k(["a", "b", "c"], relevant, 3) == 0.5
    assert ndcg_at_k(["b", "c", "a"], relevant, 3) == 1.0


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("fn", [mrr_at_k, ndcg_at_k, recall_at_k])
def test_no_relevant_in_top_k_is_zero(fn):
    assert fn(["a", "b", "c"], {"z"}, 3) == 0.0
    assert fn(["a", "b", "c"], {"c"}, 2) == 0.0
    assert fn([], {"c"}, 5) == 0.0
    assert fn(["a"], set(), 5) == 0.0  # no relevant at all


def test_k_larger_than_list():
    ranked = ["a", "b"]
    assert mrr_at_k(ranked, {"b"}, 100) == 0.5
    assert recall_at_k(ranked, {"b", "q"}, 100) == 0.5
    # ideal has min(100, 2) = 2 docs; DCG has the one at rank 2
    expected = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k(ranked, {"b", "q"}, 100) == pytest.approx(expected)


def test_duplicates_keep_first_occurrence():
    # "a" repeated: deduplicated ranking is a, b, c -> "c" is at rank 3
    ranked = ["a", "a", "b", "a", "c"]
    assert mrr_at_k(ranked, {"c"}, 3) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, {"c"}, 3) == 1.0
    assert ndcg_at_k(ranked, {"c"}, 3) == pytest.approx(1 / math.log2(4))
    # a duplicated relevant doc is not counted twice
    assert recall_at_k(["a", "a"], {"a", "b"}, 2) == 0.5
    assert ndcg_at_k(["a", "a"], {"a"}, 2) == 1.0


def test_duplicates_warn_once_per_run(caplog):
    run = {"q1": ["a", "a", "b"], "q2": ["c", "c"], "q3": ["x"]}
    qrels = {"q1": {"b"}, "q2": {"c"}, "q3": {"x"}}
    with caplog.at_level(logging.WARNING, logger="pipelines.query.metrics"):
        report = evaluate_run(run, qrels, ks_mrr=(2,), ks_ndcg=(), ks_recall=())
    dup_warnings = [r for r in caplog.records if "duplicate" in r.getMessage()]
    assert len(dup_warnings) == 1
    assert "2 ranking" in dup_warnings[0].getMessage()
    assert report.per_query["q1"]["MRR@2"] == 0.5


@pytest.mark.parametrize("fn", [mrr_at_k, ndcg_at_k, recall_at_k])
@pytest.mark.parametrize("k", [0, -3])
def test_bad_k_raises(fn, k):
    with pytest.raises(ValueError, match=r"k must be >= 1.*k=" + str(k)):
        fn(["a"], {"a"}, k)


def test_bad_k_types_and_string_inputs():
    with pytest.raises(TypeError):
        mrr_at_k(["a"], {"a"}, 2.5)
    with pytest.raises(TypeError):
        mrr_at_k(["a"], {"a"}, True)
    with pytest.raises(TypeError, match="single string"):
        recall_at_k(["a"], "a", 1)
    with pytest.raises(TypeError, match="single string"):
        recall_at_k("abc", {"a"}, 1)
    assert mrr_at_k(["a"], {"a"}, np.int64(1)) == 1.0


def test_evaluate_run_bad_ks():
    with pytest.raises(ValueError, match="ks_recall"):
        evaluate_run({"q": ["a"]}, {"q": {"a"}}, ks_recall=(1, 0))
    with pytest.raises(TypeError, match="sequence"):
        evaluate_run({"q": ["a"]}, {"q": {"a"}}, ks_mrr=10)


# --------------------------------------------------------------------------- evaluate_run


def test_metric_names_order():
    assert metric_names() == [
        "MRR@10",
        "NDCG@10",
        "Recall@1",
        "Recall@5",
        "Recall@10",
        "Recall@20",
        "Recall@100",
    ]
    assert metric_names((5, 5), (), (1,)) == ["MRR@5", "Recall@1"]


def test_evaluate_run_skip_and_missing_counts():
    run = {
        "q1": ["a", "b", "c"],  # evaluated
        "q2": ["b", "a"],  # evaluated
        "q3": ["a"],  # not in qrels -> skipped
        "q4": ["a"],  # qrels entry has no relevant doc -> skipped
        "q5": [],  # empty ranking, has qrels -> evaluated as 0
    }
    qrels = {
        "q1": {"c"},
        "q2": {"a", "z"},
        "q4": set(),
        "q5": {"a"},
        "q6": {"a"},  # missing from run -> ignored, counted
        "q7": {"b": 0},  # graded mapping with no relevant doc -> not counted anywhere
    }
    rep = evaluate_run(run, qrels, ks_mrr=(10,), ks_ndcg=(10,), ks_recall=(1, 5))
    assert rep.num_queries == 3
    assert rep.num_skipped_no_qrels == 2
    assert rep.num_missing_from_run == 1
    assert set(rep.per_query) == {"q1", "q2", "q5"}
    assert rep.metrics["MRR@10"] == pytest.approx((1 / 3 + 1 / 2 + 0) / 3)
    assert rep.metrics["Recall@5"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert rep.metrics["Recall@1"] == 0.0
    assert list(rep.metrics) == ["MRR@10", "NDCG@10", "Recall@1", "Recall@5"]
    assert rep.by_group == {}
    d = rep.to_dict()
    assert d["num_queries"] == 3 and "per_query" not in d
    assert set(rep.to_dict(include_per_query=True)["per_query"]) == {"q1", "q2", "q5"}


def test_evaluate_run_groups():
    run = {
        "c1": ["a", "b"],
        "c2": ["b", "a"],
        "i1": ["x", "y", "z"],
        "u1": ["a"],
    }
    qrels = {"c1": {"a"}, "c2": {"a"}, "i1": {"z"}, "u1": {"a"}}
    groups = {"c1": "caption", "c2": "caption", "i1": "image"}
    rep = evaluate_run(run, qrels, ks_mrr=(10,), ks_ndcg=(), ks_recall=(1,), groups=groups)
    assert rep.group_counts == {"caption": 2, "image": 1}
    assert rep.num_ungrouped == 1
    assert rep.by_group["caption"]["MRR@10"] == pytest.approx((1 + 0.5) / 2)
    assert rep.by_group["image"]["MRR@10"] == pytest.approx(1 / 3)
    assert rep.by_group["caption"]["Recall@1"] == pytest.approx(0.5)
    assert rep.metrics["MRR@10"] == pytest.approx((1 + 0.5 + 1 / 3 + 1) / 4)
    assert rep.value("MRR@10", "image") == pytest.approx(1 / 3)
    assert rep.value("MRR@10") == rep.metrics["MRR@10"]


def test_evaluate_run_reserved_group_label():
    with pytest.raises(ValueError, match="reserved"):
        evaluate_run({"q": ["a"]}, {"q": {"a"}}, groups={"q": OVERALL})


def test_evaluate_run_nothing_to_evaluate():
    rep = evaluate_run({"q1": ["a"]}, {"q2": {"a"}})
    assert rep.num_queries == 0
    assert rep.num_skipped_no_qrels == 1
    assert rep.num_missing_from_run == 1
    assert all(math.isnan(v) for v in rep.metrics.values())


# --------------------------------------------------------------------------- trec_eval agreement

# Fixed fixture. The expected per-query values below were produced by trec_eval via
# pytrec-eval-terrier 0.5.11 (PyPI wheel) with binary qrels (grade 1), run scores
# len(ranking) - position (strictly decreasing, so trec_eval's tie handling is
# irrelevant), measures ndcg_cut.1,5,10,20 / recall.1,5,10,20, and recip_rank on the
# run truncated to the top k documents for MRR@k.
FIXTURE_RUN = {
    "q1": ["d3", "d1", "d7", "d2", "d9"],
    "q2": ["d5", "d4", "d6", "d8", "d1", "d2", "d3", "d7", "d9", "d10", "d11", "d12"],
    "q3": ["d2", "d4"],
    "q4": [f"d{i}" for i in range(1, 23)],
    "q5": ["d8", "d6", "d4", "d2"],
    "q6": ["d11", "d12", "d13"],
}
FIXTURE_QRELS = {
    "q1": {"d1", "d2", "d4"},
    "q2": {"d1", "d10", "d12"},
    "q3": {"d9"},
    "q4": {f"d{i}" for i in range(1, 24, 2)},
    "q5": {"d8"},
    "q6": {"d13", "d14"},
}
FIXTURE_KS = (1, 5, 10, 20)
FIXTURE_EXPECTED = {
    "q1": {
        "MRR@1": 0.0, "MRR@5": 0.5, "MRR@10": 0.5, "MRR@20": 0.5,
        "NDCG@1": 0.0, "NDCG@5": 0.49818925746641285,
        "NDCG@10": 0.49818925746641285, "NDCG@20": 0.49818925746641285,
        "Recall@1": 0.0, "Recall@5": 0.6666666666666666,
        "Recall@10": 0.6666666666666666, "Recall@20": 0.6666666666666666,
    },
    "q2": {
        "MRR@1": 0.0, "MRR@5": 0.2, "MRR@10": 0.2, "MRR@20": 0.2,
        "NDCG@1": 0.0, "NDCG@5": 0.18154179253735267,
        "NDCG@10": 0.3171937659698004, "NDCG@20": 0.44401078280219397,
        "Recall@1": 0.0, "Recall@5": 0.3333333333333333,
        "Recall@10": 0.6666666666666666, "Recall@20": 1.0,
    },
    "q3": {
        "MRR@1": 0.0, "MRR@5": 0.0, "MRR@10": 0.0, "MRR@20": 0.0,
        "NDCG@1": 0.0, "NDCG@5": 0.0, "NDCG@10": 0.0, "NDCG@20": 0.0,
        "Recall@1": 0.0, "Recall@5": 0.0, "Recall@10": 0.0, "Recall@20": 0.0,
    },
    "q4": {
        "MRR@1": 1.0, "MRR@5": 1.0, "MRR@10": 1.0, "MRR@20": 1.0,
        "NDCG@1": 1.0, "NDCG@5": 0.639945385422766,
        "NDCG@10": 0.5548989126424904, "NDCG@20": 0.7430182909557776,
        "Recall@1": 0.08333333333333333, "Recall@5": 0.25,
        "Recall@10": 0.4166666666666667, "Recall@20": 0.8333333333333334,
    },
    "q5": {
        "MRR@1": 1.0, "MRR@5": 1.0, "MRR@10": 1.0, "MRR@20": 1.0,
        "NDCG@1": 1.0, "NDCG@5": 1.0, "NDCG@10": 1.0, "NDCG@20": 1.0,
        "Recall@1": 1.0, "Recall@5": 1.0, "Recall@10": 1.0, "Recall@20": 1.0,
    },
    "q6": {
        "MRR@1": 0.0, "MRR@5": 0.3333333333333333,
        "MRR@10": 0.3333333333333333, "MRR@20": 0.3333333333333333,
        "NDCG@1": 0.0, "NDCG@5": 0.3065735963827292,
        "NDCG@10": 0.3065735963827292, "NDCG@20": 0.3065735963827292,
        "Recall@1": 0.0, "Recall@5": 0.5, "Recall@10": 0.5, "Recall@20": 0.5,
    },
}  # fmt: skip


def test_agrees_with_trec_eval_fixture():
    run = dict(FIXTURE_RUN)
    qrels = dict(FIXTURE_QRELS)
    run["only_in_run"] = ["d1"]
    qrels["only_in_qrels"] = {"d1"}
    rep = evaluate_run(run, qrels, FIXTURE_KS, FIXTURE_KS, FIXTURE_KS)
    assert rep.num_queries == len(FIXTURE_EXPECTED)
    assert rep.num_skipped_no_qrels == 1
    assert rep.num_missing_from_run == 1
    for qid, expected in FIXTURE_EXPECTED.items():
        assert rep.per_query[qid] == pytest.approx(expected, abs=1e-12), qid
        for k in FIXTURE_KS:
            assert mrr_at_k(FIXTURE_RUN[qid], FIXTURE_QRELS[qid], k) == pytest.approx(
                expected[f"MRR@{k}"], abs=1e-12
            )
            assert ndcg_at_k(FIXTURE_RUN[qid], FIXTURE_QRELS[qid], k) == pytest.approx(
                expected[f"NDCG@{k}"], abs=1e-12
            )
            assert recall_at_k(FIXTURE_RUN[qid], FIXTURE_QRELS[qid], k) == pytest.approx(
                expected[f"Recall@{k}"], abs=1e-12
            )
    # trec_eval's "all" line is the arithmetic mean over the evaluated queries.
    for name, value in rep.metrics.items():
        mean = sum(v[name] for v in FIXTURE_EXPECTED.values()) / len(FIXTURE_EXPECTED)
        assert value == pytest.approx(mean, abs=1e-12), name


def _pytrec_eval_reference(pytrec_eval, run, qrels, ks):
    """Per-query trec_eval values for run/qrels (unique rankings), keyed like evaluate_run."""
    trec_qrels = {q: {d: 1 for d in rel} for q, rel in qrels.items()}

    def scored(ranking):
        return {d: float(len(ranking) - i) for i, d in enumerate(ranking)}

    kstr = ",".join(map(str, ks))
    evaluator = pytrec_eval.RelevanceEvaluator(trec_qrels, {f"ndcg_cut.{kstr}", f"recall.{kstr}"})
    res = evaluator.evaluate({q: scored(r) for q, r in run.items()})
    out = {
        q: {
            **{f"NDCG@{k}": vals[f"ndcg_cut_{k}"] for k in ks},
            **{f"Recall@{k}": vals[f"recall_{k}"] for k in ks},
        }
        for q, vals in res.items()
    }
    for k in ks:
        rr = pytrec_eval.RelevanceEvaluator(trec_qrels, {"recip_rank"}).evaluate(
            {q: scored(r[:k]) for q, r in run.items()}
        )
        for q, vals in rr.items():
            out[q][f"MRR@{k}"] = vals["recip_rank"]
    return out


def test_agrees_with_pytrec_eval_random():
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = random.Random(20250611)
    ks = (1, 3, 5, 10, 20, 100)
    for trial in range(50):
        n_docs = rng.randint(5, 150)
        docs = [f"doc{i}" for i in range(n_docs)]
        run, qrels = {}, {}
        for qi in range(rng.randint(1, 12)):
            qid = f"t{trial}q{qi}"
            if rng.random() < 0.9:
                run[qid] = rng.sample(docs, rng.randint(1, n_docs))
            if rng.random() < 0.9:
                qrels[qid] = set(rng.sample(docs, rng.randint(1, min(n_docs, 30))))
        if not set(run) & set(qrels):
            continue
        expected = _pytrec_eval_reference(pytrec_eval, run, qrels, ks)
        rep = evaluate_run(run, qrels, ks, ks, ks)
        assert set(rep.per_query) == set(expected)
        assert rep.num_missing_from_run == len(set(qrels) - set(run))
        assert rep.num_skipped_no_qrels == len(set(run) - set(qrels))
        for qid, values in expected.items():
            assert rep.per_query[qid] == pytest.approx(values, abs=1e-12), (trial, qid)


# --------------------------------------------------------------------------- topk_from_scores


def _reference_topk(scores, doc_ids, k):
    """trec_eval's order: score descending, ties by doc id descending."""
    return [[doc_ids[j] for j in sorted(range(len(doc_ids)), key=lambda j: (row[j], doc_ids[j]), reverse=True)[:k]]
            for row in scores]


def test_topk_basic_and_ties_as_trec_eval():
    scores = np.array([[0.1, 0.9, 0.5, 0.9, 0.2], [1.0, 1.0, 1.0, 1.0, 1.0]], dtype=np.float32)
    ids = ["a", "b", "c", "d", "e"]
    # ties by doc id descending (trec_eval), not by column order
    assert topk_from_scores(scores, ids, 3) == [["d", "b", "c"], ["e", "d", "c"]]
    # tie straddling the cutoff: the larger doc id wins
    assert topk_from_scores(scores, ids, 1) == [["d"], ["e"]]
    # the columns' order does not matter, only the ids
    assert topk_from_scores(scores[:, ::-1], ids[::-1], 3) == [["d", "b", "c"], ["e", "d", "c"]]
    scored = topk_from_scores(scores, ids, 2, with_scores=True)
    assert [list(s) for s in scored] == [["d", "b"], ["e", "d"]]
    assert scored[0]["d"] == pytest.approx(0.9) and scored[1] == {"e": 1.0, "d": 1.0}


def test_topk_k_larger_than_n():
    scores = np.array([[3, 1, 2]])
    assert topk_from_scores(scores, ["x", "y", "z"], 10) == [["x", "z", "y"]]


def test_topk_matches_full_argsort_random():
    rng = np.random.default_rng(0)
    # few distinct values -> many ties, including across the k boundary
    scores = rng.integers(0, 5, size=(64, 200)).astype(np.float32)
    ids = [f"d{i}" for i in range(200)]
    for k in (1, 2, 7, 50, 199, 200, 500):
        assert topk_from_scores(scores, ids, k) == _reference_topk(scores, ids, k), k
    cont = rng.standard_normal((33, 97))
    ids = [f"d{i}" for i in range(97)]
    for k in (1, 10, 96, 97):
        assert topk_from_scores(cont, ids, k) == _reference_topk(cont, ids, k), k


def test_topk_chunked(monkeypatch):
    import pipelines.query.metrics as m

    monkeypatch.setattr(m, "_TOPK_CHUNK_ELEMENTS", 50)  # forces several row chunks
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 3, size=(23, 17)).astype(np.float64)
    ids = [f"d{i}" for i in range(17)]
    assert topk_from_scores(scores, ids, 4) == _reference_topk(scores, ids, 4)


def test_topk_inf_and_errors():
    scores = np.array([[-np.inf, 0.0, np.inf]])
    assert topk_from_scores(scores, ["a", "b", "c"], 3) == [["c", "b", "a"]]
    with pytest.raises(ValueError, match="k must be >= 1"):
        topk_from_scores(scores, ["a", "b", "c"], 0)
    with pytest.raises(ValueError, match="2-D"):
        topk_from_scores(np.zeros(3), ["a", "b", "c"], 1)
    with pytest.raises(ValueError, match="columns"):
        topk_from_scores(np.zeros((1, 3)), ["a", "b"], 1)
    with pytest.raises(ValueError, match="NaN"):
        topk_from_scores(np.array([[0.0, np.nan]]), ["a", "b"], 1)
    assert topk_from_scores(np.zeros((0, 3)), ["a", "b", "c"], 2) == []
    assert topk_from_scores(np.zeros((2, 0)), [], 2) == [[], []]
    assert topk_from_scores(np.zeros((1, 0)), [], 2, with_scores=True) == [{}]


# --------------------------------------------------------------------------- format_table


def _report(mrr, groups=None):
    return RetrievalReport(
        metrics={"MRR@10": mrr, "Recall@5": mrr / 2},
        num_queries=4,
        by_group=groups or {},
    )


def test_format_table_contents_and_alignment():
    rows = {
        "ciea": _report(0.5, {"caption": {"MRR@10": 0.25, "Recall@5": 0.1}}),
        "bm25-baseline": _report(0.123456),
    }
    table = format_table(rows, ["MRR@10", "Recall@5"])
    lines = table.splitlines()
    assert lines[0].split() == [
        "system",
        "MRR@10",
        "MRR@10[caption]",
        "Recall@5",
        "Recall@5[caption]",
    ]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["ciea", "50.00", "25.00", "25.00", "10.00"]
    assert lines[3].split() == ["bm25-baseline", "12.35", "-", "6.17", "-"]
    # aligned: every line ends at the same column for right-aligned values
    assert len({len(line) for line in lines}) == 1


def test_format_table_explicit_groups_and_nan():
    rows = {"sys": _report(math.nan, {"image": {"MRR@10": 1.0}})}
    table = format_table(rows, ["MRR@10"], groups=["image", OVERALL])
    lines = table.splitlines()
    assert lines[0].split() == ["system", "MRR@10[image]", "MRR@10"]
    assert lines[2].split() == ["sys", "100.00", "nan"]
    with pytest.raises(ValueError, match="metrics"):
        format_table(rows, [])


def test_format_table_from_evaluate_run():
    run = {"q1": ["a", "b"], "q2": ["b", "a"]}
    qrels = {"q1": {"a"}, "q2": {"a"}}
    rep = evaluate_run(run, qrels, groups={"q1": "caption", "q2": "image"})
    table = format_table({"sysA": rep}, ["MRR@10"])
    assert "sysA" in table
    assert "75.00" in table and "100.00" in table and "50.00" in table
