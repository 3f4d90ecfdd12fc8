"""Wiring of the ingest stages: Ray Data read → validate, then the driver-side commit.

``build_dataset`` is the parallel part: the source's shards become a Ray Dataset, each shard
is read and validated by one task on a worker (``read_and_validate``; a reader yields
``BATCH_ROWS``-row tables, so validation works batch by batch). The driver
consumes the validated stream in source order (``preserve_order``) and never holds more
than a few blocks of it:

1. ``ok`` rows pass the duplicate rule and stream, as they arrive, into one Delta commit on
   ``corpus/documents`` (deltalake pulls them through an Arrow stream): a ``MERGE``, or an
   append when the table has no rows yet (``delta_tables.write_documents``);
2. quarantined rows are spilled to a local Parquet file, merged into ``corpus/quarantine``
   after the documents and queries are committed (they are small: an excerpt, not the
   content).

Duplicate rule: within one ingest the first record of a ``doc_id`` in source order (file
order, then byte offset / row within the file) wins; every later record with that doc_id
is quarantined at stage ``dedupe`` with reason ``duplicate_doc_id``, whether or not its
content is identical. The driver keeps the set of accepted doc_ids for this (about 100 bytes
per document, never the content).

:func:`run` is ``ciea ingest``'s run on a typed :class:`~pipelines.ingest.config.IngestConfig`
(:func:`make_source` builds and plans its source first). It never starts Ray: the caller
has (the job, a test, a benchmark).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.ingest.config import IngestConfig
from pipelines.ingest.dedupe import AdaptiveIds, LocalIds, ShardedIds, shards_for
from pipelines.ingest.sources import (
    EDISSource,
    FolderSource,
    ManifestSource,
    SyntheticSource,
    UrlSource,
    WebDatasetSource,
    WebQASource,
)
from pipelines.ingest.sources.base import GRADE_MAX, GRADE_MIN, BadQrel, Query, Source
from pipelines.ingest.sources.beir import BeirQueries
from pipelines.ingest.sources.synthetic.generator import SyntheticConfig
from pipelines.ingest.validation import (
    Limits,
    Rejected,
    content_sha256,
    normalise_image,
    normalise_text,
    quarantine_id,
    validate_batch,
)
from pipelines.store import delta_tables
from pipelines.store import schema as S

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# Ray Data stages (run on workers)
# ---------------------------------------------------------------------------------------


def read_and_validate(batch: pa.Table, source: Source, limits: Limits, image_mode: str,
                      storage_options: dict[str, str]) -> Iterator[pa.Table]:
    """Ray UDF: shard specs (``shard``, ``spec`` JSON) in, ``VALIDATED_SCHEMA`` tables out.

    Reading and validating are one UDF on purpose: as two ``map_batches`` Ray fuses them
    into one operator whose input bundles take the larger batch size, so every one-row
    shard spec would land in the same task — one task for the whole corpus, no parallelism.
    """
    for index, spec in zip(batch["shard"].to_pylist(), batch["spec"].to_pylist()):
        for raw in source.read(index, json.loads(spec)):
            yield validate_batch(raw, limits, image_mode, storage_options)


def build_dataset(source: Source, shards: list[dict[str, Any]], limits: Limits):
    """The validated stream of ``source`` as a lazy Ray Dataset: one task per shard.

    Args:
        source: The source reader (pickled to the workers).
        shards: ``source.plan()``.
        limits: Validation limits.

    Returns:
        A ``ray.data.Dataset`` of ``VALIDATED_SCHEMA`` rows, in source order when iterated
        with ``preserve_order``.
    """
    import ray.data

    items = [{"shard": i, "spec": json.dumps(s)} for i, s in enumerate(shards)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    return ds.map_batches(
        read_and_validate, batch_size=1, batch_format="pyarrow",
        fn_kwargs={"source": source, "limits": limits, "image_mode": source.image_mode,
                   "storage_options": source.storage_options},
    )


# ---------------------------------------------------------------------------------------
# Driver-side commit
# ---------------------------------------------------------------------------------------


@dataclass
class Counts:
    read: int = 0
    accepted: int = 0
    quarantined: int = 0
    by_reason: Counter = field(default_factory=Counter)

    def reject(self, reason: str, n: int = 1) -> None:
        self.quarantined += n
        self.by_reason[reason] += n

    def check(self, what: str) -> None:
        if self.read != self.accepted + self.quarantined:
            raise RuntimeError(  # a bug, never bad input: every record must be accounted for
                f"{what}: read {self.read} != accepted {self.accepted} + quarantined "
                f"{self.quarantined}; records were lost — report this with the run summary")

    def to_dict(self) -> dict[str, Any]:
        return {"read": self.read, "accepted": self.accepted, "quarantined": self.quarantined,
                "quarantined_by_reason": dict(sorted(self.by_reason.items()))}


class QuarantineSpill:
    """Quarantine rows of one run, spilled to a local Parquet file until they are merged."""

    def __init__(self, run_id: str, now: datetime) -> None:
        self.run_id, self.now = run_id, now
        self.dir = Path(tempfile.mkdtemp(prefix="ciea-quarantine-"))
        self.path = self.dir / "quarantine.parquet"
        self.writer: pq.ParquetWriter | None = None
        self.rows = 0

    def add(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        for r in rows:
            r[S.QUARANTINE_ID] = quarantine_id(r[S.SOURCE], r[S.RECORD_REF], r[S.STAGE], r[S.REASON],
                                               r.pop(S.FINGERPRINT, "") or "")
            r[S.RUN_ID] = self.run_id
            r[S.QUARANTINED_AT] = self.now
        table = pa.Table.from_pylist(rows, schema=S.QUARANTINE_SCHEMA)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, S.QUARANTINE_SCHEMA)
        self.writer.write_table(table)
        self.rows += len(rows)

    def reader(self) -> pa.RecordBatchReader | None:
        if self.writer is None:
            return None
        self.writer.close()
        self.writer = None
        pf = pq.ParquetFile(self.path)
        # One quarantine_id once: the same bad record twice in one run (e.g. two identical
        # bad lines at the same ref cannot happen, but a re-listed file could) is one row.
        return pa.RecordBatchReader.from_batches(S.QUARANTINE_SCHEMA, _unique_ids(pf.iter_batches()))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _unique_ids(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    seen: set[str] = set()
    for batch in batches:
        ids = batch.column(S.QUARANTINE_ID).to_pylist()
        keep = [i not in seen and not seen.add(i) for i in ids]  # type: ignore[func-returns-value]
        if all(keep):
            yield batch
        else:
            yield batch.filter(pa.array(keep))


class DocumentStream:
    """Turns the validated stream into accepted documents (a generator for the merge),
    counting every record and spilling the rejected ones."""

    def __init__(self, batches: Iterable[pa.Table], spill: QuarantineSpill, run_id: str,
                 now: datetime, progress: Callable[[int], None] | None = None, seen: Any = None) -> None:
        self.batches, self.spill = batches, spill
        self.run_id, self.now = run_id, now
        self.progress = progress
        self.counts = Counts()
        self.seen = seen if seen is not None else LocalIds()

    def reader(self) -> pa.RecordBatchReader:
        return pa.RecordBatchReader.from_batches(S.DOCUMENTS_SCHEMA, self._documents())

    def _documents(self) -> Iterator[pa.RecordBatch]:
        for table in self.batches:
            out = self._process(table)
            if out is not None and out.num_rows:
                yield from out.to_batches()
            if self.progress is not None:
                self.progress(table.num_rows)

    def _process(self, table: pa.Table) -> pa.Table | None:
        self.counts.read += table.num_rows
        is_ok = pc.equal(table[S.STATUS], S.STATUS_OK)
        rejected = table.filter(pc.invert(is_ok))
        rows = rejected.to_pylist()
        for r in rows:
            self.counts.reject(r[S.REASON])
        ok = table.filter(is_ok)
        ids = ok[S.DOC_ID].to_pylist()
        fresh = self.seen.claim(ids)
        accepted = ok if all(fresh) else ok.filter(pa.array(self._duplicates(ok, ids, fresh, rows), pa.bool_()))
        self.spill.add([{k: r.get(k) for k in (*S.QUARANTINE_SCHEMA.names, S.FINGERPRINT)} for r in rows])
        self.counts.accepted += accepted.num_rows
        if not accepted.num_rows:
            return None
        n = accepted.num_rows
        cols = {name: accepted[name] for name in S.DOCUMENTS_SCHEMA.names
                if name not in (S.RUN_ID, S.INGESTED_AT)}
        cols[S.RUN_ID] = pa.repeat(pa.scalar(self.run_id, pa.string()), n)
        cols[S.INGESTED_AT] = pa.repeat(pa.scalar(self.now, pa.timestamp("us", tz="UTC")), n)
        return pa.table(cols).cast(S.DOCUMENTS_SCHEMA)

    def _duplicates(self, ok: pa.Table, ids: list[str], fresh: list[bool], rows: list[dict[str, Any]]) -> list[bool]:
        """``fresh`` as the keep-mask of ``ok``; the records it drops go to ``rows``."""
        for i, (doc_id, new) in enumerate(zip(ids, fresh)):
            if new:
                continue
            r = ok.slice(i, 1).to_pylist()[0]
            r.update({S.STAGE: S.STAGE_DEDUPE, S.REASON: "duplicate_doc_id",
                      S.DETAIL: f"doc_id {doc_id!r} was already accepted earlier in this ingest "
                                "(first record in source order wins); give the record its own "
                                "id or remove the duplicate",
                      S.EXCERPT: json.dumps({"doc_id": doc_id, "text": (r[S.TEXT] or "")[:80],
                                             "caption": (r[S.CAPTION] or "")[:80]}, ensure_ascii=False),
                      S.FINGERPRINT: r[S.CONTENT_SHA256]})
            rows.append(r)
            self.counts.reject("duplicate_doc_id")
        return fresh


# ---------------------------------------------------------------------------------------
# Queries and qrels (driver, streamed per split)
# ---------------------------------------------------------------------------------------


def validate_query(q: Query, limits: Limits, max_query_chars: int) -> dict[str, Any]:
    """A ``QUERIES_SCHEMA`` row (without run fields), or raises ``Rejected``."""
    if q.error:
        raise Rejected(q.error, q.error_detail or q.error, S.STAGE_READ)
    if q.qid is None or (isinstance(q.qid, str) and not q.qid.strip()):
        raise Rejected("missing_qid", "the query has no id; every query needs a stable qid")
    if isinstance(q.qid, bool) or not isinstance(q.qid, (str, int)):
        raise Rejected("wrong_type", f"qid must be a string or integer, got {type(q.qid).__name__}")
    text = normalise_text(q.query, "query", max_query_chars)
    if text is None:
        raise Rejected("missing_text", "the query text is missing or empty")
    answer = None if q.answer is None else json.dumps(q.answer, ensure_ascii=False, sort_keys=True)
    metadata = json.dumps(q.metadata, ensure_ascii=False, sort_keys=True) if q.metadata else None
    image = None
    if q.image is not None:
        if not isinstance(q.image, (bytes, bytearray, memoryview)):
            raise Rejected("wrong_type", f"the query image must be encoded image bytes, got {type(q.image).__name__}")
        # The corpus's one image rule (caps, a full decode, upright RGB): the picture is
        # stored normalised, exactly as a document's would be.
        image, _, _ = normalise_image(bytes(q.image), limits)
    return {S.QID: str(q.qid), S.QUERY: text, S.ANSWER: answer, S.METADATA: metadata,
            S.CONTENT_SHA256: content_sha256(text, (answer or "") + "\x1f" + (metadata or ""), image),
            S.RECORD_REF: q.record_ref, S.IMAGE: image}


def ingest_queries(source: Source, split: str, tables: delta_tables.Tables, limits: Limits,
                   max_query_chars: int, spill: QuarantineSpill, run_id: str, now: datetime,
                   known_doc_ids: Any = None) -> dict[str, Any]:
    """Validate, dedupe and merge one split's queries and qrels; returns its summary."""
    counts = Counts()
    rows: list[dict[str, Any]] = []
    bad: list[dict[str, Any]] = []
    seen: set[str] = set()
    for q in source.iter_queries(split):
        counts.read += 1
        try:
            row = validate_query(q, limits, max_query_chars)
            if row[S.QID] in seen:
                raise Rejected("duplicate_qid", f"qid {row[S.QID]!r} already read in this split "
                               "(first wins); give the query its own id", S.STAGE_DEDUPE)
        except Rejected as r:
            counts.reject(r.reason)
            bad.append({S.SOURCE: source.name, S.RECORD_REF: q.record_ref,
                        S.DOC_ID: None, S.STAGE: S.STAGE_QUERY if r.stage == S.STAGE_VALIDATE else r.stage,
                        S.REASON: r.reason, S.DETAIL: r.detail,
                        S.EXCERPT: (q.raw_excerpt or json.dumps({"qid": str(q.qid), "query": str(q.query)[:120]},
                                                                ensure_ascii=False))[:200],
                        S.FINGERPRINT: f"{split}\x1f{q.qid}\x1f{str(q.query)[:1000]}"})
            continue
        seen.add(row[S.QID])
        counts.accepted += 1
        row.update({S.SOURCE: source.name, S.RUN_ID: run_id, S.INGESTED_AT: now})
        rows.append(row)
    counts.check(f"queries/{split}")
    spill.add(bad)
    summary: dict[str, Any] = counts.to_dict()
    metrics = delta_tables.merge_queries(tables, split, pa.Table.from_pylist(rows, schema=S.QUERIES_SCHEMA))
    summary.update(inserted=metrics["num_target_rows_inserted"], updated=metrics["num_target_rows_updated"])
    summary["unchanged"] = counts.accepted - summary["inserted"] - summary["updated"]

    pairs: dict[tuple[str, str], int] = {}
    repeated = 0
    bad_qrels: list[dict[str, Any]] = []
    for item in source.iter_qrels(split):
        if isinstance(item, BadQrel):
            bad_qrels.append({S.SOURCE: source.name, S.RECORD_REF: item.record_ref, S.DOC_ID: None,
                              S.STAGE: S.STAGE_QUERY, S.REASON: item.reason, S.DETAIL: item.detail,
                              S.EXCERPT: (item.excerpt or "")[:200],
                              S.FINGERPRINT: f"{split}\x1fqrel\x1f{item.excerpt}"})
            continue
        qid, doc_id, rel = item
        if isinstance(rel, bool) or not isinstance(rel, int) or not GRADE_MIN <= rel <= GRADE_MAX:
            # Any source's grade lands in an int32 column: one out of range is this row's
            # problem, never an error after the documents are committed.
            bad_qrels.append({S.SOURCE: source.name, S.RECORD_REF: f"qrels/{split}:{qid}:{doc_id}"[:400],
                              S.DOC_ID: None, S.STAGE: S.STAGE_QUERY, S.REASON: "bad_grade",
                              S.DETAIL: f"the grade {rel!r:.40} of query {qid!r:.80}, document {doc_id!r:.80} "
                                        f"is not an integer within int32 ({GRADE_MIN}..{GRADE_MAX})",
                              S.EXCERPT: f"{qid}\t{doc_id}\t{rel!r:.40}"[:200],
                              S.FINGERPRINT: f"{split}\x1fqrel\x1f{qid}\x1f{doc_id}"})
            continue
        if (qid, doc_id) in pairs:
            repeated += 1
            continue
        pairs[(qid, doc_id)] = rel
    spill.add(bad_qrels)
    qrels = pa.table({
        S.QID: [k[0] for k in pairs], S.DOC_ID: [k[1] for k in pairs],
        S.RELEVANCE: pa.array(list(pairs.values()), pa.int32()),
        S.SOURCE: [source.name] * len(pairs), S.RUN_ID: [run_id] * len(pairs),
    }, schema=S.QRELS_SCHEMA)
    qmetrics = delta_tables.merge_qrels(tables, split, qrels)
    summary["qrels"] = {
        "rows": len(pairs), "repeated_pairs_collapsed": repeated, "quarantined": len(bad_qrels),
        "inserted": qmetrics["num_target_rows_inserted"], "updated": qmetrics["num_target_rows_updated"],
        "unknown_qid": sum(1 for k in pairs if k[0] not in seen),
    }
    if known_doc_ids is not None:
        known = known_doc_ids.contains([k[1] for k in pairs]) if pairs else []
        summary["qrels"]["doc_not_in_this_ingest"] = sum(not k for k in known)
    return summary


