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

A query may carry a picture: ``--image PATH`` (repeatable; with one text per picture, or
none) is encoded as the document side encodes an image document, its text in the caption's
place, so "this, but red" is one query. ``--like DOC_ID`` searches with the stored vector of
a document of the table and leaves it out of its own results. Both are vector searches.

Examples::

    ciea search "a red circle at the top"                         # ./data/lancedb, table documents
    ciea search "red circle" --mode hybrid --k 5 --where-modality image
    ciea search "museum" "harbour at night" --mode fts --json     # several queries, one batch
    ciea search "red circle" --table webqa_ciea --db s3://vectors/webqa --version 12
    ciea search "red circle" --where source_version=3 --set query.nprobes=40
    ciea search --image photo.jpg                                 # what looks like this?
    ciea search --image photo.jpg "at night"                      # this, but at night
    ciea search --like img-00042 --k 5                            # more like this document
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipelines.query.search_run import SearchConfig, render_results, run

from .common import STORAGE, job_logging, job_overrides, job_parser, parse_job_config, yaml_str

PROG = "ciea search"
#: Flags of this job → config keys (the shared ones are in ``jobs/common.py``; ``--version``
#: is a number or a tag, ``--where`` a list: both below).
FLAGS = {"root": "table.root", "db": "table.db", "table": "table.name", "checkpoint": "model.checkpoint",
         "device": "model.device", "k": "query.k", "mode": "query.mode", "where_modality": "query.where_modality",
         "nprobes": "query.nprobes", "refine_factor": "query.refine_factor"}


def _parser() -> argparse.ArgumentParser:
    p = job_parser(PROG, __doc__, SearchConfig, storage=STORAGE, progress=None, set_example="query.nprobes=40")
    p.add_argument("queries", nargs="*", metavar="QUERY", help="query text (several: searched as one batch; with "
                   "--image: the text of each picture)")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="search with this picture (repeatable; a JPEG/PNG/... file)")
    p.add_argument("--like", action="append", default=[], metavar="DOC_ID",
                   help="more like this document of the table (repeatable)")
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


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv)
    job_logging(args.verbose)
    if not args.verbose:
        # The result table is the output; model-building chatter only with -v.
        logging.getLogger().setLevel(logging.WARNING)
    from pipelines.query.search import SearchError

    if not (args.queries or args.image or args.like):
        print("ciea search: give a query: text, --image PATH or --like DOC_ID", file=sys.stderr)
        return 2
    try:
        images = [_read_picture(path) for path in args.image]
        searcher, results = run(cfg, list(args.queries), images=images or None, likes=list(args.like) or None)
    except SearchError as e:
        print(f"ciea search: {e}", file=sys.stderr)
        return 2
    print(render_results(cfg, searcher, _labels(args), results))
    return 0


def _read_picture(path: str) -> bytes:
    from pipelines.query.search import SearchError
    from pipelines.store.images import MAX_IMAGE_BYTES

    try:
        with open(path, "rb") as f:  # read one byte past the cap, never the whole of a huge file
            data = f.read(MAX_IMAGE_BYTES + 1)
    except OSError as e:
        raise SearchError(f"--image {path}: cannot read it ({e.strerror or type(e).__name__}); pass an image file") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise SearchError(f"--image {path}: larger than {MAX_IMAGE_BYTES} bytes, the image cap; pass a smaller image")
    return data


def _labels(args: argparse.Namespace) -> list[str]:
    """What each result list answers, as the output names it."""
    if args.like:
        return [f"more like {d}" for d in args.like]
    if args.image:
        texts = args.queries or [""] * len(args.image)
        return [f"[picture {p}] {t}".rstrip() for p, t in zip(args.image, texts, strict=True)]
    return list(args.queries)


if __name__ == "__main__":
    raise SystemExit(main())
