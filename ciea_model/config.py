"""Typed, frozen model configs, saved as JSON beside the weights.

The config says *what* to build; :func:`ciea_model.factory.create_model_and_processor`
builds it. A tower is either loaded from a pretrained name / local directory
(``name_or_path``) or built with random weights from ``hf_config`` (a dict of keyword
arguments for ``transformers.AutoConfig.for_model``), which is how tests and the offline
demo avoid the network.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VARIANTS = ("ciea", "text-only", "marvel", "ciea-no-cie", "ciea-no-comp", "univl-dr")
"""Model variants. All but ``ciea`` are the paper's baselines and ablations, expressed as
switches of the same code so that comparisons are fair (see CIEA_METHOD.md)."""

POOLINGS = ("auto", "decoder_step0", "cls", "mean", "last", "pooler")
"""How the text tower turns hidden states into one vector. ``auto`` picks by LM family:
encoder-decoder → ``decoder_step0`` (T5-ANCE), encoder-only → ``cls``, decoder-only →
``last`` (last non-pad token)."""

# CLIP's image normalisation constants (openai/clip-vit-base-patch32 preprocessor_config).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ConfigError(ValueError):
    """A config value is invalid; the message names the field, the value and the fix."""


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclass(frozen=True)
class TextTowerConfig:
    """The language model that encodes queries, text documents and image documents.

    For ``univl-dr`` it is CLIP's text encoder instead: ``name_or_path`` names the CLIP
    checkpoint (the one ``vision.name_or_path`` names), or ``hf_config`` has
    ``model_type`` ``clip_text_model`` (``CLIPTextConfig`` keyword arguments, its
    ``projection_dim`` the vision tower's); ``pooling`` is unused (CLIP pools at the
    end-of-text token). Or, where no pretrained CLIP text encoder exists (the demo), a
    language model with its pooling and a trained linear ``projection_dim`` map into the
    CLIP image projection space.

    Attributes:
        name_or_path: Hugging Face hub name or local directory of pretrained weights
            (e.g. ``OpenMatch/t5-ance``). ``None`` builds from ``hf_config``.
        hf_config: ``AutoConfig.for_model`` keyword arguments (must include
            ``model_type``) for a random-init tower; ignored when ``name_or_path`` is set
            and pretrained weights are requested.
        tokenizer: hub name or directory of the tokenizer; defaults to ``name_or_path``.
        pooling: one of :data:`POOLINGS`.
        max_length: maximum caption / query / text-document length in tokens.
        num_layers: keep only the first ``num_layers`` transformer layers (a cheap way to
            make a small pretrained LM for CPU demos); ``None`` keeps all.
        projection_dim: ``univl-dr`` only: map the LM's pooled vector linearly (no bias, as
            CLIP's projections) to this width, the vision tower's ``projection_dim``;
            ``None``: no projection (every other variant, and a CLIP text encoder, which
            has its own).
    """

    name_or_path: str | None = None
    hf_config: dict[str, Any] | None = None
    tokenizer: str | None = None
    pooling: str = "auto"
    max_length: int = 128
    num_layers: int | None = None
    projection_dim: int | None = None

    def __post_init__(self) -> None:
        _check(
            self.name_or_path is not None or self.hf_config is not None,
            "text.name_or_path and text.hf_config are both unset: set name_or_path to a "
            "hub name or local directory (e.g. 'OpenMatch/t5-ance'), or hf_config to "
            "AutoConfig keyword arguments including 'model_type' for a random-init tower.",
        )
        _check(
            self.hf_config is None or "model_type" in self.hf_config,
            f"text.hf_config={self.hf_config!r} has no 'model_type': add one, e.g. "
            "{'model_type': 't5', 'd_model': 32, ...}.",
        )
        _check(
            self.pooling in POOLINGS,
            f"text.pooling={self.pooling!r} is not one of {POOLINGS}: pick one, or 'auto' "
            "to choose by LM family.",
        )
        _check(
            self.max_length >= 8,
            f"text.max_length={self.max_length} is too small: use at least 8 (the method "
            "uses 128).",
        )
        _check(
            self.num_layers is None or self.num_layers >= 1,
            f"text.num_layers={self.num_layers} must be None (all layers) or >= 1.",
        )
        _check(
            self.projection_dim is None or self.projection_dim >= 1,
            f"text.projection_dim={self.projection_dim} must be None (no projection) or >= 1.",
        )
        _check(
            self.tokenizer is not None or self.name_or_path is not None,
            "text.tokenizer is unset and there is no text.name_or_path to take it from: a "
            "random-init tower still needs a tokenizer; point text.tokenizer to a "
            "directory (ciea_model.tokenizer.train_wordpiece_tokenizer makes one offline).",
        )

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.name_or_path  # type: ignore[return-value]


@dataclass(frozen=True)
class VisionTowerConfig:
    """The CLIP vision tower that turns an image into patch vectors.

    Attributes:
        name_or_path: hub name or directory of a CLIP (vision) checkpoint, e.g.
            ``openai/clip-vit-base-patch32``; ``None`` builds from ``hf_config``.
        hf_config: ``CLIPVisionConfig`` keyword arguments for a random-init tower
            (``univl-dr`` also reads its ``projection_dim``).
        trainable: the paper freezes the vision tower in CIEA; UniVL-DR's release
            fine-tunes the whole CLIP, image encoder included; the offline demo, which
            has no pretrained CLIP, trains it.
        image_mean: per-channel normalisation mean.
        image_std: per-channel normalisation std.
    """

    name_or_path: str | None = None
    hf_config: dict[str, Any] | None = None
    trainable: bool = False
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        _check(
            self.name_or_path is not None or self.hf_config is not None,
            "vision.name_or_path and vision.hf_config are both unset: set name_or_path "
            "(e.g. 'openai/clip-vit-base-patch32') or hf_config (CLIPVisionConfig keyword "
            "arguments such as image_size, patch_size, hidden_size).",
        )
        _check(
            len(self.image_mean) == 3 and len(self.image_std) == 3,
            f"vision.image_mean={self.image_mean} / image_std={self.image_std} must have 3 "
            "values (RGB).",
        )
        _check(
            all(s > 0 for s in self.image_std),
            f"vision.image_std={self.image_std} must be positive.",
        )


@dataclass(frozen=True)
class ExtractorConfig:
    """The complementary information extractor (one post-LN layer over the patches).

    Attributes:
        num_heads: attention heads; must divide the LM width.
        ffn_dim: hidden width of the feed-forward block.
        dropout: dropout on the attention probabilities.
        output_dropout: dropout on the attention block's output, before the residual
            (``X = LN(P + Dropout(Attn(P)))``), as the authors' release applies it.
        mask_threshold: key patches with weight ``w < mask_threshold`` are masked (−∞).
    """

    num_heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.05
    output_dropout: float = 0.05
    mask_threshold: float = 1e-5

    def __post_init__(self) -> None:
        _check(self.num_heads >= 1, f"extractor.num_heads={self.num_heads} must be >= 1.")
        _check(self.ffn_dim >= 1, f"extractor.ffn_dim={self.ffn_dim} must be >= 1.")
        _check(
            0.0 <= self.dropout < 1.0,
            f"extractor.dropout={self.dropout} must be in [0, 1).",
        )
        _check(
            0.0 <= self.output_dropout < 1.0,
            f"extractor.output_dropout={self.output_dropout} must be in [0, 1).",
        )
        _check(
            0.0 <= self.mask_threshold < 1.0,
            f"extractor.mask_threshold={self.mask_threshold} must be in [0, 1).",
        )


@dataclass(frozen=True)
class CIEAConfig:
    """Everything needed to rebuild a CIEA model (or one of its baselines).

    Attributes:
        variant: one of :data:`VARIANTS`.
        text: text tower config.
        vision: vision tower config (unused by ``text-only``).
        extractor: extractor config (used by ``ciea`` and ``ciea-no-comp``).
        comp_weight: λ, the weight of the complementary loss. Variants without the
            complementary loss (``text-only``, ``marvel``, ``ciea-no-comp``, ``univl-dr``)
            use 0 regardless; see :attr:`effective_comp_weight`.
        logit_scale_init: initial θ; scores are ``exp(θ)·cos``.
        logit_scale_max: clamp of ``exp(θ)``.
        image_only_extractor: the image-only encoding used by L_comp passes the patches
            through the extractor (project default, as the paper figure draws it);
            ``False`` feeds the projected patches directly (the authors' release).
        image_only_frame: an image encoded alone (L_comp's image-only candidates, stage 0's
            images) sits between ``<im_start>`` and ``<im_end>`` after the prefix (project
            default, the frame of an image document); ``False`` makes the patches alone the
            LM's whole input, as MARVEL's ``encode_images_only`` does (the release).
    """

    variant: str = "ciea"
    text: TextTowerConfig = field(default_factory=lambda: TextTowerConfig("OpenMatch/t5-ance"))
    vision: VisionTowerConfig = field(
        default_factory=lambda: VisionTowerConfig("openai/clip-vit-base-patch32")
    )
    extractor: ExtractorConfig = field(default_factory=ExtractorConfig)
    comp_weight: float = 0.1
    logit_scale_init: float = math.log(100.0)
    logit_scale_max: float = 100.0
    image_only_extractor: bool = True
    image_only_frame: bool = True

    def __post_init__(self) -> None:
        _check(
            self.variant in VARIANTS,
            f"variant={self.variant!r} is not one of {VARIANTS}: pick one of those.",
        )
        _check(
            self.comp_weight >= 0.0,
            f"comp_weight={self.comp_weight} must be >= 0 (the method uses 0.1).",
        )
        _check(
            self.logit_scale_max > 0
            and math.exp(self.logit_scale_init) <= self.logit_scale_max * (1 + 1e-9),
            f"logit_scale_init={self.logit_scale_init} gives exp(θ)="
            f"{math.exp(self.logit_scale_init):.3g} above logit_scale_max="
            f"{self.logit_scale_max}: lower the init (ln(100) by default) or raise the max.",
        )
        _check(
            self.text.projection_dim is None or self.is_dual_encoder,
            f"text.projection_dim={self.text.projection_dim} is for variant 'univl-dr' (an LM "
            f"projected into CLIP's image space), not {self.variant!r}: unset it.",
        )
        if self.is_dual_encoder:
            self._check_dual_encoder()

    @property
    def has_projected_lm(self) -> bool:
        """``univl-dr`` whose text side is a language model plus a linear projection
        (the demo preset) rather than CLIP's text encoder."""
        return self.is_dual_encoder and self.text.projection_dim is not None

    def _check_dual_encoder(self) -> None:
        """``univl-dr`` is CLIP's two projected encoders from one checkpoint, or an LM
        projected into the space of CLIP's image projection."""
        text, vision = self.text, self.vision
        if text.projection_dim is not None:
            _check(
                (text.hf_config or {}).get("model_type") != "clip_text_model",
                "variant 'univl-dr': text.projection_dim is set on a CLIP text encoder, which has its "
                "own projection: unset text.projection_dim (or give a language model instead).",
            )
            vision_dim = (vision.hf_config or {}).get("projection_dim") if vision.name_or_path is None else None
            _check(
                vision_dim is None or vision_dim == text.projection_dim,
                f"variant 'univl-dr': text.projection_dim={text.projection_dim} differs from the vision "
                f"tower's projection_dim={vision_dim}: the text side projects into the image space; "
                "make them equal.",
            )
            return
        _check(
            text.name_or_path is None or vision.name_or_path is None
            or text.name_or_path == vision.name_or_path,
            f"variant 'univl-dr' takes both towers from one CLIP checkpoint, but "
            f"text.name_or_path={text.name_or_path!r} differs from vision.name_or_path="
            f"{vision.name_or_path!r}: point both to the CLIP checkpoint (it has no T5).",
        )
        _check(
            text.name_or_path is not None
            or (text.hf_config or {}).get("model_type") == "clip_text_model",
            f"variant 'univl-dr' encodes text with CLIP's text encoder, but text.hf_config "
            f"has model_type={(text.hf_config or {}).get('model_type')!r}: use "
            "'clip_text_model' (CLIPTextConfig keyword arguments) or set text.name_or_path "
            "to the CLIP checkpoint.",
        )
        dims = {
            "text": (text.hf_config or {}).get("projection_dim") if text.name_or_path is None else None,
            "vision": (vision.hf_config or {}).get("projection_dim") if vision.name_or_path is None else None,
        }
        _check(
            None in dims.values() or dims["text"] == dims["vision"],
            f"variant 'univl-dr': text.hf_config projection_dim={dims['text']} differs from "
            f"vision.hf_config projection_dim={dims['vision']}: both towers project into one "
            "space; make them equal.",
        )

    # ---- what the variant switches on -------------------------------------------------
    @property
    def uses_images(self) -> bool:
        return self.variant != "text-only"

    @property
    def uses_extractor(self) -> bool:
        return self.variant in ("ciea", "ciea-no-comp")

    @property
    def is_dual_encoder(self) -> bool:
        return self.variant == "univl-dr"

    @property
    def uses_projector(self) -> bool:
        """CIEA's patch projector into the LM (the dual encoder has CLIP's own instead)."""
        return self.uses_images and not self.is_dual_encoder

    @property
    def effective_comp_weight(self) -> float:
        return self.comp_weight if self.variant in ("ciea", "ciea-no-cie") else 0.0

    # ---- (de)serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CIEAConfig:
        """Builds a config from a plain dict, rejecting unknown keys with the allowed set."""
        data = dict(data)
        sub = {"text": TextTowerConfig, "vision": VisionTowerConfig, "extractor": ExtractorConfig}
        for key, sub_cls in sub.items():
            if key in data and isinstance(data[key], dict):
                data[key] = _from_dict(sub_cls, data[key], prefix=f"{key}.")
        return _from_dict(cls, data, prefix="")

    def replace(self, **changes: Any) -> CIEAConfig:
        return dataclasses.replace(self, **changes)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load_json(cls, path: str | Path) -> CIEAConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]}: allowed keys are "
            f"{sorted(prefix + n for n in names)}; check the spelling."
        )
    kwargs = dict(data)
    for f in dataclasses.fields(cls):
        # JSON has no tuples; restore them so frozen configs compare equal after a round trip.
        if f.name in kwargs and isinstance(kwargs[f.name], list):
            kwargs[f.name] = tuple(kwargs[f.name])
    return cls(**kwargs)
