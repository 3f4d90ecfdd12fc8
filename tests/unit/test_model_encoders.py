"""The encoding API (CIEA_METHOD.md, "Encoder" and "Documents and queries"): shapes, unit
norms and order of encode_query / encode_documents / encode_image_only for every variant
and LM family; padding invariance; which parts are trained and which stay frozen."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ciea_model import VARIANTS
from ciea_model.training import compute_loss

QUERIES = ["a red circle", "find two blue squares at the top in the garden collection", "zoo"]
IMAGE_VARIANTS = [v for v in VARIANTS if v != "text-only"]



def _assert_unit_rows(x: torch.Tensor, rows: int, dim: int) -> None:
    assert x.shape == (rows, dim)
    assert torch.isfinite(x).all()
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(rows), atol=1e-5, rtol=0)


def _mixed(documents):
    # image, text, image, image, text: interleaved so that order matters.
    img = [d for d in documents if d.modality == "image"]
    txt = [d for d in documents if d.modality == "text"]
    return [img[0], txt[0], img[1], img[2], txt[1]]


def _check_mixed_batch(model, processor, docs, dim) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        together = model.encode_documents(processor.collate_documents(docs))
        alone = torch.cat([model.encode_documents(processor.collate_documents([d])) for d in docs])
    _assert_unit_rows(together, len(docs), dim)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    # Distinct documents get distinct vectors (the rows are not all one broadcast value).
    assert torch.cdist(together, together).fill_diagonal_(1.0).min() > 1e-4
    return together


# --------------------------------------------------------------------------- variants


@pytest.mark.parametrize("variant", VARIANTS)
def test_encode_query_and_documents_every_variant(variant, make_model, documents, tiny):
    model, processor = make_model(variant)
    model.eval()
    with torch.no_grad():
        q = model.encode_query(**processor.tokenize(QUERIES))
    _assert_unit_rows(q, len(QUERIES), tiny.hidden)
    assert model.dim == tiny.hidden
    _check_mixed_batch(model, processor, _mixed(documents), tiny.hidden)


@pytest.mark.parametrize("variant", VARIANTS)
def test_module_layout_follows_the_variant(variant, make_model):
    model, _ = make_model(variant)
    cfg = model.config
    assert (model.vision is not None) == cfg.uses_images
    assert (model.projector is not None) == (cfg.uses_images and not cfg.is_dual_encoder)
    assert (model.extractor is not None) == cfg.uses_extractor
    assert model.extractor is None or model.extractor.num_heads == 4


@pytest.mark.parametrize("variant", IMAGE_VARIANTS)
def test_encode_image_only(variant, make_model, documents, tiny):
    model, processor = make_model(variant)
    model.eval()
    images = [d for d in documents if d.modality == "image"][:3]
    batch = processor.collate_documents(images)
    with torch.no_grad():
        io = model.encode_image_only(batch.image)
        docs, io2 = model.encode_documents(batch, return_image_only=True)
        io_alone = torch.cat(
            [model.encode_image_only(processor.collate_documents([d]).image) for d in images]
        )
    _assert_unit_rows(io, len(images), tiny.hidden)
    torch.testing.assert_close(io2, io)
    torch.testing.assert_close(io_alone, io, atol=1e-5, rtol=0)
    torch.testing.assert_close(docs, model.encode_documents(batch))
    # The image-only encoding is not the document encoding (the caption is left out).
    assert not torch.allclose(io, docs, atol=1e-3)


def test_image_only_encoding_ignores_the_caption_without_extractor(make_model, documents):
    # Without the extractor the caption cannot reach the image-only vector at all.
    model, processor = make_model("marvel")
    model.eval()
    img = next(d for d in documents if d.modality == "image")
    other = type(img)(img.doc_id, "image", caption="a totally different caption", image=img.image)
    with torch.no_grad():
        a = model.encode_image_only(processor.collate_documents([img]).image)
        b = model.encode_image_only(processor.collate_documents([other]).image)
    torch.testing.assert_close(a, b)


def test_image_only_extractor_switch(make_model, documents):
    images = [d for d in documents if d.modality == "image"][:2]
    on, processor = make_model("ciea")
    off, _ = make_model("ciea", image_only_extractor=False)
    marvel_like, _ = make_model("ciea")
    for m in (on, off, marvel_like):
        m.eval()
    batch = processor.collate_documents(images)
    with torch.no_grad():
        io_on = on.encode_image_only(batch.image)
        io_off = off.encode_image_only(batch.image)
        # Release behaviour: projected patches straight into the LM, no extractor.
        marvel_like.extractor = None
        io_plain = marvel_like.encode_image_only(batch.image)
        assert torch.equal(on.encode_documents(batch), off.encode_documents(batch))
    torch.testing.assert_close(io_off, io_plain)
    assert not torch.allclose(io_on, io_off, atol=1e-4)


def test_text_only_reads_image_documents_as_their_caption(make_model, documents):
    model, processor = make_model("text-only")
    model.eval()
    img = next(d for d in documents if d.modality == "image")
    with torch.no_grad():
        as_doc = model.encode_documents(processor.collate_documents([img]))
        as_text = model.encode_text(**processor.tokenize([img.caption]))
    torch.testing.assert_close(as_doc, as_text)




# --------------------------------------------------------------------------- LM families


@pytest.mark.parametrize(
    ("family", "pooling", "resolved"),
    [
        ("t5", "auto", "decoder_step0"),
        ("bert", "auto", "cls"),
        ("bert", "mean", "mean"),
        ("gpt2", "auto", "last"),
        ("bart", "auto", "decoder_step0"),
    ],
)
def test_lm_families(family, pooling, resolved, make_model, documents, tiny):
    model, processor = make_model("ciea", family=family, pooling=pooling)
    assert model.text.pooling == resolved
    model.eval()
    with torch.no_grad():
        q = model.encode_query(**processor.tokenize(QUERIES))
        _assert_unit_rows(q, len(QUERIES), tiny.hidden)
        # Right padding must not change a vector: a short query alone vs beside a long one.
        short_alone = model.encode_query(**processor.tokenize([QUERIES[2]]))
        short_padded = model.encode_query(**processor.tokenize([QUERIES[2], QUERIES[1]]))[:1]
    torch.testing.assert_close(short_alone, short_padded, atol=1e-5, rtol=0)
    docs = _check_mixed_batch(model, processor, _mixed(documents), tiny.hidden)
    with torch.no_grad():
        io = model.encode_image_only(processor.collate_documents(_mixed(documents)[:1]).image)
    _assert_unit_rows(io, 1, tiny.hidden)
    assert not torch.allclose(io, docs[:1], atol=1e-3)


def test_gpt2_pools_the_last_real_token(make_model):
    model, processor = make_model("text-only", family="gpt2")
    model.eval()
    enc = processor.tokenize([QUERIES[2], QUERIES[1]])
    assert enc["attention_mask"][0].sum() < enc["attention_mask"][1].sum()  # padded row 0
    with torch.no_grad():
        hidden = model.text.model(**enc).last_hidden_state
        pooled = model.text(enc["attention_mask"], input_ids=enc["input_ids"])
    last = enc["attention_mask"].sum(1) - 1
    torch.testing.assert_close(pooled, hidden[torch.arange(2), last])


def test_bert_mean_pooling_averages_real_tokens(make_model):
    model, processor = make_model("text-only", family="bert", pooling="mean")
    model.eval()
    enc = processor.tokenize([QUERIES[2], QUERIES[1]])
    with torch.no_grad():
        hidden = model.text.model(**enc).last_hidden_state
        pooled = model.text(enc["attention_mask"], input_ids=enc["input_ids"])
    n = int(enc["attention_mask"][0].sum())
    torch.testing.assert_close(pooled[0], hidden[0, :n].mean(0))


# --------------------------------------------------------------------------- gradients, modes


def _training_loss(model, processor, make_examples):
    batch = processor.collate_training(make_examples(4))
    assert batch.comp_queries is not None or not model.config.effective_comp_weight
    return compute_loss(model, batch).loss


def test_frozen_vision_tower_gets_no_gradient_and_stays_in_eval(make_model, make_examples):
    model, processor = make_model("ciea")
    model.train()
    assert model.training and model.text.training and model.extractor.training
    assert not model.vision.training
    assert not any(m.training for m in model.vision.modules())
    assert not any(p.requires_grad for p in model.vision.parameters())
    _training_loss(model, processor, make_examples).backward()
    assert all(p.grad is None for p in model.vision.parameters())
    for name, module in (("projector", model.projector), ("extractor", model.extractor)):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads), name
        assert sum(g.abs().sum() for g in grads) > 0, name
    assert model.logit_scale.grad is not None
    model.eval()
    model.train()  # a second switch does not wake it either
    assert not model.vision.training


def test_trainable_vision_tower_gets_gradient(make_model, make_examples):
    model, processor = make_model("ciea", trainable_vision=True)
    model.train()
    assert model.vision.training
    assert all(p.requires_grad for p in model.vision.parameters())
    _training_loss(model, processor, make_examples).backward()
    grads = {n: p.grad for n, p in model.vision.named_parameters()}
    with_grad = [n for n, g in grads.items() if g is not None and g.abs().sum() > 0]
    assert any("encoder.layers.1" in n for n in with_grad)
    assert any("patch_embedding" in n for n in with_grad)
    model.eval()
    assert not model.vision.training


def test_logit_scale_gets_gradient_and_is_clamped(make_model, make_examples):
    model, processor = make_model("ciea")
    cfg = model.config
    # The default init is the clamp itself (ln 100 → exp = 100); it must still learn.
    assert model.scale().item() == pytest.approx(cfg.logit_scale_max, rel=1e-6)
    _training_loss(model, processor, make_examples).backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert model.scale().item() == pytest.approx(cfg.logit_scale_max, rel=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
    assert model.scale().item() == pytest.approx(20.0, rel=1e-6)
    model.zero_grad()
    model.scale().backward()
    assert model.logit_scale.grad.item() == pytest.approx(20.0, rel=1e-5)  # d exp(θ)/dθ


def test_document_batch_to_device_keeps_everything(make_model, documents):
    _, processor = make_model("ciea")
    batch = processor.collate_documents(_mixed(documents))
    moved = batch.to("cpu")
    assert moved.size == batch.size
    assert torch.equal(moved.text_index, batch.text_index)
    assert torch.equal(moved.image_index, batch.image_index)
    assert moved.text.keys() == batch.text.keys() and moved.image.keys() == batch.image.keys()


# --------------------------------------------------------------------------- inference helpers


@pytest.mark.parametrize("variant", ["ciea", "text-only"])
def test_inference_helpers_batch_and_keep_order(variant, make_model, documents, tiny):
    from ciea_model.inference import encode_documents, encode_queries

    model, processor = make_model(variant)
    model.train()  # the helpers switch to eval themselves
    docs = _mixed(documents)
    out = encode_documents(model, processor, docs, batch_size=2)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (5, tiny.hidden)
    assert not model.training
    with torch.no_grad():
        expected = model.encode_documents(processor.collate_documents(docs)).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-5)
    q = encode_queries(model, processor, QUERIES, batch_size=2)
    with torch.no_grad():
        expected_q = model.encode_query(**processor.tokenize(QUERIES)).numpy()
    np.testing.assert_allclose(q, expected_q, atol=1e-5)
    assert encode_queries(model, processor, []).shape == (0, tiny.hidden)
    assert encode_documents(model, processor, []).shape == (0, tiny.hidden)
