"""The two towers: a Hugging Face language model with family-specific pooling, and the CLIP
vision tower that yields patch vectors. Both are thin wrappers that know nothing of CIEA."""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, CLIPVisionConfig, CLIPVisionModel, PretrainedConfig

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


class VisionTower(nn.Module):
    """CLIP ViT returning the patch vectors of the last encoder layer (before the
    post-layernorm, CLS dropped): (B, 3, S, S) → (B, (S/p)², W)."""

    def __init__(self, model: CLIPVisionModel, trainable: bool) -> None:
        super().__init__()
        self.model = model
        self.trainable = trainable
        if not trainable:
            self.model.requires_grad_(False)
            self.model.eval()

    @classmethod
    def from_config(cls, cfg: VisionTowerConfig, pretrained: bool) -> VisionTower:
        if pretrained and cfg.name_or_path is not None:
            # Works for both CLIPVisionModel checkpoints and full CLIPModel checkpoints
            # (the vision half is taken, the text half dropped).
            model = CLIPVisionModel.from_pretrained(cfg.name_or_path)
        else:
            if cfg.hf_config is not None:
                hf_config = CLIPVisionConfig(**cfg.hf_config)
            else:
                hf_config = CLIPVisionConfig.from_pretrained(cfg.name_or_path)
            model = CLIPVisionModel(hf_config)
        return cls(model, cfg.trainable)

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

    def pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → (B, W): the post-layernorm CLS vector (used by ``univl-dr``)."""
        return self._run(pixel_values).pooler_output
