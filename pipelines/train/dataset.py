"""Training examples for Ray Train, built with Ray Data from the Delta tables that ingest
writes (``corpus/documents``, ``queries/<split>``, ``qrels/<split>``) and, in stage 2, the
mined hard negatives (:mod:`pipelines.train.negatives`).

What the driver holds: the queries and qrels of a split (orders of magnitude smaller than
the corpus, as ingest treats them) and, for stage 2, each query's mined ids (top ``depth``
per modality): the *plan* (:func:`plan_examples`), ids only. What it never holds: document
contents, captions included.

Every epoch trains new draws, as the authors' release does: one image positive at random
among the query's image positives, and one image and one text hard negative at random from
the whole mined list (:mod:`pipelines.train.draws`: pure functions of seed, epoch and qid).
So the rows are (epoch, example) pairs, built for the epochs still to run:

1. the driver adds to the plan each query's place in every epoch (a fresh permutation per
   epoch, :func:`pipelines.train.draws.visit_order`) and hands it to Ray Data;
2. on the cluster, :func:`expand_epochs` turns each plan row into one row per epoch with
   that epoch's draws (ids): ``shard, epoch, slot, qid, query, relevant_ids, pos_id[,
   neg0_id, neg1_id]``; worker ``r`` of ``w`` gets the slots ``r, r + w, …``;
3. the documents, read by Ray Data and filtered to the ids the plan can need, are joined
   on (inner for the positive, left outer for the negatives), and so are the captions of
   each query's image positives (``positive_captions``, for ``q_comp``; skipped when every
   query has one candidate caption): map-side while those documents fit
   ``data.broadcast_join_mb`` (:mod:`pipelines.train.joins`), else hash-partitioned;
4. the rows are sorted by (shard, epoch, slot), materialised in the object store, and cut
   into one dataset per worker (:func:`build_train_shards`, :func:`shard_name`).

Each worker reads its dataset through one iterator for the whole run (:class:`EpochRows`),
one epoch at a time in order. Only the draws of the epochs still to run are joined: a row
carries its positive and two negatives, never the mined lists, so a run costs epochs ×
queries × 3 documents in the object store (what the release loads per epoch), against
queries × ~100 for joining every mined negative once. A resumed run (a re-run of a killed
job) builds the rows from its checkpoint's epoch on; a worker group restarted by Ray Train
skips the epochs it has trained; either way, since every draw and the visiting order are
functions of (seed, epoch, qid), it trains exactly the rows an uninterrupted run trains.
Why not a dataset per epoch: Ray Train fixes a run's datasets when the worker group starts,
and joining inside the workers would start Ray Data shuffles while the workers hold the
CPUs (the deadlock of STACK_NOTES.md on 2 CPUs).

Workers turn rows into ``TrainExample`` objects (:func:`rows_to_examples`) and collate them
with the model's processor. The rules are the in-memory path's, not re-invented: the
positive candidates come from :func:`pipelines.train.examples.positive_candidates` (a
source's ``target_doc_id`` when given, else the image positives, else the first positive),
the draws from :mod:`pipelines.train.draws`.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ciea_model.processor import TrainExample
from pipelines.store import schema as S
from pipelines.store.documents import (
    DOCUMENT_COLUMNS,
    batch_rows,
    expect_document,
    slot_column,
    slot_to_document,
)
from pipelines.train.draws import (
    MODALITY_ORDER,
    DrawSettings,
    choose_positive,
    composed_mixture,
    draw_composed_negatives,
    draw_negatives,
    visit_order,
)
from pipelines.train.examples import positive_candidates
from pipelines.train.joins import POSITIVE_CAPTIONS, DuplicateDocId, JoinDocuments

if TYPE_CHECKING:
    from pipelines.store.delta_tables import Tables

logger = logging.getLogger(__name__)

#: Document columns the training rows carry (``image_uri`` is resolved on the worker).
DOC_COLUMNS = DOCUMENT_COLUMNS
#: Prefixes of the joined document slots: the positive and up to two hard negatives.
POS, NEG_SLOTS = "pos", ("neg0", "neg1")
RELEVANT_IDS = "relevant_ids"
#: Plan columns (ids only): the query's positive candidates (its image positives, else its
#: text positives: the per-epoch choice is among them), its first candidate, the image
#: documents whose captions q_comp removes, and (stage 2) its mined lists.
CANDIDATES, FALLBACK, CAPTION_IDS = "candidate_ids", "fallback_id", "caption_ids"
MINED = {"image": "mined_image", "text": "mined_text"}
#: Plan and row columns of composed queries (present only when some query carries a
#: picture): the picture's bytes, and the documents that match it but not the change
#: (the reference first), from which their hard negatives are drawn in every stage.
QUERY_IMAGE, NEAR_MISSES = "query_image", "near_miss_ids"
LIST_ID_COLUMNS = (CANDIDATES, CAPTION_IDS, *MINED.values(), NEAR_MISSES)
#: Row columns: the worker that trains the row, its epoch and its place in that epoch
#: (``slots``: a plan row's places in every epoch), and the captions q_comp removes.
SHARD, EPOCH, SLOT, SLOTS = "shard", "epoch", "slot", "slots"
CAP = "cap"


def read_queries(tables: Tables, split: str) -> list[dict[str, Any]]:
    """The queries of ``split`` with their positives, in qid order (driver side; small):
    :meth:`pipelines.store.splits.Split.training_queries` of the store's one split reader.

    Raises:
        pipelines.store.splits.SplitNotFound: no such split (a ``FileNotFoundError``).
    """
    from pipelines.store.splits import read_split

    return read_split(tables, split).training_queries()


def read_documents(tables: Tables, version: int | None = None, columns: Sequence[str] = DOC_COLUMNS):
    """``corpus/documents`` as a lazy Ray Dataset (nothing is read in the driver), with the
    handle's storage options."""
    return tables.ray_dataset(tables.documents, version, columns=list(columns))


