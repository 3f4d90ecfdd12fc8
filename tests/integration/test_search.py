"""Search, ``ciea search`` and ``ciea sql`` on a real table written by ``ciea embed``.

One module-scoped Ray, corpus and table: 300 synthetic documents plus a few with words no
other document has (known full-text answers), embedded with a tiny random-init checkpoint
and indexed with IVF_PQ (``index.min_rows_for_ann=256``), so both the ANN path and — at
the table's pre-index version — the exact path are searched. The vector answers are
checked against numpy over the table's own vectors; hybrid against RRF computed here.
"""

from __future__ import annotations

import json
from pathlib import Path

import lancedb
import numpy as np
import pytest
from embed_helpers import make_checkpoint, run_embed, synthetic_records, write_corpus

from ciea_model import load_checkpoint
from ciea_model.inference import encode_queries
from jobs import search as search_job
from jobs import sql as sql_job
from pipelines.query.search import (
    CheckpointMismatchError,
    Filter,
    FilterError,
    Searcher,
    SearchError,
    reciprocal_rank_fusion,
)
from pipelines.store.images import MAX_IMAGE_BYTES
from pipelines.store.lance_tables import META_CHECKPOINT, VectorTable

pytestmark = pytest.mark.usefixtures("ray_local")

N_IMAGES, N_TEXTS = 200, 100
TABLE = "docs"
QUERIES = ["a red circle at the top", "the museum collection", "green umbrellas near the bridge",
           "three blue squares", "zyxquor lighthouse"]


def unique_records(base: list[dict]) -> list[dict]:
    """Documents whose words occur nowhere else: the full-text answers are known."""
    image = next(r for r in base if r["modality"] == "image")
    return [
        {"doc_id": "uniq-text-1", "modality": "text", "text": "The zyxquor lighthouse keeps a brass ledger.",
         "caption": "", "image": None, "attributes": '{"topic": "zyxquor"}'},
        {"doc_id": "uniq-text-2", "modality": "text", "text": "Fishermen mend plomvark nets beside the harbour.",
         "caption": "", "image": None, "attributes": None},
        {"doc_id": "uniq-image-1", "modality": "image", "text": "", "caption": "A qwvelt banner over the harbour",
         "image": image["image"], "attributes": '{"banner": "qwvelt"}'},
    ]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    base = synthetic_records(N_IMAGES, N_TEXTS)
    records = base + unique_records(base)
    root = tmp / "data"
    write_corpus(root, records)
    texts = [r["caption"] or r["text"] for r in records]
    ckpt = make_checkpoint(tmp, texts, seed=0)
    other = make_checkpoint(tmp, texts, seed=1)
    rc, summary = run_embed(tmp, root, ckpt, TABLE, "--set", "index.min_rows_for_ann=256")
    assert rc == 0 and summary["ann_plan"], summary
    db = str(root / "lancedb")
    vt = VectorTable(db, TABLE)
    rows = vt.dataset().to_table(columns=["doc_id", "vector", "modality"]).to_pylist()
    ids = [r["doc_id"] for r in rows]
    vectors = np.asarray([r["vector"] for r in rows], dtype=np.float32)
    return {"tmp": tmp, "root": root, "db": db, "records": records, "ckpt": ckpt, "other": other,
            "summary": summary, "ids": ids, "vectors": vectors, "modality": [r["modality"] for r in rows]}


@pytest.fixture(scope="module")
def searcher(env) -> Searcher:
    # Through the table handle (the other tests open by database and name: the same path).
    return Searcher.open_table(VectorTable(env["db"], TABLE))


def brute_force(env, q: np.ndarray, k: int, keep: np.ndarray | None = None) -> list[tuple[str, float]]:
    sims = env["vectors"] @ q
    if keep is not None:
        sims = np.where(keep, sims, -np.inf)
    order = np.argsort(-sims, kind="stable")[:k]
    return [(env["ids"][i], float(sims[i])) for i in order if np.isfinite(sims[i])]


