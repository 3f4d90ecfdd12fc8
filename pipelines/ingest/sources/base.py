"""What every source shares: the reader protocol, byte-range sharding of line files, and
building ``RAW_SCHEMA`` batches.

A source is a small picklable object with two halves:

* ``plan()`` runs once in the driver and returns shard specs (small JSON-able dicts: a file
  and a byte range, a row group, an index range). It never reads record contents.
* ``read(shard_index, spec)`` runs on a Ray worker and yields ``RAW_SCHEMA`` Arrow tables
  for that shard. It never raises for a bad record: it emits the record with ``error`` set,
  so validation quarantines it and nothing is lost. Every file it opens goes through
  ``roots()`` (``pipelines.ingest.confine``): only regular files inside the source's own
  folders and ``allow_roots``, after resolving symlinks; a refused file is a read error
  (``outside_root``, ``not_a_regular_file``, ``unsupported_uri``) and none of its bytes are
  read. What a record raises beyond the named rules becomes ``read_failed``.

Queries and qrels (``query_splits``, ``iter_queries``, ``iter_qrels``) are read by the
driver, one split at a time: they are orders of magnitude smaller than the corpus. A source
without its own query format takes BEIR queries and qrels (``attach_queries``).
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipelines.ingest.confine import Refused, Roots
from pipelines.store import schema as S
from pipelines.store import storage

logger = logging.getLogger(__name__)

#: Rows per emitted Arrow table: bounds worker memory with inline images.
BATCH_ROWS = 256
#: ``seq`` = shard index << SHARD_SHIFT | row within the shard: a global source order.
SHARD_SHIFT = 32
_READ_CHUNK = 1 << 20
#: The longest line a line file may hold (``source.max_line_mb``): a longer line is read past
#: in chunks without being held and becomes one quarantined record (``line_too_long``).
MAX_LINE_BYTES = 16 << 20


@dataclass
class Query:
    """One query of a split, as a source reads it (validated by the ingest job)."""

    qid: Any
    query: Any
    record_ref: str
    answer: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    #: The query's picture (encoded bytes, as read; validation normalises it): a composed
    #: query's reference image. ``None`` for a text query.
    image: bytes | None = None
    error: str | None = None
    error_detail: str | None = None
    raw_excerpt: str | None = None


@dataclass
class BadQrel:
    """A qrels line that cannot be read: ``iter_qrels`` yields it so it is quarantined."""

    record_ref: str
    reason: str
    detail: str
    excerpt: str | None = None


class Source:
    """Base class; subclasses set ``kind`` and implement ``plan`` and ``read``."""

    kind = "base"
    #: Queries and qrels from elsewhere (``pipelines.ingest.sources.beir.BeirQueries``).
    attached_queries: Any = None
    #: The longest line of a line file (``source.max_line_mb``; the run sets it).
    max_line_bytes: int = MAX_LINE_BYTES

    def __init__(self, name: str | None, storage_options: dict[str, str] | None = None,
                 image_mode: str = "inline", allow_roots: Iterable[str] = ()) -> None:
        self.name = name or self.kind
        self.storage_options = dict(storage_options or {})
        self.image_mode = image_mode
        #: Folders / object-store prefixes readable besides the source's own (``--allow-root``).
        self.allow_roots = tuple(allow_roots)
        self._roots: Roots | None = None

    def plan(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def read(self, shard_index: int, spec: dict[str, Any]) -> Iterator[pa.Table]:
        raise NotImplementedError

    def estimated_records(self) -> int | None:
        """Records to expect, when known cheaply (for the progress bar)."""
        return None

    def attach_queries(self, queries: Any) -> None:
        """Use ``queries`` (``splits``, ``iter_queries``, ``iter_qrels``) as this source's
        queries and qrels; for sources without a query format of their own."""
        self.attached_queries = queries

    def query_splits(self) -> list[str]:
        return self.attached_queries.splits() if self.attached_queries is not None else []

    def iter_queries(self, split: str) -> Iterator[Query]:
        return self.attached_queries.iter_queries(split) if self.attached_queries is not None else iter(())

    def iter_qrels(self, split: str) -> Iterator[tuple[str, str, int] | BadQrel]:
        """``(qid, doc_id, relevance)`` judgments (graded: ``> 0`` relevant), or ``BadQrel``."""
        return self.attached_queries.iter_qrels(split) if self.attached_queries is not None else iter(())

    def observe(self, table: pa.Table) -> pa.Table:
        """Sees every validated batch in the driver before it is committed, and returns it
        (a source that reports more than records — the URL fetcher's account — counts here
        and may drop its transient columns' content); the batch as is by default."""
        return table

    def fetch_report(self, seconds: float) -> dict[str, Any] | None:
        """What the source fetched over the network in a documents stage of ``seconds``, or
        None (no fetching)."""
        return None

    # helpers ----------------------------------------------------------------------------
    def fs(self, uri: str) -> tuple[pafs.FileSystem, str]:
        return storage.filesystem(uri, self.storage_options)

    def own_roots(self) -> list[str]:
        """The folders this source reads from by default (its folder, its images folder)."""
        return []

    def roots(self) -> Roots:
        """Where this source may read: ``own_roots()`` + ``allow_roots`` (resolved once; see
        ``pipelines.ingest.confine``)."""
        if self._roots is None or getattr(self, "_roots_from", None) != self.allow_roots:
            self._roots = Roots.of(*self.own_roots(), extra=self.allow_roots)
            self._roots_from = self.allow_roots
        return self._roots


class RawBuilder:
    """Accumulates raw records of one shard and emits ``RAW_SCHEMA`` tables."""

    def __init__(self, source: str, shard_index: int, batch_rows: int = BATCH_ROWS) -> None:
        self.source, self.batch_rows = source, batch_rows
        self.base = shard_index << SHARD_SHIFT
        self.cols = S.empty_raw()
        self.count = 0

    def add(self, record_ref: str, **fields: Any) -> pa.Table | None:
        """Add one record; returns a full table when ``batch_rows`` are buffered."""
        row = {S.SOURCE: self.source, S.RECORD_REF: record_ref, S.SEQ: self.base + self.count}
        row.update(fields)
        unknown = set(row) - set(self.cols)
        if unknown:
            raise KeyError(f"unknown raw fields {sorted(unknown)}; allowed {S.RAW_SCHEMA.names}")
        for name, values in self.cols.items():
            values.append(row.get(name))
        self.count += 1
        if len(self.cols[S.SOURCE]) >= self.batch_rows:
            return self.flush()
        return None

    def error(self, record_ref: str, reason: str, detail: str, excerpt: str | None = None,
              **fields: Any) -> pa.Table | None:
        return self.add(record_ref, error=reason, error_detail=detail, raw_excerpt=excerpt, **fields)

    def flush(self) -> pa.Table | None:
        if not self.cols[S.SOURCE]:
            return None
        table = pa.table(self.cols, schema=S.RAW_SCHEMA)
        self.cols = S.empty_raw()
        return table


#: Reason of a record (or a file) a reader failed on in a way no rule names (a bug or an
#: unforeseen input): quarantined with the exception, so one record never aborts an ingest.
READ_FAILED = "read_failed"
#: Reason of the records of a file that cannot be read (a corrupt Parquet file or row group).
FILE_UNREADABLE = "file_unreadable"


def failure_fields(what: str, e: BaseException) -> dict[str, Any]:
    """Raw error fields for an exception a record (or file) raised: ``refused`` reasons as
    they are, anything else ``read_failed`` naming ``what`` and the exception (never the
    bytes read)."""
    if isinstance(e, Refused):
        return e.fields()
    logger.warning("%s: %s: %s", what, type(e).__name__, e)
    return {"error": READ_FAILED, "error_detail": f"{what}: {type(e).__name__}: {str(e)[:300]}; the "
            "record was quarantined — fix the input or report this error"}


def refused_shard(uri: str, refused: Refused, **extra: Any) -> dict[str, Any]:
    """A shard spec for a file the plan refused: its reader emits one quarantined record."""
    return {"uri": uri, "refused": [refused.reason, refused.detail], **extra}


def refused_table(source: Source, shard_index: int, ref: str, spec: dict[str, Any]) -> pa.Table | None:
    """The one quarantined record of a ``refused_shard``."""
    builder = RawBuilder(source.name, shard_index)
    reason, detail = spec["refused"]
    builder.error(ref, reason, detail)
    return builder.flush()


def metadata_json(fields: dict[str, Any]) -> str | None:
    """Free metadata as a JSON object string (sorted keys), None when empty."""
    if not fields:
        return None
    return json.dumps(fields, sort_keys=True, ensure_ascii=False, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    return str(value)


def text_excerpt(data: bytes, n: int = 200) -> str:
    return data[:n].decode("utf-8", "backslashreplace")


# ---------------------------------------------------------------------------------------
# Line files, sharded by byte range
# ---------------------------------------------------------------------------------------


def byte_ranges(size: int, shard_bytes: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges covering ``size`` bytes; a line belongs to the range its first
    byte is in, so ranges need not fall on line boundaries."""
    if size <= 0:
        return []
    step = max(1, shard_bytes)
    return [(lo, min(lo + step, size)) for lo in range(0, size, step)]


LINE_TOO_LONG = "line_too_long"
#: Bytes of an over-long line kept for its quarantine excerpt.
_HEAD_BYTES = 1024


class OverlongLine(bytes):
    """What ``iter_lines`` yields for a line over its cap: the line's first bytes (so
    ``text_excerpt`` and ``strip`` work on it), with ``length`` (the whole line's, in bytes)
    and ``limit``. ``parse_json_line`` turns it into a ``line_too_long`` error."""

    length: int
    limit: int

    def __new__(cls, head: bytes, length: int, limit: int) -> OverlongLine:
        line = super().__new__(cls, head)
        line.length, line.limit = length, limit
        return line

    def detail(self) -> str:
        return (f"the line is {self.length} bytes; the limit is {self.limit} (source.max_line_mb) — it was "
                "read past, not parsed: split the record or raise the limit")


def iter_lines(f: pafs.NativeFile | Any, start: int, end: int,
               max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes]]:
    """``(offset, line)`` for every line whose first byte is in ``[start, end)``.

    ``f`` is a random-access file. The line is returned without its ``\\n`` (and ``\\r``);
    a line over ``max_line_bytes`` is an :class:`OverlongLine` (its head only). Linear in the
    bytes read, whatever the line lengths: each chunk is scanned once from an index and a
    line's pieces are joined once. Never holds more than one line (up to the cap) plus one
    chunk, and never reads more than the range plus one line past its end.
    """
    if start > 0:
        # The line containing byte start-1 belongs to the previous range (unless it ends
        # exactly there, then ours starts at `start`).
        base = start - 1
        skip = True
    else:
        base = 0
        skip = False
    f.seek(base)
    parts: list[bytes] = []  # the current line's pieces, dropped once it is over the cap
    head = b""
    length = 0
    line_pos = base
    over = False
    while True:
        chunk = f.read(_READ_CHUNK)
        if not chunk:
            break
        i, n = 0, len(chunk)
        while i < n:
            if not skip and line_pos >= end:
                return  # the next line is the next range's: not a byte more of it is read
            nl = chunk.find(b"\n", i)
            stop = n if nl < 0 else nl
            if not skip and stop > i:
                piece = chunk[i:stop]
                if len(head) < _HEAD_BYTES:
                    head += piece[: _HEAD_BYTES - len(head)]
                length += len(piece)
                if not over and length > max_line_bytes:
                    over, parts = True, []
                elif not over:
                    parts.append(piece)
            if nl < 0:
                break
            if not skip:
                yield line_pos, _line(parts, head, length, over, max_line_bytes)
            skip = False
            i = nl + 1
            line_pos, parts, head, length, over = base + i, [], b"", 0, False
        base += n
    if length and not skip and line_pos < end:
        yield line_pos, _line(parts, head, length, over, max_line_bytes)


def _line(parts: list[bytes], head: bytes, length: int, over: bool, limit: int) -> bytes:
    if over:
        return OverlongLine(head.rstrip(b"\r"), length, limit)
    line = parts[0] if len(parts) == 1 else b"".join(parts)
    return line.rstrip(b"\r")


def parse_json_line(line: bytes) -> tuple[dict[str, Any] | None, str | None, str | None]:
    """``(record, error_reason, detail)``: a dict, or why the line is not one (an
    :class:`OverlongLine` is ``line_too_long``, never parsed)."""
    if isinstance(line, OverlongLine):
        return None, LINE_TOO_LONG, line.detail()
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, "not_utf8", (f"line is not valid UTF-8 ({e.reason} at byte {e.start}); "
                                  "re-encode the file as UTF-8")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return None, "bad_json", f"line is not JSON ({e.msg} at column {e.colno}); fix or remove it"
    except (ValueError, RecursionError) as e:  # an integer of 4300+ digits, nesting past the stack
        return None, "bad_json", f"line is not JSON this reader takes ({type(e).__name__}: {str(e)[:120]}); " \
                                 "fix or remove it"
    if not isinstance(value, dict):
        return None, "wrong_type", f"line holds a JSON {type(value).__name__}, expected an object"
    return value, None, None


def iter_json_records(
    f: pafs.NativeFile | Any, start: int, end: int, name: str, max_line_bytes: int = MAX_LINE_BYTES,
) -> Iterator[tuple[str, dict[str, Any] | None, dict[str, Any] | None, bytes]]:
    """Every non-blank line of a JSON-lines byte range as ``(ref, record, error, line)``:
    ``ref`` is ``name@offset``; ``record`` the parsed object, or ``None`` with ``error``
    holding the raw row's error fields (reason, detail, excerpt) so it reaches quarantine
    (a line over ``max_line_bytes`` is ``line_too_long``, read past without being held)."""
    for offset, line in iter_lines(f, start, end, max_line_bytes):
        if not line.strip():
            continue
        value, reason, detail = parse_json_line(line)
        error = None if value is not None else {
            "error": reason, "error_detail": detail, "raw_excerpt": text_excerpt(line)}
        yield f"{name}@{offset}", value, error, line


def line_file_shards(source: Source, uri: str, shard_bytes: int, **extra: Any) -> list[dict[str, Any]]:
    """Shard specs ``{"uri", "start", "end", **extra}`` over one line file."""
    fs, path = source.fs(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri} does not exist; check the source path")
    return [{"uri": uri, "start": lo, "end": hi, **extra} for lo, hi in byte_ranges(info.size, shard_bytes)]


def parquet_shards(source: Source, uri: str, what: str) -> list[dict[str, Any]]:
    """One shard per row group of a Parquet file; a file that is refused or whose footer
    cannot be read is one quarantined shard naming it (``what``: "records", "URLs")."""
    import pyarrow.parquet as pq

    try:
        with source.roots().open(uri, source.storage_options) as f:
            groups = pq.ParquetFile(f).metadata.num_row_groups
    except Refused as r:
        return [refused_shard(uri, r)]
    except Exception as e:  # a corrupt footer: its rows cannot be counted
        return [refused_shard(uri, Refused(FILE_UNREADABLE, (
            f"{relative_name(uri, source.path)} is not a readable Parquet file ({type(e).__name__}: "
            f"{str(e)[:200]}); its {what} were not read — re-write the file")))]
    return [{"uri": uri, "row_group": g} for g in range(groups)]


def relative_name(uri: str, root: str) -> str:
    """``uri`` relative to ``root`` (for record refs), or its basename."""
    root = root.rstrip("/")
    if uri.startswith(root + "/"):
        return uri[len(root) + 1 :]
    return posixpath.basename(uri)


def int_or_str_id(value: Any) -> tuple[str | None, str | None]:
    """An id from JSON/Parquet as a string: strings as is, integers in decimal.

    Returns:
        ``(id, None)`` or ``(None, detail)`` when the type is wrong.
    """
    if value is None:
        return None, None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None, f"id must be a string or an integer, got {type(value).__name__} {value!r:.40}"
    return str(value), None


#: A grade: an optional sign and ASCII digits only (``str.isdigit`` also takes ``²``).
_GRADE_RE = re.compile(r"[+-]?[0-9]+")
#: Grades are stored as int32 (``qrels.relevance``).
GRADE_MIN, GRADE_MAX = -(2**31), 2**31 - 1


def parse_grade(text: str) -> tuple[int | None, str | None]:
    """A qrels grade as an int32, or ``(None, why not)``: an optional sign and ASCII digits
    only — ``+-5``, ``²``, ``٣``, ``1.0``, ``1e3``, ``1_0`` and the empty string are not
    grades, nor is anything beyond int32."""
    if not text:
        return None, "is empty (expected an integer)"
    if not _GRADE_RE.fullmatch(text):
        return None, f"{text[:40]!r} is not an integer (an optional sign and the digits 0-9)"
    if len(text.lstrip("+-").lstrip("0")) > 10:  # never int() of a huge digit string
        return None, f"{text[:40]} is beyond int32 ({GRADE_MIN}..{GRADE_MAX})"
    value = int(text)
    if not GRADE_MIN <= value <= GRADE_MAX:
        return None, f"{value} is beyond int32 ({GRADE_MIN}..{GRADE_MAX})"
    return value, None
