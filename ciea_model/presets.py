"""Named model configs: ``tiny`` (tests), ``demo`` (CPU minutes), ``paper`` (the method).

Presets are plain functions returning :class:`CIEAConfig`; paths that differ per machine
(a tokenizer directory, a local LM) are arguments, never looked up here.
"""

from __future__ import annotations

from typing import Any

from .config import CIEAConfig, ExtractorConfig, TextTowerConfig, VisionTowerConfig

PRESETS = ("tiny", "demo", "paper")


CLIP_CHECKPOINT = "openai/clip-vit-base-patch32"
T5_ANCE = "OpenMatch/t5-ance"

_TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
_DEMO_VISION = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
#: The demo ``univl-dr``'s shared space: the width of its CLIP vision tower.
_DEMO_DUAL_DIM = 128


def _dual_encoder(tokenizer: str, max_length: int, vision_hf: dict[str, Any], width: int) -> CIEAConfig:
    """``univl-dr`` at the tiny preset's size: a random-init 2-layer CLIP text encoder of
    ``width`` (with the preset's tokenizer, its vocabulary resized to it when built) beside
    the preset's CLIP vision tower, both projecting to ``width``, both fine-tuned
    (UniVL-DR's release trains the whole CLIP)."""
    text_hf = {"model_type": "clip_text_model", "hidden_size": width, "intermediate_size": 2 * width,
               "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
               "projection_dim": width, "vocab_size": 1024}
    return CIEAConfig(
        variant="univl-dr",
        text=TextTowerConfig(hf_config=text_hf, tokenizer=tokenizer, max_length=max_length),
        vision=VisionTowerConfig(hf_config={**vision_hf, "projection_dim": width}, trainable=True),
    )


def tiny_config(variant: str, tokenizer: str) -> CIEAConfig:
    """A 2-layer, 32-wide T5 and CLIP (32 px, 16 patches): builds in milliseconds.
    ``univl-dr``: a random-init 2-layer, 32-wide CLIP text encoder beside that CLIP vision
    tower (the tiny preset has no pretrained LM to stand in for CLIP's text side; it tests
    the code, not the comparison)."""
    if variant == "univl-dr":
        return _dual_encoder(tokenizer, 32, _TINY_VISION, 32)
    return CIEAConfig(
        variant=variant,
        text=TextTowerConfig(
            hf_config={"model_type": "t5", "d_model": 32, "d_ff": 64, "num_layers": 2,
                       "num_decoder_layers": 1, "num_heads": 4, "d_kv": 8},
            tokenizer=tokenizer, max_length=32,
        ),
        vision=VisionTowerConfig(hf_config=dict(_TINY_VISION), trainable=True),
        extractor=ExtractorConfig(num_heads=4, ffn_dim=64),
    )


def demo_config(variant: str, text_model: str, num_layers: int | None = 3) -> CIEAConfig:
    """A real pretrained sentence encoder (e.g. all-MiniLM-L6-v2, mean pooling, first
    ``num_layers`` layers) with a small random-init CLIP trained from scratch (no
    pretrained CLIP is installable offline): 32 px images, 8 px patches → 16 patches; the
    extractor without output dropout (the one departure from the release's extractor).

    ``univl-dr`` is UniVL-DR's dual encoder with a language-pretrained text side: no
    pretrained CLIP text encoder installs offline, and a random-init one trained on the
    demo's data learns no language (26.1 MRR@10, issue 27), so the text side is the same
    LM as every other demo variant (``text_model``, its first ``num_layers`` layers, mean
    pooling) plus a linear projection to 128, beside the same CLIP vision tower with its
    ``visual_projection`` to 128; both towers fine-tuned, as UniVL-DR's release does."""
    if variant == "univl-dr":
        return CIEAConfig(
            variant=variant,
            text=TextTowerConfig(name_or_path=text_model, pooling="mean", max_length=64, num_layers=num_layers,
                                 projection_dim=_DEMO_DUAL_DIM),
            vision=VisionTowerConfig(hf_config={**_DEMO_VISION, "projection_dim": _DEMO_DUAL_DIM}, trainable=True),
        )
    return CIEAConfig(
        variant=variant,
        text=TextTowerConfig(name_or_path=text_model, pooling="mean", max_length=64, num_layers=num_layers),
        vision=VisionTowerConfig(hf_config=dict(_DEMO_VISION), trainable=True),
        # No dropout on the attention output (the release's 0.05 stays in the paper preset):
        # on a CPU budget of a few epochs it is what slows CIEA's start (bench/recipe_ablation.py:
        # −2.1 MRR@10, −4.3 on image queries at 2 epochs; −1.1 at 6; BENCHMARKS.md).
        extractor=ExtractorConfig(num_heads=8, ffn_dim=2048, output_dropout=0.0),
    )


def paper_config(variant: str, text_model: str | None = None, clip_model: str | None = None) -> CIEAConfig:
    """T5-ANCE + frozen CLIP ViT-B/32, 49 patches, the extractor of the paper.

    ``univl-dr`` is UniVL-DR's dual encoder: CLIP ViT-B/32's text and vision encoders
    (with their projections, 512-d) and CLIP's tokenizer (77 tokens), all from the one
    CLIP checkpoint, both encoders fine-tuned as in the release; it has no T5, so
    ``text_model`` does not apply to it.

    Args:
        variant: one of :data:`ciea_model.config.VARIANTS`.
        text_model: T5-ANCE's folder or hub name (default ``OpenMatch/t5-ance``).
        clip_model: CLIP's folder or hub name (default ``openai/clip-vit-base-patch32``).
    """
    clip = clip_model or CLIP_CHECKPOINT
    if variant == "univl-dr":
        return CIEAConfig(
            variant=variant,
            text=TextTowerConfig(name_or_path=clip, max_length=77),
            vision=VisionTowerConfig(name_or_path=clip, trainable=True),
        )
    return CIEAConfig(
        variant=variant,
        text=TextTowerConfig(name_or_path=text_model or T5_ANCE, pooling="decoder_step0", max_length=128),
        vision=VisionTowerConfig(name_or_path=clip, trainable=False),
        extractor=ExtractorConfig(num_heads=8, ffn_dim=2048, dropout=0.05),
    )
