"""Re-indexing plans: what changed in ``corpus/documents`` since the LanceDB table was last
indexed, and what the table has to do about it.

A table records the Delta version it was indexed at (``ciea.source_version`` in its Lance
metadata). From there to the current version, the change set comes from one of two places:

* **the change data feed** (:func:`read_change_feed` → :func:`collapse_changes`): the
  ``insert`` / ``update_postimage`` / ``delete`` rows of every commit in the range, collapsed
  to the *last* change per ``doc_id``. Inside one commit a document can appear both
  deleted and inserted (an overwrite removes every old file and adds new ones): the insert
  wins, because a commit's end state holds its added files. Only four narrow columns are
  read, never the documents themselves.
* **a full diff** (:func:`diff_changes`) of the version's ``(doc_id, content_sha256)`` pairs
  against the table's, when the feed cannot cover the range (vacuumed files, the feed
  disabled on some commit, log entries cleaned up). Same result, more reading.

:func:`plan_reindex` then compares the change set with what the table holds *now*, never
with what it held when the run started: a document whose current content is already in
the table is skipped, so a re-run after a crash at any step re-plans from the table's state
and converges — deleted rows are not deleted twice, committed vectors are not embedded
twice, and a document never has two rows.

Everything here is pure (Arrow in, plans out) except :func:`read_change_feed`, which reads
Delta, and :func:`table_keys_for`, which reads the Lance table.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.store import schema as S
from pipelines.store.lance_tables import AnnPlan

if TYPE_CHECKING:
    from pipelines.store.delta_tables import Tables

logger = logging.getLogger(__name__)

CHANGE_TYPE = "_change_type"
COMMIT_VERSION = "_commit_version"
INSERT, UPDATE_PRE, UPDATE_POST, DELETE = "insert", "update_preimage", "update_postimage", "delete"
CHANGE_TYPES = (INSERT, UPDATE_PRE, UPDATE_POST, DELETE)
#: The columns read from the feed: enough to plan, nothing of the content.
FEED_COLUMNS = [S.DOC_ID, S.CONTENT_SHA256, CHANGE_TYPE, COMMIT_VERSION]

Method = Literal["cdf", "diff"]


class ChangeFeedUnavailable(RuntimeError):
    """The change data feed cannot cover the requested range (the reason is the message)."""


@dataclass
class ChangeSet:
    """The net change of ``corpus/documents`` between two versions.

    Attributes:
        from_version: the version the table was indexed at (exclusive).
        to_version: the version to index (inclusive).
        method: ``cdf`` (change data feed) or ``diff`` (full diff by content hash).
        upserts: ``doc_id``, ``content_sha256`` of every document present at
            ``to_version`` whose content may differ from ``from_version`` (inserted or
            updated); one row per doc_id.
        deletes: doc_ids absent at ``to_version`` that may be in the table.
        feed_rows: change-feed rows read (0 for a diff).
        reason: why the full diff was used (empty for the feed).
    """

    from_version: int | None
    to_version: int
    method: Method
    upserts: pa.Table
    deletes: pa.Array
    feed_rows: int = 0
    reason: str = ""

    @property
    def changed(self) -> int:
        return self.upserts.num_rows + len(self.deletes)


@dataclass
class ReindexPlan:
    """What one run does to the table.

    Attributes:
        to_embed: doc_ids to (re-)embed from ``to_version``.
        stale: doc_ids whose rows are deleted first (updated, deleted, or duplicated).
        unchanged: upserts whose current content the table already holds (an update that
            restored old content, or the work of an earlier run that crashed later on).
        already_gone: deletes that have no row in the table (ditto).
    """

    to_embed: pa.Array
    stale: list[str]
    unchanged: int
    already_gone: int
    changes: ChangeSet = field(repr=False)

    @property
    def noop(self) -> bool:
        return len(self.to_embed) == 0 and not self.stale


_EMPTY_KEYS = pa.schema([pa.field(S.DOC_ID, pa.string()), pa.field(S.CONTENT_SHA256, pa.string())])


def _keys(ids: pa.Array | pa.ChunkedArray, shas: pa.Array | pa.ChunkedArray) -> pa.Table:
    return pa.table({S.DOC_ID: S.plain_array(ids), S.CONTENT_SHA256: S.plain_array(shas)}, schema=_EMPTY_KEYS)


def no_changes(version: int) -> ChangeSet:
    """The empty change set of a table already at ``version``."""
    return ChangeSet(version, version, "cdf", _EMPTY_KEYS.empty_table(), pa.array([], pa.string()))


# ---------------------------------------------------------------------------------------
# The change data feed
# ---------------------------------------------------------------------------------------


def read_change_feed(tables: Tables, from_version: int, to_version: int) -> pa.Table:
    """The feed's planning columns of ``corpus/documents`` for commits ``from_version + 1 .. to_version``.

    Streams the feed batch by batch and keeps only :data:`FEED_COLUMNS` (the feed of a
    merge carries whole documents, images included).

    Raises:
        ChangeFeedUnavailable: any reason the feed cannot be read for the whole range
            (not enabled on a commit, data or change files vacuumed, log entries gone).
    """
    if to_version <= from_version:
        raise ValueError(f"the feed range ({from_version}, {to_version}] is empty")
    try:
        dt = tables.documents_table()
        reader = dt.load_cdf(starting_version=from_version + 1, ending_version=to_version,
                             columns=FEED_COLUMNS)
        # Files are fetched lazily: a vacuumed file fails here, while iterating.
        batches = [b.select(FEED_COLUMNS) for b in pa.RecordBatchReader.from_stream(reader)]
    except Exception as e:  # deltalake raises DeltaError, ArrowInvalid, OSError, ... for these
        raise ChangeFeedUnavailable(f"{type(e).__name__}: {e}") from e
    if not batches:
        return pa.table({S.DOC_ID: pa.array([], pa.string()), S.CONTENT_SHA256: pa.array([], pa.string()),
                         CHANGE_TYPE: pa.array([], pa.string()), COMMIT_VERSION: pa.array([], pa.int64())})
    t = pa.Table.from_batches(batches)
    return pa.table({S.DOC_ID: S.plain_array(t[S.DOC_ID]), S.CONTENT_SHA256: S.plain_array(t[S.CONTENT_SHA256]),
                     CHANGE_TYPE: S.plain_array(t[CHANGE_TYPE]), COMMIT_VERSION: t[COMMIT_VERSION].cast(pa.int64())})


def collapse_changes(feed: pa.Table, from_version: int, to_version: int) -> ChangeSet:
    """The last change per doc_id of a change feed (module docstring: the rules).

    Args:
        feed: :data:`FEED_COLUMNS` rows, any order.
        from_version: exclusive start of the range the feed was read for.
        to_version: inclusive end.

    Raises:
        ChangeFeedUnavailable: a row outside the range (the feed does not match what was
            asked for) — the caller falls back to the full diff.
        ValueError: an unknown ``_change_type``, or a document without a doc_id.
    """
    types = pc.unique(feed[CHANGE_TYPE]).to_pylist() if feed.num_rows else []
    unknown = sorted(set(types) - set(CHANGE_TYPES), key=str)
    if unknown:
        raise ValueError(f"change feed has _change_type {unknown}; expected one of {list(CHANGE_TYPES)}")
    if feed.num_rows and feed[S.DOC_ID].null_count:
        raise ValueError("change feed has rows without a doc_id: corpus/documents must key every row by "
                         "doc_id; re-run `ciea ingest` to repair it")
    if feed.num_rows:
        lo, hi = pc.min(feed[COMMIT_VERSION]).as_py(), pc.max(feed[COMMIT_VERSION]).as_py()
        if lo <= from_version or hi > to_version:
            raise ChangeFeedUnavailable(f"feed rows from commits {lo}..{hi}, outside ({from_version}, {to_version}]")
    rows = feed.filter(pc.not_equal(feed[CHANGE_TYPE], UPDATE_PRE))
    # Rank within a commit: a delete and an insert of one doc_id in the same commit mean
    # "replaced", so the insert sorts last and wins.
    is_delete = pc.equal(rows[CHANGE_TYPE], DELETE)
    rows = rows.append_column("_rank", pc.if_else(is_delete, 0, 1))
    rows = rows.sort_by([(S.DOC_ID, "ascending"), (COMMIT_VERSION, "ascending"), ("_rank", "ascending")])
    ids = rows[S.DOC_ID].combine_chunks()
    n = len(ids)
    if n:
        last = pc.not_equal(ids.slice(0, n - 1), ids.slice(1))
        last = pa.concat_arrays([last, pa.array([True])])
    else:
        last = pa.array([], pa.bool_())
    final = rows.filter(last)
    deleted = pc.equal(final[CHANGE_TYPE], DELETE)
    upserts = final.filter(pc.invert(deleted))
    return ChangeSet(
        from_version=from_version, to_version=to_version, method="cdf",
        upserts=_keys(upserts[S.DOC_ID], upserts[S.CONTENT_SHA256]),
        deletes=final.filter(deleted)[S.DOC_ID].combine_chunks().cast(pa.string()),
        feed_rows=feed.num_rows)


def diff_changes(source: pa.Table, table: pa.Table, from_version: int | None, to_version: int,
                 reason: str = "") -> ChangeSet:
    """The change set as a full diff by content hash: the fallback when the feed is gone.

    Args:
        source: ``doc_id``, ``content_sha256`` of every document at ``to_version``.
        table: the same two columns of every row of the LanceDB table.
    """
    source, table = _keys(source[S.DOC_ID], source[S.CONTENT_SHA256]), _keys(table[S.DOC_ID], table[S.CONTENT_SHA256])
    src_pair = pc.binary_join_element_wise(source[S.DOC_ID], source[S.CONTENT_SHA256], "\x00")
    tbl_pair = pc.binary_join_element_wise(table[S.DOC_ID], table[S.CONTENT_SHA256], "\x00")
    new = pc.invert(pc.is_in(src_pair, value_set=tbl_pair.combine_chunks()))
    gone = pc.invert(pc.is_in(table[S.DOC_ID], value_set=source[S.DOC_ID].combine_chunks()))
    deletes = pc.unique(table.filter(gone)[S.DOC_ID].combine_chunks())
    return ChangeSet(from_version=from_version, to_version=to_version, method="diff",
                     upserts=source.filter(new), deletes=deletes, reason=reason)


# ---------------------------------------------------------------------------------------
# The changed documents themselves (what the embedding stage reads)
# ---------------------------------------------------------------------------------------


def feed_documents(tables: Tables, changes: ChangeSet, doc_ids: pa.Array, columns: list[str]) -> pa.Table:
    """The post-images of ``doc_ids`` from the change data feed: their rows at ``to_version``.

    The feed carries whole rows, so the documents to re-embed need not be looked up in
    the version (a scan of the whole corpus, whose rows are not sorted by doc_id): what is
    read follows the size of the change. A row is taken only when its ``content_sha256`` is
    the one the change set planned for the document (the last change in the range), the
    latest such commit if several.

    Args:
        changes: a ``cdf`` change set (its range and planned hashes).
        doc_ids: the documents wanted (a subset of ``changes.upserts``).
        columns: the document columns to return.

    Returns:
        ``columns`` of the documents found, one row each; a document the feed does not
        hold is left out (the caller reads it from the version: :func:`version_documents`).

    Raises:
        ChangeFeedUnavailable: the feed cannot be read for the range.
    """
    if changes.method != "cdf" or changes.from_version is None:
        raise ValueError(f"feed_documents needs a change set read from the feed, got method={changes.method}")
    wanted = changes.upserts.filter(pc.is_in(changes.upserts[S.DOC_ID], value_set=doc_ids))
    if wanted.num_rows == 0:
        return _empty(columns, tables)
    pairs = pc.binary_join_element_wise(wanted[S.DOC_ID], wanted[S.CONTENT_SHA256], "\x00").combine_chunks()
    read = list(dict.fromkeys([*columns, S.DOC_ID, S.CONTENT_SHA256, CHANGE_TYPE, COMMIT_VERSION]))
    parts = []
    try:
        dt = tables.documents_table()
        reader = dt.load_cdf(starting_version=changes.from_version + 1, ending_version=changes.to_version,
                             columns=read, predicate=f"{CHANGE_TYPE} IN ('{INSERT}', '{UPDATE_POST}')")
        for batch in pa.RecordBatchReader.from_stream(reader):
            # Filtered batch by batch: the feed of a merge also holds pre-images, the
            # feed of an append whole files; only the planned post-images are kept.
            b = S.plain_types(pa.Table.from_batches([batch.select(read)]))
            pair = pc.binary_join_element_wise(b[S.DOC_ID], b[S.CONTENT_SHA256], "\x00")
            keep = b.filter(pc.is_in(pair, value_set=pairs))
            if keep.num_rows:
                parts.append(keep)
    except Exception as e:  # as in read_change_feed: any reason the feed cannot be read
        raise ChangeFeedUnavailable(f"{type(e).__name__}: {e}") from e
    if not parts:
        return _empty(columns, tables)
    rows = pa.concat_tables(parts)
    rows = rows.set_column(rows.schema.get_field_index(COMMIT_VERSION), COMMIT_VERSION,
                           rows[COMMIT_VERSION].cast(pa.int64()))
    # The same content twice in the range (e.g. changed and changed back): the latest wins.
    rows = rows.sort_by([(S.DOC_ID, "ascending"), (COMMIT_VERSION, "descending")])
    ids = rows[S.DOC_ID].combine_chunks()
    first = pa.concat_arrays([pa.array([True]), pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1))])
    return rows.filter(first).select(columns)


def _empty(columns: list[str], tables: Tables) -> pa.Table:
    """No rows, with the columns' types as ``corpus/documents`` declares them (plain, not views)."""
    schema = tables.schema(tables.documents)
    return S.plain_types(pa.schema([schema.field(c) for c in columns]).empty_table())


