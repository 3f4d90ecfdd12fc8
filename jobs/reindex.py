"""``ciea reindex``: bring a LanceDB table up to the current Delta version of
``corpus/documents`` — incrementally for the same model, by a gated full rebuild for a new one.

**Same checkpoint as the table** (the scheduled case): from the Delta version the table
records (``ciea.source_version``) to the current one, the change data feed says which
documents were inserted, updated or deleted (collapsed to the last change per doc_id;
``pipelines/index/reindex_plan.py``). Rows of updated and deleted documents are deleted, the inserted
and updated ones are embedded (the ``ciea embed`` stages, restricted to them) and
committed in one Lance commit, the new rows are folded into the indexes (the ANN index is
retrained only when the table has drifted more than ``index.max_drift`` from the size it
was trained at), the new source version is recorded, and the version is tagged and
``published``. When the feed cannot cover the range (vacuumed, disabled on a commit, log
cleaned up) the change set comes from a full diff by ``content_sha256`` instead, with a
warning; the result is the same.

What is read and where it is embedded follows the size of the change (:func:`embed_route`):
the changed documents' rows come from the feed's post-images (or a scan of the version's
row groups that hold them, without a feed), and up to ``encode.in_process_max_docs``
(1000) of them are embedded in this process — a Ray Data run's fixed start-up (encoder
actor, checkpoint load) costs more than that many documents do; larger change sets go to
Ray, as rows (up to ``changes.read_max_docs``) or read by Ray from the version. A local Ray
is started only when a step needs it (a rebuild, a large change set): a scheduled run with
a small change, or none, never starts one. Inside ``ray job submit`` (or with
``--ray-address``) the job joins that cluster up front, and its resources decide the route.

Crash safety: every step is planned against what the table holds *now*, and the source
version is recorded only after the rows and indexes are complete. A run killed at any step
re-plans from the same recorded version, skips what was already done (rows whose content
is in the table; deletes that already happened) and converges to the same table, with no
duplicate rows and no lost deletes. Readers follow the ``published`` tag, which moves only
at the end, so they never see a half-written version.

One writer per table: the run holds the table's lease (``<db>/_ciea_leases/<table>.json``)
while it writes, as ``ciea embed`` does; when another run holds it, the job exits with code
4 and one line naming that run, having written nothing.

**Another checkpoint** (a new model): all documents are embedded with it and written as a
new version of the same table (one Lance ``Overwrite`` commit, so the table's ``model_id``
changes in that version only; older versions keep the old model and metadata). Then the
**publish gate** scores the candidate and the published version on the dev split (MRR@10
with each version's own model encoding the queries) and moves ``published`` only if
``candidate >= published - gate.tolerance``. Otherwise the candidate is tagged
``candidate-<model_id>`` for inspection, the published version is restored as the table's
head (so incremental runs with the old checkpoint go on), the reason is printed and the
exit code is 3. A rebuild killed midway leaves the published version untouched; the next
run starts it again (or, with the old checkpoint, discards the unfinished candidate).

Examples::

    ciea reindex --checkpoint runs/demo/ciea/checkpoint                # ./data → ./data/lancedb/documents
    ciea reindex --checkpoint ckpt --root s3://corpus --db s3://vectors --storage-option AWS_REGION=eu-west-1
    ciea reindex --checkpoint new-ckpt --set gate.tolerance=0.005       # new model: rebuild + gate
    ciea reindex --checkpoint ckpt --set changes.method=diff            # skip the feed, diff everything
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
from pipelines.index import reindex as reindex_run
from pipelines.index.reindex import ReindexConfig
from pipelines.store import storage
from pipelines.store.delta_tables import Tables

from .common import (
    STORAGE,
    RayCluster,
    RaySettings,
    job_logging,
    job_overrides,
    job_parser,
    parse_job_config,
    ray_owned,
    write_json,
)
from .embed import EXIT_TABLE_BUSY, add_index_flags

logger = logging.getLogger("ciea.reindex")

#: Exit code when the publish gate refuses a candidate (the published version stays).
EXIT_GATE_REFUSED = 3

PROG = "ciea reindex"
#: Flags of this job → config keys (the shared ones are in ``jobs/common.py``).
FLAGS = {"checkpoint": "model.checkpoint", "root": "input.root", "version": "input.version", "db": "output.db",
         "table": "output.table", "tag": "output.tag", "device": "encode.device", "run_dir": "output.run_dir"}


class ReindexJobConfig(ReindexConfig):
    """``ciea reindex``'s config: the run's (:class:`pipelines.index.reindex.ReindexConfig`) and
    where Ray runs when a step needs it."""

    ray: RaySettings = Field(default_factory=RaySettings)


def _parser() -> argparse.ArgumentParser:
    p = job_parser(PROG, __doc__, ReindexJobConfig, storage=STORAGE, ray=True, set_example="gate.tolerance=0.02")
    add_index_flags(p, "checkpoint to index with (model.checkpoint; default: the one the table records)",
                    "Delta version to bring the table to (input.version; default latest)")
    return p


def parse_config(argv: list[str] | None) -> tuple[ReindexJobConfig, argparse.Namespace]:
    """The command line → the validated config (nothing opened yet); exits with the errors."""
    args = _parser().parse_args(argv)
    overrides = job_overrides(args, FLAGS, storage=STORAGE)
    return parse_job_config(PROG, ReindexJobConfig, args, overrides, storage=STORAGE), args


def check(cfg: ReindexJobConfig, tables: Tables | None = None) -> dict[str, Any]:
    """Everything that can fail on the config, the checkpoint or the corpus, before Ray;
    fills in the checkpoint the table records when none is given. Returns its facts.

    Raises:
        SystemExit: with the fix.
    """
    from pipelines.index import embed as E
    from pipelines.query.search import DatabaseNotFoundError, check_database

    try:  # before anything connects: a missing --db is refused, never created
        check_database(cfg.db_uri)
    except DatabaseNotFoundError as e:
        raise SystemExit(f"{PROG}: {e}") from None
    try:
        E.resolve_source(tables or cfg.tables(), cfg.input.version)
    except E.EmbedError as e:
        raise SystemExit(f"{PROG}: {e}") from None
    if not cfg.model.checkpoint:
        cfg.model.checkpoint = reindex_run.recorded_checkpoint(cfg)
        if not cfg.model.checkpoint:
            raise SystemExit(f"{PROG}: pass --checkpoint DIR: the table {cfg.output.table!r} in {cfg.db_uri} "
                             "records no checkpoint (or does not exist)")
    if not storage.is_remote(cfg.model.checkpoint) and not Path(cfg.model.checkpoint).is_dir():
        raise SystemExit(f"{PROG}: checkpoint {cfg.model.checkpoint} is not a directory: pass the folder "
                         "written by ciea_model.save_checkpoint (it holds ciea_checkpoint.json)")
    try:
        return build.load_model_facts(cfg.model.checkpoint, cfg.storage_options)
    except build.SetupError as e:
        raise SystemExit(f"{PROG}: {e}") from None


def execute(cfg: ReindexJobConfig) -> int:
    """Runs the job on a parsed config: checks, :func:`pipelines.index.reindex.run` (which
    asks for Ray only when a step needs it), summary.json, the printed summary. Returns the
    exit code: 0, 1 (documents failed), 2 (bad input), :data:`EXIT_GATE_REFUSED`,
    :data:`jobs.embed.EXIT_TABLE_BUSY` (another run writes the table)."""
    from pipelines.index.embed import EmbedError
    from pipelines.query.search import SearchError
    from pipelines.store.lance_tables import ModelMismatchError
    from pipelines.store.lease import WriterConflict

    tables = cfg.tables()  # the Delta handle, made once for the checks and the run
    facts = check(cfg, tables)
    run_dir = Path(cfg.output.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "reindex_config.json", cfg.model_dump(mode="json"))
    cluster = RayCluster(cfg.ray, log_to_driver=cfg.progress, progress=cfg.progress)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with ray_owned():
        if cluster.remote:
            cluster.start()  # a cluster: join it now, its resources decide the route
        # Otherwise a local Ray is started only when a step needs it (a rebuild, a change set
        # too large to embed in-process): a scheduled run with a small change never pays for it.
        try:
            summary = reindex_run.run(cfg, facts, cluster, tables=tables)
        except (reindex_run.ReindexError, ModelMismatchError, EmbedError, SearchError) as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            return 2
        except WriterConflict as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            return EXIT_TABLE_BUSY
        except build.SetupError as e:
            raise SystemExit(f"{PROG}: {e}") from None
    write_json(run_dir / "summary.json", summary)
    print(format_summary(summary))
    if "gate" in summary and not summary["gate"]["promote"]:
        return EXIT_GATE_REFUSED
    return 1 if summary.get("failed") else 0


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"reindex {s['documents_uri']}@{s['to_version']} with model_id {s['model_id']} → {s['table']}"]
    if s.get("method") == "rebuild":
        lines.append(f"  new model: full rebuild, {s['embedded']} documents embedded into one new version "
                     f"({s['embed_seconds']} s)")
    else:
        how = "change data feed" if s.get("method") == "cdf" else f"full diff ({s.get('fallback_reason')})"
        lines.append(f"  changes since version {s.get('from_version')} ({how}): {s.get('upserts', 0)} inserted/updated, "
                     f"{s.get('deletes', 0)} deleted")
        lines.append(f"  embedded {s.get('embedded', 0)}, rows deleted {s.get('deleted', 0)}, already done "
                     f"{s.get('unchanged', 0) + s.get('already_gone', 0)}, failed {s.get('failed', 0)}"
                     + (f" ({s['embed_route']})" if s.get("embed_route") else ""))
    if "gate" in s:
        g = s["gate"]
        lines.append(f"  publish gate ({g['metric']}, tolerance {g['tolerance']:g}): "
                     f"{'PROMOTED' if g['promote'] else 'REFUSED'} — {g['reason']}")
    if s.get("noop"):
        lines.append(f"  nothing to do: published version {s['published_version']} is current")
    elif s.get("promoted"):
        lines.append(f"  {s['rows']} rows; published version {s['published_version']} as tag {s['tag']!r} and 'published'")
    else:
        lines.append(f"  published version stays {s['published_version']}; candidate kept as tag "
                     f"{s.get('candidate_tag')!r} (version {s.get('candidate_version')})")
    for name, st in sorted(s.get("index_stats", {}).items()):
        lines.append(f"  index {name}: {st['type']}, {st['indexed']} rows indexed, {st['unindexed']} not")
    for f in s.get("failures", [])[:10]:
        lines.append(f"  FAILED {f['doc_id']}: {f['error']}")
    lines.append(f"  {s['seconds']} s in all")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv)
    job_logging(args.verbose)
    return execute(cfg)


if __name__ == "__main__":  # `python -m jobs.reindex`, the RayCronJob / `ray job submit` entrypoint
    raise SystemExit(main())
