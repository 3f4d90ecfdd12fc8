"""In-memory retrieval evaluation: encode a corpus and a query set, rank exhaustively by
cosine, score with :mod:`pipelines.metrics`. Used for dev early stopping and the demo;
corpus-scale evaluation goes through the LanceDB index instead."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ciea_model.inference import encode_documents, encode_queries
from ciea_model.model import CIEAModel
from ciea_model.processor import CIEAProcessor, Document

from .metrics import RetrievalReport, evaluate_run, topk_from_scores


@dataclass
class EncodedCorpus:
    doc_ids: list[str]
    vectors: np.ndarray  # (N, D) float32, unit norm


def encode_corpus(
    model: CIEAModel, processor: CIEAProcessor, documents: Sequence[Document], batch_size: int = 64
) -> EncodedCorpus:
    return EncodedCorpus([d.doc_id for d in documents], encode_documents(model, processor, documents, batch_size))


def rank(
    model: CIEAModel, processor: CIEAProcessor, corpus: EncodedCorpus,
    queries: Sequence[Mapping[str, Any]], k: int = 100,
) -> dict[str, list[str]]:
    """qid → top-k doc ids by cosine."""
    q = encode_queries(model, processor, [x["query"] for x in queries])
    ranked = topk_from_scores(q @ corpus.vectors.T, corpus.doc_ids, k)
    return {x["qid"]: r for x, r in zip(queries, ranked)}


def evaluate(
    model: CIEAModel, processor: CIEAProcessor, documents: Sequence[Document],
    queries: Sequence[Mapping[str, Any]], k: int = 100, group_key: str | None = "kind",
) -> RetrievalReport:
    """Encodes ``documents`` and ``queries`` and returns MRR@10, NDCG@10, Recall@k,
    overall and per ``group_key`` value (the synthetic query kind by default)."""
    corpus = encode_corpus(model, processor, documents)
    run = rank(model, processor, corpus, queries, k=k)
    qrels = {x["qid"]: set(x["positive_doc_ids"]) for x in queries}
    groups = {x["qid"]: str(x[group_key]) for x in queries} if group_key else None
    return evaluate_run(run, qrels, ks_recall=(1, 5, 10, 20, 100), groups=groups)
