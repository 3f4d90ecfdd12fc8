"""Bad input never stops an ingest and is never lost: each case of issue 3 lands in
``corpus/quarantine`` with its reason, and the counts reconcile."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ingest_fixtures import image_bytes, jsonl, write_bad_manifest
from ingest_helpers import reconcile, rows_by_id, run_ingest

from pipelines.store.delta_tables import Tables

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    expected = write_bad_manifest(tmp / "src")
    # Wrong column types in Parquet: `text` is int64 for the whole file.
    pq.write_table(pa.table({"doc_id": ["p1", "p2"], "text": pa.array([1, 2], pa.int64())}),
                   tmp / "src" / "typed.parquet")
    summary = run_ingest(tmp, tmp / "data", "--source", "manifest", "--path", str(tmp / "src"),
                         "--name", "badsrc")
    return tmp, expected, summary, Tables(str(tmp / "data"))


def test_run_completes_and_counts_reconcile(bad_run):
    _, expected, summary, tables = bad_run
    reconcile(summary)
    d = summary["documents"]
    # 3 good (good-text, good-image, the first "dup") + 10 bad JSONL lines + 2 Parquet rows.
    assert d["read"] == 15
    assert d["accepted"] == 3 and d["quarantined"] == 12
    assert summary["quarantine"]["rows_this_run"] == 12 == summary["quarantine"]["inserted"]
    assert tables.read(tables.quarantine).num_rows == 12
    assert set(rows_by_id(tables.read(tables.documents))) == {"good-text", "good-image", "dup"}
    expected_counts = Counter(expected.values()) + Counter({"wrong_type": 2})
    assert d["quarantined_by_reason"] == dict(expected_counts)


@pytest.mark.parametrize(
    ("doc_id", "reason", "stage", "detail_has"),
    [
        ("corrupt", "image_unrecognised", "validate", "not a decodable image"),
        ("truncated", "image_decode_failed", "validate", "truncated"),
        ("bomb", "image_too_large", "validate", "900000000 pixels"),
        ("empty", "missing_content", "validate", "needs"),
        ("wrongtype", "wrong_type", "read", "text must be a string"),
        ("dup", "duplicate_doc_id", "dedupe", "first record in source order wins"),
        ("huge", "text_too_long", "validate", "limits.max_text_chars"),
        ("noimage", "image_missing", "validate", "does-not-exist.png"),
        ("p1", "wrong_type", "read", "column 'text' has Arrow type int64"),
    ],
)
def test_each_bad_record_is_quarantined_with_its_reason(bad_run, doc_id, reason, stage, detail_has):
    _, _, _, tables = bad_run
    rows = [r for r in tables.read(tables.quarantine).to_pylist() if r["doc_id"] == doc_id]
    assert len(rows) == 1, rows
    r = rows[0]
    assert (r["reason"], r["stage"], r["source"]) == (reason, stage, "badsrc")
    assert detail_has in r["detail"]
    assert r["excerpt"] and len(r["excerpt"]) <= 200
    assert r["record_ref"].startswith(("bad.jsonl@", "typed.parquet#row="))


def test_unparseable_lines_are_quarantined_with_an_excerpt(bad_run):
    _, _, _, tables = bad_run
    q = {r["reason"]: r for r in tables.read(tables.quarantine).to_pylist() if r["doc_id"] is None}
    assert q["not_utf8"]["stage"] == "read" and "caf\\xe9" in q["not_utf8"]["excerpt"]
    assert "UTF-8" in q["not_utf8"]["detail"]
    assert q["bad_json"]["excerpt"].startswith('{"doc_id": "broken"')
    # The byte offset in record_ref locates the line in the file.
    tmp = bad_run[0]
    offset = int(q["bad_json"]["record_ref"].split("@")[1])
    assert (tmp / "src" / "bad.jsonl").read_bytes()[offset:].startswith(b'{"doc_id": "broken"')


def test_duplicate_rule_keeps_the_first_record(bad_run):
    _, _, _, tables = bad_run
    docs = rows_by_id(tables.read(tables.documents))
    assert docs["dup"]["text"] == "first of two records with this id"


def test_rerun_adds_no_quarantine_rows_and_no_document_versions(bad_run, tmp_path):
    tmp, _, first, tables = bad_run
    v_docs, v_quarantine = tables.version(tables.documents), tables.version(tables.quarantine)
    again = run_ingest(tmp_path, tmp / "data", "--source", "manifest", "--path", str(tmp / "src"),
                       "--name", "badsrc")
    reconcile(again)
    assert again["documents"]["quarantined_by_reason"] == first["documents"]["quarantined_by_reason"]
    assert again["quarantine"]["inserted"] == 0
    assert (tables.version(tables.documents), tables.version(tables.quarantine)) == (v_docs, v_quarantine)


def test_a_fixed_record_is_accepted_on_the_next_run(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(b"garbage")
    (src / "m.jsonl").write_text(json.dumps({"doc_id": "a", "caption": "c", "image": "a.png"}) + "\n")
    first = run_ingest(tmp_path, tmp_path / "data", "--source", "manifest", "--path", str(src))
    assert first["documents"]["quarantined_by_reason"] == {"image_unrecognised": 1}
    (src / "a.png").write_bytes(image_bytes((3, 3, 3)))
    second = run_ingest(tmp_path, tmp_path / "data", "--source", "manifest", "--path", str(src))
    assert second["documents"]["inserted"] == 1 and second["documents"]["quarantined"] == 0


@pytest.mark.parametrize(("limit", "kind"), [(250_000, "driver"), (0, "ray"), (20, "ray")])
def test_duplicates_across_shards_of_a_bulk_load_keep_the_first(tmp_path, limit, kind):
    """The duplicate rule runs before the writer, so a bulk load (append, no MERGE to
    collapse keys) still stores one row per doc_id: the first in source order — whether the
    accepted ids are kept in the driver, in Ray actors from the start (limit 0), or handed
    to the actors part-way through (limit 20)."""
    src = tmp_path / "src"
    src.mkdir()
    first = [{"doc_id": f"d{i}", "text": f"first record {i}"} for i in range(40)]
    # a.jsonl spans several byte-range shards; its last line repeats d0 from its first shard.
    jsonl(src / "a.jsonl", [*first, {"doc_id": "d0", "text": "a later shard of the same file"}])
    jsonl(src / "b.jsonl", [{"doc_id": f"d{i}", "text": f"second file {i}"} for i in range(0, 40, 3)]
          + [{"doc_id": "only-in-b", "text": "new"}])
    summary = run_ingest(tmp_path, tmp_path / "data", "--source", "manifest", "--path", str(src),
                         "--set", "source.shard_mb=0.0005",  # ~500-byte shards
                         "--set", f"dedupe.distributed_min_records={limit}", "--set", "dedupe.ids_per_shard=10")
    reconcile(summary)
    d = summary["documents"]
    assert summary["shards"] >= 4 and d["write"] == "append" and d["accepted_ids_in"] == kind
    assert d["quarantined_by_reason"] == {"duplicate_doc_id": 1 + 14}
    assert d["inserted"] == d["accepted"] == 41
    tables = Tables(str(tmp_path / "data"))
    ids = tables.read(tables.documents, columns=["doc_id"])["doc_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 41
    docs = rows_by_id(tables.read(tables.documents))
    assert all(docs[f"d{i}"]["text"] == f"first record {i}" for i in range(40))
    dups = [r for r in tables.read(tables.quarantine).to_pylist() if r["reason"] == "duplicate_doc_id"]
    assert sorted(r["record_ref"].split("@")[0] for r in dups) == ["a.jsonl"] + ["b.jsonl"] * 14
