"""Shared fixtures for the unit tests: a tiny synthetic corpus, offline WordPiece tokenizers
and a factory of tiny random-init CIEA models (every variant, four LM families).

Everything here runs offline in well under a second per model on CPU:

* ``synthetic_corpus`` — documents and queries from :mod:`pipelines.ingest.sources.synthetic.generator`.
* ``tokenizer_dirs`` — ``{"t5": dir, "bert": dir}`` trained once per session with
  :func:`ciea_model.tokenizer.train_wordpiece_tokenizer`.
* ``make_config`` / ``make_model`` — ``make_model(variant="ciea", family="t5",
  trainable_vision=False, **overrides) -> (model, processor)`` builds a fresh model each
  call (width 32, 2 layers, 4 heads; vision 32 px with 8 px patches → 16 patches).
* ``documents`` / ``make_examples`` — ready-made :class:`Document` objects and
  :class:`TrainExample` lists.
* ``tiny`` — the constants (width, patch count, HF configs) for assertions.

Every unit test runs with one torch intra-op thread (autouse ``_one_torch_thread``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from ciea_model import (
    CIEAConfig,
    CIEAModel,
    CIEAProcessor,
    Document,
    ExtractorConfig,
    TextTowerConfig,
    TrainExample,
    VisionTowerConfig,
    create_model_and_processor,
)
from ciea_model.presets import tiny_config
from ciea_model.tokenizer import train_wordpiece_tokenizer
from pipelines.ingest.sources.synthetic.generator import (
    SyntheticConfig,
    generate_queries,
    iter_documents,
)

HIDDEN = 32
"""Width of every tiny LM (and so of the shared embedding space)."""

TINY_VISION: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}
NUM_PATCHES = (TINY_VISION["image_size"] // TINY_VISION["patch_size"]) ** 2

# Special-token ids of the offline tokenizers (train_wordpiece_tokenizer puts the specials
# first, in this order): t5 style <pad>=0 </s>=1 <unk>=2; bert style [PAD]=0 [UNK]=1
# [CLS]=2 [SEP]=3. The tiny LM configs below agree with them.
TINY_LMS: dict[str, dict[str, Any]] = {
    "t5": {
        "model_type": "t5", "d_model": HIDDEN, "d_ff": 64, "d_kv": 8, "num_layers": 2,
        "num_decoder_layers": 2, "num_heads": 4, "pad_token_id": 0, "eos_token_id": 1,
        "decoder_start_token_id": 0,
    },
    "bert": {
        "model_type": "bert", "hidden_size": HIDDEN, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 256,
        "pad_token_id": 0,
    },
    "gpt2": {
        "model_type": "gpt2", "n_embd": HIDDEN, "n_layer": 2, "n_head": 4, "n_positions": 256,
        "bos_token_id": 1, "eos_token_id": 1,
    },
    "bart": {
        "model_type": "bart", "d_model": HIDDEN, "encoder_layers": 2, "decoder_layers": 2,
        "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64, "max_position_embeddings": 256, "pad_token_id": 0,
        "bos_token_id": 2, "eos_token_id": 3, "decoder_start_token_id": 2,
        "forced_eos_token_id": None,
    },
}
TOKENIZER_STYLE = {"t5": "t5", "bert": "bert", "gpt2": "t5", "bart": "bert"}
LM_FAMILIES = tuple(TINY_LMS)

SYNTHETIC = SyntheticConfig(
    seed=7, num_image_docs=60, num_text_docs=20, num_queries=(40, 8, 8), image_size=32
)

# Phrases the processor tests rely on; added to the tokenizer corpus so that every word
# is a whole token whatever the synthetic corpus happens to contain.
EXTRA_TEXTS = (
    "a red circle from the harbor",
    "a circle from the harbor collection",
    "a red circle on the left from the harbor",
    "on the left",
    "a green square at the top, from the garden collection",
)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The models here are tiny: one intra-op thread is as fast, and it keeps the suite
    fast on a busy machine (oversubscribed threads made it 4-6x slower on 2 busy cores).
    Restored after each test so that other test tiers in the same session are unaffected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synthetic_corpus() -> tuple[list[dict], dict[str, list[dict]]]:
    """(documents as dicts, {"train"/"dev"/"test": queries}) of a tiny synthetic corpus."""
    return list(iter_documents(SYNTHETIC)), generate_queries(SYNTHETIC)


@pytest.fixture(scope="session")
def corpus_texts(synthetic_corpus) -> list[str]:
    docs, queries = synthetic_corpus
    texts = [d["caption"] or d["text"] for d in docs]
    texts += [q["query"] for split in queries.values() for q in split]
    return texts + list(EXTRA_TEXTS) * 5


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory, corpus_texts) -> dict[str, str]:
    """``{"t5": dir, "bert": dir}``: offline WordPiece tokenizers, one per style."""
    out = {}
    for style in ("t5", "bert"):
        path = tmp_path_factory.mktemp(f"tokenizer_{style}")
        tok = train_wordpiece_tokenizer(corpus_texts, path, vocab_size=400, style=style)
        expected = {"t5": ["<pad>", "</s>", "<unk>"], "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]}
        assert tok.convert_ids_to_tokens(list(range(len(expected[style])))) == expected[style]
        out[style] = str(path)
    return out


@pytest.fixture(scope="session")
def make_config(tokenizer_dirs) -> Callable[..., CIEAConfig]:
    """``make_config(variant="ciea", family="t5", trainable_vision=False, pooling="auto",
    text_overrides=None, **config_overrides) -> CIEAConfig`` for a tiny random-init model."""

    def make(
        variant: str = "ciea",
        family: str = "t5",
        trainable_vision: bool = False,
        pooling: str = "auto",
        text_overrides: dict[str, Any] | None = None,
        **config_overrides: Any,
    ) -> CIEAConfig:
        text = TextTowerConfig(
            hf_config=dict(TINY_LMS[family]),
            tokenizer=tokenizer_dirs[TOKENIZER_STYLE[family]],
            pooling=pooling,
        )
        if text_overrides:
            text = dataclasses.replace(text, **text_overrides)
        return CIEAConfig(
            variant=variant,
            text=text,
            vision=VisionTowerConfig(hf_config=dict(TINY_VISION), trainable=trainable_vision),
            extractor=ExtractorConfig(num_heads=4, ffn_dim=64),
            **config_overrides,
        )

    return make


@pytest.fixture(scope="session")
def make_model(make_config, tokenizer_dirs) -> Callable[..., tuple[CIEAModel, CIEAProcessor]]:
    """``make_model(variant="ciea", family="t5", trainable_vision=False, seed=0, ...)``:
    a fresh tiny random-init ``(model, processor)`` on every call (same args and seed →
    identical weights). Extra keyword arguments go to ``make_config``. ``univl-dr`` is the
    tiny preset's CLIP dual encoder (its text tower is CLIP's, not an LM family: the other
    arguments do not apply)."""

    def make(
        variant: str = "ciea",
        family: str = "t5",
        trainable_vision: bool = False,
        seed: int = 0,
        **kwargs: Any,
    ) -> tuple[CIEAModel, CIEAProcessor]:
        if variant == "univl-dr":
            cfg = tiny_config("univl-dr", tokenizer_dirs["t5"])
        else:
            cfg = make_config(variant, family, trainable_vision, **kwargs)
        return create_model_and_processor(cfg, pretrained=False, seed=seed)

    return make


def to_document(row: dict) -> Document:
    """A synthetic-corpus dict → :class:`Document` through the store's converter (the image
    stays PNG bytes)."""
    from pipelines.store.documents import expect_document, row_to_document

    return expect_document(row_to_document(row))


@pytest.fixture(scope="session")
def documents(synthetic_corpus) -> list[Document]:
    """Six image documents followed by three text documents (PNG-bytes images)."""
    docs, _ = synthetic_corpus
    images = [to_document(d) for d in docs if d["modality"] == "image"][:6]
    texts = [to_document(d) for d in docs if d["modality"] == "text"][:3]
    return images + texts


@pytest.fixture(scope="session")
def make_examples(synthetic_corpus) -> Callable[..., list[TrainExample]]:
    """``make_examples(n, split="train")``: the first ``n`` synthetic queries as
    :class:`TrainExample` (positive = the query's target image document, relevant ids =
    every positive, captions of every positive for ``q_comp``)."""
    docs, queries = synthetic_corpus
    by_id = {d["doc_id"]: d for d in docs}

    def make(n: int, split: str = "train") -> list[TrainExample]:
        out = []
        for q in queries[split][:n]:
            positives = q["positive_doc_ids"]
            out.append(
                TrainExample(
                    qid=q["qid"],
                    query=q["query"],
                    positive=to_document(by_id[q["target_doc_id"]]),
                    relevant_ids=frozenset(positives),
                    positive_captions=tuple(by_id[p]["caption"] for p in positives),
                )
            )
        return out

    return make


@pytest.fixture(scope="session")
def tiny() -> SimpleNamespace:
    """The tiny model's constants, for tests (test modules do not import conftest)."""
    return SimpleNamespace(
        hidden=HIDDEN, num_patches=NUM_PATCHES, vision=dict(TINY_VISION),
        lms={k: dict(v) for k, v in TINY_LMS.items()}, tokenizer_style=dict(TOKENIZER_STYLE),
        families=LM_FAMILIES, image_size=TINY_VISION["image_size"],
    )
