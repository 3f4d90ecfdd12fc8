"""Confinement and "one record never aborts an ingest" through ``ciea ingest`` on a real
local Ray into real Delta tables: files outside the source's roots (symlinks, ``../``,
absolute paths, ``file://``), special files and URL images are quarantined with their
reason; none of their bytes reach any table file; the run ends 0 with counts reconciled."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from confinement_fixtures import SECRET, fails_if_blocked, make_outside, png
from http_faults import FaultServer, png_for
from ingest_helpers import reconcile, rows_by_id, run_ingest

from pipelines.store.delta_tables import Tables

pytestmark = pytest.mark.usefixtures("ray_local")




OUTSIDE_PNG = png((250, 1, 2), size=6)  # a valid image outside the roots: must never be stored


@pytest.fixture(autouse=True)
def no_hang():
    with fails_if_blocked(600, "the ingest"):
        yield


@pytest.fixture
def outside(tmp_path) -> Path:
    return make_outside(tmp_path, OUTSIDE_PNG)


def assert_nothing_from_outside(data: Path) -> None:
    """No file of the tables (documents, quarantine, logs) holds an outside file's bytes."""
    tables = Tables(str(data))
    for r in tables.read(tables.documents).to_pylist():
        assert r["image"] != OUTSIDE_PNG and SECRET.decode() not in (r["caption"] or "") + (r["text"] or "")
    for r in tables.read(tables.quarantine).to_pylist():
        assert SECRET.decode() not in (r["excerpt"] or "") + (r["detail"] or "")
    for path in data.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_bytes(), path


def quarantine(data: Path) -> dict[str, dict]:
    tables = Tables(str(data))
    return {r["record_ref"]: r for r in tables.read(tables.quarantine).to_pylist()}


def test_folder_reads_nothing_outside_its_roots(tmp_path, outside):
    src = tmp_path / "src"
    (src / "cats").mkdir(parents=True)
    (src / "cats" / "ok.png").write_bytes(png((1, 2, 3)))
    (src / "cats" / "ok.txt").write_text("a fine cat")
    (src / "cats" / "stolen.png").write_bytes(png((4, 5, 6)))
    os.symlink(outside / "secret.txt", src / "cats" / "stolen.txt")
    os.symlink(outside / "real.png", src / "linked.png")
    os.symlink(outside, src / "linked-dir")
    os.mkfifo(src / "pipe.png")
    os.symlink(src / "cats" / "ok.png", src / "alias.png")
    summary = run_ingest(tmp_path, tmp_path / "data", "--source", "folder", "--path", str(src))
    reconcile(summary)
    d = summary["documents"]
    assert (d["read"], d["accepted"]) == (6, 2)
    assert d["quarantined_by_reason"] == {"outside_root": 3, "not_a_regular_file": 1}
    tables = Tables(str(tmp_path / "data"))
    assert set(rows_by_id(tables.read(tables.documents))) == {"cats/ok", "alias"}
    q = quarantine(tmp_path / "data")
    assert {k: (r["reason"], r["stage"]) for k, r in q.items()} == {
        "cats/stolen.png": ("outside_root", "read"), "linked.png": ("outside_root", "read"),
        "linked-dir": ("outside_root", "read"), "pipe.png": ("not_a_regular_file", "read")}
    assert "--allow-root" in q["linked.png"]["detail"]
    assert_nothing_from_outside(tmp_path / "data")


def test_allow_roots_admit_a_linked_folder_file(tmp_path, outside):
    src = tmp_path / "src"
    src.mkdir()
    os.symlink(outside / "real.png", src / "shared.png")
    summary = run_ingest(tmp_path, tmp_path / "data", "--source", "folder", "--path", str(src),
                         "--allow-root", str(outside))
    assert summary["documents"]["inserted"] == 1
    tables = Tables(str(tmp_path / "data"))
    assert rows_by_id(tables.read(tables.documents))["shared"]["image"] == OUTSIDE_PNG