def test_opens_the_published_version_with_the_recorded_checkpoint(env, searcher):
    s = env["summary"]
    assert searcher.tag == "published" and searcher.version == s["published_version"]
    assert searcher.model_id == s["model_id"] and searcher.dim == 32
    assert searcher.checkpoint == str(Path(env["ckpt"]).resolve())
    assert searcher.metadata[META_CHECKPOINT] == searcher.checkpoint
    # The stored plan's search settings are the defaults (300 rows: one partition, 2 sub-vectors).
    assert searcher.has_ann and searcher.plan.rows == len(env["ids"])
    assert (searcher.nprobes, searcher.refine_factor) == (searcher.plan.nprobes, searcher.plan.refine_factor) == (1, 5)
    assert set(searcher.fts_columns) == {"text", "caption"}


def test_query_encodings_equal_the_model_librarys(env, searcher):
    model, processor = load_checkpoint(env["ckpt"])
    expected = encode_queries(model, processor, QUERIES)
    got = searcher.encode_queries(QUERIES)
    assert got.dtype == np.float32 and got.shape == (len(QUERIES), 32)
    np.testing.assert_array_equal(got, expected)
    assert np.abs(got[0] - got[1]).max() > 1e-3  # distinct queries, distinct vectors


def test_a_documents_own_vector_finds_it_first(env, searcher):
    picks = list(range(0, len(env["ids"]), 15))
    results = searcher.search_vectors(env["vectors"][picks], k=5)
    assert len(results) == len(picks)
    for i, hits in zip(picks, results, strict=True):
        assert hits[0].doc_id == env["ids"][i], (env["ids"][i], [h.doc_id for h in hits])
        assert hits[0].score == pytest.approx(1.0, abs=1e-3) and hits[0].rank == 1
        assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))


def test_ann_with_every_candidate_refined_equals_exact_search(env, searcher):
    qv = searcher.encode_queries(QUERIES)
    # One partition probed and refine_factor x k >= rows: PQ only proposes, exact distances rank.
    results = searcher.search_batch(QUERIES, k=10, refine_factor=40)
    for q, hits in zip(qv, results, strict=True):
        expected = brute_force(env, q, 10)
        assert [h.doc_id for h in hits] == [d for d, _ in expected]
        np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], atol=1e-5)


def test_exact_search_at_a_version_without_indexes(env):
    tbl = lancedb.connect(env["db"]).open_table(TABLE)
    unindexed = None
    for v in sorted(x["version"] for x in tbl.list_versions()):
        tbl.checkout(v)
        if tbl.count_rows() == len(env["ids"]) and not tbl.list_indices():
            unindexed = v
            break
    assert unindexed is not None
    s = Searcher.open(env["db"], TABLE, version=unindexed, checkpoint=env["ckpt"])
    assert s.version == unindexed and s.tag is None and not s.has_ann and s.nprobes is None
    qv = s.encode_queries(QUERIES)
    keep = np.array([m == "image" for m in env["modality"]])
    for q, text in zip(qv, QUERIES, strict=True):
        hits = s.search(text, k=7)
        expected = brute_force(env, q, 7)
        assert [h.doc_id for h in hits] == [d for d, _ in expected]
        np.testing.assert_allclose([h.score for h in hits], [x for _, x in expected], atol=1e-5)
        filtered = s.search(text, k=7, where=Filter(modality="image"))
        assert [h.doc_id for h in filtered] == [d for d, _ in brute_force(env, q, 7, keep)]
    with pytest.raises(SearchError, match="no full-text index"):
        s.search("zyxquor", mode="fts")


