"""The duplicate rule's memory (``pipelines.ingest.dedupe``): first in order wins, whatever
store holds the ids. The Ray-backed stores are checked against these in
``tests/integration/test_dedupe_shards.py``."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pipelines.ingest.dedupe import LocalIds, claim_in_order, shard_of, shards_for

BATCHES = st.lists(st.lists(st.sampled_from(["a", "b", "c", "", "é", "a\x00", "x" * 200]), max_size=8), max_size=6)


def reference(batches: list[list[str]]) -> list[list[bool]]:
    """First occurrence over the concatenated stream, cut back into the batches."""
    seen, out = [], []
    for b in batches:
        out.append([])
        for i in b:
            out[-1].append(i not in seen)
            seen.append(i)
    return out


@given(BATCHES)
def test_first_in_order_wins_across_and_within_batches(batches):
    local, plain = LocalIds(), set()
    assert [local.claim(b) for b in batches] == reference(batches)
    assert [claim_in_order(plain, b) for b in batches] == reference(batches)
    flat = [i for b in batches for i in b]
    assert len(local) == len(set(flat)) and local.contains(flat) == [True] * len(flat)
    assert local.contains(["never"]) == [False]


@given(st.text(max_size=50), st.integers(1, 64))
def test_a_doc_id_has_one_shard(doc_id, shards):
    assert 0 <= shard_of(doc_id, shards) == shard_of(doc_id, shards) < shards


def test_shards_follow_the_size_with_a_default_for_unknown():
    assert shards_for(None) == 4
    assert shards_for(0) == 1
    assert shards_for(1_000_000) == 4
    assert shards_for(1_000_001) == 5
    assert shards_for(25, ids_per_shard=10) == 3
