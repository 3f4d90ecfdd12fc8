"""The store's one split reader (``pipelines.store.splits.read_split``) on the shapes splits
take: WebQA/EDIS queries with no target and several positives, graded and zero judgments,
judgments of qids the split does not hold, metadata that is not JSON or not an object, a
split without qrels, a missing and an empty split."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pyarrow as pa
import pytest
from deltalake import write_deltalake

from pipelines.store import schema as S
from pipelines.store.delta_tables import Tables
from pipelines.store.splits import EmptySplit, SplitNotFound, read_split

NOW = datetime(2026, 12, 7, tzinfo=timezone.utc)


def _queries(root, split, rows):
    table = pa.Table.from_pylist([{S.QID: q, S.QUERY: text, S.METADATA: meta, S.CONTENT_SHA256: "x", S.SOURCE: "t",
                                   S.RECORD_REF: f"t:{q}", S.RUN_ID: "t", S.INGESTED_AT: NOW}
                                  for q, text, meta in rows], schema=S.QUERIES_SCHEMA)
    write_deltalake(str(root / "queries" / split), table, mode="overwrite")


def _qrels(root, split, rows):
    table = pa.Table.from_pylist([{S.QID: q, S.DOC_ID: d, S.RELEVANCE: r, S.SOURCE: "t", S.RUN_ID: "t"}
                                  for q, d, r in rows], schema=S.QRELS_SCHEMA)
    write_deltalake(str(root / "qrels" / split), table, mode="overwrite")


def test_webqa_shaped_split_reads_as_training_and_evaluation_take_it(tmp_path):
    _queries(tmp_path, "train", [
        ("q2", "two image positives", json.dumps({"Qcate": "color"})),           # WebQA: no target
        ("q1", "three text positives", None),
        ("q3", "synthetic", json.dumps({"kind": "image", "target_doc_id": "i9"})),
        ("q4", "bad metadata", "{not json"), ("q5", "metadata a list", "[1, 2]")])
    _qrels(tmp_path, "train", [("q2", "i2", 1), ("q2", "i1", 2), ("q2", "n1", 0), ("q1", "t3", 1), ("q1", "t1", 1),
                               ("q1", "t2", 1), ("q3", "i9", 1), ("gone", "i1", 1)])
    split = read_split(Tables(str(tmp_path)), "train")
    assert [q[S.QID] for q in split.queries] == ["q1", "q2", "q3", "q4", "q5"]
    assert split.qrels["q2"] == {"i2": 1, "i1": 2, "n1": 0} and "gone" not in split.qrels
    assert split.positives("q2") == ["i1", "i2"] and split.positives("q4") == []
    rows = {q["qid"]: q for q in split.training_queries()}
    assert rows["q1"] == {"qid": "q1", "query": "three text positives", "positive_doc_ids": ["t1", "t2", "t3"],
                          "kind": "all", "target_doc_id": None}
    assert rows["q2"]["target_doc_id"] is None and rows["q2"]["positive_doc_ids"] == ["i1", "i2"]
    assert (rows["q3"]["kind"], rows["q3"]["target_doc_id"]) == ("image", "i9")
    assert rows["q4"]["kind"] == rows["q5"]["kind"] == "all"


def test_missing_empty_and_unjudged_splits(tmp_path):
    _queries(tmp_path, "dev", [("d1", "no qrels table at all", None)])
    _queries(tmp_path, "empty", [])
    tables = Tables(str(tmp_path))
    assert read_split(tables, "dev").qrels == {}
    with pytest.raises(SplitNotFound, match=r"no query split 'test'.*splits there: dev, empty") as err:
        read_split(tables, "test")
    assert isinstance(err.value, FileNotFoundError) and "\n" not in str(err.value)
    with pytest.raises(EmptySplit, match="'empty'.*is empty"):
        read_split(tables, "empty")
