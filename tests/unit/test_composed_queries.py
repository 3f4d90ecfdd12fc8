"""Composed queries in data (issue 25 item 3): the synthetic generator's composed queries
(reference image + modification text, targets from the ground truth), the queries table's
picture column (old tables without it still read, and gain it on the next ingest), and
BEIR query rows that carry an ``image`` path (confined; a bad one is quarantined with its
reason and the counts reconcile)."""

from __future__ import annotations

import io
import json
import os
import string
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from confinement_fixtures import SECRET, make_outside, png
from deltalake import write_deltalake
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipelines.ingest import runner
from pipelines.ingest.sources.base import Query, Source
from pipelines.ingest.sources.beir import BeirQueries
from pipelines.ingest.sources.synthetic import generator as syn
from pipelines.ingest.sources.synthetic.generator import (
    ATTRIBUTES,
    COMPOSED_CONTENT,
    SyntheticConfig,
    attribute_arrays,
    attribute_vocabulary,
    generate_composed_queries,
    generate_queries,
    iter_documents,
    relevant_indices,
    tokenize,
    value_words,
)
from pipelines.ingest.sources.synthetic.source import SyntheticSource
from pipelines.ingest.validation import Limits, Rejected
from pipelines.store import schema as S
from pipelines.store.delta_tables import Tables, merge_queries
from pipelines.store.splits import EmptySplit, read_split

NOW = datetime(2026, 12, 7, tzinfo=timezone.utc)
CFG = SyntheticConfig(seed=3, num_image_docs=300, num_text_docs=40, num_queries=(40, 10, 10), image_size=32,
                      num_composed=(30, 10, 10))


@pytest.fixture(scope="module")
def composed() -> dict[str, list[dict]]:
    return generate_composed_queries(CFG)


@pytest.fixture(scope="module")
def image_docs() -> dict[str, dict]:
    return {d["doc_id"]: d for d in iter_documents(CFG, 0, CFG.num_image_docs)}


# ---- the generator --------------------------------------------------------------------------


def test_counts_ids_and_kind(composed):
    assert [len(composed[s]) for s in syn.SPLITS] == list(CFG.num_composed)
    for split, qs in composed.items():
        assert [q["qid"] for q in qs] == [f"{split}-c{i:06d}" for i in range(len(qs))]
        assert all(q["kind"] == "composed" and q["split"] == split for q in qs)
    keys = [(q["reference_doc_id"], q["changed"]["attribute"], q["changed"]["to"])
            for qs in composed.values() for q in qs]
    assert len(keys) == len(set(keys))


def test_targets_and_near_misses_are_exactly_the_ground_truth(composed, image_docs):
    codes = attribute_arrays(CFG)
    for q in (q for qs in composed.values() for q in qs):
        ref = json.loads(image_docs[q["reference_doc_id"]]["attributes"])
        change = q["changed"]
        # The change is of an attribute the reference's caption does not state, to a new value.
        assert change["attribute"] in syn.COMPOSED_CHANGES and change["attribute"] not in ref["stated"]
        assert change["from"] == ref[change["attribute"]] != change["to"]
        content = {a: ref[a] for a in COMPOSED_CONTENT}
        wanted = {**content, change["attribute"]: change["to"]}
        assert q["constraints"] == {a: wanted[a] for a in ATTRIBUTES if a in wanted}
        assert q["positive_doc_ids"] == [syn.image_doc_id(int(i)) for i in relevant_indices(codes, wanted)]
        assert q["positive_doc_ids"] and q["target_doc_id"] in q["positive_doc_ids"]
        assert q["reference_doc_id"] not in q["positive_doc_ids"]
        near = [syn.image_doc_id(int(i)) for i in relevant_indices(codes, content)]
        assert q["near_miss_doc_ids"][0] == q["reference_doc_id"]
        assert set(q["near_miss_doc_ids"]) == set(near[: syn.MAX_NEAR_MISSES]) | {q["reference_doc_id"]} or \
            len(near) > syn.MAX_NEAR_MISSES
        assert not set(q["near_miss_doc_ids"]) & set(q["positive_doc_ids"])
        for d in q["positive_doc_ids"]:
            attrs = json.loads(image_docs[d]["attributes"])
            assert all(attrs[a] == v for a, v in wanted.items())


def test_modification_text_names_the_new_value_and_nothing_else(composed):
    vocab = {a: attribute_vocabulary(a) for a in ATTRIBUTES}
    every = set().union(*vocab.values())
    for q in (q for qs in composed.values() for q in qs):
        words = set(tokenize(q["query"]))
        change = q["changed"]
        assert words & every == set(value_words(change["attribute"], change["to"])), q["query"]
    glue = set()
    for templates in syn._MODIFICATION_TEMPLATES.values():
        for t in templates:
            glue |= set(tokenize("".join(lit for lit, *_ in string.Formatter().parse(t))))
    assert not glue & every, glue & every


