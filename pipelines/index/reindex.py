"""``ciea reindex``'s run: bring a LanceDB table up to a Delta version of
``corpus/documents`` — incrementally for the same model, by a gated full rebuild for a new one.

**Same checkpoint as the table** (the scheduled case, :func:`run_incremental`): the change
set since the Delta version the table records (``ciea.source_version``) comes from the
change data feed, or a full diff by ``content_sha256`` when the feed cannot cover the range
(:mod:`pipelines.index.reindex_plan`). Rows of updated and deleted documents are deleted,
the inserted and updated ones are embedded (the ``ciea embed`` stages, restricted to them)
and committed in one Lance commit, the new rows are folded into the indexes (the ANN index
is retrained only beyond ``index.max_drift``), the new source version is recorded, and the
version is tagged and ``published``.

Where the changed documents are embedded follows the size of the change
(:func:`embed_route`): in this process, or on Ray from rows read here, or on Ray reading
the version itself. Ray is reached only through the caller's :class:`RayAccess`, and only
when a step needs it (a rebuild, a large change set).

Crash safety: every step is planned against what the table holds *now*, and the source
version is recorded only after the rows and indexes are complete. A run killed at any step
(the ``fault.crash_at`` drill: :data:`CrashPoint`) re-plans from the same recorded version,
skips what was already done and converges to the same table. Readers follow the
``published`` tag, which moves only at the end.

**Another checkpoint** (:func:`run_rebuild`): all documents embedded into one Lance
``Overwrite`` commit, then the **publish gate** (:func:`run_gate`) scores the candidate and
the published version on a query split (MRR@k, each version's own model encoding the
queries) and moves ``published`` only if ``candidate >= published - gate.tolerance``;
otherwise the candidate is tagged ``candidate-<model_id>`` and the published version is
restored as the head.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pipelines.store.delta_tables import Tables
from pipelines.store.delta_tables import row_count as delta_row_count

from .build import (
    CurrentRay,
    RayAccess,
    SimulatedCrash,
    _checkpoint_uri,
    pipeline_spec,
    progress_bar,
    ray_data_settings,
    resolve_resources,
)
from .config import (  # noqa: F401 - the re-index config's groups, importable from here too
    ChangeSettings,
    CrashPoint,
    GateSettings,
    ReindexConfig,
    ReindexEncodeSettings,
    ReindexFaultSettings,
    ReindexIndexSettings,
    ReindexOutputSettings,
)

logger = logging.getLogger(__name__)

class ReindexError(RuntimeError):
    """A problem with the inputs or the table's state, with the fix in the message."""


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
    from pipelines.store import lance_tables as L

    ds = table.dataset()
    one = ds.to_table(columns=[L.MODEL_ID], limit=1)[L.MODEL_ID].to_pylist()
    published = table.published_version()
    pub_meta: dict[str, str] = {}
    if published is not None:
        pub_meta = dict(table.dataset(published).metadata or {})
    meta = dict(ds.metadata or {})
    return TableState(head=ds.version, head_model=meta.get(L.META_MODEL_ID), rows_model=one[0] if one else None,
                      published=published, published_model=pub_meta.get(L.META_MODEL_ID),
                      published_checkpoint=pub_meta.get(L.META_CHECKPOINT))


def restore_version(table: Any, version: int) -> int:
    """Makes ``version`` the head again (a new version with its content); returns the head."""
    table.dataset(version).restore()
    return table.version()


def recorded_checkpoint(cfg: ReindexConfig) -> str | None:
    """The checkpoint the table records (for scheduled runs that name none), or ``None``
    when the table does not exist or records none."""
    from pipelines.store import lance_tables as L

    table = L.VectorTable(cfg.db_uri, cfg.output.table, cfg.storage_options)
    return (table.metadata().get(L.META_CHECKPOINT) if table.exists() else None) or None


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


# ---------------------------------------------------------------------------------------
# Embedding (the ``ciea embed`` pipeline, restricted to a set of documents)
# ---------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class _Target:
    """Where embedded rows go: the Lance table's URI, schema and storage version, and the
    commit that takes a run's fragments (every ``every_rows`` rows, or once)."""

    uri: str
    schema: Any
    data_storage_version: str | None
    commit: Callable[[list[Any]], int]
    every_rows: int | None = None


