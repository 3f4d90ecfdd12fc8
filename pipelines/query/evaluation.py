"""Retrieval evaluation: query splits from Delta, runs from a search table or an in-process
checkpoint, scores from :mod:`pipelines.query.metrics`.

Two ways to produce a run (query id → ranked doc ids):

* **a LanceDB table** through :class:`pipelines.query.search.Searcher` (vector, full-text or
  hybrid mode): what readers of a published table actually get, ANN index included.
  :func:`evaluate_searcher` is also the publish gate of ``ciea reindex``.
* **a checkpoint** that encodes the corpus in-process and ranks exhaustively by cosine
  (:func:`encode_corpus`, :func:`encode_delta_corpus`, :func:`rank`): dev early stopping,
  the demo, and corpora small enough to hold in memory.

Reports are split by group as well as overall: by query metadata keys (``kind`` for the
synthetic corpus: caption / image / text) and by *answer modality*, the modality of a
query's relevant documents (``image``, ``text`` or ``mixed``). Group labels read
``"<key>=<value>"`` (``"kind=image"``, ``"modality=text"``), so one report holds several
groupings side by side.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ciea_model.inference import encode_documents, encode_queries
from ciea_model.model import CIEAModel
from ciea_model.processor import CIEAProcessor, Document
from pipelines.query.metrics import (
    RetrievalReport,
    evaluate_run,
    group_means,
    metric_names,
    topk_from_scores,
)
from pipelines.store import schema as S
from pipelines.store.documents import DOCUMENT_COLUMNS, batch_to_documents

if TYPE_CHECKING:
    from pipelines.query.search import Searcher
    from pipelines.store.delta_tables import Tables

logger = logging.getLogger(__name__)

__all__ = [
    "ANSWER_MODALITY",
    "DEFAULT_KS_MRR",
    "DEFAULT_KS_GRADED_NDCG",
    "DEFAULT_KS_NDCG",
    "DEFAULT_KS_RECALL",
    "DEFAULT_KS_SUCCESS",
    "IMAGE_INDEX_GROUP",
    "EncodedCorpus",
    "EvaluationError",
    "SearchRun",
    "add_image_index_group",
    "check_coverage",
    "corpus_doc_ids",
    "encode_corpus",
    "encode_delta_corpus",
    "evaluate",
    "evaluate_grouped",
    "evaluate_searcher",
    "image_doc_ids",
    "image_only",
    "load_split",
    "query_groupings",
    "rank",
    "search_run",
    "searcher_doc_ids",
]

#: Cutoffs of the evaluation report (issue 6): MRR@10/@20, NDCG@10/@20, Recall@1/5/20/100.
DEFAULT_KS_MRR: tuple[int, ...] = (10, 20)
DEFAULT_KS_NDCG: tuple[int, ...] = (10, 20)
DEFAULT_KS_RECALL: tuple[int, ...] = (1, 5, 20, 100)
#: Success@k (trec_eval ``success_k``: a relevant document in the top k) beside Recall@k:
#: the release's "Recall@1" is Success@1 (issue 27).
DEFAULT_KS_SUCCESS: tuple[int, ...] = (1, 5, 20, 100)
#: Graded NDCG (``gNDCG@k``, gain = the qrels grade) beside the binary measures (issue 17).
DEFAULT_KS_GRADED_NDCG: tuple[int, ...] = (10, 20)

#: Query field and grouping name for the modality of a query's relevant documents.
ANSWER_MODALITY = "modality"
MIXED = "mixed"  # relevant documents of both modalities
UNKNOWN = "unknown"  # none of the relevant documents is in corpus/documents
#: Group of the image-answer queries ranked against the image documents alone: the release's
#: WebQA-Image protocol (a separate image-only index), ``metrics.webqa_image_protocol=release``.
IMAGE_INDEX_GROUP = "image-index"

SearchMode = Literal["vector", "fts", "hybrid"]


class EvaluationError(ValueError):
    """Bad evaluation input (no such split, an empty split, a table missing the judged
    documents, ...); the message names the fix."""


# ---------------------------------------------------------------------------------------
# In-memory corpus (checkpoint variants)
# ---------------------------------------------------------------------------------------


@dataclass
class EncodedCorpus:
    doc_ids: list[str]
    vectors: np.ndarray  # (N, D) float32, unit norm
    # doc_id → why it is not in ``doc_ids`` (an unreadable image); it ranks nowhere.
    failed: dict[str, str] = field(default_factory=dict)


def encode_corpus(
    model: CIEAModel, processor: CIEAProcessor, documents: Sequence[Document], batch_size: int = 64,
    device: str = "cpu",
) -> EncodedCorpus:
    vectors = encode_documents(model, processor, documents, batch_size, device=device)
    return EncodedCorpus([d.doc_id for d in documents], vectors)


def _iter_delta_documents(
    tables: Tables, version: int | None, batch_rows: int,
) -> Iterator[tuple[list[Document], dict[str, str]]]:
    """Batches of ``(documents, failures)`` from a Delta ``corpus/documents`` version; a row
    that cannot become a Document (an unreadable image) is a failure, doc_id → why, not an
    exception."""
    for batch in tables.dataset(tables.documents, version).to_batches(columns=list(DOCUMENT_COLUMNS),
                                                                      batch_size=batch_rows):
        docs, rejected = batch_to_documents(batch, storage_options=tables.storage_options)
        yield docs, {str(r.doc_id): str(r) for r in rejected}


def encode_delta_corpus(
    model: CIEAModel, processor: CIEAProcessor, tables: Tables, *, version: int | None = None,
    batch_size: int = 64, device: str = "cpu", progress: bool = False,
) -> EncodedCorpus:
    """Encodes a Delta ``corpus/documents`` version in-process, batch by batch (only the
    vectors are kept, never the decoded images).

    Args:
        model: the checkpoint's model (eval mode).
        processor: its processor.
        tables: the data root's Delta handle; its ``corpus/documents`` is encoded (image
            files are read with its storage options).
        version: Delta version (default: the latest).
        batch_size: documents per encoder call.
        device: torch device the model is on.
        progress: show a tqdm bar.

    Returns:
        The corpus; documents whose image cannot be read are in ``failed`` (logged).
    """
    import sys

    from tqdm import tqdm

    total = tables.dataset(tables.documents, version).count_rows()
    ids: list[str] = []
    parts: list[np.ndarray] = []
    failed: dict[str, str] = {}
    with tqdm(total=total, unit="doc", desc="encode corpus", disable=not progress, file=sys.stderr) as bar:
        # Read a few encoder batches at a time: the decoded images of one read are all
        # that is held in memory.
        for docs, bad in _iter_delta_documents(tables, version, batch_size * 4):
            if docs:
                enc = encode_corpus(model, processor, docs, batch_size, device=device)
                ids.extend(enc.doc_ids)
                parts.append(enc.vectors)
            failed.update(bad)
            bar.update(len(docs) + len(bad))
    if failed:
        first = next(iter(failed.items()))
        logger.warning("%d documents could not be read and rank nowhere (e.g. %s: %s)", len(failed), *first)
    vectors = np.concatenate(parts) if parts else np.zeros((0, model.dim), dtype=np.float32)
    return EncodedCorpus(ids, vectors, failed)


def rank(
    model: CIEAModel, processor: CIEAProcessor, corpus: EncodedCorpus,
    queries: Sequence[Mapping[str, Any]], k: int = 100, device: str = "cpu", *, scores: bool = False,
) -> dict[str, list[str]] | dict[str, dict[str, float]]:
    """qid → top-k doc ids by cosine, ties as trec_eval breaks them (doc id descending);
    with ``scores``, qid → doc id → cosine (best first), so the evaluation sees the ties."""
    q = encode_queries(model, processor, [x["query"] for x in queries], device=device)
    ranked = topk_from_scores(q @ corpus.vectors.T, corpus.doc_ids, k, with_scores=scores)
    return {x["qid"]: r for x, r in zip(queries, ranked)}


def image_only(corpus: EncodedCorpus, image_ids: set[str] | frozenset[str]) -> EncodedCorpus:
    """The image documents of an encoded corpus: the release's separate WebQA-Image index."""
    keep = [i for i, d in enumerate(corpus.doc_ids) if d in image_ids]
    return EncodedCorpus([corpus.doc_ids[i] for i in keep], corpus.vectors[keep])


