"""The LanceDB vector table the embedding stage writes: schema, lineage guard, distributed
commits, indexes and published versions.

One table holds the vectors of one model (``model_id``) over one Delta corpus. Its layout
is code (:func:`row_model`, a pydantic ``LanceModel``); its lineage lives in every row
(``model_id``, ``source_version``, ``embedded_at``) and in the Lance table metadata
(``ciea.model_id``, the last embedded ``ciea.source_version``, the index plan), so a table
with no rows yet still knows which model it belongs to.

Writes are distributed: Ray workers write Lance *fragments* (data files) with
``lance_ray.LanceFragmentWriter``; only the fragment metadata (a few hundred bytes per
fragment) reaches the driver, which appends them in one Lance commit
(:meth:`VectorTable.commit_fragments`). A reader never sees a half-written run: it reads
the version the ``published`` tag points at, which moves only after the indexes are built.

One writer at a time: a run holds the table's lease (:mod:`pipelines.store.lease`) from
before it plans to the end, and fences its commits (:meth:`VectorTable.fence_writes`):
each commit carries the run's id, and a commit is refused when a version after the one the
run planned against added rows that another run wrote — Lance itself lets two appends of
the same documents both land.

Index rule (:func:`plan_ann_index`), for ``N`` rows of dimension ``D``:

* **No ANN index while exact search is as fast**: below ``N x D = 2 000 000`` floats
  (``min_rows = 2 000 000 / D``: 2 604 rows at 768-d, 5 208 at 384-d, 62 500 at 32-d).
  Measured (BENCHMARKS.md, 768-d): an exact top-10 query costs ~4 ns per float scanned
  (5.9 ms at 2 000 rows, 35 ms at 10 000), an IVF_PQ query ~4.6 ms whatever the size, so
  they cross at ~1.2M floats; the threshold sits a little above, where exact search is
  still about as fast and has perfect recall. Never below 256 rows: PQ's 8-bit codebooks
  need >= 256 training rows (below that Lance "creates" an index over 0 rows).
* **IVF partitions** = ``round(sqrt(N))``, at most ``N / 256`` (so each k-means centroid
  sees >= 256 training vectors) — ~316 at 100k rows, 1 000 at 1M, 3 162 at 10M.
* **PQ sub-vectors** = ``D / 16`` when 16 divides ``D`` (16-dim sub-vectors, 8-bit codes:
  64x compression, the SIMD-friendly default), else ``D / 8``, else 1.
* **Refine factor** (a search-time setting, stored in the table metadata for the search
  surfaces): PQ distances are approximate, so the top ``k x refine`` candidates are
  re-ranked with the full vectors: 5 when a code covers <= 16 dimensions, 20 beyond (the
  1-sub-vector fallback). Measured at 1M x 768 (``bench/query.py``, BENCHMARKS.md): PQ alone
  reaches recall@10 0.65, refine 5 0.98, refine 10 0.998 at +2.6 ms per query.
  **nprobes** = ``max(20, ceil(partitions / 50))`` (20 up to 1 000 partitions, 2 % beyond),
  at most all: Lance's own default of 20 at 1M rows (7-9 ms at recall 0.98 on 2 cores).
  Both are only defaults: ``ciea search --nprobes/--refine-factor`` raise them where an
  embedding's neighbourhoods cross more partitions than the benchmark's clusters do.
* ``ivf_hnsw_sq`` instead: same partitions, scalar-quantised HNSW inside each (no refine
  needed: SQ keeps 8 bits per dimension).

Full-text (``FTS``) indexes on ``text`` and ``caption`` and a ``BTree`` on ``doc_id`` are
built whenever the table has rows.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pydantic

from pipelines.store import storage
from pipelines.store.lease import WriterConflict
from pipelines.store.schema import CAPTION, CONTENT_SHA256, DOC_ID, TEXT

logger = logging.getLogger(__name__)

# Column names beyond the corpus's own (imported above from the Delta schema module).
VECTOR = "vector"
THUMBNAIL = "thumbnail"
MODEL_ID = "model_id"
SOURCE_VERSION = "source_version"
EMBEDDED_AT = "embedded_at"
#: The extractor's complementary weights ``w`` per patch (row-major over the patch grid).
PATCH_WEIGHTS = "patch_weights"

#: Table-metadata keys (Lance table metadata, versioned with the table).
META_MODEL_ID = "ciea.model_id"
META_DIM = "ciea.dim"
META_SOURCE_VERSION = "ciea.source_version"
META_INDEX_PLAN = "ciea.index_plan"
#: "<rows>x<cols>" of the patch grid that ``patch_weights`` is laid out on (row-major).
META_PATCH_GRID = "ciea.patch_grid"
#: Absolute path of the checkpoint the vectors were made with (search loads it to encode queries).
META_CHECKPOINT = "ciea.checkpoint"

PUBLISHED_TAG = "published"
ANN_INDEX = f"{VECTOR}_idx"
FTS_COLUMNS = (TEXT, CAPTION)
AnnKind = Literal["ivf_pq", "ivf_hnsw_sq"]


#: Lance transaction property naming the run that made a commit (read by the write fence).
TX_RUN_ID = "ciea.run_id"
#: Lance operations that put rows at the head: another run's, after this run planned, is
#: what would make this run's commit duplicate documents (deletes, metadata, indexes and
#: compaction cannot).
ROW_ADDING_OPERATIONS = frozenset({"Append", "Overwrite", "Update", "Merge", "Restore", "DataReplacement", "Clone"})


class ModelMismatchError(ValueError):
    """The table holds vectors of another model; a table never mixes two model ids."""


class ConcurrentWriteError(WriterConflict):
    """Another run added rows after this run planned: this run's commit is refused."""


