"""Unit tests for the evaluation pieces that need no Ray and no table: query splits in
Delta, grouped metrics against pytrec_eval, TREC files, the report (JSON, Markdown, PNG) and
the ``ciea evaluate`` config."""

from __future__ import annotations

import io
import json
import math
import random
from collections import defaultdict
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pytest
from deltalake import write_deltalake
from PIL import Image

from jobs import evaluate as job
from pipelines.query import evaluation as E
from pipelines.query import evaluation_run
from pipelines.query import report as R
from pipelines.query.config import parse_table_spec
from pipelines.query.metrics import OVERALL, RetrievalReport, evaluate_run
from pipelines.store import schema as S
from pipelines.store.delta_tables import Tables

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


# ---------------------------------------------------------------------------------------
# Delta fixtures
# ---------------------------------------------------------------------------------------


def _png(color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(out, format="PNG")
    return out.getvalue()


def _write_documents(root, docs: list[dict]) -> None:
    rows = [{S.DOC_ID: d["doc_id"], S.MODALITY: d["modality"], S.TEXT: d.get("text"), S.CAPTION: d.get("caption"),
             S.IMAGE: d.get("image"), S.IMAGE_URI: d.get("image_uri"), S.IMAGE_WIDTH: None, S.IMAGE_HEIGHT: None,
             S.METADATA: None, S.CONTENT_SHA256: d["doc_id"], S.SOURCE: "t", S.RECORD_REF: d["doc_id"],
             S.RUN_ID: "t", S.INGESTED_AT: NOW} for d in docs]
    write_deltalake(Tables(str(root)).documents, pa.Table.from_pylist(rows, schema=S.DOCUMENTS_SCHEMA),
                    mode="overwrite")


def _write_split(root, split: str, queries: list[tuple[str, str, dict]], qrels: list[tuple[str, str, int]]) -> None:
    tables = Tables(str(root))
    q = [{S.QID: qid, S.QUERY: text, S.ANSWER: None, S.METADATA: json.dumps(meta), S.CONTENT_SHA256: qid,
          S.SOURCE: "t", S.RECORD_REF: qid, S.RUN_ID: "t", S.INGESTED_AT: NOW} for qid, text, meta in queries]
    write_deltalake(tables.queries(split), pa.Table.from_pylist(q, schema=S.QUERIES_SCHEMA), mode="overwrite")
    r = [{S.QID: qid, S.DOC_ID: d, S.RELEVANCE: rel, S.SOURCE: "t", S.RUN_ID: "t"} for qid, d, rel in qrels]
    write_deltalake(tables.qrels(split), pa.Table.from_pylist(r, schema=S.QRELS_SCHEMA), mode="overwrite")


@pytest.fixture()
def root(tmp_path):
    root = tmp_path / "data"
    _write_documents(root, [
        {"doc_id": "i1", "modality": "image", "caption": "a red square", "image": _png((255, 0, 0))},
        {"doc_id": "i2", "modality": "image", "caption": "a blue square", "image": _png((0, 0, 255))},
        {"doc_id": "t1", "modality": "text", "text": "red things are warm"},
        {"doc_id": "t2", "modality": "text", "text": "blue things are cold"},
    ])
    _write_split(root, "test", [
        ("q1", "red square", {"kind": "caption"}),
        ("q2", "warm things", {"kind": "text", "constraints": {"color": "red"}}),
        ("q3", "red", {"kind": "image"}),
        ("q4", "gone", {"kind": "image"}),
        ("q5", "unjudged", {"kind": "text"}),
    ], [("q1", "i1", 1), ("q2", "t1", 2), ("q2", "t2", 0), ("q3", "i1", 1), ("q3", "t1", 1),
        ("q4", "deleted-doc", 1), ("q5", "t2", 0), ("q9", "i1", 1)])
    return root


# ---------------------------------------------------------------------------------------
# load_split
# ---------------------------------------------------------------------------------------


def test_load_split_reads_queries_judgments_kinds_and_answer_modalities(root, caplog):
    queries, qrels = E.load_split(Tables(str(root)), "test")
    by = {q["qid"]: q for q in queries}
    assert [q["qid"] for q in queries] == ["q1", "q2", "q3", "q4", "q5"]
    assert by["q2"]["query"] == "warm things" and by["q2"]["kind"] == "text"
    assert by["q2"]["metadata"] == {"kind": "text", "constraints": {"color": "red"}}
    assert "constraints" not in by["q2"]  # only scalar metadata is lifted to the top level
    # Relevance 0 is a judgment, not a relevant document.
    assert by["q2"]["positive_doc_ids"] == ["t1"] and qrels["q2"] == {"t1": 2, "t2": 0}
    assert [by[q]["modality"] for q in ("q1", "q2", "q3", "q4", "q5")] == ["image", "text", "mixed", "unknown", None]
    assert "q9" not in qrels  # a judgment for a query that is not in the split
    assert "not in queries/test" in caplog.text and "have no relevant document" in caplog.text


def test_load_split_errors_name_the_fix(root, tmp_path):
    with pytest.raises(E.EvaluationError, match=r"no query split 'tset'.*splits there: test.*--split"):
        E.load_split(Tables(str(root)), "tset")
    with pytest.raises(E.EvaluationError, match="no split there at all"):
        E.load_split(Tables(str(tmp_path / "nowhere")), "test")
    _write_split(root, "empty", [], [])
    with pytest.raises(E.EvaluationError, match="'empty'.*is empty"):
        E.load_split(Tables(str(root)), "empty")
    _write_split(root, "unjudged", [("a", "x", {})], [("a", "i1", 0)])
    with pytest.raises(E.EvaluationError, match="no relevant document.*qrels"):
        E.load_split(Tables(str(root)), "unjudged")


def test_query_groupings_skip_keys_no_query_has(root):
    queries, _ = E.load_split(Tables(str(root)), "test")
    groups = E.query_groupings(queries, ("kind", "Qcate"))
    assert set(groups) == {"kind", "modality"}
    assert groups["kind"] == {"q1": "caption", "q2": "text", "q3": "image", "q4": "image", "q5": "text"}
    assert "q5" not in groups["modality"]  # no relevant document: no answer modality
    assert set(E.query_groupings(queries, (), answer_modality=False)) == set()


def test_check_coverage_and_corpus_doc_ids(root):
    _, qrels = E.load_split(Tables(str(root)), "test")
    ids = E.corpus_doc_ids(Tables(str(root)))
    assert ids == {"i1", "i2", "t1", "t2"}
    with pytest.raises(E.EvaluationError, match=r"lacks 1 of the 3 .*deleted-doc.*ciea embed.*max_missing_fraction"):
        E.check_coverage(qrels, ids, "table x")
    assert E.check_coverage(qrels, ids, "table x", max_missing_fraction=0.34) == ["deleted-doc"]
    with pytest.raises(E.EvaluationError, match="versions 0..0"):
        E.corpus_doc_ids(Tables(str(root)), version=3)
    with pytest.raises(E.EvaluationError, match="ciea ingest"):
        E.corpus_doc_ids(Tables(str(root / "nope")))


def test_encode_delta_corpus_matches_in_memory_encoding_and_survives_a_bad_image(root, tmp_path, make_model):
    model, processor = make_model("ciea")
    docs = [
        {"doc_id": "i1", "modality": "image", "caption": "a red square", "image": _png((255, 0, 0))},
        {"doc_id": "i2", "modality": "image", "caption": "from a file", "image_uri": str(tmp_path / "blue.png")},
        {"doc_id": "i3", "modality": "image", "caption": "missing file", "image_uri": str(tmp_path / "nope.png")},
        {"doc_id": "t1", "modality": "text", "text": "red things are warm"},
    ]
    (tmp_path / "blue.png").write_bytes(_png((0, 0, 255)))
    _write_documents(root, docs)
    corpus = E.encode_delta_corpus(model, processor, Tables(str(root)), batch_size=2)
    assert sorted(corpus.doc_ids) == ["i1", "i2", "t1"]
    assert list(corpus.failed) == ["i3"] and "nope.png" in corpus.failed["i3"]
    from ciea_model.processor import Document

    expected = E.encode_corpus(model, processor, [
        Document("i1", "image", caption="a red square", image=docs[0]["image"]),
        Document("i2", "image", caption="from a file", image=_png((0, 0, 255))),
        Document("t1", "text", text="red things are warm")])
    order = [corpus.doc_ids.index(d) for d in expected.doc_ids]
    np.testing.assert_allclose(corpus.vectors[order], expected.vectors, atol=1e-5)
    assert np.abs(expected.vectors[0] - expected.vectors[1]).max() > 1e-3


# ---------------------------------------------------------------------------------------
# grouped metrics and TREC files against pytrec_eval
# ---------------------------------------------------------------------------------------


def _pytrec_per_query(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    import pytrec_eval

    res = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10,20", "recall.1,5,20,100"}).evaluate(run)
    out = {q: {**{f"NDCG@{k}": v[f"ndcg_cut_{k}"] for k in (10, 20)},
               **{f"Recall@{k}": v[f"recall_{k}"] for k in (1, 5, 20, 100)}} for q, v in res.items()}
    for k in (10, 20):
        top = {q: dict(sorted(d.items(), key=lambda x: (-x[1], x[0]))[:k]) for q, d in run.items()}
        for q, v in pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top).items():
            out[q][f"MRR@{k}"] = v["recip_rank"]
    return out


def _random_case(rng: random.Random):
    docs = [f"d{i}" for i in range(rng.randint(10, 160))]
    run, qrels, groups = {}, {}, {"kind": {}, "modality": {}}
    for i in range(rng.randint(3, 25)):
        qid = f"q{i}"
        run[qid] = rng.sample(docs, rng.randint(1, min(len(docs), 120)))
        qrels[qid] = {d: rng.choice([1, 1, 2]) for d in rng.sample(docs, rng.randint(1, 12))}
        groups["kind"][qid] = rng.choice(["caption", "image", "text"])
        if rng.random() < 0.8:
            groups["modality"][qid] = rng.choice(["image", "text", "mixed"])
    return run, qrels, groups


def test_grouped_metrics_and_trec_files_equal_pytrec_eval_on_random_runs(tmp_path):
    pytest.importorskip("pytrec_eval")
    rng = random.Random(6)
    for trial in range(25):
        run, qrels, groups = _random_case(rng)
        report = E.evaluate_grouped(run, qrels, groups)
        # The files the job writes, read back the way trec_eval reads them.
        out = tmp_path / f"t{trial}"
        out.mkdir()
        evaluation_run.write_trec(out, qrels, {"sys": run})
        trec_run: dict[str, dict[str, float]] = defaultdict(dict)
        for line in (out / "runs" / "sys.txt").read_text().splitlines():
            qid, _, doc, _, score, name = line.split()
            trec_run[qid][doc] = float(score)
        trec_qrels: dict[str, dict[str, int]] = defaultdict(dict)
        for line in (out / "qrels.txt").read_text().splitlines():
            qid, _, doc, rel = line.split()
            trec_qrels[qid][doc] = int(rel)
        # Grades are written binary: the report's NDCG has binary gains (pipelines.query.metrics).
        assert trec_qrels == {q: {d: 1 for d in docs} for q, docs in qrels.items()}
        expected = _pytrec_per_query(dict(trec_qrels), dict(trec_run))
        assert report.per_query.keys() == expected.keys()
        for qid, values in expected.items():
            assert report.per_query[qid] == pytest.approx(values, abs=1e-9), (trial, qid)
        for name, labels in groups.items():
            for label in set(labels.values()):
                members = [q for q in expected if labels.get(q) == label]
                got = report.by_group[f"{name}={label}"]
                assert report.group_counts[f"{name}={label}"] == len(members)
                for metric, value in got.items():
                    mean = math.fsum(expected[q][metric] for q in members) / len(members)
                    assert value == pytest.approx(mean, abs=1e-9), (trial, name, label, metric)
        assert report.metrics == pytest.approx(
            {m: math.fsum(v[m] for v in expected.values()) / len(expected) for m in report.metrics}, abs=1e-9)


def test_evaluate_grouped_labels_and_counts():
    run = {"a": ["x", "y"], "b": ["y"], "c": ["z"]}
    qrels = {"a": {"y"}, "b": {"y"}, "c": {"x"}}
    rep = E.evaluate_grouped(run, qrels, {"kind": {"a": "k1", "b": "k2", "c": "k1"}, "modality": {"a": "image"}},
                             ks_mrr=(10,), ks_ndcg=(), ks_recall=())
    assert rep.by_group == {"kind=k1": {"MRR@10": 0.25}, "kind=k2": {"MRR@10": 1.0},
                            "modality=image": {"MRR@10": 0.5}}
    assert rep.group_counts == {"kind=k1": 2, "kind=k2": 1, "modality=image": 1}
    assert rep.num_ungrouped == 2 and rep.metrics["MRR@10"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------


def _doc() -> dict:
    a = evaluate_run({"q1": ["d1"], "q2": ["d9", "d2"]}, {"q1": {"d1"}, "q2": {"d2"}}, (10,), (10,), (1,),
                     groups={"q1": "kind=image", "q2": "kind=text"})
    b = evaluate_run({"q1": ["d9"], "q2": ["d2"]}, {"q1": {"d1"}, "q2": {"d2"}}, (10,), (10,), (1,),
                     groups={"q1": "kind=image", "q2": "kind=text"})
    empty = RetrievalReport(metrics={"MRR@10": math.nan, "NDCG@10": math.nan, "Recall@1": math.nan}, num_queries=0)
    return R.build_report({"ciea": a, "bm25": b, "none": empty},
                          {"ciea": {"source": "db/t", "mode": "vector", "version": 3, "failed_queries": 1}},
                          ["MRR@10", "NDCG@10", "Recall@1"], {"split": "test", "root": "/data"},
                          include_per_query=True)


def test_report_json_has_no_nan_and_keeps_groups_in_order(tmp_path):
    doc = _doc()
    assert doc["groups"] == [OVERALL, "kind=image", "kind=text"]
    assert doc["variants"]["none"]["metrics"]["MRR@10"] is None
    assert doc["variants"]["ciea"]["per_query"]["q2"]["MRR@10"] == 0.5
    files = R.write_report(doc, tmp_path / "out", ["MRR@10", "Recall@1"])
    back = json.loads((tmp_path / "out" / "report.json").read_text())  # strict JSON: no NaN
    assert back["variants"]["ciea"]["metrics"] == doc["variants"]["ciea"]["metrics"]
    assert set(files) == {"json", "markdown", "MRR@10", "Recall@1"}
    for metric in ("MRR@10", "Recall@1"):
        with Image.open(files[metric]) as im:
            assert im.format == "PNG" and im.width > 300


def test_markdown_bolds_the_best_and_dashes_the_missing():
    md = R.render_markdown(_doc(), {"MRR@10": "mrr_at_10.png"})
    assert md.startswith("# Retrieval evaluation: split `test`")
    assert "## Overall (2 queries)" in md and "## `kind=text` (1 queries)" in md
    # Overall MRR@10: ciea (1 + 1/2) / 2 = 75.00 beats bm25 (0 + 1) / 2 = 50.00.
    assert "| ciea | **75.00** |" in md and "| bm25 | 50.00 |" in md and "| none | – | – | – |" in md
    assert "**1 failed searches (scored 0)**" in md and "`db/t`, mode vector, version 3" in md
    assert "![MRR@10 per group](mrr_at_10.png)" in md


def test_chart_names_and_unknown_metric(tmp_path):
    assert R.chart_filename("MRR@10") == "mrr_at_10.png"
    assert R.chart_filename("Recall@100") == "recall_at_100.png"
    with pytest.raises(ValueError, match="not in the report"):
        R.plot_metric(_doc(), "MAP", tmp_path / "x.png")


# ---------------------------------------------------------------------------------------
# the job's config
# ---------------------------------------------------------------------------------------


def test_table_specs():
    assert parse_table_spec("data/lancedb/documents") == ("data/lancedb", "documents", None)
    assert parse_table_spec("data/lancedb/documents@12") == ("data/lancedb", "documents", 12)
    assert parse_table_spec("s3://b/x@y/lancedb/docs@published") == ("s3://b/x@y/lancedb", "docs", "published")
    for bad in ("documents", "/documents", "data/lancedb/", "data/lancedb/docs@"):
        with pytest.raises(ValueError, match=r"<db>/<table>\[@version\|@tag\]"):
            parse_table_spec(bad)


def test_variant_flags_become_config():
    cfg, _ = job.parse_config(["--variant", "ciea=table:db/t", "--variant", "bm25=fts:db/t@3",
                               "--variant", "h=hybrid:db/t", "--variant", "base=checkpoint:ck", "--split", "dev"])
    got = [(v.name, v.table, v.mode, v.checkpoint) for v in cfg.variants]
    assert got == [("ciea", "db/t", "vector", None), ("bm25", "db/t@3", "fts", None),
                   ("h", "db/t", "hybrid", None), ("base", None, "vector", "ck")]
    assert cfg.variants[1].table_spec == ("db", "t", 3)
    assert cfg.input.split == "dev" and cfg.k == 100


@pytest.mark.parametrize("argv, message", [
    ([], "no variant to evaluate"),
    (["--variant", "a=table:db/t", "--variant", "a=fts:db/t"], "used twice"),
    (["--variant", "a=table:db/t", "--set", "metrics.charts=[MAP]"], "are not computed"),
    (["--variant", "a=table:db/t", "--k", "10"], "below the largest cutoff 100"),
    (["--variant", "a=table:db/t", "--set", "metrics.recall=[0]"], "must be >= 1"),
    (["--set", "variants=[{name: a, checkpoint: c, mode: fts}]"], "ranks by vector only"),
    (["--set", "variants=[{name: a}]"], "exactly one of table"),
    (["--variant", "a=table:t"], "<db>/<table>"),
    (["--variant", "a"], "NAME=KIND:WHERE"),
    (["--variant", "a=table:db/t", "--storage-option", "AWS_SECRET_ACCESS_KEY=x"], "environment"),
])
def test_bad_configs_exit_with_the_fix(argv, message):
    with pytest.raises(SystemExit) as e:
        job.parse_config(argv)
    assert message in str(e.value)