def evaluate(
    model: CIEAModel, processor: CIEAProcessor, documents: Sequence[Document],
    queries: Sequence[Mapping[str, Any]], k: int = 100, group_key: str | None = "kind",
) -> RetrievalReport:
    """Encodes ``documents`` and ``queries`` and returns MRR@10, NDCG@10, Recall@k and
    Success@k, overall and per ``group_key`` value (the synthetic query kind by default)."""
    corpus = encode_corpus(model, processor, documents)
    run = rank(model, processor, corpus, queries, k=k, scores=True)
    qrels = {x["qid"]: set(x["positive_doc_ids"]) for x in queries}
    groups = {x["qid"]: str(x[group_key]) for x in queries} if group_key else None
    return evaluate_run(run, qrels, ks_recall=(1, 5, 10, 20, 100), groups=groups, ks_success=(1, 5, 10, 20, 100))


# ---------------------------------------------------------------------------------------
# Query splits in Delta
# ---------------------------------------------------------------------------------------


def load_split(
    tables: Tables, split: str, *, documents_version: int | None = None,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
    """Reads ``queries/<split>`` and ``qrels/<split>`` (written by ``ciea ingest``).

    Args:
        tables: the ingest data root's Delta handle (``Tables(root, storage_options)``).
        split: split name, e.g. ``"test"``.
        documents_version: ``corpus/documents`` version whose modalities give each
            query's answer modality (default: the latest).

    Returns:
        ``(queries, qrels)``. ``queries`` is a list (ordered by qid) of dicts shaped like
        :func:`pipelines.ingest.sources.synthetic.generator.generate_queries` output, so :func:`evaluate` and
        :func:`rank` take them too: ``qid``, ``query``, ``positive_doc_ids`` (relevance
        > 0, sorted), ``modality`` (answer modality: ``image``, ``text``, ``mixed`` or
        ``unknown``; ``None`` without judgments), ``metadata`` (dict) and every scalar
        metadata key at the top level unless it clashes (``kind`` for synthetic splits).
        ``qrels`` maps qid → doc_id → relevance for the queries of the split.

    Raises:
        EvaluationError: no such split (naming the ones there), an empty split, or a
            split without a single judged query.
    """
    from pipelines.store.splits import EmptySplit, SplitNotFound, read_split

    try:
        read = read_split(tables, split)
    except (SplitNotFound, EmptySplit) as e:
        raise EvaluationError(f"{e} (--split)") from None
    qids = {q[S.QID] for q in read.queries}
    qrels = read.qrels
    judged = {q for q, docs in qrels.items() if any(r > 0 for r in docs.values())}
    if not judged:
        raise EvaluationError(
            f"query split {split!r} has {len(qids)} queries but no relevant document in "
            f"{tables.qrels(split)}: nothing can be scored; re-ingest the source with its qrels")
    if len(judged) < len(qids):
        logger.warning("%d of %d queries in %s have no relevant document and are not scored",
                       len(qids) - len(judged), len(qids), split)

    modality_of = _document_modalities(
        tables, {d for docs in qrels.values() for d in docs}, documents_version)
    queries: list[dict[str, Any]] = []
    for row in read.queries:
        qid, text, meta = row[S.QID], row[S.QUERY], row["metadata"]
        positives = read.positives(qid)
        q: dict[str, Any] = {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))}
        q.update({S.QID: qid, S.QUERY: text, "positive_doc_ids": positives, "metadata": meta,
                  ANSWER_MODALITY: _answer_modality(positives, modality_of) if positives else None})
        queries.append(q)
    return queries, qrels


