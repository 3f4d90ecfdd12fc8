"""Queries and relevance judgments in the BEIR layout, for any corpus source.

Files under ``path`` (a local folder or ``s3://`` prefix):

* ``queries.jsonl`` — JSON lines ``{"_id", "text", ...}``; other keys (BEIR's
  ``metadata``, anything else) are kept as the query's metadata. A row may carry
  ``"image": "<path>"`` (relative to the folder, or absolute): the query's picture (a
  composed query's reference image). It is read through the same confinement (inside the
  folder or an ``allow_roots`` entry, a regular file, at most ``max_image_bytes`` + 1 bytes
  read) and validated like a corpus image by the ingest job; a query whose image is missing
  (``image_missing``), outside the roots (``outside_root``, ...), not a string
  (``wrong_type``) or not an image the project takes (``image_too_large``,
  ``image_unrecognised``, ``image_decode_failed``) is quarantined with that reason, never
  stored without its picture;
* ``qrels/<split>.tsv`` — tab-separated ``query-id  corpus-id  score`` with that header
  line (a file without it is read too). Each file is a split; its name (``train``,
  ``dev``, ``test``, …) is the split's.

A split's queries are the ``queries.jsonl`` entries whose ``_id`` its qrels name, in file
order; a qid the qrels name that ``queries.jsonl`` lacks is a query read error
(``missing_query``), quarantined with the qrels line. Scores are graded judgments and
stored as they are (``relevance``: ``> 0`` relevant, ``0`` judged non-relevant); a qrels
line without three fields is quarantined (``bad_qrel``), and so is one whose grade is not a
plain ASCII integer within int32 (``bad_grade``: ``+-5``, ``²``, ``1.0``, ``1e3``, an empty
grade, ``2147483648``) — never dropped, and never an error that stops the ingest after
its documents are committed. A ``queries.jsonl`` line that is not a JSON object is
quarantined once, with the first split. A line over ``max_line_bytes``
(``source.max_line_mb``) in either file is read past without being held and quarantined
(``line_too_long``); lines are read in linear time whatever their length.

Everything is read by the driver, one split at a time (queries are small next to a corpus);
``check()`` validates the layout before Ray starts. The folder is confined like a corpus
source (``pipelines.ingest.confine``): ``queries.jsonl`` and every ``qrels/*.tsv`` must be
regular files that resolve inside the folder or an ``allow_roots`` entry — a symlink out of
it, a FIFO or a device is refused by ``check()`` with one line, before a byte is read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator

import pyarrow.fs as pafs

from pipelines.ingest.confine import Refused, Roots
from pipelines.ingest.sources.base import (
    LINE_TOO_LONG,
    MAX_LINE_BYTES,
    BadQrel,
    OverlongLine,
    Query,
    int_or_str_id,
    iter_lines,
    parse_grade,
    parse_json_line,
    text_excerpt,
)
from pipelines.store import storage
from pipelines.store.images import MAX_IMAGE_BYTES

logger = logging.getLogger(__name__)

QUERIES_FILE = "queries.jsonl"
QRELS_DIR = "qrels"
#: The key of a ``queries.jsonl`` row that names the query's picture.
IMAGE_KEY = "image"
HEADER = ("query-id", "corpus-id", "score")


class BeirQueries:
    """The queries and qrels of a BEIR folder (picklable: a path, storage options, roots)."""

    def __init__(self, path: str, storage_options: dict[str, str] | None = None,
                 allow_roots: Iterable[str] = (), max_line_bytes: int = MAX_LINE_BYTES,
                 max_image_bytes: int = MAX_IMAGE_BYTES) -> None:
        self.path = storage.normalise_uri(path)
        self.max_image_bytes = max_image_bytes
        self.max_line_bytes = max_line_bytes
        self.storage_options = dict(storage_options or {})
        self.roots = Roots.of(self.path, extra=allow_roots)

    def _uri(self, *parts: str) -> str:
        return storage.join(self.path, *parts)

    def check(self) -> None:
        """Raises FileNotFoundError / ValueError naming what is missing or malformed and the fix."""
        if not storage.exists(self._uri(QUERIES_FILE), self.storage_options):
            raise FileNotFoundError(f"BEIR queries folder {self.path} lacks {QUERIES_FILE}; --queries takes a "
                                    f"folder with {QUERIES_FILE} and {QRELS_DIR}/<split>.tsv")
        if not self.splits():
            raise FileNotFoundError(f"BEIR queries folder {self.path} has no {QRELS_DIR}/<split>.tsv files; add "
                                    f"e.g. {QRELS_DIR}/test.tsv with the header 'query-id<TAB>corpus-id<TAB>score'")
        for parts in [(QUERIES_FILE,), *((QRELS_DIR, f"{split}.tsv") for split in self.splits())]:
            try:
                self.roots.check(self._uri(*parts), self.storage_options, shown="/".join(parts))
            except Refused as e:
                raise ValueError(f"BEIR queries folder {self.path}: {e.detail}") from None

    def splits(self) -> list[str]:
        fs, path = storage.filesystem(self._uri(QRELS_DIR), self.storage_options)
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return []
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
        # Anything named *.tsv is a split, a FIFO or a device too: check() refuses those
        # by name rather than skipping them in silence.
        names = [i.base_name[: -len(".tsv")] for i in infos
                 if i.type != pafs.FileType.Directory and i.base_name.endswith(".tsv")]
        return sorted(n for n in names if n)

    def _lines(self, *parts: str) -> Iterator[tuple[int, bytes]]:
        # Confined again at open: the folder may have changed since check().
        with self.roots.open(self._uri(*parts), self.storage_options, shown="/".join(parts)) as f:
            yield from iter_lines(f, 0, _size(f), self.max_line_bytes)

    def _qrel_rows(self, split: str) -> Iterator[tuple[str, str, int] | BadQrel]:
        name = f"{QRELS_DIR}/{split}.tsv"
        first = True
        for offset, line in self._lines(QRELS_DIR, f"{split}.tsv"):
            if not line.strip():
                continue
            ref = f"{name}@{offset}"
            if isinstance(line, OverlongLine):
                first = False
                yield BadQrel(ref, LINE_TOO_LONG, line.detail(), text_excerpt(line))
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield BadQrel(ref, "not_utf8", f"qrels line is not UTF-8 ({e.reason} at byte {e.start}); "
                              "re-encode the file as UTF-8", text_excerpt(line))
                continue
            parts = [p.strip() for p in text.split("\t")] if "\t" in text else text.split()
            if first:
                first = False
                if tuple(p.lower() for p in parts) == HEADER:
                    continue
            if len(parts) != 3 or not parts[0] or not parts[1]:
                yield BadQrel(ref, "bad_qrel", f"{text[:80]!r} is not 'query-id<TAB>corpus-id<TAB>score' with an "
                              "integer score; fix or remove the line", text[:200])
                continue
            grade, problem = parse_grade(parts[2])
            if grade is None:
                yield BadQrel(ref, "bad_grade", f"the grade of query {parts[0][:80]!r}, document "
                              f"{parts[1][:80]!r} {problem}; fix or remove the line", text[:200])
                continue
            yield parts[0], parts[1], grade

    def iter_qrels(self, split: str) -> Iterator[tuple[str, str, int] | BadQrel]:
        yield from self._qrel_rows(split)

    def iter_queries(self, split: str) -> Iterator[Query]:
        wanted: dict[str, None] = {}
        for row in self._qrel_rows(split):
            if not isinstance(row, BadQrel):
                wanted.setdefault(row[0], None)
        report_bad_lines = split == self.splits()[0]
        found: set[str] = set()
        for offset, line in self._lines(QUERIES_FILE):
            if not line.strip():
                continue
            ref = f"{QUERIES_FILE}@{offset}"
            value, reason, detail = parse_json_line(line)
            if value is None:
                if report_bad_lines:
                    yield Query(None, None, ref, error=reason, error_detail=detail, raw_excerpt=text_excerpt(line))
                continue
            qid, id_error = int_or_str_id(value.get("_id"))
            if id_error or qid is None:
                if report_bad_lines:
                    yield Query(None, None, ref, error="wrong_type" if id_error else "missing_qid",
                                error_detail=id_error or "the query has no _id; every BEIR query needs one",
                                raw_excerpt=text_excerpt(line))
                continue
            if qid not in wanted:
                continue
            found.add(qid)
            extra = {k: v for k, v in value.items() if k not in ("_id", "text", IMAGE_KEY)}
            if value.get(IMAGE_KEY) is None:
                yield Query(qid, value.get("text"), ref, metadata=extra)
                continue
            image, error = self._query_image(value[IMAGE_KEY])
            if error is not None:
                yield Query(qid, value.get("text"), ref, error=error[0], error_detail=f"query {qid!r:.80}: {error[1]}",
                            raw_excerpt=text_excerpt(line))
                continue
            extra[IMAGE_KEY] = value[IMAGE_KEY]  # the path as written, for lineage
            yield Query(qid, value.get("text"), ref, metadata=extra, image=image)
        missing = [q for q in wanted if q not in found]
        for qid in missing:
            yield Query(qid, None, f"{QRELS_DIR}/{split}.tsv:{qid}", error="missing_query",
                        error_detail=f"{QRELS_DIR}/{split}.tsv judges query {qid!r} but {QUERIES_FILE} has no "
                                     "line with that _id; add the query or remove its judgments",
                        raw_excerpt=qid[:200])
        if missing:
            logger.info("%s/%s: %d judged queries are not in %s", self.path, split, len(missing), QUERIES_FILE)


    def _query_image(self, image: object) -> tuple[bytes | None, tuple[str, str] | None]:
        """``(bytes, None)`` of a row's picture, or ``(None, (reason, detail))``: confined to the
        roots, at most ``max_image_bytes`` + 1 bytes read (validation names the cap)."""
        if not isinstance(image, str) or not image.strip():
            return None, ("wrong_type", f"{IMAGE_KEY!r} must be a non-empty path string, got {image!r:.80}")
        image = image.strip()
        uri = image if ("://" in image or image.startswith("/")) else storage.join(self.path, image)
        try:
            with self.roots.open_file(uri, self.storage_options, shown=image) as f:
                return f.read(self.max_image_bytes + 1), None
        except Refused as r:
            return None, (r.reason, r.detail)
        except OSError as e:  # missing (FileNotFoundError) or unreadable
            return None, ("image_missing", f"cannot read image {image!r:.200}: {type(e).__name__}; put the file "
                          f"under {self.path} or fix the path")


def _size(f) -> int:
    """Bytes in an open file: a pyarrow file knows its size, a local one is asked."""
    return f.size() if hasattr(f, "size") else os.fstat(f.fileno()).st_size
