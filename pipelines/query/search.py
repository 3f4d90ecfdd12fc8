"""Search over a published LanceDB vector table: vector, full-text (BM25) and hybrid.

A :class:`Searcher` pins one table version for its whole life — by default the version the
``published`` tag points at, which ``ciea embed`` / ``ciea reindex`` move only after the
indexes are built — so a reader never sees a half-written re-index, however long it lives
while a writer works. It loads the checkpoint that made the table's vectors (recorded in
the table metadata as ``ciea.checkpoint``; its ``model_id`` must equal the table's) and
encodes text queries with ``ciea_model.inference.encode_queries``, the same code path as
evaluation, so query vectors cannot drift from the ones the model was scored with.

Modes:

* ``vector`` — cosine similarity (the vectors are L2-normalised and the ANN index is built
  with ``distance_type="cosine"``). With an ANN index, ``nprobes`` / ``refine_factor``
  default to the values stored with the index plan (``ciea.index_plan``); without one the
  search is exact (a flat scan), which the index rule chooses while it is as fast.
  ``score`` = cosine similarity, 1 for the query vector itself.
* ``fts`` — BM25 over the full-text indexes on ``text`` and ``caption``, together.
  ``score`` = the BM25 score.
* ``hybrid`` — reciprocal-rank fusion (Cormack et al. 2009) of the two lists:
  ``score(d) = sum over lists of 1 / (rrf_k + rank(d))`` with 1-based ranks and
  ``rrf_k = 60``, over the top ``candidates`` of each list (:func:`reciprocal_rank_fusion`).
  Ranks, not scores, are fused because BM25 and cosine scores live on unrelated scales.

Filters are structured (:class:`Filter`), never SQL text: column names are checked against
the table schema, values against the column types, and a string value that could end or
extend an SQL literal (quotes, ``;``, ``--``, backslashes, control characters) is refused
with a :class:`FilterError` that names the fix, before anything reaches the query engine.
Values are quoted all the same.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.store import storage
from pipelines.store.images import ImageRejected, normalise_image
from pipelines.store.lance_tables import (
    ANN_INDEX,
    FTS_COLUMNS,
    META_CHECKPOINT,
    META_DIM,
    META_INDEX_PLAN,
    META_MODEL_ID,
    PATCH_WEIGHTS,
    PUBLISHED_TAG,
    THUMBNAIL,
    VECTOR,
    AnnPlan,
    VectorTable,
    plan_from_json,
)
from pipelines.store.schema import CAPTION, DOC_ID, METADATA, MODALITIES, MODALITY, TEXT

logger = logging.getLogger(__name__)

Mode = Literal["vector", "fts", "hybrid"]
MODES: tuple[str, ...] = ("vector", "fts", "hybrid")
Scalar = str | int | float | bool

#: The RRF constant of Cormack et al. (2009); larger values flatten the rank weights.
RRF_K = 60
#: Candidates taken from each list before fusion (at least ``k``).
HYBRID_CANDIDATES = 50
#: Largest ``k`` one query may ask for (a guard against accidental full scans into memory).
MAX_K = 10_000
#: Filter limits: a string value's length, and values in one ``IN`` list.
MAX_VALUE_CHARS = 512
MAX_IN_VALUES = 10_000

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Characters and sequences that could close or extend an SQL string literal or statement.
_UNSAFE = (("'", "a single quote"), ('"', "a double quote"), ("`", "a backtick"), (";", "a semicolon"),
           ("\\", "a backslash"), ("--", "an SQL comment (--)"), ("/*", "an SQL comment (/*)"))
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class SearchError(ValueError):
    """A search that cannot run as asked (no such version, no index, bad argument), with the fix."""


class FilterError(SearchError):
    """A filter that is not a safe, well-typed structured filter, with the fix."""


class CheckpointMismatchError(SearchError):
    """The checkpoint's model is not the model that made the table's vectors."""


class DocumentNotFoundError(SearchError):
    """A doc_id that is not in the searched version of the table ("more like this")."""


class DatabaseNotFoundError(SearchError):
    """A local LanceDB database path that is missing, or a file rather than a folder."""


def check_database(db_uri: str) -> None:
    """Refuses a local ``db_uri`` that is not a folder, *before* anything connects to it.

    ``lancedb.connect`` creates a missing folder, and a reader must create nothing: a typo
    in ``--db`` would otherwise leave an empty database behind and report "no table".
    Object-store URIs are left to LanceDB (a prefix there is not a thing that exists).

    Raises:
        DatabaseNotFoundError: the path is missing or a file, naming the fix.
    """
    if storage.is_remote(db_uri):
        return
    path = Path(storage.normalise_uri(db_uri))
    if path.is_dir():
        return
    if path.exists():
        raise DatabaseNotFoundError(f"the LanceDB database {db_uri} is a file, not a folder: point --db at the "
                                    "folder `ciea embed` wrote (by default <root>/lancedb)")
    raise DatabaseNotFoundError(f"no LanceDB database at {db_uri}: run `ciea embed` first, or point --db at the "
                                "folder it wrote (by default <root>/lancedb)")


# ---------------------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------------------


def _column_kind(schema: pa.Schema, column: str) -> str:
    """``str`` / ``int`` / ``float`` / ``bool`` for a filterable column.

    Raises:
        FilterError: the column is unknown, not a plain identifier, or not filterable.
    """
    if not isinstance(column, str) or not _IDENTIFIER.match(column):
        raise FilterError(f"filter column {column!r} is not a column name: use one of "
                          f"{', '.join(filterable_columns(schema))}")
    if column not in schema.names:
        raise FilterError(f"filter column {column!r} is not in the table: use one of "
                          f"{', '.join(filterable_columns(schema))}")
    t = schema.field(column).type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "str"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    raise FilterError(f"filter column {column!r} has type {t}; filters compare string, integer, float and "
                      f"boolean columns only: use one of {', '.join(filterable_columns(schema))}")


def filterable_columns(schema: pa.Schema) -> list[str]:
    """Columns a :class:`Filter` may name (plain identifiers of scalar type)."""
    out = []
    for f in schema:
        t = f.type
        if _IDENTIFIER.match(f.name) and (pa.types.is_string(t) or pa.types.is_large_string(t)
                                          or pa.types.is_string_view(t) or pa.types.is_boolean(t)
                                          or pa.types.is_integer(t) or pa.types.is_floating(t)):
            out.append(f.name)
    return out


def _int_range(dtype: pa.DataType) -> tuple[int, int]:
    """The values an integer column of Arrow type ``dtype`` can hold."""
    bits = dtype.bit_width
    if pa.types.is_unsigned_integer(dtype):
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _literal(column: str, kind: str, value: Any, dtype: pa.DataType) -> str:
    """One typed SQL literal for ``column`` (of Arrow type ``dtype``); refuses
    anything that is not a plain value, and an integer the column cannot hold (the query
    engine would fail on it with a cast error deep in the scan)."""
    if kind == "str":
        if not isinstance(value, str):
            raise FilterError(f"filter on {column!r} (a string column) got {type(value).__name__} {value!r}: "
                              f"pass a string, e.g. {column}={str(value)!r}")
        if len(value) > MAX_VALUE_CHARS:
            raise FilterError(f"filter value for {column!r} has {len(value)} characters, more than "
                              f"{MAX_VALUE_CHARS}: filter on a shorter value")
        for bad, name in _UNSAFE:
            if bad in value:
                raise FilterError(
                    f"filter value {value!r} for {column!r} contains {name}: filter values are matched "
                    "literally and may not contain quotes, backticks, semicolons, backslashes or SQL "
                    "comments. Pass the plain value (e.g. an exact doc_id); for anything else query the "
                    "table with `ciea sql`")
        if _CONTROL.search(value):
            raise FilterError(f"filter value {value!r} for {column!r} contains a control character: "
                              "pass the plain printable value")
        return "'" + value.replace("'", "''") + "'"  # never reached with a quote; quoted regardless
    if kind == "bool":
        if not isinstance(value, bool):
            raise FilterError(f"filter on {column!r} (a boolean column) got {type(value).__name__} {value!r}: "
                              "pass true or false")
        return "true" if value else "false"
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise FilterError(f"filter on {column!r} (an integer column) got {type(value).__name__} {value!r}: "
                              f"pass an integer, e.g. {column}=3")
        low, high = _int_range(dtype)
        if not low <= int(value) <= high:
            raise FilterError(f"filter value {int(value)} for {column!r} is out of range: {column!r} is "
                              f"{dtype} and holds {low}..{high}; pass an integer in that range")
        if int(value) == -(2**63):
            # Lance parses "-9223372036854775808" as minus a number too big for int64 (then a float).
            return "(-9223372036854775807 - 1)"
        return str(int(value))
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise FilterError(f"filter on {column!r} (a float column) got {type(value).__name__} {value!r}: "
                          f"pass a number, e.g. {column}=0.5")
    if not math.isfinite(float(value)):
        raise FilterError(f"filter on {column!r} got {value!r}: pass a finite number")
    return repr(float(value))


@dataclass(frozen=True)
class Filter:
    """A structured filter; user text is never spliced into SQL.

    Every condition must hold (they are ANDed).

    Attributes:
        modality: ``"image"`` or ``"text"`` (``pipelines.store.schema.MODALITIES``).
        equals: ``column == value`` per item; columns checked against the table schema,
            values against the column's type.
        in_: ``column IN (values)`` per item (same checks; at least one value).
        doc_ids: only these documents (``doc_id IN (...)``), e.g. to re-rank a candidate set.
    """

    modality: str | None = None
    equals: Mapping[str, Scalar] = field(default_factory=dict)
    in_: Mapping[str, Sequence[Scalar]] = field(default_factory=dict)
    doc_ids: Sequence[str] | None = None

    def is_empty(self) -> bool:
        return self.modality is None and not self.equals and not self.in_ and self.doc_ids is None

    def to_sql(self, schema: pa.Schema) -> str | None:
        """The validated, quoted SQL predicate for ``schema`` (``None`` when empty).

        Raises:
            FilterError: an unknown or unfilterable column, a value of the wrong type, an
                unsafe string value, an unknown modality or an empty list, naming the fix.
        """
        parts: list[str] = []
        if self.modality is not None:
            if self.modality not in MODALITIES:
                raise FilterError(f"modality filter {self.modality!r} is not a modality: use one of "
                                  f"{', '.join(MODALITIES)}")
            kind = _column_kind(schema, MODALITY)
            parts.append(f"{MODALITY} = {_literal(MODALITY, kind, self.modality, schema.field(MODALITY).type)}")
        if not isinstance(self.equals, Mapping):
            raise FilterError(f"Filter.equals must be a mapping column → value, got {type(self.equals).__name__}")
        for column, value in self.equals.items():
            kind = _column_kind(schema, column)
            parts.append(f"{column} = {_literal(column, kind, value, schema.field(column).type)}")
        if not isinstance(self.in_, Mapping):
            raise FilterError(f"Filter.in_ must be a mapping column → values, got {type(self.in_).__name__}")
        in_items = list(self.in_.items())
        if self.doc_ids is not None:
            if isinstance(self.doc_ids, str):
                raise FilterError("Filter.doc_ids must be a list of doc_ids, got one string: wrap it in a list")
            in_items.append((DOC_ID, list(self.doc_ids)))
        for column, values in in_items:
            kind = _column_kind(schema, column)
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
                raise FilterError(f"filter {column} IN (...) needs a list of values, got {type(values).__name__}: "
                                  f"pass e.g. [{values!r}]")
            if not values:
                raise FilterError(f"filter {column} IN () has no values and would match nothing: pass at least "
                                  "one value or drop the filter")
            if len(values) > MAX_IN_VALUES:
                raise FilterError(f"filter {column} IN (...) has {len(values)} values, more than {MAX_IN_VALUES}: "
                                  "split the search into several")
            dtype = schema.field(column).type
            parts.append(f"{column} IN ({', '.join(_literal(column, kind, v, dtype) for v in values)})")
        return " AND ".join(f"({p})" for p in parts) if parts else None


def parse_filter_pairs(pairs: Sequence[str], schema: pa.Schema) -> dict[str, Scalar]:
    """``["source_version=3", "modality=image"]`` (CLI / web text) → typed ``equals``.

    Each value is converted by its column's type, so ``source_version=3 OR 1=1`` is an
    error, not a predicate.

    Raises:
        FilterError: not ``COLUMN=VALUE``, an unknown column, or a value of the wrong type.
    """
    out: dict[str, Scalar] = {}
    for pair in pairs:
        if "=" not in pair:
            raise FilterError(f"filter {pair!r}: expected COLUMN=VALUE, e.g. source_version=3")
        column, text = pair.split("=", 1)
        column = column.strip()
        kind = _column_kind(schema, column)
        value: Scalar
        if kind == "str":
            value = text
        elif kind == "bool":
            if text.strip().lower() not in ("true", "false"):
                raise FilterError(f"filter {pair!r}: {column!r} is a boolean column: pass true or false")
            value = text.strip().lower() == "true"
        elif kind == "int":
            if not re.fullmatch(r"[+-]?\d+", text.strip()):
                raise FilterError(f"filter {pair!r}: {column!r} is an integer column: pass an integer, "
                                  f"e.g. {column}=3")
            value = int(text)
        else:
            try:
                value = float(text)
            except ValueError:
                raise FilterError(f"filter {pair!r}: {column!r} is a float column: pass a number, "
                                  f"e.g. {column}=0.5") from None
        _literal(column, kind, value, schema.field(column).type)  # the checks of to_sql, reported with the pair
        out[column] = value
    return out


# ---------------------------------------------------------------------------------------
# Results and fusion
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    """One search result.

    Attributes:
        rank: 1-based position in the result list.
        doc_id: the document id (the join key to Delta ``corpus/documents``).
        score: cosine similarity (vector), BM25 (fts) or the RRF score (hybrid).
        modality: ``text`` or ``image``.
        text / caption: the document's text, or the image's caption.
        thumbnail: a small JPEG of an image document.
        metadata: the source's metadata (JSON text in the table → dict).
        patch_weights: the CIEA extractor's weight ``w`` per patch, when the table has them.
    """

    rank: int
    doc_id: str
    score: float
    modality: str
    text: str | None
    caption: str | None
    thumbnail: bytes | None
    metadata: dict[str, Any]
    patch_weights: list[float] | None = None


def reciprocal_rank_fusion(lists: Sequence[Sequence[str]], rrf_k: int = RRF_K) -> list[tuple[str, float]]:
    """Fuses ranked doc_id lists: ``score(d) = sum_i 1 / (rrf_k + rank_i(d))``, ranks from 1.

    Ties (equal fused scores) go to the document with the better best rank, then by
    doc_id, so the order is deterministic.

    Returns:
        ``(doc_id, score)`` pairs, best first.
    """
    scores: dict[str, float] = {}
    best: dict[str, int] = {}
    for ranked in lists:
        for rank, doc_id in enumerate(ranked, start=1):
            scores[doc_id] = scores.get(doc_id, 0.0) + 1.0 / (rrf_k + rank)
            best[doc_id] = min(best.get(doc_id, rank), rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], best[kv[0]], kv[0]))


def _metadata(text: str | None, doc_id: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        # A bad record must not break a search: show it raw rather than fail the query.
        logger.warning("document %s: metadata is not JSON; returned as {'raw': ...}", doc_id)
        return {"raw": text}
    return value if isinstance(value, dict) else {"value": value}


def _hits(rows: list[dict[str, Any]], scores: Sequence[float]) -> list[Hit]:
    out = []
    for i, (row, score) in enumerate(zip(rows, scores, strict=True)):
        pw = row.get(PATCH_WEIGHTS)
        out.append(Hit(
            rank=i + 1, doc_id=row[DOC_ID], score=float(score), modality=row.get(MODALITY) or "",
            text=row.get(TEXT), caption=row.get(CAPTION), thumbnail=row.get(THUMBNAIL),
            metadata=_metadata(row.get(METADATA), row[DOC_ID]),
            patch_weights=[float(x) for x in pw] if pw is not None else None))
    return out


# ---------------------------------------------------------------------------------------
# The searcher
# ---------------------------------------------------------------------------------------


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise SearchError(f"k={k!r}: pass an integer from 1 to {MAX_K}")
    return k


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise SearchError(f"mode={mode!r} is not a search mode: use one of {', '.join(MODES)}")
    return mode


def resolve_version(table: Any, version: int | str | None) -> tuple[int, str | None]:
    """``(version number, tag name or None)`` for ``version`` of a LanceDB ``table``.

    ``None`` means the ``published`` tag; a string is a tag name (or a number as text).

    Raises:
        SearchError: no such tag or version, naming what exists.
    """
    if isinstance(version, str) and version.strip().isdigit():
        version = int(version)
    if isinstance(version, bool):
        raise SearchError(f"version={version!r}: pass a version number or a tag name")
    if isinstance(version, (int, np.integer)):
        versions = [v["version"] if isinstance(v, dict) else v.version for v in table.list_versions()]
        if int(version) not in versions:
            raise SearchError(f"table {table.name!r} has no version {version}: it has versions "
                              f"{min(versions)}..{max(versions)}; omit the version for the published one")
        return int(version), None
    tag = PUBLISHED_TAG if version is None else version
    tags = table.tags.list()
    if tag not in tags:
        if version is None:
            raise SearchError(
                f"table {table.name!r} has no {PUBLISHED_TAG!r} version yet: run `ciea embed` to the end "
                "(it publishes the version after building the indexes), or pass a version number "
                f"(latest: {table.version})")
        raise SearchError(f"table {table.name!r} has no tag {tag!r}: tags are "
                          f"{', '.join(sorted(tags)) or '(none)'}; or pass a version number")
    entry = tags[tag]
    return int(entry["version"] if isinstance(entry, dict) else entry.version), tag


def _manifest_model_id(checkpoint: str) -> str:
    from ciea_model.checkpoint import read_manifest

    try:
        manifest = read_manifest(checkpoint)
    except (FileNotFoundError, ValueError) as e:  # incl. CheckpointError: missing or corrupt weights
        raise SearchError(str(e)) from None
    if not manifest.get("model_id"):
        raise SearchError(f"checkpoint {checkpoint} records no model_id: pass --checkpoint with a folder "
                          "written by `ciea train`")
    return str(manifest["model_id"])


class Searcher:
    """Searches one pinned version of a LanceDB vector table (module docstring).

    Build one with :meth:`open_table` (or :meth:`open`). Safe to share between threads for reads once built (it
    holds no per-query state); not meant to be pickled.

    Attributes:
        model_id: the model that made the table's vectors (and encodes the queries).
        version: the pinned table version.
        tag: the tag it was opened at (``None`` when opened by number).
        dim: vector width.
        nprobes / refine_factor: ANN defaults from the stored index plan (``None`` when the
            table has no ANN index: exact search).
        schema: the table's Arrow schema (what filters are checked against).
    """

    def __init__(self, table: Any, *, db_uri: str, name: str, version: int, tag: str | None, model: Any,
                 processor: Any, checkpoint: str, device: str, metadata: Mapping[str, str],
                 index_names: Sequence[str]) -> None:
        self._table = table
        self.db_uri = db_uri
        self.name = name
        self.version = version
        self.tag = tag
        self.model = model
        self.processor = processor
        self.checkpoint = checkpoint
        self.device = device
        self.metadata = dict(metadata)
        self.model_id: str = self.metadata[META_MODEL_ID]
        self.schema: pa.Schema = table.schema
        self.dim: int = int(self.metadata.get(META_DIM) or self.schema.field(VECTOR).type.list_size)
        self.index_names = list(index_names)
        self.has_ann = ANN_INDEX in self.index_names
        self.fts_columns = [c for c in FTS_COLUMNS if f"{c}_idx" in self.index_names]
        self.plan: AnnPlan | None = plan_from_json(self.metadata.get(META_INDEX_PLAN)) if self.has_ann else None
        self.nprobes: int | None = self.plan.nprobes if self.plan else None
        self.refine_factor: int | None = self.plan.refine_factor if self.plan else None
        # The payload: everything but the vector (never needed by a reader, and the widest column).
        self._columns = [c for c in self.schema.names if c != VECTOR]

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def open(cls, db_uri: str, table: str, *, version: int | str | None = None, checkpoint: str | None = None,
             storage_options: dict | None = None, device: str = "cpu") -> Searcher:
        """:meth:`open_table` of ``VectorTable(db_uri, table, storage_options)``.

        Args:
            db_uri: LanceDB database folder (local path or ``s3://``).
            table: table name.
            storage_options: object-store settings (never credentials).
            version, checkpoint, device: as for :meth:`open_table`.

        Raises:
            DatabaseNotFoundError: a local ``db_uri`` that is missing or a file (nothing is created).
            ValueError: ``storage_options`` holds a credential; else as :meth:`open_table`.
        """
        check_database(db_uri)
        return cls.open_table(VectorTable(db_uri, table, storage_options), version=version, checkpoint=checkpoint,
                              device=device)

    @classmethod
    def open_table(cls, vectors: VectorTable, *, version: int | str | None = None, checkpoint: str | None = None,
                   device: str = "cpu") -> Searcher:
        """Opens a vector table at a pinned version and loads the model that made its vectors.

        Args:
            vectors: the table's handle (database, name, storage options).
            version: ``None`` → the ``published`` tag; an int version or a tag name.
            checkpoint: checkpoint directory; default: the one recorded in the table
                metadata (``ciea.checkpoint``). Its ``model_id`` must equal the table's.
            device: torch device for query encoding.

        Raises:
            SearchError: no such table, version or tag, or no checkpoint to load (the fix in
                the message); CheckpointMismatchError: the checkpoint is another model.
        """
        db, db_uri, table = vectors.db, vectors.db_uri, vectors.name
        names = db.list_tables().tables
        if table not in names:
            raise SearchError(f"no table {table!r} in {db_uri}: tables there are {', '.join(sorted(names)) or '(none)'}; "
                              "pass --table (and --db), or create it with `ciea embed`")
        # A table object of its own: the checkout below pins this reader, not the handle.
        tbl = db.open_table(table)
        number, tag = resolve_version(tbl, version)
        # Checked out by number, not by tag: a tag that moves later must not move this reader.
        tbl.checkout(number)
        meta = dict(tbl.to_lance().metadata or {})
        table_model = meta.get(META_MODEL_ID)
        if not table_model:
            raise SearchError(f"table {table!r}@{number} records no model_id ({META_MODEL_ID}): it was not written "
                              "by `ciea embed`; re-embed the corpus into a new table")
        ckpt = checkpoint or meta.get(META_CHECKPOINT)
        if not ckpt:
            raise SearchError(f"table {table!r}@{number} does not record its checkpoint ({META_CHECKPOINT}): pass "
                              f"--checkpoint DIR (the checkpoint of model_id {table_model})")
        from pipelines.store.storage import is_remote, local_folder

        if not is_remote(ckpt) and not Path(ckpt).is_dir():
            raise SearchError(f"checkpoint {ckpt} (model_id {table_model}) is not a directory here: pass "
                              "--checkpoint DIR with a copy of it")
        with contextlib.ExitStack() as stack:  # an s3:// checkpoint is copied here for the load, then removed
            try:
                local = stack.enter_context(local_folder(ckpt, vectors.storage_options))
            except FileNotFoundError as e:
                raise SearchError(str(e)) from None
            have = _manifest_model_id(local)
            if have != table_model:
                raise CheckpointMismatchError(
                    f"checkpoint {ckpt} is model_id {have}, but table {table!r}@{number} holds vectors of model_id "
                    f"{table_model}: queries must be encoded by the model that encoded the documents. Pass the "
                    "checkpoint the table was embedded with, or search a table embedded with this one")
            from ciea_model import load_checkpoint, model_id

            try:
                model, processor = load_checkpoint(local, map_location=device)
            except (FileNotFoundError, ValueError) as e:  # incl. CheckpointError: missing or corrupt weights
                raise SearchError(str(e)) from None
        loaded = model_id(model)
        if loaded != table_model:  # the weights changed on disk after the manifest was written
            raise CheckpointMismatchError(f"checkpoint {ckpt} declares model_id {have} but its weights hash to "
                                          f"{loaded}: the directory was modified; restore it or re-embed")
        indexes = [ix.name for ix in tbl.list_indices()]
        logger.info("opened %s/%s at version %d%s (model_id %s, indexes: %s)", db_uri, table, number,
                    f" (tag {tag!r})" if tag else "", table_model, ", ".join(sorted(indexes)) or "none")
        return cls(tbl, db_uri=db_uri, name=table, version=number, tag=tag, model=model, processor=processor,
                   checkpoint=str(ckpt), device=device, metadata=meta, index_names=indexes)

    def count_rows(self) -> int:
        """Rows of the pinned version."""
        return self._table.count_rows()

    # ---- encoding ------------------------------------------------------------------------
    def encode_queries(self, queries: Sequence[str], batch_size: int = 128) -> np.ndarray:
        """Queries → ``(n, dim)`` float32 unit vectors (``ciea_model.inference.encode_queries``).

        Raises:
            SearchError: a query is not a non-empty string.
        """
        from ciea_model.inference import encode_queries

        queries = self._check_queries(queries)
        return encode_queries(self.model, self.processor, list(queries), batch_size=batch_size,
                              device=self.device).astype(np.float32, copy=False)

    def encode_pictures(self, images: Sequence[bytes], texts: Sequence[str | None] | None = None,
                        batch_size: int = 64) -> np.ndarray:
        """Queries that carry a picture (and optional text) → ``(n, dim)`` float32 unit
        vectors, built as the document side builds an image document (the picture's patches
        through the vision tower and projector, the text in the caption's place, through the
        shared encoder: ``ciea_model.inference.encode_documents``), so that they live in the
        table's space. Each picture passes the rule ingest applies to the corpus's images
        (:func:`pipelines.store.images.normalise_image`: byte and pixel caps, a full decode).

        Raises:
            SearchError: the model encodes no image (``text-only``), or a picture is not an
                image the project takes (the reason and the fix in the message).
        """
        from ciea_model.inference import encode_documents
        from ciea_model.processor import Document

        config = self.model.config
        if not config.uses_images:
            raise SearchError(f"table {self.name!r} was embedded by a {config.variant!r} model, which encodes no "
                              "image: search it with text, or search a table embedded by a ciea, marvel or "
                              "univl-dr checkpoint")
        texts = list(texts) if texts is not None else [None] * len(images)
        if isinstance(images, (bytes, bytearray)) or len(texts) != len(images):
            raise SearchError("pass a list of pictures and, optionally, one text (or None) per picture")
        docs = []
        for i, (image, text) in enumerate(zip(images, texts, strict=True)):
            if not isinstance(image, (bytes, bytearray, memoryview)):
                raise SearchError(f"picture {i} is {type(image).__name__}: pass the encoded image's bytes")
            if text is not None and not isinstance(text, str):
                raise SearchError(f"text {i} is {type(text).__name__}: pass a string or None")
            try:
                data, _, _ = normalise_image(bytes(image))
            except ImageRejected as e:
                raise SearchError(f"picture {i}: {e}") from None
            docs.append(Document(doc_id=f"query-{i}", modality="image", caption=(text or "").strip(), image=data))
        return encode_documents(self.model, self.processor, docs, batch_size=batch_size,
                                device=self.device).astype(np.float32, copy=False)

    def stored_vectors(self, doc_ids: Sequence[str]) -> np.ndarray:
        """The vectors the pinned version stores for ``doc_ids`` (``(n, dim)``, in order):
        "more like this" searches with them, nothing is encoded again.

        Raises:
            DocumentNotFoundError: a doc_id that is not in this version of the table.
        """
        if isinstance(doc_ids, str):
            raise SearchError("pass a list of doc_ids (got one string): wrap it in a list")
        ids = list(dict.fromkeys(doc_ids))
        if not ids:
            return np.zeros((0, self.dim), np.float32)
        # An Arrow expression, not SQL text: any doc_id (quotes included) is looked up as it is.
        found = self._table.to_lance().to_table(columns=[DOC_ID, VECTOR], filter=pc.field(DOC_ID).isin(ids))
        by_id = dict(zip(found[DOC_ID].to_pylist(), found[VECTOR].to_pylist()))
        for d in ids:
            if d not in by_id:
                raise DocumentNotFoundError(f"no document {d!r} in table {self.name!r}@{self.version}: \"more like this\" "
                                  "takes a doc_id of the searched table (a result's doc_id)")
        return np.asarray([by_id[d] for d in doc_ids], np.float32)

    @staticmethod
    def _check_queries(queries: Sequence[str]) -> Sequence[str]:
        if isinstance(queries, str):
            raise SearchError("pass a list of queries (got one string): wrap it in a list, or call search()")
        for i, q in enumerate(queries):
            if not isinstance(q, str) or not q.strip():
                raise SearchError(f"query {i} is {q!r}: every query must be a non-empty string")
        return queries

    # ---- searching -----------------------------------------------------------------------
    def search(self, text: str | None = None, *, image: bytes | None = None, like: str | None = None,
               k: int = 10, mode: Mode = "vector", where: Filter | None = None, nprobes: int | None = None,
               refine_factor: int | None = None, candidates: int | None = None, rrf_k: int = RRF_K) -> list[Hit]:
        """The top ``k`` documents for one query: text, a picture (with optional text: a
        composed query), or "more like this" a document of the table.

        Args:
            text: the query text (with ``image``: the text that goes with the picture).
            image: an encoded picture (:meth:`encode_pictures`); vector mode only.
            like: a doc_id of this table: its stored vector is the query and the document
                itself is left out of the results; vector mode only, alone.
            k: results to return.
            mode: ``vector``, ``fts`` (BM25) or ``hybrid`` (RRF of both).
            where: a structured :class:`Filter` (applied before ranking).
            nprobes / refine_factor: ANN settings (default: the stored index plan); ignored
                by exact search.
            candidates: hybrid: how many of each list to fuse (default ``max(k, 50)``).
            rrf_k: hybrid: the RRF constant.

        Raises:
            SearchError / FilterError: bad arguments, with the fix.
        """
        if like is not None:
            if text is not None or image is not None:
                raise SearchError("\"more like this\" takes the document alone: pass like=DOC_ID without text or image")
            return self.search_like([like], k=k, mode=mode, where=where, nprobes=nprobes,
                                    refine_factor=refine_factor)[0]
        if image is not None:
            return self.search_pictures([image], [text], k=k, mode=mode, where=where, nprobes=nprobes,
                                        refine_factor=refine_factor)[0]
        if text is None:
            raise SearchError("a search needs a query: pass text, image or like (one of them)")
        return self.search_batch([text], k=k, mode=mode, where=where, nprobes=nprobes,
                                 refine_factor=refine_factor, candidates=candidates, rrf_k=rrf_k)[0]

    def search_batch(self, queries: Sequence[str], *, k: int = 10, mode: Mode = "vector",
                     where: Filter | None = None, nprobes: int | None = None, refine_factor: int | None = None,
                     candidates: int | None = None, rrf_k: int = RRF_K) -> list[list[Hit]]:
        """:meth:`search` for many text queries (encoded in one batch); one result list per query."""
        queries = self._check_queries(queries)
        _check_k(k)
        _check_mode(mode)
        sql = self._where_sql(where)  # a bad filter fails before any encoding
        if mode == "fts":
            return [self._fts(q, k, sql) for q in queries]
        vectors = self.encode_queries(queries)
        if mode == "vector":
            return self._vector(vectors, k, sql, nprobes, refine_factor)
        n = max(k, candidates or HYBRID_CANDIDATES)
        vec_lists = self._vector(vectors, n, sql, nprobes, refine_factor)
        return [self._fuse([v, self._fts(q, n, sql)], k, rrf_k) for q, v in zip(queries, vec_lists, strict=True)]

    def search_pictures(self, images: Sequence[bytes], texts: Sequence[str | None] | None = None, *, k: int = 10,
                        mode: Mode = "vector", where: Filter | None = None, nprobes: int | None = None,
                        refine_factor: int | None = None) -> list[list[Hit]]:
        """:meth:`search` for many picture queries (each with an optional text)."""
        self._vector_only(mode, "a picture query")
        _check_k(k)
        sql = self._where_sql(where)
        return self._vector(self.encode_pictures(images, texts), k, sql, nprobes, refine_factor)

    def search_like(self, doc_ids: Sequence[str], *, k: int = 10, mode: Mode = "vector", where: Filter | None = None,
                    nprobes: int | None = None, refine_factor: int | None = None) -> list[list[Hit]]:
        """"More like this" for many documents: each one's stored vector is its query, and
        the document is left out of its own results."""
        self._vector_only(mode, "\"more like this\"")
        _check_k(k)
        sql = self._where_sql(where)
        vectors = self.stored_vectors(doc_ids)
        # Ask for one more: the document itself is the nearest (or tied) and is dropped.
        found = self._vector(vectors, k + 1, sql, nprobes, refine_factor)
        out = []
        for d, hits in zip(doc_ids, found, strict=True):
            kept = [h for h in hits if h.doc_id != d][:k]
            out.append([replace(h, rank=i + 1) for i, h in enumerate(kept)])
        return out

    @staticmethod
    def _vector_only(mode: str, what: str) -> None:
        _check_mode(mode)
        if mode != "vector":
            raise SearchError(f"{what} is a vector search: use mode='vector' (fts and hybrid rank query text)")

    def search_vectors(self, vectors: np.ndarray, *, k: int = 10, where: Filter | None = None,
                       nprobes: int | None = None, refine_factor: int | None = None) -> list[list[Hit]]:
        """Vector search with query vectors the caller already has (``(n, dim)`` or ``(dim,)``).

        Raises:
            SearchError: wrong shape or non-finite values.
        """
        arr = np.asarray(vectors, dtype=np.float32)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise SearchError(f"query vectors of shape {np.shape(vectors)}: pass (n, {self.dim}) float32 "
                              f"(the table's vectors are {self.dim}-d)")
        if not np.isfinite(arr).all():
            raise SearchError("query vectors contain NaN or infinity: pass finite unit vectors")
        _check_k(k)
        return self._vector(arr, k, self._where_sql(where), nprobes, refine_factor)

    # ---- the three searches ---------------------------------------------------------------
    def _where_sql(self, where: Filter | None) -> str | None:
        if where is None:
            return None
        if not isinstance(where, Filter):
            raise FilterError(f"where must be a pipelines.query.search.Filter, got {type(where).__name__}: build one "
                              "from structured values (user text is never accepted as SQL)")
        return where.to_sql(self.schema)

    def _vector(self, vectors: np.ndarray, k: int, sql: str | None, nprobes: int | None,
                refine_factor: int | None) -> list[list[Hit]]:
        if len(vectors) == 0:
            return []
        q = self._table.search(vectors if len(vectors) > 1 else vectors[0], vector_column_name=VECTOR)
        q = q.distance_type("cosine")
        if self.has_ann:
            probes = nprobes if nprobes is not None else self.nprobes
            refine = refine_factor if refine_factor is not None else self.refine_factor
            if probes:
                q = q.nprobes(int(probes))
            if refine:
                q = q.refine_factor(int(refine))
        elif nprobes is not None or refine_factor is not None:
            logger.debug("table %s@%d has no ANN index: exact search, nprobes/refine_factor unused",
                         self.name, self.version)
        if sql:
            q = q.where(sql, prefilter=True)
        out = q.select(self._columns + ["_distance"]).limit(k).to_arrow()
        if "query_index" not in out.column_names:
            out = out.append_column("query_index", pa.array(np.zeros(out.num_rows, np.int32)))
        results: list[list[Hit]] = []
        qi = out["query_index"].to_numpy()
        for i in range(len(vectors)):
            part = out.filter(pa.array(qi == i)).sort_by([("_distance", "ascending")])
            # Cosine distance = 1 - cosine similarity; report the similarity.
            sims = [1.0 - d for d in part["_distance"].to_pylist()]
            results.append(_hits(part.drop_columns(["_distance", "query_index"]).to_pylist(), sims))
        return results

    def _fts(self, query: str, k: int, sql: str | None) -> list[Hit]:
        if not self.fts_columns:
            raise SearchError(f"table {self.name!r}@{self.version} has no full-text index on "
                              f"{' or '.join(FTS_COLUMNS)}: re-run `ciea embed` (it builds them), or use mode=vector")
        q = self._table.search(query, query_type="fts", fts_columns=list(self.fts_columns))
        if sql:
            q = q.where(sql, prefilter=True)
        out = q.select(self._columns + ["_score"]).limit(k).to_arrow()
        out = out.sort_by([("_score", "descending")])
        return _hits(out.drop_columns(["_score"]).to_pylist(), out["_score"].to_pylist())

    @staticmethod
    def _fuse(lists: Sequence[list[Hit]], k: int, rrf_k: int) -> list[Hit]:
        by_id: dict[str, Hit] = {}
        for hits in lists:
            for h in hits:
                by_id.setdefault(h.doc_id, h)
        fused = reciprocal_rank_fusion([[h.doc_id for h in hits] for hits in lists], rrf_k)[:k]
        return [Hit(rank=i + 1, doc_id=d, score=s, modality=by_id[d].modality, text=by_id[d].text,
                    caption=by_id[d].caption, thumbnail=by_id[d].thumbnail, metadata=by_id[d].metadata,
                    patch_weights=by_id[d].patch_weights) for i, (d, s) in enumerate(fused)]

    def __repr__(self) -> str:
        where = f"tag {self.tag!r} = " if self.tag else ""
        return (f"Searcher({self.db_uri}/{self.name} @ {where}version {self.version}, model_id {self.model_id}, "
                f"{'ANN' if self.has_ann else 'exact'} vector search, fts on {', '.join(self.fts_columns) or 'none'})")
