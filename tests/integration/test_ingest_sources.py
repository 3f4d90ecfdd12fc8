"""Every source round-trips through a real local Ray into real Delta tables; re-ingest is a
no-op; three changed records are exactly three updates in the change data feed."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest
from ingest_fixtures import (
    WEBQA_IMAGES,
    WEBQA_TEXTS,
    image_bytes,
    jsonl,
    write_edis,
    write_folder,
    write_manifest_jsonl,
    write_manifest_parquet,
    write_webqa,
)
from ingest_helpers import reconcile, rows_by_id, run_ingest
from PIL import Image

from pipelines.ingest.sources.synthetic.generator import (
    SyntheticConfig,
    generate_queries,
    iter_documents,
    write_qrels,
)
from pipelines.ingest.validation import content_sha256
from pipelines.store.delta_tables import Tables

pytestmark = pytest.mark.usefixtures("ray_local")


def pixels(data: bytes) -> tuple:
    img = Image.open(io.BytesIO(data))
    return img.mode, img.size, img.getpixel((0, 0))


def test_webqa_round_trip_with_parallel_tsv_reads(tmp_path):
    expected = write_webqa(tmp_path / "webqa")
    # A tiny shard size splits all_docs.json and all_imgs.json into many byte ranges, so
    # images are fetched from imgs.tsv by several tasks, each by offset.
    summary = run_ingest(tmp_path, tmp_path / "data", "--source", "webqa", "--path",
                         str(tmp_path / "webqa"), "--set", "source.shard_mb=0.0001")
    assert summary["shards"] > 4
    reconcile(summary)
    assert summary["documents"]["inserted"] == 6 and summary["documents"]["quarantined"] == 0
    tables = Tables(str(tmp_path / "data"))
    docs = rows_by_id(tables.read(tables.documents))
    assert set(docs) == set(WEBQA_TEXTS) | {str(k) for k in WEBQA_IMAGES}
    for snippet, fact in WEBQA_TEXTS.items():
        row = docs[snippet]
        assert row["modality"] == "text" and row["text"] == fact and row["image"] is None
        assert json.loads(row["metadata"])["title"].startswith("title")
        assert row["content_sha256"] == content_sha256(fact, None, None)
        assert row["record_ref"].startswith("all_docs.json@")
    for image_id, (color, caption) in WEBQA_IMAGES.items():
        row = docs[str(image_id)]
        assert row["modality"] == "image" and row["caption"] == caption
        assert row["image"] == expected["images"][image_id]  # upright RGB JPEG: bytes kept
        mode, size, pixel = pixels(row["image"])
        assert mode == "RGB" and size == (row["image_width"], row["image_height"]) == (12, 8)
        assert all(abs(a - b) <= 8 for a, b in zip(pixel, color))  # JPEG: close to the colour
        assert "imgs.tsv@" in row["record_ref"]
    train = rows_by_id(tables.read(tables.queries("train")), "qid")
    assert train["q-train-2"]["query"] == "What colour is the barn?"
    assert json.loads(train["q-train-2"]["answer"]) == ["red"]
    assert json.loads(train["q-train-1"]["metadata"])["txt_negFacts"] == [list(WEBQA_TEXTS)[2]]
    qrels = {(r["qid"], r["doc_id"]) for r in tables.read(tables.qrels("train")).to_pylist()}
    assert qrels == {("q-train-1", list(WEBQA_TEXTS)[0]), ("q-train-2", "30000001")}
    test_qrels = tables.read(tables.qrels("test")).to_pylist()
    assert [(r["qid"], r["doc_id"], r["relevance"]) for r in test_qrels] == [("q-test-1", "30000003", 1)]
    assert summary["queries"]["dev"]["accepted"] == 1


def test_edis_round_trip(tmp_path):
    expected = write_edis(tmp_path / "edis")
    summary = run_ingest(tmp_path, tmp_path / "data", "--source", "edis", "--path", str(tmp_path / "edis"))
    reconcile(summary)
    tables = Tables(str(tmp_path / "data"))
    docs = rows_by_id(tables.read(tables.documents))
    assert set(docs) == {"0", "1", "2"}
    assert docs["1"]["caption"] == "Parliament votes on budget"
    assert docs["1"]["image"] == expected["images"]["1"]
    assert json.loads(docs["1"]["metadata"]) == {"image": "00000001_04631_01.jpg"}
    for split, qid, relevant in (("train", "100", "0"), ("dev", "200", "1"), ("test", "300", "2")):
        q = rows_by_id(tables.read(tables.queries(split)), "qid")
        assert list(q) == [qid]
        assert json.loads(q[qid]["metadata"])["candidate_scores"][relevant] == 3
        qrels = tables.read(tables.qrels(split)).to_pylist()
        # Every graded candidate is kept (relevance = score - 2): only score 3 is relevant.
        graded = {r["doc_id"]: r["relevance"] for r in qrels if r["qid"] == qid}
        scores = {str(c["candidate_id"]): c["score"] for c in expected["splits"][split][0]["candidates"]}
        assert graded == {d: s - 2 for d, s in scores.items()}
        assert [d for d, r in graded.items() if r > 0] == [relevant]


def test_manifest_jsonl_and_parquet_round_trip(tmp_path):
    rows = write_manifest_jsonl(tmp_path / "m")
    write_manifest_parquet(tmp_path / "m" / "more.parquet")  # two row groups
    summary = run_ingest(tmp_path, tmp_path / "data", "--source", "manifest", "--path", str(tmp_path / "m"))
    reconcile(summary)
    assert summary["documents"]["inserted"] == 13
    docs = rows_by_id(Tables(str(tmp_path / "data")).read(Tables(str(tmp_path / "data")).documents))
    for r in rows:
        d = docs[r["doc_id"]]
        assert json.loads(d["metadata"]) == {"lang": "en", "rank": r["rank"]}
        if "image" in r:
            assert d["modality"] == "image" and d["caption"] == r["caption"]
            assert d["image"] == (tmp_path / "m" / r["image"]).read_bytes()
        else:
            assert d["modality"] == "text" and d["text"] == r["text"]
    # Parquet: integer ids become strings, inline bytes stay inline, a missing text row is
    # an image row (it has an image).
    assert docs["1"]["text"] == "first text" and docs["1"]["record_ref"] == "more.parquet#row=0"
    assert docs["2"]["modality"] == "image" and docs["2"]["image"] == image_bytes((5, 6, 7))
    assert docs["3"]["record_ref"] == "more.parquet#row=2"


def test_manifest_uri_mode_keeps_uris(tmp_path):
    write_manifest_jsonl(tmp_path / "m", n=4)
    run_ingest(tmp_path, tmp_path / "data", "--source", "manifest", "--path",
               str(tmp_path / "m" / "docs.jsonl"), "--image-mode", "uri")
    tables = Tables(str(tmp_path / "data"))
    docs = rows_by_id(tables.read(tables.documents))
    assert docs["m0"]["image"] is None
    assert docs["m0"]["image_uri"] == str(tmp_path / "m" / "img" / "0.png")
    assert docs["m0"]["content_sha256"] == content_sha256(
        None, "picture 0", (tmp_path / "m" / "img" / "0.png").read_bytes())


def test_folder_round_trip(tmp_path):
    files = write_folder(tmp_path / "f")
    summary = run_ingest(tmp_path, tmp_path / "data", "--source", "folder", "--path", str(tmp_path / "f"))
    reconcile(summary)
    docs = rows_by_id(Tables(str(tmp_path / "data")).read(Tables(str(tmp_path / "data")).documents))
    assert set(docs) == set(files)
    assert docs["cats/001"]["caption"] == "a black cat" and docs["cats/002"]["caption"] == "a grey cat"
    assert docs["dog"]["caption"] is None and docs["dog"]["image"] == files["dog"]


def test_synthetic_round_trip_matches_the_generator(tmp_path):
    summary = run_ingest(tmp_path, tmp_path / "data", "--preset", "tiny")
    reconcile(summary)
    cfg = SyntheticConfig(seed=0, num_image_docs=200, num_text_docs=60, num_queries=(60, 20, 20), image_size=32)
    tables = Tables(str(tmp_path / "data"))
    docs = rows_by_id(tables.read(tables.documents))
    generated = list(iter_documents(cfg))
    assert len(docs) == len(generated) == summary["documents"]["inserted"] == 260
    for g in generated[::37]:
        d = docs[g["doc_id"]]
        assert d["modality"] == g["modality"] and d["image"] == g["image"]
        assert (d["text"] or "") == g["text"] and (d["caption"] or "") == g["caption"]
        assert json.loads(d["metadata"]) == json.loads(g["attributes"])
    queries = generate_queries(cfg)
    for split in ("train", "dev", "test"):
        got = {(r["qid"], r["doc_id"]) for r in tables.read(tables.qrels(split)).to_pylist()}
        assert got == {(q, d) for q, d, _ in write_qrels(queries[split])}


def test_reingest_is_a_noop_and_three_changes_are_three_updates(tmp_path):
    src = tmp_path / "m"
    rows = write_manifest_jsonl(src, n=10)
    first = run_ingest(tmp_path, tmp_path / "data", "--source", "manifest", "--path", str(src))
    tables = Tables(str(tmp_path / "data"))
    v1 = tables.version(tables.documents)
    assert first["documents"]["inserted"] == 10
    # A first ingest is a bulk load: one append commit that the change feed reads as inserts.
    assert first["documents"]["write"] == "append" and v1 == 1
    inserted = tables.changes(tables.documents, starting_version=0).to_pylist()
    assert sorted((r["_change_type"], r["_commit_version"], r["doc_id"]) for r in inserted) == sorted(
        ("insert", 1, f"m{i}") for i in range(10))

    again = run_ingest(tmp_path, tmp_path / "data", "--source", "manifest", "--path", str(src))
    assert again["documents"]["write"] == "merge"  # rows exist now: compared, not appended
    assert tables.version(tables.documents) == v1  # nothing committed
    assert (again["documents"]["inserted"], again["documents"]["updated"], again["documents"]["unchanged"]) == (0, 0, 10)

    # Change 3 records: a text, a caption and an image's pixels; touch only metadata of a 4th.
    rows[1]["text"] = "document number one, revised"
    rows[2]["caption"] = "picture two, recaptioned"
    (src / rows[4]["image"]).write_bytes(image_bytes((9, 9, 9)))
    rows[3]["rank"] = 300
    jsonl(src / "docs.jsonl", rows)
    changed = run_ingest(tmp_path, tmp_path / "data", "--source", "manifest", "--path", str(src))
    reconcile(changed)
    assert (changed["documents"]["inserted"], changed["documents"]["updated"], changed["documents"]["unchanged"]) == (0, 3, 7)
    cdf = tables.changes(tables.documents, starting_version=v1 + 1)
    kinds = sorted((r["_change_type"], r["doc_id"]) for r in cdf.to_pylist())
    assert kinds == sorted([(k, d) for d in ("m1", "m2", "m4") for k in ("update_preimage", "update_postimage")])
    post = {r["doc_id"]: r for r in cdf.to_pylist() if r["_change_type"] == "update_postimage"}
    assert post["m1"]["text"] == "document number one, revised"
    assert pixels(post["m4"]["image"])[2] == (9, 9, 9)


def test_parquet_manifest_reads_by_row_group(tmp_path):
    write_manifest_parquet(tmp_path / "one.parquet")
    assert pq.ParquetFile(tmp_path / "one.parquet").metadata.num_row_groups == 2
    summary = run_ingest(tmp_path, tmp_path / "data", "--source", "manifest", "--path", str(tmp_path / "one.parquet"))
    assert summary["shards"] == 2 and summary["documents"]["inserted"] == 3



def test_full_snapshot_deletes_only_what_the_source_dropped(tmp_path):
    src = tmp_path / "m"
    rows = write_manifest_jsonl(src, n=6)
    run_ingest(tmp_path, tmp_path / "data", "--source", "manifest", "--path", str(src))
    tables = Tables(str(tmp_path / "data"))
    v1 = tables.version(tables.documents)
    jsonl(src / "docs.jsonl", rows[:4])
    plain = run_ingest(tmp_path, tmp_path / "data", "--source", "manifest", "--path", str(src))
    assert plain["documents"]["deleted"] == 0 and tables.version(tables.documents) == v1
    snap = run_ingest(tmp_path, tmp_path / "data", "--source", "manifest", "--path", str(src), "--full-snapshot")
    assert snap["documents"]["deleted"] == 2
    assert set(rows_by_id(tables.read(tables.documents))) == {"m0", "m1", "m2", "m3"}
    cdf = tables.changes(tables.documents, starting_version=v1 + 1).to_pylist()
    assert sorted((r["_change_type"], r["doc_id"]) for r in cdf) == [("delete", "m4"), ("delete", "m5")]