def _embed(cfg: ReindexConfig, facts: dict[str, Any], res: dict[str, Any], ray: RayAccess, tables: Tables,
           version: int, target: _Target, doc_ids: Any, total: int, rows: Any = None,
           in_process: bool = False) -> Any:
    """Runs the embedding stage on ``doc_ids`` of the version (``None``: all), or on ``rows``
    already read; ``in_process``: the same stages in this process, without Ray Data."""
    from pipelines.index import embed as E

    if not in_process:
        res = resolve_resources(cfg, ray.start())  # Ray joined or started here if this process has none yet
    spec = pipeline_spec(cfg, facts, res, tables=tables, version=version, lance_uri=target.uri,
                         lance_schema=target.schema, data_storage_version=target.data_storage_version)
    with progress_bar(total, f"reindex → {cfg.output.table}", cfg.progress) as on_rows:
        if in_process:
            # No retries here: an encoder error fails the run, and the re-run re-plans (crash-safe).
            return E.stream_to_table(E.iter_in_process(spec, rows), target.commit, target.every_rows,
                                     on_rows=on_rows)
        with ray_data_settings(cfg.encode.max_retries):
            return E.stream_to_table(E.build_dataset(spec, doc_ids, rows), target.commit, target.every_rows,
                                     on_rows=on_rows)


# ---------------------------------------------------------------------------------------
# The publish gate
# ---------------------------------------------------------------------------------------


def evaluate_version(table: Any, version: int, checkpoint: str | None, tables: Tables, split: str,
                     k: int = 10, max_queries: int | None = None) -> dict[str, Any]:
    """MRR@k (and NDCG@k, Recall@k) of one pinned version of a ``VectorTable`` on a query split
    (``queries/<split>``, ``qrels/<split>`` under ``tables``' root).

    Queries are encoded by ``checkpoint`` (default: the one the version records), searched
    with the version's own index settings (``pipelines.query.search.Searcher``) and scored by
    ``pipelines.query.metrics.evaluate_run``: the same path ``ciea search`` takes.

    Raises:
        FileNotFoundError: the split does not exist under the root.
    """
    from pipelines.query.metrics import evaluate_run
    from pipelines.query.search import Searcher
    from pipelines.store.splits import read_split

    queries = [q for q in read_split(tables, split).training_queries() if q["positive_doc_ids"]]
    if max_queries is not None:
        queries = queries[:max_queries]
    searcher = Searcher.open_table(table, version=version, checkpoint=checkpoint)
    hits = searcher.search_vectors(searcher.encode_queries([q["query"] for q in queries]), k=k) if queries else []
    ranked = {q["qid"]: [h.doc_id for h in hs] for q, hs in zip(queries, hits, strict=True)}
    report = evaluate_run(ranked, {q["qid"]: set(q["positive_doc_ids"]) for q in queries},
                          ks_mrr=(k,), ks_ndcg=(k,), ks_recall=(k,))
    return {"version": version, "model_id": searcher.model_id, "checkpoint": searcher.checkpoint,
            "queries": report.num_queries, "metrics": report.metrics}


def run_gate(cfg: ReindexConfig, table: Any, tables: Tables, state: TableState,
             candidate: int) -> tuple[Any, dict[str, Any]]:
    """Scores the candidate and the published version; returns (GateResult, details)."""
    from pipelines.index import reindex_plan as R

    g = cfg.gate
    metric = f"MRR@{g.k}"
    try:
        cand = evaluate_version(table, candidate, _checkpoint_uri(cfg.model.checkpoint), tables, g.split,
                                g.k, g.max_queries)
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
    pub = evaluate_version(table, state.published, ckpt, tables, g.split, g.k, g.max_queries)
    result = R.gate_decision(cand["metrics"][metric], pub["metrics"][metric], g.tolerance, metric)
    return result, {"candidate_eval": cand, "published_eval": pub}


# ---------------------------------------------------------------------------------------
# Finishing a run: indexes, the recorded version, the gate and the tag
# ---------------------------------------------------------------------------------------


def _finish(cfg: ReindexConfig, table: Any, tables: Tables, facts: dict[str, Any], to_version: int,
            changed: bool, summary: dict[str, Any], ann_for: Any) -> dict[str, Any]:
    """Indexes, the recorded source version, then the gate (new model) and the tag.

    When documents failed to embed, the version is still published (with the changes that
    did go in) but the source version is not advanced, so the next run retries them.
    """
    _index_and_record(cfg, table, facts, to_version, changed, summary, ann_for)
    summary["index_stats"] = table.index_stats()
    state = table_state(table)
    summary["rows"] = table.count_rows()
    if state.published == state.head:
        summary.update(noop=not changed, published_version=state.published, promoted=False)
        return summary
    return _publish(cfg, table, tables, facts["model_id"], to_version, state, summary)


