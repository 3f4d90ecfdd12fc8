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
type are emitted as read errors (quarantined), never skipped. A Parquet file whose footer
does not read is one quarantined record (``file_unreadable``, naming the file); a row group
that does not read quarantines each of its rows; the other files and groups go on.

Confinement (``pipelines.ingest.confine``): an image path (relative, absolute, ``../…``,
``file://``, ``s3://``) is resolved, symlinks included, and read only when it is a regular
file inside the manifest's folder or ``allow_roots``; otherwise the record is quarantined as
``outside_root`` / ``not_a_regular_file`` / ``unsupported_uri`` and nothing of the file is
read. Manifest files in a folder are listed the same way (a symlinked folder is not
walked). An ``http(s)://`` image goes through the URL fetcher (``pipelines.ingest.fetch``)
when the source has one (``fetch``), else is quarantined as ``url_not_fetched``; its
address policy and credential rule (``source.fetch.allow_private``, ``signed_urls``) are the
URL source's (:mod:`pipelines.ingest.sources.urls`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.ingest.confine import Refused, walk
from pipelines.ingest.fetch import SCHEMES as FETCH_SCHEMES
from pipelines.ingest.fetch import SIGNED_URL_REFUSED, FetchSettings, fetch_all
from pipelines.ingest.sources.base import (
    BATCH_ROWS,
    FILE_UNREADABLE,
    RawBuilder,
    Source,
    failure_fields,
    int_or_str_id,
    iter_json_records,
    line_file_shards,
    metadata_json,
    parquet_shards,
    refused_shard,
    refused_table,
    relative_name,
    text_excerpt,
)
from pipelines.store import storage
from pipelines.store.secrets import redact_text, redact_url, url_has_credentials

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
CORE = ("doc_id", "text", "caption", "image", "modality")
#: BEIR's corpus id column, the doc_id when a record has no ``doc_id``.
BEIR_ID = "_id"
BEIR_QUERIES, BEIR_QRELS = "queries.jsonl", "qrels"
#: Reason of an ``http(s)://`` image that is not fetched (no fetcher, or ``image_mode=uri``).
URL_NOT_FETCHED = "url_not_fetched"
#: A record's URL image waiting for the fetcher (never a raw field).
URL_KEY = "_fetch_url"

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
                 storage_options: dict[str, str] | None = None, image_mode: str = "inline",
                 allow_roots: Iterable[str] = (), fetch: FetchSettings | None = None) -> None:
        super().__init__(name, storage_options, image_mode, allow_roots)
        self.path = storage.normalise_uri(path)
        self.shard_bytes = shard_bytes
        #: The URL fetcher for ``http(s)://`` images; None quarantines them (``url_not_fetched``).
        self.fetch = fetch

    def own_roots(self) -> list[str]:
        """The manifest's folder: ``path`` when it is a folder, else the file's folder."""
        fs, path = self.fs(self.path)
        is_dir = fs.get_file_info(path).type == pafs.FileType.Directory
        return [self.path if is_dir else storage.dirname(self.path)]

    def files(self) -> list[tuple[str, Refused | None]]:
        """The manifest files in name order, each with its refusal (a symlink out of the
        roots, a FIFO), if any: a refused file becomes one quarantined record."""
        fs, path = self.fs(self.path)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"manifest {self.path} does not exist; check source.path")
        if info.type != pafs.FileType.Directory:
            try:
                self.roots().check(self.path, self.storage_options)
            except Refused as r:
                return [(self.path, r)]
            return [(self.path, None)]
        listing = [e for e in walk(self.path, self.roots(), self.storage_options)
                   if e.rel.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES)]
        found = {e.rel: e for e in listing}
        qrels = fs.get_file_info(f"{path.rstrip('/')}/{BEIR_QRELS}").type
        if BEIR_QUERIES in found and qrels == pafs.FileType.Directory:
            del found[BEIR_QUERIES]  # a BEIR layout: the queries are not documents
        if not found:
            raise FileNotFoundError(
                f"no manifest files (*.jsonl, *.json, *.parquet) under {self.path}")
        return [(storage.join(self.path, rel), found[rel].refused) for rel in sorted(found)]

    def plan(self) -> list[dict[str, Any]]:
        shards: list[dict[str, Any]] = []
        for uri, refused in self.files():
            if refused is not None:
                shards.append(refused_shard(uri, refused))
            elif uri.endswith(PARQUET_SUFFIXES):
                shards += parquet_shards(self, uri, "records")
            else:
                shards += line_file_shards(self, uri, self.shard_bytes)
        return shards

    def read(self, shard_index: int, spec: dict[str, Any]) -> Iterator[pa.Table]:
        if "refused" in spec:
            table = refused_table(self, shard_index, relative_name(spec["uri"], self.path), spec)
            if table is not None:
                yield table
            return
        builder = RawBuilder(self.name, shard_index)
        rows = self._read_parquet(spec) if "row_group" in spec else self._read_jsonl(spec)
        pending: list[tuple[str, dict[str, Any]]] = []
        for ref, record in rows:
            pending.append((ref, record))
            if len(pending) >= BATCH_ROWS:
                yield from self._emit(builder, pending)
                pending = []
        yield from self._emit(builder, pending)
        table = builder.flush()
        if table is not None:
            yield table

    def _emit(self, builder: RawBuilder, pending: list[tuple[str, dict[str, Any]]]) -> Iterator[pa.Table]:
        """Adds ``pending`` records to ``builder``, fetching their URL images together first."""
        waiting = [rec for _, rec in pending if URL_KEY in rec]
        if waiting:
            urls = [rec[URL_KEY] for rec in waiting]
            try:
                results = fetch_all(urls, self.fetch or FetchSettings())
            except Exception as e:  # the fetcher reports per URL; this is a bug, not one URL
                results = [e] * len(urls)
            for rec, res in zip(waiting, results):
                url = rec.pop(URL_KEY)
                if isinstance(res, Exception):
                    rec.update(failure_fields(f"fetching image {url}", res))
                elif res.ok:
                    rec["image"] = res.data
                else:
                    rec.update(error=res.reason, error_detail=res.detail)
        for ref, rec in pending:
            table = builder.add(ref, **rec)
            if table is not None:
                yield table

    def _base_dir(self, uri: str) -> str:
        return storage.dirname(uri)

    def _read_jsonl(self, spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
        uri = spec["uri"]
        name = relative_name(uri, self.path)
        try:
            with self.roots().open(uri, self.storage_options, shown=name) as f:
                for ref, value, error, line in iter_json_records(f, spec["start"], spec["end"], name,
                                                                self.max_line_bytes):
                    excerpt = text_excerpt(line)
                    yield ref, error if value is None else self._guarded(ref, value, uri, excerpt)
        except Exception as e:  # the file, not a line: its unread lines are this one record
            yield f"{name}@{spec['start']}", {**failure_fields(f"reading {name}", e), **(
                {} if isinstance(e, Refused) else {"error": FILE_UNREADABLE})}

    def _read_parquet(self, spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
        uri = spec["uri"]
        name = relative_name(uri, self.path)
        group = spec["row_group"]
        first = num_rows = None
        try:
            with self.roots().open(uri, self.storage_options, shown=name) as f:
                pf = pq.ParquetFile(f)
                first = sum(pf.metadata.row_group(g).num_rows for g in range(group))
                num_rows = pf.metadata.row_group(group).num_rows
                table = pf.read_row_group(group)
                rows = table.to_pylist()
        except Exception as e:
            # A corrupt row group: each of its rows is a quarantined record (the count is in
            # the footer); an unreadable footer makes the group one record.
            fields = failure_fields(f"{name} row group {group}", e)
            if not isinstance(e, Refused):
                fields.update(error=FILE_UNREADABLE, error_detail=(
                    f"{name} row group {group} does not read ({type(e).__name__}: {str(e)[:200]}); "
                    "re-write the Parquet file"))
            if first is None or num_rows is None:
                yield f"{name}#row_group={group}", fields
            else:
                for i in range(num_rows):
                    yield f"{name}#row={first + i}", dict(fields)
            return
        type_errors = [e for n in CORE if n in table.column_names
                       if (e := _column_type_error(n, table.schema.field(n).type))]
        for i, row in enumerate(rows):
            ref = f"{name}#row={first + i}"
            if type_errors:
                yield ref, {"error": "wrong_type", "error_detail": "; ".join(type_errors),
                            "raw_excerpt": _row_excerpt(row), "doc_id": _maybe_id(row.get("doc_id"))}
                continue
            yield ref, self._guarded(ref, row, uri, None)

    def _guarded(self, ref: str, value: dict[str, Any], uri: str, excerpt: str | None) -> dict[str, Any]:
        """``_record``, with anything it raises turned into a quarantined record."""
        try:
            return self._record(value, uri, excerpt)
        except Exception as e:  # one record never aborts the ingest
            return {**failure_fields(ref, e), "raw_excerpt": excerpt or _row_excerpt(value),
                    "doc_id": _maybe_id(value.get("doc_id"))}

    def _record(self, value: dict[str, Any], uri: str, excerpt: str | None) -> dict[str, Any]:
        id_key = BEIR_ID if "doc_id" not in value and BEIR_ID in value else "doc_id"
        doc_id, id_error = int_or_str_id(value.get(id_key))
        errors = [id_error] if id_error else []
        for key in ("text", "caption", "modality"):
            v = value.get(key)
            if v is not None and not isinstance(v, (str, bytes)):
                errors.append(f"{key} must be a string, got {type(v).__name__} {v!r:.40}")
        image = value.get("image")
        if image is not None and image != "" and not isinstance(image, (str, bytes, bytearray)):
            errors.append(f"image must be a path/URI string or bytes, got {type(image).__name__}")
        if errors:
            return {"error": "wrong_type", "error_detail": "; ".join(errors),
                    "raw_excerpt": excerpt or _row_excerpt(value), "doc_id": doc_id}
        image_fields: dict[str, Any] = {}
        if isinstance(image, (bytes, bytearray)):
            image_fields["image"] = bytes(image)
        elif isinstance(image, str) and image:
            image_fields = self._image(image, uri)
            if "error" in image_fields:
                return {**image_fields, "raw_excerpt": excerpt or _row_excerpt(value), "doc_id": doc_id}
        # Free columns are stored: their URLs without credentials (pipelines.store.secrets).
        extra = {k: redact_text(v) if isinstance(v, str) else v for k, v in value.items()
                 if k not in CORE and k != id_key}
        return {
            "doc_id": doc_id, "text": value.get("text"), "caption": value.get("caption"),
            "modality": value.get("modality"), "metadata": metadata_json(extra), **image_fields,
        }

    def _image(self, image: str, manifest_uri: str) -> dict[str, Any]:
        """The raw image fields of a path/URI ``image``: its bytes, read only once the roots
        allow it; a URL for the fetcher (``URL_KEY``); or the error fields of a refusal."""
        if image.split("://", 1)[0].lower() in FETCH_SCHEMES and "://" in image:
            if self.image_mode != "inline":
                return {"error": URL_NOT_FETCHED, "error_detail": (
                    f"image {image!r:.200} is an http(s) URL; image_mode=uri stores URIs that later stages read "
                    "from storage, which cannot read URLs — use image_mode=inline (the URL fetcher stores the "
                    "bytes) or download the image next to the manifest")}
            if self.fetch is None:
                return {"error": URL_NOT_FETCHED, "error_detail": (
                    f"image {image!r:.200} is an http(s) URL and this manifest ingest has no URL fetcher; "
                    "turn it on (--fetch-urls, source.fetch_urls=true: timeouts, retries, a byte cap) or "
                    "download the image next to the manifest")}
            if self.fetch.signed_urls == "refuse" and url_has_credentials(image.strip()):
                return {"error": SIGNED_URL_REFUSED, "error_detail": (
                    f"image {redact_url(image.strip())!r:.300} carries credentials (userinfo or signature/token "
                    "parameters) and source.fetch.signed_urls=refuse; strip fetches it and stores nothing of them")}
            return {URL_KEY: image.strip()}
        uri = image if ("://" in image or image.startswith("/")) else storage.join(
            self._base_dir(manifest_uri), image)
        try:
            resolved, data = self.roots().read(uri, self.storage_options, shown=image)
        except Refused as r:
            return r.fields()
        except OSError as e:
            return {"error": "image_missing", "error_detail": f"cannot read image {image!r:.200}: {e}"}
        if data is None:
            # Missing: validation reports it (image_missing, naming the path) — it finds
            # nothing to read there either.
            return {"image_uri": resolved}
        return {"image": data, "image_uri": resolved}


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
