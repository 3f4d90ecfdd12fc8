"""The dev score that drives early stopping (``pipelines.train.worker.dev_mrr10``): MRR@10
over an exhaustive cosine ranking, computed with the evaluation code, equal to the same
ranking and reciprocal ranks worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from ciea_model.inference import encode_documents, encode_queries
from ciea_model.processor import Document
from pipelines.train.worker import dev_mrr10


def _by_hand(model, processor, documents, queries) -> float:
    """Cosine scores, a stable descending sort (ties: earlier document first), the
    reciprocal rank of the first relevant document in the top 10, averaged."""
    d = encode_documents(model, processor, documents)
    q = encode_queries(model, processor, [x["query"] for x in queries])
    ids = [doc.doc_id for doc in documents]
    rr = []
    for row, query in zip(q @ d.T, queries):
        order = np.argsort(-row, kind="stable")[:10]
        ranks = [i + 1 for i, j in enumerate(order) if ids[j] in set(query["positive_doc_ids"])]
        rr.append(1.0 / ranks[0] if ranks else 0.0)
    return float(np.mean(rr))


@pytest.fixture(scope="module")
def dev_case(synthetic_corpus, make_model):
    """A tiny random-init model, the whole synthetic corpus with its images transformed as
    the worker holds them, twins of a few documents (exact ties), and the dev queries."""
    docs, queries = synthetic_corpus
    model, processor = make_model("ciea", seed=3)
    documents = [Document(d["doc_id"], d["modality"], text=d["text"], caption=d["caption"],
                          image=processor.image_transform(d["image"]) if d["image"] is not None else None)
                 for d in docs]
    twins = [Document(f"twin-{d.doc_id}", d.modality, text=d.text, caption=d.caption, image=d.image)
             for d in documents[::9]]
    return model, processor, twins + documents, queries["dev"] + queries["test"]


def test_dev_mrr10_equals_the_ranking_by_hand(dev_case):
    model, processor, documents, queries = dev_case
    score = dev_mrr10(model, processor, documents, queries)
    assert 0.0 <= score <= 1.0
    assert score == pytest.approx(_by_hand(model, processor, documents, queries), abs=1e-12)


def test_dev_mrr10_counts_a_query_without_hit_in_the_top_10_as_zero(dev_case):
    model, processor, documents, queries = dev_case
    missing = [{**queries[0], "qid": "nowhere", "positive_doc_ids": ["not-in-the-pool"]}]
    assert dev_mrr10(model, processor, documents, missing) == 0.0