def test_full_text_finds_the_known_answers_in_text_and_caption(searcher):
    hits = searcher.search("zyxquor", k=5, mode="fts")
    assert [h.doc_id for h in hits] == ["uniq-text-1"]
    assert hits[0].text.startswith("The zyxquor lighthouse") and hits[0].metadata == {"topic": "zyxquor"}
    hits = searcher.search("qwvelt", k=5, mode="fts")
    assert [h.doc_id for h in hits] == ["uniq-image-1"]
    assert hits[0].modality == "image" and hits[0].caption == "A qwvelt banner over the harbour"
    assert hits[0].thumbnail[:2] == b"\xff\xd8"  # a JPEG for people to look at
    both = searcher.search("zyxquor qwvelt plomvark", k=10, mode="fts")
    assert {h.doc_id for h in both} == {"uniq-text-1", "uniq-text-2", "uniq-image-1"}
    assert all(h.score > 0 for h in both)
    # Quotes and SQL in a query are just words to BM25, never syntax.
    assert searcher.search("zyxquor' OR 1=1; --", k=3, mode="fts")[0].doc_id == "uniq-text-1"


def test_hybrid_is_the_reciprocal_rank_fusion_of_both_lists(searcher):
    for query in ("zyxquor lighthouse", "red circle", "harbour banner"):
        n = 50
        vec = [h.doc_id for h in searcher.search(query, k=n, mode="vector")]
        fts = [h.doc_id for h in searcher.search(query, k=n, mode="fts")]
        expected = reciprocal_rank_fusion([vec, fts], 60)[:10]
        hits = searcher.search(query, k=10, mode="hybrid")
        assert [(h.doc_id, round(h.score, 12)) for h in hits] == [(d, round(s, 12)) for d, s in expected]
        assert {h.doc_id for h in hits} <= set(vec) | set(fts)
        # The full-text answer (rank 1 of BM25) is never lost by fusion: >= 1/61 ranks it high.
        if query.startswith("zyxquor"):
            assert fts[0] == "uniq-text-1" and "uniq-text-1" in [h.doc_id for h in hits]


@pytest.mark.parametrize("mode", ["vector", "fts", "hybrid"])
def test_filters_hold_in_every_mode(env, searcher, mode):
    query = "harbour collection red"
    image = searcher.search(query, k=8, mode=mode, where=Filter(modality="image"))
    assert image and all(h.modality == "image" for h in image)
    text = searcher.search(query, k=8, mode=mode, where=Filter(modality="text", equals={"source_version": 0}))
    assert text and all(h.modality == "text" for h in text)
    some = ["uniq-image-1", "uniq-text-2", env["ids"][7]]
    only = searcher.search(query, k=8, mode=mode, where=Filter(doc_ids=some))
    assert {h.doc_id for h in only} <= set(some) and only
    none = searcher.search(query, k=8, mode=mode, where=Filter(equals={"source_version": 99}))
    assert none == []


@pytest.mark.parametrize("where", [
    Filter(modality="image' OR 1=1 --"), Filter(equals={"doc_id": "x' OR 1=1 --"}),
    Filter(equals={"doc_id": "a; DROP TABLE docs"}), Filter(equals={"source_version": "0 OR 1=1"}),
    Filter(equals={"no_such_column": 1}), Filter(doc_ids=["ok", "x'--"])])
def test_injection_attempts_are_refused_before_the_query_runs(env, searcher, where):
    before = lancedb.connect(env["db"]).open_table(TABLE).version
    for mode in ("vector", "fts", "hybrid"):
        with pytest.raises(FilterError):
            searcher.search("red", mode=mode, where=where)
    with pytest.raises(FilterError):
        searcher.search_vectors(env["vectors"][:1], where=where)
    with pytest.raises(FilterError, match="never accepted as SQL"):
        searcher.search("red", where="modality = 'image' OR 1=1")  # type: ignore[arg-type]
    assert lancedb.connect(env["db"]).open_table(TABLE).version == before