def write_manifest_folder(src: Path, outside: Path) -> dict[str, str | None]:
    """A manifest folder with one record per failure class, good records in the same file,
    and a corrupt Parquet file beside it; returns doc_id → expected reason."""
    (src / "img").mkdir(parents=True)
    (src / "img" / "good.png").write_bytes(png((7, 8, 9)))
    os.symlink(outside / "real.png", src / "img" / "sneaky.png")
    os.mkfifo(src / "img" / "pipe.png")
    cases: dict[str, tuple[str | None, str | None]] = {
        "good-image": ("img/good.png", None),
        "dotdot": ("../outside/real.png", "outside_root"),
        "absolute": (str(outside / "secret.png"), "outside_root"),
        "file-uri": (f"file://{outside}/real.png", "outside_root"),
        "etc": ("/etc/passwd", "outside_root"),
        "symlink": ("img/sneaky.png", "outside_root"),
        "fifo": ("img/pipe.png", "not_a_regular_file"),
        "http": ("http://127.0.0.1:9/a.png", "url_not_fetched"),
        "ftp": ("ftp://example.invalid/a.png", "unsupported_uri"),
        "good-text": (None, None),
    }
    lines = [json.dumps({"doc_id": d, "caption": f"caption {d}", **({"image": img} if img else {"text": "t"})})
             for d, (img, _) in cases.items()]
    (src / "m.jsonl").write_text("\n".join(lines) + "\n")
    (src / "broken.parquet").write_bytes(b"PAR1 not a parquet file PAR1")
    pq.write_table(pa.table({"doc_id": ["pq-good"], "text": ["from parquet"]}), src / "z.parquet")
    return {d: reason for d, (_, reason) in cases.items()}


def test_manifest_every_failure_class_is_a_quarantine_row(tmp_path, outside):
    src = tmp_path / "src"
    expected = write_manifest_folder(src, outside)
    summary = run_ingest(tmp_path, tmp_path / "data", "--source", "manifest", "--path", str(src),
                         "--name", "conf")
    reconcile(summary)
    d = summary["documents"]
    good = {k for k, v in expected.items() if v is None} | {"pq-good"}
    assert d["read"] == len(expected) + 2 and d["accepted"] == len(good)
    tables = Tables(str(tmp_path / "data"))
    assert set(rows_by_id(tables.read(tables.documents))) == good
    q = quarantine(tmp_path / "data")
    got = {r["doc_id"]: r["reason"] for r in q.values() if r["doc_id"]}
    assert got == {k: v for k, v in expected.items() if v is not None}
    assert q["broken.parquet"]["reason"] == "file_unreadable" and "broken.parquet" in q["broken.parquet"]["detail"]
    assert summary["quarantine"]["rows_this_run"] == d["quarantined"] == len(expected) - len(good) + 2
    assert_nothing_from_outside(tmp_path / "data")


def test_manifest_url_images_are_fetched_when_a_fetcher_is_set(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with FaultServer() as server:
        (src / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
            {"doc_id": "web", "caption": "fetched", "image": f"{server.url}/img/w.png"},
            {"doc_id": "gone", "caption": "404", "image": f"{server.url}/missing/g.png"},
            {"doc_id": "text", "text": "plain"}]))
        summary = run_ingest(tmp_path, tmp_path / "data", "--source", "manifest", "--path", str(src), "--fetch-urls",
                             "--set", "source.fetch.retries=0", "--set", "source.fetch.connect_timeout_s=2",
                             "--set", "source.fetch.total_timeout_s=5", "--set", "source.fetch.allow_private=true")
    reconcile(summary)
    assert summary["documents"]["quarantined_by_reason"] == {"fetch_http_404": 1}
    tables = Tables(str(tmp_path / "data"))
    docs = rows_by_id(tables.read(tables.documents))
    assert set(docs) == {"web", "text"} and docs["web"]["image"] == png_for("w.png")
