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
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from pipelines.ingest.sources.base import (
    Query,
    RawBuilder,
    Source,
    int_or_str_id,
    iter_json_records,
    iter_lines,
    line_file_shards,
    metadata_json,
    parse_json_line,
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
                 image_mode: str = "inline", with_queries: bool = True) -> None:
        super().__init__(name, storage_options, image_mode)
        self.path = storage.normalise_uri(path)
        self.images_dir = storage.normalise_uri(images_dir) if images_dir else storage.join(self.path, "images")
        self.shard_bytes = shard_bytes
        self.with_queries = with_queries

    def _uri(self, name: str) -> str:
        return storage.join(self.path, name)

    def _is_array(self, uri: str) -> bool:
        fs, path = self.fs(uri)
        with fs.open_input_file(path) as f:
            head = f.read(4096).lstrip()
        return head.startswith(b"[")

    def plan(self) -> list[dict[str, Any]]:
        uri = self._uri(CANDIDATES_FILE)
        if not storage.exists(uri, self.storage_options):
            raise FileNotFoundError(f"EDIS source {self.path} lacks {CANDIDATES_FILE} (the candidate "
                                    "list); point source.path at the EDIS data folder")
        if self._is_array(uri):
            return [{"uri": uri, "array": True}]
        return line_file_shards(self, uri, self.shard_bytes, array=False)

    def read(self, shard_index: int, spec: dict[str, Any]) -> Iterator[pa.Table]:
        builder = RawBuilder(self.name, shard_index)
        for ref, fields in self._records(spec):
            table = builder.add(ref, **fields)
            if table is not None:
                yield table
        table = builder.flush()
        if table is not None:
            yield table

    def _records(self, spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
        fs, path = self.fs(spec["uri"])
        if spec["array"]:
            with fs.open_input_file(path) as f:
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
                yield ref, self._candidate(item, json.dumps(item)[:200])
            return
        with fs.open_input_file(path) as f:
            for ref, value, error, line in iter_json_records(f, spec["start"], spec["end"], CANDIDATES_FILE):
                yield ref, error if value is None else self._candidate(value, text_excerpt(line))

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
        uri = storage.join(self.images_dir, image)
        if self.image_mode == "uri":
            fields["image_uri"] = uri
            return fields
        try:
            fields["image"] = storage.read_bytes(uri, self.storage_options)
        except OSError as e:
            return {**fields, "error": "image_missing", "raw_excerpt": excerpt,
                    "error_detail": f"cannot read {uri}: {e}; put the image in the images folder "
                                    "(source.images_dir)"}
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
                items = json.loads(storage.read_bytes(uri, self.storage_options).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{uri} is not valid JSON ({e}); fix the file or convert it to "
                                 "JSON lines") from None
            for i, item in enumerate(items):
                yield f"{name}[{i}]", item, None
            return
        fs, path = self.fs(uri)
        with fs.open_input_file(path) as f:
            for offset, line in iter_lines(f, 0, fs.get_file_info(path).size):
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
