"""Training on the mixture (issue 25 item 3): composed queries (reference image +
modification text) join the ordinary queries, are encoded with the document-side input
construction, take the reference document and another near miss as hard negatives, and
``train.composed_share`` sets how many of them train — on both paths (the in-memory
``training_examples`` and the Ray rows: ``plan_examples`` → ``expand_epochs`` → the join →
``rows_to_examples``), which draw alike."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from ciea_model.inference import encode_documents
from ciea_model.processor import Document, TrainExample
from ciea_model.training import compute_loss
from pipelines.store import schema as S
from pipelines.store.documents import DOCUMENT_COLUMNS
from pipelines.train.dataset import (
    EPOCH,
    NEG_SLOTS,
    POS,
    QUERY_IMAGE,
    expand_epochs,
    plan_examples,
    rows_to_examples,
    with_visit_order,
)
from pipelines.train.draws import DrawSettings, composed_mixture, draw_composed_negatives
from pipelines.train.examples import training_examples
from pipelines.train.joins import join_documents
from pipelines.train.negatives import with_hard_negatives


def _png(color) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(out, format="PNG")
    return out.getvalue()


PIC = _png((200, 20, 20))
IMAGES = {f"i{k}": _png((20 * k, 100, 50)) for k in range(8)}
TEXTS = ("t0", "t1")


def _docs() -> dict[str, Document]:
    out = {d: Document(d, "image", caption=f"a shape from the {d} collection", image=b) for d, b in IMAGES.items()}
    out.update({d: Document(d, "text", text=f"records of {d}") for d in TEXTS})
    return out


def _queries() -> list[dict]:
    plain = [{"qid": f"p{k}", "query": f"a shape {k}", "positive_doc_ids": [f"i{k}"], "target_doc_id": f"i{k}",
              "kind": "caption"} for k in range(3)]
    composed = [{"qid": f"c{k}", "query": "the same but blue", "positive_doc_ids": ["i5", "i6"], "target_doc_id": "i5",
                 "kind": "composed", "image": PIC, "near_miss_doc_ids": ["i0", "i1", "i2", "i5"]} for k in range(4)]
    return plain + composed


# ---- draws ---------------------------------------------------------------------------------------
def test_composed_negatives_are_the_reference_and_another_near_miss():
    s = DrawSettings(seed=3)
    seen = set()
    for e in range(12):
        picks = draw_composed_negatives("c0", ["i0", "i1", "i2", "i5"], None, {"i5", "i6"}, s, e)
        assert picks[0] == "i0" and picks[1] in {"i1", "i2"} and len(picks) == 2
        seen.add(picks[1])
        assert picks == draw_composed_negatives("c0", ["i0", "i1", "i2", "i5"], None, {"i5", "i6"}, s, e)
    assert seen == {"i1", "i2"}  # re-drawn every epoch
    # No other near miss: a mined draw fills the second place, or the reference stays alone.
    mined = {"image": ["i3", "i0"], "text": ["t0"]}
    assert draw_composed_negatives("c0", ["i0"], mined, {"i5"}, s, 0)[0] == "i0"
    assert draw_composed_negatives("c0", ["i0"], mined, {"i5"}, s, 0)[1] in {"i3", "t0"}
    assert draw_composed_negatives("c0", ["i0"], None, {"i5"}, s, 0) == ["i0"]
    assert draw_composed_negatives("c0", [], None, {"i5"}, s, 0) == []


@pytest.mark.parametrize("share,n", [(1.0, 4), (0.5, 2), (0.25, 1), (0.0, 0)])
def test_composed_share_keeps_every_plain_query_and_a_share_of_the_composed(share, n):
    kept = composed_mixture(_queries(), share, seed=1)
    assert [q["qid"] for q in kept if "image" not in q] == ["p0", "p1", "p2"]
    assert sum("image" in q for q in kept) == n
    assert kept == composed_mixture(_queries(), share, seed=1)
    with pytest.raises(ValueError, match="composed_share"):
        composed_mixture(_queries(), 1.5, seed=1)


def test_the_switch_is_a_train_setting():
    from pipelines.train.config import TrainSettings

    assert TrainSettings().composed_share == 1.0
    assert DrawSettings.from_train(TrainSettings(composed_share=0.3)).composed_share == 0.3
    with pytest.raises(ValueError):
        TrainSettings(composed_share=2)


# ---- both paths ----------------------------------------------------------------------------------
def test_in_memory_examples_carry_the_picture_and_the_near_misses():
    examples, counts = training_examples(_queries(), _docs(), DrawSettings(seed=5), epoch=0)
    assert counts["used"] == 7
    by = {ex.qid: ex for ex in examples}
    assert by["p0"].query_image is None and by["p0"].negatives == ()
    c = by["c0"]
    assert c.query_image == PIC and c.positive.doc_id == "i5"
    assert [n.doc_id for n in c.negatives][0] == "i0" and c.negatives[1].doc_id in {"i1", "i2"}
    # Stage 2 keeps them (the mined lists fill in for the plain queries only).
    mined = {q: {"image": ["i7"], "text": ["t0"]} for q in by}
    staged = {ex.qid: ex for ex in with_hard_negatives(examples, mined, _docs(), seed=5)}
    assert staged["c0"].negatives == c.negatives
    assert [n.doc_id for n in staged["p0"].negatives] == ["i7", "t0"]


@pytest.mark.parametrize("mined", [False, True])
def test_ray_rows_draw_what_the_in_memory_path_draws(mined):
    settings = DrawSettings(seed=5)
    queries, docs = _queries(), _docs()
    lists = {q["qid"]: {"image": ["i7", "i3"], "text": ["t0", "t1"]} for q in queries} if mined else None
    modalities = {d: doc.modality for d, doc in docs.items()}
    plan = plan_examples(queries, modalities, lists, depth=settings.depth)
    assert QUERY_IMAGE in plan.rows.column_names and {"i0", "i1", "i2"} <= set(plan.needed_ids)
    rows = expand_epochs(with_visit_order(plan, [0, 1], settings.seed), [0, 1], settings, num_shards=1)
    table = pa.Table.from_pylist([{S.DOC_ID: d, S.MODALITY: doc.modality, S.TEXT: doc.text or None,
                                   S.CAPTION: doc.caption or None, S.IMAGE: doc.image, S.IMAGE_URI: None}
                                  for d, doc in docs.items()])
    table = table.select([c for c in DOCUMENT_COLUMNS if c in table.column_names])
    for c in DOCUMENT_COLUMNS:
        if c not in table.column_names:
            table = table.append_column(c, pa.nulls(table.num_rows, pa.string()))
    table = table.select(list(DOCUMENT_COLUMNS))
    for e in (0, 1):
        ray_rows = rows.filter(pa.compute.equal(rows.column(EPOCH), e))
        joined = join_documents(ray_rows, table, (POS, *NEG_SLOTS), inner=POS)
        got = {ex.qid: ex for ex in rows_to_examples(joined)}
        examples, _ = training_examples(queries, docs, settings, epoch=e)
        if mined:
            examples = with_hard_negatives(examples, lists, docs, seed=5, epoch=e)
        for ex in examples:
            assert got[ex.qid].query_image == ex.query_image
            assert [n.doc_id for n in got[ex.qid].negatives] == [n.doc_id for n in ex.negatives], (ex.qid, e)
            assert got[ex.qid].positive.doc_id == ex.positive.doc_id


def test_plans_without_pictures_are_unchanged():
    plain = [q for q in _queries() if "image" not in q]
    plan = plan_examples(plain, {d: doc.modality for d, doc in _docs().items()})
    assert QUERY_IMAGE not in plan.rows.column_names
    rows = expand_epochs(with_visit_order(plan, [0], 0), [0], DrawSettings(), num_shards=1)
    assert "neg0_id" not in rows.column_names and QUERY_IMAGE not in rows.column_names


# ---- the model side ------------------------------------------------------------------------------
def _examples() -> list[TrainExample]:
    docs = _docs()
    return [TrainExample("p0", "a shape from the i0 collection", docs["i0"], relevant_ids=frozenset({"i0"})),
            TrainExample("c0", "the same but blue", docs["i5"], negatives=(docs["i0"], docs["i1"]),
                         relevant_ids=frozenset({"i5"}), query_image=PIC),
            TrainExample("t", "records of t0", docs["t0"], relevant_ids=frozenset({"t0"}))]


def test_a_picture_query_is_collated_as_the_image_document_search_builds(make_model):
    model, processor = make_model("ciea")
    batch = processor.collate_training(_examples())
    assert batch.query_picture_index.tolist() == [1] and batch.stats["picture_queries"] == 1
    assert batch.doc_ids[:3] == ["i0", "i5", "t0"] and "i1" in batch.doc_ids
    model.eval()
    with torch.no_grad():
        got = model.encode_documents(batch.query_pictures).numpy()
    want = encode_documents(model, processor, [Document("q", "image", caption="the same but blue", image=PIC)])
    np.testing.assert_allclose(got, want, atol=1e-5)
    # L_comp is for text queries: the picture query is not among its anchors.
    if batch.comp_targets is not None:
        assert batch.stats["comp_eligible"] == 1


def test_the_loss_uses_the_picture_and_trains_the_vision_side(make_model):
    model, processor = make_model("ciea")
    model.train()
    torch.manual_seed(0)
    with_pic = compute_loss(model, processor.collate_training(_examples()))
    with_pic.loss.backward()
    grad = model.projector.weight.grad.clone() if hasattr(model, "projector") else None
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    import dataclasses

    plain = [dataclasses.replace(ex, query_image=None) for ex in _examples()]
    without = compute_loss(model, processor.collate_training(plain))
    assert with_pic.queries == without.queries == 3
    assert abs(with_pic.contrastive - without.contrastive) > 1e-6
    if grad is not None:
        assert grad.abs().sum() > 0


def test_a_text_only_model_reads_the_text_alone(make_model):
    _, processor = make_model("text-only")
    batch = processor.collate_training(_examples())
    assert batch.query_pictures is None and "picture_queries" not in batch.stats


def test_ciea_compare_corpus_makes_composed_queries_with_their_pictures():
    from jobs.compare import synthetic_corpus
    from pipelines.train.compare import CorpusSettings

    c = CorpusSettings(num_image_docs=120, num_text_docs=10, num_queries=(10, 4, 4), num_composed=(6, 2, 2))
    queries = synthetic_corpus().queries(c)
    composed = [q for split in queries.values() for q in split if q["kind"] == "composed"]
    assert len(composed) == 10 and all(q["image"][:4] == b"\x89PNG" for q in composed)
    assert all("image" not in q for split in queries.values() for q in split if q["kind"] != "composed")
    examples, counts = training_examples(queries["train"], {}, DrawSettings())
    assert counts["skipped_no_positive"] == 16  # no documents given: nothing to train, nothing raised