def version_documents(tables: Tables, version: int, doc_ids: pa.Array, columns: list[str]) -> pa.Table:
    """``columns`` of ``doc_ids`` at a version of ``corpus/documents``, reading only the row
    groups that hold them.

    Each row group's ``doc_id`` column is read first (narrow); the other columns only of
    row groups with a wanted document. Not a filter pushed into the scan: files written
    by deltalake's merge carry ``string_view`` statistics, and pyarrow cannot compare
    them with a plain-string filter (``greater_equal`` has no such kernel), so any
    statistics-based pruning fails on them. Without a feed (the full-diff fallback) this
    is how the changed rows are found; it reads more than :func:`feed_documents` when
    changed documents are spread over every row group.
    """
    if len(doc_ids) == 0:
        return _empty(columns, tables)
    wanted = S.plain_array(doc_ids)
    ds = tables.dataset(tables.documents, version)
    parts = []
    for fragment in ds.get_fragments():
        pieces = fragment.split_by_row_group() if hasattr(fragment, "split_by_row_group") else [fragment]
        for piece in pieces:
            hit = pc.is_in(S.plain_array(piece.to_table(schema=ds.schema, columns=[S.DOC_ID])[S.DOC_ID]), value_set=wanted)
            if pc.any(hit).as_py():
                # Same row group, same row order: the mask applies to the wide read.
                parts.append(S.plain_types(piece.to_table(schema=ds.schema, columns=columns)).filter(hit))
    if not parts:
        return _empty(columns, tables)
    return pa.concat_tables(parts)