class _KeepIds:
    """``map_batches`` filter: rows whose ``doc_id`` is in a fixed id set."""

    def __init__(self, ids: Sequence[str]) -> None:
        self.ids = pa.array(sorted(set(ids)), pa.string())

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch = S.plain_types(batch)
        return batch.filter(pc.is_in(batch.column(S.DOC_ID), value_set=self.ids))


def filter_ids(ds, ids: Sequence[str]):
    """Rows of a documents dataset whose ``doc_id`` is in ``ids`` (a semi-join against a
    small id set, done where the data is)."""
    keep = _KeepIds(ids)
    return ds.map_batches(keep, batch_format="pyarrow")


def document_modalities(tables: Tables, ids: Sequence[str], version: int | None = None) -> dict[str, str]:
    """doc_id → modality for the given ids (read on the cluster; only the matches return)."""
    ds = filter_ids(read_documents(tables, version, columns=(S.DOC_ID, S.MODALITY)), ids)
    out: dict[str, str] = {}
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=65536):
        out.update(zip(batch.column(S.DOC_ID).to_pylist(), batch.column(S.MODALITY).to_pylist()))
    return out


@dataclass
class ExamplePlan:
    """The driver-side half of the training data: one row per usable query, ids only::

        qid, query, relevant_ids, candidate_ids, fallback_id, caption_ids
        [, mined_image, mined_text]   (stage 2: the mined lists, cut at the draw depth)
    """

    rows: pa.Table
    counts: dict[str, int]

    @property
    def needed_ids(self) -> list[str]:
        """Every document a row of any epoch may need (positives, captions, mined)."""
        ids: set[str] = set()
        for name in self.rows.column_names:
            if name == FALLBACK or name in LIST_ID_COLUMNS:
                for x in self.rows.column(name).to_pylist():
                    ids.update(x if isinstance(x, list) else [x] if x else [])
        return sorted(ids)

    @property
    def needs_captions(self) -> bool:
        """Whether ``q_comp`` of some query needs a caption other than the one of the
        positive it trains with (so the captions are joined per query; otherwise the
        positive's own caption is all). A query with two image positives and no target —
        44 % of WebQA's image queries — needs them whichever one an epoch draws."""
        columns = (CANDIDATES, CAPTION_IDS)
        return any(len(c) > 1 or (c and c != cands) for cands, c in zip(*(self.rows.column(x).to_pylist() for x in columns)))


