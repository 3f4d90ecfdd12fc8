"""Fixtures for the embedding tests: a Delta ``corpus/documents`` written directly (no
ingest run), tiny offline checkpoints, and an in-process ``ciea embed`` runner."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
from deltalake import write_deltalake

from ciea_model import create_model_and_processor, save_checkpoint
from ciea_model.presets import tiny_config
from ciea_model.tokenizer import train_wordpiece_tokenizer
from jobs import embed
from pipelines.ingest.sources.synthetic.generator import SyntheticConfig, iter_documents
from pipelines.store import schema as S
from pipelines.store.delta_tables import CDF_CONFIG, Tables


def synthetic_records(num_image_docs: int, num_text_docs: int, seed: int = 3) -> list[dict]:
    cfg = SyntheticConfig(seed=seed, num_image_docs=num_image_docs, num_text_docs=num_text_docs,
                          num_queries=(4, 2, 2), image_size=32)
    return list(iter_documents(cfg))


def sha(text: str | None, caption: str | None, image: bytes | None) -> str:
    return hashlib.sha256(json.dumps([text, caption]).encode() + (image or b"")).hexdigest()


def documents_table(records: list[dict]) -> pa.Table:
    """Synthetic records → rows of ``DOCUMENTS_SCHEMA`` (images inline)."""
    now = datetime.now(timezone.utc)
    rows = []
    for i, r in enumerate(records):
        text, caption = r["text"] or None, r["caption"] or None
        image = r["image"] if r["modality"] == "image" else None
        rows.append({
            S.DOC_ID: r["doc_id"], S.MODALITY: r["modality"], S.TEXT: text, S.CAPTION: caption,
            S.IMAGE: image, S.IMAGE_URI: None, S.IMAGE_WIDTH: 32 if image else None,
            S.IMAGE_HEIGHT: 32 if image else None, S.METADATA: r.get("attributes"),
            S.CONTENT_SHA256: sha(text, caption, image), S.SOURCE: "synthetic", S.RECORD_REF: f"synthetic:{i}",
            S.RUN_ID: "test", S.INGESTED_AT: now,
        })
    return pa.Table.from_pylist(rows, schema=S.DOCUMENTS_SCHEMA)


def write_corpus(root: Path, records: list[dict], mode: str = "overwrite") -> str:
    """Writes (or appends to) ``<root>/corpus/documents``; returns its URI."""
    uri = Tables(str(root)).documents
    write_deltalake(uri, documents_table(records), mode=mode, configuration=CDF_CONFIG)
    return uri


def make_checkpoint(out: Path, texts: list[str], seed: int) -> str:
    """A tiny random-init CIEA checkpoint (2-layer T5 + 32 px CLIP, 32-d vectors)."""
    tok = out / "tokenizer-src"
    if not tok.exists():
        train_wordpiece_tokenizer(texts, tok, vocab_size=300, style="t5")
    model, processor = create_model_and_processor(tiny_config("ciea", str(tok)), pretrained=False, seed=seed)
    ckpt = out / f"ckpt-{seed}"
    save_checkpoint(model, processor, ckpt)
    return str(ckpt)


def embedded_corpus(tmp: Path, num_image_docs: int, num_text_docs: int, seeds: tuple[int, ...] = (0,)) -> dict:
    """A synthetic corpus in ``<tmp>/data`` and one tiny checkpoint per seed: ``{"tmp",
    "root", "db", "records", "texts", "ckpt"}`` (``ckpt`` the first seed's; ``ckpt-<seed>``
    every seed's)."""
    records = synthetic_records(num_image_docs, num_text_docs)
    root = tmp / "data"
    write_corpus(root, records)
    texts = [r["caption"] or r["text"] for r in records]
    ckpts = {f"ckpt-{seed}": make_checkpoint(tmp, texts, seed=seed) for seed in seeds}
    return {"tmp": tmp, "root": root, "db": str(root / "lancedb"), "records": records, "texts": texts,
            "ckpt": ckpts[f"ckpt-{seeds[0]}"], **ckpts}


def run_embed(tmp: Path, root: Path, checkpoint: str, table: str, *extra: str) -> tuple[int, dict | None]:
    """``ciea embed`` in-process (on the module's Ray); returns (exit code, summary)."""
    run_dir = tmp / f"runs-{table}"
    summary_path = run_dir / "summary.json"
    summary_path.unlink(missing_ok=True)
    rc = embed.main([
        "--checkpoint", checkpoint, "--root", str(root), "--table", table, "--run-dir", str(run_dir),
        "--no-progress", "--set", "encode.threads=1", "--set", "encode.batch_size=32",
        "--set", "preprocess.batch_rows=64", *extra,
    ])
    return rc, (json.loads(summary_path.read_text()) if summary_path.exists() else None)


def write_query_split(root: Path, split: str, queries: list[dict]) -> None:
    """Writes ``queries/<split>`` and ``qrels/<split>`` through the ingest merges.

    ``queries`` are shaped like ``pipelines.ingest.sources.synthetic.generator.generate_queries`` output (``qid``,
    ``query``, ``positive_doc_ids``, optional ``kind``); ``kind`` goes into the metadata as
    the synthetic source writes it. An empty list makes an empty split.
    """
    from pipelines.store.delta_tables import merge_qrels, merge_queries

    tables = Tables(str(root))
    now = datetime.now(timezone.utc)
    rows = [{
        S.QID: q["qid"], S.QUERY: q["query"], S.ANSWER: None,
        S.METADATA: json.dumps({k: q[k] for k in ("kind", "target_doc_id") if k in q}),
        S.CONTENT_SHA256: hashlib.sha256(q["query"].encode()).hexdigest(), S.SOURCE: "synthetic",
        S.RECORD_REF: f"synthetic:{q['qid']}", S.RUN_ID: "test", S.INGESTED_AT: now,
    } for q in queries]
    merge_queries(tables, split, pa.Table.from_pylist(rows, schema=S.QUERIES_SCHEMA))
    pairs = [(q["qid"], d) for q in queries for d in q["positive_doc_ids"]]
    merge_qrels(tables, split, pa.Table.from_pylist(
        [{S.QID: q, S.DOC_ID: d, S.RELEVANCE: 1, S.SOURCE: "synthetic", S.RUN_ID: "test"} for q, d in pairs],
        schema=S.QRELS_SCHEMA))
