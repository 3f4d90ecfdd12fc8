"""Offline stand-ins for the two hub checkpoints of the ``paper`` preset.

The hub is unreachable here, so the paper path (``OpenMatch/t5-ance`` + frozen
``openai/clip-vit-base-patch32``) is rehearsed on folders that have the *exact*
architectures and sizes of those checkpoints, random weights, and tokenizers of the real
classes trained offline on the caller's texts — everything ``from_pretrained`` reads, as
``save_pretrained`` writes it. Only the learnt values differ from the real ones.

* ``t5/``: a ``T5Model`` with t5-base's config (what ``AutoModel.from_pretrained`` loads
  for T5-ANCE) and a ``T5Tokenizer`` laid out like T5's SentencePiece vocabulary: 32 000
  pieces with ``<pad>``/``</s>``/``<unk>`` at 0/1/2, then the 100 ``<extra_id_*>`` sentinels
  in reverse (32 100 tokens; the embedding has 32 128 rows, as t5-base's does).
* ``clip/``: the full ``CLIPModel`` of ViT-B/32 (text and vision towers in one folder, as
  the hub has it), a ``CLIPTokenizer`` (byte-level BPE, ``<|startoftext|>`` and
  ``<|endoftext|>`` the two highest ids, as CLIP's legacy pooling expects) and the image
  processor config.
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTokenizer,
    T5Config,
    T5Model,
    T5Tokenizer,
)

#: t5-base's config.json (the architecture of OpenMatch/t5-ance).
T5_BASE = {
    "d_model": 768, "d_ff": 3072, "d_kv": 64, "num_heads": 12, "num_layers": 12, "num_decoder_layers": 12,
    "vocab_size": 32128, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "feed_forward_proj": "relu", "dropout_rate": 0.1, "layer_norm_epsilon": 1e-6, "initializer_factor": 1.0,
    "n_positions": 512, "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1,
    "is_encoder_decoder": True,
}
#: openai/clip-vit-base-patch32's config.json (its legacy text token ids included).
CLIP_TEXT = {
    "hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8, "num_hidden_layers": 12,
    "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "projection_dim": 512, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
CLIP_VISION = {
    "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
    "image_size": 224, "patch_size": 32, "num_channels": 3, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "projection_dim": 512,
}
CLIP_PROJECTION_DIM = 512
CLIP_LOGIT_SCALE_INIT = 2.6592

T5_PIECES = 32000  # SentencePiece pieces of T5's vocabulary, before the sentinels
T5_EXTRA_IDS = 100
#: Characters every tokenizer can spell, whatever the training texts held.
ALPHABET = list(string.ascii_letters + string.digits + string.punctuation)


@dataclass(frozen=True)
class PaperModels:
    """The two folders, for ``model.text_model`` and ``model.vision_model``."""

    t5: Path
    clip: Path


def t5_base_config() -> T5Config:
    return T5Config(**T5_BASE)


def clip_vit_b32_config() -> CLIPConfig:
    return CLIPConfig(text_config=CLIP_TEXT, vision_config=CLIP_VISION, projection_dim=CLIP_PROJECTION_DIM,
                      logit_scale_init_value=CLIP_LOGIT_SCALE_INIT)


def t5_tokenizer(texts: Sequence[str]) -> T5Tokenizer:
    """A Unigram tokenizer trained on ``texts``, padded with pieces no text can produce to
    T5's 32 000, plus the sentinels: 32 100 tokens, ids where T5's are."""
    tok = Tokenizer(models.Unigram())
    # T5Tokenizer's own pre-tokenizer, so the pieces are the ones it will look up.
    tok.pre_tokenizer = T5Tokenizer().backend_tokenizer.pre_tokenizer
    tok.train_from_iterator(texts, trainers.UnigramTrainer(
        vocab_size=T5_PIECES, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
        initial_alphabet=ALPHABET, show_progress=False))
    vocab = [tuple(v) for v in json.loads(tok.to_str())["model"]["vocab"]]
    vocab += [(f"▁<unused_{i}>", -100.0) for i in range(T5_PIECES - len(vocab))]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(T5_EXTRA_IDS))]
    return T5Tokenizer(vocab=vocab, extra_ids=T5_EXTRA_IDS)


def clip_tokenizer(texts: Sequence[str], vocab_size: int = 2000) -> CLIPTokenizer:
    """A byte-level BPE (CLIP's normaliser, pre-tokenizer and ``</w>`` word ends) trained on
    ``texts``; every byte is spellable at any position."""
    layout = CLIPTokenizer().backend_tokenizer
    tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    tok.normalizer, tok.pre_tokenizer = layout.normalizer, layout.pre_tokenizer
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False))
    trained = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = trained["vocab"]
    for piece in (p for a in alphabet for p in (a, a + "</w>")):
        vocab.setdefault(piece, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in trained["merges"]])


def write_paper_models(root: Path, texts: Sequence[str], seed: int = 0) -> PaperModels:
    """Writes ``root/t5`` and ``root/clip`` (random weights, safetensors) and returns them.

    Args:
        root: an empty folder.
        texts: what the tokenizers are trained on (the corpus's texts and queries).
        seed: seeds the random weights.
    """
    torch.manual_seed(seed)
    t5, clip = root / "t5", root / "clip"
    T5Model(t5_base_config()).save_pretrained(t5)
    t5_tokenizer(texts).save_pretrained(t5)
    CLIPModel(clip_vit_b32_config()).save_pretrained(clip)
    clip_tokenizer(texts).save_pretrained(clip)
    CLIPImageProcessorPil(size={"shortest_edge": CLIP_VISION["image_size"]},
                       crop_size={"height": CLIP_VISION["image_size"], "width": CLIP_VISION["image_size"]},
                       ).save_pretrained(clip)
    return PaperModels(t5=t5, clip=clip)
