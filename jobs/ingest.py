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
import logging
import os
import signal
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.ingest.runner import DocumentStream, QuarantineSpill, build_dataset, ingest_queries
from pipelines.ingest.sources import (
    EDISSource,
    FolderSource,
    ManifestSource,
    Source,
    SyntheticSource,
    UrlSource,
    WebDatasetSource,
    WebQASource,
)
from pipelines.ingest.sources.beir import BeirQueries
from pipelines.ingest.sources.synthetic.generator import SyntheticConfig
from pipelines.ingest.validation import Limits
from pipelines.store import delta_tables
from pipelines.store import storage as storage_mod

from .common import (
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

SourceKind = Literal["synthetic", "webqa", "edis", "manifest", "folder", "webdataset", "urls"]
#: Crash-test hook, a real SIGKILL of this process at a chosen point:
#: ``documents_after_rows=N`` once N records have streamed into the documents MERGE (mid-run,
#: nothing committed), ``after_documents`` right after the documents commit.
FAILPOINT_ENV = "CIEA_INGEST_FAILPOINT"


def _failpoint(name: str, rows: int | None = None) -> None:
    point = os.environ.get(FAILPOINT_ENV, "")
    if point == name or (rows is not None and point.startswith(f"{name}=") and rows >= int(point.split("=")[1])):
        logger.warning("failpoint %s: killing this process", point)
        os.kill(os.getpid(), signal.SIGKILL)


class SyntheticSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = Field(0, ge=0, description="corpus seed")
    num_image_docs: int = Field(2000, ge=1, description="image documents")
    num_text_docs: int = Field(1000, ge=0, description="text documents")
    num_queries: tuple[int, int, int] = Field((2000, 200, 400), description="train, dev, test queries")
    image_size: int = Field(64, ge=16, le=1024, description="rendered image side (px)")
    num_collections: int | None = Field(None, ge=1, le=40, description="collections in use (default: all 40)")
    p_caption_states: float = Field(0.35, ge=0, lt=1, description="chance a caption states each optional attribute")
    complementary_fraction: float = Field(0.5, ge=0, le=1, description="share of 'image' queries (need the image)")
    text_query_fraction: float = Field(0.3, ge=0, le=1, description="share of 'text' queries (text-document answers)")


class FetchOptions(BaseModel):
    """urls: how images are fetched (``pipelines.ingest.fetch``), per Ray Data read task."""

    model_config = ConfigDict(extra="forbid")
    concurrency: int = Field(16, ge=1, le=512, description="requests in flight per read task")
    per_host: int = Field(4, ge=1, description="requests in flight per host, per read task")
    connect_timeout_s: float = Field(5.0, gt=0, description="connect timeout (s)")
    read_timeout_s: float = Field(10.0, gt=0, description="timeout between two reads of a response (s)")
    total_timeout_s: float = Field(30.0, gt=0, description="deadline of one attempt, body included (s)")
    retries: int = Field(3, ge=0, le=20, description="more attempts on 429, 408, 5xx, timeouts, broken bodies")
    backoff_s: float = Field(0.5, ge=0, description="first backoff (s); doubles, full jitter")
    max_backoff_s: float = Field(8.0, ge=0, description="longest backoff (s)")
    max_retry_after_s: float = Field(30.0, ge=0, description="longest Retry-After honoured; a longer one gives up")
    max_redirects: int = Field(5, ge=0, description="redirects followed")
    max_mb: float = Field(16.0, gt=0, description="largest body (MiB), enforced while streaming")
    shard_kb: int = Field(256, ge=1, description="JSON-lines URL lists: bytes per read task (KiB)")
    refetch_failed: bool = Field(False, description="fetch again the URLs whose fetch failed in an earlier run")

    def settings(self):
        from pipelines.ingest.fetch import FetchSettings

        return FetchSettings(**self.model_dump(exclude={"max_mb", "shard_kb", "refetch_failed"}),
                             max_bytes=int(self.max_mb * (1 << 20)))


class SourceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: SourceKind = Field("synthetic", description="source format: synthetic, webqa, edis, manifest, folder, "
                                                      "webdataset, urls")
    path: str | None = Field(None, description="source folder/file (local path or s3:// URI); not for synthetic")
    name: str | None = Field(None, description="label stored with every row (default: the kind)")
    images_dir: str | None = Field(None, description="edis: folder of candidate images (default <path>/images)")
    image_mode: Literal["inline", "uri"] = Field(
        "inline", description="store image bytes in Delta (inline) or their URI (uri: manifest, folder, edis)")
    shard_mb: float = Field(8.0, gt=0, description="line files: bytes per read shard, in MiB")
    rows_per_shard: int | None = Field(
        None, ge=1, description="synthetic: documents per read shard (default: the corpus in ~8 shards of "
                                "500..10000; Ray Data idles a worker ~0.2 s between tasks, so small shards cost)")
    files_per_shard: int = Field(500, ge=1, description="folder: images per read shard")
    shards_per_task: int = Field(1, ge=1, description="webdataset: tar shards per Ray Data read task")
    max_member_mb: float = Field(64.0, gt=0, description="webdataset: largest tar member (MiB); a larger one "
                                 "quarantines its sample unread")
    queries: bool = Field(True, description="also ingest queries and qrels when the source has them")
    queries_path: str | None = Field(
        None, description="BEIR queries folder (queries.jsonl + qrels/<split>.tsv, graded scores kept) for "
                          "manifest, folder, webdataset and urls sources; local or s3://")
    full_snapshot: bool = Field(
        False, description="the source is complete: delete this source's documents that it no longer has "
                           "(a record that is now quarantined counts as gone)")
    synthetic: SyntheticSettings = Field(default_factory=SyntheticSettings)
    fetch: FetchOptions = Field(default_factory=FetchOptions)

    @model_validator(mode="after")
    def _check(self) -> SourceSettings:
        if self.kind != "synthetic" and not self.path:
            raise ValueError(f"source.kind={self.kind!r} needs source.path (--path): the folder or file to read")
        if self.kind == "synthetic" and self.path:
            raise ValueError("source.path is not used by the synthetic source; drop --path or pick --source")
        if self.queries_path and self.kind in ("synthetic", "webqa", "edis"):
            raise ValueError(f"source.queries_path (--queries) is for manifest, folder, webdataset and urls "
                             f"sources; {self.kind} reads its own queries — drop --queries")
        if self.image_mode == "uri" and self.kind in ("synthetic", "webqa", "webdataset", "urls"):
            raise ValueError(f"source.image_mode=uri needs images addressable by URI; {self.kind} images "
                             "are generated or packed in imgs.tsv or tar shards — use inline")
        return self


class OutputSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    root: str = Field("data", description="data root: local path or s3://bucket/prefix; tables go under it")
    storage_options: storage_mod.StorageOptions = Field(
        default_factory=dict,
        description="object-store settings (AWS_ENDPOINT_URL, AWS_REGION, AWS_ALLOW_HTTP, ...); "
                    "credentials only from the environment")
    run_dir: str = Field("runs/ingest", description="local folder for the run summary and resolved config")
    target_file_mb: int = Field(16, ge=1, description="Delta data file size for new tables (MiB); "
                                "bounds the driver's memory during a merge")


class LimitsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_doc_id_chars: int = Field(512, ge=1, description="longest doc_id")
    max_text_chars: int = Field(100_000, ge=1, description="longest document text (characters)")
    max_caption_chars: int = Field(10_000, ge=1, description="longest caption (characters)")
    max_query_chars: int = Field(2_000, ge=1, description="longest query (characters)")
    max_image_bytes: int = Field(32 * 1024 * 1024, ge=1, description="largest encoded image (bytes)")
    max_image_pixels: int = Field(40_000_000, ge=1,
                                  description="largest width x height, checked on the header (bomb guard)")
    excerpt_chars: int = Field(200, ge=16, description="length of the excerpt kept in quarantine")

    def limits(self) -> Limits:
        return Limits(**self.model_dump(exclude={"max_query_chars"}))


class IngestConfig(BaseModel):
    """The whole ingest, validated before Ray starts."""

    model_config = ConfigDict(extra="forbid")
    source: SourceSettings = Field(default_factory=SourceSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    progress: bool = Field(True, description="show progress bars")


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "tiny": {"source": {"kind": "synthetic", "rows_per_shard": 100,
                        "synthetic": {"num_image_docs": 200, "num_text_docs": 60,
                                      "num_queries": (60, 20, 20), "image_size": 32}}},
}

PROG = "ciea ingest"
STORAGE = "output.storage_options"
#: Flags of this job → config keys (the shared ones are in ``jobs/common.py``).
FLAGS = {"source": "source.kind", "path": "source.path", "name": "source.name", "images_dir": "source.images_dir",
         "image_mode": "source.image_mode", "root": "output.root", "run_dir": "output.run_dir",
         "queries": "source.queries_path"}


def _parser() -> argparse.ArgumentParser:
    p = job_parser(PROG, __doc__, IngestConfig, presets=PRESETS, default_preset="default",
                   preset_help="defaults to start from (tiny: a 260-document synthetic corpus)", storage=STORAGE,
                   ray=True, progress="no progress bars (progress=false)", set_example="limits.max_text_chars=50000")
    p.add_argument("--source", choices=["synthetic", "webqa", "edis", "manifest", "folder", "webdataset", "urls"],
                   help="source format (source.kind)")
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
    p.add_argument("--run-dir", help="local folder for summary.json and the resolved config (output.run_dir)")
    return p


def parse_config(argv: list[str] | None) -> tuple[IngestConfig, argparse.Namespace]:
    """The command line → the validated config (nothing opened yet); exits with the errors."""
    args = _parser().parse_args(argv)
    extra = (["source.full_snapshot=true"] if args.full_snapshot else []) + \
        (["source.queries=false"] if args.no_queries else [])
    overrides = job_overrides(args, FLAGS, storage=STORAGE, extra=extra)
    return parse_job_config(PROG, IngestConfig, args, overrides, storage=STORAGE, presets=PRESETS), args


def command(cfg: IngestConfig, always: tuple[str, ...] = ()) -> list[str]:
    """The arguments of ``ciea ingest`` that give ``cfg`` (what ``ciea demo`` prints): what
    differs from the default preset, and the keys in ``always``."""
    return command_args(cfg, preset_defaults(IngestConfig, PRESETS, "default"), FLAGS, always=always)


def make_source(cfg: IngestConfig) -> Source:
    source = _make_source(cfg)
    if cfg.source.queries_path and cfg.source.queries:
        queries = BeirQueries(cfg.source.queries_path, cfg.output.storage_options)
        queries.check()
        source.attach_queries(queries)
    return source


def _make_source(cfg: IngestConfig) -> Source:
    s, opts = cfg.source, cfg.output.storage_options
    shard_bytes = int(s.shard_mb * (1 << 20))
    if s.kind == "synthetic":
        syn = s.synthetic
        return SyntheticSource(
            SyntheticConfig(seed=syn.seed, num_image_docs=syn.num_image_docs, num_text_docs=syn.num_text_docs,
                            num_queries=tuple(syn.num_queries), image_size=syn.image_size,
                            p_caption_states=syn.p_caption_states, complementary_fraction=syn.complementary_fraction,
                            text_query_fraction=syn.text_query_fraction,
                            **({"num_collections": syn.num_collections} if syn.num_collections else {})),
            rows_per_shard=s.rows_per_shard, name=s.name, with_queries=s.queries)
    if s.kind == "webqa":
        return WebQASource(s.path, shard_bytes, s.name, opts, with_queries=s.queries)
    if s.kind == "edis":
        return EDISSource(s.path, s.images_dir, shard_bytes, s.name, opts, s.image_mode, with_queries=s.queries)
    if s.kind == "manifest":
        return ManifestSource(s.path, shard_bytes, s.name, opts, s.image_mode)
    if s.kind == "urls":
        return UrlSource(s.path, s.fetch.settings(), cfg.output.root, s.fetch.shard_kb * 1024, s.name, opts,
                         s.fetch.refetch_failed)
    if s.kind == "webdataset":
        return WebDatasetSource(s.path, s.shards_per_task, s.name, opts, int(s.max_member_mb * (1 << 20)))
    return FolderSource(s.path, s.files_per_shard, s.name, opts, s.image_mode)


def run(cfg: IngestConfig, source: Source, shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs one ingest (Ray must be initialised); returns the summary."""
    import ray.data
    from tqdm import tqdm

    t0 = time.perf_counter()
    now = datetime.now(timezone.utc)
    run_id = f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    tables = delta_tables.Tables(cfg.output.root, cfg.output.storage_options,
                                cfg.output.target_file_mb * 1024 * 1024)
    limits = cfg.limits.limits()
    spill = QuarantineSpill(run_id, now)
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    # Source order makes the duplicate rule deterministic; tqdm below is the progress bar.
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    try:
        summary: dict[str, Any] = {"run_id": run_id, "source": source.name, "kind": source.kind,
                                   "root": tables.root, "shards": len(shards)}
        bar = tqdm(total=source.estimated_records(), unit="rec", desc=f"ingest {source.name}",
                   disable=not cfg.progress, file=sys.stderr)
        def progress(n: int) -> None:
            bar.update(n)
            _failpoint("documents_after_rows", bar.n)

        stream = DocumentStream(_iter_validated(source, shards, limits), spill,
                                run_id, now, progress=progress)
        version_before = tables.version(tables.documents)
        # An empty corpus/documents is bulk-loaded (appended), anything else merged into.
        metrics = delta_tables.write_documents(
            tables, stream.reader(), source.name if cfg.source.full_snapshot else None)
        bar.close()
        counts = stream.counts
        counts.check("documents")
        docs = counts.to_dict()
        docs.update(inserted=metrics["num_target_rows_inserted"], updated=metrics["num_target_rows_updated"],
                    deleted=metrics["num_target_rows_deleted"], write=metrics["write"])
        docs["unchanged"] = counts.accepted - docs["inserted"] - docs["updated"]
        docs["version_before"], docs["version_after"] = version_before, tables.version(tables.documents)
        summary["documents"] = docs
        fetch = source.fetch_report(time.perf_counter() - t0)
        if fetch is not None:
            summary["fetch"] = fetch
        _failpoint("after_documents")

        summary["queries"] = {}
        for split in source.query_splits():
            summary["queries"][split] = ingest_queries(
                source, split, tables, limits, cfg.limits.max_query_chars, spill, run_id, now, stream.seen)

        reader = spill.reader()
        if reader is not None:
            qm = delta_tables.merge_quarantine(tables, reader)
            summary["quarantine"] = {"rows_this_run": spill.rows, "inserted": qm["num_target_rows_inserted"]}
        else:
            tables.ensure(tables.quarantine, delta_tables.S.QUARANTINE_SCHEMA)
            summary["quarantine"] = {"rows_this_run": 0, "inserted": 0}
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        return summary
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
        spill.close()


def _iter_validated(source: Source, shards: list[dict[str, Any]], limits: Limits):
    if not shards:
        return
    ds = build_dataset(source, shards, limits)
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield source.observe(table)


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


def execute(cfg: IngestConfig) -> int:
    """Runs the job on a parsed config (what ``main`` does after parsing, and what
    ``ciea demo`` calls): the source planned, Ray, :func:`run`, the summaries written and
    printed. Returns the exit code."""
    # Everything that can fail on the config or the source layout fails here, before Ray.
    try:
        source = make_source(cfg)
        shards = source.plan()
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{PROG}: {e}") from None
    run_dir = Path(cfg.output.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with ray_owned():
        start_ray(cfg.ray)
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
