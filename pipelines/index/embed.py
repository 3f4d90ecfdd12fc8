"""Batch embedding stage: a Delta version of ``corpus/documents`` → Ray Data → LanceDB.

The pipeline, streamed end to end (nothing but fragment metadata reaches the driver)::

    read_delta(version)            Ray read tasks, only the columns embedding needs
      → keep(doc_ids to embed)     fused into the read: resume filter (see plan_work)
      → preprocess_batch           decode + transform images (the model's own
                                   ImageTransform), resolve image URIs, JPEG thumbnails:
                                   CPU tasks beside the actors (GPU), or fused into the
                                   encoder actor (CPU, where both share the cores and the
                                   fused form measured cheaper: BENCHMARKS.md)
      → Encoder                    actor pool: checkpoint loaded once per actor; CPU: a set
                                   torch thread count; GPU: one actor per GPU, bf16
                                   autocast, large batches; tokenises with the model's
                                   processor; vectors out as fixed_size_list<float32>[D]
      → write_fragments            CPU tasks: Lance data files (lance_ray.write_fragment)
      → driver                     fragment metadata only → one Lance commit per run
                                   (or every ``commit_every_rows`` for long runs)

:func:`iter_in_process` runs the same stages one after the other in the calling process,
for change sets too small to pay for a Ray Data run (``ciea reindex`` of a few hundred
documents); :func:`build_dataset` also takes rows the caller already read
(``ray.data.from_arrow``) instead of reading the Delta version.

Why tokenisation happens inside the actor, not in the preprocessing tasks: the processor
lays image documents out as one padded batch (special tokens, patch slots, masks) in
``collate_documents``, the same call training uses, so the embedding stage cannot drift
from training. Tokenising a 64-document batch is < 2 % of the actor's time on CPU (the
fast tokenizer); the image decode/resize/normalise, which is not, runs in the tasks.

Resumability (:func:`plan_work`): the work is ``(doc_id, content_sha256)`` pairs of the
Delta version that the table does not hold yet. Rows of documents that changed or left the
corpus are deleted before the new vectors are written, so a document never has two rows,
whatever point an earlier run stopped at: fragments written by a run that died before its
commit are never referenced, and a committed chunk is skipped by the next run.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.store import schema as S
from pipelines.store.documents import image_bytes
from pipelines.store.lance_tables import (
    EMBEDDED_AT,
    MODEL_ID,
    PATCH_WEIGHTS,
    SOURCE_VERSION,
    THUMBNAIL,
    VECTOR,
    table_schema,
)

if TYPE_CHECKING:
    from pipelines.store.delta_tables import Tables

logger = logging.getLogger(__name__)

#: Columns of corpus/documents the stage reads (the image columns only when needed).
SOURCE_COLUMNS = (S.DOC_ID, S.MODALITY, S.TEXT, S.CAPTION, S.IMAGE, S.IMAGE_URI, S.METADATA, S.CONTENT_SHA256)
PIXELS = "pixels"
ERROR = "error"
FRAGMENT = "fragment"
ROWS = "rows"

#: What the preprocessing tasks hand to the encoder.
def preprocessed_schema(pixel_size: int) -> pa.Schema:
    return pa.schema([
        pa.field(S.DOC_ID, pa.string()), pa.field(S.MODALITY, pa.string()),
        pa.field(S.TEXT, pa.string()), pa.field(S.CAPTION, pa.string()),
        pa.field(S.CONTENT_SHA256, pa.string()), pa.field(S.METADATA, pa.string()),
        pa.field(PIXELS, pa.list_(pa.float32(), pixel_size)),
        pa.field(THUMBNAIL, pa.binary()), pa.field(ERROR, pa.string()),
    ])


class EmbedError(RuntimeError):
    """A problem with the inputs of the embedding stage, with the fix in the message."""


class InjectedFault(RuntimeError):
    """Raised by the fault-injection hook (tests and drills only)."""


# ---------------------------------------------------------------------------------------
# Source and work plan (driver side: two narrow key columns, never the documents)
# ---------------------------------------------------------------------------------------


def resolve_source(tables: Tables, version: int | None) -> int:
    """The Delta version of ``corpus/documents`` to embed (the latest when ``version`` is None).

    Raises:
        EmbedError: no table there, or no such version, with the fix.
    """
    from pipelines.store.delta_tables import TableNotFoundError

    documents_uri = tables.documents
    try:
        latest = tables.documents_table().version()
    except TableNotFoundError:
        raise EmbedError(
            f"no Delta table at {documents_uri}: run `ciea ingest --root <root>` first, or point "
            "--root at the data root that holds corpus/documents") from None
    if version is None:
        return latest
    if not 0 <= version <= latest:
        raise EmbedError(f"corpus/documents at {documents_uri} has versions 0..{latest}; "
                         f"--version {version} does not exist (omit it for the latest)")
    return version


def source_keys(tables: Tables, version: int) -> pa.Table:
    """``doc_id``, ``content_sha256`` of every document of that version of ``corpus/documents``.

    Raises:
        EmbedError: a doc_id occurs twice (the ingest contract is one row per doc_id).
    """
    documents_uri = tables.documents
    t = tables.dataset(documents_uri, version).to_table(columns=[S.DOC_ID, S.CONTENT_SHA256])
    t = pa.table({S.DOC_ID: S.plain_array(t[S.DOC_ID]), S.CONTENT_SHA256: S.plain_array(t[S.CONTENT_SHA256])})
    if pc.count_distinct(t[S.DOC_ID]).as_py() != t.num_rows:
        raise EmbedError(
            f"{documents_uri}@{version} has repeated doc_ids; corpus/documents must hold one row "
            "per doc_id: re-run `ciea ingest` on that root to repair it")
    return t


def _pair(t: pa.Table) -> pa.ChunkedArray:
    return pc.binary_join_element_wise(t[S.DOC_ID], t[S.CONTENT_SHA256], "\x00")


@dataclass
class WorkPlan:
    """What one run has to do to make the table equal the source version.

    Attributes:
        documents: documents in the source version.
        to_embed: doc_ids to (re-)embed.
        stale: doc_ids whose rows must go first (changed, deleted, or duplicated).
        skipped: documents already embedded with their current content.
    """

    documents: int
    to_embed: pa.Array
    stale: list[str]
    skipped: int
    all_documents: bool = field(default=False)

    @property
    def to_embed_count(self) -> int:
        return len(self.to_embed)

    @property
    def embed_filter(self) -> pa.Array | None:
        """What :func:`build_dataset` keeps (``None``: every document of the version)."""
        return None if self.all_documents else self.to_embed


def plan_work(source: pa.Table, table: pa.Table) -> WorkPlan:
    """Diff of the source's ``(doc_id, content_sha256)`` pairs against the table's.

    A pair already in the table is skipped; a doc_id whose table row has another hash,
    that the source no longer has, or that has more than one row (never written by this
    stage, but repaired all the same) is stale: its rows are deleted and, if still in the
    source, re-embedded.
    """
    if table.num_rows == 0:
        ids = source[S.DOC_ID].combine_chunks()
        return WorkPlan(source.num_rows, ids, [], 0, all_documents=True)
    src_pair, tbl_pair = _pair(source), _pair(table)
    present = pc.is_in(src_pair, value_set=tbl_pair.combine_chunks())
    orphan = pc.invert(pc.is_in(tbl_pair, value_set=src_pair.combine_chunks()))
    stale = set(table.filter(orphan)[S.DOC_ID].to_pylist())
    counts = pc.value_counts(table[S.DOC_ID].combine_chunks())
    # Arrow all the way: a Python dict per distinct id would cost ~330 MiB at 1M rows.
    stale |= set(counts.filter(pc.greater(counts.field("counts"), 1)).field("values").to_pylist())
    stale_arr = pa.array(sorted(stale), pa.string())
    todo = pc.or_(pc.invert(present), pc.is_in(source[S.DOC_ID], value_set=stale_arr))
    ids = source.filter(todo)[S.DOC_ID].combine_chunks()
    return WorkPlan(source.num_rows, ids, sorted(stale), source.num_rows - len(ids),
                    all_documents=len(ids) == source.num_rows)


# ---------------------------------------------------------------------------------------
# Stage UDFs (run in Ray workers; plain functions and one callable class)
# ---------------------------------------------------------------------------------------


def keep_documents(batch: pa.Table, doc_ids: pa.Array) -> pa.Table:
    """The resume filter: rows whose doc_id is in ``doc_ids``."""
    return batch.filter(pc.is_in(S.plain_array(batch[S.DOC_ID]), value_set=doc_ids))


def make_thumbnail(image: Any, max_px: int, quality: int) -> bytes:
    """A JPEG at most ``max_px`` on its long side, for people to look at."""
    from PIL import Image

    im = image if isinstance(image, Image.Image) else Image.open(io.BytesIO(image))
    im = im.convert("RGB")
    im.thumbnail((max_px, max_px))
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=quality, optimize=True)
    return out.getvalue()


def preprocess_batch(
    batch: pa.Table,
    transform: Callable[[Any], Any] | None,
    pixel_size: int,
    thumbnail_px: int,
    thumbnail_quality: int,
    tables: Tables | None = None,
) -> pa.Table:
    """Decodes and transforms the images of a batch (CPU task).

    Args:
        batch: rows of corpus/documents (``SOURCE_COLUMNS``).
        transform: the checkpoint processor's ``ImageTransform`` (``None`` when the
            model reads image documents as captions only, e.g. ``text-only``).
        pixel_size: ``3 * S * S`` of the transform's output.
        thumbnail_px: long side of the thumbnail (0: none).
        thumbnail_quality: JPEG quality of the thumbnail.
        tables: the handle whose storage options read images stored as ``image_uri``
            (default: local files, and object stores with no options).

    Returns:
        ``preprocessed_schema(pixel_size)`` rows, same order; a row whose image cannot be
        read has ``error`` set (it is reported by the job, never dropped silently).
    """
    from PIL import Image

    cols = {name: S.plain_array(batch[name]).to_pylist() if name in batch.column_names else [None] * batch.num_rows
            for name in SOURCE_COLUMNS}
    n = batch.num_rows
    pixels = np.zeros((n, pixel_size), dtype=np.float32)
    has_pixels = np.zeros(n, dtype=bool)
    thumbs: list[bytes | None] = [None] * n
    errors: list[str | None] = [None] * n
    for i in range(n):
        if cols[S.MODALITY][i] != "image":
            continue
        try:
            data = image_bytes(cols[S.IMAGE][i], cols[S.IMAGE_URI][i], tables.storage_options if tables else None)
            im = Image.open(io.BytesIO(data))
            im.load()
            if transform is not None:
                pixels[i] = np.asarray(transform(im), dtype=np.float32).reshape(-1)
                has_pixels[i] = True
            if thumbnail_px:
                thumbs[i] = make_thumbnail(im, thumbnail_px, thumbnail_quality)
        except Exception as e:  # one unreadable image must not stop the run
            errors[i] = f"image: {type(e).__name__}: {e}"
    flat = pa.array(pixels.reshape(-1), pa.float32())
    pix = pa.FixedSizeListArray.from_arrays(flat, pixel_size, mask=pa.array(~has_pixels))
    return pa.table({
        S.DOC_ID: cols[S.DOC_ID], S.MODALITY: cols[S.MODALITY], S.TEXT: cols[S.TEXT],
        S.CAPTION: cols[S.CAPTION], S.CONTENT_SHA256: cols[S.CONTENT_SHA256],
        S.METADATA: cols[S.METADATA], PIXELS: pix, THUMBNAIL: pa.array(thumbs, pa.binary()),
        ERROR: pa.array(errors, pa.string()),
    }, schema=preprocessed_schema(pixel_size))


@dataclass(frozen=True)
class FaultSpec:
    """Fault injection for tests and drills: the encoder fails on its ``at_batch``-th
    call, once per ``marker`` file (created atomically, so once across actors and
    restarts). ``mode``: ``raise`` an exception, or ``exit`` the actor process."""

    at_batch: int
    marker: str
    mode: str = "raise"


class Encoder:
    """The actor-pool UDF: loads the checkpoint once, encodes batches of documents.

    Args:
        checkpoint: checkpoint directory (``ciea_model.save_checkpoint``).
        expected_model_id: the id the driver checked; an actor that loads other weights
            (the directory changed under the job) refuses to run.
        device: ``cpu`` or ``cuda``.
        threads: torch intra-op threads (CPU).
        bf16: autocast to bfloat16 on CUDA.
        source_version: Delta version stamped on every row.
        embedded_at: run timestamp stamped on every row.
        fault: optional :class:`FaultSpec`.
    """

    def __init__(self, checkpoint: str, expected_model_id: str, device: str = "cpu", threads: int = 1,
                 bf16: bool = True, source_version: int = 0, embedded_at: datetime | None = None,
                 fault: FaultSpec | None = None, storage_options: dict[str, str] | None = None) -> None:
        import torch

        from ciea_model import load_checkpoint, model_id
        from pipelines.store.storage import local_folder

        if device == "cpu":
            torch.set_num_threads(threads)
        self.device = device
        # An s3:// checkpoint is copied by each actor onto its own node (then removed).
        with local_folder(checkpoint, storage_options) as local:
            self.model, self.processor = load_checkpoint(local, map_location=device)
        self.model_id = model_id(self.model)
        if self.model_id != expected_model_id:
            raise EmbedError(f"checkpoint {checkpoint} now has model_id {self.model_id}, the job "
                             f"started with {expected_model_id}: it changed during the run; re-run")
        self.dim = self.model.dim
        grid = self.model.patch_grid
        # patch_weights (the extractor's w) is a column wherever the model reads pixels.
        self.patches = grid[0] * grid[1] if grid else None
        self.schema = table_schema(self.dim, self.patches)
        self.bf16 = bf16 and device.startswith("cuda")
        self.source_version = source_version
        self.embedded_at = (embedded_at or datetime.now(timezone.utc)).replace(tzinfo=None)
        self.fault = fault
        self.calls = 0
        side = self.processor.image_transform.size
        self.image_shape = (3, side, side)

    def _maybe_fail(self) -> None:
        if self.fault is None or self.calls != self.fault.at_batch:
            return
        try:
            fd = os.open(self.fault.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        logger.warning("fault injection: encoder %s on batch %d", self.fault.mode, self.calls)
        if self.fault.mode == "exit":
            os._exit(1)
        raise InjectedFault(f"injected encoder fault on batch {self.calls}")

    def encode(self, batch: pa.Table) -> np.ndarray:
        """Rows without errors → (N, D) float32 unit vectors."""
        return self.encode_with_weights(batch)[0]

    def encode_with_weights(self, batch: pa.Table) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows without errors → ((N, D) float32 unit vectors, (N, patches) float32 ``w``
        with NaN rows where a document has none, or ``None`` when no document has)."""
        import torch

        from ciea_model import Document

        docs = []
        pixels = batch[PIXELS].combine_chunks()
        size = pixels.type.list_size
        # .values ignores a slice's offset: take this array's own window of the child.
        child = pixels.values.slice(pixels.offset * size, len(pixels) * size)
        flat = child.to_numpy(zero_copy_only=False).reshape(-1, size) if len(pixels) else None
        if flat is not None and not flat.flags.writeable:
            # A zero-copy view of an Arrow buffer (the in-process path); torch wants to own it.
            flat = flat.copy()
        valid = pixels.is_valid().to_numpy(zero_copy_only=False)
        if size != int(np.prod(self.image_shape)):  # a model that reads no pixels (text-only)
            valid[:] = False
        for i, (doc_id, modality, text, caption) in enumerate(zip(
                batch[S.DOC_ID].to_pylist(), batch[S.MODALITY].to_pylist(),
                batch[S.TEXT].to_pylist(), batch[S.CAPTION].to_pylist())):
            image = None
            if modality == "image":
                # text-only models read image documents as captions: any placeholder works.
                image = torch.from_numpy(flat[i].reshape(self.image_shape)) if valid[i] else torch.zeros(1)
            docs.append(Document(doc_id=doc_id, modality=modality, text=text or "",
                                 caption=caption or "", image=image))
        collated = self.processor.collate_documents(docs).to(self.device)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
            out, w = self.model.encode_documents(collated, return_weights=True)
        vectors = out.float().cpu().numpy()
        if w is None or self.patches is None:
            return vectors, None
        weights = np.full((len(docs), self.patches), np.nan, np.float32)
        weights[collated.image_index.cpu().numpy()] = w.float().cpu().numpy()
        return vectors, weights

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.calls += 1
        self._maybe_fail()
        ok = pc.is_null(batch[ERROR]).to_numpy(zero_copy_only=False)
        good = batch.filter(pa.array(ok))
        n = good.num_rows
        vectors, weights = self.encode_with_weights(good) if n else (np.zeros((0, self.dim), np.float32), None)
        vec = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), self.dim)
        extra = {}
        if self.patches is not None:
            if weights is None:
                weights = np.full((n, self.patches), np.nan, np.float32)
            has_w = ~np.isnan(weights).any(axis=1)
            extra[PATCH_WEIGHTS] = pa.FixedSizeListArray.from_arrays(
                pa.array(np.nan_to_num(weights).reshape(-1), pa.float32()), self.patches,
                mask=pa.array(~has_w))
        out = pa.table({
            S.DOC_ID: good[S.DOC_ID], VECTOR: vec, S.MODALITY: good[S.MODALITY], S.TEXT: good[S.TEXT],
            S.CAPTION: good[S.CAPTION], THUMBNAIL: good[THUMBNAIL],
            S.CONTENT_SHA256: good[S.CONTENT_SHA256],
            MODEL_ID: pa.array([self.model_id] * n, pa.string()),
            SOURCE_VERSION: pa.array([self.source_version] * n, pa.int64()),
            EMBEDDED_AT: pa.array([self.embedded_at] * n, pa.timestamp("us")),
            S.METADATA: good[S.METADATA], **extra,
        }, schema=self.schema)
        failed = batch.filter(pa.array(~ok))
        if failed.num_rows:
            # Carried to the writer as rows with a null vector and the error: reported, not lost.
            out = out.append_column(ERROR, pa.nulls(n, pa.string()))
            bad = {name: pa.nulls(failed.num_rows, f.type) for name, f in zip(self.schema.names, self.schema)}
            bad[S.DOC_ID] = failed[S.DOC_ID].combine_chunks()
            bad[ERROR] = failed[ERROR].combine_chunks()
            return pa.concat_tables([out, pa.table(bad)])
        return out.append_column(ERROR, pa.nulls(n, pa.string()))


