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
from safetensors import SafetensorError, safe_open
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
#: What every refusal of a broken checkpoint tells the user to do.
_FIX = "re-run `ciea train`, or point --checkpoint at a complete folder written by `ciea train`"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded (weights missing, truncated or not the
    manifest's model; manifest unreadable), as one line that names the file and the fix.

    A ``ValueError``, so the jobs' existing handlers of bad checkpoints report it as such.
    """


#: Config keys added after checkpoints were first written → the value that gives the
#: behaviour those checkpoints have. :func:`model_id` leaves a key out while it holds that
#: value, so a checkpoint saved before the key existed keeps its id (its manifest's
#: ``model_id`` still matches its weights, and the tables embedded with it stay its own).
LATER_CONFIG_KEYS: dict[tuple[str, ...], Any] = {
    ("image_only_frame",): True,
    ("text", "projection_dim"): None,
}


def identity_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a :meth:`CIEAConfig.to_dict`) without the :data:`LATER_CONFIG_KEYS` that
    hold their original behaviour: what :func:`model_id` hashes."""
    out = json.loads(json.dumps(config))
    for path, neutral in LATER_CONFIG_KEYS.items():
        *parents, key = path
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and key in node and node[key] == neutral:
            del node[key]
    return out


def model_id(model: CIEAModel) -> str:
    """A content hash of config + weights: equal ids ⇔ equal models (16 hex digits).

    Two checkpoints with the same weights and config get the same id wherever they were
    saved, which is what vector-table lineage needs; a config key added later does not
    change the id of a model that does not use it (:data:`LATER_CONFIG_KEYS`).
    """
    h = hashlib.sha256()
    h.update(json.dumps(identity_config(_resolved_config(model).to_dict()), sort_keys=True).encode())
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
    """Reads and checks a checkpoint's manifest, and that its weights file is there and whole.

    The weights are checked here (their header only, not the tensors) because every job
    reads the manifest before it starts Ray or loads anything: a checkpoint copied half-way
    is refused in one line up front, not in a traceback from a worker.

    Raises:
        FileNotFoundError: ``path`` is not a checkpoint directory.
        ValueError: the format version is newer than this code understands.
        CheckpointError: the manifest is not JSON, or the weights are missing or corrupt.
    """
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{path} is not a ciea checkpoint (no {MANIFEST}): pass a directory written by "
            "ciea_model.save_checkpoint."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as e:  # JSON and UTF-8 decoding errors alike
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is not valid JSON ({_one_line(e)}): {_FIX}") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path} has format_version={version!r}; this ciea reads versions up to "
            f"{FORMAT_VERSION}: upgrade ciea."
        )
    check_weights(path)
    return manifest


def check_weights(path: str | Path) -> None:
    """Refuses a checkpoint whose ``model.safetensors`` is missing, empty, truncated or not
    safetensors. Reads only the header: safetensors checks that its offsets cover the file
    exactly, so a partial copy fails here.

    Raises:
        CheckpointError: naming the file, what is wrong with it and the fix.
    """
    weights = Path(path) / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {path} has no {WEIGHTS} (the weights are missing): {_FIX}")
    try:
        with safe_open(str(weights), framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint {path}: {WEIGHTS} is corrupt or truncated "
                              f"({_one_line(e)}): {_FIX}") from None


def _one_line(error: BaseException, limit: int = 240) -> str:
    """The library's message on one line, cut at ``limit`` characters (a parameter list can be long)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


#: The parameters a visual pretraining (stage 0, ``ciea pretrain-vision``) hands on.
VISUAL_MODULE = ("vision.", "projector.")


def load_visual_module(model: CIEAModel, weights: str | Path) -> list[str]:
    """Loads the visual module (vision tower and projector: :data:`VISUAL_MODULE`) of a
    weights file into ``model``, leaving every other parameter as it is. Returns the
    names loaded.

    Raises:
        CheckpointError: the file lacks one of ``model``'s visual parameters, or a shape differs.
    """
    from safetensors.torch import load_file

    own = {k: v for k, v in model.state_dict().items() if k.startswith(VISUAL_MODULE)}
    saved = load_file(str(weights))
    missing = sorted(k for k in own if k not in saved)
    wrong = sorted(k for k in own if k in saved and saved[k].shape != own[k].shape)
    if missing or wrong:
        what = f"missing {missing[:3]}" if missing else f"shapes differ for {wrong[:3]}"
        raise CheckpointError(f"{weights}: not this model's visual module ({what}): start from a "
                              "`ciea pretrain-vision` model trained with the same preset")
    model.load_state_dict({k: saved[k] for k in own}, strict=False)
    return sorted(own)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[CIEAModel, CIEAProcessor]:
    """Loads a checkpoint written by :func:`save_checkpoint` without touching the hub.

    Returns:
        ``(model, processor)`` in eval mode.

    Raises:
        FileNotFoundError / ValueError: as :func:`read_manifest`.
        CheckpointError: the weights are missing, corrupt, or not the parameters of the
            model the manifest describes.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if not isinstance(manifest.get("config"), dict):
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} has no model config: {_FIX}")
    config = CIEAConfig.from_dict(manifest["config"])
    config = config.replace(text=dataclasses.replace(config.text, tokenizer=str(path / TOKENIZER_DIR)))
    model, processor = create_model_and_processor(config, pretrained=False)
    try:
        load_model(model, str(path / WEIGHTS), strict=True, device=str(map_location))
    except (SafetensorError, OSError) as e:  # changed on disk after the header check
        raise CheckpointError(f"checkpoint {path}: {WEIGHTS} is corrupt or truncated ({_one_line(e)}): "
                              f"{_FIX}") from None
    except RuntimeError as e:  # missing / unexpected / mis-shaped parameters
        raise CheckpointError(f"checkpoint {path}: {WEIGHTS} does not hold the parameters of the model "
                              f"{MANIFEST} describes ({_one_line(e)}): {_FIX}") from None
    model.to(map_location)
    model.eval()
    return model, processor
