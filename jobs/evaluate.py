"""``ciea evaluate``: score tables and checkpoints on a query split — MRR@10/@20,
NDCG@10/@20, graded NDCG gNDCG@10/@20 (gain = the qrels grade, trec_eval's ndcg_cut),
Recall@1/5/20/100 (share of the relevant documents in the top k) and Success@1/5/20/100 (any
relevant document in the top k: the release's "Recall@1" is Success@1), overall, by query kind
and by answer modality — several variants side by side in one report. The numbers are
trec_eval's own (pytrec_eval) on the runs' scores: equal scores rank by doc id descending.

``--set metrics.webqa_image_protocol=release`` also ranks the image-answer queries against
the image documents alone (group ``image-index``): WebQA-Image as the release scores it, with
a separate image-only index; the default scores them only in the shared index
(``modality=image``).

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
``qrels.txt`` and ``runs/<variant>.txt`` in TREC format with the runs' own scores (``trec_eval
qrels.txt runs/ciea.txt`` reproduces the numbers, ties included; ``runs/<variant>.image-index.txt``
under the release protocol), and the resolved config.

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
from pathlib import Path
from typing import Any

from pipelines.query.config import EvaluateConfig, VariantSettings

from .common import (
    STORAGE,
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
    ``ciea demo`` calls): :func:`pipelines.query.evaluation_run.run`, the resolved config,
    the printed tables. Returns the exit code."""
    if cfg.search.threads:
        import torch

        torch.set_num_threads(cfg.search.threads)
    out = Path(cfg.output.out)
    from ciea_model.checkpoint import CheckpointError
    from pipelines.query import evaluation_run
    from pipelines.query.evaluation import EvaluationError
    from pipelines.query.search import SearchError

    try:
        doc = evaluation_run.run(cfg)
    except (EvaluationError, SearchError, CheckpointError) as e:  # a table's --db, a checkpoint's weights
        print(f"ciea evaluate: {e}", file=sys.stderr)
        return 2
    write_json(out / "evaluate_config.json", cfg.model_dump(mode="json"))
    print(format_summary(doc, cfg.metrics.names))
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv)
    job_logging(args.verbose)
    return execute(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
