"""Retrieval metrics (MRR@k, NDCG@k, Recall@k) that agree with trec_eval.

The binary metrics use binary relevance (grade > 0) over a ranked top-k list per query, graded
NDCG the grades themselves; all return
fractions in ``[0, 1]``; :func:`format_table` is the only place that scales by 100.

Conventions (chosen to match ``trec_eval`` run *without* ``-c``):

* ``MRR@k`` is trec_eval's ``recip_rank`` computed on the run truncated to the
  top ``k`` documents: ``1 / rank`` of the first relevant document, 0 if none of
  the top ``k`` is relevant.
* ``NDCG@k`` is trec_eval's ``ndcg_cut_k`` with binary gains:
  ``DCG@k = sum_{r <= k, doc_r relevant} 1 / log2(r + 1)`` (ranks 1-based), divided
  by the ideal DCG of ``min(k, #relevant)`` relevant documents at the top.
* ``Recall@k`` is trec_eval's ``recall_k``: ``|relevant ∩ top-k| / |relevant|``.
* ``gNDCG@k`` (graded NDCG) is trec_eval's ``ndcg_cut_k`` on graded qrels: the gain of a
  document is its grade (grades ``<= 0`` gain nothing), the ideal DCG ranks the ``k``
  highest grades first. With binary qrels it equals ``NDCG@k``. It is reported only for
  the cutoffs asked for (``ks_graded_ndcg``) and averaged over the same queries as the
  binary measures (those with at least one document of grade ``> 0``).
* Averages are taken over the queries present in *both* the run and the qrels
  with at least one relevant document. Run queries without such qrels are
  skipped and counted (``num_skipped_no_qrels``); qrels queries absent from the
  run are ignored, as trec_eval does by default, and counted
  (``num_missing_from_run``) so the caller can see the coverage gap. A query that
  is present in the run with an *empty* ranking is evaluated (it scores 0): the
  system answered, it just returned nothing.
* Duplicate document ids in a ranking keep their first occurrence (a
  trec_eval run file cannot hold duplicates per query); ``k`` counts distinct
  documents.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "OVERALL",
    "RetrievalReport",
    "evaluate_run",
    "format_table",
    "graded_ndcg_at_k",
    "metric_names",
    "mrr_at_k",
    "ndcg_at_k",
    "recall_at_k",
    "topk_from_scores",
]

#: Column label used by :func:`format_table` for the all-queries aggregate.
OVERALL = "all"

# Upper bound on the number of score-matrix elements processed at once by
# topk_from_scores (a negated float copy of this many elements is made).
_TOPK_CHUNK_ELEMENTS = 1 << 24

Relevant = Collection[str] | Mapping[str, Any]


# --------------------------------------------------------------------------- helpers


def _check_k(k: Any, name: str = "k") -> int:
    """Validate a rank cutoff.

    Args:
        k: The cutoff to validate (any integer-like value, bools excluded).
        name: Name used in error messages.

    Returns:
        ``k`` as a plain ``int``.

    Raises:
        TypeError: If ``k`` is not an integer.
        ValueError: If ``k < 1``.
    """
    if isinstance(k, bool):
        raise TypeError(f"{name} must be an integer >= 1, got bool {k!r}")
    try:
        k_int = operator.index(k)
    except TypeError:
        raise TypeError(f"{name} must be an integer >= 1, got {type(k).__name__} {k!r}") from None
    if k_int < 1:
        raise ValueError(
            f"{name} must be >= 1 (a rank cutoff counts documents from rank 1), got {name}={k_int}; "
            f"pass a positive cutoff such as {name}=10"
        )
    return k_int


def _check_ks(ks: Iterable[Any], name: str) -> tuple[int, ...]:
    """Validate a sequence of cutoffs, dropping duplicates but keeping order.

    Args:
        ks: Cutoffs to validate.
        name: Argument name used in error messages.

    Returns:
        The distinct cutoffs as ints, in their original order.

    Raises:
        TypeError: If ``ks`` is a bare integer or holds a non-integer.
        ValueError: If any cutoff is ``< 1``.
    """
    if isinstance(ks, (int, np.integer)):
        raise TypeError(f"{name} must be a sequence of cutoffs, e.g. {name}=({int(ks)},)")
    out: list[int] = []
    for k in ks:
        k_int = _check_k(k, name=f"{name} entry k")
        if k_int not in out:
            out.append(k_int)
    return tuple(out)


def _relevant_set(relevant: Relevant) -> frozenset[str]:
    """Turn a qrels entry into the set of relevant doc ids.

    Args:
        relevant: Either a collection of relevant doc ids, or a trec-style
            mapping ``doc_id -> relevance grade`` (grades ``> 0`` are relevant).

    Returns:
        The relevant doc ids.

    Raises:
        TypeError: If ``relevant`` is a bare string (almost always a mistake:
            it would be read as a set of characters).
    """
    if isinstance(relevant, (str, bytes)):
        raise TypeError(
            "relevant must be a collection of doc ids, got a single string "
            f"{relevant!r}; wrap it, e.g. {{{relevant!r}}}"
        )
    if isinstance(relevant, Mapping):
        return frozenset(doc for doc, grade in relevant.items() if grade > 0)
    if isinstance(relevant, frozenset):
        return relevant
    return frozenset(relevant)


def _dedup_prefix(ranked: Sequence[str], k: int) -> tuple[list[str], bool]:
    """Return the first ``k`` distinct doc ids of a ranking.

    Args:
        ranked: Doc ids, best first; may contain duplicates.
        k: Number of distinct ids wanted.

    Returns:
        ``(top, had_duplicates)`` where ``top`` holds at most ``k`` distinct ids in
        first-occurrence order and ``had_duplicates`` says whether a duplicate was
        dropped while building it.

    Raises:
        TypeError: If ``ranked`` is a bare string.
    """
    if isinstance(ranked, (str, bytes)):
        raise TypeError(f"ranked must be a sequence of doc ids, got a single string {ranked!r}")
    seen: set[str] = set()
    top: list[str] = []
    had_dup = False
    for doc in ranked:
        if len(top) >= k:
            break
        if doc in seen:
            had_dup = True
            continue
        seen.add(doc)
        top.append(doc)
    return top, had_dup


def _discount(rank0: int) -> float:
    """Binary DCG gain of a relevant doc at 0-based position ``rank0``."""
    return 1.0 / math.log2(rank0 + 2)


def _idcg(n_relevant: int, k: int) -> float:
    """Ideal DCG@k for ``n_relevant`` binary-relevant documents."""
    return sum(_discount(i) for i in range(min(k, n_relevant)))


def _mrr(hits: Sequence[int], k: int) -> float:
    return 1.0 / (hits[0] + 1) if hits and hits[0] < k else 0.0


def _ndcg(hits: Sequence[int], n_relevant: int, k: int) -> float:
    if n_relevant == 0:
        return 0.0
    dcg = 0.0
    for pos in hits:
        if pos >= k:
            break
        dcg += _discount(pos)
    return dcg / _idcg(n_relevant, k)


def _grades(relevant: Relevant) -> dict[str, float]:
    """``doc_id -> gain`` of a qrels entry: a grade mapping's positive grades, or gain 1 for
    each doc of a plain collection (binary qrels). Grades ``<= 0`` gain nothing (trec_eval)."""
    if isinstance(relevant, Mapping):
        return {doc: float(g) for doc, g in relevant.items() if g > 0}
    return dict.fromkeys(_relevant_set(relevant), 1.0)


def _graded_ndcg(top: Sequence[str], gains: Mapping[str, float], ideal: Sequence[float], k: int) -> float:
    """Graded NDCG@k of the deduplicated ranking ``top``; ``ideal`` = gains sorted descending."""
    idcg = math.fsum(g * _discount(i) for i, g in enumerate(ideal[:k]))
    if idcg <= 0.0:
        return 0.0
    dcg = math.fsum(gains.get(doc, 0.0) * _discount(i) for i, doc in enumerate(top[:k]))
    return dcg / idcg


def _recall(hits: Sequence[int], n_relevant: int, k: int) -> float:
    if n_relevant == 0:
        return 0.0
    return sum(1 for pos in hits if pos < k) / n_relevant


def _hits(ranked: Sequence[str], relevant: Relevant, k: int) -> tuple[list[int], int]:
    """Positions (0-based, ascending) of relevant docs within the deduplicated top-k."""
    rel = _relevant_set(relevant)
    top, had_dup = _dedup_prefix(ranked, k)
    if had_dup:
        logger.debug("ranking contains duplicate doc ids; keeping first occurrences")
    return [i for i, doc in enumerate(top) if doc in rel], len(rel)


# --------------------------------------------------------------------------- per-query metrics


def mrr_at_k(ranked: Sequence[str], relevant: Relevant, k: int) -> float:
    """Reciprocal rank of the first relevant document within the top ``k``.

    Matches trec_eval ``recip_rank`` on the run truncated to ``k`` documents.

    Args:
        ranked: Doc ids, best first. Duplicates keep their first occurrence.
        relevant: Relevant doc ids (or a ``doc_id -> grade`` mapping; grade > 0
            counts as relevant).
        k: Rank cutoff, ``>= 1``. May exceed ``len(ranked)``.

    Returns:
        ``1 / rank`` (1-based) of the first relevant doc in the top ``k``, else 0.0.

    Raises:
        ValueError: If ``k < 1``.
        TypeError: If ``k`` is not an integer or ``ranked``/``relevant`` is a bare string.
    """
    k = _check_k(k)
    hits, _ = _hits(ranked, relevant, k)
    return _mrr(hits, k)


def ndcg_at_k(ranked: Sequence[str], relevant: Relevant, k: int) -> float:
    """Binary-gain NDCG@k, trec_eval ``ndcg_cut_k`` convention.

    ``DCG@k = sum over ranks r <= k of rel_r / log2(r + 1)`` and the ideal DCG
    places ``min(k, |relevant|)`` relevant documents at the top.

    Args:
        ranked: Doc ids, best first. Duplicates keep their first occurrence.
        relevant: Relevant doc ids (or a ``doc_id -> grade`` mapping; grade > 0
            counts as relevant, with gain 1).
        k: Rank cutoff, ``>= 1``. May exceed ``len(ranked)``.

    Returns:
        NDCG@k in ``[0, 1]``; 0.0 when there is no relevant document.

    Raises:
        ValueError: If ``k < 1``.
        TypeError: If ``k`` is not an integer or ``ranked``/``relevant`` is a bare string.
    """
    k = _check_k(k)
    hits, n_rel = _hits(ranked, relevant, k)
    return _ndcg(hits, n_rel, k)


def graded_ndcg_at_k(ranked: Sequence[str], relevant: Relevant, k: int) -> float:
    """Graded NDCG@k, trec_eval ``ndcg_cut_k`` with gain = grade.

    ``DCG@k = sum over ranks r <= k of grade_r / log2(r + 1)`` (grades ``<= 0`` and
    unjudged documents gain 0); the ideal DCG places the ``k`` highest grades at the top.

    Args:
        ranked: Doc ids, best first. Duplicates keep their first occurrence.
        relevant: ``doc_id -> grade`` mapping (or a collection of doc ids, each grade 1,
            which gives binary NDCG).
        k: Rank cutoff, ``>= 1``. May exceed ``len(ranked)``.

    Returns:
        Graded NDCG@k in ``[0, 1]``; 0.0 when no document has a positive grade.

    Raises:
        ValueError: If ``k < 1``.
        TypeError: If ``k`` is not an integer or ``ranked``/``relevant`` is a bare string.
    """
    k = _check_k(k)
    gains = _grades(relevant)
    top, _ = _dedup_prefix(ranked, k)
    return _graded_ndcg(top, gains, sorted(gains.values(), reverse=True), k)


def recall_at_k(ranked: Sequence[str], relevant: Relevant, k: int) -> float:
    """Fraction of the relevant documents found in the top ``k`` (trec_eval ``recall_k``).

    Args:
        ranked: Doc ids, best first. Duplicates keep their first occurrence.
        relevant: Relevant doc ids (or a ``doc_id -> grade`` mapping; grade > 0
            counts as relevant).
        k: Rank cutoff, ``>= 1``. May exceed ``len(ranked)``.

    Returns:
        ``|relevant ∩ top-k| / |relevant|``; 0.0 when there is no relevant document.

    Raises:
        ValueError: If ``k < 1``.
        TypeError: If ``k`` is not an integer or ``ranked``/``relevant`` is a bare string.
    """
    k = _check_k(k)
    hits, n_rel = _hits(ranked, relevant, k)
    return _recall(hits, n_rel, k)


# --------------------------------------------------------------------------- run-level report


def metric_names(
    ks_mrr: Sequence[int] = (10,),
    ks_ndcg: Sequence[int] = (10,),
    ks_recall: Sequence[int] = (1, 5, 10, 20, 100),
    ks_graded_ndcg: Sequence[int] = (),
) -> list[str]:
    """Names of the metrics :func:`evaluate_run` reports for the given cutoffs.

    Args:
        ks_mrr: Cutoffs for MRR.
        ks_ndcg: Cutoffs for NDCG.
        ks_recall: Cutoffs for Recall.
        ks_graded_ndcg: Cutoffs for graded NDCG (``gNDCG@k``).

    Returns:
        Names such as ``["MRR@10", "NDCG@10", "gNDCG@10", "Recall@1", ...]`` in report order.

    Raises:
        ValueError: If a cutoff is ``< 1``.
        TypeError: If a cutoff is not an integer.
    """
    return (
        [f"MRR@{k}" for k in _check_ks(ks_mrr, "ks_mrr")]
        + [f"NDCG@{k}" for k in _check_ks(ks_ndcg, "ks_ndcg")]
        + [f"gNDCG@{k}" for k in _check_ks(ks_graded_ndcg, "ks_graded_ndcg")]
        + [f"Recall@{k}" for k in _check_ks(ks_recall, "ks_recall")]
    )


@dataclass
class RetrievalReport:
    """Aggregate retrieval metrics for one run.

    Attributes:
        metrics: Metric name (``"MRR@10"``, ``"NDCG@10"``, ``"Recall@5"``, ...) to the
            mean over evaluated queries, as a fraction in ``[0, 1]`` (NaN if no
            query was evaluated).
        num_queries: Number of queries evaluated (in run and qrels, >= 1 relevant).
        num_skipped_no_qrels: Run queries skipped because the qrels have no
            relevant document for them.
        num_missing_from_run: Qrels queries (with >= 1 relevant doc) absent from
            the run; ignored in the means, as trec_eval does without ``-c``.
        by_group: Group label to metric name to mean over that group's evaluated
            queries (empty when no grouping was given).
        group_counts: Group label to number of evaluated queries in it.
        num_ungrouped: Evaluated queries that had no group label (they count in
            ``metrics`` but in no group).
        per_query: Query id to metric name to that query's value.
    """

    metrics: dict[str, float]
    num_queries: int
    num_skipped_no_qrels: int = 0
    num_missing_from_run: int = 0
    by_group: dict[str, dict[str, float]] = field(default_factory=dict)
    group_counts: dict[str, int] = field(default_factory=dict)
    num_ungrouped: int = 0
    per_query: dict[str, dict[str, float]] = field(default_factory=dict, repr=False)

    def value(self, metric: str, group: str = OVERALL) -> float:
        """Look up one aggregate value.

        Args:
            metric: Metric name, e.g. ``"NDCG@10"``.
            group: Group label, or :data:`OVERALL` for the all-queries mean.

        Returns:
            The mean as a fraction in ``[0, 1]``.

        Raises:
            KeyError: If the metric or group is not in the report.
        """
        if group == OVERALL:
            return self.metrics[metric]
        return self.by_group[group][metric]

    def to_dict(self, include_per_query: bool = False) -> dict[str, Any]:
        """Plain-dict view, suitable for JSON logging.

        Args:
            include_per_query: Whether to include the per-query values.

        Returns:
            A dict of the report's fields.
        """
        out: dict[str, Any] = {
            "metrics": dict(self.metrics),
            "num_queries": self.num_queries,
            "num_skipped_no_qrels": self.num_skipped_no_qrels,
            "num_missing_from_run": self.num_missing_from_run,
            "by_group": {g: dict(m) for g, m in self.by_group.items()},
            "group_counts": dict(self.group_counts),
            "num_ungrouped": self.num_ungrouped,
        }
        if include_per_query:
            out["per_query"] = {q: dict(m) for q, m in self.per_query.items()}
        return out


def _mean_over(
    names: Sequence[str], qids: Sequence[str], per_query: Mapping[str, Mapping[str, float]]
) -> dict[str, float]:
    if not qids:
        return {name: math.nan for name in names}
    return {name: math.fsum(per_query[q][name] for q in qids) / len(qids) for name in names}


def evaluate_run(
    run: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Relevant],
    ks_mrr: Sequence[int] = (10,),
    ks_ndcg: Sequence[int] = (10,),
    ks_recall: Sequence[int] = (1, 5, 10, 20, 100),
    groups: Mapping[str, str] | None = None,
    ks_graded_ndcg: Sequence[int] = (),
) -> RetrievalReport:
    """Evaluate a ranked run against qrels, trec_eval style (no ``-c``).

    Only queries present in both ``run`` and ``qrels`` with at least one relevant
    document are averaged. Run queries with no relevant document in the qrels are
    skipped and counted; qrels queries missing from the run are ignored and
    counted (trec_eval's default; use the count to detect a coverage problem).

    Args:
        run: Query id to ranked doc ids, best first. Duplicate ids keep their
            first occurrence; one warning is logged per call if any are found.
        qrels: Query id to relevant doc ids (or a ``doc_id -> grade`` mapping where
            grade > 0 is relevant).
        ks_mrr: Cutoffs for ``MRR@k``.
        ks_ndcg: Cutoffs for ``NDCG@k``.
        ks_recall: Cutoffs for ``Recall@k``.
        groups: Optional query id to group label (e.g. ``"caption"``/``"image"``);
            the report then also holds per-group means. Evaluated queries without
            a label count only in the overall means.
        ks_graded_ndcg: Cutoffs for graded NDCG ``gNDCG@k`` (gain = grade; with
            collection qrels every relevant doc has grade 1).

    Returns:
        A :class:`RetrievalReport`.

    Raises:
        ValueError: If a cutoff is ``< 1``, or a group label equals :data:`OVERALL`.
        TypeError: If a cutoff is not an integer, or a ranking / qrels entry is a
            bare string.
    """
    cutoffs = _Cutoffs(_check_ks(ks_mrr, "ks_mrr"), _check_ks(ks_ndcg, "ks_ndcg"),
                       _check_ks(ks_recall, "ks_recall"), _check_ks(ks_graded_ndcg, "ks_graded_ndcg"))
    names = metric_names(cutoffs.mrr, cutoffs.ndcg, cutoffs.recall, cutoffs.graded_ndcg)

    rel_sets = {qid: _relevant_set(rel) for qid, rel in qrels.items()}
    rel_sets = {qid: rel for qid, rel in rel_sets.items() if rel}

    per_query, skipped, dup_qids = _score_queries(run, qrels, rel_sets, cutoffs)
    missing = sum(1 for qid in rel_sets if qid not in run)
    _log_coverage(dup_qids, skipped, missing)

    evaluated = list(per_query)
    if not evaluated:
        logger.warning("no query is in both the run and the qrels; metrics are NaN")

    by_group, group_counts, ungrouped = _group_means(names, evaluated, per_query, groups)
    return RetrievalReport(
        metrics=_mean_over(names, evaluated, per_query),
        num_queries=len(evaluated),
        num_skipped_no_qrels=skipped,
        num_missing_from_run=missing,
        by_group=by_group,
        group_counts=group_counts,
        num_ungrouped=ungrouped,
        per_query=per_query,
    )


@dataclass(frozen=True)
class _Cutoffs:
    """The validated cutoffs of one evaluation, per metric family."""

    mrr: tuple[int, ...]
    ndcg: tuple[int, ...]
    recall: tuple[int, ...]
    graded_ndcg: tuple[int, ...]

    @property
    def max_k(self) -> int:
        return max((*self.mrr, *self.ndcg, *self.recall, *self.graded_ndcg), default=0)


def _query_values(top: Sequence[str], rel: frozenset[str], relevant: Relevant, cutoffs: _Cutoffs) -> dict[str, float]:
    """Every metric of one query: ``top`` its deduplicated ranking, ``rel`` its relevant
    doc ids, ``relevant`` its qrels entry (for the grades)."""
    hits = [i for i, doc in enumerate(top) if doc in rel]
    n_rel = len(rel)
    values: dict[str, float] = {}
    for k in cutoffs.mrr:
        values[f"MRR@{k}"] = _mrr(hits, k)
    for k in cutoffs.ndcg:
        values[f"NDCG@{k}"] = _ndcg(hits, n_rel, k)
    if cutoffs.graded_ndcg:
        gains = _grades(relevant)
        ideal = sorted(gains.values(), reverse=True)
        for k in cutoffs.graded_ndcg:
            values[f"gNDCG@{k}"] = _graded_ndcg(top, gains, ideal, k)
    for k in cutoffs.recall:
        values[f"Recall@{k}"] = _recall(hits, n_rel, k)
    return values


def _score_queries(
    run: Mapping[str, Sequence[str]], qrels: Mapping[str, Relevant], rel_sets: Mapping[str, frozenset[str]],
    cutoffs: _Cutoffs,
) -> tuple[dict[str, dict[str, float]], int, list[str]]:
    """Per-query values of the run's judged queries; the count of run queries without a
    relevant document; the queries whose ranking repeated a doc id."""
    per_query: dict[str, dict[str, float]] = {}
    skipped = 0
    dup_qids: list[str] = []
    max_k = cutoffs.max_k
    for qid, ranked in run.items():
        rel = rel_sets.get(qid)
        if rel is None:
            skipped += 1
            continue
        top, had_dup = _dedup_prefix(ranked, max_k)
        if had_dup:
            dup_qids.append(qid)
        per_query[qid] = _query_values(top, rel, qrels[qid], cutoffs)
    return per_query, skipped, dup_qids


def _log_coverage(dup_qids: Sequence[str], skipped: int, missing: int) -> None:
    if dup_qids:
        logger.warning(
            "%d ranking(s) contain duplicate doc ids (e.g. query %r); keeping the first "
            "occurrence of each doc",
            len(dup_qids),
            dup_qids[0],
        )
    if skipped:
        logger.info("skipped %d run queries with no relevant documents in qrels", skipped)
    if missing:
        logger.info(
            "%d qrels queries are absent from the run and are not averaged (trec_eval default)",
            missing,
        )


def _group_means(
    names: Sequence[str], evaluated: Sequence[str], per_query: Mapping[str, Mapping[str, float]],
    groups: Mapping[str, str] | None,
) -> tuple[dict[str, dict[str, float]], dict[str, int], int]:
    """Per-group means and counts, and the count of evaluated queries without a label.

    Raises:
        ValueError: a group label equals :data:`OVERALL`.
    """
    by_group: dict[str, dict[str, float]] = {}
    group_counts: dict[str, int] = {}
    ungrouped = 0
    if groups is None:
        return by_group, group_counts, ungrouped
    members: dict[str, list[str]] = {}
    for qid in evaluated:
        label = groups.get(qid)
        if label is None:
            ungrouped += 1
            continue
        if label == OVERALL:
            raise ValueError(
                f"group label {OVERALL!r} (query {qid!r}) is reserved for the overall "
                "mean; rename that group"
            )
        members.setdefault(label, []).append(qid)
    if ungrouped:
        logger.warning(
            "%d evaluated queries have no group label; they count only in the overall means",
            ungrouped,
        )
    for label, qids in members.items():
        by_group[label] = _mean_over(names, qids, per_query)
        group_counts[label] = len(qids)
    return by_group, group_counts, ungrouped


# --------------------------------------------------------------------------- top-k from scores


def _topk_chunk(neg: np.ndarray, k: int) -> np.ndarray:
    """Top-k column indices per row of ``neg`` (smaller is better), ties by column order."""
    n_rows, n = neg.shape
    if k >= n:
        return np.argsort(neg, axis=1, kind="stable")
    part = np.argpartition(neg, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(neg, part, axis=1)
    order = np.lexsort((part, vals), axis=-1)
    top = np.take_along_axis(part, order, axis=1)
    # argpartition picks an arbitrary subset of the docs tied at the k-th score;
    # redo the rows where that tie extends beyond the selection.
    kth = np.take_along_axis(vals, order[:, -1:], axis=1)
    tied_total = np.count_nonzero(neg == kth, axis=1)
    tied_taken = np.count_nonzero(vals == kth, axis=1)
    for row in np.flatnonzero(tied_total > tied_taken):
        cand = np.flatnonzero(neg[row] <= kth[row, 0])
        top[row] = cand[np.argsort(neg[row, cand], kind="stable")[:k]]
    return top


def topk_from_scores(scores: np.ndarray, doc_ids: Sequence[str], k: int) -> list[list[str]]:
    """Rank documents per query from a dense score matrix.

    Uses ``argpartition`` then a sort of the ``k`` survivors, processing rows in
    chunks so that only a bounded copy of the matrix is made. Ties are broken by
    document order (lower column index first), i.e. the result equals a stable
    descending sort truncated to ``k``.

    Args:
        scores: ``(Q, N)`` array, higher is better. Integer and bool scores are
            converted to float64.
        doc_ids: ``N`` doc ids, one per column.
        k: Number of documents per query, ``>= 1``; clamped to ``N``.

    Returns:
        ``Q`` lists of at most ``k`` doc ids, best first.

    Raises:
        ValueError: If ``k < 1``, ``scores`` is not 2-D, ``len(doc_ids) != N``, or
            ``scores`` holds NaN.
        TypeError: If ``k`` is not an integer.
    """
    k = _check_k(k)
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(
            f"scores must be a 2-D (queries, docs) array, got shape {scores.shape}; "
            "for a single query pass scores[None, :]"
        )
    n_q, n_docs = scores.shape
    if len(doc_ids) != n_docs:
        raise ValueError(
            f"doc_ids has {len(doc_ids)} entries but scores has {n_docs} columns; "
            "they must match one id per column"
        )
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if n_docs == 0:
        return [[] for _ in range(n_q)]
    k = min(k, n_docs)
    ids = np.asarray(list(doc_ids), dtype=object)
    rows_per_chunk = max(1, _TOPK_CHUNK_ELEMENTS // n_docs)
    out: list[list[str]] = []
    for start in range(0, n_q, rows_per_chunk):
        chunk = scores[start : start + rows_per_chunk]
        if np.isnan(chunk).any():
            bad = start + int(np.flatnonzero(np.isnan(chunk).any(axis=1))[0])
            raise ValueError(
                f"scores row {bad} contains NaN; the ranking would be undefined. "
                "Replace NaN (e.g. with -inf) before ranking"
            )
        top = _topk_chunk(np.negative(chunk), k)
        out.extend(ids[top].tolist())
    return out


# --------------------------------------------------------------------------- table


def format_table(
    rows: Mapping[str, RetrievalReport],
    metrics: Sequence[str],
    groups: Sequence[str] | None = None,
) -> str:
    """Render reports as a plain-text aligned table (values x100, 2 decimals).

    One row per system, one column per ``metric x group`` (metric-major), headed
    ``"<metric>"`` for the overall mean and ``"<metric>[<group>]"`` for a group.
    Values a report does not have are shown as ``-``; NaN as ``nan``.

    Args:
        rows: System name to its report, in display order.
        metrics: Metric names to show, e.g. ``["MRR@10", "Recall@5"]``.
        groups: Column groups; :data:`OVERALL` is the all-queries mean. ``None``
            means :data:`OVERALL` followed by every group found in the reports
            (first-seen order).

    Returns:
        The table, lines joined by ``"\\n"`` (no trailing newline).

    Raises:
        ValueError: If ``metrics`` is empty.
    """
    if isinstance(metrics, str):
        metrics = [metrics]
    if not metrics:
        raise ValueError("metrics must name at least one metric, e.g. ['MRR@10']")
    if groups is None:
        found: list[str] = []
        for report in rows.values():
            for g in report.by_group:
                if g not in found:
                    found.append(g)
        groups = [OVERALL, *found]
    elif isinstance(groups, str):
        groups = [groups]

    header = ["system"]
    cols: list[tuple[str, str]] = []
    for metric in metrics:
        for group in groups:
            cols.append((metric, group))
            header.append(metric if group == OVERALL else f"{metric}[{group}]")

    body: list[list[str]] = []
    for system, report in rows.items():
        cells = [str(system)]
        for metric, group in cols:
            try:
                value = report.value(metric, group)
            except KeyError:
                cells.append("-")
                continue
            cells.append("nan" if math.isnan(value) else f"{100.0 * value:.2f}")
        body.append(cells)

    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def _line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    lines = [_line(header), "  ".join("-" * w for w in widths)]
    lines.extend(_line(r) for r in body)
    return "\n".join(lines)
