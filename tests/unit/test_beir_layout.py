"""BEIR queries and qrels (``--queries``): layout checks, graded scores, bad lines as records."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from confinement_fixtures import SECRET, fails_if_blocked, make_outside, png

from pipelines.ingest.confine import Refused
from pipelines.ingest.sources import FolderSource, ManifestSource
from pipelines.ingest.sources.base import BadQrel
from pipelines.ingest.sources.beir import BeirQueries


def write_beir(root: Path) -> Path:
    (root / "qrels").mkdir(parents=True)
    lines = [json.dumps({"_id": "q1", "text": "red barn", "metadata": {"lang": "en"}}),
             "not json",
             json.dumps({"_id": 2, "text": "blue sky"}),
             json.dumps({"_id": "q3", "text": "green field"}),
             json.dumps({"text": "no id"})]
    (root / "queries.jsonl").write_text("\n".join(lines) + "\n")
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t0\n2\td3\t1\nq9\td1\t1\nq1\td4\tx\n")
    (root / "qrels" / "train.tsv").write_text("q3\td5\t3\n")  # no header: read too
    return root


def test_splits_queries_and_graded_qrels(tmp_path):
    b = BeirQueries(str(write_beir(tmp_path / "beir")))
    b.check()
    assert b.splits() == ["test", "train"]
    qrels = list(b.iter_qrels("test"))
    assert qrels[:4] == [("q1", "d1", 2), ("q1", "d2", 0), ("2", "d3", 1), ("q9", "d1", 1)]
    assert isinstance(qrels[4], BadQrel) and qrels[4].reason == "bad_grade"  # "x" is no grade
    assert qrels[4].record_ref.startswith("qrels/test.tsv@")
    queries = list(b.iter_queries("test"))
    good = [(q.qid, q.query, q.metadata) for q in queries if not q.error]
    assert good == [("q1", "red barn", {"metadata": {"lang": "en"}}), ("2", "blue sky", {})]
    errors = {q.error for q in queries if q.error}
    # The first split reports the unreadable queries.jsonl lines; q9 is judged but missing.
    assert errors == {"bad_json", "missing_qid", "missing_query"}
    assert [q.qid for q in queries if q.error == "missing_query"] == ["q9"]
    train = list(b.iter_queries("train"))
    assert [(q.qid, q.error) for q in train] == [("q3", None)]  # bad lines only once
    assert list(b.iter_qrels("train")) == [("q3", "d5", 3)]


def test_layout_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="lacks queries.jsonl"):
        BeirQueries(str(tmp_path)).check()
    (tmp_path / "queries.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="qrels/<split>.tsv"):
        BeirQueries(str(tmp_path)).check()


def test_sources_take_attached_queries(tmp_path):
    beir = write_beir(tmp_path / "beir")
    (beir / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "title": "T", "text": "a barn"}) + "\n")
    src = ManifestSource(str(beir))
    # A BEIR folder as a manifest: corpus.jsonl only; queries.jsonl is not a document file.
    assert [s["uri"].rsplit("/", 1)[-1] for s in src.plan()] == ["corpus.jsonl"]
    (rows,) = list(src.read(0, src.plan()[0]))
    row = rows.to_pylist()[0]
    assert row["doc_id"] == "d1" and row["text"] == "a barn" and json.loads(row["metadata"]) == {"title": "T"}
    assert src.query_splits() == []
    src.attach_queries(BeirQueries(str(beir)))
    assert src.query_splits() == ["test", "train"]
    assert [q.qid for q in src.iter_queries("train")] == ["q3"]
    folder = FolderSource(str(tmp_path))
    folder.attach_queries(BeirQueries(str(beir)))
    assert list(folder.iter_qrels("train")) == [("q3", "d5", 3)]


# ---- confinement: the queries folder is a root like a corpus folder ----------------------


def test_a_queries_file_symlinked_out_of_the_folder_is_refused_unread(tmp_path):
    beir = write_beir(tmp_path / "beir")
    outside = make_outside(tmp_path, png())
    (outside / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": SECRET.decode()}) + "\n")
    (beir / "queries.jsonl").unlink()
    (beir / "queries.jsonl").symlink_to(outside / "queries.jsonl")
    with pytest.raises(ValueError, match="queries.jsonl.*outside the source's allowed roots") as e:
        BeirQueries(str(beir)).check()
    assert SECRET.decode() not in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(Refused, match="outside_root"):  # read past check(): refused again at open
        list(BeirQueries(str(beir)).iter_queries("test"))
    allowed = BeirQueries(str(beir), allow_roots=[str(outside)])  # --allow-root lets it in
    allowed.check()
    assert [q.query for q in allowed.iter_queries("test") if not q.error] == [SECRET.decode()]


def test_a_qrels_folder_symlinked_out_is_refused(tmp_path):
    beir = write_beir(tmp_path / "beir")
    elsewhere = tmp_path / "elsewhere"
    (beir / "qrels").rename(elsewhere)
    (beir / "qrels").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError, match="qrels/test.tsv.*outside"):
        BeirQueries(str(beir)).check()


def test_a_fifo_qrels_file_is_refused_without_blocking(tmp_path):
    beir = write_beir(tmp_path / "beir")
    os.mkfifo(beir / "qrels" / "dev.tsv")
    with fails_if_blocked(10, "BeirQueries.check"), pytest.raises(ValueError, match="dev.tsv.*FIFO"):
        BeirQueries(str(beir)).check()
