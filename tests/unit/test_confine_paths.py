"""Confinement (``pipelines.ingest.confine``) and the readers that use it, without Ray: a
source reads only regular files inside its roots, after resolving symlinks; anything else
is a quarantined record whose rows carry none of the file's bytes."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from confinement_fixtures import SECRET, fails_if_blocked, make_outside, png

from pipelines.ingest.confine import (
    NOT_A_REGULAR_FILE,
    OUTSIDE_ROOT,
    UNSUPPORTED_URI,
    Refused,
    Roots,
    walk,
)
from pipelines.ingest.sources import EDISSource, FolderSource, ManifestSource
from pipelines.ingest.validation import Limits, validate_batch


@pytest.fixture(autouse=True)
def no_hang():
    with fails_if_blocked(60, "a reader"):
        yield


@pytest.fixture
def outside(tmp_path) -> Path:
    return make_outside(tmp_path, png())


def read_rows(source) -> list[dict]:
    rows = []
    for i, spec in enumerate(source.plan()):
        for table in source.read(i, json.loads(json.dumps(spec))):  # specs travel as JSON
            rows += table.to_pylist()
    return rows


def validated(source, rows: list[dict]) -> list[dict]:
    from pipelines.store import schema as S

    table = pa.Table.from_pylist(rows, schema=S.RAW_SCHEMA)
    return validate_batch(table, Limits(), source.image_mode, source.storage_options).to_pylist()


def assert_no_secret(rows: list[dict]) -> None:
    for r in rows:
        for k, v in r.items():
            if isinstance(v, (bytes, str)):
                raw = v if isinstance(v, bytes) else v.encode()
                assert SECRET not in raw and b"TOP-SECRET" not in raw, (k, r)


# --- Roots ------------------------------------------------------------------------------


def test_roots_resolve_inside_and_refuse_outside(tmp_path, outside):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.png").write_bytes(png())
    os.symlink(outside / "secret.png", src / "link.png")
    os.symlink(src / "a.png", src / "sub" / "alias.png")
    roots = Roots.of(str(src))
    assert roots.resolve(str(src / "sub" / ".." / "a.png")) == str((src / "a.png").resolve())
    assert roots.resolve(str(src / "sub" / "alias.png")) == str((src / "a.png").resolve())
    assert roots.resolve(f"file://{src}/a.png") == str((src / "a.png").resolve())
    for bad in (str(src / ".." / "outside" / "secret.png"), str(outside / "secret.png"),
                str(src / "link.png"), f"file://{outside}/secret.png", "/etc/passwd", str(tmp_path)):
        with pytest.raises(Refused) as e:
            roots.resolve(bad)
        assert e.value.reason == OUTSIDE_ROOT and "--allow-root" in e.value.detail
    # A sibling whose name starts like the root is not inside it.
    (tmp_path / "src2").mkdir()
    with pytest.raises(Refused):
        roots.resolve(str(tmp_path / "src2" / "x.png"))
    assert Roots.of(str(src), extra=[str(outside)]).resolve(str(src / "link.png")) == str(outside / "secret.png")


@pytest.mark.parametrize("uri", ["ftp://host/a.png", "gs://bucket/a.png", "file://otherhost/etc/passwd",
                                 "data://x", "/tmp/a\x00b.png"])
def test_unsupported_uris_are_refused(tmp_path, uri):
    with pytest.raises(Refused) as e:
        Roots.of(str(tmp_path), "/tmp").resolve(uri)
    assert e.value.reason == UNSUPPORTED_URI


def test_object_store_prefixes_are_roots():
    roots = Roots.of("s3://bucket/corpus/", "/nonexistent-local-root")
    assert roots.resolve("s3://bucket/corpus/img/a.png") == "s3://bucket/corpus/img/a.png"
    assert roots.resolve("s3a://bucket/corpus/./img/../b.png") == "s3://bucket/corpus/b.png"
    for bad in ("s3://bucket/corpus/../private/k.png", "s3://bucket/corpus2/a.png",
                "s3://other/corpus/a.png", "s3://bucket/a.png"):
        with pytest.raises(Refused) as e:
            roots.resolve(bad)
        assert e.value.reason == OUTSIDE_ROOT


def test_special_files_are_never_opened(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "pipe.png")
    os.symlink("/dev/zero", src / "zero.png")  # a device outside the roots
    roots = Roots.of(str(src), extra=["/dev"])  # even allowed, a device is not a regular file
    for name in ("pipe.png", "zero.png"):
        with pytest.raises(Refused) as e:
            roots.read(str(src / name))
        assert e.value.reason == NOT_A_REGULAR_FILE
    with pytest.raises(Refused) as e:
        roots.read(str(src))
    assert e.value.reason == NOT_A_REGULAR_FILE
    assert roots.read(str(src / "missing.png")) == (str(src / "missing.png"), None)


def test_walk_does_not_follow_symlinked_folders(tmp_path, outside):
    src = tmp_path / "src"
    (src / "cats").mkdir(parents=True)
    (src / "cats" / "1.png").write_bytes(png())
    os.symlink(outside, src / "elsewhere")
    os.symlink(src / "cats", src / "cats-again")
    os.symlink(outside / "secret.txt", src / "cats" / "1.txt")
    os.mkfifo(src / "fifo.png")
    entries = {e.rel: e for e in walk(str(src), Roots.of(str(src)))}
    assert set(entries) == {"cats/1.png", "cats/1.txt", "elsewhere", "fifo.png"}
    assert entries["cats/1.png"].refused is None
    assert entries["cats/1.txt"].refused.reason == OUTSIDE_ROOT
    assert entries["elsewhere"].refused.reason == OUTSIDE_ROOT and entries["elsewhere"].folder_link
    assert entries["fifo.png"].refused.reason == NOT_A_REGULAR_FILE


# --- folder -----------------------------------------------------------------------------


def test_folder_source_quarantines_what_lies_outside(tmp_path, outside):
    src = tmp_path / "src"
    (src / "cats").mkdir(parents=True)
    (src / "cats" / "ok.png").write_bytes(png())
    (src / "cats" / "ok.txt").write_text("a fine cat")
    (src / "cats" / "stolen.png").write_bytes(png())
    os.symlink(outside / "secret.txt", src / "cats" / "stolen.txt")  # caption from elsewhere
    os.symlink(outside / "secret.png", src / "passwd.png")
    os.symlink(outside, src / "linked-dir")  # holds real.png: never walked
    os.mkfifo(src / "pipe.png")
    os.symlink(src / "cats" / "ok.png", src / "alias.png")  # inside: fine
    source = FolderSource(str(src))
    rows = read_rows(source)
    by_ref = {r["record_ref"]: r for r in rows}
    assert set(by_ref) == {"alias.png", "cats/ok.png", "cats/stolen.png", "linked-dir", "passwd.png",
                           "pipe.png"}
    assert [by_ref[k]["error"] for k in ("cats/stolen.png", "linked-dir", "passwd.png", "pipe.png")] == [
        OUTSIDE_ROOT, OUTSIDE_ROOT, OUTSIDE_ROOT, NOT_A_REGULAR_FILE]
    assert by_ref["cats/ok.png"]["caption"] == "a fine cat" and by_ref["alias.png"]["error"] is None
    assert_no_secret(rows)
    out = {r["record_ref"]: r for r in validated(source, rows)}
    assert out["cats/ok.png"]["status"] == "ok" and out["alias.png"]["status"] == "ok"
    assert {k: out[k]["reason"] for k in out if out[k]["status"] != "ok"} == {
        "cats/stolen.png": OUTSIDE_ROOT, "linked-dir": OUTSIDE_ROOT, "passwd.png": OUTSIDE_ROOT,
        "pipe.png": NOT_A_REGULAR_FILE}
    assert_no_secret(list(out.values()))


def test_folder_allow_roots_admit_a_linked_file(tmp_path, outside):
    src = tmp_path / "src"
    src.mkdir()
    os.symlink(outside / "real.png", src / "shared.png")
    assert read_rows(FolderSource(str(src)))[0]["error"] == OUTSIDE_ROOT
    rows = read_rows(FolderSource(str(src), allow_roots=[str(outside)]))
    assert rows[0]["error"] is None and rows[0]["image"] == png()


def test_folder_uri_mode_stores_the_resolved_uri(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(png())
    (row,) = read_rows(FolderSource(str(src), image_mode="uri"))
    assert row["image_uri"] == str((src / "a.png").resolve()) and row["image"] == png()


# --- manifest ---------------------------------------------------------------------------


def write_manifest(src: Path, outside: Path) -> dict[str, str | None]:
    """A manifest with one record per failure class; returns doc_id → expected reason."""
    (src / "img").mkdir(parents=True)
    (src / "img" / "good.png").write_bytes(png())
    os.symlink(outside / "secret.png", src / "img" / "sneaky.png")
    os.mkfifo(src / "img" / "pipe.png")
    cases = {
        "good": ("img/good.png", None),
        "good-abs": (str(src / "img" / "good.png"), None),
        "dotdot": ("../outside/secret.png", OUTSIDE_ROOT),
        "absolute": (str(outside / "secret.png"), OUTSIDE_ROOT),
        "file-uri": (f"file://{outside}/secret.png", OUTSIDE_ROOT),
        "etc": ("/etc/passwd", OUTSIDE_ROOT),
        "symlink": ("img/sneaky.png", OUTSIDE_ROOT),
        "fifo": ("img/pipe.png", NOT_A_REGULAR_FILE),
        "folder": ("img", NOT_A_REGULAR_FILE),
        "http": ("http://127.0.0.1:9/a.png", "url_not_fetched"),
        "https": ("HTTPS://example.invalid/a.png", "url_not_fetched"),
        "ftp": ("ftp://example.invalid/a.png", UNSUPPORTED_URI),
        "missing": ("img/nope.png", "image_missing"),
    }
    lines = [json.dumps({"doc_id": d, "caption": f"caption {d}", "image": img}) for d, (img, _) in cases.items()]
    (src / "m.jsonl").write_text("\n".join(lines) + "\n")
    return {d: reason for d, (_, reason) in cases.items()}


def test_manifest_image_paths_are_confined(tmp_path, outside):
    src = tmp_path / "src"
    expected = write_manifest(src, outside)
    source = ManifestSource(str(src / "m.jsonl"))
    rows = read_rows(source)
    assert_no_secret(rows)
    out = {r["doc_id"]: r for r in validated(source, rows)}
    assert len(out) == len(expected)
    for doc_id, reason in expected.items():
        r = out[doc_id]
        if reason is None:
            assert r["status"] == "ok" and r["image"] == png(), r
        else:
            assert (r["status"], r["reason"]) == ("quarantined", reason), (doc_id, r)
    assert out["missing"]["stage"] == "validate" and "nope.png" in out["missing"]["detail"]
    assert all(out[d]["stage"] == "read" for d, reason in expected.items() if reason not in (None, "image_missing"))
    assert "--fetch-urls" in out["http"]["detail"]
    assert_no_secret(list(out.values()))
    # Allowing the outside folder admits the paths that resolve into it (not the FIFO).
    allowed = ManifestSource(str(src / "m.jsonl"), allow_roots=[str(outside)])
    out = {r["doc_id"]: r for r in validated(allowed, read_rows(allowed))}
    assert out["dotdot"]["reason"] == out["symlink"]["reason"] == "image_unrecognised"
    assert out["fifo"]["reason"] == NOT_A_REGULAR_FILE and out["etc"]["reason"] == OUTSIDE_ROOT


def test_manifest_url_images_go_through_the_fetcher(tmp_path, monkeypatch):
    from pipelines.ingest import fetch
    from pipelines.ingest.sources import manifest

    calls = []

    def fake_fetch_all(urls, settings, seed=None):
        calls.append(list(urls))
        return [fetch.FetchResult(u, ok=True, data=png()) if "good" in u else
                fetch.FetchResult(u, reason="fetch_http_404", detail=f"GET {u}: HTTP 404") for u in urls]

    monkeypatch.setattr(manifest, "fetch_all", fake_fetch_all)
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"doc_id": "a", "image": "http://h/good.png"}) + "\n"
        + json.dumps({"doc_id": "b", "image": "https://h/bad.png"}) + "\n"
        + json.dumps({"doc_id": "c", "text": "plain"}) + "\n")
    source = ManifestSource(str(tmp_path / "m.jsonl"), fetch=fetch.FetchSettings(retries=0))
    rows = {r["doc_id"]: r for r in read_rows(source)}
    assert calls == [["http://h/good.png", "https://h/bad.png"]]
    assert rows["a"]["image"] == png() and rows["a"]["error"] is None
    assert rows["b"]["error"] == "fetch_http_404" and rows["c"]["text"] == "plain"
    uri_mode = ManifestSource(str(tmp_path / "m.jsonl"), image_mode="uri", fetch=fetch.FetchSettings())
    assert {r["doc_id"]: r["error"] for r in read_rows(uri_mode)}["a"] == "url_not_fetched"


def test_manifest_files_in_a_folder_are_confined(tmp_path, outside):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text(json.dumps({"doc_id": "a", "text": "fine"}) + "\n")
    (outside / "evil.jsonl").write_text(json.dumps({"doc_id": "evil", "text": SECRET.decode()}) + "\n")
    os.symlink(outside / "evil.jsonl", src / "b.jsonl")
    os.mkfifo(src / "c.jsonl")
    os.symlink(outside, src / "more")
    rows = {r["record_ref"].split("@")[0]: r for r in read_rows(ManifestSource(str(src)))}
    assert set(rows) == {"a.jsonl", "b.jsonl", "c.jsonl"}
    assert rows["a.jsonl"]["text"] == "fine"
    assert (rows["b.jsonl"]["error"], rows["c.jsonl"]["error"]) == (OUTSIDE_ROOT, NOT_A_REGULAR_FILE)
    assert_no_secret(list(rows.values()))


def test_corrupt_parquet_is_one_record_and_the_rest_goes_on(tmp_path):
    pq.write_table(pa.table({"doc_id": ["a", "b"], "text": ["one", "two"]}), tmp_path / "good.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet at all PAR1")
    rows = read_rows(ManifestSource(str(tmp_path)))
    assert [(r["record_ref"], r["error"]) for r in rows] == [
        ("broken.parquet", "file_unreadable"), ("good.parquet#row=0", None), ("good.parquet#row=1", None)]
    assert "broken.parquet" in rows[0]["error_detail"] and "Parquet" in rows[0]["error_detail"]


def test_corrupt_row_group_quarantines_each_of_its_rows(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"doc_id": [f"d{i}" for i in range(6)], "text": ["x" * 50] * 6}), path,
                   row_group_size=3, compression="none")
    source = ManifestSource(str(path))
    shards = source.plan()
    data = bytearray(path.read_bytes())
    md = pq.ParquetFile(path).metadata.row_group(1)
    start = md.column(0).data_page_offset
    data[start : start + 40] = b"\xff" * 40  # the second group's page headers
    path.write_bytes(bytes(data))
    rows = [r for i, s in enumerate(shards) for t in source.read(i, s) for r in t.to_pylist()]
    assert [r["error"] for r in rows[:3]] == [None] * 3
    assert [(r["record_ref"], r["error"]) for r in rows[3:]] == [
        (f"m.parquet#row={i}", "file_unreadable") for i in (3, 4, 5)]


def test_a_record_that_raises_is_quarantined(tmp_path, monkeypatch):
    (tmp_path / "m.jsonl").write_text(json.dumps({"doc_id": "a", "text": "t"}) + "\n"
                                      + json.dumps({"doc_id": "b", "text": "t"}) + "\n")
    source = ManifestSource(str(tmp_path / "m.jsonl"))
    original = ManifestSource._record

    def flaky(self, value, uri, excerpt):
        if value["doc_id"] == "a":
            raise RuntimeError("boom")
        return original(self, value, uri, excerpt)

    monkeypatch.setattr(ManifestSource, "_record", flaky)
    rows = read_rows(source)
    assert [(r["doc_id"], r["error"]) for r in rows] == [("a", "read_failed"), ("b", None)]
    assert "RuntimeError: boom" in rows[0]["error_detail"]


# --- EDIS -------------------------------------------------------------------------------


def test_edis_images_are_confined_to_images_dir(tmp_path, outside):
    src = tmp_path / "edis"
    (src / "images").mkdir(parents=True)
    (src / "images" / "ok.png").write_bytes(png())
    os.mkfifo(src / "images" / "pipe.png")
    items = [{"id": 1, "contents": "fine", "image": "ok.png"},
             {"id": 2, "contents": "escape", "image": "../../outside/secret.png"},
             {"id": 3, "contents": "absolute", "image": str(outside / "secret.png")},
             {"id": 4, "contents": "fifo", "image": "pipe.png"}]
    (src / "candidates_full.json").write_text("\n".join(json.dumps(i) for i in items) + "\n")
    rows = {r["doc_id"]: r for r in read_rows(EDISSource(str(src), with_queries=False))}
    assert rows["1"]["error"] is None and rows["1"]["image"] == png()
    assert [rows[k]["error"] for k in "234"] == [OUTSIDE_ROOT, OUTSIDE_ROOT, NOT_A_REGULAR_FILE]
    assert_no_secret(list(rows.values()))


# --- WebDataset, URL lists ----------------------------------------------------------------


def test_webdataset_shards_are_confined(tmp_path, outside):
    import tarfile

    from pipelines.ingest.sources import WebDatasetSource

    def tar(path: Path, key: str) -> None:
        with tarfile.open(path, "w") as t:
            for ext, data in (("png", png()), ("txt", b"caption")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))

    src = tmp_path / "wds"
    src.mkdir()
    tar(src / "00000.tar", "a")
    tar(outside / "evil.tar", "secret")
    os.symlink(outside / "evil.tar", src / "00001.tar")
    os.mkfifo(src / "00002.tar")
    os.symlink(outside, src / "more")
    rows = {r["record_ref"]: r for r in read_rows(WebDatasetSource(str(src)))}
    assert {k: v["error"] for k, v in rows.items()} == {
        "00000.tar#a": None, "00001.tar": OUTSIDE_ROOT, "00002.tar": NOT_A_REGULAR_FILE, "more.tar": OUTSIDE_ROOT}
    brace = {r["record_ref"]: r["error"] for r in read_rows(WebDatasetSource(f"{src}/{{00000..00002}}.tar"))}
    assert brace == {"00000.tar#a": None, "00001.tar": OUTSIDE_ROOT, "00002.tar": NOT_A_REGULAR_FILE}


def test_url_list_files_are_confined(tmp_path, outside):
    from pipelines.ingest.sources import UrlSource

    src = tmp_path / "lists"
    src.mkdir()
    (src / "a.jsonl").write_text(json.dumps({"url": "ftp://host/a.png"}) + "\n")
    (outside / "evil.jsonl").write_text(json.dumps({"url": "http://h/x.png", "caption": SECRET.decode()}) + "\n")
    os.symlink(outside / "evil.jsonl", src / "b.jsonl")
    os.mkfifo(src / "c.jsonl")
    (src / "d.parquet").write_bytes(b"PAR1 nope PAR1")
    rows = {r["record_ref"]: r for r in read_rows(UrlSource(str(src)))}
    assert {k: v["error"] for k, v in rows.items()} == {
        "a.jsonl@0": "bad_url", "b.jsonl": OUTSIDE_ROOT, "c.jsonl": NOT_A_REGULAR_FILE, "d.parquet": "file_unreadable"}
    assert_no_secret(list(rows.values()))


def test_ingest_flags_set_the_roots_and_the_fetcher(tmp_path):
    from jobs import ingest
    from pipelines.ingest.runner import make_source

    src = tmp_path / "src"
    src.mkdir()
    (src / "m.jsonl").write_text('{"doc_id": "a", "text": "t"}\n')
    cfg, _ = ingest.parse_config(["--source", "manifest", "--path", str(src), "--root", str(tmp_path / "d"),
                                  "--allow-root", "/data/shared images", "--allow-root", "s3://bucket/imgs",
                                  "--fetch-urls"])
    assert cfg.source.allow_roots == ["/data/shared images", "s3://bucket/imgs"] and cfg.source.fetch_urls
    source = make_source(cfg)
    assert source.fetch is not None
    cfg, _ = ingest.parse_config(["--source", "manifest", "--path", str(src), "--root", str(tmp_path / "d")])
    assert cfg.source.allow_roots == [] and make_source(cfg).fetch is None
