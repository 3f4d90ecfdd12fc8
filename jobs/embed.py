"""``ciea embed``: embed a Delta version of ``corpus/documents`` with a CIEA checkpoint into a
LanceDB table, build its indexes and publish the finished version.

Ray Data reads the Delta version, CPU tasks decode and transform the images, an actor pool
encodes (the checkpoint loaded once per actor; CPU actors with a set thread count, GPU
actors one per GPU in bf16), and workers write Lance fragments that the driver commits in
one commit. Then: a BTree index on doc_id, full-text indexes on text and caption, an ANN
index when the table is large enough for one to beat exact search (the rule is in
``pipelines/store/lance_tables.py``), and the version is tagged ``<tag>`` and ``published``.

Every row records the checkpoint's ``model_id`` and the Delta ``source_version``; a table
never mixes two model ids (another checkpoint is refused — use another ``--table``).
Re-running is safe at any point: only documents whose ``(doc_id, content_sha256)`` is not
in the table yet are embedded, rows of changed or deleted documents are replaced, and a
run with nothing to do commits nothing.

One writer per table: a run holds the table's lease (``<db>/_ciea_leases/<table>.json``)
while it writes; a second ``ciea embed`` or ``ciea reindex`` on the same table exits with
code 4 and one line naming the run that holds it, having written nothing. A lease whose
run died is taken over (its process gone from this host, or no heartbeat for 10 minutes);
remove the file to free the table sooner.

Examples::

    ciea embed --checkpoint runs/demo/ciea/checkpoint             # ./data → ./data/lancedb
    ciea embed --checkpoint ckpt --root s3://corpus/webqa --db s3://vectors/webqa \\
        --storage-option AWS_REGION=eu-west-1                    # credentials from the environment
    ciea embed --checkpoint ckpt --version 12 --table webqa_ciea --set encode.batch_size=128
    ciea embed --checkpoint ckpt --device cuda --set encode.batch_size=512   # one actor per GPU
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import Field

from pipelines.index import build
from pipelines.index.config import EmbedConfig
from pipelines.store import storage
from pipelines.store.delta_tables import Tables

from .common import (
    STORAGE,
    RaySettings,
    command_args,
    job_logging,
    job_overrides,
    job_parser,
    parse_job_config,
    ray_owned,
    start_ray,
    write_json,
)

logger = logging.getLogger("ciea.embed")

PROG = "ciea embed"
#: Exit code when another run writes the table (its lease, or its commits): nothing was written.
EXIT_TABLE_BUSY = 4
#: Flags of this job → config keys (the shared ones are in ``jobs/common.py``).
FLAGS = {"checkpoint": "model.checkpoint", "root": "input.root", "version": "input.version", "db": "output.db",
         "table": "output.table", "tag": "output.tag", "device": "encode.device", "batch_size": "encode.batch_size",
         "actors": "encode.actors", "run_dir": "output.run_dir"}


class EmbedJobConfig(EmbedConfig):
    """``ciea embed``'s config: the run's (:class:`pipelines.index.config.EmbedConfig`) and where Ray runs."""

    ray: RaySettings = Field(default_factory=RaySettings)


def add_index_flags(p: argparse.ArgumentParser, checkpoint_help: str, version_help: str) -> None:
    """The flags ``ciea embed`` and ``ciea reindex`` share (the table, the corpus, the encoder)."""
    p.add_argument("--checkpoint", help=checkpoint_help)
    p.add_argument("--root", help="data root holding corpus/documents, local or s3:// (input.root)")
    p.add_argument("--version", type=int, help=version_help)
    p.add_argument("--db", help="LanceDB folder, local or s3:// (output.db; default <root>/lancedb)")
    p.add_argument("--table", help="LanceDB table name (output.table)")
    p.add_argument("--tag", help="tag for the finished version (output.tag)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="encoder device (encode.device)")
    p.add_argument("--run-dir", help="folder for summary.json and the resolved config (output.run_dir)")


def _parser() -> argparse.ArgumentParser:
    p = job_parser(PROG, __doc__, EmbedJobConfig, storage=STORAGE, ray=True, set_example="encode.batch_size=128")
    add_index_flags(p, "checkpoint directory to embed with (model.checkpoint)",
                    "Delta version of corpus/documents (input.version; default latest)")
    p.add_argument("--batch-size", type=int, help="documents per encoder call (encode.batch_size)")
    p.add_argument("--actors", type=int, help="encoder actors (encode.actors)")
    return p


def parse_config(argv: list[str] | None) -> tuple[EmbedJobConfig, argparse.Namespace]:
    """The command line → the validated config (nothing opened yet); exits with the errors."""
    args = _parser().parse_args(argv)
    overrides = job_overrides(args, FLAGS, storage=STORAGE)
    return parse_job_config(PROG, EmbedJobConfig, args, overrides, storage=STORAGE), args


def command(cfg: EmbedJobConfig, always: tuple[str, ...] = ()) -> list[str]:
    """The arguments of ``ciea embed`` that give ``cfg`` (what ``ciea demo`` prints)."""
    return command_args(cfg, EmbedJobConfig.model_construct(), FLAGS, always=always)


def resolve_resources(cfg: EmbedConfig, cluster: dict[str, float]) -> dict[str, Any]:
    """:func:`pipelines.index.build.resolve_resources`, its refusal as this job's exit message."""
    try:
        return build.resolve_resources(cfg, cluster)
    except build.SetupError as e:
        raise SystemExit(f"{PROG}: {e}") from None


