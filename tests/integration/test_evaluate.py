"""``ciea evaluate`` on a real LanceDB table embedded by ``ciea embed`` on a local Ray, real
Delta query splits, and a tiny random-init checkpoint.

One module-scoped Ray, corpus (200 image + 100 text synthetic documents), checkpoint and
table; the evaluation itself needs no Ray. The report's numbers are checked against
pytrec_eval (trec_eval's C code) run on the TREC files the job writes.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict

import pytest
from embed_helpers import (
    make_checkpoint,
    run_embed,
    synthetic_records,
    write_corpus,
    write_query_split,
)
from PIL import Image

from jobs import evaluate as job
from pipelines.ingest.sources.synthetic.generator import SyntheticConfig, generate_queries
from pipelines.query.evaluation import EvaluationError, evaluate_searcher, load_split
from pipelines.query.metrics import OVERALL
from pipelines.store.delta_tables import Tables

pytestmark = pytest.mark.usefixtures("ray_local")

N_IMAGES, N_TEXTS, SEED = 200, 100, 3
METRICS = ["MRR@10", "MRR@20", "NDCG@10", "NDCG@20", "gNDCG@10", "gNDCG@20", "Recall@1", "Recall@5", "Recall@20",
           "Recall@100", "Success@1", "Success@5", "Success@20", "Success@100"]


def _exact_text_queries(records: list[dict], n: int) -> list[dict]:
    """Queries that are a text document's own words, judged relevant to that document only.
    Texts that occur twice in the corpus are skipped (their answer would be ambiguous)."""
    texts = [r["text"] for r in records if r["modality"] == "text"]
    unique = [r for r in records if r["modality"] == "text" and texts.count(r["text"]) == 1]
    return [{"qid": f"exact-{i:03d}", "query": r["text"], "kind": "text", "positive_doc_ids": [r["doc_id"]]}
            for i, r in enumerate(unique[:n])]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    records = synthetic_records(N_IMAGES, N_TEXTS, seed=SEED)
    root = tmp / "data"
    write_corpus(root, records)
    # The same generator config as synthetic_records: these queries judge this corpus.
    cfg = SyntheticConfig(seed=SEED, num_image_docs=N_IMAGES, num_text_docs=N_TEXTS,
                          num_queries=(4, 8, 40), image_size=32)
    splits = generate_queries(cfg)
    write_query_split(root, "test", splits["test"])
    write_query_split(root, "exact", _exact_text_queries(records, 12))
    write_query_split(root, "empty", [])
    # One query the search refuses (blank text) among good ones.
    good = splits["dev"][:3]
    write_query_split(root, "odd", [*good, {"qid": "odd-blank", "query": "   ", "kind": "text",
                                            "positive_doc_ids": [good[0]["positive_doc_ids"][0]]}])
    texts = [r["caption"] or r["text"] for r in records]
    ckpt = make_checkpoint(tmp, texts, seed=0)
    rc, summary = run_embed(tmp, root, ckpt, "docs")
    assert rc == 0 and summary["rows"] == N_IMAGES + N_TEXTS
    # A table embedded from a smaller corpus: it lacks most documents the test split judges.
    small_root = tmp / "small"
    write_corpus(small_root, synthetic_records(20, 10, seed=SEED))
    rc, _ = run_embed(tmp, small_root, ckpt, "small")
    assert rc == 0
    return {"tmp": tmp, "root": root, "db": str(root / "lancedb"), "small_db": str(small_root / "lancedb"),
            "ckpt": ckpt, "queries": splits["test"], "records": records}


def _evaluate(env, out_name: str, *args: str) -> tuple[int, dict | None]:
    out = env["tmp"] / out_name
    rc = job.main(["--root", str(env["root"]), "--out", str(out), "--no-progress",
                   "--set", "search.threads=1", *args])
    report = out / "report.json"
    return rc, (json.loads(report.read_text()) if rc == 0 else None)


@pytest.fixture(scope="module")
def full(env):
    """Every kind of variant on the test split, side by side."""
    db = env["db"]
    rc, doc = _evaluate(env, "full", "--variant", f"ciea=table:{db}/docs", "--variant", f"bm25=fts:{db}/docs",
                        "--variant", f"hybrid=hybrid:{db}/docs@published",
                        "--variant", f"inproc=checkpoint:{env['ckpt']}", "--set", "metrics.charts=[MRR@10,NDCG@10]")
    assert rc == 0
    return doc


# ---------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------


def test_the_report_has_every_variant_metric_and_group(env, full):
    assert list(full["variants"]) == ["ciea", "bm25", "hybrid", "inproc"]
    assert full["metrics"] == METRICS
    queries = env["queries"]
    kinds = sorted({q["kind"] for q in queries})
    assert kinds == ["caption", "image", "text"]
    # Synthetic caption/image queries are answered by images, text queries by texts.
    expected_groups = [OVERALL, *(f"kind={k}" for k in kinds), "modality=image", "modality=text"]
    assert full["groups"] == expected_groups
    for name, v in full["variants"].items():
        assert v["num_queries"] == len(queries), name
        assert set(v["metrics"]) == set(METRICS)
        for g in expected_groups[1:]:
            assert set(v["by_group"][g]) == set(METRICS), (name, g)
            assert all(0.0 <= x <= 1.0 for x in v["by_group"][g].values())
        assert v["group_counts"] == {f"kind={k}": sum(q["kind"] == k for q in queries) for k in kinds} | {
            "modality=image": sum(q["kind"] != "text" for q in queries),
            "modality=text": sum(q["kind"] == "text" for q in queries)}
        assert len(v["per_query"]) == len(queries)
    info = full["variants"]["ciea"]["info"]
    assert info["mode"] == "vector" and info["missing_relevant_docs"] == 0 and info["failed_queries"] == 0
    assert full["variants"]["bm25"]["info"]["mode"] == "fts"
    assert full["variants"]["hybrid"]["info"]["tag"] == "published"
    assert full["variants"]["inproc"]["info"]["documents"] == N_IMAGES + N_TEXTS
    assert full["variants"]["inproc"]["info"]["model_id"] == info["model_id"]


def test_markdown_and_charts_are_written(env, full):
    out = env["tmp"] / "full"
    md = (out / "report.md").read_text()
    for text in ("## Overall (40 queries)", "## `kind=image`", "## `modality=text`", "| ciea |", "| bm25 |",
                 "| hybrid |", "| inproc |", "![MRR@10 per group](mrr_at_10.png)", *METRICS):
        assert text in md, text
    ciea = full["variants"]["ciea"]["metrics"]["MRR@10"]
    assert f"{100 * ciea:.2f}" in md
    for name in ("mrr_at_10.png", "ndcg_at_10.png"):
        with Image.open(out / name) as im:
            im.load()
            assert im.format == "PNG" and im.width >= 400 and im.height >= 300
            # Not a blank canvas: bars in several colours.
            assert len(im.convert("RGB").getcolors(1 << 16) or []) > 10
    config = json.loads((out / "evaluate_config.json").read_text())
    assert [v["name"] for v in config["variants"]] == ["ciea", "bm25", "hybrid", "inproc"]


# ---------------------------------------------------------------------------------------
# the numbers
# ---------------------------------------------------------------------------------------


def _read_trec_run(path) -> dict[str, dict[str, float]]:
    run: dict[str, dict[str, float]] = defaultdict(dict)
    for line in path.read_text().splitlines():
        qid, _, doc, _, score, _ = line.split()
        run[qid][doc] = float(score)
    return run


def _read_qrels(path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    for line in path.read_text().splitlines():
        qid, _, doc, rel = line.split()
        qrels[qid][doc] = int(rel)
    return qrels


def _pytrec(qrels_path, run: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """trec_eval values per query, named like the report (MRR@k = recip_rank of the top k,
    cut in trec_eval's order: score, then doc id, descending; gNDCG@k = ndcg_cut on the graded
    qrels written beside ``qrels_path``)."""
    import pytrec_eval

    qrels = _read_qrels(qrels_path)
    res = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10,20", "recall.1,5,20,100", "success.1,5,20,100"}
                                         ).evaluate(run)
    out = {q: {**{f"NDCG@{k}": v[f"ndcg_cut_{k}"] for k in (10, 20)},
               **{f"Recall@{k}": v[f"recall_{k}"] for k in (1, 5, 20, 100)},
               **{f"Success@{k}": v[f"success_{k}"] for k in (1, 5, 20, 100)}} for q, v in res.items()}
    graded = _read_qrels(qrels_path.with_name("qrels.graded.txt"))
    for q, v in pytrec_eval.RelevanceEvaluator(graded, {"ndcg_cut.10,20"}).evaluate(run).items():
        out[q].update({f"gNDCG@{k}": v[f"ndcg_cut_{k}"] for k in (10, 20)})
    for k in (10, 20):
        top = {q: dict(sorted(d.items(), key=lambda x: (x[1], x[0]), reverse=True)[:k]) for q, d in run.items()}
        for q, v in pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top).items():
            out[q][f"MRR@{k}"] = v["recip_rank"]
    return out


@pytest.mark.parametrize("variant", ["ciea", "bm25", "hybrid", "inproc"])
def test_values_equal_pytrec_eval_on_the_same_run(env, full, variant):
    out = env["tmp"] / "full"
    run = _read_trec_run(out / "runs" / f"{variant}.txt")
    assert all(1 <= len(docs) <= 100 for docs in run.values())
    expected = _pytrec(out / "qrels.txt", run)
    v = full["variants"][variant]
    assert set(v["per_query"]) == set(expected) == {q["qid"] for q in env["queries"]}
    for qid, values in expected.items():
        for name in METRICS:
            assert v["per_query"][qid][name] == pytest.approx(values[name], abs=1e-9), (qid, name)
    kind = {q["qid"]: q["kind"] for q in env["queries"]}
    for group in full["groups"]:
        members = [q for q in expected if group == OVERALL or f"kind={kind[q]}" == group
                   or group == f"modality={'text' if kind[q] == 'text' else 'image'}"]
        for name in METRICS:
            mean = math.fsum(expected[q][name] for q in members) / len(members)
            got = v["metrics"][name] if group == OVERALL else v["by_group"][group][name]
            assert got == pytest.approx(mean, abs=1e-9), (group, name)


def test_the_release_webqa_image_protocol_searches_a_table_for_images_only(env):
    """metrics.webqa_image_protocol=release on a real table: image-answer queries are ranked
    again against the image documents alone (a modality pre-filter on the table), reported
    as the image-index group, and scored as trec_eval scores that run."""
    db = env["db"]
    rc, doc = _evaluate(env, "release-protocol", "--variant", f"ciea=table:{db}/docs",
                        "--set", "metrics.webqa_image_protocol=release", "--set", "metrics.charts=[]")
    assert rc == 0
    v = doc["variants"]["ciea"]
    image_qids = {q["qid"] for q in env["queries"] if q["kind"] != "text"}
    assert v["group_counts"]["image-index"] == len(image_qids)
    run = _read_trec_run(env["tmp"] / "release-protocol" / "runs" / "ciea.image-index.txt")
    modality = {r["doc_id"]: r["modality"] for r in env["records"]}
    assert set(run) == image_qids and {modality[d] for docs in run.values() for d in docs} == {"image"}
    expected = _pytrec(env["tmp"] / "release-protocol" / "qrels.txt", run)
    for name in METRICS:
        mean = math.fsum(expected[q][name] for q in run) / len(run)
        assert v["by_group"]["image-index"][name] == pytest.approx(mean, abs=1e-9), name


def test_the_in_process_checkpoint_ranks_like_the_table(full):
    # Below the ANN threshold the table is searched exactly: the same model, the same
    # vectors, so the same rankings (up to float rounding between Lance and numpy).
    a, b = full["variants"]["ciea"]["per_query"], full["variants"]["inproc"]["per_query"]
    same = sum(a[q] == pytest.approx(b[q], abs=1e-9) for q in a)
    assert same >= 0.9 * len(a)
    assert full["variants"]["ciea"]["metrics"]["Recall@100"] == pytest.approx(
        full["variants"]["inproc"]["metrics"]["Recall@100"], abs=0.05)


def test_bm25_finds_exact_word_queries(env):
    db = env["db"]
    rc, doc = _evaluate(env, "exact", "--split", "exact", "--variant", f"bm25=fts:{db}/docs",
                        "--variant", f"ciea=table:{db}/docs")
    assert rc == 0
    bm25 = doc["variants"]["bm25"]
    assert bm25["num_queries"] == 12
    assert bm25["metrics"]["MRR@10"] >= 0.9 and bm25["metrics"]["Recall@5"] == 1.0
    assert doc["groups"] == [OVERALL, "kind=text", "modality=text"]


def test_one_query_the_search_refuses_scores_zero_and_the_rest_are_scored(env):
    rc, doc = _evaluate(env, "odd", "--split", "odd", "--variant", f"ciea=table:{env['db']}/docs",
                        "--variant", f"bm25=fts:{env['db']}/docs")
    assert rc == 0
    for name in ("ciea", "bm25"):
        v = doc["variants"][name]
        assert v["info"]["failed_queries"] == 1 and v["info"]["failures"][0]["qid"] == "odd-blank"
        assert v["num_queries"] == 4 and all(x == 0.0 for x in v["per_query"]["odd-blank"].values())


def test_evaluate_searcher_is_the_same_numbers_as_the_job(env, full):
    from pipelines.query.search import Searcher

    queries, qrels = load_split(Tables(str(env["root"])), "test")
    searcher = Searcher.open(env["db"], "docs")
    report = evaluate_searcher(searcher, queries, qrels, k=100, mode="vector", max_missing_fraction=0.0)
    v = full["variants"]["ciea"]
    assert report.metrics == pytest.approx(v["metrics"], abs=1e-12)
    assert report.by_group.keys() == v["by_group"].keys()
    assert report.group_counts == v["group_counts"]
    # As a publish gate: a table version without the judged documents is refused.
    small = Searcher.open(env["small_db"], "small")
    with pytest.raises(EvaluationError, match="lacks"):
        evaluate_searcher(small, queries, qrels, max_missing_fraction=0.0)


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------


def test_an_unknown_split_names_the_splits_there(env, capsys):
    rc, _ = _evaluate(env, "bad-split", "--split", "tset", "--variant", f"ciea=table:{env['db']}/docs")
    err = capsys.readouterr().err
    assert rc == 2
    assert "no query split 'tset'" in err and "empty, exact, odd, test" in err and "--split" in err


def test_an_empty_split_is_refused(env, capsys):
    rc, _ = _evaluate(env, "empty", "--split", "empty", "--variant", f"ciea=table:{env['db']}/docs")
    err = capsys.readouterr().err
    assert rc == 2 and "query split 'empty'" in err and "is empty" in err


def test_a_table_without_the_judged_documents_is_refused(env, capsys):
    rc, doc = _evaluate(env, "small", "--variant", f"ciea=table:{env['db']}/docs",
                        "--variant", f"small=table:{env['small_db']}/small")
    err = capsys.readouterr().err
    assert rc == 2 and doc is None
    assert "variant 'small'" in err and "lacks" in err and "ciea embed" in err and "max_missing_fraction" in err
    assert not (env["tmp"] / "small" / "report.json").exists()  # refused before anything ran


def test_missing_tables_versions_and_checkpoints_are_named(env, capsys):
    db = env["db"]
    for variant, words in ((f"x=table:{db}/nope", ["no table 'nope'", "docs"]),
                           (f"x=table:{db}/docs@999", ["no version 999"]),
                           (f"x=fts:{db}/docs@release", ["no tag 'release'", "published"]),
                           (f"x=checkpoint:{env['tmp']}/no-such-ckpt", ["not a directory", "save_checkpoint"])):
        rc, _ = _evaluate(env, "missing", "--variant", variant)
        err = capsys.readouterr().err
        assert rc == 2, variant
        for w in words:
            assert w in err, (variant, w, err)


def test_malformed_variants_exit_with_the_expected_form(env):
    for bad in ("ciea", "ciea=tabel:x/y", "ciea=table:documents", "=table:a/b"):
        with pytest.raises(SystemExit) as e:
            job.main(["--variant", bad, "--root", str(env["root"])])
        assert "<db>/<table>" in str(e.value) or "NAME=KIND:WHERE" in str(e.value), bad
