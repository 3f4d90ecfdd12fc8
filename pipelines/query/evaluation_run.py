"""``ciea evaluate``'s run on a typed :class:`~pipelines.query.config.EvaluateConfig`: the
split loaded, every variant opened and checked before any search (a table must hold the
judged documents), each ranked and scored overall and by group, the report written
(:mod:`pipelines.query.report`) with the TREC files beside it.

The building blocks (splits, runs from a table or a checkpoint, coverage checks, groupings)
are in :mod:`pipelines.query.evaluation`; the metrics in :mod:`pipelines.query.metrics`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.query.config import EvaluateConfig, VariantSettings
from pipelines.store import storage as storage_mod

if TYPE_CHECKING:
    from pipelines.store.delta_tables import Tables

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------


class Prepared:
    """A variant opened and checked, ready to run."""

    def __init__(self, spec: VariantSettings, info: dict[str, Any], searcher: Any = None) -> None:
        self.spec = spec
        self.info = info
        self.searcher = searcher
        #: The composed queries' runs per encoding (``evaluation.composed_runs``), when asked.
        self.composed: dict[str, dict[str, dict[str, float]]] = {}


def prepare_variant(cfg: EvaluateConfig, spec: VariantSettings, qrels: dict[str, dict[str, int]],
                    searchers: dict[tuple, Any] | None = None, tables: Tables | None = None) -> Prepared:
    """Opens a table variant (or checks a checkpoint) and checks it holds the judged documents.

    Args:
        tables: the run's Delta handle (default: made from ``cfg.input``).
        searchers: searchers already opened, shared by variants of the same table version
            (vector, fts and hybrid on one table load its model once).

    Raises:
        EvaluationError / SearchError: with the fix.
    """
    from pipelines.query.evaluation import (
        EvaluationError,
        check_coverage,
        corpus_doc_ids,
        searcher_doc_ids,
    )

    opts = dict(cfg.storage_options)
    if spec.checkpoint is not None:
        from ciea_model.checkpoint import read_manifest
        from pipelines.store.storage import is_remote, local_folder

        if not is_remote(spec.checkpoint) and not Path(spec.checkpoint).is_dir():
            raise EvaluationError(f"variant {spec.name!r}: checkpoint {spec.checkpoint} is not a directory: pass "
                                  "the folder written by ciea_model.save_checkpoint (it holds ciea_checkpoint.json)")
        try:
            with local_folder(spec.checkpoint, opts) as local:  # local, or s3:// (copied here)
                manifest = read_manifest(local)
        except (FileNotFoundError, ValueError) as e:
            raise EvaluationError(f"variant {spec.name!r}: {e}") from None
        # Checked on the corpus doc ids before anything is encoded.
        doc_ids = corpus_doc_ids(tables or cfg.tables(), cfg.input.corpus_version)
        where = f"variant {spec.name!r} (corpus {cfg.input.root}, encoded with {spec.checkpoint})"
        missing = check_coverage(qrels, doc_ids, where, cfg.max_missing_fraction)
        info = {"kind": "checkpoint", "source": spec.checkpoint, "mode": "exact cosine (in-process)",
                "model_id": manifest.get("model_id"), "variant": (manifest.get("config") or {}).get("variant"),
                "corpus_version": cfg.input.corpus_version, "missing_relevant_docs": len(missing)}
        return Prepared(spec, info)

    from pipelines.query.search import Searcher

    db, table, version = spec.table_spec
    key = (db, table, version, spec.query_checkpoint)
    searchers = {} if searchers is None else searchers
    if key not in searchers:
        searchers[key] = Searcher.open(db, table, version=version, checkpoint=spec.query_checkpoint,
                                       storage_options=opts or None, device=cfg.search.device)
    searcher = searchers[key]
    where = f"variant {spec.name!r} (table {db}/{table}@{searcher.version})"
    missing = check_coverage(qrels, searcher_doc_ids(searcher, opts), where, cfg.max_missing_fraction)
    info = {"kind": "table", "source": f"{db}/{table}", "mode": spec.mode, "version": searcher.version,
            "tag": searcher.tag, "model_id": searcher.model_id, "ann_index": searcher.has_ann,
            "nprobes": cfg.search.nprobes or searcher.nprobes,
            "refine_factor": cfg.search.refine_factor or searcher.refine_factor,
            "missing_relevant_docs": len(missing)}
    return Prepared(spec, info, searcher)


Run = dict[str, dict[str, float]]


def run_variant(cfg: EvaluateConfig, prep: Prepared, queries: list[dict[str, Any]],
                qrels: dict[str, dict[str, int]], tables: Tables | None = None,
                image_queries: list[dict[str, Any]] | None = None) -> Run | tuple[Run, Run]:
    """The scored run of one variant (qid → doc id → score, best first; trec_eval breaks equal
    scores); updates ``prep.info`` with what happened. ``tables``: the run's Delta handle
    (default: made from ``cfg.input``).

    With ``image_queries`` (the release's WebQA-Image protocol), returns ``(run, image_run)``:
    ``image_run`` ranks those queries against the image documents alone (a table is searched
    with a ``modality = 'image'`` pre-filter; a checkpoint's encoded corpus is cut to its
    image documents).
    """
    from pipelines.query import evaluation as E

    t0 = time.perf_counter()
    image_run: Run = {}
    if prep.searcher is not None:
        from pipelines.query.search import Filter

        kwargs = {"nprobes": cfg.search.nprobes, "refine_factor": cfg.search.refine_factor}
        if prep.spec.mode == "fts":
            kwargs = {}  # ANN settings mean nothing to BM25
        sr = E.search_run(prep.searcher, queries, k=cfg.k, mode=prep.spec.mode, batch_size=cfg.search.batch_size,
                          progress=cfg.progress, **kwargs)
        prep.info["failed_queries"] = len(sr.failed)
        prep.info["failures"] = [{"qid": q, "error": e} for q, e in list(sr.failed.items())[:20]]
        ranked = sr.run
        if image_queries:
            image_run = E.search_run(prep.searcher, image_queries, k=cfg.k, mode=prep.spec.mode,
                                     batch_size=cfg.search.batch_size, progress=cfg.progress,
                                     where=Filter(modality="image"), **kwargs).run
        if cfg.metrics.composed_baselines and prep.spec.mode == "vector":
            prep.composed = E.composed_search_runs(prep.searcher, queries, k=cfg.k, batch_size=cfg.search.batch_size,
                                                   **kwargs)
    else:
        from ciea_model import load_checkpoint
        from pipelines.store.storage import local_folder

        with local_folder(prep.spec.checkpoint, cfg.storage_options) as local:
            model, processor = load_checkpoint(local, map_location=cfg.search.device)
        corpus = E.encode_delta_corpus(
            model, processor, tables or cfg.tables(), version=cfg.input.corpus_version,
            batch_size=cfg.search.doc_batch_size, device=cfg.search.device, progress=cfg.progress)
        # Unreadable documents rank nowhere: checked again, they may hold judged ones.
        missing = E.check_coverage(qrels, set(corpus.doc_ids), f"variant {prep.spec.name!r} (corpus encoded with "
                                   f"{prep.spec.checkpoint})", cfg.max_missing_fraction)
        prep.info.update(documents=len(corpus.doc_ids), failed_documents=len(corpus.failed),
                         missing_relevant_docs=len(missing))
        ranked = E.rank(model, processor, corpus, queries, k=cfg.k, device=cfg.search.device, scores=True)
        if image_queries:
            images = E.image_only(corpus, E.image_doc_ids(tables or cfg.tables(), cfg.input.corpus_version))
            prep.info["image_index_documents"] = len(images.doc_ids)
            image_run = E.rank(model, processor, images, image_queries, k=cfg.k, device=cfg.search.device,
                               scores=True)
        if cfg.metrics.composed_baselines:
            prep.composed = E.composed_runs(model, processor, corpus, queries, k=cfg.k, device=cfg.search.device)
        del model, processor, corpus
    if E.picture_queries(queries) and cfg.metrics.composed_baselines:
        prep.info["composed_baselines"] = (sorted(prep.composed) if prep.composed else
                                           "none: this variant encodes no image (text-only model or full-text search)")
    prep.info["seconds"] = round(time.perf_counter() - t0, 2)
    return (ranked, image_run) if image_queries is not None else ranked


# ---------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------


def write_trec(out: Path, qrels: dict[str, dict[str, int]],
               runs: dict[str, dict[str, list[str]] | dict[str, dict[str, float]]]) -> None:
    """``qrels.txt`` and ``runs/<variant>.txt`` in TREC format. A scored run keeps its scores
    (exactly: trec_eval breaks their ties as the report did, doc id descending); a ranking
    list gets ``k - rank`` (the file keeps its order). Relevance is
    written binary (grade > 0 → 1): the report's NDCG uses binary gains
    (:mod:`pipelines.query.metrics`), and trec_eval on these files gives the same numbers;
    ``qrels.graded.txt`` keeps the grades, for ``gNDCG@k`` (trec_eval's ``ndcg_cut``)."""
    lines = [f"{q} 0 {d} {int(r > 0)}" for q in sorted(qrels) for d, r in sorted(qrels[q].items())]
    (out / "qrels.txt").write_text("\n".join(lines) + "\n")
    graded = [f"{q} 0 {d} {int(r)}" for q in sorted(qrels) for d, r in sorted(qrels[q].items())]
    (out / "qrels.graded.txt").write_text("\n".join(graded) + "\n")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    for name, ranking in runs.items():
        rows = [f"{q} Q0 {d} {i + 1} {score} {name}"
                for q, ranked in sorted(ranking.items()) for i, (d, score) in enumerate(_scores(ranked))]
        (out / "runs" / f"{name}.txt").write_text("\n".join(rows) + ("\n" if rows else ""))


def _scores(ranked: list[str] | dict[str, float]) -> list[tuple[str, str]]:
    """``(doc_id, score text)`` best first; a score's ``repr`` reads back as the same double."""
    if isinstance(ranked, dict):
        return [(d, repr(float(s))) for d, s in ranked.items()]
    return [(d, str(len(ranked) - i)) for i, d in enumerate(ranked)]


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Loads the split, opens every variant (all checks before any search), runs and scores
    them, writes the report. Returns the report document.

    Raises:
        EvaluationError / SearchError: bad input, with the fix.
    """
    from pipelines.query import evaluation as E
    from pipelines.query import report as R

    t0 = time.perf_counter()
    tables = cfg.tables()
    queries, qrels = E.load_split(tables, cfg.input.split, documents_version=cfg.input.corpus_version)
    judged = sum(1 for q in queries if q["positive_doc_ids"])
    logger.info("split %s: %d queries, %d with relevant documents", cfg.input.split, len(queries), judged)
    searchers: dict[tuple, Any] = {}
    prepared = [prepare_variant(cfg, spec, qrels, searchers, tables) for spec in cfg.variants]
    searchers.clear()  # each variant holds its own reference, dropped after its run

    groupings = E.query_groupings(queries, cfg.metrics.group_by, cfg.metrics.answer_modality)
    m = cfg.metrics
    ks = (m.mrr, m.ndcg, m.recall, m.graded_ndcg, m.success)
    # The release's WebQA-Image: image-answer queries against the image documents alone.
    image_queries = ([q for q in queries if q.get(E.ANSWER_MODALITY) == "image"]
                     if m.webqa_image_protocol == "release" else None)
    if image_queries is not None and not image_queries:
        logger.warning("webqa_image_protocol=release: no query has only image answers; no %s group",
                       E.IMAGE_INDEX_GROUP)
    runs: dict[str, Run] = {}
    reports = {}
    for prep in prepared:
        logger.info("variant %s: %s", prep.spec.name, prep.info["source"])
        got = run_variant(cfg, prep, queries, qrels, tables, image_queries=image_queries)
        runs[prep.spec.name], image_run = got if isinstance(got, tuple) else (got, {})
        reports[prep.spec.name] = E.evaluate_grouped(runs[prep.spec.name], qrels, groupings, *ks)
        if image_run:
            E.add_image_index_group(reports[prep.spec.name], image_run, qrels, *ks)
            runs[f"{prep.spec.name}.{E.IMAGE_INDEX_GROUP}"] = image_run
        if prep.composed:
            E.add_composed_groups(reports[prep.spec.name], prep.composed, qrels, *ks)
            runs.update({f"{prep.spec.name}.{E.COMPOSED_GROUP}-{enc}": r for enc, r in prep.composed.items()})
            prep.composed = {}
        prep.searcher = None  # release the model before the next variant loads its own

    meta = {"split": cfg.input.split, "root": storage_mod.normalise_uri(cfg.input.root), "queries": len(queries),
            "judged_queries": judged, "k": cfg.k, "webqa_image_protocol": m.webqa_image_protocol,
            "seconds": round(time.perf_counter() - t0, 2)}
    doc = R.build_report(reports, {p.spec.name: p.info for p in prepared}, m.names, meta,
                         include_per_query=cfg.output.per_query)
    out = Path(cfg.output.out)
    doc["files"] = R.write_report(doc, out, m.charts)
    if cfg.output.trec:
        write_trec(out, qrels, runs)
    return doc