def check(cfg: EmbedConfig, tables: Tables | None = None) -> dict[str, Any]:
    """Everything that can fail on the config, the checkpoint or the corpus, before Ray.
    Returns the checkpoint's facts.

    Raises:
        SystemExit: with the fix.
    """
    from pipelines.index import embed as E

    if not storage.is_remote(cfg.model.checkpoint) and not Path(cfg.model.checkpoint).is_dir():
        raise SystemExit(f"{PROG}: checkpoint {cfg.model.checkpoint} is not a directory: pass the folder "
                         "written by ciea_model.save_checkpoint (it holds ciea_checkpoint.json)")
    db = Path(storage.normalise_uri(cfg.db_uri))
    if not storage.is_remote(cfg.db_uri) and db.exists() and not db.is_dir():
        raise SystemExit(f"{PROG}: the LanceDB database {cfg.db_uri} is a file, not a folder: point --db at a "
                         "folder (created if missing)")
    try:
        facts = build.load_model_facts(cfg.model.checkpoint, cfg.storage_options)
        E.resolve_source(tables or cfg.tables(), cfg.input.version)
    except (build.SetupError, E.EmbedError) as e:
        raise SystemExit(f"{PROG}: {e}") from None
    return facts


def execute(cfg: EmbedJobConfig) -> int:
    """Runs the job on a parsed config (what ``main`` does after parsing, and what
    ``ciea demo`` calls): checks, Ray, :func:`pipelines.index.build.run`, summary.json,
    the printed summary. Returns the exit code."""
    from pipelines.index.embed import EmbedError
    from pipelines.store.lance_tables import ModelMismatchError
    from pipelines.store.lease import WriterConflict

    tables = cfg.tables()  # the Delta handle, made once for the checks and the run
    facts = check(cfg, tables)
    run_dir = Path(cfg.output.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "embed_config.json", cfg.model_dump(mode="json"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with ray_owned():
        start_ray(cfg.ray, log_to_driver=cfg.progress, progress=cfg.progress)
        try:
            summary = build.run(cfg, facts, tables=tables)
        except (ModelMismatchError, EmbedError) as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            return 2
        except WriterConflict as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            return EXIT_TABLE_BUSY
        except build.SetupError as e:
            raise SystemExit(f"{PROG}: {e}") from None
    write_json(run_dir / "summary.json", summary)
    print(format_summary(summary))
    return 1 if summary["failed"] else 0


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"embed {s['documents_uri']}@{s['source_version']} with model_id {s['model_id']} ({s['variant']}, "
        f"{s['dim']}-d) → {s['table']}",
        f"  documents {s['documents']} = embedded {s['rows_written']} + skipped (already embedded) "
        f"{s['skipped']} + failed {s['failed']}   (stale rows replaced: {s['deleted_stale']})",
        f"  rows in table {s['rows']}; {s['fragments']} fragments in {s['commits']} commit(s); "
        f"{s['embed_seconds']} s embedding, {s['docs_per_s']} docs/s; {s['seconds']} s in all",
    ]
    if s["noop"]:
        lines.append(f"  nothing to do: the table already holds this version (published version {s['published_version']})")
    else:
        lines.append(f"  published version {s['published_version']} as tag {s['tag']!r} and 'published'")
    for name, st in sorted(s["index_stats"].items()):
        lines.append(f"  index {name}: {st['type']}, {st['indexed']} rows indexed, {st['unindexed']} not")
    if not s["ann_plan"]:
        lines.append("  no ANN index: below index.min_rows_for_ann, exact search is used")
    for f in s["failures"][:10]:
        lines.append(f"  FAILED {f['doc_id']}: {f['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv)
    job_logging(args.verbose)
    return execute(cfg)


if __name__ == "__main__":  # `python -m jobs.embed`, the `ray job submit` entrypoint
    raise SystemExit(main())