def test_deterministic_and_the_other_queries_do_not_move():
    with_c = generate_queries(CFG)
    without = generate_queries(SyntheticConfig(**{**CFG.__dict__, "num_composed": (0, 0, 0)}))
    for split in syn.SPLITS:
        plain = [q for q in with_c[split] if q["kind"] != "composed"]
        assert plain == without[split]
        assert [q for q in with_c[split] if q["kind"] == "composed"] == generate_composed_queries(CFG)[split]


def test_reference_picture_is_the_documents_own(composed, image_docs):
    q = composed["test"][0]
    assert syn.document_image(CFG, q["reference_doc_id"]) == image_docs[q["reference_doc_id"]]["image"]
    with pytest.raises(ValueError, match="not an image document id"):
        syn.document_image(CFG, "txt-000000001")


def test_config_checks_and_too_small_corpus():
    with pytest.raises(ValueError, match="num_composed"):
        SyntheticConfig(num_composed=(1, 2))
    tiny = SyntheticConfig(num_image_docs=2, num_text_docs=0, num_queries=(0, 0, 0), text_query_fraction=0,
                           num_composed=(5, 0, 0))
    with pytest.raises(RuntimeError, match="too small"):
        generate_composed_queries(tiny)


# ---- through the source and validation ------------------------------------------------------


def test_synthetic_source_yields_the_picture_and_lineage(composed):
    src = SyntheticSource(CFG)
    queries = [q for q in src.iter_queries("dev") if q.metadata["kind"] == "composed"]
    assert len(queries) == CFG.num_composed[1]
    q, want = queries[0], composed["dev"][0]
    assert q.image == syn.document_image(CFG, want["reference_doc_id"])
    assert q.metadata["reference_doc_id"] == want["reference_doc_id"]
    assert q.metadata["near_miss_doc_ids"] == want["near_miss_doc_ids"]
    row = runner.validate_query(q, Limits(), 2000)
    assert row[S.IMAGE] == q.image  # already an upright RGB PNG: stored as it is
    text_row = runner.validate_query(Query("t1", "red things", "r"), Limits(), 2000)
    assert text_row[S.IMAGE] is None
    # The picture is part of the query's content: another picture is an update.
    other = runner.validate_query(Query(q.qid, q.query, q.record_ref, metadata=q.metadata, image=png()),
                                  Limits(), 2000)
    assert other[S.CONTENT_SHA256] != row[S.CONTENT_SHA256]


@pytest.mark.parametrize("data,reason", [(b"not an image", "image_unrecognised"),
                                         (png(size=64), "image_too_large"),
                                         ("a path", "wrong_type")])
def test_a_bad_query_picture_is_rejected_with_its_reason(data, reason):
    with pytest.raises(Rejected) as e:
        runner.validate_query(Query("q", "text", "r", image=data), Limits(max_image_pixels=100), 2000)
    assert e.value.reason == reason


# ---- the queries table: backward compatible --------------------------------------------------


OLD_QUERIES_SCHEMA = pa.schema([f for f in S.QUERIES_SCHEMA if f.name != S.IMAGE])


def _row(qid: str, text: str, image: bytes | None = None) -> dict:
    return {S.QID: qid, S.QUERY: text, S.ANSWER: None, S.METADATA: json.dumps({"kind": "composed"}),
            S.CONTENT_SHA256: f"sha-{qid}-{len(image or b'')}", S.SOURCE: "t", S.RECORD_REF: f"t:{qid}",
            S.RUN_ID: "r", S.INGESTED_AT: NOW, **({S.IMAGE: image} if image is not None else {})}


def test_a_table_without_the_picture_column_reads_and_gains_it(tmp_path):
    tables = Tables(str(tmp_path))
    old = pa.Table.from_pylist([_row("q1", "old text query")], schema=OLD_QUERIES_SCHEMA)
    write_deltalake(tables.queries("test"), old, mode="overwrite")
    split = read_split(tables, "test")
    assert split.queries[0][S.IMAGE] is None
    assert "image" not in split.training_queries()[0]
    # The next ingest adds the column in place; old rows read null, new rows carry bytes.
    pic = png()
    merge_queries(tables, "test", pa.Table.from_pylist([_row("q2", "the same but blue", pic)],
                                                       schema=S.QUERIES_SCHEMA))
    assert tables.open(tables.queries("test")).schema().to_arrow().names == S.QUERIES_SCHEMA.names
    got = {q[S.QID]: q[S.IMAGE] for q in read_split(tables, "test").queries}
    assert got == {"q1": None, "q2": pic}


def test_a_table_with_other_columns_is_still_refused(tmp_path):
    tables = Tables(str(tmp_path))
    odd = pa.schema([f for f in OLD_QUERIES_SCHEMA if f.name != S.ANSWER])
    write_deltalake(tables.queries("test"), pa.Table.from_pylist(
        [{k: v for k, v in _row("q1", "x").items() if k != S.ANSWER}], schema=odd), mode="overwrite")
    with pytest.raises(ValueError, match="migrate the table"):
        merge_queries(tables, "test", pa.Table.from_pylist([_row("q2", "y")], schema=S.QUERIES_SCHEMA))


# ---- BEIR rows with an image path -----------------------------------------------------------