def _document_modalities(tables: Tables, doc_ids: set[str], version: int | None) -> dict[str, str]:
    """doc_id → modality for the judged documents (two narrow columns of the corpus)."""
    from pipelines.store.delta_tables import TableNotFoundError

    try:
        t = tables.read(tables.documents, columns=[S.DOC_ID, S.MODALITY], version=version)
    except TableNotFoundError:
        logger.warning("no corpus/documents at %s: answer modality is 'unknown' for every query", tables.documents)
        return {}
    return {d: m for d, m in zip(t[S.DOC_ID].to_pylist(), t[S.MODALITY].to_pylist()) if d in doc_ids}


def image_doc_ids(tables: Tables, version: int | None = None) -> set[str]:
    """Doc ids of the image documents of a ``corpus/documents`` version (two narrow columns):
    the candidates of the release's WebQA-Image protocol."""
    t = tables.read(tables.documents, columns=[S.DOC_ID, S.MODALITY], version=version)
    return {d for d, m in zip(t[S.DOC_ID].to_pylist(), t[S.MODALITY].to_pylist()) if m == "image"}


def corpus_doc_ids(tables: Tables, version: int | None = None) -> set[str]:
    """Doc ids of a ``corpus/documents`` version (one narrow column).

    Raises:
        EvaluationError: no corpus there, with the fix.
    """
    uri = tables.documents
    latest = tables.version(uri)
    if latest is None:
        raise EvaluationError(f"no corpus/documents at {uri}: run `ciea ingest --root <root>` first, or point "
                              "--root at the data root of the split")
    if version is not None and not 0 <= version <= latest:
        raise EvaluationError(f"corpus/documents at {uri} has versions 0..{latest}; version {version} "
                              "does not exist (omit it for the latest)")
    return set(tables.read(uri, columns=[S.DOC_ID], version=version)[S.DOC_ID].to_pylist())


