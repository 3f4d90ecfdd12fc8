"""Retrieval evaluation: query splits from Delta, runs from a search table or an in-process
checkpoint, scores from :mod:`pipelines.query.metrics`.

Two ways to produce a run (query id → ranked doc ids):

* **a LanceDB table** through :class:`pipelines.query.search.Searcher` (vector, full-text or
  hybrid mode): what readers of a published table actually get, ANN index included.
  :func:`evaluate_searcher` is also the publish gate of ``ciea reindex``.
* **a checkpoint** that encodes the corpus in-process and ranks exhaustively by cosine
  (:func:`encode_corpus`, :func:`encode_delta_corpus`, :func:`rank`): dev early stopping,
  the demo, and corpora small enough to hold in memory.

A query that carries a picture (a composed query: reference image + modification text,
``image`` in ``queries/<split>``) is encoded with the document-side input construction
(picture + text through the document tower), like ``Searcher.search(image=..., text=...)``;
a model that encodes no image (``text-only``) and full-text search rank its text alone.
:func:`composed_runs` / :func:`composed_search_runs` rank the composed queries four ways side
by side (:data:`COMPOSED_ENCODINGS`: the reference image alone, the modification text alone,
their late fusion — the normalised sum, CLIP4Cir's baseline — and the model's composed
encoding); :func:`add_composed_groups` puts them in the report as groups
``composed=<encoding>``.

Reports are split by group as well as overall: by query metadata keys (``kind`` for the
synthetic corpus: caption / image / text / composed) and by *answer modality*, the modality of a
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
    "COMPOSED_ENCODINGS",
    "COMPOSED_GROUP",
    "add_composed_groups",
    "add_image_index_group",
    "composed_runs",
    "composed_search_runs",
    "encode_picture_queries",
    "encode_query_vectors",
    "picture_queries",
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

#: How the composed queries are encoded side by side (issue 25): the reference image alone
#: (through the document tower with an empty caption), the modification text alone (the
#: query tower), their late fusion (the normalised sum of those two, CLIP4Cir's baseline)
#: and the model's composed encoding (image + text through the document tower).
COMPOSED_ENCODINGS: tuple[str, ...] = ("image-only", "text-only", "late-fusion", "model")
#: Grouping name of those runs in a report: ``composed=image-only``, ... .
COMPOSED_GROUP = "composed"


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


def picture_queries(queries: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The queries that carry a picture (``image`` bytes): composed / image queries."""
    return [q for q in queries if q.get(S.IMAGE) is not None]


def encode_picture_queries(
    model: CIEAModel, processor: CIEAProcessor, queries: Sequence[Mapping[str, Any]], *, with_text: bool = True,
    batch_size: int = 64, device: str = "cpu",
) -> np.ndarray:
    """Queries with a picture → ``(n, D)`` unit vectors built as an image document is (the
    picture's patches, then the query text in the caption's place, through the shared
    encoder); ``with_text=False`` leaves the text out (the image-only baseline)."""
    docs = [Document(doc_id=str(q[S.QID]), modality="image", caption=str(q[S.QUERY] or "").strip() if with_text else "",
                     image=q[S.IMAGE]) for q in queries]
    return encode_documents(model, processor, docs, batch_size, device=device)


def encode_query_vectors(model: CIEAModel, processor: CIEAProcessor, queries: Sequence[Mapping[str, Any]],
                         device: str = "cpu") -> np.ndarray:
    """Every query's vector: a picture query through the document tower (when the model
    encodes images; else its text alone, logged), the rest through the query tower."""
    pics = [i for i, x in enumerate(queries) if x.get(S.IMAGE) is not None]
    if pics and not model.config.uses_images:
        logger.warning("%d queries carry a picture but a %r model encodes no image: they are ranked by their "
                       "text alone", len(pics), model.config.variant)
        pics = []
    texts = sorted(set(range(len(queries))) - set(pics))
    q = np.zeros((len(queries), model.dim), dtype=np.float32)
    if texts:
        q[texts] = encode_queries(model, processor, [queries[i]["query"] for i in texts], device=device)
    if pics:
        q[pics] = encode_picture_queries(model, processor, [queries[i] for i in pics], device=device)
    return q


