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
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.store import storage as storage_mod
from pipelines.store.delta_tables import Tables

from .common import (
    config_keys,
    flag_overrides,
    init_ray,
    load_config,
    refuse_secrets,
    setup_logging,
    write_json,
)

logger = logging.getLogger("ciea.embed")


class InputSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    root: str = Field("data", description="data root holding corpus/documents (local path or s3://)")
    version: int | None = Field(None, ge=0, description="Delta version of corpus/documents to embed (default: latest)")
    storage_options: storage_mod.StorageOptions = Field(
        default_factory=dict,
        description="object-store settings for Delta, images and LanceDB (AWS_ENDPOINT_URL, AWS_REGION, "
                    "AWS_ALLOW_HTTP, ...); credentials only from the environment")


class ModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: str | None = Field(None, description="checkpoint directory written by ciea_model.save_checkpoint (required)")


class OutputSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    db: str | None = Field(None, description="LanceDB database folder (default: <root>/lancedb)")
    table: str = Field("documents", pattern=r"^[A-Za-z0-9_.-]+$", description="table name (one model_id per table)")
    tag: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$",
                            description="tag for the finished version (default: src<version>-<model_id>); "
                                        "`published` always moves to it too")
    run_dir: str = Field("runs/embed", description="local folder for summary.json and the resolved config")


class EncodeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when the cluster has GPUs")
    batch_size: int = Field(64, ge=1, description="documents per encoder call (GPU: 256-1024)")
    actors: int | None = Field(None, ge=1, description="encoder actors (default: one per GPU; CPU: one per "
                                                      "CPU, each single-threaded)")
    cpus_per_actor: float | None = Field(
        None, gt=0, description="CPUs reserved per CPU actor (Ray resource; default: one single-thread actor "
                                "per CPU, sharing all but one CPU between them, at most 1 each)")
    threads: int | None = Field(None, ge=1, description="torch threads per CPU actor (default: cpus_per_actor, at least 1)")
    bf16: bool = Field(True, description="GPU: autocast to bfloat16")
    max_retries: int = Field(2, ge=0, description="in-place retries of a failed batch (model stays loaded); "
                                                  "a dead actor is restarted by Ray regardless")


class PreprocessSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_rows: int = Field(256, ge=1, description="documents per preprocessing task call")
    thumbnail_px: int = Field(96, ge=0, le=1024, description="thumbnail long side in px (0: no thumbnails)")
    thumbnail_quality: int = Field(75, ge=1, le=95, description="thumbnail JPEG quality")
    read_blocks: int | None = Field(None, ge=1, description="Delta read blocks (default: Ray decides)")
    placement: Literal["auto", "tasks", "actor"] = Field(
        "auto", description="where images are decoded: tasks (CPU tasks beside the encoder actors), actor "
                            "(fused into the encoder actor), auto (tasks on GPU, actor on CPU: measured "
                            "cheaper when encoder and decoding share the same cores, BENCHMARKS.md)")


class WriteSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rows_per_fragment: int = Field(16384, ge=1, description="rows per Lance fragment written by a worker")
    commit_every_rows: int | None = Field(
        None, ge=1, description="commit every N rows (default: one commit per run; set it for long runs so "
                                "a crash loses at most N rows of work)")


class IndexSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ann: Literal["ivf_pq", "ivf_hnsw_sq", "none"] = Field("ivf_pq", description="ANN index type")
    min_rows_for_ann: int | None = Field(
        None, ge=256, description="below this many rows exact search is used, no ANN index (default: "
                                  "2 000 000 / dim, where exact search stops being as fast: 2 604 rows at 768-d)")
    enabled: bool = Field(True, description="build indexes after writing")


class RaySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    address: str | None = Field(None, description="Ray cluster address; default: start a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="local Ray: CPUs to use (default: all)")
    temp_dir: str = Field("/tmp/ciea-ray", description="local Ray: session files (keep the path short)")


class FaultSettings(BaseModel):
    """Fault injection for tests and failure drills; leave unset in production."""

    model_config = ConfigDict(extra="forbid")
    encoder_at_batch: int | None = Field(None, ge=1, description="drill: an encoder fails on its N-th batch, once")
    encoder_mode: Literal["raise", "exit"] = Field("raise", description="drill: raise an error or kill the actor process")
    marker: str | None = Field(None, description="drill: file that makes the encoder fault happen once (created on fire)")
    crash_after_commits: int | None = Field(None, ge=1, description="drill: the job dies right after its N-th commit")

    @model_validator(mode="after")
    def _check(self) -> FaultSettings:
        if self.encoder_at_batch is not None and not self.marker:
            raise ValueError("fault.encoder_at_batch needs fault.marker (a file path that makes it fire once)")
        return self


class EmbedConfig(BaseModel):
    """The whole embedding job, validated before Ray starts."""

    model_config = ConfigDict(extra="forbid")
    input: InputSettings = Field(default_factory=InputSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    encode: EncodeSettings = Field(default_factory=EncodeSettings)
    preprocess: PreprocessSettings = Field(default_factory=PreprocessSettings)
    write: WriteSettings = Field(default_factory=WriteSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    fault: FaultSettings = Field(default_factory=FaultSettings)
    progress: bool = Field(True, description="show a progress bar")

    @model_validator(mode="after")
    def _check(self) -> EmbedConfig:
        if not self.model.checkpoint:
            raise ValueError("model.checkpoint is required: pass --checkpoint DIR (a directory written by "
                             "ciea_model.save_checkpoint, e.g. runs/demo/<variant>/checkpoint)")
        return self

    @property
    def db_uri(self) -> str:
        return self.output.db or storage_mod.join(storage_mod.normalise_uri(self.input.root), "lancedb")


PRESETS: dict[str, dict[str, Any]] = {"default": {}}


class SimulatedCrash(RuntimeError):
    """Raised by the ``fault.crash_after_commits`` drill."""



def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ciea embed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (YAML file or --set KEY=VALUE), with defaults:\n" + "\n".join(config_keys(EmbedConfig)))
    p.add_argument("--config", help="YAML file with EmbedConfig fields")
    p.add_argument("--checkpoint", help="checkpoint directory to embed with (model.checkpoint)")
    p.add_argument("--root", help="data root holding corpus/documents, local or s3:// (input.root)")
    p.add_argument("--version", type=int, help="Delta version of corpus/documents (input.version; default latest)")
    p.add_argument("--db", help="LanceDB folder, local or s3:// (output.db; default <root>/lancedb)")
    p.add_argument("--table", help="LanceDB table name (output.table)")
    p.add_argument("--tag", help="tag for the finished version (output.tag)")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="object-store setting, repeatable (input.storage_options; never credentials)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="encoder device (encode.device)")
    p.add_argument("--batch-size", type=int, help="documents per encoder call (encode.batch_size)")
    p.add_argument("--actors", type=int, help="encoder actors (encode.actors)")
    p.add_argument("--run-dir", help="folder for summary.json and the resolved config (output.run_dir)")
    p.add_argument("--ray-address", help="connect to this Ray cluster instead of starting one (ray.address)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (ray.num_cpus)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (progress=false)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key below, e.g. --set encode.batch_size=128")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _overrides(args: argparse.Namespace) -> list[str]:
    out = flag_overrides(args, {
        "checkpoint": "model.checkpoint", "root": "input.root", "version": "input.version", "db": "output.db",
        "table": "output.table", "tag": "output.tag", "device": "encode.device", "batch_size": "encode.batch_size",
        "actors": "encode.actors", "run_dir": "output.run_dir", "ray_address": "ray.address",
        "num_cpus": "ray.num_cpus"}, "input.storage_options")
    if args.no_progress:
        out.append("progress=false")
    return out + list(args.set)


# ---------------------------------------------------------------------------------------
# Checks before Ray
# ---------------------------------------------------------------------------------------


def load_model_facts(checkpoint: str) -> dict[str, Any]:
    """Loads the checkpoint once on the driver: model_id (re-hashed, not trusted from the
    manifest), vector width, the image transform and whether images are read at all."""
    from ciea_model import load_checkpoint, model_id
    from ciea_model.checkpoint import read_manifest

    try:
        manifest = read_manifest(checkpoint)
        model, processor = load_checkpoint(checkpoint)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise SystemExit(f"ciea embed: cannot load checkpoint {checkpoint}: {e}") from None
    mid = model_id(model)
    if manifest.get("model_id") not in (None, mid):
        raise SystemExit(f"ciea embed: checkpoint {checkpoint} says model_id {manifest['model_id']} but its "
                         f"weights hash to {mid}: the directory was modified; re-save it with save_checkpoint")
    uses_images = model.config.uses_images
    transform = processor.image_transform
    facts = {"model_id": mid, "dim": model.dim, "variant": model.config.variant,
             "transform": transform if uses_images else None, "image_side": transform.size if uses_images else 1,
             "patch_grid": model.patch_grid}
    del model, processor
    return facts


def _init_ray(cfg: EmbedConfig) -> bool:
    return init_ray(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus, temp_dir=cfg.ray.temp_dir,
                    log_to_driver=cfg.progress)


def resolve_resources(cfg: EmbedConfig, cluster: dict[str, float]) -> dict[str, Any]:
    """Device, actor count and threads for this cluster, checked against the deadlock rule.

    On CPU, actors hold ``actors x cpus_per_actor`` CPUs for the whole run while the read,
    preprocessing and write *tasks* still need one: with no CPU left for them the
    pipeline waits forever without an error. So ``actors x cpus_per_actor + 1 <= CPUs``.

    Raises:
        SystemExit: the settings cannot run on this cluster, with the fix.
    """
    e = cfg.encode
    cpus, gpus = float(cluster.get("CPU", 0)), int(cluster.get("GPU", 0))
    device = e.device if e.device != "auto" else ("cuda" if gpus else "cpu")
    if device == "cuda":
        if gpus < 1:
            raise SystemExit("ciea embed: encode.device=cuda but the Ray cluster has no GPU: use --device cpu "
                             "or connect to a cluster with GPU workers (--ray-address)")
        actors = e.actors or gpus
        if actors > gpus:
            raise SystemExit(f"ciea embed: encode.actors={actors} but the cluster has {gpus} GPU(s); one actor "
                             f"per GPU: set encode.actors <= {gpus}")
        return {"device": "cuda", "actors": actors, "cpus_per_actor": min(1.0, max(cpus - 1, 0.5) / actors),
                "gpus_per_actor": 1.0, "threads": 1}
    if e.cpus_per_actor is None:
        # One single-thread actor per core: 1-thread matmuls waste nothing on intra-op
        # synchronisation, and each actor decodes its own images while the others
        # encode (measured: BENCHMARKS.md). Their Ray reservations leave 1 CPU for tasks.
        actors = e.actors or max(1, int(cpus))
        per = min(1.0, max(cpus - 1, 0.0) / actors) or 1.0
    else:
        per = e.cpus_per_actor
        actors = e.actors or max(1, int((cpus - 1) // per))
    if actors * per + 1 > cpus:
        fit = max(0.0, (cpus - 1) / actors)
        raise SystemExit(
            f"ciea embed: {actors} encoder actor(s) x {per:g} CPU + 1 CPU for the read/preprocess/write tasks "
            f"> the cluster's {cpus:g} CPUs — Ray Data would wait forever. Set encode.cpus_per_actor <= "
            f"{fit:.2f} or encode.actors <= {max(1, int((cpus - 1) // per))}")
    threads = e.threads or max(1, round(per))
    return {"device": "cpu", "actors": actors, "cpus_per_actor": per, "gpus_per_actor": 0.0, "threads": threads}


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


def run(cfg: EmbedConfig, facts: dict[str, Any]) -> dict[str, Any]:
    """One embedding run (Ray initialised); returns the summary."""
    import ray
    import ray.data
    from tqdm import tqdm

    from pipelines.index import embed as E
    from pipelines.store import lance_tables as L

    t0 = time.perf_counter()
    opts = cfg.input.storage_options
    documents_uri = Tables(cfg.input.root, opts).documents
    version = E.resolve_source(documents_uri, cfg.input.version, opts)
    mid, dim = facts["model_id"], facts["dim"]
    # Recorded in the table metadata so that search can load the same model for queries.
    checkpoint_uri = str(Path(cfg.model.checkpoint).resolve())
    table = L.VectorTable(cfg.db_uri, cfg.output.table, opts)
    table.check_model(mid, dim)
    table.create_if_missing(mid, dim, patch_grid=facts.get("patch_grid"))
    res = resolve_resources(cfg, ray.cluster_resources())

    src = E.source_keys(documents_uri, version, opts)
    plan = E.plan_work(src, table.keys())
    summary: dict[str, Any] = {
        "model_id": mid, "variant": facts["variant"], "dim": dim, "documents_uri": documents_uri,
        "source_version": version, "table": f"{cfg.db_uri}/{cfg.output.table}", "resources": res,
        "documents": plan.documents, "to_embed": len(plan.to_embed), "skipped": plan.skipped,
    }
    logger.info("corpus/documents@%d: %d documents, %d already embedded, %d to embed, %d stale rows to replace",
                version, plan.documents, plan.skipped, len(plan.to_embed), len(plan.stale))
    version_before = table.version()
    summary["deleted_stale"] = table.delete_doc_ids(plan.stale) if plan.stale else 0

    stream = E.StreamResult()
    if len(plan.to_embed):
        ctx = ray.data.DataContext.get_current()
        saved = (ctx.enable_progress_bars, ctx.retried_map_errors, ctx.max_map_retries)
        ctx.enable_progress_bars = False  # the tqdm bar below counts committed-to-be rows
        # A failed batch is retried in place, in the same actor (the model stays loaded);
        # Ray Data skips blocks an attempt already emitted, so a retry duplicates nothing.
        ctx.retried_map_errors, ctx.max_map_retries = bool(cfg.encode.max_retries), cfg.encode.max_retries
        fault = None
        if cfg.fault.encoder_at_batch is not None:
            fault = E.FaultSpec(cfg.fault.encoder_at_batch, cfg.fault.marker, cfg.fault.encoder_mode)
        lds = table.dataset()
        spec = E.PipelineSpec(
            documents_uri=documents_uri, source_version=version, storage_options=opts,
            checkpoint=str(Path(cfg.model.checkpoint).resolve()), model_id=mid, dim=dim,
            transform=facts["transform"], image_side=facts["image_side"], lance_uri=table.uri,
            lance_schema=lds.schema, data_storage_version=lds.data_storage_version,
            device=res["device"], actors=res["actors"], cpus_per_actor=res["cpus_per_actor"],
            gpus_per_actor=res["gpus_per_actor"], threads=res["threads"], bf16=cfg.encode.bf16,
            batch_size=cfg.encode.batch_size, preprocess_rows=cfg.preprocess.batch_rows,
            rows_per_fragment=cfg.write.rows_per_fragment, thumbnail_px=cfg.preprocess.thumbnail_px,
            thumbnail_quality=cfg.preprocess.thumbnail_quality, read_blocks=cfg.preprocess.read_blocks,
            preprocess_in_tasks=(cfg.preprocess.placement == "tasks"
                                 or (cfg.preprocess.placement == "auto" and res["device"] == "cuda")),
            embedded_at=datetime.now(timezone.utc), fault=fault)
        ds = E.build_dataset(spec, None if plan.all_documents else plan.to_embed)
        bar = tqdm(total=len(plan.to_embed), unit="doc", desc=f"embed → {cfg.output.table}",
                   disable=not cfg.progress, file=sys.stderr)

        def after_commit(n: int) -> None:
            table.update_metadata({L.META_SOURCE_VERSION: str(version), L.META_CHECKPOINT: checkpoint_uri})
            if cfg.fault.crash_after_commits is not None and n >= cfg.fault.crash_after_commits:
                raise SimulatedCrash(f"fault.crash_after_commits={n}: the job dies here (drill)")

        try:
            stream = E.stream_to_table(ds, table.commit_fragments, cfg.write.commit_every_rows,
                                       on_rows=bar.update, after_commit=after_commit)
        finally:
            bar.close()
            ctx.enable_progress_bars, ctx.retried_map_errors, ctx.max_map_retries = saved
    summary.update(rows_written=stream.rows, fragments=stream.fragments, commits=stream.commits,
                   failed=len(stream.failed), failures=stream.failed[:100], embed_seconds=stream.seconds)
    summary["docs_per_s"] = round(stream.rows / stream.seconds, 1) if stream.seconds else 0.0

    # Every source document must now have exactly one row (except those that failed).
    keys = table.keys()
    rows, distinct = keys.num_rows, len(set(keys.column(0).to_pylist()))
    expected = plan.documents - len(stream.failed)
    if rows != distinct or rows != expected:
        raise RuntimeError(f"table {cfg.output.table} has {rows} rows / {distinct} doc_ids, expected {expected}: "
                           "not publishing this version; re-run `ciea embed` to repair it")
    summary["rows"] = rows

    changed = table.version() != version_before or stream.commits > 0
    previous = L.plan_from_json(table.metadata().get(L.META_INDEX_PLAN))
    ann = None if cfg.index.ann == "none" else L.plan_ann_index(rows, dim, cfg.index.ann, cfg.index.min_rows_for_ann)
    summary["indexes"] = {}
    if cfg.index.enabled and (changed or table.published_version() != table.version()
                              or (rows and not table.index_names())):
        t_idx = time.perf_counter()
        summary["indexes"] = table.build_indexes(ann, previous)
        meta = {L.META_SOURCE_VERSION: str(version), L.META_INDEX_PLAN: ann.to_json() if ann else None,
                L.META_CHECKPOINT: checkpoint_uri}
        table.update_metadata(meta)
        summary["index_seconds"] = round(time.perf_counter() - t_idx, 2)
    summary["index_stats"] = table.index_stats()
    summary["ann_plan"] = ann.to_json() if ann else None
    if changed or table.published_version() != table.version():
        tag = cfg.output.tag or f"src{version}-{mid}"
        summary["published_version"] = table.publish(tag)
        summary["tag"] = tag
        summary["noop"] = False
    else:
        summary["published_version"] = table.published_version()
        summary["noop"] = True
    summary["table_version"] = table.version()
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


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
    args = _parser().parse_args(argv)
    overrides = _overrides(args)
    refuse_secrets("ciea embed", args.config, overrides, "input.storage_options")
    cfg: EmbedConfig = load_config(EmbedConfig, args.config, overrides, PRESETS["default"])  # type: ignore[assignment]
    setup_logging(args.verbose)
    for noisy in ("ray", "ray.data"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Everything that can fail on the config, the checkpoint or the corpus fails here, before Ray.
    if not Path(cfg.model.checkpoint).is_dir():
        raise SystemExit(f"ciea embed: checkpoint {cfg.model.checkpoint} is not a directory: pass the folder "
                         "written by ciea_model.save_checkpoint (it holds ciea_checkpoint.json)")
    facts = load_model_facts(cfg.model.checkpoint)
    from pipelines.index import embed as E

    try:
        E.resolve_source(Tables(cfg.input.root, cfg.input.storage_options).documents, cfg.input.version,
                         cfg.input.storage_options)
    except E.EmbedError as e:
        raise SystemExit(f"ciea embed: {e}") from None
    run_dir = Path(cfg.output.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "embed_config.json", cfg.model_dump(mode="json"))
    started = _init_ray(cfg)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from pipelines.store.lance_tables import ModelMismatchError

        try:
            summary = run(cfg, facts)
        except (ModelMismatchError, E.EmbedError) as e:
            print(f"ciea embed: {e}", file=sys.stderr)
            return 2
    finally:
        if started:
            import ray

            ray.shutdown()
    write_json(run_dir / "summary.json", summary)
    print(format_summary(summary))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":  # `python -m jobs.embed`, the `ray job submit` entrypoint
    raise SystemExit(main())
