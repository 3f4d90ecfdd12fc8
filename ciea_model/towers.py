"""The towers: a Hugging Face language model with family-specific pooling and the CLIP
vision tower that yields patch vectors (CIEA and its LM baselines), and CLIP's two
projected encoders (the ``univl-dr`` dual encoder), or an LM with a projection in place of
CLIP's text encoder. All are thin wrappers that know nothing of CIEA."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    CLIPConfig,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    PretrainedConfig,
)

from .config import TextTowerConfig, VisionTowerConfig

logger = logging.getLogger(__name__)


def resolve_pooling(pooling: str, hf_config: PretrainedConfig) -> str:
    """Maps ``auto`` to the pooling of the LM family (T5-ANCE style for encoder-decoders)."""
    if pooling != "auto":
        return pooling
    if getattr(hf_config, "is_encoder_decoder", False):
        return "decoder_step0"
    if getattr(hf_config, "is_decoder", False) or hf_config.model_type in _DECODER_ONLY:
        return "last"
    return "cls"


_DECODER_ONLY = {"gpt2", "gpt_neo", "gptj", "llama", "mistral", "qwen2", "opt", "phi", "gemma"}


def _truncate_layers(model: nn.Module, num_layers: int) -> None:
    """Keeps the first ``num_layers`` layers of every layer stack in ``model`` (in place)."""
    found: list[str] = []
    for name, module in list(model.named_modules()):
        for attr in ("layer", "layers", "block", "h"):
            stack = getattr(module, attr, None)
            path = f"{name}.{attr}" if name else attr
            # Only outermost stacks: a ModuleList inside a layer holds that layer's
            # sub-layers (T5Block.layer = [self-attn, cross-attn, FFN]), not layers.
            if isinstance(stack, nn.ModuleList) and not any(path.startswith(f + ".") for f in found):
                found.append(path)
                setattr(module, attr, stack[:num_layers])
    if not found:
        raise ValueError(
            f"text.num_layers={num_layers}: found no layer stack to truncate in "
            f"{type(model).__name__}; unset num_layers."
        )
    for key in ("num_hidden_layers", "num_layers", "n_layer", "encoder_layers"):
        if hasattr(model.config, key) and isinstance(getattr(model.config, key), int):
            setattr(model.config, key, min(getattr(model.config, key), num_layers))
    if getattr(model.config, "num_decoder_layers", None):
        model.config.num_decoder_layers = min(model.config.num_decoder_layers, num_layers)
    if getattr(model.config, "decoder_layers", None):
        model.config.decoder_layers = min(model.config.decoder_layers, num_layers)


class TextTower(nn.Module):
    """A Hugging Face LM that maps token ids *or* input embeddings to one vector per row.

    Pooling (see :data:`ciea_model.config.POOLINGS`): ``decoder_step0`` runs the encoder,
    then one decoder step with the start token and returns its hidden state (T5-ANCE);
    ``cls`` takes position 0; ``mean`` averages over the attention mask; ``last`` takes the
    last non-pad position (right padding); ``pooler`` uses the model's ``pooler_output``.
    """

    def __init__(self, model: nn.Module, pooling: str) -> None:
        super().__init__()
        self.model = model
        self.pooling = resolve_pooling(pooling, model.config)
        if self.pooling == "decoder_step0" and not model.config.is_encoder_decoder:
            raise ValueError(
                f"text.pooling='decoder_step0' needs an encoder-decoder LM, but "
                f"{model.config.model_type!r} is not one: use 'cls', 'mean' or 'last'."
            )
        start = getattr(model.config, "decoder_start_token_id", None)
        if start is None:
            start = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        self.decoder_start_token_id = int(start)

    @classmethod
    def from_config(cls, cfg: TextTowerConfig, pretrained: bool) -> TextTower:
        """Builds the tower; ``pretrained=False`` never touches weights on disk or the hub."""
        if pretrained and cfg.name_or_path is not None:
            model = AutoModel.from_pretrained(cfg.name_or_path)
        else:
            if cfg.hf_config is not None:
                kwargs = dict(cfg.hf_config)
                hf_config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
            else:
                hf_config = AutoConfig.from_pretrained(cfg.name_or_path)
            model = AutoModel.from_config(hf_config)
        if cfg.num_layers is not None:
            _truncate_layers(model, cfg.num_layers)
        return cls(model, cfg.pooling)

    @property
    def hidden_size(self) -> int:
        c = self.model.config
        for key in ("hidden_size", "d_model", "n_embd"):
            if isinstance(getattr(c, key, None), int):
                return getattr(c, key)
        raise ValueError(f"cannot find the hidden size of {c.model_type!r}")

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Static input embeddings: (B, L) ids → (B, L, H)."""
        return self.model.get_input_embeddings()(input_ids)

    def resize_token_embeddings(self, vocab_size: int) -> None:
        if self.model.get_input_embeddings().num_embeddings != vocab_size:
            self.model.resize_token_embeddings(vocab_size)

    def forward(
        self,
        attention_mask: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encodes a batch; exactly one of ``input_ids`` / ``inputs_embeds`` is given.

        Args:
            attention_mask: (B, L) 1 for real positions, 0 for right padding.
            input_ids: (B, L) token ids.
            inputs_embeds: (B, L, H) input embeddings (image documents).

        Returns:
            (B, H) pooled, *unnormalised* vectors.
        """
        if self.pooling == "decoder_step0":
            batch = attention_mask.shape[0]
            start = torch.full(
                (batch, 1), self.decoder_start_token_id, dtype=torch.long,
                device=attention_mask.device,
            )
            out = self.model(
                input_ids=input_ids, inputs_embeds=inputs_embeds,
                attention_mask=attention_mask, decoder_input_ids=start,
            )
            return out.last_hidden_state[:, 0]
        out = self.model(
            input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask
        )
        hidden = out.last_hidden_state  # (B, L, H)
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        if self.pooling == "last":
            last = attention_mask.sum(1).long() - 1  # right padding
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return out.pooler_output  # "pooler"


class ProjectedTextTower(TextTower):
    """A :class:`TextTower` (an LM with its pooling) followed by a linear map into the space
    of CLIP's image projection: ``univl-dr``'s text side where no pretrained CLIP text
    encoder exists (the demo preset: all-MiniLM-L6-v2 + projection), so that the dual
    encoder still starts from a language-pretrained text side. No bias, as CLIP's own
    text and image projections.

    Args:
        model: the HF LM.
        pooling: as :class:`TextTower`.
        projection_dim: the width of the shared space (the vision tower's ``projection_dim``).
    """

    def __init__(self, model: nn.Module, pooling: str, projection_dim: int) -> None:
        super().__init__(model, pooling)
        self.projection = nn.Linear(TextTower.hidden_size.fget(self), projection_dim, bias=False)

    @classmethod
    def from_config(cls, cfg: TextTowerConfig, pretrained: bool) -> ProjectedTextTower:
        """The LM as :meth:`TextTower.from_config` builds it (pretrained weights from
        ``name_or_path`` unless ``pretrained=False``), then a random-init projection."""
        if cfg.projection_dim is None:
            raise ValueError("ProjectedTextTower needs text.projection_dim (the shared space's width)")
        lm = TextTower.from_config(cfg, pretrained=pretrained)
        return cls(lm.model, cfg.pooling, cfg.projection_dim)

    @property
    def hidden_size(self) -> int:
        """The width of the shared space: the projection's output."""
        return self.projection.out_features

    def forward(
        self,
        attention_mask: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L) → (B, P): the pooled LM vector, projected, *unnormalised*."""
        return self.projection(super().forward(attention_mask, input_ids=input_ids, inputs_embeds=inputs_embeds))


class VisionTower(nn.Module):
    """CLIP ViT returning the patch vectors of the last encoder layer (before the
    post-layernorm, CLS dropped): (B, 3, S, S) → (B, (S/p)², W)."""

    _model_class: type[CLIPVisionModel] | type[CLIPVisionModelWithProjection] = CLIPVisionModel

    def __init__(self, model: CLIPVisionModel | CLIPVisionModelWithProjection, trainable: bool) -> None:
        super().__init__()
        self.model = model
        self.trainable = trainable
        if not trainable:
            self.model.requires_grad_(False)
            self.model.eval()

    @classmethod
    def from_config(cls, cfg: VisionTowerConfig, pretrained: bool) -> VisionTower:
        if cfg.hf_config is not None and not (pretrained and cfg.name_or_path is not None):
            hf_config = CLIPVisionConfig(**cfg.hf_config)
        else:
            # A CLIPVisionModel checkpoint or a full CLIPModel one (the vision half is
            # taken, the text half dropped).
            hf_config = clip_sub_config(cfg.name_or_path, CLIPVisionConfig)
        if pretrained and cfg.name_or_path is not None:
            model = cls._model_class.from_pretrained(cfg.name_or_path, config=hf_config)
        else:
            model = cls._model_class(hf_config)
        return cls(model, cfg.trainable)

    @property
    def encoder(self) -> CLIPVisionModel:
        """The ViT without any projection: what every variant shares."""
        return self.model

    def load_encoder_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Loads a :class:`VisionTower` state dict (e.g. a pretrained ViT shared by every
        variant) into :attr:`encoder`, strictly; a projection, if any, is left as it is."""
        self.encoder.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})

    def train(self, mode: bool = True) -> VisionTower:
        # A frozen tower stays in eval mode so that model.train() cannot switch on dropout.
        super().train(mode and self.trainable)
        return self

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def num_patches(self) -> int:
        c = self.model.config
        return (c.image_size // c.patch_size) ** 2

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    def _run(self, pixel_values: torch.Tensor):
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            return self.model(pixel_values=pixel_values)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → (B, N, W) patch vectors."""
        return self._run(pixel_values).last_hidden_state[:, 1:]



def clip_sub_config(name: str, sub: type[CLIPTextConfig] | type[CLIPVisionConfig]) -> PretrainedConfig:
    """One tower's config from a CLIP checkpoint that holds either that tower alone or a
    whole ``CLIPModel``.

    A ``CLIPModel`` sizes both projections by its top-level ``projection_dim``
    (``CLIPModel.__init__``), which its sub-configs need not repeat; the sub-config gets
    it here so that the tower's projection matches the saved weights.
    """
    loaded = AutoConfig.from_pretrained(name)
    if isinstance(loaded, CLIPConfig):
        part = loaded.text_config if sub is CLIPTextConfig else loaded.vision_config
        part.projection_dim = loaded.projection_dim
        return part
    if not isinstance(loaded, sub):
        raise ValueError(
            f"{name!r} holds a {loaded.model_type!r} model, not a CLIP checkpoint: point it to a "
            "CLIP folder (e.g. one saved from openai/clip-vit-base-patch32)."
        )
    return loaded


class ClipVisionTower(VisionTower):
    """CLIP's image encoder with its projection (UniVL-DR's image side): the patch
    vectors as :class:`VisionTower`, and :meth:`embed` = ``image_embeds``."""

    _model_class = CLIPVisionModelWithProjection

    @property
    def encoder(self) -> CLIPVisionModel:
        return self.model.vision_model

    @property
    def projection_dim(self) -> int:
        return self.model.config.projection_dim

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → (B, P): CLIP's projected image vector, *unnormalised*
        (``encode_image`` in OpenAI's CLIP)."""
        return self._run(pixel_values).image_embeds


