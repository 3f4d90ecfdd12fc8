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
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipelines.store import storage as storage_mod
from pipelines.store.delta_tables import Tables

from .common import (
    config_keys,
    flag_overrides,
    load_config,
    refuse_secrets,
    setup_logging,
    write_json,
)
from .embed import (
    EncodeSettings,
    IndexSettings,
    InputSettings,
    ModelSettings,
    OutputSettings,
    PreprocessSettings,
    RaySettings,
    WriteSettings,
    _init_ray,
    load_model_facts,
    resolve_resources,
)

logger = logging.getLogger("ciea.reindex")

#: Exit code when the publish gate refuses a candidate (the published version stays).
EXIT_GATE_REFUSED = 3

CrashPoint = Literal["planned", "deleted", "committed", "indexed", "recorded", "rebuilt"]


class ReindexOutputSettings(OutputSettings):
    run_dir: str = Field("runs/reindex", description="local folder for summary.json and the resolved config")


class ReindexIndexSettings(IndexSettings):
    max_drift: float = Field(0.25, ge=0, description="keep the trained ANN index (fold new rows in) while the "
                                                     "row count is within this fraction of the size it was "
                                                     "trained at; beyond, retrain it")


class ChangeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["auto", "diff"] = Field(
        "auto", description="auto: the Delta change data feed, or a full diff by content_sha256 when the feed "
                            "cannot cover the range; diff: always the full diff")
    read_max_docs: int = Field(
        10_000, ge=0, description="up to this many documents to embed, the job reads their rows itself (from "
                                  "the change feed's post-images, or a filtered scan of the version) and hands "
                                  "them to the pipeline; above, Ray reads the whole version and keeps them "
                                  "(the rows then never pass through the job's memory)")


class ReindexEncodeSettings(EncodeSettings):
    in_process_max_docs: int = Field(
        1000, ge=0, description="up to this many documents to embed, they are embedded in the job's own process "
                                "(same encoder and Lance writer, one commit) instead of a Ray Data run, whose "
                                "actor start-up and checkpoint load cost more than encoding a small change set; "
                                "needs encode.device usable here (cpu, or a local GPU). 0: always Ray")


class GateSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    split: str = Field("dev", pattern=r"^[A-Za-z0-9_.-]+$", description="query split the gate scores on "
                                                                        "(queries/<split>, qrels/<split>)")
    k: int = Field(10, ge=1, le=1000, description="the gate's metric is MRR@k")
    tolerance: float = Field(0.01, ge=0, description="promote when candidate MRR@k >= published MRR@k - tolerance")
    max_queries: int | None = Field(None, ge=1, description="score on the first N queries of the split (default all)")
    published_checkpoint: str | None = Field(
        None, description="checkpoint of the published version's model (default: the one recorded in its "
                          "table metadata, ciea.checkpoint)")
    missing_split: Literal["refuse", "promote"] = Field(
        "refuse", description="no such query split: refuse the candidate (default), or promote it unscored")


class ReindexFaultSettings(BaseModel):
    """Fault injection for tests and failure drills; leave unset in production."""

    model_config = ConfigDict(extra="forbid")
    crash_at: CrashPoint | None = Field(
        None, description="drill: the job dies right after this step (planned, deleted, committed, indexed, "
                          "recorded; rebuilt: after a new model's rows are committed)")