def test_batch_search_equals_one_query_at_a_time(searcher):
    for mode in ("vector", "fts", "hybrid"):
        batch = searcher.search_batch(QUERIES, k=6, mode=mode)
        single = [searcher.search(q, k=6, mode=mode) for q in QUERIES]
        # Same documents in the same order; scores equal to float32 noise (a batched matmul
        # may differ from a single one in the last bits, so rounding could split a tie).
        assert [[h.doc_id for h in hs] for hs in batch] == [[h.doc_id for h in hs] for hs in single]
        assert [[h.score for h in hs] for hs in batch] == \
               [pytest.approx([h.score for h in hs], abs=1e-5) for hs in single]


def test_bad_arguments_name_the_fix(env, searcher):
    with pytest.raises(SearchError, match="one of vector, fts, hybrid"):
        searcher.search("red", mode="semantic")  # type: ignore[arg-type]
    with pytest.raises(SearchError, match="from 1 to"):
        searcher.search("red", k=0)
    with pytest.raises(SearchError, match="non-empty string"):
        searcher.search_batch(["red", "  "])
    with pytest.raises(SearchError, match=r"pass \(n, 32\)"):
        searcher.search_vectors(np.zeros((2, 16), np.float32))
    with pytest.raises(CheckpointMismatchError, match="model_id"):
        Searcher.open(env["db"], TABLE, checkpoint=env["other"])
    with pytest.raises(SearchError, match="no tag 'nope'"):
        Searcher.open(env["db"], TABLE, version="nope")
    with pytest.raises(SearchError, match="has no version 999"):
        Searcher.open(env["db"], TABLE, version=999)
    with pytest.raises(SearchError, match="no table 'missing'"):
        Searcher.open(env["db"], "missing")


