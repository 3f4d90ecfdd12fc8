"""A corpus, queries and graded qrels in the BEIR layout: ``ciea ingest --queries`` keeps the
grades, ``ciea train --preset tiny`` trains on them, and ``ciea evaluate``'s graded NDCG
equals trec_eval's (pytrec_eval on the files the job writes) to 1e-9."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from ingest_helpers import reconcile, run_ingest

from jobs import evaluate, train
from pipelines.ingest.sources.synthetic.generator import (
    SyntheticConfig,
    generate_queries,
    iter_documents,
)
from pipelines.store.delta_tables import Tables

pytestmark = pytest.mark.usefixtures("ray_local")

CORPUS = SyntheticConfig(seed=5, num_image_docs=60, num_text_docs=20, num_queries=(48, 12, 12), image_size=32)


def write_beir(root: Path) -> dict[str, dict[str, dict[str, int]]]:
    """``corpus.jsonl`` (+ images/), ``queries.jsonl``, ``qrels/{train,dev,test}.tsv`` with
    grades: each relevant document 1 or 2, plus judged non-relevant (0) documents."""
    (root / "images").mkdir(parents=True)
    (root / "qrels").mkdir()
    docs = list(iter_documents(CORPUS))
    with (root / "corpus.jsonl").open("w") as f:
        for d in docs:
            row = {"_id": d["doc_id"], "title": "synthetic"}
            if d["modality"] == "image":
                (root / "images" / f"{d['doc_id']}.png").write_bytes(d["image"])
                row.update(caption=d["caption"], image=f"images/{d['doc_id']}.png")
            else:
                row["text"] = d["text"]
            f.write(json.dumps(row) + "\n")
    rng = random.Random(17)
    ids = [d["doc_id"] for d in docs]
    graded: dict[str, dict[str, dict[str, int]]] = {}
    with (root / "queries.jsonl").open("w") as qf:
        for split, queries in generate_queries(CORPUS).items():
            graded[split] = {}
            lines = ["query-id\tcorpus-id\tscore"]
            for q in queries:
                qf.write(json.dumps({"_id": q["qid"], "text": q["query"], "kind": q["kind"]}) + "\n")
                grades = {d: rng.choice((1, 2)) for d in q["positive_doc_ids"]}
                grades.update({d: 0 for d in rng.sample(ids, 3) if d not in grades})
                graded[split][q["qid"]] = grades
                lines += [f"{q['qid']}\t{d}\t{g}" for d, g in grades.items()]
            (root / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return graded


def test_beir_ingest_train_evaluate_graded(tmp_path):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    graded = write_beir(tmp_path / "beir")
    root = tmp_path / "data"
    summary = run_ingest(tmp_path, root, "--source", "manifest", "--path", str(tmp_path / "beir"),
                         "--queries", str(tmp_path / "beir"))
    reconcile(summary)
    assert summary["documents"]["inserted"] == CORPUS.num_documents and summary["documents"]["quarantined"] == 0
    tables = Tables(str(root))
    for split, qrels in graded.items():
        q = summary["queries"][split]
        assert q["accepted"] == len(qrels) and q["quarantined"] == 0
        rows = tables.read(tables.qrels(split)).to_pylist()
        assert {(r["qid"], r["doc_id"]): r["relevance"] for r in rows} == {
            (qid, d): g for qid, grades in qrels.items() for d, g in grades.items()}
    meta = json.loads(tables.read(tables.queries("test")).to_pylist()[0]["metadata"])
    assert set(meta) == {"kind"}

    runs = tmp_path / "runs-train"
    assert train.main(["--preset", "tiny", "--root", str(root), "--storage-path", str(runs), "--name", "beir",
                       "--no-progress", "--set", "train.epochs=1"]) == 0
    out = tmp_path / "eval"
    assert evaluate.main(["--root", str(root), "--out", str(out), "--no-progress", "--set", "search.threads=1",
                          "--variant", f"ciea=checkpoint:{runs / 'beir' / 'model'}"]) == 0
    report = json.loads((out / "report.json").read_text())
    per_query = report["variants"]["ciea"]["per_query"]
    assert len(per_query) == len(graded["test"])

    trec_qrels: dict[str, dict[str, int]] = {}
    for line in (out / "qrels.graded.txt").read_text().splitlines():
        qid, _, doc, rel = line.split()
        trec_qrels.setdefault(qid, {})[doc] = int(rel)
    assert trec_qrels == graded["test"]
    trec_run: dict[str, dict[str, float]] = {}
    for line in (out / "runs" / "ciea.txt").read_text().splitlines():
        qid, _, doc, _, score, _ = line.split()
        trec_run.setdefault(qid, {})[doc] = float(score)
    expected = pytrec_eval.RelevanceEvaluator(trec_qrels, {"ndcg_cut.10,20"}).evaluate(trec_run)
    for qid, values in per_query.items():
        assert values["gNDCG@10"] == pytest.approx(expected[qid]["ndcg_cut_10"], abs=1e-9)
        assert values["gNDCG@20"] == pytest.approx(expected[qid]["ndcg_cut_20"], abs=1e-9)
    mean = sum(expected[q]["ndcg_cut_10"] for q in per_query) / len(per_query)
    assert report["variants"]["ciea"]["metrics"]["gNDCG@10"] == pytest.approx(mean, abs=1e-9)


BAD_GRADES = ["+-5", "\u00b2", "2147483648", "1.0", ""]


def test_bad_grades_are_quarantined_and_the_run_is_whole(tmp_path):
    """One bad grade used to abort the ingest after the documents were committed (no
    queries, qrels, quarantine or summary). Now each is a quarantine row and every table and
    the summary of the run agree."""
    graded = write_beir(tmp_path / "beir")
    tsv = tmp_path / "beir" / "qrels" / "test.tsv"
    qid = next(iter(graded["test"]))
    with tsv.open("a", encoding="utf-8") as f:
        for i, grade in enumerate(BAD_GRADES):
            f.write(f"{qid}\tbad-doc-{i}\t{grade}\n")
    root = tmp_path / "data"
    summary = run_ingest(tmp_path, root, "--source", "manifest", "--path", str(tmp_path / "beir"),
                         "--queries", str(tmp_path / "beir"))
    reconcile(summary)
    assert summary["documents"]["inserted"] == CORPUS.num_documents
    tables = Tables(str(root))
    assert tables.read(tables.documents).num_rows == CORPUS.num_documents
    for split, qrels in graded.items():
        q = summary["queries"][split]
        assert q["read"] == q["accepted"] + q["quarantined"] and q["accepted"] == len(qrels)
        assert tables.read(tables.queries(split)).num_rows == len(qrels)
        rows = {(r["qid"], r["doc_id"]): r["relevance"] for r in tables.read(tables.qrels(split)).to_pylist()}
        assert rows == {(k, d): g for k, grades in qrels.items() for d, g in grades.items()}
        assert q["qrels"]["rows"] == len(rows)
        assert q["qrels"]["quarantined"] == (len(BAD_GRADES) if split == "test" else 0)
    bad = [r for r in tables.read(tables.quarantine).to_pylist() if r["reason"] == "bad_grade"]
    assert len(bad) == len(BAD_GRADES) == summary["quarantine"]["rows_this_run"]
    assert all(r["record_ref"].startswith("qrels/test.tsv@") for r in bad)
    assert any("beyond int32" in r["detail"] for r in bad)
    assert (tmp_path / "runs" / summary["run_id"] / "summary.json").exists()
