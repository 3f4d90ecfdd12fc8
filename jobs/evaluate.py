"""``ciea evaluate``: score tables and checkpoints on a query split — MRR@10/@20,
NDCG@10/@20, graded NDCG gNDCG@10/@20 (gain = the qrels grade, trec_eval's ndcg_cut),
Recall@1/5/20/100, overall, by query kind and by answer modality — several
variants side by side in one report.

A variant is a name and where its ranking comes from (``--variant NAME=KIND:WHERE``):

* ``table:<db>/<table>[@version|@tag]`` — a LanceDB table written by ``ciea embed``,
  searched by vector through :class:`pipelines.query.search.Searcher` (ANN index included, as
  readers get it); the ``published`` version unless a version or tag is given;
* ``fts:<db>/<table>[@...]`` — the same table's full-text (BM25) search: the BM25 baseline;
* ``hybrid:<db>/<table>[@...]`` — reciprocal-rank fusion of the two;
* ``checkpoint:<dir>`` — a checkpoint that encodes ``corpus/documents`` in-process and
  ranks exhaustively by cosine (small corpora; no table needed).

Queries and relevance judgments come from the Delta tables ``queries/<split>`` and
``qrels/<split>`` that ``ciea ingest`` writes under ``--root``; a query's answer modality is
the modality of its relevant documents in ``corpus/documents``. Every variant must hold the
judged documents (a table built from another corpus is refused, not scored near zero).

Into ``--out``: ``report.json`` (every metric per variant and group, per query too),
``report.md`` (the tables), one PNG bar chart per charted metric (``mrr_at_10.png``),
``qrels.txt`` and ``runs/<variant>.txt`` in TREC format (``trec_eval qrels.txt
runs/ciea.txt`` reproduces the numbers), and the resolved config.

Examples::

    ciea evaluate --variant ciea=table:data/lancedb/documents --variant bm25=fts:data/lancedb/documents
    ciea evaluate --split dev --variant ciea=checkpoint:runs/demo/train/ciea-s2/model \\
        --variant text-only=checkpoint:runs/demo/train/text-only-s2/model --out runs/eval-dev
    ciea evaluate --variant old=table:data/lancedb/documents@3 --variant new=table:data/lancedb/documents
    ciea evaluate --config eval.yaml --set metrics.group_by=[Qcate] --set metrics.charts=[MRR@10,Recall@5]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.store import storage as storage_mod

from .common import (
    command_args,
    job_logging,
    job_overrides,
    job_parser,
    parse_job_config,
    write_json,
)

logger = logging.getLogger("ciea.evaluate")

#: ``--variant`` kinds: the search mode of a table variant, or an in-process checkpoint.
TABLE_KINDS = {"table": "vector", "fts": "fts", "hybrid": "hybrid"}
VARIANT_KINDS = (*TABLE_KINDS, "checkpoint")


class InputSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    root: str = Field("data", description="data root holding queries/<split>, qrels/<split> and corpus/documents")
    split: str = Field("test", pattern=r"^[A-Za-z0-9_.-]+$", description="query split to score")
    corpus_version: int | None = Field(
        None, ge=0, description="corpus/documents version that checkpoint variants encode and answer modalities "
                                "come from (default: latest)")
    storage_options: storage_mod.StorageOptions = Field(
        default_factory=dict, description="object-store settings for Delta and LanceDB (AWS_ENDPOINT_URL, "
                                          "AWS_REGION, ...); credentials only from the environment")


class VariantSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.+-]+$", description="label in the report (and run file name)")
    table: str | None = Field(None, description="<db>/<table>[@version|@tag] of a LanceDB table (default version: "
                                                "the published one)")
    mode: Literal["vector", "fts", "hybrid"] = Field("vector", description="table search mode (fts = BM25)")
    checkpoint: str | None = Field(None, description="checkpoint directory: encode corpus/documents in-process "
                                                     "(instead of a table)")
    query_checkpoint: str | None = Field(None, description="table variants: checkpoint that encodes the queries "
                                                           "(default: the one recorded in the table)")

    @model_validator(mode="after")
    def _check(self) -> VariantSettings:
        if (self.table is None) == (self.checkpoint is None):
            raise ValueError(f"variant {self.name!r}: give exactly one of table (e.g. table:data/lancedb/documents) "
                             "or checkpoint (e.g. checkpoint:runs/demo/train/ciea-s2/model)")
        if self.checkpoint is not None and self.mode != "vector":
            raise ValueError(f"variant {self.name!r}: a checkpoint variant ranks by vector only; mode "
                             f"{self.mode!r} needs a table (--variant {self.name}={self.mode}:<db>/<table>)")
        if self.table is not None:
            parse_table_spec(self.table)
        return self

    @property
    def table_spec(self) -> tuple[str, str, int | str | None]:
        return parse_table_spec(self.table or "")


class MetricSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mrr: list[int] = Field([10, 20], description="MRR cutoffs")
    ndcg: list[int] = Field([10, 20], description="NDCG cutoffs")
    recall: list[int] = Field([1, 5, 20, 100], description="Recall cutoffs")
    graded_ndcg: list[int] = Field([10, 20], description="graded NDCG cutoffs (gNDCG@k: trec_eval ndcg_cut "
                                   "with gain = the qrels grade)")
    group_by: list[str] = Field(["kind"], description="query metadata keys to split the report by (synthetic: kind)")
    answer_modality: bool = Field(True, description="also split by the modality of the relevant documents")
    charts: list[str] = Field(["MRR@10"], description="metrics drawn as PNG bar charts (groups x variants)")

    @model_validator(mode="after")
    def _check(self) -> MetricSettings:
        for name in ("mrr", "ndcg", "recall", "graded_ndcg"):
            bad = [k for k in getattr(self, name) if k < 1]
            if bad:
                raise ValueError(f"metrics.{name} cutoffs must be >= 1, got {bad}")
        if not (self.mrr or self.ndcg or self.recall):
            raise ValueError("no metric cutoff at all: give metrics.mrr, metrics.ndcg or metrics.recall")
        names = self.names
        unknown = [c for c in self.charts if c not in names]
        if unknown:
            raise ValueError(f"metrics.charts {unknown} are not computed; chart some of {names}")
        return self

    @property
    def names(self) -> list[str]:
        from pipelines.query.metrics import metric_names

        return metric_names(self.mrr, self.ndcg, self.recall, self.graded_ndcg)

    @property
    def max_k(self) -> int:
        return max((*self.mrr, *self.ndcg, *self.recall, *self.graded_ndcg), default=1)


class SearchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int | None = Field(None, ge=1, description="documents retrieved per query (default: the largest cutoff)")
    batch_size: int = Field(64, ge=1, description="queries per search / encoder call")
    doc_batch_size: int = Field(64, ge=1, description="checkpoint variants: documents per encoder call")
    nprobes: int | None = Field(None, ge=1, description="ANN probes (default: the table's stored plan)")
    refine_factor: int | None = Field(None, ge=1, description="ANN re-ranking factor (default: the stored plan)")
    device: Literal["cpu", "cuda"] = Field("cpu", description="torch device for query / corpus encoding")
    threads: int | None = Field(None, ge=1, description="torch threads (default: torch decides)")


class OutputSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    out: str = Field("runs/evaluate", description="folder for report.json, report.md, charts, TREC runs")
    per_query: bool = Field(True, description="store every query's values in report.json")
    trec: bool = Field(True, description="write qrels.txt and runs/<variant>.txt in TREC format")


class EvaluateConfig(BaseModel):
    """The whole evaluation, validated before anything is opened."""

    model_config = ConfigDict(extra="forbid")
    input: InputSettings = Field(default_factory=InputSettings)
    variants: list[VariantSettings] = Field(
        default_factory=list, description="what to score: a list of {name, table: <db>/<table>[@version|@tag], "
                                          "mode: vector|fts|hybrid, query_checkpoint} or {name, checkpoint: DIR}")
    metrics: MetricSettings = Field(default_factory=MetricSettings)
    search: SearchSettings = Field(default_factory=SearchSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    max_missing_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="share of the judged documents a variant may lack (they rank nowhere)")
    progress: bool = Field(True, description="show progress bars")

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        if not self.variants:
            raise ValueError("no variant to evaluate: pass --variant NAME=KIND:WHERE, e.g. "
                             "--variant ciea=table:data/lancedb/documents --variant bm25=fts:data/lancedb/documents")
        names = [v.name for v in self.variants]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variant names {dup} are used twice; every variant needs its own name")
        if self.search.k is not None and self.search.k < self.metrics.max_k:
            raise ValueError(f"search.k={self.search.k} is below the largest cutoff {self.metrics.max_k}: "
                             f"raise it or drop that cutoff")
        return self

    @property
    def k(self) -> int:
        return self.search.k or self.metrics.max_k


def parse_table_spec(spec: str) -> tuple[str, str, int | str | None]:
    """``"<db>/<table>[@version|@tag]"`` → ``(db_uri, table, version)``; ``version`` is an int,
    a tag name, or ``None`` (the published version).

    Raises:
        ValueError: no ``/`` between database and table, or an empty part, with an example.
    """
    path, at, version = spec.rpartition("@") if "@" in spec.rsplit("/", 1)[-1] else (spec, "", "")
    db, slash, table = path.rpartition("/")
    if not slash or not db or not table or (at and not version):
        raise ValueError(f"table {spec!r}: expected <db>/<table>[@version|@tag], e.g. data/lancedb/documents "
                         "or data/lancedb/documents@published or s3://bucket/lancedb/documents@12")
    return db, table, (int(version) if version.isdigit() else version) if at else None


def parse_variant(text: str) -> dict[str, Any]:
    """``--variant NAME=KIND:WHERE`` → a :class:`VariantSettings` dict.

    Raises:
        SystemExit: a malformed flag, naming the expected form.
    """
    name, eq, rest = text.partition("=")
    kind, colon, where = rest.partition(":")
    if not eq or not colon or not name or not where or kind not in VARIANT_KINDS:
        raise SystemExit(
            f"--variant {text!r}: expected NAME=KIND:WHERE with KIND one of {', '.join(VARIANT_KINDS)}, e.g. "
            "ciea=table:data/lancedb/documents, bm25=fts:data/lancedb/documents, "
            "base=checkpoint:runs/demo/train/ciea-s2/model")
    if kind == "checkpoint":
        return {"name": name, "checkpoint": where}
    return {"name": name, "table": where, "mode": TABLE_KINDS[kind]}


def format_variant(spec: VariantSettings) -> str:
    """The ``--variant NAME=KIND:WHERE`` text of a variant (the inverse of :func:`parse_variant`)."""
    if spec.checkpoint is not None:
        return f"{spec.name}=checkpoint:{spec.checkpoint}"
    kind = next(k for k, mode in TABLE_KINDS.items() if mode == spec.mode)
    return f"{spec.name}={kind}:{spec.table}"


PROG = "ciea evaluate"
STORAGE = "input.storage_options"
#: Flags of this job → config keys (the shared ones are in ``jobs/common.py``).
FLAGS = {"root": "input.root", "split": "input.split", "corpus_version": "input.corpus_version", "out": "output.out",
         "k": "search.k", "device": "search.device", "batch_size": "search.batch_size"}


def _parser() -> argparse.ArgumentParser:
    p = job_parser(PROG, __doc__, EvaluateConfig, storage=STORAGE, progress="no progress bars (progress=false)",
                   set_example="metrics.charts=[MRR@10,NDCG@10]")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=KIND:WHERE",
                   help=f"a variant to score, repeatable; KIND: {', '.join(VARIANT_KINDS)} (replaces `variants`)")
    p.add_argument("--root", help="data root with queries/, qrels/ and corpus/ (input.root)")
    p.add_argument("--split", help="query split, e.g. test or dev (input.split)")
    p.add_argument("--corpus-version", type=int, help="corpus/documents version (input.corpus_version)")
    p.add_argument("--out", help="output folder (output.out)")
    p.add_argument("--k", type=int, help="documents retrieved per query (search.k)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="encoding device (search.device)")
    p.add_argument("--batch-size", type=int, help="queries per search call (search.batch_size)")
    return p


def parse_config(argv: list[str] | None) -> tuple[EvaluateConfig, argparse.Namespace]:
    """The command line → the validated config (nothing opened yet); exits with the errors."""
    args = _parser().parse_args(argv)
    # JSON is YAML: the parsed list replaces `variants` from a config file.
    variants = ["variants=" + json.dumps([parse_variant(v) for v in args.variant])] if args.variant else []
    overrides = job_overrides(args, FLAGS, storage=STORAGE, extra=variants)
    return parse_job_config(PROG, EvaluateConfig, args, overrides, storage=STORAGE), args


def command(cfg: EvaluateConfig, always: tuple[str, ...] = ()) -> list[str]:
    """The arguments of ``ciea evaluate`` that give ``cfg`` (what ``ciea demo`` prints)."""
    as_flags = all(v.query_checkpoint is None for v in cfg.variants)
    args = command_args(cfg, EvaluateConfig.model_construct(), FLAGS, skip=("variants",) if as_flags else (),
                        always=always)
    return args + [a for v in cfg.variants for a in ("--variant", format_variant(v))] if as_flags else args


# ---------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------


class Prepared:
    """A variant opened and checked, ready to run."""

    def __init__(self, spec: VariantSettings, info: dict[str, Any], searcher: Any = None) -> None:
        self.spec = spec
        self.info = info
        self.searcher = searcher


def prepare_variant(cfg: EvaluateConfig, spec: VariantSettings, qrels: dict[str, dict[str, int]],
                    searchers: dict[tuple, Any] | None = None) -> Prepared:
    """Opens a table variant (or checks a checkpoint) and checks it holds the judged documents.

    Args:
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

    opts = dict(cfg.input.storage_options)
    if spec.checkpoint is not None:
        from ciea_model.checkpoint import read_manifest

        if not Path(spec.checkpoint).is_dir():
            raise EvaluationError(f"variant {spec.name!r}: checkpoint {spec.checkpoint} is not a directory: pass "
                                  "the folder written by ciea_model.save_checkpoint (it holds ciea_checkpoint.json)")
        try:
            manifest = read_manifest(spec.checkpoint)
        except (FileNotFoundError, ValueError) as e:
            raise EvaluationError(f"variant {spec.name!r}: {e}") from None
        # Checked on the corpus doc ids before anything is encoded.
        doc_ids = corpus_doc_ids(cfg.input.root, cfg.input.corpus_version, opts)
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


