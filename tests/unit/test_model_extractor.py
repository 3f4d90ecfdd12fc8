"""The complementary information extractor against hand-computed cases (CIEA_METHOD.md,
"Complementary information extractor"):

    s[t, j] = (1 + cos(E[t], P[j])) / 2,   w[j] = 1 − max_t s[t, j]   (padded t ignored)
    logits  = QKᵀ/√d · w[k]²,  keys with w[k] < 1e-5 masked (−∞)
    X = LN(P + Attn(P)),  P̂ = X + FFN(X)
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ciea_model import ComplementaryInformationExtractor, ExtractorConfig, complementary_weights

SQRT2 = math.sqrt(2.0)

# Three patches and three caption tokens in 2-D. The third caption token is padding and
# points exactly along patch 1: were it counted, w[1] would be 0.
P_HAND = [[2.0, 0.0], [0.0, 2.0], [-3.0, 1.0]]
E_HAND = [[1.0, 0.0], [3.0, 3.0], [0.0, 5.0]]
MASK_HAND = [1, 1, 0]
# By hand (cosines of the directions):
#   patch 0 ∥ token 0: cos 1 → s 1 → w 0 (masked key).
#   patch 1: cos(t0) = 0, cos(t1) = 1/√2 → w = 1 − (1 + 1/√2)/2 = (1 − 1/√2)/2.
#   patch 2: cos(t0) = −3/√10, cos(t1) = −2/√20 = −1/√5 → w = 1 − (1 − 1/√5)/2 = (1 + 1/√5)/2.
W_HAND = [0.0, (1.0 - 1.0 / SQRT2) / 2.0, (1.0 + 1.0 / math.sqrt(5.0)) / 2.0]


def _hand_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.tensor([P_HAND]),
        torch.tensor([E_HAND]),
        torch.tensor([MASK_HAND], dtype=torch.bool),
    )


def _identity_extractor(hidden: int, num_heads: int = 1) -> ComplementaryInformationExtractor:
    """q/k/v/out projections set to the identity with zero bias; dropout off via eval()."""
    ext = ComplementaryInformationExtractor(hidden, ExtractorConfig(num_heads=num_heads, ffn_dim=4))
    with torch.no_grad():
        for lin in (ext.q_proj, ext.k_proj, ext.v_proj, ext.out_proj):
            lin.weight.copy_(torch.eye(hidden))
            lin.bias.zero_()
    return ext.eval()


def _capture_probs(ext: ComplementaryInformationExtractor) -> list[torch.Tensor]:
    """The attention probabilities are what enters the (eval-mode, identity) dropout."""
    seen: list[torch.Tensor] = []
    ext.attn_dropout.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
    return seen


# --------------------------------------------------------------------------- weights w


def test_complementary_weights_match_hand_values():
    p, e, mask = _hand_inputs()
    w = complementary_weights(p, e, mask)
    assert w.shape == (1, 3)
    assert w[0].tolist() == pytest.approx(W_HAND, abs=1e-6)
    assert w[0, 0].item() < 1e-5  # a patch identical in direction to a token: masked key


def test_padded_caption_token_does_not_count():
    p, e, mask = _hand_inputs()
    # Counting the padded token (which points along patch 1) would zero w[1]:
    unmasked = complementary_weights(p, e, torch.ones_like(mask))
    assert unmasked[0, 1].item() == pytest.approx(0.0, abs=1e-6)
    # ...whatever the padded row holds, the masked result does not change.
    e_other = e.clone()
    e_other[0, 2] = torch.tensor([-7.0, 0.5])
    assert torch.equal(complementary_weights(p, e_other, mask), complementary_weights(p, e, mask))
    # An int mask behaves like a bool mask.
    assert torch.equal(
        complementary_weights(p, e, mask.long()), complementary_weights(p, e, mask)
    )


def test_complementary_weights_are_scale_invariant_and_in_unit_interval():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(3, 5, 8, generator=g)
    e = torch.randn(3, 7, 8, generator=g)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    w = complementary_weights(p, e, mask)
    assert w.shape == (3, 5)
    assert (w >= 0).all() and (w <= 1).all()
    torch.testing.assert_close(complementary_weights(3.0 * p, 0.5 * e, mask), w)
    # No caption token at all: every patch is fully complementary.
    assert torch.equal(complementary_weights(p, e, torch.zeros_like(mask)), torch.ones(3, 5))


# --------------------------------------------------------------------------- attention


def _hand_probs() -> list[list[float]]:
    """softmax over keys of (p_i · p_k)/√d · w_k², key 0 masked, d = 2 (one head)."""
    out = []
    for p_i in P_HAND:
        logits = [
            None if w_k < 1e-5 else (p_i[0] * p_k[0] + p_i[1] * p_k[1]) / SQRT2 * w_k**2
            for p_k, w_k in zip(P_HAND, W_HAND, strict=True)
        ]
        z = sum(math.exp(x) for x in logits if x is not None)
        out.append([0.0 if x is None else math.exp(x) / z for x in logits])
    return out


def test_attention_probabilities_match_hand_softmax_with_w_squared():
    ext = _identity_extractor(2)
    seen = _capture_probs(ext)
    p, e, mask = _hand_inputs()
    with torch.no_grad():
        out, w = ext(p, e, mask, return_weights=True)
    assert w[0].tolist() == pytest.approx(W_HAND, abs=1e-6)
    (probs,) = seen
    assert probs.shape == (1, 1, 3, 3)  # (B, heads, query patch, key patch)
    expected = _hand_probs()
    for i in range(3):
        assert probs[0, 0, i].tolist() == pytest.approx(expected[i], abs=1e-6)
    # The masked key gets exactly zero attention, not merely a small one.
    assert torch.equal(probs[0, 0, :, 0], torch.zeros(3))
    # With identity v/out projections the attention output is Σ_k prob_ik · P_k, and the
    # layer is LN(P + attn) followed by the residual FFN.
    attn = torch.tensor(expected) @ torch.tensor(P_HAND)
    x = ext.norm(torch.tensor(P_HAND) + attn)
    torch.testing.assert_close(out[0], x + ext.ffn(x), atol=1e-5, rtol=1e-5)


def _reference_attention(
    ext: ComplementaryInformationExtractor, p: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """Head-by-head, row-by-row reference of the w²-scaled, masked self-attention."""
    b, n, h = p.shape
    d = h // ext.num_heads
    q, k, v = ext.q_proj(p), ext.k_proj(p), ext.v_proj(p)
    out = torch.zeros(b, n, h)
    for bi in range(b):
        keep = w[bi] >= ext.mask_threshold
        for head in range(ext.num_heads):
            sl = slice(head * d, (head + 1) * d)
            for i in range(n):
                if not keep.any():
                    continue  # attends to nothing
                logits = (k[bi, :, sl] @ q[bi, i, sl]) / math.sqrt(d) * w[bi] ** 2
                probs = torch.softmax(logits[keep], dim=0)
                out[bi, i, sl] = probs @ v[bi, keep, sl]
    return ext.out_proj(out)


def test_multi_head_attention_matches_reference():
    torch.manual_seed(0)
    ext = ComplementaryInformationExtractor(8, ExtractorConfig(num_heads=2, ffn_dim=16)).eval()
    p = torch.randn(2, 5, 8)
    w = torch.rand(2, 5) * 0.9 + 0.05
    w[0, 1] = 0.0  # masked keys
    w[1, 3] = 5e-6  # below the 1e-5 threshold
    w[1, 0] = 2e-5  # just above it: kept
    with torch.no_grad():
        torch.testing.assert_close(ext.attention(p, w), _reference_attention(ext, p, w))


def test_post_ln_structure():
    torch.manual_seed(1)
    ext = ComplementaryInformationExtractor(8, ExtractorConfig(num_heads=2, ffn_dim=16)).eval()
    with torch.no_grad():  # make the LayerNorm affine non-trivial
        ext.norm.weight.uniform_(0.5, 1.5)
        ext.norm.bias.uniform_(-0.5, 0.5)
    p, e = torch.randn(2, 6, 8), torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        out, w = ext(p, e, mask, return_weights=True)
        torch.testing.assert_close(w, complementary_weights(p, e, mask))
        x = ext.norm(p + ext.attention(p, w))
        torch.testing.assert_close(out, x + ext.ffn(x))
        # FFN = Linear → LeakyReLU → Linear.
        assert [type(m) for m in ext.ffn] == [nn.Linear, nn.LeakyReLU, nn.Linear]
        assert ext.ffn[0].out_features == 16 and ext.ffn[2].out_features == 8
        assert ext(p, e, mask).shape == (2, 6, 8)


def test_dropout_only_in_train_mode():
    torch.manual_seed(2)
    ext = ComplementaryInformationExtractor(8, ExtractorConfig(num_heads=2, ffn_dim=16, dropout=0.5))
    p, e = torch.randn(1, 6, 8), torch.randn(1, 4, 8)
    mask = torch.ones(1, 4, dtype=torch.bool)
    ext.eval()
    with torch.no_grad():
        assert torch.equal(ext(p, e, mask), ext(p, e, mask))
        ext.train()
        assert not torch.equal(ext(p, e, mask), ext(p, e, mask))


# --------------------------------------------------------------------------- all masked / gradients


def test_all_keys_masked_gives_no_nan_forward_or_backward():
    torch.manual_seed(3)
    ext = ComplementaryInformationExtractor(8, ExtractorConfig(num_heads=2, ffn_dim=16)).eval()
    # Sample 0: every patch is a caption token (w = 0 everywhere → every key masked);
    # sample 1: an ordinary case.
    base = torch.randn(2, 4, 8)
    p = base.clone().requires_grad_(True)
    e = torch.cat([base[:1] * 2.0, torch.randn(1, 4, 8)]).requires_grad_(True)
    mask = torch.ones(2, 4, dtype=torch.bool)
    seen = _capture_probs(ext)
    out, w = ext(p, e, mask, return_weights=True)
    assert (w[0] < 1e-5).all() and (w[1] > 1e-5).all()
    assert torch.isfinite(out).all()
    # A row with no key left attends to nothing: probabilities 0, attention = out_proj(0).
    assert torch.equal(seen[0][0], torch.zeros(2, 4, 4))
    with torch.no_grad():
        x = ext.norm(p[0] + ext.out_proj.bias)
        torch.testing.assert_close(out[0], x + ext.ffn(x))
    out.square().sum().backward()
    assert torch.isfinite(p.grad).all() and torch.isfinite(e.grad).all()
    for name, param in ext.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_gradient_flows_through_w_to_caption_embeddings():
    torch.manual_seed(4)
    ext = ComplementaryInformationExtractor(8, ExtractorConfig(num_heads=2, ffn_dim=16)).eval()
    p = torch.randn(2, 5, 8, requires_grad=True)
    e = torch.randn(2, 4, 8, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    out = ext(p, e, mask)
    # The caption is never key or value: its only way into the output is through w.
    (out * torch.randn_like(out)).sum().backward()
    assert e.grad is not None and torch.isfinite(e.grad).all()
    assert e.grad[mask].abs().sum() > 0
    # Padded caption tokens play no part, so they get exactly zero gradient.
    assert torch.equal(e.grad[~mask], torch.zeros_like(e.grad[~mask]))
    assert p.grad is not None and p.grad.abs().sum() > 0


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match=r"num_heads=3 does not divide the LM width 32"):
        ComplementaryInformationExtractor(32, ExtractorConfig(num_heads=3))


# --------------------------------------------------------------------------- release details
def test_output_dropout_applies_before_the_residual():
    """X = LN(P + Dropout(Attn(P))): with only the output dropout on, the block's input to
    the norm is P plus the dropped-out attention output (a hook sees what the norm gets)."""
    torch.manual_seed(3)
    ext = ComplementaryInformationExtractor(
        8, ExtractorConfig(num_heads=2, ffn_dim=16, dropout=0.0, output_dropout=0.5))
    p, e = torch.randn(1, 6, 8), torch.randn(1, 4, 8)
    mask = torch.ones(1, 4, dtype=torch.bool)
    seen = []
    ext.norm.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].detach().clone()))
    ext.train()
    torch.manual_seed(0)
    with torch.no_grad():
        ext(p, e, mask)
    w = complementary_weights(p, e, mask)
    with torch.no_grad():
        attn = ext.attention(p, w)
    residual = seen[0] - p
    # Each element of the attention output was either zeroed or scaled by 1 / (1 - 0.5).
    zeroed = residual.abs() < 1e-7
    assert zeroed.any() and (~zeroed).any()
    torch.testing.assert_close(residual[~zeroed], 2 * attn[~zeroed])
    ext.eval()
    with torch.no_grad():
        torch.testing.assert_close(ext(p, e, mask), ext(p, e, mask))
    assert ExtractorConfig().output_dropout == 0.05  # the release's value is the default


def test_weights_under_bf16_autocast_equal_fp32():
    """w (and the fully-covered mask it drives) must not move under bfloat16 autocast."""
    torch.manual_seed(4)
    p, e = torch.randn(3, 49, 64), torch.randn(3, 12, 64)
    e[0, 2] = p[0, 5] * 2.0 + 1e-3 * torch.randn(64)  # a patch almost fully covered by a token
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, 9:] = False
    fp32 = complementary_weights(p, e, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = complementary_weights(p, e, mask)
        # the inputs as an autocast model hands them over: bfloat16 activations
        from_bf16 = complementary_weights(p.bfloat16(), e.bfloat16(), mask)
    assert bf16.dtype == torch.float32 and torch.equal(bf16, fp32)
    assert from_bf16.dtype == torch.float32
    # A bf16 einsum would have rounded the near-1 cosine; the fp32 path keeps w tiny but > 0.
    assert 0 < fp32[0, 5] < 1e-3


def test_masked_logits_stay_fp32_under_autocast():
    """The extractor's output under bf16 autocast is close to fp32, and a key whose w is
    below the threshold in fp32 is masked under autocast too (no attention mass on it)."""
    torch.manual_seed(5)
    ext = ComplementaryInformationExtractor(16, ExtractorConfig(num_heads=2, ffn_dim=32)).eval()
    p = torch.randn(1, 5, 16)
    w = torch.tensor([[1e-6, 0.5, 0.9, 2e-5, 0.3]])  # key 0 masked; key 3 just above 1e-5
    seen = []
    ext.attn_dropout.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().float()))
    with torch.no_grad():
        ext.attention(p, w)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ext.attention(p, w)
    fp32, autocast = seen
    assert torch.all(fp32[..., 0] == 0) and torch.all(autocast[..., 0] == 0)
    assert torch.all(autocast[..., 3] > 0)
    torch.testing.assert_close(autocast, fp32, atol=1e-2, rtol=0)


def test_model_weights_under_bf16_autocast_equal_fp32_end_to_end(make_model, documents):
    """Issue 27: under autocast the vision tower and projector ran in bfloat16, so ``w`` got
    bf16-rounded patches and moved by ~1e-3 though ``complementary_weights`` is fp32. The
    whole path pixels → patches → ``w`` is fp32 now: the model's ``w`` under autocast equals
    its fp32 ``w`` to ~1e-6, a tolerance that bf16-rounded patches miss by orders of magnitude."""
    model, processor = make_model("ciea", seed=7)
    model.eval()
    image = processor.collate_documents([d for d in documents if d.modality == "image"]).image
    with torch.no_grad():
        _, w32 = model.encode_image_documents(image, return_weights=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, w_auto = model.encode_image_documents(image, return_weights=True)
            patches = model.project_patches(image["pixel_values"])
        # What the old path fed w: the same patches rounded to bfloat16.
        caption = model.text.embed_tokens(image["input_ids"])
        w_bf16_patches = complementary_weights(patches.bfloat16(), caption, image["caption_mask"])
    torch.testing.assert_close(w_auto, w32, atol=1e-6, rtol=0)
    assert w_auto.dtype == torch.float32 and patches.dtype == torch.float32
    # The tolerance is tight enough to catch the bf16 path (≈1e-3 off).
    assert (w_bf16_patches - w32).abs().max() > 1e-4