def _answer_modality(positives: Sequence[str], modality_of: Mapping[str, str]) -> str:
    found = {modality_of[d] for d in positives if d in modality_of}
    if not found:
        return UNKNOWN
    return found.pop() if len(found) == 1 else MIXED


def query_groupings(
    queries: Sequence[Mapping[str, Any]], keys: Sequence[str] = ("kind",), answer_modality: bool = True,
) -> dict[str, dict[str, str]]:
    """Grouping name → qid → label, for :func:`evaluate_grouped`.

    Args:
        queries: as returned by :func:`load_split`.
        keys: query (metadata) keys to group by; a key no query has is left out.
        answer_modality: also group by the modality of the relevant documents.

    Returns:
        e.g. ``{"kind": {"test-000001": "image", ...}, "modality": {...}}``.
    """
    out: dict[str, dict[str, str]] = {}
    for key in [*keys, *([ANSWER_MODALITY] if answer_modality else [])]:
        labels = {str(q[S.QID]): str(q[key]) for q in queries if q.get(key) is not None}
        if labels:
            out[key] = labels
        else:
            logger.info("no query has %r; no grouping by it", key)
    return out


def evaluate_grouped(
    run: Mapping[str, Sequence[str] | Mapping[str, float]], qrels: Mapping[str, Any],
    groupings: Mapping[str, Mapping[str, str]],
    ks_mrr: Sequence[int] = DEFAULT_KS_MRR, ks_ndcg: Sequence[int] = DEFAULT_KS_NDCG,
    ks_recall: Sequence[int] = DEFAULT_KS_RECALL, ks_graded_ndcg: Sequence[int] = (),
    ks_success: Sequence[int] = (),
) -> RetrievalReport:
    """:func:`pipelines.query.metrics.evaluate_run` with several groupings in one report.

    The run is scored once (by the library); the groups are means of its per-query values.
    Group labels are ``"<grouping>=<label>"``, e.g. ``"kind=image"`` and
    ``"modality=text"``; ``num_ungrouped`` is the most any grouping left out.
    """
    report = evaluate_run(run, qrels, ks_mrr, ks_ndcg, ks_recall, ks_graded_ndcg=ks_graded_ndcg,
                          ks_success=ks_success)
    names = metric_names(ks_mrr, ks_ndcg, ks_recall, ks_graded_ndcg, ks_success)
    for name, labels in groupings.items():
        by_group, counts, ungrouped = group_means(
            names, report.per_query, {qid: f"{name}={label}" for qid, label in labels.items()})
        for label in sorted(by_group):
            report.by_group[label] = by_group[label]
            report.group_counts[label] = counts[label]
        report.num_ungrouped = max(report.num_ungrouped, ungrouped)
    return report


