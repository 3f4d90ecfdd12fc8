"""Hard negatives for stage 2 (ANCE): mine them with a stage-1 checkpoint, then attach them
to the training examples.

Mining ranks the mixed corpus for every training query, drops the query's positives and
keeps the top ``k``, labelled by modality. Two forms of it give the same lists:

* :func:`mine` — at corpus scale: embed the corpus with a stage-1 checkpoint on a Ray Data
  actor pool, score every query exactly against every document and write the result to a
  Delta table (:func:`run`, ``ciea mine-negatives``'s run on a typed
  :class:`~pipelines.train.config.MineConfig`). The corpus is never held in the driver: document
  vectors stream from the actors in batches, and the driver keeps only a running top-``k``
  per query (queries × k entries). Scores are exact (a dense matrix product per batch):
  this is the reference search; a corpus too large for it goes through the LanceDB index
  instead.
* :func:`mine_hard_negatives` — in memory, for corpora that fit in RAM (``ciea compare``).

Output table (``MINED_SCHEMA``): one row per (query, negative), ``rank`` 0-based within the
query's mixed top-k, so ``rank < depth`` per modality reproduces the in-memory lists.

Stage 2 then trains each query with one positive plus one image and one text hard
negative ("modality-balanced"), falling back to the other modality when one runs out, drawn
again every epoch from the whole mined list as the release does
(:func:`pipelines.train.draws.draw_negatives`; in memory: :func:`with_hard_negatives`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ciea_model.model import CIEAModel
from ciea_model.processor import CIEAProcessor, Document, TrainExample
from pipelines.store import schema as S
from pipelines.train.config import MineConfig
from pipelines.train.draws import DrawSettings, draw_negatives

if TYPE_CHECKING:
    from pipelines.store.delta_tables import Tables

logger = logging.getLogger(__name__)

RANK, SCORE, MODEL_ID = "rank", "score", "model_id"
VECTOR = "vector"
MINED_SCHEMA = pa.schema([
    pa.field(S.QID, pa.string(), nullable=False),
    pa.field(RANK, pa.int32(), nullable=False),
    pa.field(S.DOC_ID, pa.string(), nullable=False),
    pa.field(S.MODALITY, pa.string(), nullable=False),
    pa.field(SCORE, pa.float32(), nullable=False),
    pa.field(MODEL_ID, pa.string(), nullable=False),
])


class DocumentEncoder:
    """Ray Data actor: rows of ``corpus/documents`` → ``doc_id``, ``modality`` and a
    ``fixed_size_list<float32>[D]`` vector. Loads the checkpoint once per actor."""

    def __init__(self, checkpoint: str, storage_options: dict[str, str] | None = None,
                 threads: int | None = None) -> None:
        import torch

        from ciea_model import load_checkpoint
        from pipelines.store.storage import local_folder

        if threads:
            torch.set_num_threads(threads)
        with local_folder(checkpoint, storage_options) as local:  # an s3:// checkpoint: copied on this node
            self.model, self.processor = load_checkpoint(local)
        self.storage_options = storage_options

    def __call__(self, batch: pa.Table) -> pa.Table:
        from ciea_model.inference import encode_documents
        from pipelines.store.documents import batch_to_documents

        docs = batch_to_documents(batch, storage_options=self.storage_options).require()
        vectors = encode_documents(self.model, self.processor, docs, batch_size=len(docs) or 1)
        flat = pa.array(vectors.astype(np.float32).reshape(-1))
        return pa.table({
            S.DOC_ID: pa.array([d.doc_id for d in docs], pa.string()),
            S.MODALITY: pa.array([d.modality for d in docs], pa.string()),
            VECTOR: pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]),
        })


class RunningTopK:
    """Exact top-``k`` per query over document batches that arrive one at a time.

    Args:
        queries: (Q, D) unit query vectors.
        k: how many to keep per query.
        exclude: query index → doc ids never to keep (its positives).
    """

    def __init__(self, queries: np.ndarray, k: int, exclude: Sequence[set[str]]) -> None:
        self.q = queries.astype(np.float32)
        self.k = k
        self.exclude = exclude
        # doc_id → query rows that must not keep it: masking in the score matrix keeps the
        # search exact however many positives a query has.
        self.positive_rows: dict[str, list[int]] = {}
        for i, ids in enumerate(exclude):
            for d in ids:
                self.positive_rows.setdefault(d, []).append(i)
        n = len(queries)
        self.scores = np.full((n, 0), -np.inf, dtype=np.float32)
        self.ids = np.empty((n, 0), dtype=object)
        self.modality = np.empty((n, 0), dtype=object)

    def add(self, doc_ids: Sequence[str], modalities: Sequence[str], vectors: np.ndarray) -> None:
        s = self.q @ vectors.astype(np.float32).T  # (Q, B)
        for j, d in enumerate(doc_ids):
            rows = self.positive_rows.get(d)
            if rows:
                s[rows, j] = -np.inf
        ids = np.broadcast_to(np.asarray(doc_ids, dtype=object), s.shape)
        mods = np.broadcast_to(np.asarray(modalities, dtype=object), s.shape)
        scores = np.concatenate([self.scores, s], axis=1)
        all_ids = np.concatenate([self.ids, ids], axis=1)
        all_mods = np.concatenate([self.modality, mods], axis=1)
        if scores.shape[1] > self.k:
            top = np.argpartition(-scores, self.k - 1, axis=1)[:, : self.k]
            scores = np.take_along_axis(scores, top, axis=1)
            all_ids = np.take_along_axis(all_ids, top, axis=1)
            all_mods = np.take_along_axis(all_mods, top, axis=1)
        self.scores, self.ids, self.modality = scores, all_ids, all_mods

    def results(self) -> list[list[tuple[str, str, float]]]:
        """Per query, ``(doc_id, modality, score)`` best first (ties by doc_id), positives and
        empty slots left out."""
        out = []
        for i in range(self.scores.shape[0]):
            keep = [(self.ids[i, j], self.modality[i, j], float(self.scores[i, j]))
                    for j in range(self.scores.shape[1]) if np.isfinite(self.scores[i, j])]
            out.append(sorted(keep, key=lambda t: (-t[2], t[0])))
        return out


def mined_table(qids: Sequence[str], ranked: Sequence[Sequence[tuple[str, str, float]]], model_id: str) -> pa.Table:
    rows: dict[str, list[Any]] = {n: [] for n in MINED_SCHEMA.names}
    for qid, hits in zip(qids, ranked):
        for r, (doc_id, modality, score) in enumerate(hits):
            rows[S.QID].append(qid)
            rows[RANK].append(r)
            rows[S.DOC_ID].append(doc_id)
            rows[S.MODALITY].append(modality)
            rows[SCORE].append(score)
            rows[MODEL_ID].append(model_id)
    return pa.table(rows, schema=MINED_SCHEMA)


def split_by_modality(table: pa.Table, depth: int | None = None) -> dict[str, dict[str, list[str]]]:
    """Mined rows → qid → {"image": [...], "text": [...]} best first, each cut at ``depth``."""

    table = S.plain_types(table).sort_by([(S.QID, "ascending"), (RANK, "ascending")])
    out: dict[str, dict[str, list[str]]] = {}
    for qid, doc_id, modality in zip(*(table.column(c).to_pylist() for c in (S.QID, S.DOC_ID, S.MODALITY))):
        lists = out.setdefault(qid, {"image": [], "text": []})
        if depth is None or len(lists[modality]) < depth:
            lists[modality].append(doc_id)
    return out


def read_mined(tables: Tables, uri: str, depth: int | None = None,
               expect_model_id: str | None = None) -> dict[str, dict[str, list[str]]]:
    """Reads a mined-negatives table at ``uri``, opened through ``tables`` (the data root's
    handle: its storage options) (see :func:`split_by_modality`).

    Raises:
        FileNotFoundError: no table at ``uri``.
        ValueError: the table was mined with another model than ``expect_model_id``.
    """
    from pipelines.store.delta_tables import TableNotFoundError

    try:
        table = tables.read(uri, columns=[S.QID, RANK, S.DOC_ID, S.MODALITY, MODEL_ID])
    except TableNotFoundError:
        raise FileNotFoundError(f"no mined negatives at {uri}: run `ciea mine-negatives --output {uri}` first") from None
    ids = set(table.column(MODEL_ID).cast(pa.string()).unique().to_pylist())
    if expect_model_id is not None and ids and ids != {expect_model_id}:
        raise ValueError(f"negatives at {uri} were mined with model(s) {sorted(ids)}, not {expect_model_id}: "
                         "re-mine with the checkpoint stage 2 starts from")
    return split_by_modality(table, depth)


def mine(
    checkpoint: str, tables: Tables, split: str, k: int = 100, version: int | None = None, pool_size: int = 1, cpus_per_actor: float = 1.0, batch_size: int = 64,
    threads: int | None = None, progress: bool = False,
) -> tuple[pa.Table, dict[str, Any]]:
    """Embeds ``corpus/documents`` and the queries of ``split`` with ``checkpoint`` and
    returns the mined table and a summary. Needs an initialised Ray.

    Args:
        tables: the data root's Delta handle (its storage options also read image files).
        k: negatives kept per query (over the mixed corpus, positives removed).
        pool_size / cpus_per_actor: the encoder actor pool; keep
            ``pool_size × cpus_per_actor + 1 ≤`` the cluster's CPUs (the read tasks need one).
    """
    import ray.data

    from ciea_model import load_checkpoint, model_id
    from pipelines.query.evaluation import encode_query_vectors
    from pipelines.store.storage import local_folder
    from pipelines.train.dataset import read_documents, read_queries

    with local_folder(checkpoint, tables.storage_options) as local:
        model, processor = load_checkpoint(local)
    mid = model_id(model)
    queries = read_queries(tables, split)
    if not queries:
        raise ValueError(f"queries/{split} under {tables.root} is empty: nothing to mine for")
    # A composed query (with a picture) is encoded as search encodes it: the document tower.
    q_vectors = encode_query_vectors(model, processor, queries)
    del model
    top = RunningTopK(q_vectors, k, [set(q["positive_doc_ids"]) for q in queries])
    ds = read_documents(tables, version).map_batches(
        DocumentEncoder, fn_constructor_kwargs={"checkpoint": checkpoint, "storage_options": tables.storage_options,
                                                "threads": threads},
        compute=ray.data.ActorPoolStrategy(size=pool_size), num_cpus=cpus_per_actor,
        batch_size=batch_size, batch_format="pyarrow",
    )
    n_docs = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="mine: documents", unit="doc")
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=1024):
        vectors = np.asarray(batch.column(VECTOR).combine_chunks().flatten(), dtype=np.float32).reshape(batch.num_rows, -1)
        top.add(batch.column(S.DOC_ID).to_pylist(), batch.column(S.MODALITY).to_pylist(), vectors)
        n_docs += batch.num_rows
        if bar is not None:
            bar.update(batch.num_rows)
    if bar is not None:
        bar.close()
    ranked = top.results()
    table = mined_table([q["qid"] for q in queries], ranked, mid)
    by_mod = {m: int(sum(1 for hits in ranked for h in hits if h[1] == m)) for m in ("image", "text")}
    summary = {"model_id": mid, "queries": len(queries), "documents": n_docs, "k": k,
               "rows": table.num_rows, "by_modality": by_mod}
    logger.info("mined %d negatives for %d queries over %d documents (%s)", table.num_rows, len(queries), n_docs, by_mod)
    return table, summary


def write_mined(tables: Tables, uri: str, table: pa.Table) -> int:
    """Overwrites the Delta table at ``uri`` with ``table`` (``tables``' storage options);
    returns the new version."""
    return tables.overwrite(uri, table)


def run(cfg: MineConfig) -> dict[str, Any]:
    """Mines with ``cfg.checkpoint`` (:func:`mine`) and overwrites the Delta table
    ``cfg.output`` (:func:`write_mined`). Needs an initialised Ray.

    Returns:
        The summary: counts, the checkpoint's ``model_id``, the table version, seconds.
    """
    t0 = time.perf_counter()
    tables = cfg.tables()
    table, summary = mine(cfg.checkpoint, tables, cfg.split, k=cfg.k, version=cfg.version, pool_size=cfg.pool_size,
                          cpus_per_actor=cfg.cpus_per_actor, batch_size=cfg.batch_size, threads=cfg.threads, progress=cfg.progress)
    summary["table_version"] = write_mined(tables, cfg.output, table)
    summary.update(output=cfg.output, seconds=round(time.perf_counter() - t0, 1))
    return summary


def mined_for(mined: Mapping[str, Mapping[str, Sequence[str]]], qid: str) -> dict[str, list[str]]:
    return {m: list(mined.get(qid, {}).get(m, ())) for m in ("image", "text")}


def mine_hard_negatives(
    model: CIEAModel, processor: CIEAProcessor, documents: Sequence[Document],
    queries: Sequence[Mapping[str, Any]], k: int = 100,
) -> dict[str, dict[str, list[str]]]:
    """In memory (a corpus that fits in RAM: ``ciea compare``): qid → {"image": [...],
    "text": [...]}, the top-``k`` non-relevant documents, best first."""
    from pipelines.query.evaluation import encode_corpus, rank

    modality = {d.doc_id: d.modality for d in documents}
    corpus = encode_corpus(model, processor, documents)
    ranked = rank(model, processor, corpus, queries, k=k + max(len(q["positive_doc_ids"]) for q in queries))
    mined: dict[str, dict[str, list[str]]] = {}
    for q in queries:
        positives = set(q["positive_doc_ids"])
        out: dict[str, list[str]] = {"image": [], "text": []}
        for doc_id in (d for d in ranked[q["qid"]] if d not in positives):
            if sum(map(len, out.values())) >= k:
                break
            out[modality[doc_id]].append(doc_id)
        mined[q["qid"]] = out
    return mined


def with_hard_negatives(
    examples: Sequence[TrainExample], mined: Mapping[str, Mapping[str, Sequence[str]]],
    documents: Mapping[str, Document], seed: int, depth: int = 100, epoch: int = 0,
    redraw_each_epoch: bool = True,
) -> list[TrainExample]:
    """Adds one image and one text hard negative per example, as epoch ``epoch`` of a run
    draws them (:func:`pipelines.train.draws.draw_negatives`: uniformly from the top
    ``depth`` of each modality minus the query's positives; when a modality has none, both
    come from the other). The Ray path draws its rows with the same function."""
    settings = DrawSettings(seed=seed, depth=depth, redraw_each_epoch=redraw_each_epoch)
    out = []
    for ex in examples:
        if ex.query_image is not None:
            # A composed query keeps its near misses (the reference first); a mined draw
            # fills the second place only when it has no other near miss, as the Ray rows do
            # (pipelines.train.draws.draw_composed_negatives).
            have = tuple(ex.negatives)
            if len(have) < 2:
                extra = draw_negatives(ex.qid, mined.get(ex.qid), ex.relevant_ids | {ex.positive.doc_id}
                                       | {d.doc_id for d in have}, settings, epoch)[: 2 - len(have)]
                have += tuple(documents[d] for d in extra)
            out.append(dataclasses.replace(ex, negatives=have))
            continue
        picks = draw_negatives(ex.qid, mined.get(ex.qid), ex.relevant_ids | {ex.positive.doc_id}, settings, epoch)
        out.append(dataclasses.replace(ex, negatives=tuple(documents[d] for d in picks)))
    return out
