"""Delta tables for the training tests, written directly with ``write_deltalake`` in the
ingest schemas (``pipelines.store.schema``), so these tests do not depend on the ingest
job's runtime: ``corpus/documents``, ``queries/<split>``, ``qrels/<split>``."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
from deltalake import write_deltalake

from pipelines.ingest.sources.synthetic.generator import (
    SyntheticConfig,
    generate_queries,
    iter_documents,
)
from pipelines.store import schema as S

TRAIN_CORPUS = SyntheticConfig(seed=3, num_image_docs=120, num_text_docs=40, num_queries=(96, 24, 8), image_size=32)
NOW = datetime(2026, 11, 25, tzinfo=timezone.utc)


def _sha(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def write_documents(root: Path, records: list[dict]) -> None:
    rows = [{
        S.DOC_ID: r["doc_id"], S.MODALITY: r["modality"], S.TEXT: r.get("text") or None,
        S.CAPTION: r.get("caption") or None, S.IMAGE: r.get("image"), S.IMAGE_URI: None,
        S.IMAGE_WIDTH: None, S.IMAGE_HEIGHT: None, S.METADATA: None,
        S.CONTENT_SHA256: _sha(r.get("text"), r.get("caption"), (r.get("image") or b"").hex()),
        S.SOURCE: "test", S.RECORD_REF: f"test:{r['doc_id']}", S.RUN_ID: "test", S.INGESTED_AT: NOW,
    } for r in records]
    write_deltalake(str(root / "corpus" / "documents"), pa.Table.from_pylist(rows, schema=S.DOCUMENTS_SCHEMA),
                    mode="overwrite")


def write_split(root: Path, split: str, queries: list[dict]) -> None:
    q_rows = [{
        S.QID: q["qid"], S.QUERY: q["query"], S.ANSWER: None,
        S.METADATA: json.dumps({"kind": q.get("kind", "all"), "target_doc_id": q.get("target_doc_id")}),
        S.CONTENT_SHA256: _sha(q["qid"], q["query"]), S.SOURCE: "test", S.RECORD_REF: f"test:{q['qid']}",
        S.RUN_ID: "test", S.INGESTED_AT: NOW,
    } for q in queries]
    r_rows = [{S.QID: q["qid"], S.DOC_ID: d, S.RELEVANCE: 1, S.SOURCE: "test", S.RUN_ID: "test"}
              for q in queries for d in q["positive_doc_ids"]]
    write_deltalake(str(root / "queries" / split), pa.Table.from_pylist(q_rows, schema=S.QUERIES_SCHEMA), mode="overwrite")
    write_deltalake(str(root / "qrels" / split), pa.Table.from_pylist(r_rows, schema=S.QRELS_SCHEMA), mode="overwrite")


def write_synthetic(root: Path, cfg: SyntheticConfig = TRAIN_CORPUS) -> dict[str, list[dict]]:
    """The synthetic corpus and its train/dev/test queries as Delta tables under ``root``."""
    write_documents(root, list(iter_documents(cfg)))
    queries = generate_queries(cfg)
    for split, qs in queries.items():
        write_split(root, split, qs)
    return queries
