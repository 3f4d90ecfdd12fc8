"""One factory: config → (model, processor), from pretrained weights or at random."""

from __future__ import annotations

import logging

import torch
from transformers import AutoTokenizer

from .config import CIEAConfig
from .model import CIEAModel
from .processor import CIEAProcessor
from .towers import TextTower, VisionTower

logger = logging.getLogger(__name__)


def create_model_and_processor(
    config: CIEAConfig, *, pretrained: bool = True, seed: int | None = None
) -> tuple[CIEAModel, CIEAProcessor]:
    """Builds a model and its processor.

    Args:
        config: the model config.
        pretrained: load tower weights from ``name_or_path`` where one is set (a hub name
            needs the network; a local directory does not). ``False`` builds every tower
            with random weights from its config: nothing is downloaded or read but the
            tokenizer and, for a tower given only by ``name_or_path``, its ``config.json``.
        seed: seeds the random initialisation, so that separate processes (Ray actors,
            DDP workers) build identical random models.

    Returns:
        ``(model, processor)``; the LM's embedding matrix is resized to the tokenizer with
        CIEA's special tokens added.
    """
    if seed is not None:
        torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(config.text.tokenizer_path)
    text = TextTower.from_config(config.text, pretrained=pretrained)
    vision = VisionTower.from_config(config.vision, pretrained=pretrained) if config.uses_images else None
    if vision is not None:
        image_size, num_patches = vision.image_size, vision.num_patches
    else:
        image_size, num_patches = 224, 0  # text-only: images are never transformed
    processor = CIEAProcessor(tokenizer, config, image_size=image_size, num_patches=num_patches)
    text.resize_token_embeddings(len(processor))
    model = CIEAModel(config, text, vision)
    logger.info(
        "built %s (pretrained=%s): %.1fM parameters, %.1fM trainable, dim %d",
        config.variant, pretrained, sum(p.numel() for p in model.parameters()) / 1e6,
        sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, model.dim,
    )
    return model, processor