def rank(
    model: CIEAModel, processor: CIEAProcessor, corpus: EncodedCorpus,
    queries: Sequence[Mapping[str, Any]], k: int = 100, device: str = "cpu", *, scores: bool = False,
) -> dict[str, list[str]] | dict[str, dict[str, float]]:
    """qid → top-k doc ids by cosine, ties as trec_eval breaks them (doc id descending);
    with ``scores``, qid → doc id → cosine (best first), so the evaluation sees the ties.
    A query with a picture is encoded with the document tower (:func:`encode_picture_queries`)."""
    q = encode_query_vectors(model, processor, queries, device)
    ranked = topk_from_scores(q @ corpus.vectors.T, corpus.doc_ids, k, with_scores=scores)
    return {x["qid"]: r for x, r in zip(queries, ranked)}


def composed_vectors(image: np.ndarray, text: np.ndarray, composed: np.ndarray) -> dict[str, np.ndarray]:
    """The :data:`COMPOSED_ENCODINGS` from the image-only, text-only and composed vectors
    (``(n, D)`` each, unit norm): late fusion is their normalised sum."""
    fused = image.astype(np.float32) + text.astype(np.float32)
    fused /= np.maximum(np.linalg.norm(fused, axis=1, keepdims=True), 1e-12)
    return dict(zip(COMPOSED_ENCODINGS, (image, text, fused, composed), strict=True))


def composed_runs(
    model: CIEAModel, processor: CIEAProcessor, corpus: EncodedCorpus, queries: Sequence[Mapping[str, Any]],
    k: int = 100, device: str = "cpu",
) -> dict[str, dict[str, dict[str, float]]]:
    """The picture queries ranked under each of :data:`COMPOSED_ENCODINGS`: encoding →
    qid → doc id → cosine (best first). Empty when no query has a picture or the model
    encodes no image."""
    pics = picture_queries(queries)
    if not pics or not model.config.uses_images:
        return {}
    vectors = composed_vectors(
        encode_picture_queries(model, processor, pics, with_text=False, device=device),
        encode_queries(model, processor, [str(q[S.QUERY]) for q in pics], device=device),
        encode_picture_queries(model, processor, pics, device=device))
    out = {}
    for name, v in vectors.items():
        ranked = topk_from_scores(v @ corpus.vectors.T, corpus.doc_ids, k, with_scores=True)
        out[name] = {str(q[S.QID]): r for q, r in zip(pics, ranked, strict=True)}
    return out


def composed_search_runs(
    searcher: Searcher, queries: Sequence[Mapping[str, Any]], *, k: int = 100, batch_size: int = 64,
    **search_kwargs: Any,
) -> dict[str, dict[str, dict[str, float]]]:
    """:func:`composed_runs` against a table: each encoding's vectors searched with
    ``searcher.search_vectors`` (``search_kwargs``: ``nprobes``, ``refine_factor``, ``where``).
    Empty when no query has a picture or the table's model encodes no image."""
    pics = picture_queries(queries)
    if not pics or not _encodes_pictures(searcher):
        return {}
    images = [q[S.IMAGE] for q in pics]
    texts = [str(q[S.QUERY]) for q in pics]
    vectors = composed_vectors(searcher.encode_pictures(images, None, batch_size=batch_size),
                               searcher.encode_queries(texts, batch_size=batch_size),
                               searcher.encode_pictures(images, texts, batch_size=batch_size))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, v in vectors.items():
        out[name] = {}
        for q, hits in zip(pics, searcher.search_vectors(v, k=k, **search_kwargs), strict=True):
            run = out[name][str(q[S.QID])] = {}
            for h in hits:
                run.setdefault(h.doc_id, float(h.score))
    return out


def add_composed_groups(
    report: RetrievalReport, runs: Mapping[str, Mapping[str, Sequence[str] | Mapping[str, float]]],
    qrels: Mapping[str, Any], ks_mrr: Sequence[int] = DEFAULT_KS_MRR, ks_ndcg: Sequence[int] = DEFAULT_KS_NDCG,
    ks_recall: Sequence[int] = DEFAULT_KS_RECALL, ks_graded_ndcg: Sequence[int] = (),
    ks_success: Sequence[int] = (),
) -> RetrievalReport:
    """Adds a group ``composed=<encoding>`` per run of :func:`composed_runs`, scored on its
    own (the overall means stay those of the variant's run)."""
    for name, run in runs.items():
        label = f"{COMPOSED_GROUP}={name}"
        part = evaluate_run(run, {q: qrels[q] for q in run if q in qrels}, ks_mrr, ks_ndcg, ks_recall,
                            groups=dict.fromkeys(run, label), ks_graded_ndcg=ks_graded_ndcg, ks_success=ks_success)
        if label in part.by_group:
            report.by_group[label] = part.by_group[label]
            report.group_counts[label] = part.group_counts[label]
    return report