def plan_examples(
    queries: Sequence[Mapping[str, Any]], modalities: Mapping[str, str],
    mined: Mapping[str, Mapping[str, Sequence[str]]] | None = None, depth: int = 100, comp_captions: str = "all",
) -> ExamplePlan:
    """Each usable query's candidates, ids only (the choices per epoch come later, in
    :func:`expand_epochs`).

    Args:
        queries: from :func:`read_queries`.
        modalities: doc_id → modality of the documents that exist (at least the positives
            and targets).
        mined: qid → {"image": [...], "text": [...]} best first (stage 2), or ``None``.
        depth: the draw depth: mined lists are kept to their top ``depth`` per modality.
        comp_captions: :attr:`pipelines.train.draws.DrawSettings.comp_captions`.
    """
    cols: dict[str, list[Any]] = {c: [] for c in (S.QID, S.QUERY, RELEVANT_IDS, CANDIDATES, FALLBACK, CAPTION_IDS)}
    if mined is not None:
        cols.update({MINED[m]: [] for m in MODALITY_ORDER})
    composed = any(q.get("image") is not None for q in queries)
    if composed:
        cols.update({QUERY_IMAGE: [], NEAR_MISSES: []})
    skipped = with_negatives = 0
    for q in queries:
        candidates, fallback, caption_ids = positive_candidates(q, modalities, comp_captions)
        if fallback is None:
            skipped += 1
            continue
        for c, v in ((S.QID, q["qid"]), (S.QUERY, q["query"]), (RELEVANT_IDS, list(q["positive_doc_ids"])),
                     (CANDIDATES, candidates), (FALLBACK, fallback), (CAPTION_IDS, caption_ids)):
            cols[c].append(v)
        if mined is not None:
            lists = mined.get(q["qid"], {})
            for m in MODALITY_ORDER:
                cols[MINED[m]].append(list(lists.get(m, ()))[:depth])
            with_negatives += any(lists.get(m) for m in MODALITY_ORDER)
        if composed:
            cols[QUERY_IMAGE].append(q.get("image"))
            cols[NEAR_MISSES].append(list(q.get("near_miss_doc_ids") or ()) if q.get("image") is not None else [])
    types = {S.QID: pa.string(), S.QUERY: pa.string(), FALLBACK: pa.string(), QUERY_IMAGE: pa.binary()}
    table = pa.table({c: pa.array(v, types.get(c, pa.list_(pa.string()))) for c, v in cols.items()})
    counts = {"used": table.num_rows, "skipped_no_positive": skipped}
    if mined is not None:
        counts["with_negatives"] = with_negatives
    if skipped:
        logger.warning("%d queries have no positive in the corpus and were skipped", skipped)
    return ExamplePlan(table, counts)


def with_visit_order(plan: ExamplePlan, epochs: Sequence[int], seed: int) -> pa.Table:
    """The plan's rows plus ``slots``: each query's place in each of ``epochs``
    (:func:`pipelines.train.draws.visit_order`; the plan is in qid order)."""
    n = plan.rows.num_rows
    per_epoch = [visit_order(n, seed, e) for e in epochs]
    slots = [[int(s[i]) for s in per_epoch] for i in range(n)]
    return plan.rows.append_column(SLOTS, pa.array(slots, pa.list_(pa.int64())))