class ClipTextTower(nn.Module):
    """CLIP's text encoder with its projection (UniVL-DR's query and text-document
    tower): ids → ``text_embeds``, the projected state at the end-of-text token.

    Args:
        model: the HF module.
    """

    def __init__(self, model: CLIPTextModelWithProjection) -> None:
        super().__init__()
        self.model = model

    @classmethod
    def from_config(
        cls, cfg: TextTowerConfig, pretrained: bool, token_ids: Mapping[str, int | None]
    ) -> ClipTextTower:
        """Builds the tower from a CLIP checkpoint (``name_or_path``) or at random from
        ``hf_config`` (``model_type`` ``clip_text_model``).

        Args:
            token_ids: the tokenizer's ``eos_token_id`` (where CLIP pools),
                ``bos_token_id`` and ``pad_token_id``, written into the model config so
                that pooling follows the tokenizer in use: OpenAI's config still says
                ``eos_token_id=2``, which makes HF pool at the largest id instead (the
                same position for CLIP's own tokenizer, a wrong one for any other).
        """
        if cfg.hf_config is not None and not (pretrained and cfg.name_or_path is not None):
            kwargs = dict(cfg.hf_config)
            kwargs.pop("model_type", None)
            hf_config = CLIPTextConfig(**{**kwargs, **token_ids})
        else:
            hf_config = clip_sub_config(cfg.name_or_path, CLIPTextConfig)
            for key, value in token_ids.items():
                setattr(hf_config, key, value)
        if pretrained and cfg.name_or_path is not None:
            model = CLIPTextModelWithProjection.from_pretrained(cfg.name_or_path, config=hf_config)
        else:
            model = CLIPTextModelWithProjection(hf_config)
        if cfg.num_layers is not None:
            _truncate_layers(model, cfg.num_layers)
        return cls(model)

    @property
    def hidden_size(self) -> int:
        """The width of the shared space: CLIP's ``projection_dim``."""
        return self.model.config.projection_dim

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Static input embeddings: (B, L) ids → (B, L, W)."""
        return self.model.get_input_embeddings()(input_ids)

    def resize_token_embeddings(self, vocab_size: int) -> None:
        if self.model.get_input_embeddings().num_embeddings != vocab_size:
            self.model.resize_token_embeddings(vocab_size)

    def forward(self, attention_mask: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) right-padded ids, each row ending in the end-of-text token → (B, P)
        ``text_embeds``, *unnormalised* (``encode_text`` in OpenAI's CLIP)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).text_embeds
