"""EDIS (entity-driven image search, news domain).

Files under ``path``:

* ``candidates_full.json`` — the candidate list: ``[{id, contents, image}, ...]`` (a JSON
  array as released, or JSON lines) → image documents (``doc_id`` = ``str(id)``,
  ``caption`` = ``contents``, image = ``<images_dir>/<image>``);
* ``train.json`` / ``dev.json`` / ``test.json`` (``val.json`` is read as ``dev``) —
  ``[{id, query, candidates: [{candidate_id, image, headline, score}, ...]}, ...]`` →
  queries (``qid`` = ``str(id)``); every scored candidate is a qrel with its graded score
  kept as ``relevance = score - 2``, so that EDIS's "relevant" (``score == 3``) is
  ``relevance > 0`` — the rule every consumer of ``qrels/<split>`` applies — and the lower
  grades stay judged non-relevant (2 → 0, 1 → -1); the score is ``relevance + 2``. The
  scores also stay in the query's metadata (``candidate_scores``).

The candidate list is the corpus: candidates that appear only inside query files are not
documents (their qrels are kept; the ingest summary counts qrels whose doc_id is not in
the corpus). A JSON-array file is parsed by the one worker that reads it; JSON lines shard
by byte range.

Confinement (``pipelines.ingest.confine``): an image name resolves inside ``images_dir``
(or the source folder, or ``allow_roots``) to a regular file, or its record is quarantined
(``outside_root``, ``not_a_regular_file``) unread; images are read here in both image modes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa

from pipelines.ingest.confine import Refused
from pipelines.ingest.sources.base import (
    FILE_UNREADABLE,
    Query,
    RawBuilder,
    Source,
    failure_fields,
    int_or_str_id,
    iter_json_records,
    iter_lines,
    line_file_shards,
    metadata_json,
    parse_json_line,
    refused_shard,
    refused_table,
    text_excerpt,
)
from pipelines.store import storage

CANDIDATES_FILE = "candidates_full.json"
SPLIT_FILES = {"train": ("train.json",), "dev": ("dev.json", "val.json"), "test": ("test.json",)}
RELEVANT_SCORE = 3
#: Stored relevance = score - GRADE_OFFSET: relevance > 0 exactly for RELEVANT_SCORE.
GRADE_OFFSET = RELEVANT_SCORE - 1


class EDISSource(Source):
    kind = "edis"

    def __init__(self, path: str, images_dir: str | None = None, shard_bytes: int = 8 << 20,
                 name: str | None = None, storage_options: dict[str, str] | None = None,
                 image_mode: str = "inline", with_queries: bool = True,
                 allow_roots: Iterable[str] = ()) -> None:
        super().__init__(name, storage_options, image_mode, allow_roots)
        self.path = storage.normalise_uri(path)
        self.images_dir = storage.normalise_uri(images_dir) if images_dir else storage.join(self.path, "images")
        self.shard_bytes = shard_bytes
        self.with_queries = with_queries

    def own_roots(self) -> list[str]:
        return [self.path, self.images_dir]

    def _uri(self, name: str) -> str:
        return storage.join(self.path, name)

    def _is_array(self, uri: str) -> bool:
        with self.roots().open(uri, self.storage_options) as f:
            head = f.read(4096).lstrip()
        return head.startswith(b"[")

    def plan(self) -> list[dict[str, Any]]:
        uri = self._uri(CANDIDATES_FILE)
        if not storage.exists(uri, self.storage_options):
            raise FileNotFoundError(f"EDIS source {self.path} lacks {CANDIDATES_FILE} (the candidate "
                                    "list); point source.path at the EDIS data folder")
        try:
            is_array = self._is_array(uri)
        except Refused as r:  # a symlink out of the roots, a FIFO: one quarantined record, unread
            return [refused_shard(uri, r, array=False)]
        if is_array:
            return [{"uri": uri, "array": True}]
        return line_file_shards(self, uri, self.shard_bytes, array=False)

    def read(self, shard_index: int, spec: dict[str, Any]) -> Iterator[pa.Table]:
        if "refused" in spec:
            table = refused_table(self, shard_index, CANDIDATES_FILE, spec)
            if table is not None:
                yield table
            return
        builder = RawBuilder(self.name, shard_index)
        for ref, fields in self._records(spec):
            table = builder.add(ref, **fields)
            if table is not None:
                yield table
        table = builder.flush()
        if table is not None:
            yield table

    def _records(self, spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
        try:
            yield from self._candidates(spec)
        except Exception as e:  # the file, not a record: its unread rest is this one record
            fields = failure_fields(f"reading {CANDIDATES_FILE}", e)
            if not isinstance(e, Refused):
                fields["error"] = FILE_UNREADABLE
            yield f"{CANDIDATES_FILE}@{spec.get('start', 0)}", fields

    def _candidates(self, spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
        opened = self.roots().open(spec["uri"], self.storage_options, shown=CANDIDATES_FILE)
        if spec["array"]:
            with opened as f:
                raw = f.read()
            try:
                items = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                # The whole file is one record that cannot be split: quarantine it as such.
                yield f"{CANDIDATES_FILE}", {"error": "bad_json", "raw_excerpt": text_excerpt(raw),
                                             "error_detail": f"{CANDIDATES_FILE} is not a JSON array "
                                             f"({e}); fix the file or convert it to JSON lines"}
                return
            for i, item in enumerate(items):
                ref = f"{CANDIDATES_FILE}[{i}]"
                if not isinstance(item, dict):
                    yield ref, {"error": "wrong_type", "raw_excerpt": repr(item)[:200],
                                "error_detail": f"entry is a JSON {type(item).__name__}, expected an object"}
                    continue
                yield ref, self._guarded(ref, item, json.dumps(item)[:200])
            return
        with opened as f:
            for ref, value, error, line in iter_json_records(f, spec["start"], spec["end"], CANDIDATES_FILE,
                                                            self.max_line_bytes):
                yield ref, error if value is None else self._guarded(ref, value, text_excerpt(line))

    def _guarded(self, ref: str, item: dict[str, Any], excerpt: str) -> dict[str, Any]:
        """``_candidate``, with anything it raises turned into a quarantined record."""
        try:
            return self._candidate(item, excerpt)
        except Exception as e:  # one record never aborts the ingest
            doc_id, _ = int_or_str_id(item.get("id"))
            return {**failure_fields(ref, e), "raw_excerpt": excerpt, "doc_id": doc_id}

    def _candidate(self, item: dict[str, Any], excerpt: str) -> dict[str, Any]:
        doc_id, id_error = int_or_str_id(item.get("id"))
        contents, image = item.get("contents"), item.get("image")
        errors = [id_error] if id_error else []
        if contents is not None and not isinstance(contents, str):
            errors.append(f"contents must be a string, got {type(contents).__name__}")
        if image is not None and not isinstance(image, str):
            errors.append(f"image must be a file name, got {type(image).__name__}")
        if errors:
            return {"error": "wrong_type", "error_detail": "; ".join(errors), "raw_excerpt": excerpt,
                    "doc_id": doc_id}
        extra = {k: v for k, v in item.items() if k not in ("id", "contents")}
        fields: dict[str, Any] = {"doc_id": doc_id, "modality": "image", "caption": contents,
                                  "metadata": metadata_json(extra)}
        if not image:
            return fields  # validation quarantines it: an image document without an image
        uri = image if ("://" in image or image.startswith("/")) else storage.join(self.images_dir, image)
        try:
            # Read in both modes (only once the roots allow it): validation decodes these bytes.
            resolved, data = self.roots().read(uri, self.storage_options, shown=image)
        except Refused as r:
            return {**fields, **r.fields(), "raw_excerpt": excerpt}
        except OSError as e:
            data, resolved, missing = None, uri, str(e)
        else:
            missing = "it does not exist"
        if data is None:
            return {**fields, "error": "image_missing", "raw_excerpt": excerpt,
                    "error_detail": f"cannot read {uri}: {missing}; put the image in the images folder "
                                    "(source.images_dir)"}
        fields["image"] = data
        if self.image_mode == "uri":
            fields["image_uri"] = resolved
        return fields

    # queries ----------------------------------------------------------------------------
    def _split_uri(self, split: str) -> str | None:
        for name in SPLIT_FILES[split]:
            uri = self._uri(name)
            if storage.exists(uri, self.storage_options):
                return uri
        return None

    def query_splits(self) -> list[str]:
        if not self.with_queries:
            return []
        return [s for s in SPLIT_FILES if self._split_uri(s)]

    def _entries(self, split: str) -> Iterator[tuple[str, Any, str | None]]:
        uri = self._split_uri(split)
        assert uri is not None
        name = uri.rsplit("/", 1)[-1]
        if self._is_array(uri):
            try:
                with self.roots().open(uri, self.storage_options, shown=name) as f:
                    items = json.loads(f.read().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{uri} is not valid JSON ({e}); fix the file or convert it to "
                                 "JSON lines") from None
            for i, item in enumerate(items):
                yield f"{name}[{i}]", item, None
            return
        fs, path = self.fs(uri)
        with self.roots().open(uri, self.storage_options, shown=name) as f:
            for offset, line in iter_lines(f, 0, fs.get_file_info(path).size, self.max_line_bytes):
                if line.strip():
                    value, reason, detail = parse_json_line(line)
                    yield f"{name}@{offset}", value, None if value is not None else f"{reason}\x1f{detail}"

    def iter_queries(self, split: str) -> Iterator[Query]:
        for ref, item, error in self._entries(split):
            if error is not None or not isinstance(item, dict):
                reason, _, detail = (error or "wrong_type\x1fentry is not a JSON object").partition("\x1f")
                yield Query(None, None, ref, error=reason, error_detail=detail, raw_excerpt=repr(item)[:200])
                continue
            scores = {str(c.get("candidate_id")): c.get("score")
                      for c in item.get("candidates") or [] if isinstance(c, dict)}
            extra = {k: v for k, v in item.items() if k not in ("id", "query", "candidates")}
            extra["candidate_scores"] = scores
            yield Query(item.get("id"), item.get("query"), ref, metadata=extra)

    def iter_qrels(self, split: str) -> Iterator[tuple[str, str, int]]:
        for _, item, error in self._entries(split):
            if error is not None or not isinstance(item, dict) or item.get("id") is None:
                continue
            for c in item.get("candidates") or []:
                if not isinstance(c, dict) or c.get("candidate_id") is None:
                    continue
                score = c.get("score")
                if isinstance(score, float) and score.is_integer():
                    score = int(score)
                if isinstance(score, int) and not isinstance(score, bool):
                    yield str(item["id"]), str(c["candidate_id"]), score - GRADE_OFFSET
