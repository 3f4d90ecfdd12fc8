"""Ingest validation, readers and config without Ray: stage functions called directly."""

from __future__ import annotations

import io
import json
import struct
import zlib
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import cli, ingest
from pipelines.ingest.sources.base import BATCH_ROWS, SHARD_SHIFT, byte_ranges, iter_lines
from pipelines.ingest.sources.manifest import ManifestSource
from pipelines.ingest.sources.synthetic.generator import SyntheticConfig, iter_documents
from pipelines.ingest.sources.synthetic.source import SyntheticSource
from pipelines.ingest.sources.webqa import read_tsv_line
from pipelines.ingest.validation import (
    Limits,
    Rejected,
    content_sha256,
    normalise_image,
    normalise_text,
    quarantine_id,
    validate_batch,
    validate_record,
)
from pipelines.store import delta_tables
from pipelines.store import schema as S

LIMITS = Limits()


def img(mode: str = "RGB", size=(6, 4), fmt: str = "PNG", color=(10, 20, 30), exif_orientation: int | None = None) -> bytes:
    im = Image.new(mode, size, color if mode == "RGB" else (*color, 0) if mode == "RGBA" else 7)
    out = io.BytesIO()
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif
    im.save(out, format=fmt, **kwargs)
    return out.getvalue()


def noise_png() -> bytes:
    rng = np.random.default_rng(0)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "RGB").save(out, format="PNG")
    return out.getvalue()


def png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def raw(**fields) -> dict:
    row = {name: None for name in S.RAW_SCHEMA.names}
    row.update({S.SOURCE: "t", S.RECORD_REF: "f@0", S.SEQ: 0}, **fields)
    return row


# --- text --------------------------------------------------------------------------------


def test_text_is_nfc_normalised_and_cleaned():
    assert normalise_text("Cafe\u0301\r\nline\x00two\x07  ", "text", 100) == "Caf\u00e9\nlinetwo"
    assert normalise_text("  \t ", "text", 100) is None
    assert normalise_text("caf\u00e9".encode(), "text", 100) == "caf\u00e9"


@pytest.mark.parametrize(("value", "reason"), [(b"caf\xe9", "not_utf8"), (12, "wrong_type"),
                                               ("x" * 101, "text_too_long"), ("x" * 1000, "text_too_long")])
def test_text_rejections(value, reason):
    with pytest.raises(Rejected) as e:
        normalise_text(value, "text", 100)
    assert e.value.reason == reason


# --- images ------------------------------------------------------------------------------


def test_upright_rgb_png_and_jpeg_keep_their_bytes():
    for fmt in ("PNG", "JPEG"):
        data = img(fmt=fmt)
        assert normalise_image(data, LIMITS) == (data, 6, 4)


def test_rgba_becomes_rgb_on_white():
    out, w, h = normalise_image(img("RGBA", color=(255, 0, 0)), LIMITS)
    decoded = Image.open(io.BytesIO(out))
    assert decoded.mode == "RGB" and decoded.getpixel((0, 0)) == (255, 255, 255)  # alpha 0 → white


def test_exif_orientation_is_applied():
    out, w, h = normalise_image(img(fmt="JPEG", size=(6, 4), exif_orientation=6), LIMITS)
    assert (w, h) == (4, 6)
    decoded = Image.open(io.BytesIO(out))
    assert decoded.size == (4, 6) and decoded.getexif().get(0x0112, 1) == 1


@pytest.mark.parametrize(
    ("data", "reason", "detail"),
    [
        (png_header(8000, 6000), "image_too_large", "8000x6000"),  # our header check (48 MP > 40 MP)
        (png_header(30000, 30000), "image_too_large", "decompression-bomb"),  # Pillow's guard first
        (b"\x89PNG\r\n\x1a\n garbage", "image_unrecognised", "not a decodable image"),
        (noise_png()[:600], "image_decode_failed", "truncated"),
    ],
)
def test_bad_images_are_rejected_before_or_while_decoding(data, reason, detail):
    with pytest.raises(Rejected) as e:
        normalise_image(data, LIMITS)
    assert e.value.reason == reason and detail in e.value.detail


def test_encoded_size_limit():
    with pytest.raises(Rejected, match="max_image_bytes"):
        normalise_image(img(), Limits(max_image_bytes=10))


