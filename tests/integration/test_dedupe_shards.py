"""The Ray-backed stores of the duplicate rule (``ShardedIds``, ``AdaptiveIds``) answer as
the driver's set does, on a real local Ray (actors that hold no CPU)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.ingest.dedupe import AdaptiveIds, IdShardLost, LocalIds, ShardedIds

pytestmark = pytest.mark.usefixtures("ray_local")

BATCHES = st.lists(st.lists(st.sampled_from([f"d{i}" for i in range(9)] + ["", "é"]), max_size=8), max_size=6)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=BATCHES, shards=st.integers(1, 3), limit=st.integers(0, 6))
def test_the_ray_stores_answer_as_the_drivers_set(batches, shards, limit):
    want = LocalIds()
    stores = [ShardedIds(shards), AdaptiveIds(limit, shards)]
    try:
        for b in batches:
            expected = want.claim(b)
            assert [s.claim(b) for s in stores] == [expected, expected]
        probe = ["d0", "d8", "", "never"]
        assert [s.contains(probe) for s in stores] == [want.contains(probe)] * 2
        assert [len(s) for s in stores] == [len(want)] * 2
    finally:
        for s in stores:
            s.close()


def test_the_adaptive_store_moves_to_actors_past_its_limit():
    store = AdaptiveIds(limit=3, shards=2)
    try:
        assert store.claim(["a", "b"]) == [True, True] and store.kind == "driver"
        assert store.claim(["c", "a", "d"]) == [True, False, True] and store.kind == "ray"
        assert store.claim(["b", "e"]) == [False, True] and len(store) == 5
    finally:
        store.close()


def test_a_killed_shard_stops_the_rule_with_one_line_naming_the_fix():
    import ray

    store = ShardedIds(2)
    try:
        assert store.claim(["a", "b", "c", "d"]) == [True] * 4
        ray.kill(store.actors[0])
        with pytest.raises(IdShardLost, match=r"nothing was committed; re-run `ciea ingest`") as info:
            for i in range(50):  # some id lands on the dead shard
                store.claim([f"x{i}"])
        assert "\n" not in str(info.value)
    finally:
        store.close()