def _index_and_record(cfg: ReindexConfig, table: Any, facts: dict[str, Any], to_version: int, changed: bool,
                      summary: dict[str, Any], ann_for: Any) -> None:
    """Builds the indexes when anything changed, then records the source version: the
    commit point, only now does the table say it holds ``to_version``."""
    from pipelines.store import lance_tables as L

    record = {L.META_SOURCE_VERSION: str(to_version)} if not summary.get("failed") else {}
    checkpoint = _checkpoint_uri(cfg.model.checkpoint)
    rows = table.count_rows()
    state = table_state(table)
    needs_work = changed or state.published != state.head or (rows and not table.index_names())
    if not needs_work:
        return
    if not cfg.index.enabled:
        table.update_metadata({**record, L.META_CHECKPOINT: checkpoint})
        return
    previous = L.plan_from_json(table.metadata().get(L.META_INDEX_PLAN))
    wanted = None if cfg.index.ann == "none" else L.plan_ann_index(rows, facts["dim"], cfg.index.ann,
                                                                  cfg.index.min_rows_for_ann)
    ann = ann_for(previous, wanted)
    t_idx = time.perf_counter()
    with _step(summary, "index"):
        summary["indexes"] = table.build_indexes(ann, previous)
    summary["index_seconds"] = round(time.perf_counter() - t_idx, 2)
    summary["ann_plan"] = ann.to_json() if ann else None
    _crash(cfg, "indexed")
    table.update_metadata({**record, L.META_INDEX_PLAN: ann.to_json() if ann else None,
                           L.META_CHECKPOINT: checkpoint})
    _crash(cfg, "recorded")


def _publish(cfg: ReindexConfig, table: Any, tables: Tables, mid: str, to_version: int, state: TableState,
             summary: dict[str, Any]) -> dict[str, Any]:
    """Tags the head and moves ``published`` to it — through the gate for a new model's
    candidate; a refused candidate is tagged ``candidate-<model_id>`` and the published
    version restored as the head."""
    tag = cfg.output.tag or f"src{to_version}-{mid}"
    if state.published is None or state.published_model == mid:
        summary.update(noop=False, published_version=table.publish(tag), tag=tag, promoted=True)
        return summary
    result, details = run_gate(cfg, table, tables, state, state.head)
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


# ---------------------------------------------------------------------------------------
# Same model: the change set
# ---------------------------------------------------------------------------------------


def run_incremental(cfg: ReindexConfig, facts: dict[str, Any], table: Any, tables: Tables, to_version: int,
                    res: dict[str, Any], summary: dict[str, Any], ray: RayAccess | None = None) -> dict[str, Any]:
    """Same model: apply the change set since the table's recorded version."""
    from pipelines.index import embed as E
    from pipelines.index import reindex_plan as R

    with _step(summary, "plan"):
        plan, changes = _plan(cfg, table, tables, to_version, summary, ray or CurrentRay())
    _crash(cfg, "planned")
    version_before = table.version()
    with _step(summary, "delete"):
        summary["deleted"] = table.delete_doc_ids(plan.stale) if plan.stale else 0
    _crash(cfg, "deleted")
    stream = E.StreamResult()
    if len(plan.to_embed):
        lds = table.dataset()
        target = _Target(table.uri, lds.schema, lds.data_storage_version, table.commit_fragments,
                         cfg.write.commit_every_rows)
        how = embed_route(len(plan.to_embed), cfg, res)
        rows = None
        if how != "ray-read":
            with _step(summary, "read"):
                rows, summary["rows_from"] = R.changed_documents(tables, changes, plan.to_embed,
                                                                 list(E.SOURCE_COLUMNS))
        summary["embed_route"] = how
        with _step(summary, "embed"):
            stream = _embed(cfg, facts, res, ray or CurrentRay(), tables, to_version, target,
                            plan.to_embed, len(plan.to_embed), rows=rows, in_process=how == "in-process")
    summary.update(embedded=stream.rows, commits=stream.commits, failed=len(stream.failed),
                   failures=stream.failed[:100], embed_seconds=stream.seconds)
    _crash(cfg, "committed")
    with _step(summary, "check"):
        _check_rows(table, tables, to_version, len(stream.failed), plan)
    changed = table.version() != version_before or summary["from_version"] != to_version
    return _finish(cfg, table, tables, facts, to_version, changed, summary,
                   lambda trained, wanted: R.ann_to_build(trained, wanted, cfg.index.max_drift))


