"""Graded NDCG (``gNDCG@k``) against hand computation and trec_eval (pytrec_eval)."""

from __future__ import annotations

import math
import random

import pytest

from pipelines.query.metrics import evaluate_run, graded_ndcg_at_k, metric_names, ndcg_at_k


def test_graded_ndcg_hand_computed():
    grades = {"a": 3, "b": -1, "c": 0, "d": 1}
    # b (negative) and c (zero) gain nothing; a at rank 2, d at rank 4.
    dcg = 3 / math.log2(3) + 1 / math.log2(5)
    idcg = 3 + 1 / math.log2(3)
    assert graded_ndcg_at_k(["b", "a", "c", "d"], grades, 10) == pytest.approx(dcg / idcg, abs=1e-15)
    assert graded_ndcg_at_k(["b", "a", "c", "d"], grades, 1) == 0.0
    assert graded_ndcg_at_k(["a", "d"], grades, 2) == pytest.approx(1.0)
    assert graded_ndcg_at_k(["x"], {"x": 0}, 5) == 0.0


def test_graded_equals_binary_on_binary_qrels():
    ranked = ["r1", "n1", "r2", "n2"]
    for k in (1, 2, 3, 10):
        assert graded_ndcg_at_k(ranked, {"r1", "r2"}, k) == pytest.approx(ndcg_at_k(ranked, {"r1", "r2"}, k))
        assert graded_ndcg_at_k(ranked, {"r1": 1, "r2": 1, "n1": 0}, k) == pytest.approx(
            ndcg_at_k(ranked, {"r1", "r2"}, k))


def test_metric_names_and_report_order():
    assert metric_names((10,), (10,), (5,), (10, 20)) == ["MRR@10", "NDCG@10", "gNDCG@10", "gNDCG@20", "Recall@5"]
    assert "gNDCG@10" not in metric_names()
    rep = evaluate_run({"q": ["a", "b"]}, {"q": {"a": 1, "b": 2}}, (10,), (10,), (5,), ks_graded_ndcg=(10,))
    assert list(rep.metrics) == ["MRR@10", "NDCG@10", "gNDCG@10", "Recall@5"]
    assert rep.metrics["NDCG@10"] == pytest.approx(1.0)
    assert rep.metrics["gNDCG@10"] < 1.0  # grade 2 ranked below grade 1


def test_graded_agrees_with_pytrec_eval_random():
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = random.Random(1717)
    ks = (1, 3, 5, 10, 20, 100)
    measures = {"ndcg_cut." + ",".join(map(str, ks))}
    checked = 0
    for trial in range(60):
        n_docs = rng.randint(5, 150)
        docs = [f"doc{i}" for i in range(n_docs)]
        run, qrels = {}, {}
        for qi in range(rng.randint(1, 12)):
            qid = f"t{trial}q{qi}"
            if rng.random() < 0.9:
                run[qid] = rng.sample(docs, rng.randint(1, n_docs))
            if rng.random() < 0.9:
                judged = rng.sample(docs, rng.randint(1, min(n_docs, 30)))
                qrels[qid] = {d: rng.choice((-1, 0, 0, 1, 1, 2, 3, 4)) for d in judged}
        rep = evaluate_run(run, qrels, (), ks, (), ks_graded_ndcg=ks)
        trec_run = {q: {d: float(len(r) - i) for i, d in enumerate(r)} for q, r in run.items()}
        expected = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(
            {q: r for q, r in trec_run.items() if q in qrels})
        # Averaged over queries with a positive grade (trec_eval scores the others 0).
        scored = {q for q, g in qrels.items() if q in run and any(v > 0 for v in g.values())}
        assert set(rep.per_query) == scored
        for qid in scored:
            for k in ks:
                assert rep.per_query[qid][f"gNDCG@{k}"] == pytest.approx(
                    expected[qid][f"ndcg_cut_{k}"], abs=1e-9), (trial, qid, k)
                checked += 1
        for qid in set(expected) - scored:
            assert all(v == 0.0 for v in expected[qid].values())
    assert checked > 500


def test_job_report_and_graded_trec_file_agree_with_pytrec_eval(tmp_path):
    """``ciea evaluate``'s grouped report and its ``qrels.graded.txt``: trec_eval on the file
    gives the report's gNDCG; ``qrels.txt`` stays binary for the binary measures."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    from pipelines.query import evaluation as E
    from pipelines.query.evaluation_run import write_trec

    rng = random.Random(17)
    docs = [f"d{i}" for i in range(80)]
    run = {f"q{i}": rng.sample(docs, 40) for i in range(20)}
    qrels = {q: {d: rng.choice((0, 1, 2, 3)) for d in rng.sample(docs, 10)} for q in run}
    qrels["q0"] = {"d0": 0}  # judged, nothing relevant: not averaged
    report = E.evaluate_grouped(run, qrels, {}, (10,), (10,), (5,), ks_graded_ndcg=(10, 20))
    write_trec(tmp_path, qrels, {"sys": run})
    graded: dict[str, dict[str, int]] = {}
    for line in (tmp_path / "qrels.graded.txt").read_text().splitlines():
        qid, _, doc, rel = line.split()
        graded.setdefault(qid, {})[doc] = int(rel)
    assert graded == qrels
    trec_run = {q: {d: float(len(r) - i) for i, d in enumerate(r)} for q, r in run.items()}
    expected = pytrec_eval.RelevanceEvaluator(graded, {"ndcg_cut.10,20"}).evaluate(trec_run)
    assert "q0" not in report.per_query and len(report.per_query) == 19
    for qid, values in report.per_query.items():
        assert values["gNDCG@10"] == pytest.approx(expected[qid]["ndcg_cut_10"], abs=1e-9)
        assert values["gNDCG@20"] == pytest.approx(expected[qid]["ndcg_cut_20"], abs=1e-9)
    mean = math.fsum(expected[q]["ndcg_cut_10"] for q in report.per_query) / len(report.per_query)
    assert report.metrics["gNDCG@10"] == pytest.approx(mean, abs=1e-9)