# ---------------------------------------------------------------------------------------
# The run: a typed config → its source → Delta
# ---------------------------------------------------------------------------------------

#: Crash-test hook, a real SIGKILL of this process at a chosen point:
#: ``documents_after_rows=N`` once N records have streamed into the documents MERGE (mid-run,
#: nothing committed), ``after_documents`` right after the documents commit.
FAILPOINT_ENV = "CIEA_INGEST_FAILPOINT"


def _failpoint(name: str, rows: int | None = None) -> None:
    point = os.environ.get(FAILPOINT_ENV, "")
    if point == name or (rows is not None and point.startswith(f"{name}=") and rows >= int(point.split("=")[1])):
        logger.warning("failpoint %s: killing this process", point)
        os.kill(os.getpid(), signal.SIGKILL)


def make_source(cfg: IngestConfig) -> Source:
    """The reader of ``cfg.source`` (BEIR queries attached when given). Call ``plan()`` on it
    before Ray starts: a missing file or a wrong layout fails there.

    Raises:
        FileNotFoundError, ValueError: the source or its queries folder cannot be read as
            configured (the message names the fix).
    """
    source = _make_source(cfg)
    source.max_line_bytes = int(cfg.source.max_line_mb * (1 << 20))
    if cfg.source.queries_path and cfg.source.queries:
        queries = BeirQueries(cfg.source.queries_path, cfg.storage_options, cfg.source.allow_roots,
                              source.max_line_bytes, max_image_bytes=cfg.limits.max_image_bytes)
        queries.check()
        source.attach_queries(queries)
    return source


