"""``ciea embed``'s run: a Delta version of ``corpus/documents`` embedded with a checkpoint
into a LanceDB table, indexed and published — and the pieces ``ciea reindex`` shares with it
(the checkpoint's facts, the encoder's resources, the pipeline spec, Ray Data's settings).

Ray Data reads the Delta version, CPU tasks decode and transform the images, an actor pool
encodes (the checkpoint loaded once per actor), and workers write Lance fragments that the
driver commits (:mod:`pipelines.index.embed`). Then: a BTree index on doc_id, full-text
indexes, an ANN index when the table is large enough for one to beat exact search, and the
version is tagged ``<tag>`` and ``published``. Re-running is safe at any point: only
documents whose ``(doc_id, content_sha256)`` is not in the table yet are embedded, rows of
changed or deleted documents are replaced, and a run with nothing to do commits nothing.

The run never starts Ray: the caller has (the job, a test, a benchmark), or hands in a
:class:`RayAccess` that does when asked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any, Protocol

from pipelines.store.delta_tables import Tables

from .config import EmbedConfig, ReindexConfig

logger = logging.getLogger(__name__)


class SetupError(ValueError):
    """Settings or a checkpoint that cannot work here, found before any row is written; the
    message names the fix (jobs turn it into their exit message)."""


class SimulatedCrash(RuntimeError):
    """Raised by the crash drills: ``fault.crash_after_commits`` (embed), ``fault.crash_at``
    (reindex)."""


class RayAccess(Protocol):
    """How a run reaches Ray without owning it (``jobs.common.RayCluster`` is the job's)."""

    def resources(self) -> dict[str, float]:
        """Ray's resources when it is up; otherwise what starting it here would give."""

    def start(self) -> dict[str, float]:
        """Joins or starts Ray if this process has none; returns the cluster's resources."""


class CurrentRay:
    """The Ray this process already runs (``ray.init`` done by the caller)."""

    def resources(self) -> dict[str, float]:
        import ray

        if not ray.is_initialized():
            raise SetupError("Ray is not running in this process: call ray.init() first, or run the job "
                             "(`ciea embed` / `ciea reindex`), which starts it")
        return ray.cluster_resources()

    def start(self) -> dict[str, float]:
        return self.resources()


# ---------------------------------------------------------------------------------------
# Checks before Ray
# ---------------------------------------------------------------------------------------


def _checkpoint_uri(checkpoint: str) -> str:
    """The checkpoint as the table records it: an absolute local path, or the s3:// URI as is."""
    from pipelines.store.storage import normalise_uri

    return normalise_uri(checkpoint)


def load_model_facts(checkpoint: str, storage_options: dict[str, str] | None = None) -> dict[str, Any]:
    """Loads the checkpoint once on the driver: model_id (re-hashed, not trusted from the
    manifest), vector width, the image transform and whether images are read at all.

    Raises:
        SetupError: the checkpoint cannot be loaded, or its weights do not match its manifest.
    """
    from ciea_model import load_checkpoint, model_id
    from ciea_model.checkpoint import read_manifest
    from pipelines.store.storage import local_folder

    try:
        with local_folder(checkpoint, storage_options) as local:  # local, or s3:// (copied here)
            manifest = read_manifest(local)
            model, processor = load_checkpoint(local)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise SetupError(f"cannot load checkpoint {checkpoint}: {e}") from None
    mid = model_id(model)
    if manifest.get("model_id") not in (None, mid):
        raise SetupError(f"checkpoint {checkpoint} says model_id {manifest['model_id']} but its "
                         f"weights hash to {mid}: the directory was modified; re-save it with save_checkpoint")
    uses_images = model.config.uses_images
    transform = processor.image_transform
    facts = {"model_id": mid, "dim": model.dim, "variant": model.config.variant,
             "transform": transform if uses_images else None, "image_side": transform.size if uses_images else 1,
             "patch_grid": model.patch_grid}
    del model, processor
    return facts


def resolve_resources(cfg: EmbedConfig | ReindexConfig, cluster: dict[str, float]) -> dict[str, Any]:
    """Device, actor count and threads for this cluster, checked against the deadlock rule.

    On CPU, actors hold ``actors x cpus_per_actor`` CPUs for the whole run while the read,
    preprocessing and write *tasks* still need one: with no CPU left for them the
    pipeline waits forever without an error. So ``actors x cpus_per_actor + 1 <= CPUs``.

    Raises:
        SetupError: the settings cannot run on this cluster, with the fix.
    """
    e = cfg.encode
    cpus, gpus = float(cluster.get("CPU", 0)), int(cluster.get("GPU", 0))
    device = e.device if e.device != "auto" else ("cuda" if gpus else "cpu")
    if device == "cuda":
        if gpus < 1:
            raise SetupError("encode.device=cuda but the Ray cluster has no GPU: use --device cpu "
                             "or connect to a cluster with GPU workers (--ray-address)")
        actors = e.actors or gpus
        if actors > gpus:
            raise SetupError(f"encode.actors={actors} but the cluster has {gpus} GPU(s); one actor "
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
        raise SetupError(
            f"{actors} encoder actor(s) x {per:g} CPU + 1 CPU for the read/preprocess/write tasks "
            f"> the cluster's {cpus:g} CPUs — Ray Data would wait forever. Set encode.cpus_per_actor <= "
            f"{fit:.2f} or encode.actors <= {max(1, int((cpus - 1) // per))}")
    threads = e.threads or max(1, round(per))
    return {"device": "cpu", "actors": actors, "cpus_per_actor": per, "gpus_per_actor": 0.0, "threads": threads}


# ---------------------------------------------------------------------------------------
# Shared by embed and reindex: the pipeline spec, Ray Data's settings, the progress bar
# ---------------------------------------------------------------------------------------


def pipeline_spec(cfg: EmbedConfig | ReindexConfig, facts: dict[str, Any], res: dict[str, Any], *,
                  tables: Tables, version: int, lance_uri: str, lance_schema: Any,
                  data_storage_version: str | None, fault: Any = None) -> Any:
    """The :class:`pipelines.index.embed.PipelineSpec` of a run's settings, checkpoint facts
    and resolved resources, reading ``corpus/documents`` through ``tables``."""
    from pipelines.index import embed as E

    placement = cfg.preprocess.placement
    return E.PipelineSpec(
        tables=tables, source_version=version,
        checkpoint=_checkpoint_uri(cfg.model.checkpoint), model_id=facts["model_id"], dim=facts["dim"],
        transform=facts["transform"], image_side=facts["image_side"], lance_uri=lance_uri,
        lance_schema=lance_schema, data_storage_version=data_storage_version,
        device=res["device"], actors=res["actors"], cpus_per_actor=res["cpus_per_actor"],
        gpus_per_actor=res["gpus_per_actor"], threads=res["threads"], bf16=cfg.encode.bf16,
        batch_size=cfg.encode.batch_size, preprocess_rows=cfg.preprocess.batch_rows,
        rows_per_fragment=cfg.write.rows_per_fragment, thumbnail_px=cfg.preprocess.thumbnail_px,
        thumbnail_quality=cfg.preprocess.thumbnail_quality, read_blocks=cfg.preprocess.read_blocks,
        preprocess_in_tasks=placement == "tasks" or (placement == "auto" and res["device"] == "cuda"),
        embedded_at=datetime.now(timezone.utc), fault=fault)


@contextlib.contextmanager
def ray_data_settings(max_retries: int) -> Iterator[None]:
    """Ray Data's own progress bars off (the run draws one that counts committed rows), and
    a failed batch retried in place, in the same actor (the model stays loaded; Ray Data
    skips blocks an attempt already emitted, so a retry duplicates nothing). Restored after."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.retried_map_errors, ctx.max_map_retries)
    ctx.enable_progress_bars = False
    ctx.retried_map_errors, ctx.max_map_retries = bool(max_retries), max_retries
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.retried_map_errors, ctx.max_map_retries = saved


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A tqdm bar on stderr counting documents; yields its ``update``."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit="doc", desc=desc, disable=not enabled, file=sys.stderr)
    try:
        yield bar.update
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------
# The embed run
# ---------------------------------------------------------------------------------------


def run(cfg: EmbedConfig, facts: dict[str, Any], ray: RayAccess | None = None,
        tables: Tables | None = None) -> dict[str, Any]:
    """One embedding run; returns the summary.

    The run holds the table's lease (:mod:`pipelines.store.lease`) from before it plans
    to the end, and fences its commits: a second run on the same table stops before it
    writes anything.

    Args:
        cfg: the validated settings.
        facts: :func:`load_model_facts` of ``cfg.model.checkpoint``.
        ray: how to reach Ray (default: the Ray this process already runs).
        tables: the Delta handle of ``cfg.input`` (default: made here from it).

    Raises:
        SetupError: the encoder's settings do not fit the cluster.
        EmbedError / ModelMismatchError: the corpus or the table, with the fix.
        WriterConflict: another run writes the table (its lease, or its commits), with the fix.
        RuntimeError: the table does not hold one row per document afterwards.
    """
    from pipelines.index import embed as E
    from pipelines.store import lance_tables as L
    from pipelines.store.lease import TableLease

    t0 = time.perf_counter()
    tables = tables or cfg.tables()
    version = E.resolve_source(tables, cfg.input.version)
    table = L.VectorTable(cfg.db_uri, cfg.output.table, tables.storage_options)
    with TableLease(cfg.db_uri, cfg.output.table, "ciea embed", tables.storage_options) as lease:
        table.check_model(facts["model_id"], facts["dim"])
        summary = _run_leased(cfg, facts, ray, tables, table, version, lease)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def _run_leased(cfg: EmbedConfig, facts: dict[str, Any], ray: RayAccess | None, tables: Tables, table: Any,
                version: int, lease: Any) -> dict[str, Any]:
    """The run once it holds the table's lease: plan, delete stale rows, embed, check,
    index and publish."""
    from pipelines.index import embed as E

    mid, dim = facts["model_id"], facts["dim"]
    table.create_if_missing(mid, dim, patch_grid=facts.get("patch_grid"))
    res = resolve_resources(cfg, (ray or CurrentRay()).start())

    table.fence_writes(lease.run_id, lease.check)
    t_plan = time.perf_counter()
    route, plan = make_plan(cfg, tables, table, version)
    summary: dict[str, Any] = {
        "model_id": mid, "variant": facts["variant"], "dim": dim, "documents_uri": tables.documents,
        "source_version": version, "table": f"{cfg.db_uri}/{cfg.output.table}", "resources": res,
        "documents": plan.documents, "to_embed": plan.to_embed_count, "skipped": plan.skipped,
        "plan_route": route, "plan_seconds": round(time.perf_counter() - t_plan, 2),
    }
    logger.info("corpus/documents@%d: %d documents, %d already embedded, %d to embed, %d stale rows to replace "
                "(planned %s)", version, plan.documents, plan.skipped, plan.to_embed_count, len(plan.stale), route)
    version_before = table.version()
    summary["deleted_stale"] = table.delete_doc_ids(plan.stale) if plan.stale else 0
    stream = _embed_plan(cfg, facts, res, table, tables, version, plan) if plan.to_embed_count \
        else E.StreamResult()
    summary.update(rows_written=stream.rows, fragments=stream.fragments, commits=stream.commits,
                   failed=len(stream.failed), failures=stream.failed[:100], embed_seconds=stream.seconds)
    summary["docs_per_s"] = round(stream.rows / stream.seconds, 1) if stream.seconds else 0.0
    summary["rows"] = _check_one_row_per_document(cfg, table, tables, version, plan.documents - len(stream.failed),
                                                  route)
    changed = table.version() != version_before or stream.commits > 0
    _index_and_publish(cfg, facts, table, version, changed, summary)
    summary["table_version"] = table.version()
    return summary


def _embed_plan(cfg: EmbedConfig, facts: dict[str, Any], res: dict[str, Any], table: Any, tables: Tables,
                version: int, plan: Any) -> Any:
    """Runs the Ray Data pipeline on the plan's documents and commits what it wrote."""
    from pipelines.index import embed as E
    from pipelines.store import lance_tables as L

    fault = None
    if cfg.fault.encoder_at_batch is not None:
        fault = E.FaultSpec(cfg.fault.encoder_at_batch, cfg.fault.marker, cfg.fault.encoder_mode)
    lds = table.dataset()
    spec = pipeline_spec(cfg, facts, res, tables=tables, version=version, lance_uri=table.uri,
                         lance_schema=lds.schema, data_storage_version=lds.data_storage_version, fault=fault)
    spec = dataclasses.replace(spec, join_partitions=max(2, getattr(plan, "partitions", 0)))
    # Recorded in the table metadata so that search can load the same model for queries.
    checkpoint_uri = _checkpoint_uri(cfg.model.checkpoint)

    def after_commit(n: int) -> None:
        table.update_metadata({L.META_SOURCE_VERSION: str(version), L.META_CHECKPOINT: checkpoint_uri})
        if cfg.fault.crash_after_commits is not None and n >= cfg.fault.crash_after_commits:
            raise SimulatedCrash(f"fault.crash_after_commits={n}: the job dies here (drill)")

    with ray_data_settings(cfg.encode.max_retries), \
            progress_bar(plan.to_embed_count, f"embed → {cfg.output.table}", cfg.progress) as on_rows:
        ds = E.build_dataset(spec, plan.embed_filter)
        return E.stream_to_table(ds, table.commit_fragments, cfg.write.commit_every_rows,
                                 on_rows=on_rows, after_commit=after_commit)


def make_plan(cfg: EmbedConfig, tables: Tables, table: Any, version: int, route: str | None = None) -> tuple[str, Any]:
    """The run's work plan and where it was made: ``embed.plan_work`` in the driver, or
    ``keydiff.plan_work`` on Ray (the same fields; the ids to embed stay in the object
    store). ``route`` ``None``: by size (``plan.distributed_min_rows``; rows from Delta's
    file statistics and Lance's manifest, no data read)."""
    from pipelines.index import embed as E
    from pipelines.index import keydiff as K
    from pipelines.store.delta_tables import row_count

    documents, rows = row_count(tables, version), table.count_rows()
    route = route or ("ray" if documents + rows >= cfg.plan.distributed_min_rows else "driver")
    if route == "driver":
        return route, E.plan_work(E.source_keys(tables, version), table.keys())
    if rows == 0:  # nothing to diff against: every document, no shuffle
        return route, K.DistributedPlan(documents, documents, [], 0, None, 0)
    plan = K.plan_work(tables, version, table.uri, K.partitions_for(documents + rows, cfg.plan.partitions))
    if plan.repeated:
        raise E.EmbedError(
            f"{tables.documents}@{version} has {plan.repeated} repeated doc_ids; corpus/documents must hold one "
            "row per doc_id: re-run `ciea ingest` on that root to repair it")
    return route, plan


def _check_one_row_per_document(cfg: EmbedConfig, table: Any, tables: Tables, version: int, expected: int,
                                route: str = "driver") -> int:
    """Every source document must now have exactly one row (except those that failed).

    On the Ray route the check is the plan made again: nothing stale, nothing to embed but
    the documents that failed, and the row count Lance's manifest gives."""
    import pyarrow.compute as pc

    if route == "driver":
        keys = table.keys()
        rows, distinct = keys.num_rows, pc.count_distinct(keys.column(0)).as_py()
        ok, found = rows == distinct == expected, f"{rows} rows / {distinct} doc_ids"
    else:
        (_, again), rows = make_plan(cfg, tables, table, version, route), table.count_rows()
        ok = rows == expected and not again.stale and again.to_embed_count == again.documents - expected
        found = f"{rows} rows, {len(again.stale)} stale or repeated doc_ids, {again.to_embed_count} documents missing"
    if not ok:
        raise RuntimeError(f"table {cfg.output.table} has {found}, expected {expected} rows: "
                           "not publishing this version; re-run `ciea embed` to repair it")
    return rows


def _index_and_publish(cfg: EmbedConfig, facts: dict[str, Any], table: Any, version: int, changed: bool,
                       summary: dict[str, Any]) -> None:
    """Builds the indexes when anything changed, records the source version, publishes."""
    from pipelines.store import lance_tables as L

    rows = summary["rows"]
    previous = L.plan_from_json(table.metadata().get(L.META_INDEX_PLAN))
    ann = None if cfg.index.ann == "none" else L.plan_ann_index(rows, facts["dim"], cfg.index.ann,
                                                               cfg.index.min_rows_for_ann)
    summary["indexes"] = {}
    if cfg.index.enabled and (changed or table.published_version() != table.version()
                              or (rows and not table.index_names())):
        t_idx = time.perf_counter()
        summary["indexes"] = table.build_indexes(ann, previous)
        table.update_metadata({L.META_SOURCE_VERSION: str(version), L.META_INDEX_PLAN: ann.to_json() if ann else None,
                               L.META_CHECKPOINT: _checkpoint_uri(cfg.model.checkpoint)})
        summary["index_seconds"] = round(time.perf_counter() - t_idx, 2)
    summary["index_stats"] = table.index_stats()
    summary["ann_plan"] = ann.to_json() if ann else None
    if changed or table.published_version() != table.version():
        tag = cfg.output.tag or f"src{version}-{facts['model_id']}"
        summary.update(published_version=table.publish(tag), tag=tag, noop=False)
    else:
        summary.update(published_version=table.published_version(), noop=True)
