"""The key diff on Ray Data: a Delta version's ``(doc_id, content_sha256)`` against the
LanceDB table's, hash-partitioned by doc_id, so that no driver holds a row per document.

The driver route (:func:`pipelines.index.embed.plan_work`, :func:`pipelines.index.reindex_plan.diff_changes`)
reads both key columns into the driver, ≈ 90 B per document each: fine to a few million
documents, ≈ 180 GB at 1B. Here the same diff is a Ray Data job::

    read_delta(version, [doc_id, content_sha256])  ─┐  Ray read tasks
    read_lance(table,   [doc_id, content_sha256])  ─┤  → tag: side (source / table),
                                                    │    bucket = crc32(doc_id) mod P
    union → groupby(bucket).map_groups(fn)          ─┘  Ray's hash shuffle: every row of
                                                        one doc_id lands in one bucket

and ``fn`` is the driver route's own Arrow function run on one bucket's two sides: the
buckets' diffs are independent (a doc_id never spans two), so their union is the whole
diff, and the two routes cannot drift apart (``tests/unit/test_keydiff.py`` checks they
agree on every shape hypothesis finds). The output is materialised in the object store,
not in the driver: rows only for what changed (to embed, stale, upserts, deletes) and one
count row per bucket. What reaches the driver is the change set (bounded by the change,
not the corpus) and P counts; the doc_ids to embed stay a Ray Dataset, which the embedding
pipeline semi-joins with the documents (:func:`pipelines.index.embed.build_dataset`).

The route is chosen by size (``plan.distributed_min_rows``): the shuffle has a fixed cost
(aggregator actors, ≈ 5 s on 2 CPUs) that a small corpus never earns back.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.store import schema as S

if TYPE_CHECKING:
    from pipelines.store.delta_tables import Tables

SIDE = "_side"
BUCKET = "_bucket"
KIND = "kind"
COUNT = "n"
SOURCE_SIDE, TABLE_SIDE = 0, 1

#: Kinds of rows a bucket's diff emits.
EMBED, STALE, UPSERT, DELETE = "embed", "stale", "upsert", "delete"
DOCUMENTS, SKIPPED, REPEATED = "documents", "skipped", "repeated"

KEYS_SCHEMA = pa.schema([pa.field(S.DOC_ID, pa.string()), pa.field(S.CONTENT_SHA256, pa.string())])
TAGGED_SCHEMA = pa.schema([*KEYS_SCHEMA, pa.field(SIDE, pa.int8()), pa.field(BUCKET, pa.int32())])
DIFF_SCHEMA = pa.schema([pa.field(KIND, pa.string()), pa.field(S.DOC_ID, pa.string()),
                         pa.field(S.CONTENT_SHA256, pa.string()), pa.field(COUNT, pa.int64())])

#: Rows per hash partition the default partition count aims at (≈ 22 MiB of keys).
ROWS_PER_PARTITION = 250_000


def partitions_for(rows: int, partitions: int | None = None) -> int:
    """Hash partitions for ``rows`` keys: ``partitions`` when set, else one per
    :data:`ROWS_PER_PARTITION` rows, at least 2 (one per core of the smallest box)."""
    if partitions is not None:
        return max(1, partitions)
    return max(2, -(-rows // ROWS_PER_PARTITION))


def buckets(ids: pa.Array | pa.ChunkedArray, partitions: int) -> pa.Array:
    """``crc32(doc_id) mod partitions``: stable across processes and Python runs (unlike
    ``hash``), so both sides of the diff agree on where a doc_id goes."""
    return pa.array([zlib.crc32(i.encode()) % partitions for i in ids.to_pylist()], pa.int32())


def tag(batch: pa.Table, side: int, partitions: int) -> pa.Table:
    """Ray UDF: a block of keys → :data:`TAGGED_SCHEMA` (plain strings, side, bucket)."""
    ids = S.plain_array(batch[S.DOC_ID]).cast(pa.string())
    shas = S.plain_array(batch[S.CONTENT_SHA256]).cast(pa.string())
    n = batch.num_rows
    return pa.table({S.DOC_ID: ids, S.CONTENT_SHA256: shas,
                     SIDE: pa.repeat(pa.scalar(side, pa.int8()), n), BUCKET: buckets(ids, partitions)},
                    schema=TAGGED_SCHEMA)


def split_sides(group: pa.Table) -> tuple[pa.Table, pa.Table]:
    """One bucket's rows → (source keys, table keys)."""
    is_source = pc.equal(group[SIDE], SOURCE_SIDE)
    keys = group.select([S.DOC_ID, S.CONTENT_SHA256])
    return keys.filter(is_source), keys.filter(pc.invert(is_source))


def _rows(kind: str, ids: pa.Array | pa.ChunkedArray | list[str], shas: Any = None) -> pa.Table:
    ids = pa.array(ids, pa.string()) if isinstance(ids, list) else pa.chunked_array([ids], pa.string()) \
        if isinstance(ids, pa.Array) else ids.cast(pa.string())
    n = len(ids)
    return pa.table({KIND: pa.repeat(pa.scalar(kind, pa.string()), n), S.DOC_ID: ids,
                     S.CONTENT_SHA256: shas if shas is not None else pa.nulls(n, pa.string()),
                     COUNT: pa.nulls(n, pa.int64())}, schema=DIFF_SCHEMA)


def _count(kind: str, n: int) -> pa.Table:
    return pa.table({KIND: [kind], S.DOC_ID: pa.nulls(1, pa.string()), S.CONTENT_SHA256: pa.nulls(1, pa.string()),
                     COUNT: pa.array([n], pa.int64())}, schema=DIFF_SCHEMA)