def test_ciea_search_cli(env, capsys):
    rc = search_job.main(["zyxquor", "qwvelt", "--db", env["db"], "--table", TABLE, "--mode", "fts", "--k", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"{TABLE} @ tag 'published' = version {env['summary']['published_version']}" in out
    blocks = out.split("query: ")[1:]
    first = blocks[0].splitlines()[3].split()  # query line, header, rule, then rank 1
    assert first[0] == "1" and first[2:4] == ["uniq-text-1", "text"] and float(first[1]) > 0
    assert "uniq-image-1" in blocks[1] and "A qwvelt banner over the harbour" in blocks[1]

    rc = search_job.main(["red circle", "--db", env["db"], "--table", TABLE, "--mode", "hybrid", "--k", "4",
                          "--where-modality", "image", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["model_id"] == env["summary"]["model_id"] and data["mode"] == "hybrid"
    hits = data["results"][0]["hits"]
    assert len(hits) == 4 and all(h["modality"] == "image" and h["thumbnail_bytes"] > 0 for h in hits)

    rc = search_job.main(["red", "--db", env["db"], "--table", TABLE, "--where", "doc_id=x' OR 1=1 --"])
    err = capsys.readouterr().err
    assert rc == 2 and "single quote" in err and "ciea sql" in err
    rc = search_job.main(["red", "--db", env["db"], "--table", TABLE, "--where", "source_version=0; DROP"])
    assert rc == 2 and "integer column" in capsys.readouterr().err


def test_ciea_sql_reads_the_published_table_and_refuses_writes(env, capsys):
    db = env["db"]
    rc = sql_job.main(["SELECT modality, count(*) AS n FROM docs GROUP BY modality ORDER BY modality",
                       "--db", db, "--format", "json"])
    assert rc == 0
    counts = {r["modality"]: r["n"] for r in json.loads(capsys.readouterr().out)}
    assert counts == {"image": N_IMAGES + 1, "text": N_TEXTS + 2}

    rc = sql_job.main(["SELECT doc_id, text FROM docs WHERE text LIKE '%zyxquor%'", "--db", db, "--format", "csv"])
    assert rc == 0 and capsys.readouterr().out.splitlines() == [
        "doc_id,text", "uniq-text-1,The zyxquor lighthouse keeps a brass ledger."]

    rc = sql_job.main(["DESCRIBE docs", "--db", db])
    out = capsys.readouterr().out
    assert rc == 0 and "FLOAT[32]" in out and "doc_id" in out

    version = lancedb.connect(db).open_table(TABLE).version
    for sql in ("DELETE FROM docs", "INSERT INTO docs SELECT * FROM docs", "SELECT 1; DROP TABLE docs",
                "COPY docs TO 'out.csv'", "UPDATE docs SET doc_id = 'x'"):
        rc = sql_job.main([sql, "--db", db])
        err = capsys.readouterr().err
        assert rc == 2 and ("read-only" in err or "exactly one statement" in err), err
    rc = sql_job.main(["SELECT * FROM read_csv('/etc/hostname')", "--db", db])
    assert rc == 2 and "disabled by configuration" in capsys.readouterr().err
    assert lancedb.connect(db).open_table(TABLE).version == version
    assert lancedb.connect(db).open_table(TABLE).count_rows() == len(env["ids"])


def _an_image_document(env) -> dict:
    return next(r for r in env["records"] if r["modality"] == "image" and r["caption"])


def test_a_picture_query_is_the_document_towers_vector(env, searcher):
    """A picture with its caption is encoded exactly as the document side encodes that image
    document (issue 25): the query's vector is the table's stored vector, and finds it first."""
    from ciea_model.inference import encode_documents
    from ciea_model.processor import Document

    doc = _an_image_document(env)
    got = searcher.encode_pictures([doc["image"]], [doc["caption"]])
    model, processor = load_checkpoint(env["ckpt"])
    expected = encode_documents(model, processor, [Document(doc["doc_id"], "image", caption=doc["caption"],
                                                            image=doc["image"])])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(got[0], searcher.stored_vectors([doc["doc_id"]])[0], atol=1e-5)
    hits = searcher.search(doc["caption"], image=doc["image"], k=3)
    assert hits[0].doc_id == doc["doc_id"] and hits[0].score == pytest.approx(1.0, abs=1e-4)
    # The picture alone is another query (no caption in the caption's place): another vector.
    alone = searcher.encode_pictures([doc["image"]])
    assert np.abs(alone[0] - got[0]).max() > 1e-4
    assert [h.doc_id for h in searcher.search(image=doc["image"], k=5)] == [
        d for d, _ in brute_force(env, alone[0], 5)]


def test_more_like_this_is_the_stored_vectors_neighbours_without_the_document(env, searcher):
    for i in (0, 7, len(env["ids"]) - 1):
        d = env["ids"][i]
        hits = searcher.search(like=d, k=6, refine_factor=40)
        expected = [x for x, _ in brute_force(env, env["vectors"][i], 7) if x != d][:6]
        assert [h.doc_id for h in hits] == expected and [h.rank for h in hits] == list(range(1, 7))
    image = next(i for i, m in enumerate(env["modality"]) if m == "image")
    only_text = searcher.search(like=env["ids"][image], k=4, where=Filter(modality="text"))
    assert len(only_text) == 4 and {h.modality for h in only_text} == {"text"}
    batch = searcher.search_like(env["ids"][:3], k=2)
    assert [[h.doc_id for h in hits] for hits in batch] == [
        [h.doc_id for h in searcher.search(like=d, k=2)] for d in env["ids"][:3]]


@pytest.mark.parametrize("call, match", [
    (lambda s, env: s.search(), "pass text, image or like"),
    (lambda s, env: s.search("red", like=env["ids"][0]), "alone"),
    (lambda s, env: s.search(like="no-such-doc"), "no document 'no-such-doc'"),
    (lambda s, env: s.search(like="x' OR 1=1 --"), "no document \"x' OR 1=1 --\""),  # looked up, never SQL
    (lambda s, env: s.search(image=b"\x89PNG\r\n\x1a\n broken"), "picture 0: image_unrecognised"),
    (lambda s, env: s.search(image=_an_image_document(env)["image"], mode="hybrid"), "vector search"),
    (lambda s, env: s.search(like=env["ids"][0], mode="fts"), "vector search"),
    (lambda s, env: s.search_pictures([b"a", b"b"], ["one"]), "one text"),
])
def test_picture_and_like_queries_refuse_bad_input_with_the_fix(env, searcher, call, match):
    with pytest.raises(SearchError, match=match):
        call(searcher, env)


def test_ciea_search_with_a_picture_and_more_like_this(env, capsys, tmp_path):
    doc = _an_image_document(env)
    picture = tmp_path / "picture.png"
    picture.write_bytes(doc["image"])
    rc = search_job.main(["--image", str(picture), doc["caption"], "--db", env["db"], "--table", TABLE, "--k", "2",
                          "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["results"][0]["hits"][0]["doc_id"] == doc["doc_id"]
    assert data["results"][0]["query"] == f"[picture {picture}] {doc['caption']}"
    rc = search_job.main(["--like", doc["doc_id"], "--db", env["db"], "--table", TABLE, "--k", "3"])
    out = capsys.readouterr().out
    assert rc == 0 and f"query: more like {doc['doc_id']}" in out and f" {doc['doc_id']} " not in out
    huge = tmp_path / "huge.png"
    with huge.open("wb") as f:
        f.truncate(MAX_IMAGE_BYTES + 10)  # sparse: nothing written, but a file over the cap
    for argv, match in ((["--image", str(tmp_path / "missing.png")], "cannot read it"),
                        (["--image", str(huge)], "the image cap"),
                        (["--image", str(tmp_path)], "cannot read it"),
                        (["--like", doc["doc_id"], "red"], "--like takes doc_ids alone"),
                        ([], "give a query")):
        rc = search_job.main([*argv, "--db", env["db"], "--table", TABLE])
        err = capsys.readouterr().err
        assert rc == 2 and match in err and len(err.strip().splitlines()) == 1, err


def test_a_searcher_keeps_its_version_while_a_new_one_is_published(env, searcher):
    """Re-embed with one document deleted and one added: the open searcher still answers
    from the version it was opened at; a new one sees the change."""
    old_version = searcher.version
    assert [h.doc_id for h in searcher.search("plomvark", mode="fts")] == ["uniq-text-2"]
    kept = [r for r in env["records"] if r["doc_id"] != "uniq-text-2"]
    added = {"doc_id": "uniq-text-3", "modality": "text", "text": "A vintrobe kite over the dunes.", "caption": "",
             "image": None, "attributes": None}
    write_corpus(env["root"], kept + [added])
    rc, summary = run_embed(env["tmp"], env["root"], env["ckpt"], TABLE, "--set", "index.min_rows_for_ann=256")
    assert rc == 0 and summary["published_version"] > old_version and summary["deleted_stale"] == 1

    # The open searcher: same version, same answers (the deleted document is still there).
    assert searcher.version == old_version
    assert [h.doc_id for h in searcher.search("plomvark", mode="fts")] == ["uniq-text-2"]
    assert searcher.search("vintrobe", mode="fts") == []
    i = env["ids"].index("uniq-text-2")
    assert searcher.search_vectors(env["vectors"][i])[0][0].doc_id == "uniq-text-2"

    fresh = Searcher.open(env["db"], TABLE)
    assert fresh.version == summary["published_version"]
    assert fresh.search("plomvark", mode="fts") == []
    assert [h.doc_id for h in fresh.search("vintrobe", mode="fts")] == ["uniq-text-3"]
    assert fresh.search_vectors(env["vectors"][i])[0][0].doc_id != "uniq-text-2"
    # The old version stays reachable by number.
    again = Searcher.open(env["db"], TABLE, version=old_version)
    assert [h.doc_id for h in again.search("plomvark", mode="fts")] == ["uniq-text-2"]