def _make_source(cfg: IngestConfig) -> Source:
    s, opts = cfg.source, cfg.storage_options
    shard_bytes = int(s.shard_mb * (1 << 20))
    if s.kind == "synthetic":
        syn = s.synthetic
        return SyntheticSource(
            SyntheticConfig(seed=syn.seed, num_image_docs=syn.num_image_docs, num_text_docs=syn.num_text_docs,
                            num_queries=tuple(syn.num_queries), image_size=syn.image_size,
                            p_caption_states=syn.p_caption_states, complementary_fraction=syn.complementary_fraction,
                            text_query_fraction=syn.text_query_fraction, num_composed=tuple(syn.num_composed),
                            **({"num_collections": syn.num_collections} if syn.num_collections else {})),
            rows_per_shard=s.rows_per_shard, name=s.name, with_queries=s.queries)
    roots = {"allow_roots": s.allow_roots}
    if s.kind == "webqa":
        return WebQASource(s.path, shard_bytes, s.name, opts, with_queries=s.queries, **roots)
    if s.kind == "edis":
        return EDISSource(s.path, s.images_dir, shard_bytes, s.name, opts, s.image_mode, with_queries=s.queries,
                          **roots)
    if s.kind == "manifest":
        return ManifestSource(s.path, shard_bytes, s.name, opts, s.image_mode,
                              fetch=s.fetch.settings() if s.fetch_urls else None, **roots)
    if s.kind == "urls":
        return UrlSource(s.path, s.fetch.settings(), cfg.output.root, s.fetch.shard_kb * 1024, s.name, opts,
                         s.fetch.refetch_failed, **roots)
    if s.kind == "webdataset":
        return WebDatasetSource(s.path, s.shards_per_task, s.name, opts, int(s.max_member_mb * (1 << 20)),
                                max_sample_bytes=int(s.max_sample_mb * (1 << 20)),
                                max_header_bytes=s.max_header_kb << 10, **roots)
    return FolderSource(s.path, s.files_per_shard, s.name, opts, s.image_mode, **roots)


