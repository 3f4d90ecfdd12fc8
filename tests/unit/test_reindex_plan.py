"""Re-index planning without Ray or LanceDB: collapsing a change feed, the full diff, the
plan against the table's current rows, the ANN keep-or-rebuild rule and the publish gate.
The change feeds here are real ones, read from small Delta tables written in the test."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from pipelines.lance_store import plan_ann_index
from pipelines.reindex import (
    CHANGE_TYPE,
    COMMIT_VERSION,
    ChangeFeedUnavailable,
    ann_to_build,
    collapse_changes,
    diff_changes,
    gate_decision,
    plan_reindex,
    read_change_feed,
)

CDF = {"delta.enableChangeDataFeed": "true"}


def keys(pairs: dict[str, str]) -> pa.Table:
    return pa.table({"doc_id": list(pairs), "content_sha256": list(pairs.values())},
                    schema=pa.schema([("doc_id", pa.string()), ("content_sha256", pa.string())]))


def feed(rows: list[tuple[str, str, str, int]]) -> pa.Table:
    return pa.table({"doc_id": [r[0] for r in rows], "content_sha256": [r[1] for r in rows],
                     CHANGE_TYPE: [r[2] for r in rows], COMMIT_VERSION: pa.array([r[3] for r in rows], pa.int64())})


def upserts(cs) -> dict[str, str]:
    return dict(zip(cs.upserts["doc_id"].to_pylist(), cs.upserts["content_sha256"].to_pylist()))


def merge(uri: str, pairs: dict[str, str]) -> None:
    (DeltaTable(uri).merge(keys(pairs), "t.doc_id = s.doc_id", source_alias="s", target_alias="t")
     .when_matched_update_all().when_not_matched_insert_all().execute())


@pytest.fixture
def delta(tmp_path):
    """Versions: 0 create a,b,c; 1 merge (update b, insert d); 2 delete c; 3 append e."""
    uri = str(tmp_path / "docs")
    write_deltalake(uri, keys({"a": "a0", "b": "b0", "c": "c0"}), configuration=CDF)
    merge(uri, {"b": "b1", "d": "d1"})
    DeltaTable(uri).delete("doc_id = 'c'")
    write_deltalake(uri, keys({"e": "e3"}), mode="append")
    return uri


def test_a_real_feed_collapses_to_inserts_updates_and_deletes(delta):
    cs = collapse_changes(read_change_feed(delta, 0, 3), 0, 3)
    assert upserts(cs) == {"b": "b1", "d": "d1", "e": "e3"}
    assert cs.deletes.to_pylist() == ["c"] and cs.method == "cdf" and cs.changed == 4
    # From a later version on, only the later commits count.
    cs = collapse_changes(read_change_feed(delta, 2, 3), 2, 3)
    assert upserts(cs) == {"e": "e3"} and cs.deletes.to_pylist() == []


def test_the_last_change_wins_and_an_overwrite_keeps_the_documents_it_rewrote(delta):
    merge(delta, {"e": "e4"})                    # 4: update e
    DeltaTable(delta).delete("doc_id = 'e'")     # 5: delete e
    merge(delta, {"c": "c6"})                    # 6: c comes back
    write_deltalake(delta, keys({"a": "a0", "b": "b1", "x": "x7"}), mode="overwrite")  # 7
    cs = collapse_changes(read_change_feed(delta, 3, 7), 3, 7)
    # The overwrite deleted and re-inserted a, b in one commit: present, latest content.
    assert upserts(cs) == {"a": "a0", "b": "b1", "x": "x7"}
    assert sorted(cs.deletes.to_pylist()) == ["c", "d", "e"]


def test_same_commit_insert_beats_delete_in_any_row_order():
    for rows in ([("a", "", "delete", 3), ("a", "a3", "insert", 3)],
                 [("a", "a3", "insert", 3), ("a", "", "delete", 3)]):
        cs = collapse_changes(feed(rows), 2, 3)
        assert upserts(cs) == {"a": "a3"} and cs.deletes.to_pylist() == []
    cs = collapse_changes(feed([("a", "a3", "insert", 3), ("a", "a3", "delete", 4)]), 2, 4)
    assert upserts(cs) == {} and cs.deletes.to_pylist() == ["a"]


def test_a_feed_that_does_not_match_the_range_or_has_bad_rows_is_refused():
    with pytest.raises(ChangeFeedUnavailable, match="outside"):
        collapse_changes(feed([("a", "a1", "insert", 1)]), 1, 3)
    with pytest.raises(ValueError, match="_change_type"):
        collapse_changes(feed([("a", "a1", "upsert", 2)]), 1, 3)
    with pytest.raises(ValueError, match="doc_id"):
        collapse_changes(pa.table({"doc_id": pa.array([None], pa.string()), "content_sha256": ["x"],
                                   CHANGE_TYPE: ["insert"], COMMIT_VERSION: pa.array([2], pa.int64())}), 1, 3)


def test_a_feed_disabled_on_a_commit_is_unavailable(delta):
    DeltaTable(delta).alter.set_table_properties({"delta.enableChangeDataFeed": "false"})  # 4
    write_deltalake(delta, keys({"f": "f5"}), mode="append")                               # 5
    with pytest.raises(ChangeFeedUnavailable, match="not enabled"):
        read_change_feed(delta, 3, 5)


def test_a_vacuumed_feed_is_unavailable(tmp_path):
    uri = str(tmp_path / "docs")
    write_deltalake(uri, keys({"a": "a0"}), configuration=CDF)
    write_deltalake(uri, keys({"e": "e1"}), mode="append")       # 1: its inserts live in this file
    merge(uri, {"e": "e2"})                                       # 2: rewrites that file
    DeltaTable(uri).vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    with pytest.raises(ChangeFeedUnavailable):
        read_change_feed(uri, 0, 2)


def test_full_diff_finds_the_same_change_set_as_the_feed(delta):
    source = pa.table(DeltaTable(delta).to_pyarrow_table(columns=["doc_id", "content_sha256"]))
    table = keys({"a": "a0", "b": "b0", "c": "c0"})  # the table as indexed at version 0
    diff = diff_changes(source, table, 0, 3, reason="test")
    cdf = collapse_changes(read_change_feed(delta, 0, 3), 0, 3)
    assert upserts(diff) == upserts(cdf) and sorted(diff.deletes.to_pylist()) == sorted(cdf.deletes.to_pylist())
    assert diff.method == "diff" and diff.reason == "test"


def test_the_plan_follows_the_table_state_so_a_rerun_converges():
    cs = collapse_changes(feed([("b", "b1", "update_postimage", 1), ("b", "b0", "update_preimage", 1),
                                ("d", "d1", "insert", 1), ("c", "c0", "delete", 1)]), 0, 1)
    fresh = plan_reindex(cs, keys({"a": "a0", "b": "b0", "c": "c0"}))
    assert sorted(fresh.to_embed.to_pylist()) == ["b", "d"] and fresh.stale == ["b", "c"]
    assert fresh.unchanged == 0 and fresh.already_gone == 0 and not fresh.noop
    # A run that died after its deletes: nothing left to delete, the same two to embed.
    after_delete = plan_reindex(cs, keys({"a": "a0"}))
    assert sorted(after_delete.to_embed.to_pylist()) == ["b", "d"] and after_delete.stale == []
    assert after_delete.already_gone == 1
    # ... and after its commit: nothing at all.
    done = plan_reindex(cs, keys({"a": "a0", "b": "b1", "d": "d1"}))
    assert done.noop and done.unchanged == 2
    # A duplicated row of a changed document is repaired: both rows go, one is embedded.
    dup = plan_reindex(cs, pa.table({"doc_id": ["b", "b"], "content_sha256": ["b1", "b1"]}))
    assert "b" in dup.to_embed.to_pylist() and "b" in dup.stale


def test_ann_index_is_kept_while_the_table_stays_near_its_trained_size():
    trained = plan_ann_index(100_000, 32, min_rows=256)
    assert ann_to_build(trained, plan_ann_index(101_000, 32, min_rows=256)) == trained  # 1 %: fold in
    grown = plan_ann_index(150_000, 32, min_rows=256)
    assert ann_to_build(trained, grown) == grown                                        # 50 %: retrain
    assert ann_to_build(trained, None) is None                                          # below threshold: drop
    assert ann_to_build(None, trained) == trained                                       # first index


def test_the_gate_promotes_only_within_the_tolerance():
    assert gate_decision(0.80, 0.81, 0.02).promote
    refused = gate_decision(0.70, 0.81, 0.02)
    assert not refused.promote and "worse" in refused.reason and "0.7000" in refused.reason
    assert gate_decision(0.10, None, 0.0).promote
    assert not gate_decision(math.nan, 0.5, 0.1).promote