def run_variant(cfg: EvaluateConfig, prep: Prepared, queries: list[dict[str, Any]],
                qrels: dict[str, dict[str, int]]) -> dict[str, list[str]]:
    """The ranked run of one variant (qid → doc ids); updates ``prep.info`` with what happened."""
    from pipelines.query import evaluation as E

    t0 = time.perf_counter()
    if prep.searcher is not None:
        kwargs = {"nprobes": cfg.search.nprobes, "refine_factor": cfg.search.refine_factor}
        if prep.spec.mode == "fts":
            kwargs = {}  # ANN settings mean nothing to BM25
        sr = E.search_run(prep.searcher, queries, k=cfg.k, mode=prep.spec.mode, batch_size=cfg.search.batch_size,
                          progress=cfg.progress, **kwargs)
        prep.info["failed_queries"] = len(sr.failed)
        prep.info["failures"] = [{"qid": q, "error": e} for q, e in list(sr.failed.items())[:20]]
        run = sr.run
    else:
        from ciea_model import load_checkpoint
        from pipelines.store.delta_tables import Tables

        model, processor = load_checkpoint(prep.spec.checkpoint, map_location=cfg.search.device)
        corpus = E.encode_delta_corpus(
            model, processor, Tables(cfg.input.root, cfg.input.storage_options).documents,
            version=cfg.input.corpus_version, storage_options=cfg.input.storage_options,
            batch_size=cfg.search.doc_batch_size, device=cfg.search.device, progress=cfg.progress)
        # Unreadable documents rank nowhere: checked again, they may hold judged ones.
        missing = E.check_coverage(qrels, set(corpus.doc_ids), f"variant {prep.spec.name!r} (corpus encoded with "
                                   f"{prep.spec.checkpoint})", cfg.max_missing_fraction)
        prep.info.update(documents=len(corpus.doc_ids), failed_documents=len(corpus.failed),
                         missing_relevant_docs=len(missing))
        run = E.rank(model, processor, corpus, queries, k=cfg.k, device=cfg.search.device)
        del model, processor, corpus
    prep.info["seconds"] = round(time.perf_counter() - t0, 2)
    return run