def changed_documents(tables: Tables, changes: ChangeSet, doc_ids: pa.Array,
                      columns: list[str]) -> tuple[pa.Table, dict[str, int]]:
    """The rows of ``doc_ids`` at ``changes.to_version``: from the feed when the change set
    came from it, the rest (or all, for a full diff) by a filtered scan of the version.

    Returns:
        (rows, {"feed": rows from the feed, "scan": rows from the version scan}).

    Raises:
        ValueError: a document is in neither (the corpus changed under the run).
    """
    rows = None
    from_feed = 0
    missing = doc_ids
    if changes.method == "cdf" and changes.from_version is not None and len(doc_ids):
        try:
            rows = feed_documents(tables, changes, doc_ids, columns)
            from_feed = rows.num_rows
            missing = pc.filter(doc_ids, pc.invert(pc.is_in(doc_ids, value_set=rows[S.DOC_ID].combine_chunks())))
        except ChangeFeedUnavailable as e:
            logger.warning("reading the changed documents from the feed failed (%s): scanning version %d instead",
                           e, changes.to_version)
    if len(missing):
        scanned = version_documents(tables, changes.to_version, missing, columns)
        rows = scanned if rows is None else pa.concat_tables([rows, scanned.cast(rows.schema)])
        if scanned.num_rows != len(missing):
            lost = sorted(set(missing.to_pylist()) - set(scanned[S.DOC_ID].to_pylist()))
            raise ValueError(f"{len(lost)} planned document(s) are not in corpus/documents@{changes.to_version} "
                             f"(e.g. {lost[:3]}): the corpus changed during the run; re-run `ciea reindex`")
    if rows is None:
        rows = _empty(columns, tables)
    return rows, {"feed": from_feed, "scan": rows.num_rows - from_feed}