def write_fragments(batch: pa.Table, uri: str, schema: pa.Schema, data_storage_version: str | None,
                    storage_options: dict[str, str] | None = None) -> pa.Table:
    """Writes the batch's rows as Lance fragment files (CPU task, no commit).

    Returns:
        One row per fragment (``fragment`` = its metadata as JSON, ``rows``) and one per
        failed document (``doc_id``, ``error``).
    """
    from lance_ray.fragment import write_fragment

    if batch[ERROR].null_count == batch.num_rows:  # the usual case: no copy of the vectors
        good, bad = batch.drop_columns([ERROR]), batch.slice(0, 0)
    else:
        ok = pc.is_null(batch[ERROR])
        good, bad = batch.filter(ok).drop_columns([ERROR]), batch.filter(pc.invert(ok))
    if not good.schema.equals(schema):
        # A table made before a column existed (patch_weights) keeps its own columns.
        good = good.select(schema.names).cast(schema)
    frags = write_fragment([good], uri, schema=schema, data_storage_version=data_storage_version,
                           storage_options=storage_options or None) if good.num_rows else []
    n_f, n_b = len(frags), bad.num_rows
    return pa.table({
        FRAGMENT: pa.array([json.dumps(f.to_json()) for f, _ in frags] + [None] * n_b, pa.string()),
        ROWS: pa.array([f.physical_rows for f, _ in frags] + [0] * n_b, pa.int64()),
        S.DOC_ID: pa.array([None] * n_f + bad[S.DOC_ID].to_pylist(), pa.string()),
        ERROR: pa.array([None] * n_f + bad[ERROR].to_pylist(), pa.string()),
    })