class ReindexConfig(BaseModel):
    """The whole re-index job, validated before Ray starts."""

    model_config = ConfigDict(extra="forbid")
    input: InputSettings = Field(default_factory=InputSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    output: ReindexOutputSettings = Field(default_factory=ReindexOutputSettings)
    changes: ChangeSettings = Field(default_factory=ChangeSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    encode: ReindexEncodeSettings = Field(default_factory=ReindexEncodeSettings)
    preprocess: PreprocessSettings = Field(default_factory=PreprocessSettings)
    write: WriteSettings = Field(default_factory=WriteSettings)
    index: ReindexIndexSettings = Field(default_factory=ReindexIndexSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    fault: ReindexFaultSettings = Field(default_factory=ReindexFaultSettings)
    progress: bool = Field(True, description="show a progress bar")

    @property
    def db_uri(self) -> str:
        return self.output.db or storage_mod.join(storage_mod.normalise_uri(self.input.root), "lancedb")


class ReindexError(RuntimeError):
    """A problem with the inputs or the table's state, with the fix in the message."""


class SimulatedCrash(RuntimeError):
    """Raised by the ``fault.crash_at`` drill."""


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ciea reindex", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (YAML file or --set KEY=VALUE), with defaults:\n" + "\n".join(config_keys(ReindexConfig)))
    p.add_argument("--config", help="YAML file with ReindexConfig fields")
    p.add_argument("--checkpoint", help="checkpoint to index with (model.checkpoint; default: the one the "
                                        "table records)")
    p.add_argument("--root", help="data root holding corpus/documents, local or s3:// (input.root)")
    p.add_argument("--version", type=int, help="Delta version to bring the table to (input.version; default latest)")
    p.add_argument("--db", help="LanceDB folder, local or s3:// (output.db; default <root>/lancedb)")
    p.add_argument("--table", help="LanceDB table name (output.table)")
    p.add_argument("--tag", help="tag for the finished version (output.tag)")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="object-store setting, repeatable (input.storage_options; never credentials)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="encoder device (encode.device)")
    p.add_argument("--run-dir", help="folder for summary.json and the resolved config (output.run_dir)")
    p.add_argument("--ray-address", help="connect to this Ray cluster instead of starting one (ray.address)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (ray.num_cpus)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (progress=false)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key below, e.g. --set gate.tolerance=0.02")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _overrides(args: argparse.Namespace) -> list[str]:
    out = flag_overrides(args, {
        "checkpoint": "model.checkpoint", "root": "input.root", "version": "input.version", "db": "output.db",
        "table": "output.table", "tag": "output.tag", "device": "encode.device", "run_dir": "output.run_dir",
        "ray_address": "ray.address", "num_cpus": "ray.num_cpus"}, "input.storage_options")
    if args.no_progress:
        out.append("progress=false")
    return out + list(args.set)


def _as_reindex_error(e: SystemExit) -> SystemExit:
    # The embed helpers name their own command; say which one the user ran.
    return SystemExit(str(e.code).replace("ciea embed:", "ciea reindex:", 1))


# ---------------------------------------------------------------------------------------
# Table state
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableState:
    """What the table holds at its head and at its published version."""

    head: int
    head_model: str | None
    rows_model: str | None
    published: int | None
    published_model: str | None
    published_checkpoint: str | None


def table_state(table: Any) -> TableState:
    """Reads the head's and the published version's lineage (metadata, one row)."""
    import lance

    from pipelines.store import lance_tables as L

    ds = table.dataset()
    one = ds.to_table(columns=[L.MODEL_ID], limit=1)[L.MODEL_ID].to_pylist()
    published = table.published_version()
    pub_meta: dict[str, str] = {}
    if published is not None:
        pub_meta = dict(lance.dataset(table.uri, version=published,
                                      storage_options=table.storage_options or None).metadata or {})
    meta = dict(ds.metadata or {})
    return TableState(head=ds.version, head_model=meta.get(L.META_MODEL_ID), rows_model=one[0] if one else None,
                      published=published, published_model=pub_meta.get(L.META_MODEL_ID),
                      published_checkpoint=pub_meta.get(L.META_CHECKPOINT))


def restore_version(table: Any, version: int) -> int:
    """Makes ``version`` the head again (a new version with its content); returns the head."""
    import lance

    lance.dataset(table.uri, version=version, storage_options=table.storage_options or None).restore()
    return table.version()


@contextlib.contextmanager
def _step(summary: dict[str, Any], name: str) -> Iterator[None]:
    """Adds a step's wall-clock and this process's CPU seconds to the summary
    (``steps``: {name: [wall, cpu]}): where a run's time goes, for the benchmark."""
    t, c = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        steps = summary.setdefault("steps", {})
        wall, cpu = steps.get(name, [0.0, 0.0])
        steps[name] = [round(wall + time.perf_counter() - t, 3), round(cpu + time.process_time() - c, 3)]


def _crash(cfg: ReindexConfig, point: str) -> None:
    if cfg.fault.crash_at == point:
        raise SimulatedCrash(f"fault.crash_at={point}: the job dies here (drill)")


def delta_row_count(documents_uri: str, version: int, storage_options: dict[str, str]) -> int:
    """Rows of a Delta version from its file statistics (no data read)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from deltalake import DeltaTable

    dt = DeltaTable(documents_uri, version=version, storage_options=storage_options or None)
    actions = pa.table(dt.get_add_actions(flatten=True))
    if actions["num_records"].null_count:  # a writer that kept no statistics: count the ids
        return dt.to_pyarrow_dataset().count_rows()
    return int(pc.sum(actions["num_records"]).as_py() or 0)


# ---------------------------------------------------------------------------------------
# Embedding (the ``ciea embed`` pipeline, restricted to a set of documents)
# ---------------------------------------------------------------------------------------


def _ray_up() -> bool:
    ray = sys.modules.get("ray")  # not imported: certainly not initialised (and no import cost)
    return ray is not None and ray.is_initialized()


def _cluster_resources(cfg: ReindexConfig) -> dict[str, float]:
    """Ray's resources once it is up; before, what a local ``ray.init`` would find here
    (``ray.num_cpus`` or this machine's CPUs, its GPUs), so the embed route can be chosen
    without starting Ray."""
    if _ray_up():
        import ray

        return ray.cluster_resources()
    import torch

    return {"CPU": float(cfg.ray.num_cpus or len(os.sched_getaffinity(0))), "GPU": float(torch.cuda.device_count())}


def _ray_resources(cfg: ReindexConfig) -> dict[str, Any]:
    """Joins or starts Ray (once: ``main`` shuts down what it did not find) and resolves the
    encoder's resources against the real cluster."""
    import ray

    _init_ray(cfg)  # type: ignore[arg-type]
    try:
        return resolve_resources(cfg, ray.cluster_resources())  # type: ignore[arg-type]
    except SystemExit as e:
        raise _as_reindex_error(e) from None


def _embed(cfg: ReindexConfig, facts: dict[str, Any], res: dict[str, Any], documents_uri: str, version: int,
           lance_uri: str, schema: Any, data_storage_version: str | None, doc_ids: Any, total: int,
           commit: Any, commit_every_rows: int | None, rows: Any = None, in_process: bool = False) -> Any:
    """Runs the embedding stage on ``doc_ids`` of the version (``None``: all), or on ``rows``
    already read; ``in_process``: the same stages in this process, without Ray Data."""
    from tqdm import tqdm

    from pipelines.index import embed as E

    if not in_process:
        res = _ray_resources(cfg)  # Ray joined or started here if this process has none yet
    opts = cfg.input.storage_options
    spec = E.PipelineSpec(
        documents_uri=documents_uri, source_version=version, storage_options=opts,
        checkpoint=str(Path(cfg.model.checkpoint).resolve()), model_id=facts["model_id"], dim=facts["dim"],
        transform=facts["transform"], image_side=facts["image_side"], lance_uri=lance_uri,
        lance_schema=schema, data_storage_version=data_storage_version,
        device=res["device"], actors=res["actors"], cpus_per_actor=res["cpus_per_actor"],
        gpus_per_actor=res["gpus_per_actor"], threads=res["threads"], bf16=cfg.encode.bf16,
        batch_size=cfg.encode.batch_size, preprocess_rows=cfg.preprocess.batch_rows,
        rows_per_fragment=cfg.write.rows_per_fragment, thumbnail_px=cfg.preprocess.thumbnail_px,
        thumbnail_quality=cfg.preprocess.thumbnail_quality, read_blocks=cfg.preprocess.read_blocks,
        preprocess_in_tasks=(cfg.preprocess.placement == "tasks"
                             or (cfg.preprocess.placement == "auto" and res["device"] == "cuda")),
        embedded_at=datetime.now(timezone.utc))
    bar = tqdm(total=total, unit="doc", desc=f"reindex → {cfg.output.table}", disable=not cfg.progress,
               file=sys.stderr)
    if in_process:
        # No retries here: an encoder error fails the run, and the re-run re-plans (crash-safe).
        try:
            return E.stream_to_table(E.iter_in_process(spec, rows), commit, commit_every_rows, on_rows=bar.update)
        finally:
            bar.close()
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.retried_map_errors, ctx.max_map_retries)
    ctx.enable_progress_bars = False
    ctx.retried_map_errors, ctx.max_map_retries = bool(cfg.encode.max_retries), cfg.encode.max_retries
    try:
        return E.stream_to_table(E.build_dataset(spec, doc_ids, rows), commit, commit_every_rows, on_rows=bar.update)
    finally:
        bar.close()
        ctx.enable_progress_bars, ctx.retried_map_errors, ctx.max_map_retries = saved


# ---------------------------------------------------------------------------------------
# The publish gate
# ---------------------------------------------------------------------------------------


def evaluate_version(db_uri: str, table: str, version: int, checkpoint: str | None, root: str, split: str,
                     storage_options: dict[str, str], k: int = 10, max_queries: int | None = None) -> dict[str, Any]:
    """MRR@k (and NDCG@k, Recall@k) of one pinned table version on a query split.

    Queries are encoded by ``checkpoint`` (default: the one the version records), searched
    with the version's own index settings (``pipelines.query.search.Searcher``) and scored by
    ``pipelines.query.metrics.evaluate_run``: the same path ``ciea search`` takes.

    Raises:
        FileNotFoundError: the split does not exist under ``root``.
    """
    from pipelines.query.metrics import evaluate_run
    from pipelines.query.search import Searcher
    from pipelines.train.dataset import read_queries

    queries = [q for q in read_queries(root, split, storage_options) if q["positive_doc_ids"]]
    if max_queries is not None:
        queries = queries[:max_queries]
    searcher = Searcher.open(db_uri, table, version=version, checkpoint=checkpoint, storage_options=storage_options)
    hits = searcher.search_vectors(searcher.encode_queries([q["query"] for q in queries]), k=k) if queries else []
    run = {q["qid"]: [h.doc_id for h in hs] for q, hs in zip(queries, hits, strict=True)}
    report = evaluate_run(run, {q["qid"]: set(q["positive_doc_ids"]) for q in queries},
                          ks_mrr=(k,), ks_ndcg=(k,), ks_recall=(k,))
    return {"version": version, "model_id": searcher.model_id, "checkpoint": searcher.checkpoint,
            "queries": report.num_queries, "metrics": report.metrics}


def run_gate(cfg: ReindexConfig, state: TableState, candidate: int) -> tuple[Any, dict[str, Any]]:
    """Scores the candidate and the published version; returns (GateResult, details)."""
    from pipelines.index import reindex_plan as R

    g = cfg.gate
    metric = f"MRR@{g.k}"
    opts = cfg.input.storage_options
    try:
        cand = evaluate_version(cfg.db_uri, cfg.output.table, candidate, str(Path(cfg.model.checkpoint).resolve()),
                                cfg.input.root, g.split, opts, g.k, g.max_queries)
    except FileNotFoundError as e:
        if g.missing_split == "promote":
            logger.warning("no %s split to score on (%s): promoting unscored (gate.missing_split=promote)", g.split, e)
            return R.GateResult(True, metric, float("nan"), None, g.tolerance, f"no {g.split} split: promoted unscored"), {}
        raise ReindexError(
            f"the publish gate scores on queries/{g.split} and qrels/{g.split}, which do not exist under "
            f"{cfg.input.root} ({e}): ingest that split, pick another with --set gate.split=NAME, or promote "
            "unscored with --set gate.missing_split=promote") from None
    ckpt = g.published_checkpoint or state.published_checkpoint
    if not ckpt:
        raise ReindexError(
            f"the published version {state.published} records no checkpoint to encode queries with: pass "
            f"--set gate.published_checkpoint=DIR (the checkpoint of model_id {state.published_model})")
    pub = evaluate_version(cfg.db_uri, cfg.output.table, state.published, ckpt, cfg.input.root, g.split, opts,
                           g.k, g.max_queries)
    result = R.gate_decision(cand["metrics"][metric], pub["metrics"][metric], g.tolerance, metric)
    return result, {"candidate_eval": cand, "published_eval": pub}


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


def _finish(cfg: ReindexConfig, table: Any, facts: dict[str, Any], to_version: int, changed: bool,
            summary: dict[str, Any], ann_for: Any) -> dict[str, Any]:
    """Indexes, the recorded source version, then the gate (new model) and the tag.

    When documents failed to embed, the version is still published (with the changes that
    did go in) but the source version is not advanced, so the next run retries them.
    """
    from pipelines.store import lance_tables as L

    record = {L.META_SOURCE_VERSION: str(to_version)} if not summary.get("failed") else {}

    mid, dim = facts["model_id"], facts["dim"]
    rows = table.count_rows()
    state = table_state(table)
    needs_work = changed or state.published != state.head or (rows and not table.index_names())
    if needs_work and cfg.index.enabled:
        previous = L.plan_from_json(table.metadata().get(L.META_INDEX_PLAN))
        wanted = None if cfg.index.ann == "none" else L.plan_ann_index(rows, dim, cfg.index.ann,
                                                                      cfg.index.min_rows_for_ann)
        ann = ann_for(previous, wanted)
        t_idx = time.perf_counter()
        with _step(summary, "index"):
            summary["indexes"] = table.build_indexes(ann, previous)
        summary["index_seconds"] = round(time.perf_counter() - t_idx, 2)
        summary["ann_plan"] = ann.to_json() if ann else None
        _crash(cfg, "indexed")
        # The commit point: only now does the table say it holds to_version.
        table.update_metadata({**record, L.META_INDEX_PLAN: ann.to_json() if ann else None,
                               L.META_CHECKPOINT: str(Path(cfg.model.checkpoint).resolve())})
        _crash(cfg, "recorded")
    elif needs_work:
        table.update_metadata({**record, L.META_CHECKPOINT: str(Path(cfg.model.checkpoint).resolve())})
    summary["index_stats"] = table.index_stats()
    state = table_state(table)
    summary["rows"] = table.count_rows()
    if state.published == state.head:
        summary.update(noop=not changed, published_version=state.published, promoted=False)
        return summary
    tag = cfg.output.tag or f"src{to_version}-{mid}"
    if state.published is None or state.published_model == mid:
        summary.update(noop=False, published_version=table.publish(tag), tag=tag, promoted=True)
        return summary
    # A new model's candidate: publish only through the gate.
    result, details = run_gate(cfg, state, state.head)
    summary["gate"] = {"promote": result.promote, "reason": result.reason, "metric": result.metric,
                       "candidate": result.candidate, "published": result.published,
                       "tolerance": result.tolerance, **details}
    if result.promote:
        summary.update(noop=False, published_version=table.publish(tag), tag=tag, promoted=True)
        logger.info("publish gate passed: %s", result.reason)
        return summary
    candidate_tag = f"candidate-{mid}"
    tags = table.table.tags
    if candidate_tag in tags.list():
        tags.update(candidate_tag, state.head)
    else:
        tags.create(candidate_tag, state.head)
    head = restore_version(table, state.published)
    logger.warning("publish gate refused model_id %s: %s; version %d tagged %r, published version %d "
                   "restored as the head (version %d)", mid, result.reason, state.head, candidate_tag,
                   state.published, head)
    summary.update(noop=False, published_version=state.published, promoted=False, candidate_tag=candidate_tag,
                   candidate_version=state.head, restored_as=head)
    return summary


def run_incremental(cfg: ReindexConfig, facts: dict[str, Any], table: Any, documents_uri: str, to_version: int,
                    res: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """Same model: apply the change set since the table's recorded version."""
    from pipelines.index import embed as E
    from pipelines.index import reindex_plan as R

    opts = cfg.input.storage_options
    with _step(summary, "plan"):
        plan, changes = _plan(cfg, table, documents_uri, to_version, summary)
    _crash(cfg, "planned")
    version_before = table.version()
    with _step(summary, "delete"):
        summary["deleted"] = table.delete_doc_ids(plan.stale) if plan.stale else 0
    _crash(cfg, "deleted")
    stream = E.StreamResult()
    if len(plan.to_embed):
        lds = table.dataset()
        how = embed_route(len(plan.to_embed), cfg, res)
        rows = None
        if how != "ray-read":
            with _step(summary, "read"):
                rows, summary["rows_from"] = R.changed_documents(documents_uri, changes, plan.to_embed,
                                                                 list(E.SOURCE_COLUMNS), opts)
        summary["embed_route"] = how
        with _step(summary, "embed"):
            stream = _embed(cfg, facts, res, documents_uri, to_version, table.uri, lds.schema,
                            lds.data_storage_version, plan.to_embed, len(plan.to_embed), table.commit_fragments,
                            cfg.write.commit_every_rows, rows=rows, in_process=how == "in-process")
    summary.update(embedded=stream.rows, commits=stream.commits, failed=len(stream.failed),
                   failures=stream.failed[:100], embed_seconds=stream.seconds)
    _crash(cfg, "committed")
    with _step(summary, "check"):
        _check_rows(table, documents_uri, to_version, opts, len(stream.failed), plan)
    changed = table.version() != version_before or summary["from_version"] != to_version
    return _finish(cfg, table, facts, to_version, changed, summary,
                   lambda trained, wanted: R.ann_to_build(trained, wanted, cfg.index.max_drift))


def _plan(cfg: ReindexConfig, table: Any, documents_uri: str, to_version: int,
          summary: dict[str, Any]) -> tuple[Any, Any]:
    """The change set since the table's recorded version and the plan against its rows now."""
    import pyarrow as pa

    from pipelines.index import embed as E
    from pipelines.index import reindex_plan as R
    from pipelines.store import lance_tables as L

    opts = cfg.input.storage_options
    recorded = table.metadata().get(L.META_SOURCE_VERSION)
    from_version = int(recorded) if recorded is not None else None
    summary["from_version"] = from_version
    table_keys = None
    if from_version is not None and from_version == to_version:
        changes = R.no_changes(to_version)
    else:
        reason = ""
        changes = None
        if from_version is None:
            reason = "the table records no source version"
        elif to_version < from_version:
            reason = f"Delta version {to_version} is older than the table's {from_version}"
        elif cfg.changes.method == "diff":
            reason = "changes.method=diff"
        else:
            try:
                changes = R.collapse_changes(R.read_change_feed(documents_uri, from_version, to_version, opts),
                                             from_version, to_version)
            except R.ChangeFeedUnavailable as e:
                reason = f"the change data feed does not cover versions {from_version + 1}..{to_version} ({e})"
                logger.warning("%s: falling back to a full diff by content_sha256", reason)
        if changes is None:
            table_keys = table.keys()
            changes = R.diff_changes(E.source_keys(documents_uri, to_version, opts), table_keys,
                                     from_version, to_version, reason=reason)
    if table_keys is None:
        ids = pa.concat_arrays([changes.upserts["doc_id"].combine_chunks(), changes.deletes])
        table_keys = R.table_keys_for(table.dataset(), ids)
    plan = R.plan_reindex(changes, table_keys)
    summary.update(method=changes.method, fallback_reason=changes.reason, feed_rows=changes.feed_rows,
                   upserts=changes.upserts.num_rows, deletes=len(changes.deletes), to_embed=len(plan.to_embed),
                   unchanged=plan.unchanged, already_gone=plan.already_gone)
    logger.info("corpus/documents %s → %d (%s): %d inserted/updated, %d deleted; %d to embed, %d rows to delete, "
                "%d already done", from_version, to_version, changes.method, changes.upserts.num_rows,
                len(changes.deletes), len(plan.to_embed), len(plan.stale), plan.unchanged + plan.already_gone)
    return plan, changes


def embed_route(n: int, cfg: ReindexConfig, res: dict[str, Any]) -> str:
    """How ``n`` changed documents are embedded (the rule, with the settings that move it):

    * ``in-process``: ``n <= encode.in_process_max_docs`` and the encoder's device works in
      this process. A Ray Data run has a fixed cost (an actor started, torch imported and
      the checkpoint loaded there, the pipeline planned) of several seconds that a small
      change set never earns back; the rows are read here and embedded here.
    * ``ray-rows``: ``n <= changes.read_max_docs``: the rows are read here (the feed's
      post-images) and handed to the Ray pipeline, which fans them out to its actors.
    * ``ray-read``: larger change sets: Ray reads the whole version and keeps the ``n``
      documents, so they never pass through this process's memory.
    """
    if n <= cfg.encode.in_process_max_docs and _device_here(res["device"]):
        return "in-process"
    if n <= cfg.changes.read_max_docs:
        return "ray-rows"
    return "ray-read"


def _device_here(device: str) -> bool:
    if device == "cpu":
        return True
    import torch

    return torch.cuda.is_available()


def _check_rows(table: Any, documents_uri: str, version: int, opts: dict[str, str], failed: int, plan: Any) -> None:
    """One row per document of the version: counted from Delta's file statistics, and no
    changed document twice (checked for the changed ids only, so the cost follows the change)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipelines.index import reindex_plan as R

    expected = delta_row_count(documents_uri, version, opts) - failed
    rows = table.count_rows()
    ids = pa.concat_arrays([plan.changes.upserts["doc_id"].combine_chunks(), plan.changes.deletes])
    keys = R.table_keys_for(table.dataset(), ids)
    distinct = pc.count_distinct(keys["doc_id"]).as_py() if keys.num_rows else 0
    if rows != expected or distinct != keys.num_rows:
        raise ReindexError(
            f"table {table.name} has {rows} rows ({keys.num_rows - distinct} duplicated among the changed "
            f"documents), expected {expected} for corpus/documents@{version}: not publishing this version; "
            "re-run `ciea reindex` to repair it (or `--set changes.method=diff` for a full diff)")


def run_rebuild(cfg: ReindexConfig, facts: dict[str, Any], table: Any, documents_uri: str, to_version: int,
                res: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """A new model: every document embedded into one Overwrite commit, then the gate."""
    import lance

    from pipelines.store import lance_tables as L

    opts = cfg.input.storage_options
    mid, dim, grid = facts["model_id"], facts["dim"], facts.get("patch_grid")
    patches = grid[0] * grid[1] if grid else None
    schema = L.table_schema(dim, patches)
    base = table.dataset()
    total = delta_row_count(documents_uri, to_version, opts)
    summary.update(method="rebuild", from_version=None, to_embed=total)
    logger.info("model_id %s is not the table's (%s): full rebuild of %d documents into a new version, then the "
                "publish gate", mid, base.metadata.get(L.META_MODEL_ID), total)

    def overwrite(fragments: list[Any]) -> int:
        # One commit replaces every row: readers of older versions keep the old model.
        return lance.LanceDataset.commit(base.uri, lance.LanceOperation.Overwrite(schema, fragments),
                                         read_version=base.version, storage_options=opts or None).version

    stream = _embed(cfg, facts, res, documents_uri, to_version, table.uri, schema, base.data_storage_version,
                    None, total, overwrite, None)
    if stream.commits == 0:  # an empty corpus still replaces the old model's rows
        overwrite([])
    summary.update(embedded=stream.rows, commits=max(stream.commits, 1), failed=len(stream.failed),
                   failures=stream.failed[:100], embed_seconds=stream.seconds, deleted=0)
    _crash(cfg, "rebuilt")
    meta = {L.META_MODEL_ID: mid, L.META_DIM: str(dim),
            L.META_SOURCE_VERSION: None if stream.failed else str(to_version),
            L.META_CHECKPOINT: str(Path(cfg.model.checkpoint).resolve()), L.META_INDEX_PLAN: None,
            L.META_PATCH_GRID: f"{grid[0]}x{grid[1]}" if grid else None}
    table.update_metadata(meta)
    expected = total - len(stream.failed)
    if table.count_rows() != expected:
        raise ReindexError(f"rebuild wrote {table.count_rows()} rows, expected {expected}: not publishing; re-run")
    return _finish(cfg, table, facts, to_version, True, summary, lambda trained, wanted: wanted)


def run(cfg: ReindexConfig, facts: dict[str, Any]) -> dict[str, Any]:
    """One re-index run; returns the summary. Ray is joined or started only when a step
    needs it (:func:`_ray_resources`): a small change set embedded in-process never does."""
    from pipelines.index import embed as E
    from pipelines.store import lance_tables as L

    t0 = time.perf_counter()
    opts = cfg.input.storage_options
    documents_uri = Tables(cfg.input.root, opts).documents
    to_version = E.resolve_source(documents_uri, cfg.input.version, opts)
    table = L.VectorTable(cfg.db_uri, cfg.output.table, opts)
    if not table.exists():
        raise ReindexError(f"no table {cfg.output.table!r} in {cfg.db_uri}: build it first with `ciea embed "
                           f"--checkpoint {cfg.model.checkpoint} --table {cfg.output.table}`")
    mid = facts["model_id"]
    try:
        res = resolve_resources(cfg, _cluster_resources(cfg))  # type: ignore[arg-type]
    except SystemExit as e:
        raise _as_reindex_error(e) from None
    summary: dict[str, Any] = {"model_id": mid, "variant": facts["variant"], "dim": facts["dim"],
                               "documents_uri": documents_uri, "to_version": to_version,
                               "table": f"{cfg.db_uri}/{cfg.output.table}", "resources": res}
    state = table_state(table)
    if state.rows_model is not None and state.rows_model != state.head_model and state.published is not None:
        # A rebuild died between its rows and its metadata: its rows are no version anyone reads.
        logger.warning("the head version %d holds rows of model_id %s but says %s (an interrupted rebuild): "
                       "restoring the published version %d", state.head, state.rows_model, state.head_model,
                       state.published)
        summary["restored"] = restore_version(table, state.published)
        state = table_state(table)
    if state.head_model != mid and state.published_model == mid:
        # An unpublished candidate of another model sits on top: this model is the published one.
        logger.warning("discarding the unpublished version %d of model_id %s: restoring the published version %d "
                       "of this checkpoint's model", state.head, state.head_model, state.published)
        summary["restored"] = restore_version(table, state.published)
        state = table_state(table)
    if state.head_model == mid and (state.rows_model in (None, mid)):
        summary = run_incremental(cfg, facts, table, documents_uri, to_version, res, summary)
    else:
        summary = run_rebuild(cfg, facts, table, documents_uri, to_version, res, summary)
    summary["table_version"] = table.version()
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


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


def _default_checkpoint(cfg: ReindexConfig) -> str:
    """The checkpoint the table records, for scheduled runs that name none."""
    from pipelines.store import lance_tables as L

    table = L.VectorTable(cfg.db_uri, cfg.output.table, cfg.input.storage_options)
    recorded = table.metadata().get(L.META_CHECKPOINT) if table.exists() else None
    if not recorded:
        raise SystemExit("ciea reindex: pass --checkpoint DIR: the table "
                         f"{cfg.output.table!r} in {cfg.db_uri} records no checkpoint (or does not exist)")
    return recorded


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = _overrides(args)
    refuse_secrets("ciea reindex", args.config, overrides, "input.storage_options")
    cfg: ReindexConfig = load_config(ReindexConfig, args.config, overrides, {})  # type: ignore[assignment]
    setup_logging(args.verbose)
    for noisy in ("ray", "ray.data"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from pipelines.index import embed as E

    # Everything that can fail on the config, the checkpoint or the corpus fails here, before Ray.
    try:
        E.resolve_source(Tables(cfg.input.root, cfg.input.storage_options).documents, cfg.input.version,
                         cfg.input.storage_options)
    except E.EmbedError as e:
        raise SystemExit(f"ciea reindex: {e}") from None
    if not cfg.model.checkpoint:
        cfg.model.checkpoint = _default_checkpoint(cfg)
    if not Path(cfg.model.checkpoint).is_dir():
        raise SystemExit(f"ciea reindex: checkpoint {cfg.model.checkpoint} is not a directory: pass the folder "
                         "written by ciea_model.save_checkpoint (it holds ciea_checkpoint.json)")
    try:
        facts = load_model_facts(cfg.model.checkpoint)
    except SystemExit as e:
        raise _as_reindex_error(e) from None
    run_dir = Path(cfg.output.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "reindex_config.json", cfg.model_dump(mode="json"))
    had_ray = _ray_up()
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        _init_ray(cfg)  # type: ignore[arg-type]  # a cluster: join it now, its resources decide the route
    # Otherwise a local Ray is started only when a step needs it (a rebuild, a change set
    # too large to embed in-process): a scheduled run with a small change never pays for it.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from pipelines.query.search import SearchError
        from pipelines.store.lance_tables import ModelMismatchError

        try:
            summary = run(cfg, facts)
        except (ReindexError, ModelMismatchError, E.EmbedError, SearchError) as e:
            print(f"ciea reindex: {e}", file=sys.stderr)
            return 2
    finally:
        if not had_ray and _ray_up():
            import ray

            ray.shutdown()
    write_json(run_dir / "summary.json", summary)
    print(format_summary(summary))
    if "gate" in summary and not summary["gate"]["promote"]:
        return EXIT_GATE_REFUSED
    return 1 if summary.get("failed") else 0


if __name__ == "__main__":  # `python -m jobs.reindex`, the RayCronJob / `ray job submit` entrypoint
    raise SystemExit(main())