def _encodes_pictures(searcher: Searcher) -> bool:
    config = getattr(getattr(searcher, "model", None), "config", None)
    return bool(getattr(config, "uses_images", False))


def image_only(corpus: EncodedCorpus, image_ids: set[str] | frozenset[str]) -> EncodedCorpus:
    """The image documents of an encoded corpus: the release's separate WebQA-Image index."""
    keep = [i for i, d in enumerate(corpus.doc_ids) if d in image_ids]
    return EncodedCorpus([corpus.doc_ids[i] for i in keep], corpus.vectors[keep])


def evaluate(
    model: CIEAModel, processor: CIEAProcessor, documents: Sequence[Document],
    queries: Sequence[Mapping[str, Any]], k: int = 100, group_key: str | None = "kind",
    composed_baselines: bool = False,
) -> RetrievalReport:
    """Encodes ``documents`` and ``queries`` and returns MRR@10, NDCG@10, Recall@k and
    Success@k, overall and per ``group_key`` value (the synthetic query kind by default);
    with ``composed_baselines``, also the groups of :func:`add_composed_groups` for the
    queries that carry a picture."""
    corpus = encode_corpus(model, processor, documents)
    run = rank(model, processor, corpus, queries, k=k, scores=True)
    qrels = {x["qid"]: set(x["positive_doc_ids"]) for x in queries}
    groups = {x["qid"]: str(x[group_key]) for x in queries} if group_key else None
    ks = {"ks_recall": (1, 5, 10, 20, 100), "ks_success": (1, 5, 10, 20, 100)}
    report = evaluate_run(run, qrels, groups=groups, **ks)
    if composed_baselines:
        runs = {name: r for name, r in composed_runs(model, processor, corpus, queries, k=k).items() if name != "model"}
        add_composed_groups(report, runs, qrels, (10,), (10,), **ks)
    return report


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
        if row.get(S.IMAGE) is not None:
            q[S.IMAGE] = row[S.IMAGE]  # a composed query's picture
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
    # A picture query is a vector search through the document tower; full-text search and a
    # model that encodes no image rank its text alone.
    pictures = mode == "vector" and _encodes_pictures(searcher)
    if not pictures and picture_queries(queries):
        logger.warning("%d queries carry a picture; %s search ranks their text alone", len(picture_queries(queries)),
                       mode if mode != "vector" else "this table's model encodes no image: its")
    with tqdm(total=len(queries), unit="query", desc=f"search ({mode})", disable=not progress,
              file=sys.stderr) as bar:
        for start in range(0, len(queries), batch_size):
            part = queries[start : start + batch_size]
            try:
                results = _batch_hits(searcher, part, k, mode, pictures, search_kwargs)
            except Exception:
                results = None
            for i, q in enumerate(part):
                qid = str(q[S.QID])
                if results is not None:
                    hits = results[i]
                else:
                    try:
                        hits = _batch_hits(searcher, [q], k, mode, pictures, search_kwargs)[0]
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


def _batch_hits(searcher: Searcher, part: Sequence[Mapping[str, Any]], k: int, mode: str, pictures: bool,
                kwargs: Mapping[str, Any]) -> list[list[Any]]:
    """One hit list per query of ``part``, in order: text queries in one ``search_batch``, the
    picture queries (when ``pictures``) in one ``search_pictures``."""
    pic = [i for i, q in enumerate(part) if pictures and q.get(S.IMAGE) is not None]
    text = [i for i in range(len(part)) if i not in set(pic)]
    out: list[list[Any]] = [[] for _ in part]
    if text:
        for i, hits in zip(text, searcher.search_batch([str(part[i][S.QUERY]) for i in text], k=k, mode=mode,
                                                       **kwargs), strict=True):
            out[i] = hits
    if pic:
        extra = {key: v for key, v in kwargs.items() if key in ("where", "nprobes", "refine_factor")}
        for i, hits in zip(pic, searcher.search_pictures([part[i][S.IMAGE] for i in pic],
                                                         [str(part[i][S.QUERY]) for i in pic], k=k, mode=mode,
                                                         **extra), strict=True):
            out[i] = hits
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

