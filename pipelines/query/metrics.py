"""Retrieval metrics computed by trec_eval itself (through ``pytrec_eval``), named as the
release and trec_eval name them.

Only what no library does is kept by hand: turning rankings into scored runs, averaging
per group, the top-k of a score matrix and the text table. All values are fractions in
``[0, 1]``; :func:`format_table` is the only place that scales by 100.

Measures (trec_eval names in brackets; binary relevance is grade ``> 0``):

* ``MRR@k`` [``recip_rank`` on the run cut at ``k``]: ``1 / rank`` of the first relevant
  document, 0 if none is in the top ``k``. trec_eval's ``recip_rank`` has no cutoff, so the
  library's value is kept when its rank ``1 / recip_rank`` is ``<= k`` and is 0 otherwise:
  the same number, in the library's ordering.
* ``NDCG@k`` [``ndcg_cut_k``, binary qrels]: gains 1, ideal DCG of ``min(k, #relevant)``.
* ``gNDCG@k`` [``ndcg_cut_k``, graded qrels]: gain = the grade (grades ``<= 0`` gain
  nothing); equals ``NDCG@k`` on binary qrels.
* ``Recall@k`` [``recall_k``]: ``|relevant ∩ top-k| / |relevant|``. With several relevant
  documents ``Recall@1`` is at most ``1 / #relevant``: it is *not* "the first hit is right".
* ``Success@k`` [``success_k``]: 1 if any relevant document is in the top ``k``, else 0.
  The release's (and most papers') "Recall@1" is ``Success@1``.

Ties: a run carries scores and trec_eval orders it by score descending, ties by document
id in *descending* lexical order (``"b"`` before ``"a"``). A ranking given as a list has
strictly decreasing scores ``n - position`` (its order is kept); give a ``doc_id -> score``
mapping to let the library break the ties. :func:`topk_from_scores` cuts at ``k`` with the
same rule, so the documents kept are the ones trec_eval would rank first on the full run.

Averaging (trec_eval without ``-c``): the means are over the queries present in *both*
the run and the qrels with at least one relevant document. Run queries without such qrels
are skipped and counted (``num_skipped_no_qrels``) — trec_eval would score them 0 — and
qrels queries absent from the run are ignored and counted (``num_missing_from_run``). A
query in the run with an *empty* ranking is evaluated and scores 0. Duplicate doc ids in a
ranking list keep their first occurrence (a trec_eval run file cannot hold duplicates).
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
    "group_means",
    "metric_names",
    "mrr_at_k",
    "ndcg_at_k",
    "recall_at_k",
    "success_at_k",
    "topk_from_scores",
]

#: Column label used by :func:`format_table` for the all-queries aggregate.
OVERALL = "all"

# Upper bound on the number of score-matrix elements processed at once by
# topk_from_scores (a negated float copy of this many elements is made).
_TOPK_CHUNK_ELEMENTS = 1 << 24

Relevant = Collection[str] | Mapping[str, Any]
Ranking = Sequence[str] | Mapping[str, float]


# --------------------------------------------------------------------------- validation


def _check_k(k: Any, name: str = "k") -> int:
    """``k`` as an int; TypeError for a non-integer (bools too), ValueError below 1."""
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
    """Distinct validated cutoffs in their order; TypeError for a bare integer."""
    if isinstance(ks, (int, np.integer)):
        raise TypeError(f"{name} must be a sequence of cutoffs, e.g. {name}=({int(ks)},)")
    out: list[int] = []
    for k in ks:
        k_int = _check_k(k, name=f"{name} entry k")
        if k_int not in out:
            out.append(k_int)
    return tuple(out)


def _grades(relevant: Relevant) -> dict[str, int]:
    """``doc_id -> integer grade`` of a qrels entry (a plain collection: grade 1 each).

    Raises:
        TypeError: a bare string (it would read as a set of characters).
        ValueError: a grade that is not a whole number (trec_eval's qrels are integers).
    """
    if isinstance(relevant, (str, bytes)):
        raise TypeError(
            "relevant must be a collection of doc ids, got a single string "
            f"{relevant!r}; wrap it, e.g. {{{relevant!r}}}"
        )
    if not isinstance(relevant, Mapping):
        return dict.fromkeys(relevant, 1)
    out: dict[str, int] = {}
    for doc, grade in relevant.items():
        if float(grade) != int(grade):
            raise ValueError(f"qrels grade {grade!r} of document {doc!r} is not a whole number; trec_eval "
                             "reads integer grades: round the grades (e.g. 0.5 -> 1) before evaluating")
        out[str(doc)] = int(grade)
    return out


def _scored(ranking: Ranking) -> tuple[dict[str, float], bool]:
    """A ranking as a trec_eval run entry ``doc_id -> score``, and whether a duplicate was dropped.

    A list gets strictly decreasing scores (its order is kept, no ties); a mapping keeps
    its scores, and trec_eval breaks their ties.

    Raises:
        TypeError: a bare string.
        ValueError: a NaN score.
    """
    if isinstance(ranking, (str, bytes)):
        raise TypeError(f"ranked must be a sequence of doc ids, got a single string {ranking!r}")
    if isinstance(ranking, Mapping):
        out = {str(d): float(s) for d, s in ranking.items()}
        bad = next((d for d, s in out.items() if math.isnan(s)), None)
        if bad is not None:
            raise ValueError(f"document {bad!r} has a NaN score; the ranking would be undefined. "
                             "Replace NaN (e.g. with -inf) before evaluating")
        return out, False
    out, n = {}, len(ranking)
    for i, doc in enumerate(ranking):
        out.setdefault(doc, float(n - i))
    return out, len(out) < n


# --------------------------------------------------------------------------- the library


def _measure(name: str, ks: Sequence[int]) -> set[str]:
    return {f"{name}.{','.join(map(str, ks))}"} if ks else set()


def _library_values(
    runs: Mapping[str, Mapping[str, float]], grades: Mapping[str, Mapping[str, int]], cutoffs: _Cutoffs,
) -> dict[str, dict[str, float]]:
    """Every metric of every query of ``runs`` (all judged, with a relevant document), by trec_eval."""
    try:
        import pytrec_eval
    except ImportError:  # pragma: no cover - a broken install
        raise ImportError('the metrics are computed by pytrec_eval: pip install "ciea[pipelines]" '
                          "(it brings pytrec-eval-terrier)") from None
    binary = {q: {d: 1 for d, g in grades[q].items() if g > 0} for q in runs}
    measures = ({"recip_rank"} | _measure("ndcg_cut", cutoffs.ndcg) | _measure("recall", cutoffs.recall)
                | _measure("success", cutoffs.success))
    lib = pytrec_eval.RelevanceEvaluator(binary, measures).evaluate(dict(runs))
    graded: dict[str, dict[str, float]] = {}
    if cutoffs.graded_ndcg:
        qrels = {q: dict(grades[q]) for q in runs}
        graded = pytrec_eval.RelevanceEvaluator(qrels, _measure("ndcg_cut", cutoffs.graded_ndcg)).evaluate(dict(runs))
    out: dict[str, dict[str, float]] = {}
    for qid in runs:
        # trec_eval leaves out a query with nothing retrieved; it scores 0 on every measure.
        got, got_graded = lib.get(qid, {}), graded.get(qid, {})
        rr = got.get("recip_rank", 0.0)
        first = round(1.0 / rr) if rr > 0 else math.inf
        values: dict[str, float] = {}
        for k in cutoffs.mrr:
            values[f"MRR@{k}"] = rr if first <= k else 0.0
        for k in cutoffs.ndcg:
            values[f"NDCG@{k}"] = got.get(f"ndcg_cut_{k}", 0.0)
        for k in cutoffs.graded_ndcg:
            values[f"gNDCG@{k}"] = got_graded.get(f"ndcg_cut_{k}", 0.0)
        for k in cutoffs.recall:
            values[f"Recall@{k}"] = got.get(f"recall_{k}", 0.0)
        for k in cutoffs.success:
            values[f"Success@{k}"] = got.get(f"success_{k}", 0.0)
        out[qid] = values
    return out


# --------------------------------------------------------------------------- per-query metrics


def _one(ranked: Ranking, relevant: Relevant, k: Any, family: str) -> float:
    k = _check_k(k)
    grades = _grades(relevant)
    run, _ = _scored(ranked)
    if not any(g > 0 for g in grades.values()):
        return 0.0
    ks = {f: ((k,) if f == family else ()) for f in ("mrr", "ndcg", "recall", "graded_ndcg", "success")}
    cutoffs = _Cutoffs(ks["mrr"], ks["ndcg"], ks["recall"], ks["graded_ndcg"], ks["success"])
    return next(iter(_library_values({"q": run}, {"q": grades}, cutoffs)["q"].values()))


def mrr_at_k(ranked: Ranking, relevant: Relevant, k: int) -> float:
    """``1 / rank`` of the first relevant document in the top ``k``, else 0 (trec_eval ``recip_rank``).

    Args:
        ranked: doc ids best first (duplicates keep their first occurrence), or ``doc_id ->
            score`` (ties broken by trec_eval: doc id descending).
        relevant: relevant doc ids, or ``doc_id -> grade`` (grade > 0 is relevant).
        k: rank cutoff, ``>= 1``; may exceed the ranking's length.

    Returns:
        The value in ``[0, 1]``; 0.0 without a relevant document.

    Raises:
        ValueError: ``k < 1``. TypeError: a non-integer ``k`` or a bare string.
    """
    return _one(ranked, relevant, k, "mrr")


def ndcg_at_k(ranked: Ranking, relevant: Relevant, k: int) -> float:
    """Binary-gain NDCG@k (trec_eval ``ndcg_cut_k`` on binary qrels). Arguments as :func:`mrr_at_k`."""
    return _one(ranked, relevant, k, "ndcg")


def graded_ndcg_at_k(ranked: Ranking, relevant: Relevant, k: int) -> float:
    """Graded NDCG@k (trec_eval ``ndcg_cut_k``, gain = the grade; a plain collection of doc ids
    has grade 1 each, giving binary NDCG). Arguments as :func:`mrr_at_k`."""
    return _one(ranked, relevant, k, "graded_ndcg")


def recall_at_k(ranked: Ranking, relevant: Relevant, k: int) -> float:
    """``|relevant ∩ top-k| / |relevant|`` (trec_eval ``recall_k``). Arguments as :func:`mrr_at_k`."""
    return _one(ranked, relevant, k, "recall")


def success_at_k(ranked: Ranking, relevant: Relevant, k: int) -> float:
    """1.0 if a relevant document is in the top ``k``, else 0.0 (trec_eval ``success_k``; the
    release's "Recall@k"). Arguments as :func:`mrr_at_k`."""
    return _one(ranked, relevant, k, "success")


# --------------------------------------------------------------------------- run-level report


def metric_names(
    ks_mrr: Sequence[int] = (10,),
    ks_ndcg: Sequence[int] = (10,),
    ks_recall: Sequence[int] = (1, 5, 10, 20, 100),
    ks_graded_ndcg: Sequence[int] = (),
    ks_success: Sequence[int] = (),
) -> list[str]:
    """Names of the metrics :func:`evaluate_run` reports, in report order: ``MRR@k``,
    ``NDCG@k``, ``gNDCG@k``, ``Recall@k``, ``Success@k``.

    Raises:
        ValueError: a cutoff ``< 1``. TypeError: a non-integer cutoff.
    """
    return (
        [f"MRR@{k}" for k in _check_ks(ks_mrr, "ks_mrr")]
        + [f"NDCG@{k}" for k in _check_ks(ks_ndcg, "ks_ndcg")]
        + [f"gNDCG@{k}" for k in _check_ks(ks_graded_ndcg, "ks_graded_ndcg")]
        + [f"Recall@{k}" for k in _check_ks(ks_recall, "ks_recall")]
        + [f"Success@{k}" for k in _check_ks(ks_success, "ks_success")]
    )


@dataclass
class RetrievalReport:
    """Aggregate retrieval metrics for one run.

    Attributes:
        metrics: Metric name (``"MRR@10"``, ``"Success@1"``, ...) to the mean over evaluated
            queries, a fraction in ``[0, 1]`` (NaN if no query was evaluated).
        num_queries: Number of queries evaluated (in run and qrels, >= 1 relevant).
        num_skipped_no_qrels: Run queries skipped because the qrels have no relevant
            document for them.
        num_missing_from_run: Qrels queries (with >= 1 relevant doc) absent from the run;
            ignored in the means, as trec_eval does without ``-c``.
        by_group: Group label to metric name to mean over that group's evaluated queries.
        group_counts: Group label to number of evaluated queries in it.
        num_ungrouped: Evaluated queries without a group label (they count in ``metrics``).
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
        """One aggregate value (a fraction); :data:`OVERALL` is the all-queries mean.

        Raises:
            KeyError: the metric or group is not in the report.
        """
        if group == OVERALL:
            return self.metrics[metric]
        return self.by_group[group][metric]

    def to_dict(self, include_per_query: bool = False) -> dict[str, Any]:
        """Plain-dict view for JSON, per-query values only when asked."""
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


@dataclass(frozen=True)
class _Cutoffs:
    """The validated cutoffs of one evaluation, per metric family."""

    mrr: tuple[int, ...]
    ndcg: tuple[int, ...]
    recall: tuple[int, ...]
    graded_ndcg: tuple[int, ...]
    success: tuple[int, ...] = ()


def evaluate_run(
    run: Mapping[str, Ranking],
    qrels: Mapping[str, Relevant],
    ks_mrr: Sequence[int] = (10,),
    ks_ndcg: Sequence[int] = (10,),
    ks_recall: Sequence[int] = (1, 5, 10, 20, 100),
    groups: Mapping[str, str] | None = None,
    ks_graded_ndcg: Sequence[int] = (),
    ks_success: Sequence[int] = (),
) -> RetrievalReport:
    """Evaluate a run against qrels with trec_eval (no ``-c``), overall and per group.

    Args:
        run: Query id to a ranking: doc ids best first (duplicates keep their first
            occurrence; one warning per call), or ``doc_id -> score`` (ties broken by
            trec_eval: doc id descending).
        qrels: Query id to relevant doc ids, or ``doc_id -> integer grade`` (grade > 0 is
            relevant; ``gNDCG@k`` uses the grades).
        ks_mrr, ks_ndcg, ks_recall, ks_graded_ndcg, ks_success: cutoffs per measure.
        groups: Optional query id to group label; the report then also holds per-group
            means. Evaluated queries without a label count only in the overall means.

    Returns:
        A :class:`RetrievalReport`.

    Raises:
        ValueError: a cutoff ``< 1``, a group label equal to :data:`OVERALL`, a
            non-integer grade or a NaN score.
        TypeError: a non-integer cutoff, or a ranking / qrels entry that is a bare string.
    """
    cutoffs = _Cutoffs(_check_ks(ks_mrr, "ks_mrr"), _check_ks(ks_ndcg, "ks_ndcg"),
                       _check_ks(ks_recall, "ks_recall"), _check_ks(ks_graded_ndcg, "ks_graded_ndcg"),
                       _check_ks(ks_success, "ks_success"))
    names = metric_names(cutoffs.mrr, cutoffs.ndcg, cutoffs.recall, cutoffs.graded_ndcg, cutoffs.success)

    grades = {qid: _grades(rel) for qid, rel in qrels.items()}
    judged = {qid for qid, g in grades.items() if any(v > 0 for v in g.values())}
    scored: dict[str, dict[str, float]] = {}
    dup_qids: list[str] = []
    skipped = 0
    for qid, ranking in run.items():
        entry, had_dup = _scored(ranking)
        if qid not in judged:
            skipped += 1
            continue
        scored[qid] = entry
        if had_dup:
            dup_qids.append(qid)
    missing = sum(1 for qid in judged if qid not in run)
    _log_coverage(dup_qids, skipped, missing)

    per_query = _library_values(scored, grades, cutoffs) if scored else {}
    if not per_query:
        logger.warning("no query is in both the run and the qrels; metrics are NaN")
    report = RetrievalReport(metrics=_mean_over(names, list(per_query), per_query), num_queries=len(per_query),
                             num_skipped_no_qrels=skipped, num_missing_from_run=missing, per_query=per_query)
    if groups is not None:
        report.by_group, report.group_counts, report.num_ungrouped = group_means(names, per_query, groups)
    return report


def _log_coverage(dup_qids: Sequence[str], skipped: int, missing: int) -> None:
    if dup_qids:
        logger.warning("%d ranking(s) contain duplicate doc ids (e.g. query %r); keeping the first "
                       "occurrence of each doc", len(dup_qids), dup_qids[0])
    if skipped:
        logger.info("skipped %d run queries with no relevant documents in qrels", skipped)
    if missing:
        logger.info("%d qrels queries are absent from the run and are not averaged (trec_eval default)", missing)


def group_means(
    names: Sequence[str], per_query: Mapping[str, Mapping[str, float]], groups: Mapping[str, str],
) -> tuple[dict[str, dict[str, float]], dict[str, int], int]:
    """Per-group means of per-query values (by hand: no library groups queries).

    Args:
        names: metrics to average.
        per_query: query id -> metric -> value (the evaluated queries).
        groups: query id -> group label.

    Returns:
        ``(by_group, group_counts, num_ungrouped)``, groups in first-seen order of ``per_query``.

    Raises:
        ValueError: a group label equals :data:`OVERALL`.
    """
    members: dict[str, list[str]] = {}
    ungrouped = 0
    for qid in per_query:
        label = groups.get(qid)
        if label is None:
            ungrouped += 1
            continue
        if label == OVERALL:
            raise ValueError(f"group label {OVERALL!r} (query {qid!r}) is reserved for the overall "
                             "mean; rename that group")
        members.setdefault(label, []).append(qid)
    if ungrouped:
        logger.warning("%d evaluated queries have no group label; they count only in the overall means", ungrouped)
    by_group = {label: _mean_over(names, qids, per_query) for label, qids in members.items()}
    return by_group, {label: len(qids) for label, qids in members.items()}, ungrouped


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


def topk_from_scores(
    scores: np.ndarray, doc_ids: Sequence[str], k: int, *, with_scores: bool = False,
) -> list[list[str]] | list[dict[str, float]]:
    """Rank documents per query from a dense score matrix, ties as trec_eval breaks them.

    Score descending, ties by doc id descending (trec_eval's rule), so the ``k`` documents
    kept are those trec_eval ranks first on the full run. ``argpartition`` then a sort of
    the survivors, rows in chunks so only a bounded copy of the matrix is made.

    Args:
        scores: ``(Q, N)`` array, higher is better (ints and bools become float64).
        doc_ids: ``N`` doc ids, one per column.
        k: documents per query, ``>= 1``; clamped to ``N``.
        with_scores: return ``doc_id -> score`` mappings (best first) instead of lists, so
            the evaluation sees the ties.

    Returns:
        ``Q`` lists of at most ``k`` doc ids best first, or ``Q`` mappings.

    Raises:
        ValueError: ``k < 1``, ``scores`` not 2-D, ``len(doc_ids) != N``, or a NaN score.
        TypeError: ``k`` not an integer.
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
        return [{} if with_scores else [] for _ in range(n_q)]
    k = min(k, n_docs)
    # Columns in descending doc-id order: the stable selection then breaks ties as trec_eval does.
    perm = np.array(sorted(range(n_docs), key=lambda j: doc_ids[j], reverse=True), dtype=np.int64)
    ids = np.asarray(list(doc_ids), dtype=object)[perm]
    rows_per_chunk = max(1, _TOPK_CHUNK_ELEMENTS // n_docs)
    out: list[Any] = []
    for start in range(0, n_q, rows_per_chunk):
        chunk = scores[start : start + rows_per_chunk][:, perm]
        if np.isnan(chunk).any():
            bad = start + int(np.flatnonzero(np.isnan(chunk).any(axis=1))[0])
            raise ValueError(
                f"scores row {bad} contains NaN; the ranking would be undefined. "
                "Replace NaN (e.g. with -inf) before ranking"
            )
        top = _topk_chunk(np.negative(chunk), k)
        if with_scores:
            vals = np.take_along_axis(chunk, top, axis=1).tolist()
            out.extend(dict(zip(row, v, strict=True)) for row, v in zip(ids[top].tolist(), vals, strict=True))
        else:
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
        groups: Column groups; :data:`OVERALL` is the all-queries mean. ``None`` means
            :data:`OVERALL` followed by every group found in the reports (first-seen order).

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
            found += [g for g in report.by_group if g not in found]
        groups = [OVERALL, *found]
    elif isinstance(groups, str):
        groups = [groups]

    cols = [(metric, group) for metric in metrics for group in groups]
    header = ["system", *(m if g == OVERALL else f"{m}[{g}]" for m, g in cols)]
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