def run(cfg: IngestConfig, source: Source, shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs one ingest of ``source`` (:func:`make_source`) over its planned ``shards``:
    documents, then queries and qrels, then quarantine. Ray must be initialised.

    Returns:
        The run's summary (counts per table; ``read = accepted + quarantined``).
    """
    import ray.data

    now = datetime.now(timezone.utc)
    run_id = f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    tables = cfg.tables()
    spill = QuarantineSpill(run_id, now)
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    # Source order makes the duplicate rule deterministic; tqdm is the progress bar.
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    try:
        return _run(cfg, source, shards, tables, spill)
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
        spill.close()


def _run(cfg: IngestConfig, source: Source, shards: list[dict[str, Any]], tables: delta_tables.Tables,
         spill: QuarantineSpill) -> dict[str, Any]:
    t0 = time.perf_counter()
    run_id, limits = spill.run_id, cfg.limits.limits()
    summary: dict[str, Any] = {"run_id": run_id, "source": source.name, "kind": source.kind,
                               "root": tables.root, "shards": len(shards)}
    seen = accepted_ids(cfg, source)
    try:
        return _run_with(cfg, source, shards, tables, spill, limits, seen, summary, t0)
    finally:
        seen.close()


def accepted_ids(cfg: IngestConfig, source: Source) -> LocalIds | ShardedIds | AdaptiveIds:
    """Where the duplicate rule keeps the accepted ids: Ray actors (hash-partitioned) for a
    source that says it holds ``dedupe.distributed_min_records`` or more; otherwise the
    driver, moving to the actors if the set grows past that (``pipelines.ingest.dedupe``)."""
    records, limit = source.estimated_records(), cfg.dedupe.distributed_min_records
    if records is not None and records >= limit:
        return ShardedIds(shards_for(records, cfg.dedupe.ids_per_shard))
    return AdaptiveIds(limit, shards_for(None, cfg.dedupe.ids_per_shard))


def _run_with(cfg: IngestConfig, source: Source, shards: list[dict[str, Any]], tables: delta_tables.Tables,
              spill: QuarantineSpill, limits: Limits, seen: Any, summary: dict[str, Any],
              t0: float) -> dict[str, Any]:
    run_id, now = spill.run_id, spill.now
    docs = _ingest_documents(cfg, source, shards, tables, spill, limits, seen)
    docs["accepted_ids_in"] = seen.kind
    summary["documents"] = docs
    fetch = source.fetch_report(time.perf_counter() - t0)
    if fetch is not None:
        summary["fetch"] = fetch
    _failpoint("after_documents")

    summary["queries"] = {}
    for split in source.query_splits():
        summary["queries"][split] = ingest_queries(
            source, split, tables, limits, cfg.limits.max_query_chars, spill, run_id, now, seen)

    reader = spill.reader()
    if reader is not None:
        qm = delta_tables.merge_quarantine(tables, reader)
        summary["quarantine"] = {"rows_this_run": spill.rows, "inserted": qm["num_target_rows_inserted"]}
    else:
        tables.ensure(tables.quarantine, delta_tables.S.QUARANTINE_SCHEMA)
        summary["quarantine"] = {"rows_this_run": 0, "inserted": 0}
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def _ingest_documents(cfg: IngestConfig, source: Source, shards: list[dict[str, Any]],
                      tables: delta_tables.Tables, spill: QuarantineSpill,
                      limits: Limits, seen: Any) -> dict[str, Any]:
    """The documents' one commit; returns their summary (``seen`` holds the accepted doc_ids)."""
    from tqdm import tqdm

    bar = tqdm(total=source.estimated_records(), unit="rec", desc=f"ingest {source.name}",
               disable=not cfg.progress, file=sys.stderr)

    def progress(n: int) -> None:
        bar.update(n)
        _failpoint("documents_after_rows", bar.n)

    stream = DocumentStream(_iter_validated(source, shards, limits), spill, spill.run_id, spill.now,
                            progress=progress, seen=seen)
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
    return docs


def _iter_validated(source: Source, shards: list[dict[str, Any]], limits: Limits) -> Iterator[pa.Table]:
    if not shards:
        return
    ds = build_dataset(source, shards, limits)
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield source.observe(table)