# ---------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------


def write_trec(out: Path, qrels: dict[str, dict[str, int]], runs: dict[str, dict[str, list[str]]]) -> None:
    """``qrels.txt`` and ``runs/<variant>.txt`` in TREC format. Scores are ``k - rank``
    (trec_eval orders by score, so the file keeps each ranking's order). Relevance is
    written binary (grade > 0 → 1): the report's NDCG uses binary gains
    (:mod:`pipelines.query.metrics`), and trec_eval on these files gives the same numbers;
    ``qrels.graded.txt`` keeps the grades, for ``gNDCG@k`` (trec_eval's ``ndcg_cut``)."""
    lines = [f"{q} 0 {d} {int(r > 0)}" for q in sorted(qrels) for d, r in sorted(qrels[q].items())]
    (out / "qrels.txt").write_text("\n".join(lines) + "\n")
    graded = [f"{q} 0 {d} {int(r)}" for q in sorted(qrels) for d, r in sorted(qrels[q].items())]
    (out / "qrels.graded.txt").write_text("\n".join(graded) + "\n")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    for name, run in runs.items():
        rows = [f"{q} Q0 {d} {i + 1} {len(ranked) - i} {name}"
                for q, ranked in sorted(run.items()) for i, d in enumerate(ranked)]
        (out / "runs" / f"{name}.txt").write_text("\n".join(rows) + ("\n" if rows else ""))


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Loads the split, opens every variant (all checks before any search), runs and scores
    them, writes the report. Returns the report document.

    Raises:
        EvaluationError / SearchError: bad input, with the fix.
    """
    from pipelines.query import evaluation as E
    from pipelines.query import report as R

    t0 = time.perf_counter()
    queries, qrels = E.load_split(cfg.input.root, cfg.input.split, cfg.input.storage_options,
                                  documents_version=cfg.input.corpus_version)
    judged = sum(1 for q in queries if q["positive_doc_ids"])
    logger.info("split %s: %d queries, %d with relevant documents", cfg.input.split, len(queries), judged)
    searchers: dict[tuple, Any] = {}
    prepared = [prepare_variant(cfg, spec, qrels, searchers) for spec in cfg.variants]
    searchers.clear()  # each variant holds its own reference, dropped after its run

    groupings = E.query_groupings(queries, cfg.metrics.group_by, cfg.metrics.answer_modality)
    m = cfg.metrics
    runs: dict[str, dict[str, list[str]]] = {}
    reports = {}
    for prep in prepared:
        logger.info("variant %s: %s", prep.spec.name, prep.info["source"])
        runs[prep.spec.name] = run_variant(cfg, prep, queries, qrels)
        reports[prep.spec.name] = E.evaluate_grouped(runs[prep.spec.name], qrels, groupings, m.mrr, m.ndcg, m.recall,
                                                     m.graded_ndcg)
        prep.searcher = None  # release the model before the next variant loads its own

    meta = {"split": cfg.input.split, "root": storage_mod.normalise_uri(cfg.input.root), "queries": len(queries),
            "judged_queries": judged, "k": cfg.k, "seconds": round(time.perf_counter() - t0, 2)}
    doc = R.build_report(reports, {p.spec.name: p.info for p in prepared}, m.names, meta,
                         include_per_query=cfg.output.per_query)
    out = Path(cfg.output.out)
    doc["files"] = R.write_report(doc, out, m.charts)
    if cfg.output.trec:
        write_trec(out, qrels, runs)
    return doc


def format_summary(doc: dict[str, Any], metrics: list[str]) -> str:
    from pipelines.query.metrics import OVERALL

    meta = doc["meta"]
    lines = [f"evaluate split {meta['split']} of {meta['root']}: {meta['judged_queries']} judged queries, "
             f"{len(doc['variants'])} variant(s), k={meta['k']}", ""]
    names = list(doc["variants"])
    width = max(len("variant"), *(len(n) for n in names))
    for group in doc["groups"]:
        values = [(n, doc["variants"][n]["metrics"] if group == OVERALL
                   else doc["variants"][n]["by_group"].get(group, {})) for n in names]
        count = doc["variants"][names[0]]["num_queries"] if group == OVERALL \
            else doc["variants"][names[0]]["group_counts"].get(group)
        lines.append(f"{'overall' if group == OVERALL else group} ({count} queries)")
        lines.append("  " + "variant".ljust(width) + "".join(f"{x:>11}" for x in metrics))
        for n, vals in values:
            cells = "".join(f"{'-' if vals.get(x) is None else f'{100 * vals[x]:.2f}':>11}" for x in metrics)
            lines.append("  " + n.ljust(width) + cells)
        lines.append("")
    for n, v in doc["variants"].items():
        if v["info"].get("failed_queries"):
            lines.append(f"  {n}: {v['info']['failed_queries']} searches failed and score 0 (see report.json)")
    lines.append(f"report: {doc['files']['markdown']} (+ report.json, charts)")
    return "\n".join(lines)


def execute(cfg: EvaluateConfig) -> int:
    """Runs the job on a parsed config (what ``main`` does after parsing, and what
    ``ciea demo`` calls): :func:`evaluate`, the resolved config, the printed tables.
    Returns the exit code."""
    if cfg.search.threads:
        import torch

        torch.set_num_threads(cfg.search.threads)
    out = Path(cfg.output.out)
    from pipelines.query.evaluation import EvaluationError
    from pipelines.query.search import SearchError

    try:
        doc = evaluate(cfg)
    except (EvaluationError, SearchError) as e:
        print(f"ciea evaluate: {e}", file=sys.stderr)
        return 2
    write_json(out / "evaluate_config.json", cfg.model_dump(mode="json"))
    print(format_summary(doc, cfg.metrics.names))
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv)
    job_logging(args.verbose)
    return execute(cfg)