def expand_epochs(rows: pa.Table, epochs: Sequence[int], settings: DrawSettings, num_shards: int) -> pa.Table:
    """Plan rows (with ``slots``) → one row per (epoch, query) with that epoch's draws:
    ``shard, epoch, slot, qid, query, relevant_ids, pos_id[, neg0_id, neg1_id]``.

    A pure function of its arguments (the draws are functions of seed, epoch and qid), run
    on the cluster (:class:`_ExpandEpochs`) and in the unit tests alike. Worker ``r`` of
    ``num_shards`` trains the rows with ``shard == r``: slots ``r, r + num_shards, …``.
    """
    staged = NEG_SLOTS if MINED["image"] in rows.column_names or NEAR_MISSES in rows.column_names else ()
    composed = QUERY_IMAGE in rows.column_names
    out: dict[str, list[Any]] = {c: [] for c in (SHARD, EPOCH, SLOT, S.QID, S.QUERY, RELEVANT_IDS,
                                                 f"{POS}_id", *(f"{s}_id" for s in staged),
                                                 *((QUERY_IMAGE,) if composed else ()))}
    for row in rows.to_pylist():
        qid = row[S.QID]
        for epoch, slot in zip(epochs, row[SLOTS]):
            positive = choose_positive(qid, row[CANDIDATES], row[FALLBACK], settings, epoch)
            out[SHARD].append(slot % num_shards)
            out[EPOCH].append(epoch)
            out[SLOT].append(slot)
            for c in (S.QID, S.QUERY, RELEVANT_IDS):
                out[c].append(row[c])
            out[f"{POS}_id"].append(positive)
            if composed:
                out[QUERY_IMAGE].append(row[QUERY_IMAGE])
            if staged:
                mined = {m: row[MINED[m]] for m in MODALITY_ORDER} if MINED["image"] in row else None
                if composed and row[QUERY_IMAGE] is not None:
                    picks = draw_composed_negatives(qid, row[NEAR_MISSES] or (), mined,
                                                    {*row[RELEVANT_IDS], positive}, settings, epoch)
                else:
                    picks = draw_negatives(qid, mined, {*row[RELEVANT_IDS], positive}, settings, epoch)
                for i, s in enumerate(staged):
                    out[f"{s}_id"].append(picks[i] if len(picks) > i else None)
    types = {SHARD: pa.int64(), EPOCH: pa.int64(), SLOT: pa.int64(), S.QID: pa.string(), S.QUERY: pa.string(),
             RELEVANT_IDS: pa.list_(pa.string()), QUERY_IMAGE: pa.binary()}
    return pa.table({c: pa.array(v, types.get(c, pa.string())) for c, v in out.items()})


class _ExpandEpochs:
    """``map_batches`` UDF around :func:`expand_epochs`."""

    def __init__(self, epochs: Sequence[int], settings: DrawSettings, num_shards: int) -> None:
        self.epochs, self.settings, self.num_shards = list(epochs), settings, num_shards

    def __call__(self, batch: pa.Table) -> pa.Table:
        return expand_epochs(batch, self.epochs, self.settings, self.num_shards)


def shard_sizes(n: int, epochs: Sequence[int], num_shards: int) -> list[int]:
    """Rows of each shard over ``epochs`` when every epoch deals ``n`` slots round-robin."""
    return [len(epochs) * len(range(r, n, num_shards)) for r in range(num_shards)]


def _doc_side(docs, prefix: str, columns: Sequence[str] = DOC_COLUMNS):
    return docs.select_columns(list(columns)).rename_columns({c: slot_column(prefix, c) for c in columns})


def _caption_list(group: pa.Table) -> pa.Table:
    """``map_groups`` UDF: one query's (qid, cap_id, cap_caption) rows → its caption list."""
    group = S.plain_types(group).sort_by([(f"{CAP}_id", "ascending")])
    captions = [c or "" for c in group.column(f"{CAP}_{S.CAPTION}").to_pylist()]
    return pa.table({S.QID: pa.array([group.column(S.QID)[0].as_py()], pa.string()),
                     POSITIVE_CAPTIONS: pa.array([captions], pa.list_(pa.string()))})


class _CaptionRows:
    """``map_batches`` UDF over documents: a (qid, cap_id, cap_caption) row for every query
    an image document is a positive of (a map-side join against the small id mapping)."""

    def __init__(self, queries_of: Mapping[str, Sequence[str]]) -> None:
        self.queries_of = queries_of

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch = S.plain_types(batch)
        out: dict[str, list[Any]] = {S.QID: [], f"{CAP}_id": [], f"{CAP}_{S.CAPTION}": []}
        for doc_id, modality, caption in zip(*(batch.column(c).to_pylist() for c in (S.DOC_ID, S.MODALITY, S.CAPTION))):
            if modality != "image":
                continue
            for qid in self.queries_of.get(doc_id, ()):
                out[S.QID].append(qid)
                out[f"{CAP}_id"].append(doc_id)
                out[f"{CAP}_{S.CAPTION}"].append(caption)
        return pa.table({c: pa.array(v, pa.string()) for c, v in out.items()})