@dataclass
class WriteFence:
    """A run's claim on the table's history: every row-adding version after ``planned``
    up to ``checked`` is its own.

    Attributes:
        run_id: stamped on each of the run's commits (:data:`TX_RUN_ID`).
        planned: the version the run planned its work against.
        checked: the latest version known to hold no other run's rows.
        check_lease: raises when the run no longer holds the table's lease.
    """

    run_id: str
    planned: int
    checked: int
    check_lease: Callable[[], None] | None = None


@functools.cache
def row_model(dim: int, patches: int | None = None) -> type:
    """The table's row schema as a pydantic ``LanceModel`` with a ``dim``-wide vector.

    Built per dimension (the vector width comes from the model), cached so that one
    process always gets the same class for the same ``dim``.

    Args:
        patches: the model's patch count ``N``: adds the nullable ``patch_weights``
            column (``fixed_size_list<float32>[N]``: the extractor's ``w`` of each image
            document, null for text documents and for variants without the extractor).
            ``None`` (models that read no pixels, tables made before the column): none.
    """
    from lancedb.pydantic import LanceModel, Vector

    f = pydantic.Field
    extra: dict[str, Any] = {}
    if patches is not None:
        extra[PATCH_WEIGHTS] = (Optional[Vector(patches)], f(  # noqa: UP045
            None, description="image documents: the extractor's complementary weight w per patch "
                              "(query-independent; row-major over ciea.patch_grid)"))
    return pydantic.create_model(
        f"EmbeddingRow{dim}" + (f"P{patches}" if patches is not None else ""),
        __base__=LanceModel,
        __doc__=f"One embedded corpus document ({dim}-d unit vector) with its lineage.",
        doc_id=(str, f(description="document id, stable across re-ingests (the join key to Delta)")),
        vector=(Vector(dim), f(description="L2-normalised document embedding, float32")),
        modality=(str, f(description="'text' or 'image'")),
        text=(Optional[str], f(None, description="text documents: the text")),  # noqa: UP045
        caption=(Optional[str], f(None, description="image documents: caption / alt text")),  # noqa: UP045
        thumbnail=(Optional[bytes], f(None, description="image documents: small JPEG for people")),  # noqa: UP045
        content_sha256=(str, f(description="hash of the embedded content (from Delta)")),
        model_id=(str, f(description="checkpoint id (hash of weights + config) that made the vector")),
        source_version=(int, f(description="corpus/documents Delta version the row was read from")),
        embedded_at=(datetime, f(description="when the vector was computed (UTC)")),
        metadata=(Optional[str], f(None, description="the source's metadata, a JSON object as text")),  # noqa: UP045
        **extra,
    )


