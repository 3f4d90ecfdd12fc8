"""The complementary information extractor (CIE), exactly as CIEA_METHOD.md describes.

Patches that resemble no caption token get a high weight ``w``; one post-LN transformer
layer over the patches then scales each key's attention logits by ``w²`` so the document
vector is shaped by what the image adds to its caption.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ExtractorConfig


def complementary_weights(
    patches: torch.Tensor, caption_embeds: torch.Tensor, caption_mask: torch.Tensor
) -> torch.Tensor:
    """Per-patch complementarity ``w[j] = 1 − max_t (1 + cos(E[t], P[j])) / 2``.

    Args:
        patches: (B, N, H) projected patches ``P``.
        caption_embeds: (B, T, H) static input embeddings ``E`` of the caption-side tokens.
        caption_mask: (B, T) true/1 at real caption tokens, false/0 at padding.

    Returns:
        (B, N) float32 weights in [0, 1]; differentiable in both inputs.

    Always computed in float32, autocast or not: in bfloat16 the "fully covered" mask
    ``w < 1e-5`` would fire from cos > ~0.998 instead of cos > 0.99998.
    """
    with torch.autocast(device_type=patches.device.type, enabled=False):
        p = F.normalize(patches.float(), dim=-1)
        e = F.normalize(caption_embeds.float(), dim=-1)
        s = (1.0 + torch.einsum("bth,bnh->btn", e, p)) / 2.0  # (B, T, N), in [0, 1]
        # Padded tokens score 0, which can never win the max since real scores are >= 0.
        s = s * caption_mask.unsqueeze(-1).to(s.dtype)
        return 1.0 - s.max(dim=1).values


class ComplementaryInformationExtractor(nn.Module):
    """One post-LN transformer layer over the patches only (text is never key/value).

    ``logits = (Q Kᵀ / √d) · w[k]²`` per key patch ``k``; keys with ``w[k] < threshold`` are
    masked (−∞); ``X = LN(P + Dropout(Attn(P)))``; ``P̂ = X + FFN(X)`` with a LeakyReLU FFN.
    """

    def __init__(self, hidden_size: int, cfg: ExtractorConfig) -> None:
        super().__init__()
        if hidden_size % cfg.num_heads:
            raise ValueError(
                f"extractor.num_heads={cfg.num_heads} does not divide the LM width "
                f"{hidden_size}: pick a divisor of {hidden_size}."
            )
        self.num_heads = cfg.num_heads
        self.head_dim = hidden_size // cfg.num_heads
        self.mask_threshold = cfg.mask_threshold
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.output_dropout = nn.Dropout(cfg.output_dropout)
        self.norm = nn.LayerNorm(hidden_size)
        self.ffn = nn.Sequential(
            nn.Linear(hidden_size, cfg.ffn_dim), nn.LeakyReLU(), nn.Linear(cfg.ffn_dim, hidden_size)
        )

    def attention(self, patches: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """w²-scaled multi-head self-attention over the patches: (B, N, H) → (B, N, H)."""
        b, n, h = patches.shape

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, N, H) → (B, heads, N, d)
            return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(patches)), heads(self.k_proj(patches)), heads(self.v_proj(patches))
        # The w²-scaled, masked logits and their softmax in float32 even under autocast
        # (w itself is float32): a bfloat16 w² would blur the scaling the method relies on.
        with torch.autocast(device_type=patches.device.type, enabled=False):
            logits = q.float() @ k.float().transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, heads, N, N)
            key_w = weights.float()[:, None, None, :]  # broadcast over heads and query patches
            logits = logits * key_w.pow(2)
            masked = key_w < self.mask_threshold
            logits = logits.masked_fill(masked, float("-inf"))
            # A row whose every key is masked would softmax to NaN (and poison the backward):
            # it attends to nothing instead, so the residual passes P through unchanged.
            none_left = masked.all(dim=-1, keepdim=True)
            probs = torch.softmax(logits.masked_fill(none_left, 0.0), dim=-1)
            probs = probs.masked_fill(none_left, 0.0)
        probs = self.attn_dropout(probs.to(v.dtype))
        out = (probs @ v).transpose(1, 2).reshape(b, n, h)
        return self.out_proj(out)

    def forward(
        self,
        patches: torch.Tensor,
        caption_embeds: torch.Tensor,
        caption_mask: torch.Tensor,
        return_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Args:
            patches: (B, N, H) projected patches ``P``.
            caption_embeds: (B, T, H) static embeddings of the caption-side tokens.
            caption_mask: (B, T) real-token mask.
            return_weights: also return ``w`` (B, N).

        Returns:
            (B, N, H) ``P̂`` (and ``w`` when asked).
        """
        w = complementary_weights(patches, caption_embeds, caption_mask)
        x = self.norm(patches + self.output_dropout(self.attention(patches, w)))
        out = x + self.ffn(x)
        return (out, w) if return_weights else out