# ---------------------------------------------------------------------------------------
# Wiring
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineSpec:
    """Everything the Ray Data pipeline needs (resolved by the job)."""

    tables: Tables
    source_version: int
    checkpoint: str
    model_id: str
    dim: int
    transform: Any  # ImageTransform or None
    image_side: int
    lance_uri: str
    lance_schema: pa.Schema
    data_storage_version: str | None
    device: str = "cpu"
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    threads: int = 1
    bf16: bool = True
    batch_size: int = 64
    preprocess_rows: int = 256
    rows_per_fragment: int = 16384
    thumbnail_px: int = 64
    thumbnail_quality: int = 75
    read_blocks: int | None = None
    preprocess_in_tasks: bool = True
    join_partitions: int = 2
    embedded_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    fault: FaultSpec | None = None


def _preprocess_memory(rows: int, pixel_size: int) -> int:
    """Bytes a preprocessing task holds: float32 pixels in and out, plus the worker itself
    (torch + PIL imported: ~430 MiB RSS measured, Ray Data warns below that)."""
    return 2 * rows * pixel_size * 4 + (512 << 20)


def build_dataset(spec: PipelineSpec, doc_ids: Any, rows: pa.Table | None = None):
    """The lazy Ray dataset whose rows are fragment metadata (and failed documents).

    Args:
        spec: the resolved pipeline settings.
        doc_ids: keep only these documents (``None``: all of the version): an Arrow array
            (the driver's plan; each read task filters by it), or a Ray Dataset with a
            ``doc_id`` column (the Ray plan, ``keydiff``; a semi-join, hash-partitioned,
            so no process holds the whole set).
        rows: the documents themselves (``SOURCE_COLUMNS``), already read by the caller —
            a re-index hands over the few changed rows instead of having Ray read the
            whole version to keep 1 % of it. ``doc_ids`` is then ignored.
    """
    import ray.data

    if rows is not None:
        # Blocks of a preprocessing batch each, so several actors can share the work.
        step = max(1, spec.preprocess_rows)
        ds = ray.data.from_arrow([rows.slice(i, step) for i in range(0, rows.num_rows, step)] or [rows])
    else:
        ds = spec.tables.ray_dataset(spec.tables.documents, spec.source_version, columns=list(SOURCE_COLUMNS),
                                     override_num_blocks=spec.read_blocks)
    if doc_ids is not None and rows is None:
        if isinstance(doc_ids, (pa.Array, pa.ChunkedArray)):
            ds = ds.map_batches(keep_documents, fn_kwargs={"doc_ids": doc_ids}, batch_format="pyarrow",
                                batch_size=None)
        else:
            ds = ds.map_batches(S.plain_types, batch_format="pyarrow", batch_size=None).join(
                doc_ids, join_type="left_semi", num_partitions=spec.join_partitions, on=(S.DOC_ID,))
    pixel_size = 3 * spec.image_side * spec.image_side
    # Left alone, Ray Data fuses this task stage into the encoder actor (equal remote
    # args), which serialises decoding with encoding inside the actor. Declaring the
    # tasks' memory (which they do use: decoded pixels) makes the args differ and keeps
    # decoding in tasks beside the actors (PipelineSpec.preprocess_in_tasks).
    # Fused (CPU), the other way round: Ray Data fuses a task stage into an actor stage
    # only when their resource arguments are equal, so the tasks ask for exactly what an
    # encoder actor holds (fractional on 2 CPUs, where each actor has half a CPU).
    if spec.preprocess_in_tasks:
        placement = {"memory": _preprocess_memory(spec.preprocess_rows, pixel_size)}
    else:
        placement = {"num_cpus": spec.cpus_per_actor}
    ds = ds.map_batches(
        preprocess_batch, batch_format="pyarrow", batch_size=spec.preprocess_rows, **placement,
        fn_kwargs={"transform": spec.transform, "pixel_size": pixel_size, "thumbnail_px": spec.thumbnail_px,
                   "thumbnail_quality": spec.thumbnail_quality, "tables": spec.tables})
    ds = ds.map_batches(
        Encoder, batch_format="pyarrow", batch_size=spec.batch_size,
        compute=ray.data.ActorPoolStrategy(size=spec.actors),
        num_cpus=spec.cpus_per_actor, num_gpus=spec.gpus_per_actor or None,
        fn_constructor_kwargs={
            "checkpoint": spec.checkpoint, "expected_model_id": spec.model_id, "device": spec.device,
            "threads": spec.threads, "bf16": spec.bf16, "source_version": spec.source_version,
            "embedded_at": spec.embedded_at, "fault": spec.fault, "storage_options": spec.tables.storage_options})
    return ds.map_batches(
        write_fragments, batch_format="pyarrow", batch_size=spec.rows_per_fragment,
        fn_kwargs={"uri": spec.lance_uri, "schema": spec.lance_schema,
                   "data_storage_version": spec.data_storage_version,
                   "storage_options": spec.tables.storage_options})