# ---------------------------------------------------------------------------------------
# The plan against the table's current rows
# ---------------------------------------------------------------------------------------


def table_keys_for(dataset: Any, doc_ids: pa.Array, chunk: int = 1000) -> pa.Table:
    """``doc_id``, ``content_sha256`` of the table's rows of these documents only.

    Uses the ``doc_id`` BTree index when there is one, so the cost follows the change
    set, not the table.
    """
    parts = []
    ids = doc_ids.to_pylist()
    for i in range(0, len(ids), chunk):
        quoted = ", ".join("'" + d.replace("'", "''") + "'" for d in ids[i : i + chunk])
        parts.append(dataset.to_table(columns=[S.DOC_ID, S.CONTENT_SHA256], filter=f"{S.DOC_ID} IN ({quoted})"))
    if not parts:
        return _EMPTY_KEYS.empty_table()
    t = pa.concat_tables(parts)
    return _keys(t[S.DOC_ID], t[S.CONTENT_SHA256])


def plan_reindex(changes: ChangeSet, table: pa.Table) -> ReindexPlan:
    """What to delete and embed so the table holds ``changes.to_version``.

    Args:
        changes: the net change since the table's recorded version.
        table: ``doc_id``, ``content_sha256`` of the table's current rows — at least those
            of every doc_id in the change set (:func:`table_keys_for`).
    """
    table = _keys(table[S.DOC_ID], table[S.CONTENT_SHA256])
    up = changes.upserts
    tbl_pair = pc.binary_join_element_wise(table[S.DOC_ID], table[S.CONTENT_SHA256], "\x00").combine_chunks()
    up_pair = pc.binary_join_element_wise(up[S.DOC_ID], up[S.CONTENT_SHA256], "\x00")
    counts = pc.value_counts(table[S.DOC_ID].combine_chunks())
    dup = pa.array([c["values"] for c in counts.to_pylist() if c["counts"] > 1], pa.string())
    held = pc.is_in(up_pair, value_set=tbl_pair)
    # A held pair whose doc_id has two rows is repaired too: delete both, embed once.
    embed = pc.or_(pc.invert(held), pc.is_in(up[S.DOC_ID], value_set=dup))
    to_embed = up.filter(embed)[S.DOC_ID].combine_chunks()
    in_table = table[S.DOC_ID].combine_chunks()
    stale = set(pc.filter(to_embed, pc.is_in(to_embed, value_set=in_table)).to_pylist())
    gone_present = pc.is_in(changes.deletes, value_set=in_table)
    stale |= set(pc.filter(changes.deletes, gone_present).to_pylist())
    return ReindexPlan(
        to_embed=to_embed, stale=sorted(stale), unchanged=up.num_rows - len(to_embed),
        already_gone=len(changes.deletes) - pc.sum(gone_present.cast(pa.int64())).as_py() if len(changes.deletes) else 0,
        changes=changes)


