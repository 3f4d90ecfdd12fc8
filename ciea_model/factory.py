"""One factory: config → (model, processor), from pretrained weights or at random."""

from __future__ import annotations

import logging

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .config import CIEAConfig
from .model import CIEAModel
from .processor import CIEAProcessor
from .towers import ClipTextTower, ClipVisionTower, ProjectedTextTower, TextTower, VisionTower

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
        CIEA's special tokens added (``univl-dr`` adds none: CLIP with its own tokenizer
        is left as it is).
    """
    if seed is not None:
        torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(config.text.tokenizer_path)
    text, vision = _towers(config, tokenizer, pretrained)
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


def _towers(
    config: CIEAConfig, tokenizer: PreTrainedTokenizerBase, pretrained: bool
) -> tuple[TextTower | ClipTextTower, VisionTower | None]:
    """The variant's towers: CLIP's two projected encoders for ``univl-dr`` (or, with
    ``text.projection_dim``, the LM plus a projection beside CLIP's projected image
    encoder); else the LM and (unless ``text-only``) the CLIP vision tower."""
    if config.has_projected_lm:
        text = ProjectedTextTower.from_config(config.text, pretrained=pretrained)
        return text, ClipVisionTower.from_config(config.vision, pretrained=pretrained)
    if config.is_dual_encoder:
        end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if end is None:
            raise ValueError(
                f"tokenizer {config.text.tokenizer_path!r} has no end-of-text (eos or sep) token, "
                "where CLIP's text tower pools: use CLIP's tokenizer or one that ends each text "
                "with such a token."
            )
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
        token_ids = {"eos_token_id": end, "bos_token_id": bos, "pad_token_id": tokenizer.pad_token_id}
        text = ClipTextTower.from_config(config.text, pretrained=pretrained, token_ids=token_ids)
        return text, ClipVisionTower.from_config(config.vision, pretrained=pretrained)
    text = TextTower.from_config(config.text, pretrained=pretrained)
    vision = VisionTower.from_config(config.vision, pretrained=pretrained) if config.uses_images else None
    return text, vision