def table_schema(dim: int, patches: int | None = None) -> pa.Schema:
    """Arrow schema of the table (vector as ``fixed_size_list<float32>[dim]``)."""
    return row_model(dim, patches).to_arrow_schema()


# ---------------------------------------------------------------------------------------
# Index rule
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnnPlan:
    """An ANN index configuration and the search settings that go with it."""

    kind: str
    num_partitions: int
    num_sub_vectors: int | None
    refine_factor: int | None
    nprobes: int
    rows: int
    dim: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


#: Exact search is used while a query scans fewer floats than this (the rule above).
EXACT_SEARCH_MAX_FLOATS = 2_000_000


def exact_search_rows(dim: int) -> int:
    """Rows below which no ANN index is built for ``dim``-wide vectors."""
    return max(256, EXACT_SEARCH_MAX_FLOATS // dim)


def plan_ann_index(num_rows: int, dim: int, kind: AnnKind = "ivf_pq", min_rows: int | None = None) -> AnnPlan | None:
    """The ANN index for ``num_rows`` vectors of width ``dim`` (module docstring: the rule).

    Args:
        min_rows: override the rows threshold (default :func:`exact_search_rows`).

    Returns:
        ``None`` below the threshold (and always below 256 rows): exact search is used.
    """
    threshold = exact_search_rows(dim) if min_rows is None else min_rows
    if num_rows < max(threshold, 256):
        return None
    partitions = max(1, min(round(math.sqrt(num_rows)), num_rows // 256))
    nprobes = max(20, math.ceil(partitions / 50))
    if kind == "ivf_hnsw_sq":
        return AnnPlan(kind, partitions, None, None, min(nprobes, partitions), num_rows, dim)
    if dim % 16 == 0:
        sub = dim // 16
    elif dim % 8 == 0:
        sub = dim // 8
    else:
        sub = 1
    per_code = dim // sub  # dimensions folded into one 8-bit code
    refine = 5 if per_code <= 16 else 20
    return AnnPlan(kind, partitions, sub, refine, min(nprobes, partitions), num_rows, dim)


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def connect(db_uri: str, storage_options: dict[str, str] | None = None) -> Any:
    """The LanceDB database at ``db_uri`` (``lancedb.connect``), its storage options checked.

    Raises:
        ValueError: ``storage_options`` holds a credential, with the fix.
    """
    import lancedb

    options = dict(storage_options or {})
    storage.check_storage_options(options)
    return lancedb.connect(db_uri, storage_options=options or None)


class VectorTable:
    """A LanceDB table of one model's document vectors.

    Args:
        db_uri: LanceDB database folder (local path or ``s3://``).
        name: table name.
        storage_options: object-store settings (never credentials), checked here once.

    Raises:
        ValueError: ``storage_options`` holds a credential, with the fix.
    """

    def __init__(self, db_uri: str, name: str, storage_options: dict[str, str] | None = None) -> None:
        self.db_uri = db_uri
        self.name = name
        self.storage_options = dict(storage_options or {})
        self.db = connect(db_uri, self.storage_options)
        self._table = None
        self._fence: WriteFence | None = None

    # ---- open / create ------------------------------------------------------------------
    def exists(self) -> bool:
        return self.name in self.db.list_tables().tables

    @property
    def table(self):
        if self._table is None:
            self._table = self.db.open_table(self.name)
        self._table.checkout_latest()
        return self._table

    @property
    def uri(self) -> str:
        """The Lance dataset URI (what fragment writers and ``lance.dataset`` take)."""
        return self.table.uri

    def dataset(self, version: int | str | None = None):
        """The underlying ``lance.LanceDataset`` at ``version`` (default: its latest)."""
        import lance

        return lance.dataset(self.uri, version=version, storage_options=self.storage_options or None)

    def metadata(self) -> dict[str, str]:
        return dict(self.dataset().metadata or {})

    def check_model(self, model_id: str, dim: int) -> None:
        """Refuses a table that holds (or was created for) another model.

        Raises:
            ModelMismatchError: naming both ids and the fix.
        """
        if not self.exists():
            return
        meta = self.metadata()
        have = meta.get(META_MODEL_ID)
        if have is None:
            # Not made by this module: fall back to the rows themselves.
            ids = pc.unique(self.table.to_lance().to_table(columns=[MODEL_ID])[MODEL_ID]).to_pylist()
            have = ids[0] if len(ids) == 1 else (",".join(ids) if ids else None)
        if have is not None and have != model_id:
            raise ModelMismatchError(
                f"LanceDB table {self.name!r} in {self.db_uri} holds vectors of model_id {have}; "
                f"this checkpoint is model_id {model_id}, and a table never mixes two models. "
                f"Write to a new table (--table {self.name}-{model_id[:8]}), or drop the old one "
                "to re-embed the corpus with the new model.")
        have_dim = int(meta.get(META_DIM, dim))
        if have_dim != dim:
            raise ModelMismatchError(
                f"LanceDB table {self.name!r} stores {have_dim}-d vectors; this model makes "
                f"{dim}-d vectors: write to a new table.")

    def create_if_missing(self, model_id: str, dim: int, patch_grid: tuple[int, int] | None = None) -> bool:
        """Creates the empty table stamped with ``model_id``; True if it was created.

        Args:
            patch_grid: the model's (rows, cols) patch grid: adds ``patch_weights``.
        """
        if self.exists():
            return False
        patches = patch_grid[0] * patch_grid[1] if patch_grid else None
        self.db.create_table(self.name, schema=row_model(dim, patches))
        self._table = None
        meta = {META_MODEL_ID: model_id, META_DIM: str(dim)}
        if patch_grid:
            meta[META_PATCH_GRID] = f"{patch_grid[0]}x{patch_grid[1]}"
        self.dataset().update_metadata(meta)
        logger.info("created LanceDB table %s/%s for model_id %s (%d-d)", self.db_uri, self.name, model_id, dim)
        return True

    # ---- reads --------------------------------------------------------------------------
    def version(self) -> int:
        return self.table.version

    def count_rows(self) -> int:
        return self.table.count_rows()

    def keys(self) -> pa.Table:
        """``doc_id``, ``content_sha256`` of every row (two narrow columns, no vectors)."""
        return self.dataset().to_table(columns=[DOC_ID, CONTENT_SHA256])

    def published_version(self) -> int | None:
        tags = self.table.tags.list()
        tag = tags.get(PUBLISHED_TAG)
        return None if tag is None else int(tag["version"] if isinstance(tag, dict) else tag.version)

    def index_names(self) -> list[str]:
        return [ix.name for ix in self.table.list_indices()]

    # ---- writes -------------------------------------------------------------------------
    def delete_doc_ids(self, doc_ids: Sequence[str], chunk: int = 2000) -> int:
        """Deletes every row of these documents (one commit per ``chunk`` ids)."""
        deleted = 0
        for i in range(0, len(doc_ids), chunk):
            part = doc_ids[i : i + chunk]
            res = self.table.delete(f"{DOC_ID} IN ({', '.join(_sql_str(d) for d in part)})")
            deleted += getattr(res, "num_deleted_rows", 0) or 0
        return deleted

    def fence_writes(self, run_id: str, check_lease: Callable[[], None] | None = None) -> int:
        """Fences this handle's commits from here on: each is stamped with ``run_id`` and is
        refused (:class:`ConcurrentWriteError`) when a version after the current one added
        rows that another run wrote. Call it right before reading what the run plans from.

        Args:
            run_id: the run's id (its lease's).
            check_lease: called before each commit; raises when the lease is lost.

        Returns:
            The version the run plans against.
        """
        version = self.version()
        self._fence = WriteFence(run_id, version, version, check_lease)
        return version

    def _foreign_rows(self, ds: Any, first: int, last: int) -> None:
        """Raises :class:`ConcurrentWriteError` when a version in ``first..last`` added rows
        that the fenced run did not write (a version with no transaction record counts)."""
        fence = self._fence
        for v in range(first, last + 1):
            tx = ds.read_transaction(v)
            props = (tx.transaction_properties or {}) if tx is not None else {}
            if tx is None or (type(tx.operation).__name__ in ROW_ADDING_OPERATIONS
                              and props.get(TX_RUN_ID) != fence.run_id):
                by = f"run {props[TX_RUN_ID]}" if TX_RUN_ID in props else "another writer"
                raise ConcurrentWriteError(
                    f"table {self.name} was written by {by} (version {v}) after this run planned against "
                    f"version {fence.planned}; nothing of this run is committed: re-run when the other one "
                    "has finished")

    def _commit(self, operation: Any, read_version: int | None = None, withdraw_on_race: bool = False) -> int:
        """Commits ``operation`` (fenced when :meth:`fence_writes` was called); returns the version.

        The fence checks the versions since its last commit before committing, and again
        the ones that landed between that check and the commit (Lance rebases an append
        over them): an append that raced another run's is withdrawn at once (its fragments
        deleted), so the head never keeps both.
        """
        import lance

        opts = self.storage_options or None
        ds = self.dataset()
        fence = self._fence
        if fence is None:
            read = ds.version if read_version is None else read_version
            return lance.LanceDataset.commit(ds.uri, operation, read_version=read, storage_options=opts).version
        if fence.check_lease is not None:
            fence.check_lease()
        self._foreign_rows(ds, fence.checked + 1, ds.version)
        return self._commit_checked(ds, operation, withdraw_on_race)

    def _commit_checked(self, ds: Any, operation: Any, withdraw_on_race: bool) -> int:
        """The fenced commit on top of ``ds``, the version checked last: another run's
        rows that land between that check and this commit are caught here."""
        import lance

        fence = self._fence
        tx = lance.Transaction(ds.version, operation, transaction_properties={TX_RUN_ID: fence.run_id})
        new = lance.LanceDataset.commit(ds.uri, tx, storage_options=self.storage_options or None)
        try:
            self._foreign_rows(new, ds.version + 1, new.version - 1)
        except ConcurrentWriteError:
            if withdraw_on_race:
                self._withdraw(new)
            raise
        fence.checked = new.version
        return new.version

    def _withdraw(self, ds: Any) -> None:
        """Deletes the fragments the commit at ``ds.version`` added (a raced append)."""
        import lance

        before = {f.fragment_id for f in self.dataset(ds.version - 1).get_fragments()}
        ours = [f.fragment_id for f in ds.get_fragments() if f.fragment_id not in before]
        lance.LanceDataset.commit(ds.uri, lance.LanceOperation.Delete([], ours, "ciea: withdrawn concurrent append"),
                                  read_version=ds.version, storage_options=self.storage_options or None)
        logger.error("withdrew this run's append (version %d, %d fragments): another run appended at the same time",
                     ds.version, len(ours))

    def commit_fragments(self, fragments: Iterable[Any]) -> int:
        """Appends fragments written by workers in one Lance commit; returns the new version.

        Fenced (:meth:`fence_writes`): refused when another run added rows since this run
        planned, and the fragments stay unreferenced.

        Raises:
            ConcurrentWriteError / LeaseLostError: another run writes the table.
        """
        import lance

        return self._commit(lance.LanceOperation.Append(list(fragments)), withdraw_on_race=True)

    def commit_overwrite(self, schema: pa.Schema, fragments: Iterable[Any], read_version: int) -> int:
        """Replaces every row with ``fragments`` in one Lance commit; returns the new version.

        Unfenced, optimistic against ``read_version``; fenced, refused like
        :meth:`commit_fragments` (an overwrite that races an append still leaves one row
        per document: it replaces them all).
        """
        import lance

        return self._commit(lance.LanceOperation.Overwrite(schema, list(fragments)), read_version=read_version)

    def update_metadata(self, values: dict[str, str | None]) -> None:
        self.dataset().update_metadata(values)

    # ---- indexes ------------------------------------------------------------------------
    def build_indexes(self, plan: AnnPlan | None, previous_plan: AnnPlan | None) -> dict[str, Any]:
        """Builds (or brings up to date) the scalar, full-text and ANN indexes.

        A first build creates them; later runs fold new rows in with ``optimize_indices``,
        except the ANN index, which is retrained when the plan says more partitions than
        the trained one has (the table grew past what its k-means saw).

        Returns:
            What was done per index, for the summary.
        """
        from lancedb.index import FTS, BTree, HnswSq, IvfPq

        done: dict[str, Any] = {}
        table = self.table
        if table.count_rows() == 0:
            return done
        have = set(self.index_names())
        stale_ann = plan is not None and (
            previous_plan is None or ANN_INDEX not in have
            or (plan.kind, plan.num_partitions, plan.num_sub_vectors)
            != (previous_plan.kind, previous_plan.num_partitions, previous_plan.num_sub_vectors))
        existing = [n for n in have if not (stale_ann and n == ANN_INDEX)]
        if existing:
            self.dataset().optimize.optimize_indices(index_names=existing)
            done["optimized"] = sorted(existing)
        wanted = {f"{DOC_ID}_idx": (DOC_ID, BTree())}
        for col in FTS_COLUMNS:
            wanted[f"{col}_idx"] = (col, FTS(with_position=False))
        for name, (col, config) in wanted.items():
            if name not in have:
                table.create_index(col, config=config, name=name)
                done.setdefault("created", []).append(name)
        if stale_ann:
            if plan.kind == "ivf_hnsw_sq":
                config = HnswSq(distance_type="cosine", num_partitions=plan.num_partitions)
            else:
                config = IvfPq(distance_type="cosine", num_partitions=plan.num_partitions,
                               num_sub_vectors=plan.num_sub_vectors, num_bits=8)
            table.create_index(VECTOR, config=config, name=ANN_INDEX, replace=True)
            done.setdefault("created", []).append(ANN_INDEX)
            done["ann"] = asdict(plan)
        elif plan is None and ANN_INDEX in have:
            # Fewer rows than the threshold now (documents were deleted): exact search.
            self.dataset().drop_index(ANN_INDEX)
            done["dropped"] = [ANN_INDEX]
        return done

    def index_stats(self) -> dict[str, dict[str, Any]]:
        """``{index name: {"type", "indexed", "unindexed"}}`` for every index."""
        out = {}
        for name in self.index_names():
            s = self.table.index_stats(name)
            out[name] = {"type": str(s.index_type), "indexed": s.num_indexed_rows,
                         "unindexed": s.num_unindexed_rows}
        return out

    # ---- publication --------------------------------------------------------------------
    def publish(self, tag: str) -> int:
        """Tags the latest version ``tag`` and moves ``published`` to it; returns the version."""
        table = self.table
        version = table.version
        tags = table.tags
        for name in (tag, PUBLISHED_TAG):
            if name in tags.list():
                tags.update(name, version)
            else:
                tags.create(name, version)
        return version


def plan_from_json(text: str | None) -> AnnPlan | None:
    if not text:
        return None
    return AnnPlan(**json.loads(text))
