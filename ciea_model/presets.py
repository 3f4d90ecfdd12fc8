"""Named model configs: ``tiny`` (tests), ``demo`` (CPU minutes), ``paper`` (the method).

Presets are plain functions returning :class:`CIEAConfig`; paths that differ per machine
(a tokenizer directory, a local LM) are arguments, never looked up here.
"""

from __future__ import annotations

from .config import CIEAConfig, ExtractorConfig, TextTowerConfig, VisionTowerConfig

PRESETS = ("tiny", "demo", "paper")


def tiny_config(variant: str, tokenizer: str) -> CIEAConfig:
    """A 2-layer, 32-wide T5 and CLIP (32 px, 16 patches): builds in milliseconds."""
    return CIEAConfig(
        variant=variant,
        text=TextTowerConfig(
            hf_config={"model_type": "t5", "d_model": 32, "d_ff": 64, "num_layers": 2,
                       "num_decoder_layers": 1, "num_heads": 4, "d_kv": 8},
            tokenizer=tokenizer, max_length=32,
        ),
        vision=VisionTowerConfig(
            hf_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
            trainable=True,
        ),
        extractor=ExtractorConfig(num_heads=4, ffn_dim=64),
    )


def demo_config(variant: str, text_model: str, num_layers: int | None = 3) -> CIEAConfig:
    """A real pretrained sentence encoder (e.g. all-MiniLM-L6-v2, mean pooling, first
    ``num_layers`` layers) with a small random-init CLIP trained from scratch (no
    pretrained CLIP is installable offline): 32 px images, 8 px patches → 16 patches."""
    return CIEAConfig(
        variant=variant,
        text=TextTowerConfig(name_or_path=text_model, pooling="mean", max_length=64, num_layers=num_layers),
        vision=VisionTowerConfig(
            hf_config={"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
            trainable=True,
        ),
        extractor=ExtractorConfig(num_heads=8, ffn_dim=2048),
    )


def paper_config(variant: str) -> CIEAConfig:
    """T5-ANCE + frozen CLIP ViT-B/32, 49 patches, the extractor of the paper."""
    return CIEAConfig(
        variant=variant,
        text=TextTowerConfig(name_or_path="OpenMatch/t5-ance", pooling="decoder_step0", max_length=128),
        vision=VisionTowerConfig(name_or_path="openai/clip-vit-base-patch32", trainable=False),
        extractor=ExtractorConfig(num_heads=8, ffn_dim=2048, dropout=0.05),
    )