def caption_lists(plan: ExamplePlan, docs, num_partitions: int = 2):
    """qid → the captions of every image positive of the query (``q_comp`` removes their
    tokens), built on the cluster: the driver holds no caption."""
    queries_of: dict[str, list[str]] = {}
    for qid, ids in zip(plan.rows.column(S.QID).to_pylist(), plan.rows.column(CAPTION_IDS).to_pylist()):
        for d in ids:
            queries_of.setdefault(d, []).append(qid)
    rows = docs.map_batches(_CaptionRows(queries_of), batch_format="pyarrow")
    return rows.groupby(S.QID, num_partitions=num_partitions).map_groups(_caption_list, batch_format="pyarrow")


def epoch_dataset(plan: ExamplePlan, docs, epochs: Sequence[int], settings: DrawSettings, num_shards: int,
                  num_partitions: int = 2, broadcast_mb: float = 64):
    """The training rows of ``epochs`` (lazy), sorted by (shard, epoch, slot): the plan is
    expanded on the cluster (:func:`expand_epochs`), then joined with the documents: an
    inner join for the positive, left outer joins for the negatives and the caption lists.

    The documents are materialised once in the object store. Up to ``broadcast_mb`` they are
    joined map-side (:mod:`pipelines.train.joins`: every task holds them, nothing is
    shuffled); above it, with Ray Data's hash-partitioned joins (``Dataset.join``), which
    scale with the corpus but start shuffle actors per join (tens of seconds on a few
    hundred rows). Both routes give the same rows.

    Args:
        plan: from :func:`plan_examples`.
        docs: the documents dataset (:func:`read_documents`), ideally pre-filtered to
            ``plan.needed_ids`` with :func:`filter_ids` so the joins move only those.
        num_partitions: hash partitions of each join (the hash route).
        broadcast_mb: the documents' size up to which the join is map-side (0: never).
    """
    import ray.data

    rows = with_visit_order(plan, epochs, settings.seed)
    ds = ray.data.from_arrow(rows).map_batches(
        _ExpandEpochs(epochs, settings, num_shards), batch_format="pyarrow", batch_size=max(1, 4096 // len(epochs)))
    names = plan.rows.column_names
    slots = (POS, *NEG_SLOTS) if MINED["image"] in names or NEAR_MISSES in names else (POS,)
    docs = docs.select_columns(list(DOC_COLUMNS)).materialize()
    if broadcast_mb > 0 and docs.size_bytes() <= broadcast_mb * 2**20:
        captions = None
        if plan.needs_captions:
            captions = dict(zip(plan.rows.column(S.QID).to_pylist(), plan.rows.column(CAPTION_IDS).to_pylist()))
        ds = ds.map_batches(JoinDocuments(docs.to_arrow_refs(), slots, POS, captions), batch_format="pyarrow")
    else:
        ds = ds.join(_doc_side(docs, POS), join_type="inner", num_partitions=num_partitions, on=(f"{POS}_id",))
        for slot in slots[1:]:
            ds = ds.join(_doc_side(docs, slot), join_type="left_outer", num_partitions=num_partitions,
                         on=(f"{slot}_id",))
        if plan.needs_captions:
            ds = ds.join(caption_lists(plan, docs, num_partitions), join_type="left_outer",
                         num_partitions=num_partitions, on=(S.QID,))
    return ds.sort([SHARD, EPOCH, SLOT])


def shard_name(rank: int) -> str:
    """The name of worker ``rank``'s training dataset (``ray.train.get_dataset_shard``)."""
    return f"train-{rank}"


def captioned_image_ids(batch: pa.Table) -> pa.Table:
    """``map_batches``: the ``doc_id`` of every image document with a non-blank caption."""
    batch = S.plain_types(batch)
    caption = pc.utf8_trim_whitespace(pc.fill_null(batch.column(S.CAPTION), ""))
    keep = pc.and_(pc.equal(pc.fill_null(batch.column(S.MODALITY), ""), "image"),
                   pc.greater(pc.utf8_length(caption), 0))
    return pa.table({S.DOC_ID: batch.filter(keep).column(S.DOC_ID)})


def caption_pairs(tables: Tables, version: int | None = None, max_pairs: int | None = None) -> list[dict[str, Any]]:
    """Stage 0's examples (MARVEL's visual pretraining): every image document with a
    caption, as a query-shaped record whose positive is the document itself (``query`` is
    left empty: the caption is joined with the document on the cluster, never read here).
    The ids are found by Ray Data tasks; only they reach the driver, in id order. With
    ``max_pairs`` the driver keeps the ``max_pairs`` smallest ids as batches arrive (never
    more, whatever the corpus holds); without it, every captioned image's id (≈ 100 B each:
    a corpus of billions wants the cap, ``data.max_train_queries``)."""
    ds = read_documents(tables, version, columns=(S.DOC_ID, S.MODALITY, S.CAPTION))
    batches = ds.map_batches(captioned_image_ids, batch_format="pyarrow").iter_batches(batch_format="pyarrow")
    ids = smallest_ids((b.column(S.DOC_ID) for b in batches), max_pairs)
    return [{"qid": d, "query": "", "positive_doc_ids": [d], "target_doc_id": d} for d in ids]


def smallest_ids(columns: Iterable[pa.Array | pa.ChunkedArray], n: int | None) -> list[str]:
    """The ``n`` smallest ids of a stream of id columns, in order (all when ``n`` is None),
    holding at most ``2 n`` plus one column's ids at a time."""
    kept = pa.array([], pa.string())

    def cut(ids: pa.Array) -> pa.Array:
        ordered = ids.take(pc.sort_indices(ids))
        return ordered if n is None else ordered.slice(0, n)

    for col in columns:
        col = S.plain_array(col)
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        kept = pa.concat_arrays([kept, col.cast(pa.string())])
        if n is not None and len(kept) > 2 * n:
            kept = cut(kept)
    return cut(kept).to_pylist()


def build_train_shards(
    tables: Tables, split: str, *,
    epochs: Sequence[int], num_shards: int, settings: DrawSettings | None = None, version: int | None = None,
    mined: Mapping[str, Mapping[str, Sequence[str]]] | None = None, max_queries: int | None = None,
    num_partitions: int = 2, broadcast_mb: float = 64, queries: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[dict[str, Any], dict[str, int]]:
    """The training rows of ``split`` for ``epochs``, materialised in the object store (not
    the driver) and cut into one dataset per worker (:func:`shard_name`), each in epoch
    order. Returns them and the counts (``rows``: rows per epoch).

    ``queries``: the examples to train on instead of ``split``'s queries (stage 0's
    :func:`caption_pairs`).

    Raises:
        ValueError: no query, or none with a positive in the corpus.
    """
    settings = settings or DrawSettings()
    epochs = list(epochs)
    if queries is None:
        queries = composed_mixture(read_queries(tables, split), settings.composed_share, settings.seed)
        if max_queries is not None:
            queries = queries[:max_queries]
        if not queries:
            raise ValueError(f"queries/{split} under {tables.root} is empty: ingest queries for split {split!r} first")
    elif not queries:
        raise ValueError(f"{tables.documents} holds no image document with a caption: visual pretraining "
                         "(stage 0) aligns images with their captions; ingest some first")
    # doc_id → modality (ids only) of every target and of the positives of queries without
    # one (among which the per-epoch choice is made): a positive known to exist, so the
    # inner join drops no row and the shards stay even.
    need = sorted({d for q in queries for d in ([q["target_doc_id"]] if q.get("target_doc_id")
                                                 else q["positive_doc_ids"])})
    modalities = document_modalities(tables, need, version)
    plan = plan_examples(queries, modalities, mined, depth=settings.depth, comp_captions=settings.comp_captions)
    if plan.counts["used"] == 0:
        raise ValueError(
            f"no query of split {split!r} has a positive in {tables.documents}: the qrels "
            "point at documents that were never ingested (or were quarantined)")
    docs = filter_ids(read_documents(tables, version), plan.needed_ids)
    sizes = shard_sizes(plan.counts["used"], epochs, num_shards)
    not_unique = (f"({plan.counts['used']} queries × {len(epochs)} epochs): a doc_id of {tables.documents} "
                  "is not unique")
    try:
        ds = epoch_dataset(plan, docs, epochs, settings, num_shards, num_partitions, broadcast_mb).materialize()
    except Exception as e:  # the map-side join refuses a doc_id twice; Ray wraps the error
        if not _caused_by(e, DuplicateDocId):
            raise
        raise ValueError(f"the training rows cannot be joined {not_unique}") from None
    total = ds.count()
    if total != sum(sizes):
        raise ValueError(f"the training rows number {total}, not {sum(sizes)} {not_unique}")
    cuts = [sum(sizes[: r + 1]) for r in range(num_shards - 1)]
    parts = ds.split_at_indices(cuts) if cuts else [ds]
    counts = {**plan.counts, "rows": plan.counts["used"], "epochs": len(epochs)}
    return {shard_name(r): part for r, part in enumerate(parts)}, counts


def _caused_by(error: BaseException | None, kind: type[BaseException]) -> bool:
    while error is not None:
        if isinstance(error, kind):
            return True
        error = error.__cause__ or error.__context__
    return False


def dev_documents_dataset(tables: Tables, queries: Sequence[Mapping[str, Any]], version: int | None = None,
                          pool: int | None = None, seed: int = 0):
    """Documents rank 0 scores dev queries against: the whole corpus (``pool=None``), or
    every dev positive plus about ``pool`` other documents picked by a hash of their id."""
    docs = read_documents(tables, version)
    if pool is None:
        return docs
    positives = sorted({d for q in queries for d in q["positive_doc_ids"]})
    total = docs.count()
    keep = _KeepPool(positives, fraction=min(1.0, pool / max(1, total)), seed=seed)
    return docs.map_batches(keep, batch_format="pyarrow")


class _KeepPool:
    def __init__(self, ids: Sequence[str], fraction: float, seed: int) -> None:
        self.ids = pa.array(ids, pa.string())
        self.fraction, self.seed = fraction, seed

    def __call__(self, batch: pa.Table) -> pa.Table:
        import hashlib

        batch = S.plain_types(batch)
        ids = batch.column(S.DOC_ID).to_pylist()
        lucky = [int.from_bytes(hashlib.blake2b(f"{self.seed}:{d}".encode(), digest_size=8).digest(), "little")
                 / 2**64 < self.fraction for d in ids]
        mask = pc.or_(pc.is_in(batch.column(S.DOC_ID), value_set=self.ids), pa.array(lucky))
        return batch.filter(mask)


# ---- worker side ---------------------------------------------------------------------------
class EpochRows:
    """One worker's rows, which arrive sorted by (epoch, slot) through a single iterator that
    lasts the whole run, cut into the micro-batches of one epoch at a time.

    :meth:`epoch` skips rows of earlier epochs (the tail a rank leaves when all ranks agree
    that an epoch is over, or the epochs a restarted worker group has already trained) and
    stops at the first row of a later one, which it keeps for the next call.

    Args:
        batches: the shard's batches (``iter_batches(batch_format="pyarrow")``), in order.
        micro_batch: rows per micro-batch (the last one of an epoch may have fewer).
        shuffle: rows of a window shuffled together within an epoch, seeded by
            (``seed``, epoch, ``rank``, window) so that a resumed epoch repeats the order
            (0: the arriving order, itself a fresh random permutation every epoch).

    Raises:
        RuntimeError: from :meth:`epoch`, when rows arrive out of epoch order.
    """

    def __init__(self, batches: Iterable[pa.Table], micro_batch: int, shuffle: int = 0, seed: int = 0,
                 rank: int = 0) -> None:
        self._source = iter(batches)
        self._pending: pa.Table | None = None
        self._latest = -1
        self.micro_batch = micro_batch
        self.window = max(micro_batch, -(-shuffle // micro_batch) * micro_batch) if shuffle else micro_batch
        self.shuffle, self.seed, self.rank = bool(shuffle), seed, rank

    def _next_table(self) -> pa.Table | None:
        if self._pending is not None:
            table, self._pending = self._pending, None
            return table
        for table in self._source:
            if table.num_rows:
                epochs = table.column(EPOCH).to_numpy()
                if (np.diff(epochs) < 0).any() or epochs[0] < self._latest:
                    raise RuntimeError("training rows arrived out of epoch order: build the shards with "
                                       "build_train_shards (sorted by shard, epoch, slot)")
                self._latest = int(epochs[-1])
                return table
        return None

    def _rows(self, epoch: int) -> Iterator[pa.Table]:
        # This epoch's rows, table by table; a later epoch's first rows go back to _pending.
        while (table := self._next_table()) is not None:
            epochs = table.column(EPOCH).to_numpy()
            start, stop = int(np.searchsorted(epochs, epoch, "left")), int(np.searchsorted(epochs, epoch, "right"))
            if stop < table.num_rows:
                self._pending = table.slice(stop)
            if stop > start:
                yield table.slice(start, stop - start)
            if self._pending is not None:
                return

    def epoch(self, epoch: int) -> Iterator[pa.Table]:
        """The micro-batches of ``epoch`` (this worker's rows of it, in order)."""
        buffered: list[pa.Table] = []
        n = window = 0
        for part in self._rows(epoch):
            buffered.append(part)
            n += part.num_rows
            while n >= self.window:
                table = pa.concat_tables(buffered)
                yield from self._cut(table.slice(0, self.window), epoch, window)
                rest = table.slice(self.window)
                buffered, n, window = [rest], rest.num_rows, window + 1
        if n:
            yield from self._cut(pa.concat_tables(buffered), epoch, window)

    def _cut(self, table: pa.Table, epoch: int, window: int) -> Iterator[pa.Table]:
        if self.shuffle:
            rng = np.random.default_rng([self.seed % 2**64, epoch, self.rank, window])
            table = table.take(pa.array(rng.permutation(table.num_rows)))
        for start in range(0, table.num_rows, self.micro_batch):
            yield table.slice(start, self.micro_batch)


def rows_to_examples(batch: pa.Table | Mapping[str, Sequence[Any]], storage_options: dict[str, str] | None = None) -> list[TrainExample]:
    """Joined rows → :class:`TrainExample` objects; ``q_comp`` removes the captions of every
    image positive of the query (``positive_captions``; without that column, the positive's
    own caption is the only one), as :func:`pipelines.train.examples.training_examples` does."""
    out = []
    for row in batch_rows(batch):
        pos = slot_to_document(row, POS, storage_options=storage_options)
        if pos is None:
            raise ValueError(f"training row for query {row.get('qid')!r} has no positive document: "
                             "build rows with build_train_shards (an inner join on the positive)")
        pos = expect_document(pos)
        # An empty negative slot (no draw, or a mined document gone from the corpus) is
        # skipped; one that is there but unreadable stops the run, as an unreadable positive does.
        negatives = tuple(expect_document(d) for d in (slot_to_document(row, s, storage_options=storage_options)
                                                       for s in NEG_SLOTS) if d is not None)
        captions: tuple[str, ...] = ()
        if pos.modality == "image":
            listed = row.get(POSITIVE_CAPTIONS) or ()
            captions = (*listed, pos.caption) if pos.caption not in listed else tuple(listed)
        out.append(TrainExample(
            qid=str(row["qid"]), query=str(row[S.QUERY]), positive=pos, negatives=negatives,
            relevant_ids=frozenset(row[RELEVANT_IDS] or ()), positive_captions=captions,
            query_image=row.get(QUERY_IMAGE),
        ))
    return out
