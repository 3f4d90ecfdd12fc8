"""Self-describing checkpoints: config + weights (safetensors) + tokenizer + version.

Layout of a checkpoint directory::

    ciea_checkpoint.json   format version, model_id, the CIEA config with the towers'
                           resolved Hugging Face configs (so loading needs no hub)
    model.safetensors      every parameter (tied weights stored once)
    tokenizer/             the tokenizer with CIEA's special tokens

Nothing is unpickled: safetensors and JSON only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from .config import CIEAConfig
from .factory import create_model_and_processor
from .model import CIEAModel
from .processor import CIEAProcessor

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "ciea_checkpoint.json"
WEIGHTS = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


def model_id(model: CIEAModel) -> str:
    """A content hash of config + weights: equal ids ⇔ equal models (16 hex digits).

    Two checkpoints with the same weights and config get the same id wherever they were
    saved, which is what vector-table lineage needs.
    """
    h = hashlib.sha256()
    h.update(json.dumps(_resolved_config(model).to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _hf_dict(module: Any) -> dict[str, Any]:
    d = module.config.to_diff_dict() if hasattr(module.config, "to_diff_dict") else module.config.to_dict()
    d = {k: v for k, v in d.items() if not k.startswith("_") and k not in ("transformers_version", "architectures")}
    d["model_type"] = module.config.model_type
    return d


def _resolved_config(model: CIEAModel) -> CIEAConfig:
    """The config with each tower pinned to its exact HF config (random-init, offline)."""
    cfg = model.config
    text_hf = _hf_dict(model.text.model)
    text = dataclasses.replace(cfg.text, name_or_path=None, hf_config=text_hf, num_layers=None, tokenizer=TOKENIZER_DIR)
    vision = cfg.vision
    if model.vision is not None:
        vision_hf = _hf_dict(model.vision.model)
        vision_hf.pop("model_type", None)
        vision = dataclasses.replace(cfg.vision, name_or_path=None, hf_config=vision_hf)
    return dataclasses.replace(cfg, text=text, vision=vision)


def save_checkpoint(
    model: CIEAModel, processor: CIEAProcessor, path: str | Path, metadata: dict[str, Any] | None = None
) -> str:
    """Writes a checkpoint directory and returns its ``model_id``.

    Args:
        model: the model.
        processor: its processor (the tokenizer is saved).
        path: target directory (created).
        metadata: extra JSON-serialisable facts (training step, metrics, data version).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path / WEIGHTS))
    processor.tokenizer.save_pretrained(str(path / TOKENIZER_DIR))
    mid = model_id(model)
    manifest = {
        "format_version": FORMAT_VERSION,
        "model_id": mid,
        "config": _resolved_config(model).to_dict(),
        "metadata": metadata or {},
    }
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    logger.info("saved checkpoint %s (model_id %s)", path, mid)
    return mid


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Reads and checks a checkpoint's manifest.

    Raises:
        FileNotFoundError: ``path`` is not a checkpoint directory.
        ValueError: the format version is newer than this code understands.
    """
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{path} is not a ciea checkpoint (no {MANIFEST}): pass a directory written by "
            "ciea_model.save_checkpoint."
        )
    manifest = json.loads(manifest_path.read_text())
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path} has format_version={version!r}; this ciea reads versions up to "
            f"{FORMAT_VERSION}: upgrade ciea."
        )
    return manifest


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[CIEAModel, CIEAProcessor]:
    """Loads a checkpoint written by :func:`save_checkpoint` without touching the hub.

    Returns:
        ``(model, processor)`` in eval mode.
    """
    path = Path(path)
    manifest = read_manifest(path)
    config = CIEAConfig.from_dict(manifest["config"])
    config = config.replace(text=dataclasses.replace(config.text, tokenizer=str(path / TOKENIZER_DIR)))
    model, processor = create_model_and_processor(config, pretrained=False)
    load_model(model, str(path / WEIGHTS), strict=True, device=str(map_location))
    model.to(map_location)
    model.eval()
    return model, processor