# --- hashing -----------------------------------------------------------------------------


def test_content_hash_separates_fields_and_nulls():
    h = content_sha256
    assert h("ab", None, None) != h("a", "b", None)
    assert h("", None, None) != h(None, None, None)
    assert h(None, "c", b"\x00") != h(None, "c", b"\x01")
    assert h("x", "y", b"z") == h("x", "y", b"z")


# --- records -----------------------------------------------------------------------------


def test_modality_is_inferred_and_hash_is_of_normalised_content():
    text = validate_record(raw(doc_id="a", text="Cafe\u0301 "), LIMITS)
    assert (text[S.STATUS], text[S.MODALITY]) == ("ok", "text")
    assert text[S.CONTENT_SHA256] == content_sha256("Caf\u00e9", None, None)
    image = validate_record(raw(doc_id="b", image=img(), caption="c"), LIMITS)
    assert (image[S.MODALITY], image[S.IMAGE_WIDTH], image[S.IMAGE_HEIGHT]) == ("image", 6, 4)


@pytest.mark.parametrize(
    ("fields", "reason", "stage"),
    [
        ({"doc_id": "a"}, "missing_content", "validate"),
        ({"doc_id": "a", "caption": "only a caption"}, "missing_text", "validate"),
        ({"doc_id": "a", "modality": "image", "text": "t"}, "missing_image", "validate"),
        ({"doc_id": "a", "modality": "video", "text": "t"}, "bad_modality", "validate"),
        ({"text": "t"}, "missing_doc_id", "validate"),
        ({"doc_id": " a", "text": "t"}, "bad_doc_id", "validate"),
        ({"doc_id": "a", "image_uri": "/no/such/file.png"}, "image_missing", "validate"),
        ({"error": "bad_json", "error_detail": "d", "raw_excerpt": "{x"}, "bad_json", "read"),
    ],
)
def test_record_rejections(fields, reason, stage):
    out = validate_record(raw(**fields), LIMITS)
    assert (out[S.STATUS], out[S.REASON], out[S.STAGE]) == ("quarantined", reason, stage)
    assert out[S.EXCERPT] and len(out[S.EXCERPT]) <= LIMITS.excerpt_chars
    assert out[S.FINGERPRINT] == validate_record(raw(**fields), LIMITS)[S.FINGERPRINT]


def test_batch_keeps_one_row_per_input_row():
    batch = pa.Table.from_pylist([raw(doc_id="a", text="t"), raw(doc_id="b"), raw(doc_id="c", text="u")],
                                 schema=S.RAW_SCHEMA)
    out = validate_batch(batch, LIMITS)
    assert out.schema == S.VALIDATED_SCHEMA
    assert out[S.STATUS].to_pylist() == ["ok", "quarantined", "ok"]


def test_quarantine_id_is_stable_and_specific():
    a = quarantine_id("s", "f@1", "validate", "r", "fp")
    assert a == quarantine_id("s", "f@1", "validate", "r", "fp")
    assert a != quarantine_id("s", "f@2", "validate", "r", "fp")


# --- readers -----------------------------------------------------------------------------


@pytest.mark.parametrize("shard_bytes", [1, 3, 7, 16, 1000])
@pytest.mark.parametrize("tail", [b"", b"\n"])
def test_byte_range_shards_yield_every_line_exactly_once(tmp_path, shard_bytes, tail):
    lines = [b"alpha", b"", b"b", b"gamma\r", b"delta-delta-delta", b"e"]
    data = b"\n".join(lines) + tail
    (tmp_path / "f").write_bytes(data)
    got = []
    with open(tmp_path / "f", "rb") as f:
        for lo, hi in byte_ranges(len(data), shard_bytes):
            got += list(iter_lines(f, lo, hi))
    assert [line for _, line in got] == [x.rstrip(b"\r") for x in lines]
    assert all(data[off:].startswith(line) for off, line in got)


def test_tsv_line_read_by_offset(tmp_path):
    (tmp_path / "imgs.tsv").write_bytes(b"1\tAAAA\n22\tBBBB\n333\tCCCC")
    with open(tmp_path / "imgs.tsv", "rb") as f:
        assert read_tsv_line(f, 7) == b"22\tBBBB"
        assert read_tsv_line(f, 15) == b"333\tCCCC"