def add_image_index_group(
    report: RetrievalReport, run: Mapping[str, Sequence[str] | Mapping[str, float]], qrels: Mapping[str, Any],
    ks_mrr: Sequence[int] = DEFAULT_KS_MRR, ks_ndcg: Sequence[int] = DEFAULT_KS_NDCG,
    ks_recall: Sequence[int] = DEFAULT_KS_RECALL, ks_graded_ndcg: Sequence[int] = (),
    ks_success: Sequence[int] = (),
) -> RetrievalReport:
    """Adds group :data:`IMAGE_INDEX_GROUP`: the image-answer queries' ``run`` against the image
    documents alone (the release's WebQA-Image protocol), scored on their own. The overall
    means stay those of the shared index."""
    part = evaluate_run(run, {q: qrels[q] for q in run if q in qrels}, ks_mrr, ks_ndcg, ks_recall,
                        groups=dict.fromkeys(run, IMAGE_INDEX_GROUP), ks_graded_ndcg=ks_graded_ndcg,
                        ks_success=ks_success)
    if IMAGE_INDEX_GROUP in part.by_group:
        report.by_group[IMAGE_INDEX_GROUP] = part.by_group[IMAGE_INDEX_GROUP]
        report.group_counts[IMAGE_INDEX_GROUP] = part.group_counts[IMAGE_INDEX_GROUP]
    return report


def check_coverage(qrels: Mapping[str, Mapping[str, int]], doc_ids: set[str] | frozenset[str],
                   where: str, max_missing_fraction: float = 0.0) -> list[str]:
    """Checks that the judged (relevant) documents are in the searched corpus.

    A table embedded from another corpus (or an older version) would score near zero for
    reasons that have nothing to do with the model; this says so instead.

    Args:
        qrels: qid → doc_id → relevance.
        doc_ids: the doc ids the variant can return.
        where: the variant's table / corpus, for the message.
        max_missing_fraction: share of relevant documents allowed to be missing.

    Returns:
        The missing relevant doc ids (sorted), when within the allowance.

    Raises:
        EvaluationError: more are missing than allowed, with examples and the fix.
    """
    relevant = {d for docs in qrels.values() for d, r in docs.items() if r > 0}
    missing = sorted(relevant - set(doc_ids))
    if missing and len(missing) > max_missing_fraction * len(relevant):
        raise EvaluationError(
            f"{where} lacks {len(missing)} of the {len(relevant)} documents judged relevant by the "
            f"split (e.g. {', '.join(missing[:3])}): it was built from another corpus or version. "
            "Embed the corpus the split belongs to (`ciea embed --root <root>`), point --root at "
            "the split's corpus, or allow a share with --set max_missing_fraction=0.05")
    if missing:
        logger.warning("%s lacks %d of %d relevant documents (allowed by max_missing_fraction)",
                       where, len(missing), len(relevant))
    return missing


# ---------------------------------------------------------------------------------------
# Runs from a search table
# ---------------------------------------------------------------------------------------


@dataclass
class SearchRun:
    """A run from a :class:`~pipelines.query.search.Searcher`.

    Attributes:
        run: qid → doc id → the search's score, best first (a query whose search failed has
            ``{}``: it is scored 0, not dropped); trec_eval breaks equal scores by doc id.
        failed: qid → the error of its search.
    """

    run: dict[str, dict[str, float]]
    failed: dict[str, str] = field(default_factory=dict)


def search_run(
    searcher: Searcher, queries: Sequence[Mapping[str, Any]], *, k: int = 100, mode: SearchMode = "vector",
    batch_size: int = 64, progress: bool = False, **search_kwargs: Any,
) -> SearchRun:
    """Searches every query (in batches) and collects the ranked doc ids.

    A batch that fails is retried query by query, so one query the search rejects (e.g.
    full-text syntax) costs that query only.

    Raises:
        EvaluationError: every query failed (a broken table, a missing index): the
            numbers would be meaningless.
    """
    import sys

    from tqdm import tqdm

    out = SearchRun(run={})
    with tqdm(total=len(queries), unit="query", desc=f"search ({mode})", disable=not progress,
              file=sys.stderr) as bar:
        for start in range(0, len(queries), batch_size):
            part = queries[start : start + batch_size]
            texts = [str(q[S.QUERY]) for q in part]
            try:
                results = searcher.search_batch(texts, k=k, mode=mode, **search_kwargs)
            except Exception:
                results = None
            for i, q in enumerate(part):
                qid = str(q[S.QID])
                if results is not None:
                    hits = results[i]
                else:
                    try:
                        hits = searcher.search(texts[i], k=k, mode=mode, **search_kwargs)
                    except Exception as e:
                        out.failed[qid] = f"{type(e).__name__}: {e}"
                        hits = []
                out.run[qid] = {}
                for h in hits:
                    out.run[qid].setdefault(h.doc_id, float(h.score))
            bar.update(len(part))
    if out.failed:
        qid, err = next(iter(out.failed.items()))
        if len(out.failed) == len(queries):
            raise EvaluationError(f"every {mode} search failed (e.g. query {qid}: {err}); check the table's "
                                  "indexes (`ciea embed` builds them) and the search mode")
        logger.warning("%d of %d %s searches failed and score 0 (e.g. query %s: %s)",
                       len(out.failed), len(queries), mode, qid, err)
    return out