def _change_set(cfg: ReindexConfig, table: Any, tables: Tables, from_version: int | None,
                to_version: int, ray: RayAccess) -> tuple[Any, Any]:
    """The change set from the recorded version: the feed, or a full diff when the feed
    cannot cover the range. Returns (changes, the table's keys when the diff read them)."""
    from pipelines.index import embed as E
    from pipelines.index import reindex_plan as R

    if from_version is not None and from_version == to_version:
        return R.no_changes(to_version), None
    reason = ""
    if from_version is None:
        reason = "the table records no source version"
    elif to_version < from_version:
        reason = f"Delta version {to_version} is older than the table's {from_version}"
    elif cfg.changes.method == "diff":
        reason = "changes.method=diff"
    else:
        try:
            return R.collapse_changes(R.read_change_feed(tables, from_version, to_version),
                                      from_version, to_version), None
        except R.ChangeFeedUnavailable as e:
            reason = f"the change data feed does not cover versions {from_version + 1}..{to_version} ({e})"
            logger.warning("%s: falling back to a full diff by content_sha256", reason)
    rows = delta_row_count(tables, to_version) + table.count_rows()
    if rows >= cfg.plan.distributed_min_rows:  # hash-partitioned on Ray: the driver gets the change set only
        from pipelines.index import keydiff as K

        ray.start()
        upserts, deletes, _ = K.diff_changes(tables, to_version, table.uri, K.partitions_for(rows, cfg.plan.partitions))
        return R.ChangeSet(from_version=from_version, to_version=to_version, method="diff", upserts=upserts,
                           deletes=deletes, reason=reason), None
    table_keys = table.keys()
    changes = R.diff_changes(E.source_keys(tables, to_version), table_keys,
                             from_version, to_version, reason=reason)
    return changes, table_keys


def _plan(cfg: ReindexConfig, table: Any, tables: Tables, to_version: int,
          summary: dict[str, Any], ray: RayAccess) -> tuple[Any, Any]:
    """The change set since the table's recorded version and the plan against its rows now."""
    import pyarrow as pa

    from pipelines.index import reindex_plan as R
    from pipelines.store import lance_tables as L

    recorded = table.metadata().get(L.META_SOURCE_VERSION)
    from_version = int(recorded) if recorded is not None else None
    summary["from_version"] = from_version
    changes, table_keys = _change_set(cfg, table, tables, from_version, to_version, ray)
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


