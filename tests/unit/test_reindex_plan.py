"""Re-index planning without Ray or LanceDB: collapsing a change feed, the full diff, the
plan against the table's current rows, reading the changed documents (feed post-images or a
filtered scan), the embed-route rule, the ANN keep-or-rebuild rule and the publish gate.
The change feeds here are real ones, read from small Delta tables written in the test."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
from deltalake import write_deltalake

from pipelines.index.reindex import ReindexConfig, embed_route
from pipelines.index.reindex_plan import (
    CHANGE_TYPE,
    COMMIT_VERSION,
    ChangeFeedUnavailable,
    ChangeSet,
    ann_to_build,
    changed_documents,
    collapse_changes,
    diff_changes,
    feed_documents,
    gate_decision,
    plan_reindex,
    read_change_feed,
    version_documents,
)
from pipelines.store.delta_tables import Tables
from pipelines.store.lance_tables import plan_ann_index

CDF = {"delta.enableChangeDataFeed": "true"}


def keys(pairs: dict[str, str]) -> pa.Table:
    return pa.table({"doc_id": list(pairs), "content_sha256": list(pairs.values())},
                    schema=pa.schema([("doc_id", pa.string()), ("content_sha256", pa.string())]))


def feed(rows: list[tuple[str, str, str, int]]) -> pa.Table:
    return pa.table({"doc_id": [r[0] for r in rows], "content_sha256": [r[1] for r in rows],
                     CHANGE_TYPE: [r[2] for r in rows], COMMIT_VERSION: pa.array([r[3] for r in rows], pa.int64())})


def upserts(cs) -> dict[str, str]:
    return dict(zip(cs.upserts["doc_id"].to_pylist(), cs.upserts["content_sha256"].to_pylist()))


def merge(tables: Tables, pairs: dict[str, str]) -> None:
    (tables.documents_table().merge(keys(pairs), "t.doc_id = s.doc_id", source_alias="s", target_alias="t")
     .when_matched_update_all().when_not_matched_insert_all().execute())


@pytest.fixture
def delta(tmp_path):
    """corpus/documents under tmp_path, versions: 0 create a,b,c; 1 merge (update b, insert d);
    2 delete c; 3 append e."""
    tables = Tables(str(tmp_path))
    write_deltalake(tables.documents, keys({"a": "a0", "b": "b0", "c": "c0"}), configuration=CDF)
    merge(tables, {"b": "b1", "d": "d1"})
    tables.documents_table().delete("doc_id = 'c'")
    write_deltalake(tables.documents, keys({"e": "e3"}), mode="append")
    return tables


def test_a_real_feed_collapses_to_inserts_updates_and_deletes(delta):
    cs = collapse_changes(read_change_feed(delta, 0, 3), 0, 3)
    assert upserts(cs) == {"b": "b1", "d": "d1", "e": "e3"}
    assert cs.deletes.to_pylist() == ["c"] and cs.method == "cdf" and cs.changed == 4
    # From a later version on, only the later commits count.
    cs = collapse_changes(read_change_feed(delta, 2, 3), 2, 3)
    assert upserts(cs) == {"e": "e3"} and cs.deletes.to_pylist() == []


def test_the_last_change_wins_and_an_overwrite_keeps_the_documents_it_rewrote(delta):
    merge(delta, {"e": "e4"})                    # 4: update e
    delta.documents_table().delete("doc_id = 'e'")  # 5: delete e
    merge(delta, {"c": "c6"})                    # 6: c comes back
    write_deltalake(delta.documents, keys({"a": "a0", "b": "b1", "x": "x7"}), mode="overwrite")  # 7
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
    delta.documents_table().alter.set_table_properties({"delta.enableChangeDataFeed": "false"})  # 4
    write_deltalake(delta.documents, keys({"f": "f5"}), mode="append")                               # 5
    with pytest.raises(ChangeFeedUnavailable, match="not enabled"):
        read_change_feed(delta, 3, 5)


def test_a_vacuumed_feed_is_unavailable(tmp_path):
    tables = Tables(str(tmp_path))
    write_deltalake(tables.documents, keys({"a": "a0"}), configuration=CDF)
    write_deltalake(tables.documents, keys({"e": "e1"}), mode="append")  # 1: its inserts live in this file
    merge(tables, {"e": "e2"})                                            # 2: rewrites that file
    tables.documents_table().vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    with pytest.raises(ChangeFeedUnavailable):
        read_change_feed(tables, 0, 2)


def test_full_diff_finds_the_same_change_set_as_the_feed(delta):
    source = delta.read("documents", columns=["doc_id", "content_sha256"])
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


# ---------------------------------------------------------------------------------------
# The changed documents themselves
# ---------------------------------------------------------------------------------------

DOC_COLUMNS = ["doc_id", "content_sha256", "text", "image"]


def docs(pairs: dict[str, str]) -> pa.Table:
    """Documents whose text and image bytes are derived from their hash (so a row read back
    can be checked against the content the plan expects)."""
    return pa.table({"doc_id": list(pairs), "content_sha256": list(pairs.values()),
                     "text": [f"text of {h}" for h in pairs.values()],
                     "image": [h.encode() * 3 for h in pairs.values()]},
                    schema=pa.schema([("doc_id", pa.string()), ("content_sha256", pa.string()),
                                      ("text", pa.string()), ("image", pa.binary())]))


def merge_docs(tables: Tables, pairs: dict[str, str]) -> None:
    (tables.documents_table().merge(docs(pairs), "t.doc_id = s.doc_id", source_alias="s", target_alias="t")
     .when_matched_update_all().when_not_matched_insert_all().execute())


@pytest.fixture
def corpus(tmp_path):
    """corpus/documents under tmp_path: 0 create a,b,c; 1 merge (update b, insert d); 2 delete c;
    3 append e; 4 update b again."""
    tables = Tables(str(tmp_path))
    write_deltalake(tables.documents, docs({"a": "a0", "b": "b0", "c": "c0"}), configuration=CDF)
    merge_docs(tables, {"b": "b1", "d": "d1"})
    tables.documents_table().delete("doc_id = 'c'")
    write_deltalake(tables.documents, docs({"e": "e3"}), mode="append")
    merge_docs(tables, {"b": "b4"})
    return tables


def by_id(t: pa.Table) -> dict[str, dict]:
    return {r["doc_id"]: r for r in t.to_pylist()}


def test_changed_rows_come_from_the_feed_post_images_and_equal_the_version(corpus):
    cs = collapse_changes(read_change_feed(corpus, 0, 4), 0, 4)
    ids = cs.upserts["doc_id"].combine_chunks()
    from_feed = feed_documents(corpus, cs, ids, DOC_COLUMNS)
    scanned = version_documents(corpus, 4, ids, DOC_COLUMNS)
    # b changed twice in the range: only its latest content (b4), once.
    assert by_id(from_feed) == by_id(scanned) == by_id(docs({"b": "b4", "d": "d1", "e": "e3"}))
    assert from_feed.column_names == DOC_COLUMNS
    assert [f.type for f in from_feed.schema] == [pa.string(), pa.string(), pa.string(), pa.binary()]
    # Only the documents asked for.
    assert sorted(feed_documents(corpus, cs, pa.array(["d"]), DOC_COLUMNS)["doc_id"].to_pylist()) == ["d"]
    rows, origin = changed_documents(corpus, cs, ids, DOC_COLUMNS)
    assert origin == {"feed": 3, "scan": 0} and by_id(rows) == by_id(scanned)


def test_a_full_diff_or_an_unreadable_feed_reads_the_changed_rows_from_the_version(corpus, caplog):
    source = corpus.read("documents", columns=["doc_id", "content_sha256"])
    diff = diff_changes(source, keys({"a": "a0", "b": "b0", "c": "c0"}), 0, 4)
    ids = diff.upserts["doc_id"].combine_chunks()
    rows, origin = changed_documents(corpus, diff, ids, DOC_COLUMNS)
    assert origin == {"feed": 0, "scan": 3} and by_id(rows) == by_id(docs({"b": "b4", "d": "d1", "e": "e3"}))
    # The feed's files vacuumed after planning: the rows still come, from the version.
    write_deltalake(corpus.documents, docs({"f": "f5"}), mode="append")  # 5: f's insert lives in this file
    merge_docs(corpus, {"f": "f6"})                            # 6: rewrites that file
    corpus.documents_table().vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    cs = ChangeSet(4, 6, "cdf", keys({"f": "f6"}), pa.array([], pa.string()))
    rows, origin = changed_documents(corpus, cs, pa.array(["f"]), DOC_COLUMNS)
    assert origin == {"feed": 0, "scan": 1} and by_id(rows) == by_id(docs({"f": "f6"}))
    assert "scanning version 6 instead" in caplog.text


def test_a_planned_document_missing_from_the_version_is_an_error_that_says_rerun(corpus):
    cs = ChangeSet(3, 4, "cdf", keys({"b": "b4", "zz": "z4"}), pa.array([], pa.string()))
    with pytest.raises(ValueError, match="re-run `ciea reindex`"):
        changed_documents(corpus, cs, pa.array(["b", "zz"]), DOC_COLUMNS)
    # Nothing found is an empty table of the declared (plain) types, not an error.
    none = version_documents(corpus, 4, pa.array(["zz"]), DOC_COLUMNS)
    assert none.num_rows == 0 and none.schema == docs({}).schema


def test_the_embed_route_follows_the_change_size_and_the_device():
    cpu = {"device": "cpu"}
    cfg = ReindexConfig.model_validate({"encode": {"in_process_max_docs": 100}, "changes": {"read_max_docs": 1000}})
    assert embed_route(1, cfg, cpu) == embed_route(100, cfg, cpu) == "in-process"
    assert embed_route(101, cfg, cpu) == embed_route(1000, cfg, cpu) == "ray-rows"
    assert embed_route(1001, cfg, cpu) == "ray-read"
    off = ReindexConfig.model_validate({"encode": {"in_process_max_docs": 0}, "changes": {"read_max_docs": 0}})
    assert embed_route(1, off, cpu) == "ray-read"
    import torch

    # A GPU encoder runs in this process only where this process has the GPU.
    gpu_route = embed_route(1, cfg, {"device": "cuda"})
    assert gpu_route == ("in-process" if torch.cuda.is_available() else "ray-rows")
