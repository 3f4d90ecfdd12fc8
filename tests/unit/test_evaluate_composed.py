"""``ciea evaluate`` on composed queries (issue 25 items 3 and 5): a query that carries a
picture is encoded with the document tower (its vector equals an image document's with the
query text as caption), reported in its own ``kind=composed`` group, and ranked four ways
side by side (image only, text only, late fusion, the model's composed encoding)."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pytest
from deltalake import write_deltalake

from ciea_model.inference import encode_documents, encode_queries
from ciea_model.processor import Document
from pipelines.ingest import runner
from pipelines.ingest.sources.synthetic.generator import SyntheticConfig, iter_documents
from pipelines.ingest.sources.synthetic.source import SyntheticSource
from pipelines.ingest.validation import Limits
from pipelines.query import evaluation as E
from pipelines.query import evaluation_run
from pipelines.query.config import EvaluateConfig
from pipelines.query.metrics import evaluate_run
from pipelines.store import schema as S
from pipelines.store.delta_tables import Tables

NOW = datetime(2026, 12, 7, tzinfo=timezone.utc)
CFG = SyntheticConfig(seed=5, num_image_docs=150, num_text_docs=20, num_queries=(0, 0, 12), image_size=32,
                      num_composed=(0, 0, 10), text_query_fraction=0.25)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A data root as ``ciea ingest`` writes it: the synthetic corpus, its test split with
    composed queries (through the real query ingest, pictures included)."""
    root = tmp_path_factory.mktemp("composed") / "data"
    tables = Tables(str(root))
    rows = [{S.DOC_ID: d["doc_id"], S.MODALITY: d["modality"], S.TEXT: d["text"] or None,
             S.CAPTION: d["caption"] or None, S.IMAGE: d["image"], S.IMAGE_URI: None, S.IMAGE_WIDTH: None,
             S.IMAGE_HEIGHT: None, S.METADATA: d["attributes"], S.CONTENT_SHA256: d["doc_id"], S.SOURCE: "synthetic",
             S.RECORD_REF: d["doc_id"], S.RUN_ID: "t", S.INGESTED_AT: NOW} for d in iter_documents(CFG)]
    write_deltalake(tables.documents, pa.Table.from_pylist(rows, schema=S.DOCUMENTS_SCHEMA), mode="overwrite")
    spill = runner.QuarantineSpill("t", NOW)
    summary = runner.ingest_queries(SyntheticSource(CFG), "test", tables, Limits(), 2000, spill, "t", NOW, None)
    assert summary["accepted"] == 22 and summary["quarantined"] == 0
    return root


def test_load_split_carries_the_pictures(root):
    queries, _ = E.load_split(Tables(str(root)), "test")
    pics = E.picture_queries(queries)
    assert len(pics) == 10 and {q["kind"] for q in pics} == {"composed"}
    assert all(S.IMAGE not in q for q in queries if q["kind"] != "composed")
    assert all(q["metadata"]["reference_doc_id"] in q["metadata"]["near_miss_doc_ids"] for q in pics)


def test_picture_query_vectors_are_the_document_towers(root, make_model):
    model, processor = make_model("ciea")
    queries, _ = E.load_split(Tables(str(root)), "test")
    got = E.encode_query_vectors(model, processor, queries, "cpu")
    for i, q in enumerate(queries):
        if q.get(S.IMAGE) is not None:
            want = encode_documents(model, processor, [Document("x", "image", caption=q["query"], image=q[S.IMAGE])])
        else:
            want = encode_queries(model, processor, [q["query"]])
        np.testing.assert_allclose(got[i], want[0], atol=1e-5)


def test_composed_vectors_late_fusion_is_the_normalised_sum():
    rng = np.random.default_rng(0)
    a, b, c = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in rng.normal(size=(3, 4, 8)))
    v = E.composed_vectors(a, b, c)
    assert list(v) == list(E.COMPOSED_ENCODINGS)
    want = (a + b) / np.linalg.norm(a + b, axis=1, keepdims=True)
    np.testing.assert_allclose(v["late-fusion"], want, atol=1e-6)
    assert v["image-only"] is a and v["text-only"] is b and v["model"] is c


def test_add_composed_groups_scores_each_encoding_on_its_own():
    qrels = {"c1": {"d1": 1}, "t1": {"d2": 1}}
    report = evaluate_run({"c1": ["d9", "d1"], "t1": ["d2"]}, qrels, (10,), (), ())
    E.add_composed_groups(report, {"image-only": {"c1": {"d9": 1.0, "d1": 0.5}}, "model": {"c1": {"d1": 1.0}}},
                          qrels, (10,), (), ())
    assert report.by_group["composed=image-only"]["MRR@10"] == 0.5
    assert report.by_group["composed=model"]["MRR@10"] == 1.0
    assert report.group_counts["composed=model"] == 1 and report.metrics["MRR@10"] == 0.75