def _read_all(source: ManifestSource) -> list[dict]:
    rows = []
    for i, spec in enumerate(source.plan()):
        for table in source.read(i, spec):
            rows += table.to_pylist()
    return rows


def test_manifest_jsonl_types(tmp_path):
    lines = [{"doc_id": 7, "text": "int id"}, {"doc_id": True, "text": "bool id"},
             {"doc_id": "x", "text": "t", "image": 5}, {"doc_id": "y", "text": "t", "extra": [1, 2]}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    rows = _read_all(ManifestSource(str(tmp_path / "m.jsonl")))
    assert rows[0]["doc_id"] == "7" and rows[0]["error"] is None
    assert rows[1]["error"] == "wrong_type" and rows[2]["error"] == "wrong_type"
    assert json.loads(rows[3]["metadata"]) == {"extra": [1, 2]}
    assert [r["seq"] for r in rows] == sorted(r["seq"] for r in rows)


def test_manifest_parquet_wrong_column_type(tmp_path):
    pq.write_table(pa.table({"doc_id": ["a", "b"], "caption": pa.array([1.5, 2.5])}), tmp_path / "m.parquet")
    rows = _read_all(ManifestSource(str(tmp_path / "m.parquet")))
    assert [(r["doc_id"], r["error"]) for r in rows] == [("a", "wrong_type"), ("b", "wrong_type")]
    assert "column 'caption' has Arrow type double" in rows[0]["error_detail"]


# --- config and CLI ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "webqa"], "needs source.path"),
        (["--path", "/x"], "not used by the synthetic source"),
        (["--source", "webqa", "--path", "/x", "--image-mode", "uri"], "use inline"),
        (["--set", "limits.max_text_chars=0"], "limits.max_text_chars"),
        (["--set", "nope=1"], "nope"),
        (["--source", "manifest", "--path", "/definitely/not/here.jsonl"], "does not exist"),
        (["--storage-option", "aws_access_key_id=AKIA"], "environment"),
    ],
)
def test_bad_config_fails_before_ray(args, message, tmp_path):
    with pytest.raises(SystemExit) as e:
        ingest.main([*args, "--run-dir", str(tmp_path)])
    assert message in str(e.value)
    assert not list(tmp_path.iterdir())


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["ingest", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for action in ingest._parser()._actions:
        for flag in action.option_strings:
            assert flag in text
    for key in ("source.kind", "source.shard_mb", "source.synthetic.num_image_docs", "  storage_options = ",
                "limits.max_image_pixels", "ray.temp_dir", "ray.object_store_mb", "output.target_file_mb"):
        assert key in text


# --- synthetic reader and the bulk load (no Ray: the stage functions and real Delta tables) --


def test_synthetic_reader_builds_raw_rows_column_by_column():
    cfg = SyntheticConfig(seed=5, num_image_docs=500, num_text_docs=300, num_queries=(0, 0, 0), image_size=16)
    source = SyntheticSource(cfg, rows_per_shard=600, with_queries=False)  # > BATCH_ROWS per shard
    shards = source.plan()
    tables = [t for i, spec in enumerate(shards) for t in source.read(i, spec)]
    assert all(t.schema == S.RAW_SCHEMA and t.num_rows <= BATCH_ROWS for t in tables)
    rows = pa.concat_tables(tables).to_pylist()
    generated = list(iter_documents(cfg))
    assert len(rows) == len(generated) == 800
    # Every record keeps its global index as its reference, and a unique seq in source order.
    assert [r[S.RECORD_REF] for r in rows] == [f"synthetic:{i}" for i in range(800)]
    assert [r[S.SEQ] for r in rows] == [(i // 600 << SHARD_SHIFT) | (i % 600) for i in range(800)]
    for r, g in zip(rows, generated):
        assert (r[S.DOC_ID], r[S.MODALITY], r[S.IMAGE], r[S.METADATA]) == (
            g["doc_id"], g["modality"], g["image"], g["attributes"])
        assert r[S.TEXT] == (g["text"] or None) and r[S.CAPTION] == (g["caption"] or None)
        assert r[S.ERROR] is None and r[S.IMAGE_URI] is None


def _documents(ids: list[str], text: str = "t") -> pa.RecordBatchReader:
    now = datetime.now(timezone.utc)
    n = len(ids)
    table = pa.table({
        S.DOC_ID: ids, S.MODALITY: ["text"] * n, S.TEXT: [f"{text} {i}" for i in ids], S.CAPTION: [None] * n,
        S.IMAGE: pa.nulls(n, pa.binary()), S.IMAGE_URI: [None] * n, S.IMAGE_WIDTH: pa.nulls(n, pa.int32()),
        S.IMAGE_HEIGHT: pa.nulls(n, pa.int32()), S.METADATA: [None] * n,
        S.CONTENT_SHA256: [content_sha256(f"{text} {i}", None, None) for i in ids],
        S.SOURCE: ["s"] * n, S.RECORD_REF: [f"f@{i}" for i in ids], S.RUN_ID: ["r"] * n,
        S.INGESTED_AT: [now] * n,
    }, schema=S.DOCUMENTS_SCHEMA)
    return pa.RecordBatchReader.from_batches(S.DOCUMENTS_SCHEMA, table.to_batches(max_chunksize=3))


def test_empty_documents_table_is_bulk_loaded_then_merged(tmp_path):
    tables = delta_tables.Tables(str(tmp_path))
    # Nothing accepted on a first ingest: the (created) table gets no commit.
    empty = delta_tables.write_documents(tables, _documents([]))
    assert empty["write"] == "append" and empty["num_target_rows_inserted"] == 0
    assert tables.version(tables.documents) == 0
    first = delta_tables.write_documents(tables, _documents(["a", "b", "c", "d", "e"]))
    assert first["write"] == "append" and first["num_target_rows_inserted"] == 5
    assert tables.version(tables.documents) == 1
    assert tables.open(tables.documents).history(1)[0]["operation"] == "WRITE"
    cdf = tables.changes(tables.documents, starting_version=1).to_pylist()
    assert sorted((r["_change_type"], r["doc_id"]) for r in cdf) == [("insert", i) for i in "abcde"]
    # Rows exist now: the same documents plus one new and one changed are merged, not appended.
    second = delta_tables.write_documents(tables, _documents(["a", "b", "c", "d", "e", "f"]))
    assert second["write"] == "merge" and second["num_target_rows_inserted"] == 1
    ids = tables.read(tables.documents, columns=[S.DOC_ID])[S.DOC_ID].to_pylist()
    assert sorted(ids) == list("abcdef")


def test_two_bulk_loads_racing_on_one_empty_table_cannot_both_commit(tmp_path):
    tables = delta_tables.Tables(str(tmp_path))
    tables.ensure(tables.documents, S.DOCUMENTS_SCHEMA)
    # Both saw the empty version 0 (two ingests started together).
    one, two = tables.open(tables.documents), tables.open(tables.documents)
    assert delta_tables.append_documents(one, _documents(["a", "b"]))["num_target_rows_inserted"] == 2
    with pytest.raises(RuntimeError, match="re-run this ingest"):
        delta_tables.append_documents(two, _documents(["a", "b"], text="other"))
    rows = tables.read(tables.documents, columns=[S.DOC_ID, S.TEXT]).to_pylist()
    assert sorted((r[S.DOC_ID], r[S.TEXT]) for r in rows) == [("a", "t a"), ("b", "t b")]


@pytest.mark.parametrize(("docs", "explicit", "shards"), [
    (3_000, None, 6),  # small: at least 500 documents a shard
    (20_000, None, 8),  # ~8 shards
    (100_000, None, 10),  # large: at most 10,000 documents a shard
    (100_000, 2_000, 50),  # a configured size is kept
])
def test_synthetic_shard_size(docs, explicit, shards):
    cfg = SyntheticConfig(seed=0, num_image_docs=docs // 2, num_text_docs=docs - docs // 2, num_queries=(0, 0, 0))
    plan = SyntheticSource(cfg, rows_per_shard=explicit, with_queries=False).plan()
    assert len(plan) == shards
    assert plan[0]["start"] == 0 and plan[-1]["stop"] == docs
    assert all(a["stop"] == b["start"] for a, b in zip(plan, plan[1:]))
