"""``ciea search``: search a published LanceDB table from the command line.

Opens the table at its ``published`` version (or ``--version N`` / a tag), loads the
checkpoint recorded with it (or ``--checkpoint``; its model_id must be the table's),
encodes the queries and prints the top ``--k`` per query: rank, score, doc_id, modality and
an excerpt of the caption or text. ``--json`` prints the same for machines.

Modes: ``vector`` (cosine; the ANN index when the table has one, with ``--nprobes`` /
``--refine-factor`` defaulting to the stored index plan, else exact), ``fts`` (BM25 over
``text`` and ``caption``) and ``hybrid`` (reciprocal-rank fusion of both lists, k = 60).
Filters are structured: ``--where-modality image``, ``--where COLUMN=VALUE`` (typed by the
column; values with quotes, ``;`` or ``--`` are refused) — never SQL text.

Examples::

    ciea search "a red circle at the top"                         # ./data/lancedb, table documents
    ciea search "red circle" --mode hybrid --k 5 --where-modality image
    ciea search "museum" "harbour at night" --mode fts --json     # several queries, one batch
    ciea search "red circle" --table webqa_ciea --db s3://vectors/webqa --version 12
    ciea search "red circle" --where source_version=3 --set query.nprobes=40
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipelines.store import storage as storage_mod

from .common import job_logging, job_overrides, job_parser, parse_job_config, yaml_str
from .sql import display, format_text_table

logger = logging.getLogger("ciea.search")


class TableSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    root: str = Field("data", description="data root; the LanceDB database is <root>/lancedb unless db is set")
    db: str | None = Field(None, description="LanceDB database folder, local or s3:// (default: <root>/lancedb)")
    name: str = Field("documents", pattern=r"^[A-Za-z0-9_.-]+$", description="table name")
    version: int | str | None = Field(None, description="table version number or tag (default: the `published` tag)")
    storage_options: storage_mod.StorageOptions = Field(
        default_factory=dict, description="object-store settings (AWS_ENDPOINT_URL, AWS_REGION, ...); "
                                          "credentials only from the environment")


class ModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: str | None = Field(None, description="checkpoint directory (default: the one recorded in the table; "
                                                     "its model_id must equal the table's)")
    device: Literal["cpu", "cuda"] = Field("cpu", description="device that encodes the queries")


class QuerySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(10, ge=1, le=10_000, description="results per query")
    mode: Literal["vector", "fts", "hybrid"] = Field("vector", description="vector, fts (BM25) or hybrid (RRF)")
    where_modality: Literal["image", "text"] | None = Field(None, description="only documents of this modality")
    where: list[str] = Field(default_factory=list, description="COLUMN=VALUE equality filters (typed by the column)")
    nprobes: int | None = Field(None, ge=1, description="ANN partitions probed (default: the stored index plan)")
    refine_factor: int | None = Field(None, ge=1, description="ANN re-rank factor (default: the stored index plan)")
    candidates: int | None = Field(None, ge=1, description="hybrid: candidates fused from each list (default max(k, 50))")


class OutputSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    json_output: bool = Field(False, description="print JSON instead of a table")
    width: int = Field(70, ge=10, description="table: longest caption/text excerpt")


class SearchConfig(BaseModel):
    """The whole search command, validated before anything is opened."""

    model_config = ConfigDict(extra="forbid")
    table: TableSettings = Field(default_factory=TableSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    query: QuerySettings = Field(default_factory=QuerySettings)
    output: OutputSettings = Field(default_factory=OutputSettings)

    @property
    def db_uri(self) -> str:
        return self.table.db or storage_mod.join(storage_mod.normalise_uri(self.table.root), "lancedb")


PROG = "ciea search"
STORAGE = "table.storage_options"
#: Flags of this job → config keys (the shared ones are in ``jobs/common.py``; ``--version``
#: is a number or a tag, ``--where`` a list: both below).
FLAGS = {"root": "table.root", "db": "table.db", "table": "table.name", "checkpoint": "model.checkpoint",
         "device": "model.device", "k": "query.k", "mode": "query.mode", "where_modality": "query.where_modality",
         "nprobes": "query.nprobes", "refine_factor": "query.refine_factor"}


def _parser() -> argparse.ArgumentParser:
    p = job_parser(PROG, __doc__, SearchConfig, storage=STORAGE, progress=None, set_example="query.nprobes=40")
    p.add_argument("queries", nargs="+", metavar="QUERY", help="query text (several: searched as one batch)")
    p.add_argument("--root", help="data root (table.root; the database is <root>/lancedb)")
    p.add_argument("--db", help="LanceDB database folder, local or s3:// (table.db)")
    p.add_argument("--table", help="table name (table.name)")
    p.add_argument("--version", help="table version number or tag (table.version; default: published)")
    p.add_argument("--checkpoint", help="checkpoint directory (model.checkpoint; default: the table's)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="query encoder device (model.device)")
    p.add_argument("--k", type=int, help="results per query (query.k)")
    p.add_argument("--mode", choices=["vector", "fts", "hybrid"], help="search mode (query.mode)")
    p.add_argument("--where-modality", choices=["image", "text"], help="only this modality (query.where_modality)")
    p.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                   help="equality filter, repeatable (query.where)")
    p.add_argument("--nprobes", type=int, help="ANN partitions probed (query.nprobes)")
    p.add_argument("--refine-factor", type=int, help="ANN re-rank factor (query.refine_factor)")
    p.add_argument("--json", action="store_true", help="print JSON (output.json_output)")
    return p


def parse_config(argv: list[str] | None) -> tuple[SearchConfig, argparse.Namespace]:
    """The command line → the validated config (nothing opened yet); exits with the errors."""
    args = _parser().parse_args(argv)
    extra = []
    if args.version is not None:
        # --version 12 stays a number; a tag name stays a string.
        extra.append(f"table.version={args.version if args.version.isdigit() else yaml_str(args.version)}")
    if args.where:
        extra.append("query.where=[" + ", ".join(yaml_str(w) for w in args.where) + "]")
    if args.json:
        extra.append("output.json_output=true")
    overrides = job_overrides(args, FLAGS, storage=STORAGE, extra=extra)
    return parse_job_config(PROG, SearchConfig, args, overrides, storage=STORAGE), args


def hit_record(hit: Any) -> dict[str, Any]:
    """A :class:`pipelines.query.search.Hit` as JSON-able fields (thumbnail as its size, no weights)."""
    return {"rank": hit.rank, "doc_id": hit.doc_id, "score": hit.score, "modality": hit.modality,
            "text": hit.text, "caption": hit.caption, "metadata": hit.metadata,
            "thumbnail_bytes": len(hit.thumbnail) if hit.thumbnail else 0}


def format_results(queries: list[str], results: list[list[Any]], header: str, width: int) -> str:
    blocks = [header]
    for q, hits in zip(queries, results, strict=True):
        blocks.append(f"\nquery: {q}")
        if not hits:
            blocks.append("  (no results)")
            continue
        rows = [(h.rank, round(h.score, 4), h.doc_id, h.modality,
                 display(h.caption if h.modality == "image" else (h.text or h.caption or ""), width)) for h in hits]
        blocks.append(format_text_table(["rank", "score", "doc_id", "modality", "caption / text"], rows, width))
    return "\n".join(blocks)


def run(cfg: SearchConfig, queries: list[str]) -> tuple[Any, list[list[Any]]]:
    """Opens the searcher and runs the batch; returns (searcher, results)."""
    from pipelines.query.search import Filter, Searcher, parse_filter_pairs

    # Searcher.open refuses a missing or file --db before connecting: a read creates nothing.
    searcher = Searcher.open(cfg.db_uri, cfg.table.name, version=cfg.table.version, checkpoint=cfg.model.checkpoint,
                             storage_options=cfg.table.storage_options, device=cfg.model.device)
    q = cfg.query
    where = None
    if q.where_modality or q.where:
        where = Filter(modality=q.where_modality, equals=parse_filter_pairs(q.where, searcher.schema))
    results = searcher.search_batch(queries, k=q.k, mode=q.mode, where=where, nprobes=q.nprobes,
                                    refine_factor=q.refine_factor, candidates=q.candidates)
    return searcher, results


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv)
    job_logging(args.verbose)
    if not args.verbose:
        # The result table is the output; model-building chatter only with -v.
        logging.getLogger().setLevel(logging.WARNING)
    from pipelines.query.search import SearchError

    try:
        searcher, results = run(cfg, list(args.queries))
    except SearchError as e:
        print(f"ciea search: {e}", file=sys.stderr)
        return 2
    if cfg.output.json_output:
        print(json.dumps({
            "table": f"{searcher.db_uri}/{searcher.name}", "version": searcher.version, "tag": searcher.tag,
            "model_id": searcher.model_id, "mode": cfg.query.mode, "k": cfg.query.k,
            "results": [{"query": q, "hits": [hit_record(h) for h in hits]}
                        for q, hits in zip(args.queries, results, strict=True)]}, indent=1, ensure_ascii=False))
    else:
        at = f"tag {searcher.tag!r} = version {searcher.version}" if searcher.tag else f"version {searcher.version}"
        search_kind = "ANN" if searcher.has_ann else "exact"
        header = (f"{searcher.name} @ {at}, model_id {searcher.model_id}; mode {cfg.query.mode}"
                  f"{f' ({search_kind})' if cfg.query.mode != 'fts' else ''}, k={cfg.query.k}")
        print(format_results(list(args.queries), results, header, cfg.output.width))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