def _check_rows(table: Any, tables: Tables, version: int, failed: int, plan: Any) -> None:
    """One row per document of the version: counted from Delta's file statistics, and no
    changed document twice (checked for the changed ids only, so the cost follows the change)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipelines.index import reindex_plan as R

    expected = delta_row_count(tables, version) - failed
    rows = table.count_rows()
    ids = pa.concat_arrays([plan.changes.upserts["doc_id"].combine_chunks(), plan.changes.deletes])
    keys = R.table_keys_for(table.dataset(), ids)
    distinct = pc.count_distinct(keys["doc_id"]).as_py() if keys.num_rows else 0
    if rows != expected or distinct != keys.num_rows:
        raise ReindexError(
            f"table {table.name} has {rows} rows ({keys.num_rows - distinct} duplicated among the changed "
            f"documents), expected {expected} for corpus/documents@{version}: not publishing this version; "
            "re-run `ciea reindex` to repair it (or `--set changes.method=diff` for a full diff)")


# ---------------------------------------------------------------------------------------
# Another model: the gated rebuild
# ---------------------------------------------------------------------------------------


def run_rebuild(cfg: ReindexConfig, facts: dict[str, Any], table: Any, tables: Tables, to_version: int,
                res: dict[str, Any], summary: dict[str, Any], ray: RayAccess | None = None) -> dict[str, Any]:
    """A new model: every document embedded into one Overwrite commit, then the gate."""
    from pipelines.store import lance_tables as L

    mid, dim, grid = facts["model_id"], facts["dim"], facts.get("patch_grid")
    schema = L.table_schema(dim, grid[0] * grid[1] if grid else None)
    base = table.dataset()
    total = delta_row_count(tables, to_version)
    summary.update(method="rebuild", from_version=None, to_embed=total)
    logger.info("model_id %s is not the table's (%s): full rebuild of %d documents into a new version, then the "
                "publish gate", mid, base.metadata.get(L.META_MODEL_ID), total)

    def overwrite(fragments: list[Any]) -> int:
        # One commit replaces every row: readers of older versions keep the old model.
        return table.commit_overwrite(schema, fragments, read_version=base.version)

    target = _Target(table.uri, schema, base.data_storage_version, overwrite)
    stream = _embed(cfg, facts, res, ray or CurrentRay(), tables, to_version, target, None, total)
    if stream.commits == 0:  # an empty corpus still replaces the old model's rows
        overwrite([])
    summary.update(embedded=stream.rows, commits=max(stream.commits, 1), failed=len(stream.failed),
                   failures=stream.failed[:100], embed_seconds=stream.seconds, deleted=0)
    _crash(cfg, "rebuilt")
    table.update_metadata({L.META_MODEL_ID: mid, L.META_DIM: str(dim),
                           L.META_SOURCE_VERSION: None if stream.failed else str(to_version),
                           L.META_CHECKPOINT: _checkpoint_uri(cfg.model.checkpoint), L.META_INDEX_PLAN: None,
                           L.META_PATCH_GRID: f"{grid[0]}x{grid[1]}" if grid else None})
    expected = total - len(stream.failed)
    if table.count_rows() != expected:
        raise ReindexError(f"rebuild wrote {table.count_rows()} rows, expected {expected}: not publishing; re-run")
    return _finish(cfg, table, tables, facts, to_version, True, summary, lambda trained, wanted: wanted)


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


def run(cfg: ReindexConfig, facts: dict[str, Any], ray: RayAccess | None = None,
        tables: Tables | None = None) -> dict[str, Any]:
    """One re-index run; returns the summary.

    Like ``ciea embed``, the run holds the table's lease (:mod:`pipelines.store.lease`)
    from before its first write to the end and fences its commits, so it never writes
    beside another run.

    Args:
        cfg: the validated settings (``model.checkpoint`` set).
        facts: ``pipelines.index.build.load_model_facts`` of the checkpoint.
        ray: how to reach Ray, asked only when a step needs it (default: the Ray this
            process already runs); a small change set embedded in-process never asks.
        tables: the Delta handle of ``cfg.input`` (default: made here from it).

    Raises:
        ReindexError / EmbedError / ModelMismatchError / SearchError: the inputs or the
            table's state, with the fix.
        SetupError: the encoder's settings do not fit the cluster.
        WriterConflict: another run writes the table (its lease, or its commits), with the fix.
        SimulatedCrash: the ``fault.crash_at`` drill.
    """
    from pipelines.index import embed as E
    from pipelines.store import lance_tables as L
    from pipelines.store.lease import TableLease

    t0 = time.perf_counter()
    ray = ray or CurrentRay()
    tables = tables or cfg.tables()
    to_version = E.resolve_source(tables, cfg.input.version)
    table = L.VectorTable(cfg.db_uri, cfg.output.table, tables.storage_options)
    if not table.exists():
        raise ReindexError(f"no table {cfg.output.table!r} in {cfg.db_uri}: build it first with `ciea embed "
                           f"--checkpoint {cfg.model.checkpoint} --table {cfg.output.table}`")
    res = resolve_resources(cfg, ray.resources())
    summary: dict[str, Any] = {"model_id": facts["model_id"], "variant": facts["variant"], "dim": facts["dim"],
                               "documents_uri": tables.documents, "to_version": to_version,
                               "table": f"{cfg.db_uri}/{cfg.output.table}", "resources": res}
    with TableLease(cfg.db_uri, cfg.output.table, "ciea reindex", tables.storage_options) as lease:
        state = _discard_unpublished(table, facts["model_id"], summary)
        table.fence_writes(lease.run_id, lease.check)  # what follows plans against this version
        if state.head_model == facts["model_id"] and (state.rows_model in (None, facts["model_id"])):
            summary = run_incremental(cfg, facts, table, tables, to_version, res, summary, ray)
        else:
            summary = run_rebuild(cfg, facts, table, tables, to_version, res, summary, ray)
        summary["table_version"] = table.version()
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def _discard_unpublished(table: Any, mid: str, summary: dict[str, Any]) -> TableState:
    """Restores the published version over a head no reader should build on: the rows of a
    rebuild that died before its metadata, or another model's unpublished candidate when
    this checkpoint's model is the published one. Returns the table's state after."""
    state = table_state(table)
    if state.rows_model is not None and state.rows_model != state.head_model and state.published is not None:
        logger.warning("the head version %d holds rows of model_id %s but says %s (an interrupted rebuild): "
                       "restoring the published version %d", state.head, state.rows_model, state.head_model,
                       state.published)
        summary["restored"] = restore_version(table, state.published)
        state = table_state(table)
    if state.head_model != mid and state.published_model == mid:
        logger.warning("discarding the unpublished version %d of model_id %s: restoring the published version %d "
                       "of this checkpoint's model", state.head, state.head_model, state.published)
        summary["restored"] = restore_version(table, state.published)
        state = table_state(table)
    return state