def searcher_doc_ids(searcher: Searcher, storage_options: Mapping[str, str] | None = None) -> set[str]:
    """Doc ids of the table version a searcher is pinned to (one narrow column)."""
    import lance

    from pipelines.store.lance_tables import VectorTable

    opts = dict(storage_options or {})
    uri = VectorTable(searcher.db_uri, searcher.name, opts).uri
    ds = lance.dataset(uri, version=searcher.version, storage_options=opts or None)
    return set(ds.to_table(columns=[S.DOC_ID])[S.DOC_ID].to_pylist())


def evaluate_searcher(
    searcher: Searcher, queries: Sequence[Mapping[str, Any]], qrels: Mapping[str, Mapping[str, int]], *,
    k: int = 100, mode: SearchMode = "vector", ks_mrr: Sequence[int] = DEFAULT_KS_MRR,
    ks_ndcg: Sequence[int] = DEFAULT_KS_NDCG, ks_recall: Sequence[int] = DEFAULT_KS_RECALL,
    ks_graded_ndcg: Sequence[int] = DEFAULT_KS_GRADED_NDCG, ks_success: Sequence[int] = DEFAULT_KS_SUCCESS,
    group_keys: Sequence[str] = ("kind",), batch_size: int = 64, progress: bool = False,
    max_missing_fraction: float | None = None, storage_options: Mapping[str, str] | None = None,
    **search_kwargs: Any,
) -> RetrievalReport:
    """Scores an opened table on a query split: the publish gate of ``ciea reindex``.

    Args:
        searcher: an opened :class:`~pipelines.query.search.Searcher` (the version to judge).
        queries, qrels: from :func:`load_split`.
        k: documents retrieved per query; at least the largest cutoff.
        mode: ``vector``, ``fts`` (BM25) or ``hybrid``.
        ks_mrr, ks_ndcg, ks_recall, ks_graded_ndcg, ks_success: metric cutoffs.
        group_keys: query keys to split the report by (plus the answer modality).
        batch_size: queries per ``search_batch`` call.
        progress: show a tqdm bar.
        max_missing_fraction: when given, first check that the table version holds the
            judged documents (at most this share missing; :func:`check_coverage`).
        storage_options: object-store settings for that check (never credentials).
        **search_kwargs: passed to the search (``nprobes``, ``refine_factor``, ``where``).

    Returns:
        The report (overall, per group, per query); ``report.value("MRR@10")`` is the gate.

    Raises:
        EvaluationError: ``k`` below a cutoff, the table lacks judged documents, or every
            search failed.
    """
    need = max((*ks_mrr, *ks_ndcg, *ks_recall, *ks_graded_ndcg, *ks_success), default=1)
    if k < need:
        raise EvaluationError(f"k={k} is below the largest metric cutoff {need}: retrieve k >= {need} "
                              "documents per query, or drop that cutoff")
    if max_missing_fraction is not None:
        check_coverage(qrels, searcher_doc_ids(searcher, storage_options),
                       f"table {searcher.db_uri}/{searcher.name}@{searcher.version}", max_missing_fraction)
    sr = search_run(searcher, queries, k=k, mode=mode, batch_size=batch_size, progress=progress, **search_kwargs)
    return evaluate_grouped(sr.run, qrels, query_groupings(queries, group_keys), ks_mrr, ks_ndcg, ks_recall,
                            ks_graded_ndcg, ks_success)