def test_evaluate_reports_a_composed_group_and_the_baselines_side_by_side(root, make_model, tmp_path):
    from ciea_model.checkpoint import save_checkpoint

    for variant in ("ciea", "text-only"):
        save_checkpoint(*make_model(variant), tmp_path / variant)
    out = tmp_path / "out"
    cfg = EvaluateConfig(input={"root": str(root), "split": "test"}, progress=False,
                         variants=[{"name": v, "checkpoint": str(tmp_path / v)} for v in ("ciea", "text-only")],
                         metrics={"charts": [], "recall": [1, 10, 100]}, output={"out": str(out)})
    doc = evaluation_run.run(cfg)
    ciea, text = doc["variants"]["ciea"], doc["variants"]["text-only"]
    assert ciea["group_counts"]["kind=composed"] == 10
    for enc in E.COMPOSED_ENCODINGS:
        assert ciea["group_counts"][f"composed={enc}"] == 10
        assert (out / "runs" / f"ciea.composed-{enc}.txt").exists()
    # The model's composed encoding is the variant's own run on those queries.
    assert ciea["by_group"]["composed=model"] == ciea["by_group"]["kind=composed"]
    assert ciea["info"]["composed_baselines"] == sorted(E.COMPOSED_ENCODINGS)
    # A text-only model encodes no picture: its composed queries rank by their text, no baselines.
    assert text["group_counts"]["kind=composed"] == 10 and "composed=model" not in text["by_group"]
    assert text["info"]["composed_baselines"].startswith("none")
    assert "## `composed=late-fusion` (10 queries)" in (out / "report.md").read_text()
    # The switch turns the baselines off.
    cfg2 = cfg.model_copy(update={"metrics": cfg.metrics.model_copy(update={"composed_baselines": False}),
                                  "output": cfg.output.model_copy(update={"out": str(tmp_path / "out2")})})
    doc2 = evaluation_run.run(cfg2)
    assert "composed=model" not in doc2["groups"] and "kind=composed" in doc2["groups"]


class _FakeTableSearcher:
    """The Searcher surface ``search_run`` and ``composed_search_runs`` use, over an in-memory
    encoded corpus (exact cosine): picture queries must reach ``search_pictures``."""

    def __init__(self, model, processor, corpus):
        from pipelines.query.search import Searcher

        self.real = Searcher.__new__(Searcher)
        self.real.model, self.real.processor, self.real.device, self.real.name = model, processor, "cpu", "docs"
        self.model, self.corpus, self.calls = model, corpus, []

    def encode_queries(self, texts, batch_size=64):
        return self.real.encode_queries(texts)

    def encode_pictures(self, images, texts=None, batch_size=64):
        return self.real.encode_pictures(images, texts)

    def search_vectors(self, vectors, *, k=10, **_):
        from pipelines.query.search import Hit

        out = []
        for row in vectors @ self.corpus.vectors.T:
            top = np.argsort(-row)[:k]
            out.append([Hit(rank=r + 1, doc_id=self.corpus.doc_ids[j], score=float(row[j]), modality="image",
                            text=None, caption=None, thumbnail=None, metadata={}) for r, j in enumerate(top)])
        return out

    def search_batch(self, texts, *, k=10, mode="vector", **_):
        self.calls.append(("text", mode, len(texts)))
        return self.search_vectors(self.encode_queries(texts), k=k)

    def search_pictures(self, images, texts, *, k=10, mode="vector", **_):
        self.calls.append(("pictures", mode, len(images)))
        return self.search_vectors(self.encode_pictures(images, texts), k=k)


def test_table_runs_route_picture_queries_and_match_the_in_process_ranking(root, make_model):
    model, processor = make_model("ciea")
    tables = Tables(str(root))
    queries, qrels = E.load_split(tables, "test")
    corpus = E.encode_delta_corpus(model, processor, tables)
    fake = _FakeTableSearcher(model, processor, corpus)
    run = E.search_run(fake, queries, k=20, batch_size=8).run
    assert sum(n for kind, _, n in fake.calls if kind == "pictures") == 10
    want = E.rank(model, processor, corpus, queries, k=20, scores=True)
    for qid in want:
        assert list(run[qid])[:5] == list(want[qid])[:5]
    table_runs = E.composed_search_runs(fake, queries, k=20)
    local_runs = E.composed_runs(model, processor, corpus, queries, k=20)
    assert set(table_runs) == set(local_runs) == set(E.COMPOSED_ENCODINGS)
    for enc in E.COMPOSED_ENCODINGS:
        for qid, ranked in local_runs[enc].items():
            assert list(table_runs[enc][qid])[:5] == list(ranked)[:5]
    # Full-text search cannot take a picture: every query goes by its text.
    fake.calls.clear()
    E.search_run(fake, queries, k=20, mode="fts", batch_size=64)
    assert fake.calls == [("text", "fts", len(queries))]


def test_in_memory_evaluate_adds_the_baselines_when_asked(root, make_model):
    """``ciea compare``'s scoring: ``evaluate(..., composed_baselines=True)``."""
    from pipelines.store.documents import batch_to_documents

    model, processor = make_model("ciea")
    tables = Tables(str(root))
    queries, _ = E.load_split(tables, "test")
    docs, _ = batch_to_documents(tables.read(tables.documents, columns=list(E.DOCUMENT_COLUMNS)).combine_chunks().to_batches()[0])
    plain = E.evaluate(model, processor, docs, queries)
    assert "composed" in plain.by_group and not any(g.startswith("composed=") for g in plain.by_group)
    report = E.evaluate(model, processor, docs, queries, composed_baselines=True)
    assert {f"composed={e}" for e in ("image-only", "text-only", "late-fusion")} <= set(report.by_group)
    assert report.group_counts["composed=late-fusion"] == 10
    assert report.metrics == plain.metrics


def test_compare_summary_dashes_a_group_a_variant_lacks():
    from pipelines.train.compare import summarise

    a = evaluate_run({"q": ["d"]}, {"q": {"d"}}, (10,), (10,), (10,), groups={"q": "composed"})
    b = evaluate_run({"q": ["d"]}, {"q": {"d"}}, (10,), (10,), (10,), groups={"q": "composed"})
    E.add_composed_groups(a, {"late-fusion": {"q": {"d": 1.0}}}, {"q": {"d"}}, (10,), (10,), (10,))
    table = summarise({"ciea": [a], "text-only": [b]}, ["MRR@10"], ["all", "composed", "composed=late-fusion"])
    assert table.splitlines()[-1].split()[-1] == "-" and table.splitlines()[-2].split()[-1] == "100.00"
