"""WebDataset source without Ray: shard lists (folder, glob, brace range), sample grouping,
metadata, corrupt members and truncated shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from pipelines.ingest.sources.webdataset import WebDatasetSource, expand_braces, split_key
from pipelines.ingest.validation import Limits, validate_batch
from pipelines.store import schema as S


def png(color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> Path:
    """``samples``: ``{"__key__": ..., "<ext>": bytes}`` in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def rows(src: WebDatasetSource) -> list[dict]:
    out = []
    for i, spec in enumerate(src.plan()):
        for t in src.read(i, spec):
            out += t.to_pylist()
    return out


def test_expand_braces_and_keys():
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("{8..10}-{a,b}") == ["8-a", "8-b", "9-a", "9-b", "10-a", "10-b"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="backwards"):
        expand_braces("{5..1}")
    with pytest.raises(ValueError, match="neither"):
        expand_braces("{x}")
    assert split_key("dir/abc.seg.JPG") == ("dir/abc", "seg.jpg")
    assert split_key("abc") == ("abc", "")


def test_samples_fields_metadata_and_ids(tmp_path):
    write_tar(tmp_path / "wds" / "shard-0.tar", [
        {"__key__": "a", "jpg": png(), "txt": b"a red square", "json": json.dumps({"lang": "en"}).encode()},
        {"__key__": "b", "png": png(), "json": json.dumps({"doc_id": "own-id", "caption": "from json",
                                                           "w": 8}).encode(), "cls": b"3"},
        {"__key__": "c", "json": json.dumps({"id": 7, "text": "only text"}).encode()},
    ])
    src = WebDatasetSource(str(tmp_path / "wds"))
    got = rows(src)
    assert [r["doc_id"] for r in got] == ["shard-0/a", "own-id", "7"]
    assert [r["record_ref"] for r in got] == ["shard-0.tar#a", "shard-0.tar#b", "shard-0.tar#c"]
    a, b, c = got
    assert a["caption"] == "a red square" and a["image"] == png() and json.loads(a["metadata"]) == {"lang": "en"}
    assert b["caption"] == "from json" and json.loads(b["metadata"]) == {"w": 8, "ignored_members": ["b.cls"]}
    assert c["text"] == "only text" and c["image"] is None and c["error"] is None


def test_shard_lists_folder_glob_brace(tmp_path):
    for i in range(3):
        write_tar(tmp_path / "s" / f"{i:05d}.tar", [{"__key__": f"k{i}", "txt": b"t", "png": png()}])
    (tmp_path / "s" / "notes.md").write_text("not a shard")
    base = tmp_path / "s"
    assert len(WebDatasetSource(str(base)).shard_uris()) == 3
    assert [Path(u).name for u in WebDatasetSource(f"{base}/0000[02].tar").shard_uris()] == ["00000.tar", "00002.tar"]
    brace = WebDatasetSource(f"{base}/{{00000..00001}}.tar", shards_per_task=2)
    assert [Path(u).name for u in brace.shard_uris()] == ["00000.tar", "00001.tar"]
    assert len(brace.plan()) == 1 and [r["doc_id"] for r in rows(brace)] == ["00000/k0", "00001/k1"]
    with pytest.raises(FileNotFoundError):
        WebDatasetSource(f"{base}/*.tgz").shard_uris()
    missing = WebDatasetSource(f"{base}/{{00002..00003}}.tar")
    got = rows(missing)
    assert [r["error"] for r in got] == [None, "shard_unreadable"]


def test_corrupt_members_quarantine_their_sample(tmp_path):
    write_tar(tmp_path / "w" / "x.tar", [
        {"__key__": "good", "png": png(), "txt": b"fine"},
        {"__key__": "badimg", "jpg": b"\xff\xd8 not a jpeg", "txt": b"corrupt image"},
        {"__key__": "badjson", "png": png(), "json": b"{nope"},
        {"__key__": "badtxt", "png": png(), "txt": b"\xff\xfe"},
        {"__key__": "nothing", "cls": b"1"},
    ])
    raw = rows(WebDatasetSource(str(tmp_path / "w")))
    assert [r["error"] for r in raw] == [None, None, "bad_json", "not_utf8", "missing_content"]
    import pyarrow as pa

    validated = validate_batch(pa.Table.from_pylist(raw, schema=S.RAW_SCHEMA), Limits()).to_pylist()
    assert [(v["status"], v["reason"]) for v in validated] == [
        ("ok", None), ("quarantined", "image_unrecognised"), ("quarantined", "bad_json"),
        ("quarantined", "not_utf8"), ("quarantined", "missing_content")]


def test_truncated_shard_keeps_what_it_read(tmp_path):
    samples = [{"__key__": f"s{i}", "png": png((i * 40, 0, 0)), "txt": f"sample {i}".encode()} for i in range(5)]
    full = write_tar(tmp_path / "t" / "cut.tar", samples).read_bytes()
    # Cut inside the fourth sample's image: three samples survive, the fourth is lost.
    cut_at = full.index(b"s3.png") + 512 + 20
    (tmp_path / "t" / "cut.tar").write_bytes(full[:cut_at])
    raw = rows(WebDatasetSource(str(tmp_path / "t")))
    assert [r["doc_id"] for r in raw] == ["cut/s0", "cut/s1", "cut/s2", "cut/s3"]
    assert [r["error"] for r in raw] == [None, None, None, "shard_truncated"]
    assert "samples before it were kept" in raw[3]["error_detail"]
    (tmp_path / "t" / "cut.tar").write_bytes(b"this is not a tar file at all" * 40)
    raw = rows(WebDatasetSource(str(tmp_path / "t")))
    assert [r["error"] for r in raw] == ["shard_unreadable"]


def test_member_over_the_cap_is_not_kept(tmp_path):
    write_tar(tmp_path / "m" / "big.tar", [{"__key__": "big", "png": png(), "txt": b"x" * 5000},
                                           {"__key__": "ok", "png": png()}])
    raw = rows(WebDatasetSource(str(tmp_path / "m"), max_member_bytes=1000))
    assert [r["error"] for r in raw] == ["member_too_large", None]
    assert raw[0]["image"] is None