def iter_in_process(spec: PipelineSpec, rows: pa.Table) -> Iterator[pa.Table]:
    """The same stages as :func:`build_dataset`, run one after the other in this process.

    For change sets too small to pay for a Ray Data run: that costs an encoder actor's
    start-up (torch import, checkpoint load) and the planning of the read, several
    seconds, where embedding a few hundred documents takes a fraction of that. The same
    :func:`preprocess_batch`, :class:`Encoder` and :func:`write_fragments` run here, so
    the rows written are the same; hand the result to :func:`stream_to_table`, which
    commits the fragments as it does for the Ray pipeline.

    Args:
        spec: the resolved pipeline settings (``device`` must be usable in this process;
            ``threads`` sets torch's thread count for the run, restored afterwards).
        rows: the documents to embed (``SOURCE_COLUMNS``).

    Yields:
        :func:`write_fragments` outputs: fragment metadata and failed documents.
    """
    import torch

    threads = torch.get_num_threads()
    encoder = Encoder(spec.checkpoint, spec.model_id, device=spec.device, threads=spec.threads, bf16=spec.bf16,
                      source_version=spec.source_version, embedded_at=spec.embedded_at, fault=spec.fault,
                      storage_options=spec.tables.storage_options)
    pixel_size = 3 * spec.image_side * spec.image_side
    pending: list[pa.Table] = []
    pending_rows = 0

    def write() -> pa.Table:
        nonlocal pending, pending_rows
        out = write_fragments(pa.concat_tables(pending), spec.lance_uri, spec.lance_schema,
                              spec.data_storage_version, spec.tables.storage_options)
        pending, pending_rows = [], 0
        return out

    try:
        for start in range(0, rows.num_rows, spec.preprocess_rows):
            pre = preprocess_batch(rows.slice(start, spec.preprocess_rows), spec.transform, pixel_size,
                                   spec.thumbnail_px, spec.thumbnail_quality, spec.tables)
            for b in range(0, pre.num_rows, spec.batch_size):
                encoded = encoder(pre.slice(b, spec.batch_size))
                pending.append(encoded)
                pending_rows += encoded.num_rows
                if pending_rows >= spec.rows_per_fragment:
                    yield write()
        if pending:
            yield write()
    finally:
        torch.set_num_threads(threads)