# ---------------------------------------------------------------------------------------
# Indexes and the publish gate
# ---------------------------------------------------------------------------------------


def ann_to_build(trained: AnnPlan | None, wanted: AnnPlan | None, max_drift: float = 0.25) -> AnnPlan | None:
    """The ANN plan to hand to ``VectorTable.build_indexes`` after an incremental change.

    ``plan_ann_index`` sizes the partitions by ``sqrt(rows)``, so almost any change in the
    row count gives a slightly different plan; retraining k-means over the whole table for
    a 1 % change would cost a full index build each run. The trained index is kept (new
    rows are folded into it) while the table is within ``max_drift`` of the size it was
    trained at and the index kind and code size still match; beyond that, or when the
    rule now says "no index" or "an index" where the table had the other, the wanted plan
    is returned and the index is rebuilt (or dropped).
    """
    if trained is None or wanted is None:
        return wanted
    same_shape = (trained.kind, trained.num_sub_vectors, trained.dim) == (wanted.kind, wanted.num_sub_vectors, wanted.dim)
    drift = abs(wanted.rows - trained.rows) / max(trained.rows, 1)
    if same_shape and drift <= max_drift:
        return trained
    return wanted


@dataclass(frozen=True)
class GateResult:
    """The publish gate's verdict on a candidate version."""

    promote: bool
    metric: str
    candidate: float
    published: float | None
    tolerance: float
    reason: str


def gate_decision(candidate: float, published: float | None, tolerance: float, metric: str = "MRR@10") -> GateResult:
    """Promote when ``candidate >= published - tolerance`` (no published version: promote).

    A NaN score (no query could be evaluated) never promotes.
    """
    if published is None:
        return GateResult(True, metric, candidate, None, tolerance, "no published version to compare with")
    if math.isnan(candidate) or math.isnan(published):
        return GateResult(False, metric, candidate, published, tolerance,
                          f"{metric} is NaN (no dev query was evaluated): check the dev split's qrels")
    if candidate >= published - tolerance:
        return GateResult(True, metric, candidate, published, tolerance,
                          f"candidate {metric} {candidate:.4f} >= published {published:.4f} - tolerance {tolerance:g}")
    return GateResult(False, metric, candidate, published, tolerance,
                      f"candidate {metric} {candidate:.4f} < published {published:.4f} - tolerance {tolerance:g}: "
                      "the candidate is worse; the published version stays")
