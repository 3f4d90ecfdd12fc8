"""``ciea ingest``: read a corpus source, validate and normalise every record on Ray Data,
and merge it into Delta Lake — documents, quarantine, queries and qrels.

Tables under ``output.root`` (a local path or ``s3://bucket/prefix``):
``corpus/documents`` (one row per doc_id, change data feed on), ``corpus/quarantine``
(every rejected record with source, record reference, stage, reason and an excerpt),
``queries/<split>`` and ``qrels/<split>``. Re-running the same ingest changes nothing; a
changed record becomes one update; a run killed at any point and re-run leaves the same
tables as one clean run. A first ingest (``corpus/documents`` still empty) appends its
documents in one commit instead of merging them: nothing to compare with, less work. The
summary accounts for every record read:
read = accepted + quarantined, accepted = inserted + updated + unchanged.

Sources (``--source``): ``synthetic`` (the generated demo corpus), ``webqa`` (the
UniVL-DR release folder: all_docs.json, all_imgs.json, imgs.tsv + imgs.lineidx.new,
train/dev/test.json), ``edis`` (candidates_full.json, train/dev/test.json, images/),
``manifest`` (JSONL / Parquet files with doc_id, text, caption, image), ``folder`` (images
with sidecar .txt captions), ``webdataset`` (tar shards: a folder, a glob or a brace range).
Manifest, folder and webdataset sources take queries and graded qrels in the BEIR layout
(``--queries DIR``: queries.jsonl + qrels/<split>.tsv).

Examples::

    ciea ingest                                              # synthetic corpus into ./data
    ciea ingest --preset tiny --root /tmp/data               # seconds
    ciea ingest --source webqa --path /data/WebQA --root s3://corpus/webqa \\
        --storage-option AWS_REGION=eu-west-1                # credentials from the environment
    ciea ingest --source manifest --path docs.jsonl --image-mode uri
    ciea ingest --source webdataset --path 's3://corpus/shards/{00000..00099}.tar' --queries beir/
    ciea ingest --config ingest.yaml --set limits.max_text_chars=50000
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from pydantic import Field

from pipelines.ingest import config as run_config
from pipelines.ingest.config import SOURCE_KINDS
from pipelines.ingest.runner import make_source, run
from pipelines.store import delta_tables

from .common import (
    STORAGE,
    RaySettings,
    command_args,
    job_logging,
    job_overrides,
    job_parser,
    parse_job_config,
    preset_defaults,
    ray_owned,
    start_ray,
    write_json,
)

logger = logging.getLogger("ciea.ingest")


class IngestJobConfig(run_config.IngestConfig):
    """``ciea ingest``'s config: the run's (:class:`pipelines.ingest.config.IngestConfig`) and
    where Ray runs."""

    ray: RaySettings = Field(default_factory=RaySettings)


#: The job config's earlier name (``bench/ingest.py`` builds it with a ``ray`` section).
IngestConfig = IngestJobConfig


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "tiny": {"source": {"kind": "synthetic", "rows_per_shard": 100,
                        "synthetic": {"num_image_docs": 200, "num_text_docs": 60,
                                      "num_queries": (60, 20, 20), "image_size": 32}}},
}

PROG = "ciea ingest"
#: Flags of this job → config keys (the shared ones are in ``jobs/common.py``).
FLAGS = {"source": "source.kind", "path": "source.path", "name": "source.name", "images_dir": "source.images_dir",
         "image_mode": "source.image_mode", "root": "output.root", "run_dir": "output.run_dir",
         "queries": "source.queries_path"}


def _parser() -> argparse.ArgumentParser:
    p = job_parser(PROG, __doc__, IngestJobConfig, presets=PRESETS, default_preset="default",
                   preset_help="defaults to start from (tiny: a 260-document synthetic corpus)", storage=STORAGE,
                   ray=True, progress="no progress bars (progress=false)", set_example="limits.max_text_chars=50000")
    p.add_argument("--source", choices=list(SOURCE_KINDS), help="source format (source.kind)")
    p.add_argument("--path", help="source folder or file, local or s3:// (source.path)")
    p.add_argument("--name", help="source label stored with every row (source.name)")
    p.add_argument("--images-dir", help="edis: folder of the candidate images (source.images_dir)")
    p.add_argument("--image-mode", choices=["inline", "uri"],
                   help="store image bytes (inline) or URIs (uri) (source.image_mode)")
    p.add_argument("--root", help="data root for the Delta tables, local or s3:// (output.root)")
    p.add_argument("--full-snapshot", action="store_true",
                   help="the source is complete: delete its documents it no longer has")
    p.add_argument("--no-queries", action="store_true", help="skip queries and qrels (source.queries=false)")
    p.add_argument("--queries", help="BEIR folder: queries.jsonl + qrels/<split>.tsv (source.queries_path)")
    p.add_argument("--allow-root", action="append", metavar="DIR",
                   help="another folder or s3:// prefix files may be read from (repeatable; source.allow_roots)")
    p.add_argument("--fetch-urls", action="store_true",
                   help="manifest: fetch http(s):// images with the URL fetcher (source.fetch_urls=true)")
    p.add_argument("--run-dir", help="local folder for summary.json and the resolved config (output.run_dir)")
    return p


def parse_config(argv: list[str] | None) -> tuple[IngestJobConfig, argparse.Namespace]:
    """The command line → the validated config (nothing opened yet); exits with the errors."""
    args = _parser().parse_args(argv)
    extra = (["source.full_snapshot=true"] if args.full_snapshot else []) + \
        (["source.queries=false"] if args.no_queries else []) + \
        (["source.fetch_urls=true"] if args.fetch_urls else []) + \
        ([f"source.allow_roots={json.dumps(args.allow_root)}"] if args.allow_root else [])
    overrides = job_overrides(args, FLAGS, storage=STORAGE, extra=extra)
    return parse_job_config(PROG, IngestJobConfig, args, overrides, storage=STORAGE, presets=PRESETS), args


def command(cfg: IngestJobConfig, always: tuple[str, ...] = ()) -> list[str]:
    """The arguments of ``ciea ingest`` that give ``cfg`` (what ``ciea demo`` prints): what
    differs from the default preset, and the keys in ``always``."""
    return command_args(cfg, preset_defaults(IngestJobConfig, PRESETS, "default"), FLAGS, always=always)


def format_summary(summary: dict[str, Any]) -> str:
    d = summary["documents"]
    lines = [
        f"ingest {summary['run_id']}: source {summary['source']} ({summary['kind']}) → {summary['root']}",
        f"  documents  read {d['read']}  = accepted {d['accepted']} + quarantined {d['quarantined']}",
        f"             accepted {d['accepted']} = inserted {d['inserted']} + updated {d['updated']} "
        f"+ unchanged {d['unchanged']}" + (f"   (deleted {d['deleted']})" if d["deleted"] else ""),
        f"             corpus/documents version "
        f"{'(new)' if d['version_before'] is None else d['version_before']} → {d['version_after']}"
        f"  ({'bulk load: appended' if d.get('write') == delta_tables.WRITE_APPEND else 'merged'})",
    ]
    for reason, n in d["quarantined_by_reason"].items():
        lines.append(f"    quarantined {reason}: {n}")
    if "fetch" in summary:
        f = summary["fetch"]
        lines.append(f"  fetch      fetched {f['fetched']}, failed {f['failed']}, skipped {f['skipped_stored']} "
                     f"stored + {f['skipped_failed']} failed before; {f['bytes']} bytes, {f['requests']} requests "
                     f"({f['requests_per_s']} req/s)")
    for split, q in summary["queries"].items():
        lines.append(f"  queries/{split}  read {q['read']} = accepted {q['accepted']} + quarantined "
                     f"{q['quarantined']}; inserted {q['inserted']}, updated {q['updated']}, "
                     f"unchanged {q['unchanged']}; qrels {q['qrels']['rows']} "
                     f"(inserted {q['qrels']['inserted']}, updated {q['qrels']['updated']})")
        for reason, n in q["quarantined_by_reason"].items():
            lines.append(f"    quarantined {reason}: {n}")
    lines.append(f"  corpus/quarantine  {summary['quarantine']['rows_this_run']} rows this run, "
                 f"{summary['quarantine']['inserted']} new   ({summary['seconds']} s)")
    return "\n".join(lines)


def execute(cfg: IngestJobConfig) -> int:
    """Runs the job on a parsed config (what ``main`` does after parsing, and what
    ``ciea demo`` calls): the source planned, Ray, :func:`pipelines.ingest.runner.run`, the
    summaries written and printed. Returns the exit code."""
    # Everything that can fail on the config or the source layout fails here, before Ray.
    try:
        source = make_source(cfg)
        shards = source.plan()
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{PROG}: {e}") from None
    run_dir = Path(cfg.output.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with ray_owned():
        start_ray(cfg.ray, progress=cfg.progress)
        summary = run(cfg, source, shards)
    out = run_dir / summary["run_id"]
    write_json(out / "ingest_config.json", cfg.model_dump())
    write_json(out / "summary.json", summary)
    write_json(run_dir / "latest.json", summary)
    print(format_summary(summary))
    print(f"summary: {out / 'summary.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv)
    job_logging(args.verbose)
    return execute(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
