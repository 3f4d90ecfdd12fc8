"""Image–text pretraining of a vision tower: the offline stand-in for CLIP's pretraining.

CIEA (like MARVEL and UniVL-DR) starts from a *pretrained* CLIP whose patch vectors
already tell red from blue. No pretrained CLIP is reachable offline, and a random-init
tower trained only through the retrieval loss learns to be ignored: its patches start as
noise, and the cheapest early way to lower the loss is to suppress them. This module
pretrains the tower on image–description pairs, contrastively against *locked* text
features (the text side is fixed, as in LiT with the roles swapped), so the tower's
patch vectors carry what the images show before retrieval training starts. The tower is
then frozen, as the method prescribes.

Two views of each image are trained, each through its own linear head (discarded
afterwards): the mean of the last layer's patch vectors before the post-layernorm (exactly
the vectors CIEA feeds the projector), and CLIP's pooled CLS vector (what the ``univl-dr``
dual encoder uses). The loss is the mean of the two symmetric in-batch losses.

The ``univl-dr`` dual encoder also needs CLIP's *text* side, which no offline package
ships: :func:`pretrain_clip_text` trains a CLIP text encoder and both projections on the
same pairs against the pretrained, locked image encoder (LiT: "locked-image tuning"), so
the dual encoder starts, as UniVL-DR does, from a CLIP whose two towers share one space,
and from the very image encoder every other variant uses. Where the text side is a
pretrained LM plus a projection (the demo preset), the LM stays locked as well and only the
two projections are aligned.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .losses import contrastive_loss
from .towers import ClipTextTower, ClipVisionTower, ProjectedTextTower, TextTower, VisionTower

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainConfig:
    """Hyper-parameters of :func:`pretrain_vision_tower`."""

    epochs: int = 4
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"PretrainConfig.{name}={getattr(self, name)!r} must be >= 1")
        if self.batch_size < 2:
            raise ValueError(f"PretrainConfig.batch_size={self.batch_size} must be >= 2 (in-batch negatives)")
        if not self.lr > 0:
            raise ValueError(f"PretrainConfig.lr={self.lr!r} must be > 0")


@dataclass
class PretrainResult:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    #: image→text top-1 accuracy on the held-out pairs, if any were given.
    heldout_top1: float | None = None


class _Heads(nn.Module):
    """Image → (patch-mean embedding, CLS embedding), both unit norm."""

    def __init__(self, width: int, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.patches = nn.Linear(width, dim)
        self.cls = nn.Linear(width, dim)
        for m in (self.patches, self.cls):
            nn.init.normal_(m.weight, std=width**-0.5)
            nn.init.zeros_(m.bias)

    def forward(self, tower: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = tower(pixel_values=pixel_values)
        mean = self.patches(self.norm(out.last_hidden_state[:, 1:].mean(dim=1)))
        cls = self.cls(out.pooler_output)
        return nn.functional.normalize(mean, dim=-1), nn.functional.normalize(cls, dim=-1)


def pretrain_vision_tower(
    vision: VisionTower,
    pixel_values: torch.Tensor,
    text_features: torch.Tensor,
    text_keys: torch.Tensor | None = None,
    cfg: PretrainConfig = PretrainConfig(),
    heldout: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: bool = False,
) -> PretrainResult:
    """Trains ``vision`` in place to match each image with its description.

    Args:
        vision: the tower to train; its parameters get gradients whatever its
            ``trainable`` flag (freezing it afterwards is the caller's choice).
        pixel_values: (N, 3, S, S) transformed images.
        text_features: (N, D) fixed features of the descriptions (e.g. the LM's).
        text_keys: (N,) int64 keys; pairs with the same key (the same description)
            are not each other's negatives.
        heldout: ``(pixel_values, text_features)`` scored after training
            (image→text top-1 among the held-out texts).

    Returns:
        The loss of every step, the wall time and the held-out accuracy.
    """
    if pixel_values.shape[0] != text_features.shape[0]:
        raise ValueError(f"{pixel_values.shape[0]} images but {text_features.shape[0]} text features")
    n = pixel_values.shape[0]
    if n < 2:
        raise ValueError(f"pretraining needs >= 2 pairs, got {n}")
    generator = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        head = _Heads(vision.hidden_size, text_features.shape[1])
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    texts = nn.functional.normalize(text_features.float(), dim=-1)
    keys = text_keys if text_keys is not None else torch.arange(n)

    tower = vision.model
    was_requires_grad = [p.requires_grad for p in tower.parameters()]
    tower.requires_grad_(True)
    decay = [p for p in [*tower.parameters(), *head.parameters()] if p.ndim >= 2]
    no_decay = [p for p in [*tower.parameters(), *head.parameters()] if p.ndim < 2] + [logit_scale]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
    )
    steps_per_epoch = n // cfg.batch_size or 1
    total = cfg.epochs * steps_per_epoch
    warmup = max(1, total // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="vision pretraining", unit="step", leave=False)
    result = PretrainResult()
    start = time.perf_counter()
    tower.train()
    try:
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=generator)
            for s in range(steps_per_epoch):
                idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
                txt, k = texts[idx], keys[idx]
                scale = logit_scale.exp().clamp(max=100.0)
                target = torch.arange(len(idx))
                loss = sum(
                    contrastive_loss(img, txt, target, scale, k) + contrastive_loss(txt, img, target, scale, k)
                    for img in head(tower, pixel_values[idx])
                ) / 4
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                result.losses.append(float(loss.detach()))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
    finally:
        if bar is not None:
            bar.close()
        for p, flag in zip(tower.parameters(), was_requires_grad):
            p.requires_grad_(flag)
        vision.train(False)
    result.seconds = time.perf_counter() - start
    if heldout is not None:
        result.heldout_top1 = _top1(tower, head, *heldout)
    logger.info(
        "vision pretraining: %d steps in %.0fs, loss %.3f → %.3f%s", len(result.losses), result.seconds,
        np.mean(result.losses[:10]), np.mean(result.losses[-10:]),
        "" if result.heldout_top1 is None else f", held-out image→text top-1 {100 * result.heldout_top1:.1f}%",
    )
    return result


@torch.no_grad()
def _top1(tower: nn.Module, head: _Heads, pixel_values: torch.Tensor, text_features: torch.Tensor) -> float:
    """Image→text top-1 of the patch-mean view (the one CIEA consumes)."""
    tower.eval()
    img = torch.cat([head(tower, pixel_values[i : i + 512])[0] for i in range(0, len(pixel_values), 512)])
    texts = nn.functional.normalize(text_features.float(), dim=-1)
    scores = img @ texts.T
    # A tie on an identical description counts as a hit.
    best = scores.argmax(dim=1)
    hit = (texts[best] * texts).sum(-1) > 1 - 1e-6
    return float(hit.float().mean())


def pretrain_clip_text(
    text: ClipTextTower | ProjectedTextTower,
    vision: ClipVisionTower,
    pixel_values: torch.Tensor,
    tokens: dict[str, torch.Tensor],
    text_keys: torch.Tensor | None = None,
    cfg: PretrainConfig = PretrainConfig(),
    progress: bool = False,
) -> PretrainResult:
    """LiT: trains ``text`` (encoder and projection) and ``vision``'s projection in place
    to match each image with its description; ``vision``'s encoder stays locked.

    A :class:`ProjectedTextTower` (a pretrained LM plus a projection, the demo's
    ``univl-dr``) keeps its LM locked too: only the two projections learn, which aligns
    them into one space as CLIP's pretraining leaves UniVL-DR's, without moving the LM
    that the other variants start from. (``ciea compare`` measured this and does not use
    it by default: see :func:`pipelines.train.compare.uses_clip_text_pretraining`.)

    Args:
        text: the CLIP text tower (or LM plus projection) to train.
        vision: the CLIP vision tower; only ``visual_projection`` learns.
        pixel_values: (N, 3, S, S) transformed images.
        tokens: ``input_ids`` / ``attention_mask`` (N, L) of the descriptions.
        text_keys: (N,) int64 keys; pairs with the same description are not negatives.

    Returns:
        The loss of every step and the wall time.
    """
    n = pixel_values.shape[0]
    if n < 2 or tokens["input_ids"].shape[0] != n:
        raise ValueError(f"{n} images and {tokens['input_ids'].shape[0]} descriptions: need >= 2 pairs, one each")
    with torch.no_grad():  # the encoder is locked: its pooled vectors are computed once
        vision.encoder.eval()
        pooled = torch.cat([vision.encoder(pixel_values=pixel_values[i : i + 512]).pooler_output
                            for i in range(0, n, 512)])
    locked_lm = isinstance(text, ProjectedTextTower)
    if locked_lm:  # the LM's pooled vectors are computed once, as the image encoder's
        with torch.no_grad():
            text.eval()
            pooled_text = torch.cat([
                TextTower.forward(text, tokens["attention_mask"][i : i + 512], input_ids=tokens["input_ids"][i : i + 512])
                for i in range(0, n, 512)])
    generator = torch.Generator().manual_seed(cfg.seed)
    keys = text_keys if text_keys is not None else torch.arange(n)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = [*(text.projection.parameters() if locked_lm else text.parameters()),
              *vision.model.visual_projection.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
         {"params": [p for p in params if p.ndim < 2] + [logit_scale], "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
    )
    steps_per_epoch = n // cfg.batch_size or 1
    total = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, total // 20)) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    result, start = PretrainResult(), time.perf_counter()
    text.train()
    try:
        for step in _progress_steps(cfg.epochs, steps_per_epoch, progress, "CLIP text pretraining"):
            if step % steps_per_epoch == 0:
                order = torch.randperm(n, generator=generator)
            idx = order[(step % steps_per_epoch) * cfg.batch_size : (step % steps_per_epoch + 1) * cfg.batch_size]
            img = nn.functional.normalize(vision.model.visual_projection(pooled[idx]), dim=-1)
            txt = text.projection(pooled_text[idx]) if locked_lm else text(
                tokens["attention_mask"][idx], input_ids=tokens["input_ids"][idx])
            txt = nn.functional.normalize(txt, dim=-1)
            scale, target = logit_scale.exp().clamp(max=100.0), torch.arange(len(idx))
            loss = 0.5 * (contrastive_loss(img, txt, target, scale, keys[idx])
                          + contrastive_loss(txt, img, target, scale, keys[idx]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            result.losses.append(float(loss.detach()))
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        text.eval()
    result.seconds = time.perf_counter() - start
    logger.info("CLIP text pretraining: %d steps in %.0fs, loss %.3f → %.3f", len(result.losses), result.seconds,
                np.mean(result.losses[:10]), np.mean(result.losses[-10:]))
    return result


def _progress_steps(epochs: int, steps_per_epoch: int, progress: bool, desc: str):
    """``range(epochs × steps_per_epoch)``, behind a progress bar when asked."""
    steps = range(epochs * steps_per_epoch)
    if not progress:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc=desc, unit="step", leave=False)
