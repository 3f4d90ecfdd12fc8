"""The hash-partitioned key diff (``pipelines.index.keydiff``) against the driver's diff.

The Ray route runs ``plan_bucket`` / ``diff_bucket`` on each hash bucket of both sides; here
the same buckets are made in-process (``tag`` + a group by bucket), so the property is the
route's whole claim: the union of the buckets' answers is the driver's answer, for any keys
hypothesis finds (repeated table rows, ids in one side only, changed hashes, empty sides).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.index import keydiff as K
from pipelines.index.embed import plan_work
from pipelines.index.reindex_plan import diff_changes
from pipelines.store import schema as S

IDS = st.sampled_from([f"d{i}" for i in range(12)] + ["", "é", "a\x00b", "x" * 300])
SHAS = st.sampled_from(["h1", "h2", "h3"])


def keys(pairs) -> pa.Table:
    return pa.table({S.DOC_ID: [p[0] for p in pairs], S.CONTENT_SHA256: [p[1] for p in pairs]},
                    schema=K.KEYS_SCHEMA)


def by_bucket(source: pa.Table, table: pa.Table, partitions: int) -> list[pa.Table]:
    tagged = pa.concat_tables([K.tag(source, K.SOURCE_SIDE, partitions), K.tag(table, K.TABLE_SIDE, partitions)])
    return [tagged.filter(pc.equal(tagged[K.BUCKET], b)) for b in sorted(set(tagged[K.BUCKET].to_pylist()))]


def kind(rows: pa.Table, name: str) -> list:
    return rows.filter(pc.equal(rows[K.KIND], name))


@settings(max_examples=60, deadline=None)
@given(src=st.dictionaries(IDS, SHAS, max_size=10), tbl=st.lists(st.tuples(IDS, SHAS), max_size=12),
       partitions=st.integers(1, 5))
def test_the_buckets_together_make_the_drivers_plan(src, tbl, partitions):
    source, table = keys(src.items()), keys(tbl)
    whole = plan_work(source, table)
    parts = [K.plan_bucket(g) for g in by_bucket(source, table, partitions)]
    rows = pa.concat_tables(parts) if parts else K.DIFF_SCHEMA.empty_table()
    assert sorted(kind(rows, K.EMBED)[S.DOC_ID].to_pylist()) == sorted(whole.to_embed.to_pylist())
    assert sorted(kind(rows, K.STALE)[S.DOC_ID].to_pylist()) == whole.stale
    assert K._total(rows, K.DOCUMENTS) == whole.documents == len(src)
    assert K._total(rows, K.SKIPPED) == whole.skipped
    assert K._total(rows, K.REPEATED) == 0


@settings(max_examples=60, deadline=None)
@given(src=st.dictionaries(IDS, SHAS, max_size=10), tbl=st.lists(st.tuples(IDS, SHAS), max_size=12),
       partitions=st.integers(1, 5))
def test_the_buckets_together_make_the_drivers_change_set(src, tbl, partitions):
    source, table = keys(src.items()), keys(tbl)
    whole = diff_changes(source, table, None, 0)
    rows = pa.concat_tables([K.diff_bucket(g) for g in by_bucket(source, table, partitions)] or
                            [K.DIFF_SCHEMA.empty_table()])
    up = kind(rows, K.UPSERT)
    assert sorted(zip(up[S.DOC_ID].to_pylist(), up[S.CONTENT_SHA256].to_pylist())) == sorted(
        zip(whole.upserts[S.DOC_ID].to_pylist(), whole.upserts[S.CONTENT_SHA256].to_pylist()))
    assert sorted(kind(rows, K.DELETE)[S.DOC_ID].to_pylist()) == sorted(whole.deletes.to_pylist())


def test_a_doc_id_lands_in_one_bucket_whatever_its_side_and_type():
    ids = ["a", "b", "é", "", "x" * 1000]
    for t in (pa.string(), pa.large_string(), pa.string_view()):
        arr = pa.array(ids, t)
        batch = pa.table({S.DOC_ID: arr, S.CONTENT_SHA256: pa.array(["h"] * len(ids), t)})
        for p in (1, 2, 7):
            assert K.tag(batch, K.SOURCE_SIDE, p)[K.BUCKET].to_pylist() == K.tag(
                keys([(i, "h") for i in ids]), K.TABLE_SIDE, p)[K.BUCKET].to_pylist()


def test_a_repeated_source_doc_id_is_counted_not_lost():
    source = keys([("a", "h1"), ("a", "h2"), ("b", "h1")])
    rows = pa.concat_tables([K.plan_bucket(g) for g in by_bucket(source, keys([]), 1)])
    assert K._total(rows, K.REPEATED) == 1


def test_partitions_follow_the_rows_with_a_floor_of_two():
    assert K.partitions_for(0) == 2
    assert K.partitions_for(1_000_000) == 4
    assert K.partitions_for(2_000_001) == 9
    assert K.partitions_for(10, partitions=7) == 7