@dataclass
class StreamResult:
    """What :func:`stream_to_table` committed."""

    rows: int = 0
    fragments: int = 0
    commits: int = 0
    versions: list[int] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def stream_to_table(
    ds: Any,
    commit: Callable[[list[Any]], int],
    commit_every_rows: int | None = None,
    on_rows: Callable[[int], None] | None = None,
    after_commit: Callable[[int], None] | None = None,
) -> StreamResult:
    """Runs the pipeline and commits the fragments its workers wrote.

    Only fragment metadata (JSON, a few hundred bytes each) crosses to the driver. All of a
    run's fragments go into one commit, or one per ``commit_every_rows`` rows when set
    (long runs: a crash then loses at most that many rows of work).

    Args:
        ds: the dataset from :func:`build_dataset`, or the same rows from
            :func:`iter_in_process` (Arrow tables, no Ray).
        commit: appends fragments in one commit, returns the new table version.
        commit_every_rows: commit as soon as this many rows are pending.
        on_rows: progress callback with each fragment's row count (and failures as 1).
        after_commit: called with the number of commits so far (crash drills).
    """
    from lance.fragment import FragmentMetadata

    t0 = time.perf_counter()
    res = StreamResult()
    pending: list[Any] = []
    pending_rows = 0

    def flush() -> None:
        nonlocal pending, pending_rows
        if not pending:
            return
        res.versions.append(commit(pending))
        res.commits += 1
        res.rows += pending_rows
        res.fragments += len(pending)
        logger.info("committed %d fragments (%d rows) as version %d", len(pending), pending_rows,
                    res.versions[-1])
        pending, pending_rows = [], 0
        if after_commit is not None:
            after_commit(res.commits)

    batches = ds.iter_batches(batch_size=None, batch_format="pyarrow") if hasattr(ds, "iter_batches") else ds
    for batch in batches:
        for row in batch.to_pylist():
            if row[FRAGMENT] is not None:
                frag = FragmentMetadata.from_json(row[FRAGMENT])
                pending.append(frag)
                pending_rows += row[ROWS]
                if on_rows is not None:
                    on_rows(row[ROWS])
            else:
                res.failed.append({S.DOC_ID: row[S.DOC_ID], ERROR: row[ERROR]})
                logger.error("document %s not embedded: %s", row[S.DOC_ID], row[ERROR])
                if on_rows is not None:
                    on_rows(1)
        if commit_every_rows and pending_rows >= commit_every_rows:
            flush()
    flush()
    res.seconds = round(time.perf_counter() - t0, 3)
    return res
