"""Training-data adapters and in-memory hard-negative mining (pipelines/)."""

from __future__ import annotations

from pipelines.store.documents import expect_document, row_to_document
from pipelines.train.examples import training_examples
from pipelines.train.negatives import mine_hard_negatives, with_hard_negatives


def _docs(synthetic_corpus):
    records, _ = synthetic_corpus
    return {d.doc_id: d for d in (expect_document(row_to_document(r)) for r in records)}


def test_training_examples_pick_the_target_and_keep_all_relevant(synthetic_corpus):
    _, queries = synthetic_corpus
    docs = _docs(synthetic_corpus)
    train = queries["train"]
    missing = {**train[0], "qid": "missing", "target_doc_id": "nope", "positive_doc_ids": ["nope"]}
    examples, counts = training_examples([*train, missing], docs)
    assert counts == {"used": len(train), "skipped_no_positive": 1}
    for ex, q in zip(examples, train):
        assert ex.positive.doc_id == q["target_doc_id"]
        assert ex.relevant_ids == frozenset(q["positive_doc_ids"])
        # q_comp removes every image positive's caption; a text positive brings none.
        image_captions = {docs[d].caption for d in q["positive_doc_ids"] if docs[d].modality == "image"}
        if ex.positive.modality == "image":
            assert set(ex.positive_captions) == image_captions | {ex.positive.caption}
        else:
            assert ex.positive_captions == ()


def test_mined_negatives_exclude_positives_and_split_by_modality(synthetic_corpus, make_model):
    _, queries = synthetic_corpus
    docs = _docs(synthetic_corpus)
    model, processor = make_model("ciea")
    mined = mine_hard_negatives(model, processor, list(docs.values()), queries["train"], k=20)
    assert set(mined) == {q["qid"] for q in queries["train"]}
    for q in queries["train"]:
        got = mined[q["qid"]]
        assert sum(map(len, got.values())) == min(20, len(docs) - len(q["positive_doc_ids"]))
        for modality, ids in got.items():
            assert not set(ids) & set(q["positive_doc_ids"])
            assert all(docs[i].modality == modality for i in ids)


def test_with_hard_negatives_is_modality_balanced_with_fallback(synthetic_corpus):
    _, queries = synthetic_corpus
    docs = _docs(synthetic_corpus)
    examples, _ = training_examples(queries["train"][:2], docs)
    image_ids = [d for d, doc in docs.items() if doc.modality == "image"][-3:]
    text_ids = [d for d, doc in docs.items() if doc.modality == "text"][-3:]
    mined = {
        examples[0].qid: {"image": image_ids, "text": text_ids},
        examples[1].qid: {"image": image_ids, "text": []},  # no text negative left
    }
    out = with_hard_negatives(examples, mined, docs, seed=0, depth=3)
    balanced, fallback = out
    assert sorted(d.modality for d in balanced.negatives) == ["image", "text"]
    assert [d.modality for d in fallback.negatives] == ["image", "image"]
    assert len({d.doc_id for d in fallback.negatives}) == 2
    assert out[0].positive == examples[0].positive and out[0].relevant_ids == examples[0].relevant_ids
    assert with_hard_negatives(examples, mined, docs, seed=0, depth=3) == out  # deterministic
