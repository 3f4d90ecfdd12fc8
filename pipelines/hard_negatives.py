"""Hard-negative mining for stage 2 (ANCE), in memory: rank the mixed corpus with the best
stage-1 model, drop each query's positives, keep the top-k split by modality.

Stage 2 then trains each query with one positive plus one image and one text hard
negative ("modality-balanced"), falling back to the other modality when one runs out.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ciea_model.model import CIEAModel
from ciea_model.processor import CIEAProcessor, Document, TrainExample

from .evaluation import encode_corpus, rank

logger = logging.getLogger(__name__)


def mine_hard_negatives(
    model: CIEAModel, processor: CIEAProcessor, documents: Sequence[Document],
    queries: Sequence[Mapping[str, Any]], k: int = 100,
) -> dict[str, dict[str, list[str]]]:
    """qid → {"image": [...], "text": [...]}: the top-``k`` non-relevant documents, best first."""
    modality = {d.doc_id: d.modality for d in documents}
    corpus = encode_corpus(model, processor, documents)
    ranked = rank(model, processor, corpus, queries, k=k + max(len(q["positive_doc_ids"]) for q in queries))
    mined: dict[str, dict[str, list[str]]] = {}
    for q in queries:
        positives = set(q["positive_doc_ids"])
        out: dict[str, list[str]] = {"image": [], "text": []}
        for doc_id in (d for d in ranked[q["qid"]] if d not in positives):
            if sum(map(len, out.values())) >= k:
                break
            out[modality[doc_id]].append(doc_id)
        mined[q["qid"]] = out
    return mined


def with_hard_negatives(
    examples: Sequence[TrainExample], mined: Mapping[str, Mapping[str, Sequence[str]]],
    documents: Mapping[str, Document], seed: int, depth: int = 10,
) -> list[TrainExample]:
    """Adds one image and one text hard negative per example, each drawn from the top
    ``depth`` of its modality; when a modality has none, both come from the other."""
    rng = np.random.default_rng(seed)
    out = []
    for ex in examples:
        pools = {m: list(mined.get(ex.qid, {}).get(m, ()))[:depth] for m in ("image", "text")}
        picks: list[str] = []
        for m, other in (("image", "text"), ("text", "image")):
            pool = [d for d in (pools[m] or pools[other]) if d not in picks]
            if pool:
                picks.append(pool[int(rng.integers(len(pool)))])
        out.append(TrainExample(
            qid=ex.qid, query=ex.query, positive=ex.positive,
            negatives=tuple(documents[d] for d in picks), relevant_ids=ex.relevant_ids,
            positive_captions=ex.positive_captions,
        ))
    return out
