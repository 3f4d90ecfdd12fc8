"""Image URL lists (img2dataset's input): Parquet, JSON lines or CSV / TSV with a ``url``
column and optional ``caption``, ``text`` and ``doc_id``; every other column is metadata
(with the ``url``, the ``content_type`` served and the ``final_url`` after redirects).

``path`` is one list file or a folder of them (``*.parquet``, ``*.jsonl`` / ``*.json``,
``*.csv``, ``*.tsv``). JSON lines shard by byte range (``shard_bytes``, small: each row
costs a fetch), Parquet by row group, a CSV / TSV file is one shard. ``doc_id`` defaults
to ``url:`` + the first 32 hex digits of the URL's SHA-256, stable across re-ingests.

Each read task fetches its rows' images through :mod:`pipelines.ingest.fetch` (bounded
concurrency per task and per host, timeouts, retries, byte cap, Pillow check); the bytes
are stored inline. A failed fetch is a read error with the fetch's reason
(``fetch_http_404``, ``fetch_timeout``, …) and a detail naming the URL, so it is
quarantined, never dropped.

Re-runs fetch nothing already decided: before fetching, a task looks its doc_ids up in
``corpus/documents`` and ``corpus/quarantine`` under ``tables_root``. A document this
source stored from the same URL with the same caption and text is re-emitted from the
table (unchanged: the merge writes nothing); a URL whose fetch failed before is emitted as
the same quarantine record (nothing new) unless ``refetch_failed``. The driver counts what
happened (``observe`` / ``fetch_report``): fetched, failed by reason, skipped, bytes,
requests per second.

Network and credentials: the fetcher connects only to public addresses unless
``source.fetch.allow_private`` (:mod:`pipelines.ingest.address_policy`; a refusal is
``fetch_blocked_address``). A URL carrying credentials (``user:pass@``, ``X-Amz-Signature``,
``sig``, ``token``, … — :func:`pipelines.store.secrets.redact_url`) is fetched as given but
stored, shown and identified masked (``metadata.url``, ``final_url``, the derived doc_id,
quarantine detail and excerpt), so no credential reaches a table or its Delta statistics and
a re-signed URL is the same document; ``source.fetch.signed_urls=refuse`` quarantines it
instead (``signed_url_refused``).

Confinement (``pipelines.ingest.confine``): list files are read only when they are regular
files inside the list's folder or ``allow_roots``; a refused file (a symlink elsewhere, a
FIFO) or a Parquet file that does not read is one quarantined record, and the rest goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.ingest.address_policy import BLOCKED_REASON
from pipelines.ingest.confine import Refused, walk
from pipelines.ingest.fetch import SIGNED_URL_REFUSED, FetchSettings, check_url, fetch_all
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
)
from pipelines.ingest.validation import Rejected, normalise_text
from pipelines.store import schema as S
from pipelines.store import storage
from pipelines.store.secrets import redact_text, redact_url

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".tsv")
CORE = ("doc_id", "url", "caption", "text")
#: This run's fetch account, carried in the metadata to the driver and removed there.
FETCH_KEY = "_ciea_fetch"
SKIPPED_MARK = " [skipped: failed in an earlier run; source.fetch.refetch_failed=true fetches it again]"
_ATTEMPTS_RE = re.compile(r"\(after (\d+) attempts?\)")
#: Rows fetched together: bounds the bytes a task holds (rows x image size).
FETCH_CHUNK = 2 * BATCH_ROWS


def url_doc_id(url: str) -> str:
    return "url:" + hashlib.sha256(url.encode("utf-8")).hexdigest()[:32]


class UrlSource(Source):
    kind = "urls"

    def __init__(self, path: str, fetch: FetchSettings | None = None, tables_root: str | None = None,
                 shard_bytes: int = 256 << 10, name: str | None = None,
                 storage_options: dict[str, str] | None = None, refetch_failed: bool = False,
                 allow_roots: Iterable[str] = ()) -> None:
        super().__init__(name, storage_options, "inline", allow_roots)
        self.path = storage.normalise_uri(path)
        self.fetch = fetch or FetchSettings()
        self.tables_root = tables_root
        self.shard_bytes = shard_bytes
        self.refetch_failed = refetch_failed
        self._stats: dict[str, Any] = _empty_stats()

    def own_roots(self) -> list[str]:
        """The list's folder: ``path`` when it is a folder, else the file's folder."""
        fs, path = self.fs(self.path)
        is_dir = fs.get_file_info(path).type == pafs.FileType.Directory
        return [self.path if is_dir else storage.dirname(self.path)]

    # plan ---------------------------------------------------------------------------------
    def files(self) -> list[tuple[str, Refused | None]]:
        """The list files in name order, each with its refusal (a symlink out of the roots,
        a FIFO), if any: a refused file becomes one quarantined record."""
        fs, path = self.fs(self.path)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"URL list {self.path} does not exist; check source.path")
        if info.type != pafs.FileType.Directory:
            try:
                self.roots().check(self.path, self.storage_options)
            except Refused as r:
                return [(self.path, r)]
            return [(self.path, None)]
        suffixes = JSONL_SUFFIXES + PARQUET_SUFFIXES + CSV_SUFFIXES
        found = [(storage.join(self.path, e.rel), e.refused)
                 for e in walk(self.path, self.roots(), self.storage_options) if e.rel.endswith(suffixes)]
        if not found:
            raise FileNotFoundError(f"no URL list files (*.parquet, *.jsonl, *.csv, *.tsv) under {self.path}")
        return sorted(found, key=lambda f: f[0])

    def plan(self) -> list[dict[str, Any]]:
        shards: list[dict[str, Any]] = []
        for uri, refused in self.files():
            if refused is not None:
                shards.append(refused_shard(uri, refused))
            elif uri.endswith(PARQUET_SUFFIXES):
                shards += parquet_shards(self, uri, "URLs")
            elif uri.endswith(CSV_SUFFIXES):
                shards.append({"uri": uri, "csv": True})
            else:
                shards += line_file_shards(self, uri, self.shard_bytes)
        return shards

    # read ---------------------------------------------------------------------------------
    def read(self, shard_index: int, spec: dict[str, Any]) -> Iterator[pa.Table]:
        if "refused" in spec:
            table = refused_table(self, shard_index, relative_name(spec["uri"], self.path), spec)
            if table is not None:
                yield table
            return
        builder = RawBuilder(self.name, shard_index)
        rows = list(self._rows(spec))
        stored, failed = self._lookup([r[1]["doc_id"] for r in rows if r[1].get("doc_id") and "error" not in r[1]])
        for lo in range(0, len(rows), FETCH_CHUNK):
            chunk = rows[lo : lo + FETCH_CHUNK]
            for ref, fields in self._resolve(chunk, stored, failed):
                table = builder.add(ref, **fields)
                if table is not None:
                    yield table
        table = builder.flush()
        if table is not None:
            yield table

    def _resolve(self, chunk: list[tuple[str, dict[str, Any]]], stored: dict[str, dict[str, Any]],
                 failed: dict[str, list[dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
        """The chunk's raw records: stored ones re-emitted, known failures repeated, the rest fetched."""
        decided: dict[int, dict[str, Any]] = {}
        reuse: dict[int, str] = {}
        to_fetch: list[int] = []
        for i, (_, rec) in enumerate(chunk):
            if "error" in rec:
                decided[i] = rec
                continue
            doc_id, url = rec["doc_id"], rec["url"]
            old = stored.get(doc_id)
            if old is not None and _same(old, rec):
                reuse[i] = doc_id
                continue
            earlier = next((q for q in failed.get(doc_id, []) if q[S.DETAIL].startswith(f"GET {url}:")), None)
            if earlier is not None and not self.refetch_failed:
                decided[i] = {**_fields(rec), "error": earlier[S.REASON], "raw_excerpt": url[:200],
                              "error_detail": earlier[S.DETAIL].removesuffix(SKIPPED_MARK) + SKIPPED_MARK}
                continue
            to_fetch.append(i)
        images = self._stored_images(list(reuse.values()))
        for i, doc_id in reuse.items():
            rec = chunk[i][1]
            decided[i] = {**_fields(rec, {"skipped": True}), "image": images.get(doc_id),
                          "modality": stored[doc_id][S.MODALITY]}
        results = fetch_all([chunk[i][1]["fetch_url"] for i in to_fetch], self.fetch)
        for i, res in zip(to_fetch, results):
            rec = chunk[i][1]
            info = {"attempts": res.attempts, "bytes": res.bytes}
            if res.ok:
                decided[i] = {**_fields(rec, info, _facts(res)), "image": res.data, "modality": "image"}
            else:
                decided[i] = {**_fields(rec, info), "error": res.reason, "error_detail": res.detail,
                              "raw_excerpt": rec["url"][:200]}
        for i, (ref, _) in enumerate(chunk):
            yield ref, decided[i]

    # the list files -----------------------------------------------------------------------
    def _rows(self, spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
        name = relative_name(spec["uri"], self.path)
        try:
            yield from self._list_rows(spec, name)
        except Exception as e:  # the file, not a row: its unread rest is this one record
            fields = failure_fields(f"reading {name}", e)
            if not isinstance(e, Refused):
                fields["error"] = FILE_UNREADABLE
            where = f"#row_group={spec['row_group']}" if "row_group" in spec else f"@{spec.get('start', 0)}"
            yield f"{name}{where}", fields

    def _list_rows(self, spec: dict[str, Any], name: str) -> Iterator[tuple[str, dict[str, Any]]]:
        uri = spec["uri"]
        roots, opts = self.roots(), self.storage_options
        if "row_group" in spec:
            with roots.open(uri, opts, shown=name) as f:
                pf = pq.ParquetFile(f)
                table = pf.read_row_group(spec["row_group"])
                first = sum(pf.metadata.row_group(g).num_rows for g in range(spec["row_group"]))
            for i, row in enumerate(table.to_pylist()):
                yield f"{name}#row={first + i}", self._record(row)
        elif spec.get("csv"):
            parse = pacsv.ParseOptions(delimiter="\t" if uri.endswith(".tsv") else ",")
            with roots.open(uri, opts, shown=name) as f:
                table = pacsv.read_csv(f, parse_options=parse, convert_options=pacsv.ConvertOptions(
                    strings_can_be_null=True, column_types={c: pa.string() for c in CORE}))
            for i, row in enumerate(table.to_pylist()):
                yield f"{name}#row={i}", self._record(row)
        else:
            with roots.open(uri, opts, shown=name) as f:
                for ref, value, error, _ in iter_json_records(f, spec["start"], spec["end"], name,
                                                              self.max_line_bytes):
                    yield ref, error if value is None else self._record(value)

    def _record(self, value: dict[str, Any]) -> dict[str, Any]:
        url = value.get("url")
        doc_id, id_error = int_or_str_id(value.get("doc_id"))
        # Redacted before it is cut: a cut URL's userinfo would no longer look like one.
        excerpt = redact_text(json.dumps({k: v for k, v in value.items() if not isinstance(v, bytes)},
                                         default=str))[:200]
        problem = id_error or check_url(url)
        if problem:
            return {"error": "bad_url" if not id_error else "wrong_type", "error_detail": problem,
                    "raw_excerpt": excerpt, "doc_id": doc_id}
        url = url.strip()
        shown = redact_url(url)  # what is stored and shown; the fetch alone uses ``url``
        if shown != url and self.fetch.signed_urls == "refuse":
            return {"error": SIGNED_URL_REFUSED, "raw_excerpt": excerpt, "doc_id": doc_id or url_doc_id(shown),
                    "error_detail": f"url {shown!r:.300} carries credentials (userinfo or signature/token "
                                    "parameters) and source.fetch.signed_urls=refuse; strip stores it without them"}
        for key in ("caption", "text"):
            v = value.get(key)
            if v is not None and not isinstance(v, str):
                return {"error": "wrong_type", "error_detail": f"{key} must be a string, got {type(v).__name__}",
                        "raw_excerpt": excerpt, "doc_id": doc_id}
        extra = {k: redact_text(v) if isinstance(v, str) else v for k, v in value.items() if k not in CORE}
        return {"doc_id": doc_id or url_doc_id(shown), "url": shown, "fetch_url": url,
                "caption": value.get("caption"), "text": value.get("text"), "extra": extra}

    # what earlier runs decided ------------------------------------------------------------
    def _open(self, which: str):
        if not self.tables_root:
            return None
        from pipelines.store.delta_tables import TableNotFoundError, Tables

        tables = Tables(self.tables_root, self.storage_options)
        try:
            return tables.open(getattr(tables, which))
        except TableNotFoundError:
            return None

    def _lookup(self, ids: list[str]) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
        """Stored documents of this source and its earlier fetch failures, for ``ids``."""
        stored: dict[str, dict[str, Any]] = {}
        failed: dict[str, list[dict[str, Any]]] = {}
        if not ids:
            return stored, failed
        docs = self._open("documents")
        if docs is not None:
            t = _rows_for(docs, ids, [S.DOC_ID, S.SOURCE, S.MODALITY, S.CAPTION, S.TEXT, S.METADATA])
            t = t.filter(pc.equal(t[S.SOURCE], self.name))
            for r in t.to_pylist():
                stored[r[S.DOC_ID]] = r
        quarantine = self._open("quarantine")
        if quarantine is not None:
            t = _rows_for(quarantine, ids, [S.DOC_ID, S.SOURCE, S.REASON, S.DETAIL])
            for r in t.to_pylist():
                if r[S.SOURCE] == self.name and (r[S.REASON] or "").startswith("fetch_") and r[S.DETAIL]:
                    failed.setdefault(r[S.DOC_ID], []).append(r)
        return stored, failed

    def _stored_images(self, ids: list[str]) -> dict[str, bytes]:
        docs = self._open("documents") if ids else None
        if docs is None:
            return {}
        t = _rows_for(docs, ids, [S.DOC_ID, S.IMAGE])
        return dict(zip(t[S.DOC_ID].to_pylist(), t[S.IMAGE].to_pylist()))

    # the driver's account -----------------------------------------------------------------
    def observe(self, table: pa.Table) -> pa.Table:
        """Counts one validated batch into the fetch report (driver side) and takes the
        fetch's account out of the metadata: attempts and skips differ from run to run, the
        stored document must not."""
        st = self._stats
        metadata_out = []
        for status, reason, detail, metadata in zip(*(table[c].to_pylist() for c in (
                S.STATUS, S.REASON, S.DETAIL, S.METADATA))):
            meta = json.loads(metadata) if metadata else None
            info = meta.pop(FETCH_KEY, None) if isinstance(meta, dict) else None
            metadata_out.append(metadata_json(meta) if info is not None else metadata)
            if status == S.STATUS_OK:
                info = info or {}
                if info.get("skipped"):
                    st["skipped_stored"] += 1
                    continue
                st["fetched"] += 1
                st["bytes"] += int(info.get("bytes") or 0)
                st["requests"] += int(info.get("attempts") or 0)
            elif reason and reason.startswith("fetch_"):
                if detail and detail.endswith(SKIPPED_MARK):
                    st["skipped_failed"] += 1
                    continue
                st["failed_by_reason"][reason] += 1
                if reason == BLOCKED_REASON:
                    continue  # refused before its request (or at a redirect): not counted as requests
                m = _ATTEMPTS_RE.search(detail or "")
                st["requests"] += int(m.group(1)) if m else 1
        index = table.schema.get_field_index(S.METADATA)
        return table.set_column(index, table.schema.field(index), pa.array(metadata_out, pa.string()))

    def fetch_report(self, seconds: float) -> dict[str, Any] | None:
        """Fetched / failed by reason / skipped / bytes / requests (per second of ``seconds``)."""
        st = self._stats
        failed = dict(sorted(st["failed_by_reason"].items()))
        return {"fetched": st["fetched"], "failed": sum(failed.values()), "failed_by_reason": failed,
                "skipped_stored": st["skipped_stored"], "skipped_failed": st["skipped_failed"],
                "bytes": st["bytes"], "requests": st["requests"],
                "requests_per_s": round(st["requests"] / seconds, 1) if seconds > 0 else None}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_stats"] = _empty_stats()  # workers count nothing; the driver observes
        return state


def _rows_for(table: Any, ids: list[str], columns: list[str]) -> pa.Table:
    """``columns`` of the Delta table's rows whose doc_id is in ``ids`` (plain Arrow types).

    The filter casts first: files written by a merge hold ``string_view`` columns, which
    deltalake's own ``filters=`` cannot compare with a plain string."""
    from pipelines.store.schema import plain_types

    expr = pc.field(S.DOC_ID).cast(pa.string()).isin(pa.array(ids, pa.string()))
    return plain_types(table.to_pyarrow_dataset().to_table(columns=columns, filter=expr))


def _empty_stats() -> dict[str, Any]:
    return {"fetched": 0, "failed_by_reason": Counter(), "skipped_stored": 0, "skipped_failed": 0,
            "bytes": 0, "requests": 0}


def _facts(res: Any) -> dict[str, Any]:
    """What a successful fetch says about the image, kept in the stored metadata."""
    facts = {"content_type": res.content_type}
    if res.final_url and res.final_url != redact_url(res.url):  # both redacted: a hop, not a mask
        facts["final_url"] = res.final_url
    return facts


def _fields(rec: dict[str, Any], fetch: dict[str, Any] | None = None,
            facts: dict[str, Any] | None = None) -> dict[str, Any]:
    """Raw fields of a list row; ``fetch`` (this run's account) is taken out again by
    ``observe`` before the document is stored, ``facts`` stay."""
    meta = {"url": rec["url"], **rec["extra"], **(facts or {})}
    if fetch is not None:
        meta[FETCH_KEY] = fetch
    return {"doc_id": rec["doc_id"], "caption": rec["caption"], "text": rec["text"], "metadata": metadata_json(meta)}


def _same(stored: dict[str, Any], rec: dict[str, Any]) -> bool:
    """Whether the stored document came from this URL with this caption and text."""
    try:
        meta = json.loads(stored[S.METADATA] or "{}")
        return (meta.get("url") == rec["url"] and stored[S.MODALITY] == "image"
                and stored[S.CAPTION] == normalise_text(rec["caption"], "caption", 1 << 30)
                and stored[S.TEXT] == normalise_text(rec["text"], "text", 1 << 30))
    except (Rejected, ValueError, TypeError):
        return False
