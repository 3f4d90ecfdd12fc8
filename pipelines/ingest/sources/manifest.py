"""JSONL / Parquet manifests: one record per line or row.

Columns (JSON keys): ``doc_id`` (string, or integer → its decimal string; required),
``text``, ``caption``, ``image`` (a path or URI — relative paths resolve against the
manifest's folder — or, in Parquet, the image bytes), ``modality`` (optional: ``text`` or
``image``; inferred when absent). Every other column is free metadata, kept as a JSON
object. ``path`` is one manifest file or a folder of them (``*.jsonl``, ``*.json`` as JSON
lines, ``*.parquet``), read in name order. A BEIR corpus reads as is: ``_id`` is the
``doc_id`` when there is no ``doc_id`` (``title`` stays metadata), and in a folder that is
a BEIR layout (``queries.jsonl`` beside ``qrels/``) ``queries.jsonl`` is not a manifest — it
is read by ``--queries``.

JSONL shards by byte range, Parquet by row group. A line that is not UTF-8 or not a JSON
object, a value of the wrong type, and every row of a Parquet column of the wrong Arrow
type are emitted as read errors (quarantined), never skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.ingest.sources.base import (
    RawBuilder,
    Source,
    int_or_str_id,
    iter_json_records,
    line_file_shards,
    metadata_json,
    relative_name,
    text_excerpt,
)
from pipelines.store import storage

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
CORE = ("doc_id", "text", "caption", "image", "modality")
#: BEIR's corpus id column, the doc_id when a record has no ``doc_id``.
BEIR_ID = "_id"
BEIR_QUERIES, BEIR_QRELS = "queries.jsonl", "qrels"

_STRING_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)
_BINARY_TYPES = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view)


def _is(t: pa.DataType, preds) -> bool:
    return any(p(t) for p in preds)


def _column_type_error(name: str, t: pa.DataType) -> str | None:
    if pa.types.is_null(t):
        return None
    if name == "doc_id" and (_is(t, _STRING_TYPES) or pa.types.is_integer(t)):
        return None
    if name in ("text", "caption", "modality") and (_is(t, _STRING_TYPES) or _is(t, _BINARY_TYPES)):
        return None  # binary text is decoded (and checked for UTF-8) by validation
    if name == "image" and (_is(t, _STRING_TYPES) or _is(t, _BINARY_TYPES)):
        return None
    expected = {"doc_id": "string or integer", "image": "binary (bytes) or string (path/URI)"}
    return (f"column {name!r} has Arrow type {t}; expected {expected.get(name, 'string')}. "
            "Fix the column type in the manifest")


class ManifestSource(Source):
    kind = "manifest"

    def __init__(self, path: str, shard_bytes: int = 8 << 20, name: str | None = None,
                 storage_options: dict[str, str] | None = None, image_mode: str = "inline") -> None:
        super().__init__(name, storage_options, image_mode)
        self.path = storage.normalise_uri(path)
        self.shard_bytes = shard_bytes

    def files(self) -> list[str]:
        fs, path = self.fs(self.path)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"manifest {self.path} does not exist; check source.path")
        if info.type == pafs.FileType.File:
            return [self.path]
        found = [
            i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
            if i.type == pafs.FileType.File and i.path.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES)
        ]
        beir_queries = f"{path.rstrip('/')}/{BEIR_QUERIES}"
        if beir_queries in found and fs.get_file_info(f"{path.rstrip('/')}/{BEIR_QRELS}").type == pafs.FileType.Directory:
            found.remove(beir_queries)  # a BEIR layout: the queries are not documents
        if not found:
            raise FileNotFoundError(
                f"no manifest files (*.jsonl, *.json, *.parquet) under {self.path}")
        prefix = self.path.split("://", 1)[0] + "://" if storage.is_remote(self.path) else ""
        return sorted(prefix + p for p in found)

    def plan(self) -> list[dict[str, Any]]:
        shards: list[dict[str, Any]] = []
        for uri in self.files():
            if uri.endswith(PARQUET_SUFFIXES):
                fs, path = self.fs(uri)
                with fs.open_input_file(path) as f:
                    groups = pq.ParquetFile(f).metadata.num_row_groups
                shards += [{"uri": uri, "row_group": g} for g in range(groups)]
            else:
                shards += line_file_shards(self, uri, self.shard_bytes)
        return shards

    def read(self, shard_index: int, spec: dict[str, Any]) -> Iterator[pa.Table]:
        builder = RawBuilder(self.name, shard_index)
        rows = self._read_parquet(spec) if "row_group" in spec else self._read_jsonl(spec)
        for ref, record in rows:
            table = builder.add(ref, **record)
            if table is not None:
                yield table
        table = builder.flush()
        if table is not None:
            yield table

    def _base_dir(self, uri: str) -> str:
        return storage.dirname(uri)

    def _read_jsonl(self, spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
        uri = spec["uri"]
        name = relative_name(uri, self.path)
        fs, path = self.fs(uri)
        with fs.open_input_file(path) as f:
            for ref, value, error, line in iter_json_records(f, spec["start"], spec["end"], name):
                yield ref, error if value is None else self._record(value, uri, text_excerpt(line))

    def _read_parquet(self, spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
        uri = spec["uri"]
        name = relative_name(uri, self.path)
        fs, path = self.fs(uri)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            table = pf.read_row_group(spec["row_group"])
            first = sum(pf.metadata.row_group(g).num_rows for g in range(spec["row_group"]))
        type_errors = [e for n in CORE if n in table.column_names
                       if (e := _column_type_error(n, table.schema.field(n).type))]
        for i, row in enumerate(table.to_pylist()):
            ref = f"{name}#row={first + i}"
            if type_errors:
                yield ref, {"error": "wrong_type", "error_detail": "; ".join(type_errors),
                            "raw_excerpt": _row_excerpt(row), "doc_id": _maybe_id(row.get("doc_id"))}
                continue
            yield ref, self._record(row, uri, None)

    def _record(self, value: dict[str, Any], uri: str, excerpt: str | None) -> dict[str, Any]:
        id_key = BEIR_ID if "doc_id" not in value and BEIR_ID in value else "doc_id"
        doc_id, id_error = int_or_str_id(value.get(id_key))
        errors = [id_error] if id_error else []
        for key in ("text", "caption", "modality"):
            v = value.get(key)
            if v is not None and not isinstance(v, (str, bytes)):
                errors.append(f"{key} must be a string, got {type(v).__name__} {v!r:.40}")
        image = value.get("image")
        image_bytes = image_uri = None
        if isinstance(image, (bytes, bytearray)):
            image_bytes = bytes(image)
        elif isinstance(image, str) and image:
            image_uri = image if ("://" in image or image.startswith("/")) else storage.join(
                self._base_dir(uri), image)
        elif image is not None and image != "":
            errors.append(f"image must be a path/URI string or bytes, got {type(image).__name__}")
        if errors:
            return {"error": "wrong_type", "error_detail": "; ".join(errors),
                    "raw_excerpt": excerpt or _row_excerpt(value), "doc_id": doc_id}
        extra = {k: v for k, v in value.items() if k not in CORE and k != id_key}
        return {
            "doc_id": doc_id, "text": value.get("text"), "caption": value.get("caption"),
            "modality": value.get("modality"), "image": image_bytes, "image_uri": image_uri,
            "metadata": metadata_json(extra),
        }


def _maybe_id(value: Any) -> str | None:
    doc_id, _ = int_or_str_id(value)
    return doc_id


def _row_excerpt(row: dict[str, Any]) -> str:
    parts = []
    for k, v in row.items():
        if isinstance(v, (bytes, bytearray)):
            v = f"<{len(v)} bytes>"
        parts.append(f"{k}={v!r:.60}")
    return ", ".join(parts)[:200]
