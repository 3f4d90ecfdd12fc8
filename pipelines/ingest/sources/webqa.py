"""WebQA as released for UniVL-DR / MARVEL / CIEA (see CIEA_METHOD.md, "Data and metrics").

Files under ``path``:

* ``all_docs.json`` — JSON lines ``{snippet_id, fact, ...}`` → text documents
  (``doc_id`` = ``snippet_id``, ``text`` = ``fact``, other keys → metadata);
* ``all_imgs.json`` — JSON lines ``{image_id, caption, title, ...}`` → image documents
  (``doc_id`` = ``str(image_id)``, ``caption``, other keys → metadata);
* ``imgs.tsv`` — ``image_id \\t base64(JPEG)`` lines, and ``imgs.lineidx.new`` —
  ``image_id \\t byte offset`` of each line in ``imgs.tsv``. Each worker loads the (small)
  line index once and seeks straight to the images of its shard: ``imgs.tsv`` (≈ 40 GB for
  the full corpus) is never read whole, and shards read it in parallel;
* ``train.json`` / ``dev.json`` / ``test.json`` — JSON lines
  ``{qid, Q, A, img_posFacts, img_negFacts, txt_posFacts, txt_negFacts, ...}`` → queries;
  qrels are the positive facts, or ``<split>_qrels.txt`` (``qid \\t doc_id \\t 1``, or the
  four-column TREC form) when that file exists — then it is authoritative for the split.

Documents shard by byte range of ``all_docs.json`` / ``all_imgs.json``. An image whose id
has no line-index entry, whose ``imgs.tsv`` line names another id, or whose base64 does not
decode is a read error (quarantined), never skipped.

Confinement (``pipelines.ingest.confine``): the layout's files must be regular files inside
``path`` (or ``allow_roots``) after resolving symlinks; otherwise ``plan`` stops the ingest
with the reason before anything is read.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa

from pipelines.ingest.confine import Refused, Roots
from pipelines.ingest.sources.base import (
    LINE_TOO_LONG,
    BadQrel,
    OverlongLine,
    Query,
    RawBuilder,
    Source,
    int_or_str_id,
    iter_json_records,
    iter_lines,
    line_file_shards,
    metadata_json,
    parse_grade,
    parse_json_line,
    text_excerpt,
)
from pipelines.store import storage

DOCS_FILE = "all_docs.json"
IMGS_FILE = "all_imgs.json"
TSV_FILE = "imgs.tsv"
LINEIDX_FILE = "imgs.lineidx.new"
SPLIT_FILES = {"train": "train.json", "dev": "dev.json", "test": "test.json"}
#: Caption lines are ~100 bytes but each pulls a ~30 KB image: image shards cover fewer bytes.
IMAGE_SHARD_DIVISOR = 32

# Per worker process: the line index of each imgs.tsv, loaded once.
_LINEIDX_CACHE: dict[str, dict[str, int]] = {}


def load_lineidx(uri: str, storage_options: dict[str, str] | None, roots: Roots | None = None) -> dict[str, int]:
    """``image_id -> byte offset`` from ``imgs.lineidx.new`` (cached per process); read
    through ``roots`` (confined) when given."""
    if uri not in _LINEIDX_CACHE:
        if roots is not None:
            with roots.open(uri, storage_options) as f:
                data = f.read().decode("utf-8")
        else:
            data = storage.read_bytes(uri, storage_options).decode("utf-8")
        index: dict[str, int] = {}
        for n, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[1].strip().isdigit():
                raise ValueError(f"{uri} line {n} is not 'image_id<TAB>byte offset': {line[:80]!r}; "
                                 "regenerate the line index for imgs.tsv")
            index[parts[0].strip()] = int(parts[1])
        _LINEIDX_CACHE.clear()  # one corpus per worker at a time
        _LINEIDX_CACHE[uri] = index
    return _LINEIDX_CACHE[uri]


def read_tsv_line(f: Any, offset: int) -> bytes:
    """The ``imgs.tsv`` line starting at ``offset`` (without the newline)."""
    f.seek(offset)
    chunks = []
    while True:
        chunk = f.read(1 << 16)
        if not chunk:
            break
        nl = chunk.find(b"\n")
        if nl >= 0:
            chunks.append(chunk[:nl])
            break
        chunks.append(chunk)
    return b"".join(chunks).rstrip(b"\r")


class WebQASource(Source):
    kind = "webqa"

    def __init__(self, path: str, shard_bytes: int = 8 << 20, name: str | None = None,
                 storage_options: dict[str, str] | None = None, with_queries: bool = True,
                 allow_roots: Iterable[str] = ()) -> None:
        super().__init__(name, storage_options, "inline", allow_roots)
        self.path = storage.normalise_uri(path)
        self.shard_bytes = shard_bytes
        self.with_queries = with_queries

    def own_roots(self) -> list[str]:
        return [self.path]

    def _uri(self, name: str) -> str:
        return storage.join(self.path, name)

    def plan(self) -> list[dict[str, Any]]:
        for required in (DOCS_FILE, IMGS_FILE, TSV_FILE, LINEIDX_FILE):
            if not storage.exists(self._uri(required), self.storage_options):
                raise FileNotFoundError(
                    f"WebQA source {self.path} lacks {required}; expected {DOCS_FILE}, {IMGS_FILE}, "
                    f"{TSV_FILE} and {LINEIDX_FILE} (the UniVL-DR release layout)")
            try:  # the layout's own files: one outside the roots or a FIFO stops the ingest here
                self.roots().check(self._uri(required), self.storage_options, shown=required)
            except Refused as r:
                raise ValueError(f"WebQA source {self.path}: {r.reason}: {r.detail}") from None
        return (line_file_shards(self, self._uri(DOCS_FILE), self.shard_bytes, part="docs")
                + line_file_shards(self, self._uri(IMGS_FILE),
                                   max(1, self.shard_bytes // IMAGE_SHARD_DIVISOR), part="imgs"))

    def read(self, shard_index: int, spec: dict[str, Any]) -> Iterator[pa.Table]:
        builder = RawBuilder(self.name, shard_index)
        roots = self.roots()
        name = DOCS_FILE if spec["part"] == "docs" else IMGS_FILE
        tsv = None
        if spec["part"] == "imgs":
            lineidx = load_lineidx(self._uri(LINEIDX_FILE), self.storage_options, roots)
            tsv = roots.open_file(self._uri(TSV_FILE), self.storage_options, shown=TSV_FILE)
        try:
            with roots.open(spec["uri"], self.storage_options, shown=name) as f:
                for ref, value, error, line in iter_json_records(f, spec["start"], spec["end"], name,
                                                                self.max_line_bytes):
                    if value is None:
                        fields = error
                    elif spec["part"] == "docs":
                        fields = self._text_doc(value, line)
                    else:
                        fields = self._image_doc(value, line, lineidx, tsv)
                        if "tsv_ref" in fields:
                            ref = f"{ref} → {TSV_FILE}@{fields.pop('tsv_ref')}"
                    table = builder.add(ref, **fields)
                    if table is not None:
                        yield table
        finally:
            if tsv is not None:
                tsv.close()
        table = builder.flush()
        if table is not None:
            yield table

    @staticmethod
    def _text_doc(value: dict[str, Any], line: bytes) -> dict[str, Any]:
        doc_id, id_error = int_or_str_id(value.get("snippet_id"))
        fact = value.get("fact")
        if id_error or (fact is not None and not isinstance(fact, str)):
            return {"error": "wrong_type", "raw_excerpt": text_excerpt(line), "doc_id": doc_id,
                    "error_detail": id_error or f"fact must be a string, got {type(fact).__name__}"}
        extra = {k: v for k, v in value.items() if k not in ("snippet_id", "fact")}
        return {"doc_id": doc_id, "modality": "text", "text": fact, "metadata": metadata_json(extra)}

    @staticmethod
    def _image_doc(value: dict[str, Any], line: bytes, lineidx: dict[str, int], tsv: Any) -> dict[str, Any]:
        doc_id, id_error = int_or_str_id(value.get("image_id"))
        caption = value.get("caption")
        if id_error or (caption is not None and not isinstance(caption, str)):
            return {"error": "wrong_type", "raw_excerpt": text_excerpt(line), "doc_id": doc_id,
                    "error_detail": id_error or f"caption must be a string, got {type(caption).__name__}"}
        extra = {k: v for k, v in value.items() if k not in ("image_id", "caption")}
        fields: dict[str, Any] = {"doc_id": doc_id, "modality": "image", "caption": caption,
                                  "metadata": metadata_json(extra)}
        if doc_id is None:
            return fields  # validation quarantines it as missing_doc_id
        offset = lineidx.get(doc_id)
        if offset is None:
            return {**fields, "error": "image_missing", "raw_excerpt": text_excerpt(line),
                    "error_detail": f"image_id {doc_id} has no entry in {LINEIDX_FILE}; add the "
                                    f"image to {TSV_FILE} and its offset to the index"}
        fields["tsv_ref"] = offset
        tsv_line = read_tsv_line(tsv, offset)
        tsv_id, _, b64 = tsv_line.partition(b"\t")
        if tsv_id.decode("utf-8", "replace").strip() != doc_id:
            return {**fields, "error": "image_id_mismatch", "raw_excerpt": text_excerpt(tsv_line, 80),
                    "error_detail": f"{TSV_FILE} line at byte {offset} is image "
                                    f"{tsv_id[:40].decode('utf-8', 'replace')!r}, not {doc_id}; "
                                    f"{LINEIDX_FILE} is stale: regenerate it"}
        try:
            fields["image"] = base64.b64decode(b64.strip(), validate=True)
        except (binascii.Error, ValueError) as e:
            return {**fields, "error": "image_bad_base64", "raw_excerpt": text_excerpt(tsv_line, 80),
                    "error_detail": f"{TSV_FILE} line at byte {offset}: base64 does not decode ({e})"}
        return fields

    # queries ----------------------------------------------------------------------------
    def query_splits(self) -> list[str]:
        if not self.with_queries:
            return []
        return [s for s, f in SPLIT_FILES.items() if storage.exists(self._uri(f), self.storage_options)]

    def _lines(self, name: str) -> Iterator[tuple[int, bytes]]:
        fs, path = self.fs(self._uri(name))
        size = fs.get_file_info(path).size
        with self.roots().open(self._uri(name), self.storage_options, shown=name) as f:
            yield from iter_lines(f, 0, size, self.max_line_bytes)

    def iter_queries(self, split: str) -> Iterator[Query]:
        name = SPLIT_FILES[split]
        for offset, line in self._lines(name):
            if not line.strip():
                continue
            ref = f"{name}@{offset}"
            value, reason, detail = parse_json_line(line)
            if value is None:
                yield Query(None, None, ref, error=reason, error_detail=detail, raw_excerpt=text_excerpt(line))
                continue
            extra = {k: v for k, v in value.items() if k not in ("qid", "Q", "A")}
            yield Query(value.get("qid"), value.get("Q"), ref, answer=value.get("A"), metadata=extra)

    def iter_qrels(self, split: str) -> Iterator[tuple[str, str, int] | BadQrel]:
        qrels_file = f"{split}_qrels.txt"
        if storage.exists(self._uri(qrels_file), self.storage_options):
            yield from parse_qrels(self._lines(qrels_file), qrels_file)
            return
        for _, line in self._lines(SPLIT_FILES[split]):
            value, _, _ = parse_json_line(line) if line.strip() else (None, None, None)
            if value is None or value.get("qid") is None:
                continue
            qid = str(value["qid"])
            for key, id_key in (("img_posFacts", "image_id"), ("txt_posFacts", "snippet_id")):
                for fact in value.get(key) or []:
                    doc = fact.get(id_key) if isinstance(fact, dict) else fact
                    if doc is not None:
                        yield qid, str(doc), 1


def parse_qrels(lines: Iterator[tuple[int, bytes]], name: str) -> Iterator[tuple[str, str, int] | BadQrel]:
    """``qid doc_id rel`` (or TREC ``qid 0 doc_id rel``) lines, whitespace separated; a
    malformed line (``bad_qrel``) or grade (``bad_grade``: not an ASCII integer within int32)
    is a ``BadQrel``, quarantined by the run — never an error after the documents commit."""
    for offset, line in lines:
        ref = f"{name}@{offset}"
        if isinstance(line, OverlongLine):
            yield BadQrel(ref, LINE_TOO_LONG, line.detail(), text_excerpt(line))
            continue
        parts = line.decode("utf-8", "replace").split()
        if not parts:
            continue
        if len(parts) not in (3, 4):
            yield BadQrel(ref, "bad_qrel", f"{name} at byte {offset}: {line[:80]!r} is not 'qid doc_id relevance' "
                          "or 'qid 0 doc_id relevance'; fix the qrels file", text_excerpt(line))
            continue
        grade, problem = parse_grade(parts[-1])
        if grade is None:
            yield BadQrel(ref, "bad_grade", f"{name} at byte {offset}: the grade {problem}; fix the qrels file",
                          text_excerpt(line))
            continue
        yield parts[0], parts[-2], grade
