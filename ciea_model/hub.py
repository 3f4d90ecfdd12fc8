"""Find every model and tokenizer a config names before anything heavy starts.

A tower or tokenizer is given as a local folder (written by ``save_pretrained``) or as a
Hugging Face hub name. Loading a hub name that is neither cached nor reachable fails only
after transformers' retries — tens of seconds, or silently inside a Ray worker. Jobs call
:func:`locate_models` first, so a missing model fails in seconds with one line that names
the fix: a local folder, the cache, or ``HF_HUB_OFFLINE``.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from .config import CIEAConfig

#: Files that show a folder holds what it should.
MODEL_FILES = ("config.json",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model")


class ModelUnavailableError(RuntimeError):
    """A model or tokenizer named by the config cannot be loaded; the message names the fix."""


@dataclass(frozen=True)
class Located:
    what: str  # "text tower", "tokenizer", "vision tower"
    name: str  # as the config gives it
    where: str  # "folder", "cache" or "hub"


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "")


def _cached(name: str, files: tuple[str, ...]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(name, f), str) for f in files)


def _hub_reachable(timeout: float) -> str | None:
    """None if the hub answers, else why not (one request, no retries)."""
    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError) as e:
        return str(getattr(e, "reason", e))
    return None


def locate(name: str, what: str, files: tuple[str, ...] = MODEL_FILES, timeout: float = 5.0) -> Located:
    """Where ``name`` will be loaded from, or :class:`ModelUnavailableError`.

    Args:
        name: a local folder or a hub name (``org/model``).
        what: what it is, for the message (``"text tower"``).
        files: any one of these must be in the folder (or the cache).
        timeout: seconds to wait for the hub when the name is not cached.
    """
    path = Path(name).expanduser()
    if path.exists() or _looks_like_path(name):
        if not path.is_dir():
            raise ModelUnavailableError(
                f"{what} {name!r}: no such folder; point it to a folder written by save_pretrained.")
        if not any((path / f).is_file() for f in files):
            raise ModelUnavailableError(
                f"{what} folder {name!r} has none of {', '.join(files)}: point it to a folder "
                f"written by save_pretrained.")
        return Located(what, name, "folder")
    if _cached(name, files):
        return Located(what, name, "cache")
    fix = (f"set it to a local folder written by save_pretrained, or fill the Hugging Face cache "
           f"on a machine with network (`hf download {name}`) and copy it here")
    if _offline():
        raise ModelUnavailableError(
            f"{what} {name!r} is not a local folder and not in the Hugging Face cache, and the "
            f"hub is off (HF_HUB_OFFLINE=1): {fix}.")
    why = _hub_reachable(timeout)
    if why is not None:
        raise ModelUnavailableError(
            f"{what} {name!r} is not a local folder or cached, and the Hugging Face hub is "
            f"unreachable ({why}): {fix}; set HF_HUB_OFFLINE=1 to stop trying the network.")
    return Located(what, name, "hub")


def locate_models(config: CIEAConfig, timeout: float = 5.0, skip: Collection[str] = ()) -> list[Located]:
    """Locates every model and tokenizer ``config`` will load (see :func:`locate`).

    A random-init tower given by ``name_or_path`` still reads its ``config.json``, so it is
    located whether the weights are loaded or not. Names in ``skip`` are not checked (a
    tokenizer the job itself is about to write).
    """
    if config.has_projected_lm:
        # UniVL-DR with an LM (plus a projection) in place of CLIP's text encoder.
        wanted = [(config.vision.name_or_path, "CLIP checkpoint", MODEL_FILES),
                  (config.text.name_or_path, "text tower", MODEL_FILES),
                  (config.text.tokenizer_path, "tokenizer", TOKENIZER_FILES)]
    elif config.is_dual_encoder:
        # UniVL-DR: CLIP's text and vision encoders and CLIP's tokenizer, one checkpoint.
        wanted = [(config.vision.name_or_path, "CLIP checkpoint", MODEL_FILES),
                  (config.text.name_or_path, "CLIP checkpoint", MODEL_FILES),
                  (config.text.tokenizer_path, "tokenizer", TOKENIZER_FILES)]
    else:
        wanted = [(config.text.name_or_path, "text tower", MODEL_FILES),
                  (config.text.tokenizer_path, "tokenizer", TOKENIZER_FILES)]
        if config.uses_images:
            wanted.append((config.vision.name_or_path, "vision tower", MODEL_FILES))
    unique = list(dict.fromkeys((name, what, files) for name, what, files in wanted
                                if name is not None and name not in skip))
    return [locate(name, what, files, timeout) for name, what, files in unique]