def plan_bucket(group: pa.Table) -> pa.Table:
    """Ray UDF (``map_groups``): one bucket's embed plan (``embed.plan_work`` on it)."""
    from pipelines.index.embed import plan_work

    source, table = split_sides(group)
    plan = plan_work(source, table)
    repeated = source.num_rows - pc.count_distinct(source[S.DOC_ID]).as_py()
    return pa.concat_tables([_rows(EMBED, plan.to_embed), _rows(STALE, plan.stale),
                             _count(DOCUMENTS, plan.documents), _count(SKIPPED, plan.skipped),
                             _count(REPEATED, repeated)])


def diff_bucket(group: pa.Table) -> pa.Table:
    """Ray UDF (``map_groups``): one bucket's change set (``reindex_plan.diff_changes`` on it)."""
    from pipelines.index.reindex_plan import diff_changes

    source, table = split_sides(group)
    changes = diff_changes(source, table, None, 0)
    return pa.concat_tables([_rows(UPSERT, changes.upserts[S.DOC_ID], changes.upserts[S.CONTENT_SHA256]),
                             _rows(DELETE, changes.deletes), _count(DOCUMENTS, source.num_rows)])


def keyed(tables: Tables, version: int, table_uri: str, partitions: int):
    """Both sides' keys, tagged, as one lazy Ray Dataset (read by Ray tasks)."""
    import ray.data

    opts = tables.storage_options or None
    src = tables.ray_dataset(tables.documents, version, columns=[S.DOC_ID, S.CONTENT_SHA256])
    tbl = ray.data.read_lance(table_uri, columns=[S.DOC_ID, S.CONTENT_SHA256], storage_options=opts)
    kw = {"batch_format": "pyarrow", "batch_size": None}
    return src.map_batches(tag, fn_kwargs={"side": SOURCE_SIDE, "partitions": partitions}, **kw).union(
        tbl.map_batches(tag, fn_kwargs={"side": TABLE_SIDE, "partitions": partitions}, **kw))


def _diff(tables: Tables, version: int, table_uri: str, partitions: int, fn: Any):
    """The per-bucket ``fn`` over both sides, materialised in the object store."""
    return (keyed(tables, version, table_uri, partitions)
            .groupby(BUCKET, num_partitions=partitions)
            .map_groups(fn, batch_format="pyarrow")
            .materialize())


def _of_kind(ds: Any, kinds: tuple[str, ...]) -> pa.Table:
    """The rows of these kinds, brought to the driver (change-size and count rows only)."""
    def keep(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.is_in(batch[KIND], value_set=pa.array(kinds, pa.string())))

    parts = [b for b in ds.map_batches(keep, batch_format="pyarrow", batch_size=None)
             .iter_batches(batch_size=None, batch_format="pyarrow") if b.num_rows]
    return pa.concat_tables(parts).cast(DIFF_SCHEMA) if parts else DIFF_SCHEMA.empty_table()


def _total(rows: pa.Table, kind: str) -> int:
    return int(pc.sum(rows.filter(pc.equal(rows[KIND], kind))[COUNT]).as_py() or 0)


@dataclass
class DistributedPlan:
    """The embed plan as the Ray route makes it (the driver route's :class:`~pipelines.index.embed.WorkPlan`
    fields, with the ids to embed left in the object store).

    Attributes:
        todo: a materialised Ray Dataset with a ``doc_id`` column: the documents to embed.
    """

    documents: int
    to_embed_count: int
    stale: list[str]
    skipped: int
    todo: Any
    partitions: int
    repeated: int = 0

    @property
    def all_documents(self) -> bool:
        return self.to_embed_count == self.documents

    @property
    def embed_filter(self) -> Any:
        """What :func:`~pipelines.index.embed.build_dataset` keeps (``None``: every document)."""
        return None if self.all_documents else self.todo


def plan_work(tables: Tables, version: int, table_uri: str, partitions: int) -> DistributedPlan:
    """The embed plan of ``version`` against the table at ``table_uri``, on Ray."""
    ds = _diff(tables, version, table_uri, partitions, plan_bucket)
    small = _of_kind(ds, (STALE, DOCUMENTS, SKIPPED, REPEATED))
    stale = sorted(small.filter(pc.equal(small[KIND], STALE))[S.DOC_ID].to_pylist())

    def embed_ids(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.equal(batch[KIND], EMBED)).select([S.DOC_ID])

    todo = ds.map_batches(embed_ids, batch_format="pyarrow", batch_size=None).materialize()
    documents, skipped = _total(small, DOCUMENTS), _total(small, SKIPPED)
    return DistributedPlan(documents, documents - skipped, stale, skipped, todo, partitions,
                           repeated=_total(small, REPEATED))


def diff_changes(tables: Tables, version: int, table_uri: str, partitions: int) -> tuple[pa.Table, pa.Array, int]:
    """The full diff by content hash, on Ray: ``(upserts as doc_id/content_sha256, deleted
    doc_ids, documents in the version)`` — the change set, never the unchanged rows."""
    rows = _of_kind(_diff(tables, version, table_uri, partitions, diff_bucket), (UPSERT, DELETE, DOCUMENTS))
    up = rows.filter(pc.equal(rows[KIND], UPSERT))
    upserts = pa.table({S.DOC_ID: up[S.DOC_ID], S.CONTENT_SHA256: up[S.CONTENT_SHA256]}, schema=KEYS_SCHEMA)
    deletes = rows.filter(pc.equal(rows[KIND], DELETE))[S.DOC_ID].combine_chunks()
    return upserts, deletes, _total(rows, DOCUMENTS)