def _beir(root: Path, rows: list[dict]) -> Path:
    (root / "qrels").mkdir(parents=True)
    (root / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{r['_id']}\td1\t1\n" for r in rows))
    return root


def _ingest(beir: Path, tmp_path: Path, limits: Limits | None = None) -> tuple[dict, list[dict], list[dict]]:
    limits = limits or Limits()
    src = Source("beirtest")
    src.attach_queries(BeirQueries(str(beir), max_image_bytes=limits.max_image_bytes))
    tables = Tables(str(tmp_path / "data"))
    spill = runner.QuarantineSpill("run", NOW)
    summary = runner.ingest_queries(src, "test", tables, limits, 2000, spill, "run", NOW, None)
    bad = pa.Table.from_batches(list(spill.reader())).to_pylist() if spill.rows else []
    try:
        queries = read_split(tables, "test").queries
    except EmptySplit:
        queries = []
    return summary, queries, bad


def test_beir_rows_with_pictures_good_and_bad(tmp_path):
    beir = tmp_path / "beir"
    beir.mkdir()
    (beir / "pics").mkdir()
    (beir / "pics" / "ref.png").write_bytes(png((200, 10, 10), 8))
    (beir / "pics" / "junk.png").write_bytes(b"definitely not a png")
    outside = make_outside(tmp_path, png())
    (beir / "pics" / "escape.png").symlink_to(outside / "real.png")
    os.mkfifo(beir / "pics" / "fifo.png")
    _beir(beir, [
        {"_id": "ok", "text": "the same but blue", "image": "pics/ref.png"},
        {"_id": "abs", "text": "make it green", "image": str(beir / "pics" / "ref.png")},
        {"_id": "plain", "text": "a text question"},
        {"_id": "missing", "text": "x", "image": "pics/nope.png"},
        {"_id": "junk", "text": "x", "image": "pics/junk.png"},
        {"_id": "escape", "text": "x", "image": "pics/escape.png"},
        {"_id": "outside", "text": "x", "image": str(outside / "secret.png")},
        {"_id": "dotdot", "text": "x", "image": "../outside/real.png"},
        {"_id": "fifo", "text": "x", "image": "pics/fifo.png"},
        {"_id": "number", "text": "x", "image": 7},
    ])
    summary, queries, bad = _ingest(beir, tmp_path)
    assert summary["read"] == 10 and summary["accepted"] == 3 and summary["quarantined"] == 7
    assert summary["read"] == summary["accepted"] + summary["quarantined"]
    got = {q[S.QID]: q for q in queries}
    assert set(got) == {"ok", "abs", "plain"}
    assert got["ok"][S.IMAGE] == (beir / "pics" / "ref.png").read_bytes() == got["abs"][S.IMAGE]
    assert got["plain"][S.IMAGE] is None
    assert got["ok"]["metadata"] == {"image": "pics/ref.png"}
    excerpts = [json.loads(b[S.EXCERPT]) for b in bad]  # the line, or the validated query
    reasons = {str(e.get("_id", e.get("qid"))): b[S.REASON] for e, b in zip(excerpts, bad, strict=True)}
    assert reasons == {"missing": "image_missing", "junk": "image_unrecognised", "escape": "outside_root",
                       "outside": "outside_root", "dotdot": "outside_root", "fifo": "not_a_regular_file",
                       "number": "wrong_type"}
    for b in bad:
        assert SECRET.decode() not in (b[S.DETAIL] or "") + (b[S.EXCERPT] or "")


def test_beir_picture_over_the_byte_cap_is_read_no_further(tmp_path):
    beir = tmp_path / "beir"
    beir.mkdir()
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(big, "PNG")
    (beir / "big.png").write_bytes(big.getvalue())
    _beir(beir, [{"_id": "big", "text": "x", "image": "big.png"}])
    summary, _, bad = _ingest(beir, tmp_path, Limits(max_image_bytes=1000))
    assert summary["quarantined"] == 1 and bad[0][S.REASON] == "image_too_large"
    assert "1001 bytes" in bad[0][S.DETAIL]  # the cap + 1, never the whole file


_paths = st.one_of(st.text(min_size=0, max_size=30), st.integers(), st.none(), st.booleans(),
                   st.lists(st.text(max_size=5), max_size=2), st.sampled_from(["ok.png", "./ok.png", "../x.png",
                                                                              "/etc/passwd", "s3://b/k.png"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(image=_paths, text=st.one_of(st.text(max_size=20), st.none()))
def test_any_image_value_is_a_picture_or_one_quarantined_record(tmp_path_factory, image, text):
    tmp = tmp_path_factory.mktemp("beir")
    beir = tmp / "beir"
    beir.mkdir()
    (beir / "ok.png").write_bytes(png())
    _beir(beir, [{"_id": "q", "text": text, "image": image}])
    summary, queries, bad = _ingest(beir, tmp)
    assert summary["read"] == 1 == summary["accepted"] + summary["quarantined"]
    if queries:
        assert image is None or queries[0][S.IMAGE] == png()
    else:
        assert len(bad) == 1 and bad[0][S.REASON]
