"""The accepted doc_ids of one ingest: the memory the duplicate rule needs, and where it lives.

The rule (``runner.DocumentStream``): the first record of a doc_id in source order wins.
The driver consumes the validated stream in source order and asks, batch by batch, which
of its ids are new (:meth:`claim`), so what the rule needs is the set of ids accepted so
far, ≈ 100 B per document as Python strings: ≈ 100 MB at 1M documents, ≈ 100 GB at 1B.

* :class:`LocalIds`: a set in the driver, for ingests small enough that the set is small.
* :class:`AdaptiveIds`: starts as :class:`LocalIds` and moves to :class:`ShardedIds` once
  the set passes a size (sources that cannot tell their size up front: URL lists, shards).
* :class:`ShardedIds`: the set hash-partitioned over Ray actors (``crc32(doc_id) mod P``,
  the key diff's hash), one shard each; the driver sends each batch's ids to their owners
  (one call per shard per batch, answered together) and keeps nothing per document. The
  actors ask for no CPU (they never hold one a read task needs; ``STACK_NOTES``: the 2-CPU
  deadlock) and spread over the cluster's nodes, so a 1B-document ingest holds ≈ 100 B per
  document in total, ``1/P`` of it in each shard.

Both answer in the order asked, and an id twice in one batch is new only the first time,
so the two are interchangeable (``tests/unit/test_dedupe.py`` checks it with hypothesis, and
the ingest tests run both).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

#: Ids each shard of :class:`ShardedIds` is sized for (≈ 25 MB of Python strings).
IDS_PER_SHARD = 250_000


def claim_in_order(seen: set[str], ids: Sequence[str]) -> list[bool]:
    """``True`` for each id not in ``seen`` (and not earlier in ``ids``); adds them."""
    fresh = []
    for i in ids:
        new = i not in seen
        if new:
            seen.add(i)
        fresh.append(new)
    return fresh


class LocalIds:
    """The accepted ids in this process (small ingests)."""

    kind = "driver"

    def __init__(self) -> None:
        self.ids: set[str] = set()

    def claim(self, ids: Sequence[str]) -> list[bool]:
        if self.ids.isdisjoint(ids) and len(set(ids)) == len(ids):
            # The usual block: set operations in C, no Python loop per row.
            self.ids.update(ids)
            return [True] * len(ids)
        return claim_in_order(self.ids, ids)

    def contains(self, ids: Sequence[str]) -> list[bool]:
        return [i in self.ids for i in ids]

    def __len__(self) -> int:
        return len(self.ids)

    def close(self) -> None:
        self.ids = set()


class IdShardLost(RuntimeError):
    """A shard of :class:`ShardedIds` died mid-ingest (the message names the fix)."""


class IdShard:
    """One shard of :class:`ShardedIds` (a Ray actor)."""

    def __init__(self) -> None:
        self.ids: set[str] = set()

    def claim(self, ids: list[str]) -> list[bool]:
        return claim_in_order(self.ids, ids)

    def contains(self, ids: list[str]) -> list[bool]:
        return [i in self.ids for i in ids]

    def size(self) -> int:
        return len(self.ids)


def shard_of(doc_id: str, shards: int) -> int:
    return zlib.crc32(doc_id.encode()) % shards


def shards_for(records: int | None, ids_per_shard: int = IDS_PER_SHARD) -> int:
    """Shards for an ingest of about ``records`` (unknown: 4)."""
    return 4 if records is None else max(1, math.ceil(records / ids_per_shard))


class ShardedIds:
    """The accepted ids hash-partitioned over ``shards`` Ray actors (large ingests)."""

    kind = "ray"

    def __init__(self, shards: int) -> None:
        import ray

        actor = ray.remote(num_cpus=0, max_restarts=0, scheduling_strategy="SPREAD")(IdShard)
        self.actors: list[Any] = [actor.remote() for _ in range(max(1, shards))]

    def _ask(self, method: str, ids: Sequence[str]) -> list[bool]:
        import ray

        n = len(self.actors)
        where = [shard_of(i, n) for i in ids]
        parts: list[list[str]] = [[] for _ in range(n)]
        for i, s in zip(ids, where):
            parts[s].append(i)
        refs = {s: getattr(self.actors[s], method).remote(p) for s, p in enumerate(parts) if p}
        try:
            got = ray.get(list(refs.values()))
        except ray.exceptions.RayActorError:
            # The ids it held are gone with it, so the rule can no longer be applied: stop
            # before the commit (the ingest's one Delta commit never happens) and say so.
            raise IdShardLost("an actor holding the duplicate rule's accepted ids died (its node was lost or "
                              "it ran out of memory): nothing was committed; re-run `ciea ingest`") from None
        answers = {s: iter(a) for s, a in zip(refs, got)}
        return [next(answers[s]) for s in where]

    def claim(self, ids: Sequence[str]) -> list[bool]:
        return self._ask("claim", ids) if ids else []

    def contains(self, ids: Sequence[str]) -> list[bool]:
        return self._ask("contains", ids) if ids else []

    def __len__(self) -> int:
        import ray

        return sum(ray.get([a.size.remote() for a in self.actors]))

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


class AdaptiveIds:
    """:class:`LocalIds` until ``limit`` ids, then :class:`ShardedIds` (the ids so far handed
    over): the driver never holds more than ``limit`` ids, and a small ingest starts no actor."""

    def __init__(self, limit: int, shards: int) -> None:
        self.limit, self.shards = limit, shards
        self.inner: LocalIds | ShardedIds = LocalIds()

    @property
    def kind(self) -> str:
        return self.inner.kind

    def claim(self, ids: Sequence[str]) -> list[bool]:
        if isinstance(self.inner, LocalIds) and len(self.inner) + len(ids) > self.limit:
            held, sharded = sorted(self.inner.ids), ShardedIds(self.shards)
            for i in range(0, len(held), 50_000):
                sharded.claim(held[i:i + 50_000])
            self.inner.close()
            self.inner = sharded
        return self.inner.claim(ids)

    def contains(self, ids: Sequence[str]) -> list[bool]:
        return self.inner.contains(ids)

    def __len__(self) -> int:
        return len(self.inner)

    def close(self) -> None:
        self.inner.close()
