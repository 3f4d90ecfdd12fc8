"""Losses take embeddings, not the model (so they are tested analytically).

``contrastive_loss`` is L_c (and, with other inputs, L_comp): cross-entropy of each query
against every candidate in the batch, with duplicate candidates (same document key)
removed and other relevant documents excluded from the negatives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def first_occurrence(keys: torch.Tensor) -> torch.Tensor:
    """For each position, the index of the first position holding the same key: (C,) → (C,)."""
    c = keys.shape[0]
    same = keys.unsqueeze(0) == keys.unsqueeze(1)  # (C, C)
    positions = torch.arange(c, device=keys.device).expand(c, c)
    return torch.where(same, positions, c).min(dim=1).values


def contrastive_loss(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    targets: torch.Tensor,
    logit_scale: torch.Tensor | float,
    candidate_keys: torch.Tensor | None = None,
    ignore: torch.Tensor | None = None,
    return_correct: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """In-batch (+ hard negative) cross-entropy.

    Args:
        queries: (B, D) unit-norm query vectors.
        candidates: (C, D) unit-norm candidate vectors.
        targets: (B,) index of each query's positive in ``candidates``.
        logit_scale: exp(θ), the multiplier of the cosine scores.
        candidate_keys: (C,) document keys; a candidate whose key appeared earlier is a
            duplicate: it is removed from the softmax and targets move to the first copy.
        ignore: (B, C) true where a candidate is relevant to the query but not its target;
            such candidates are removed from that query's softmax.
        return_correct: also return how many queries score their target highest among
            the same candidates (the in-batch accuracy's numerator; no gradient).

    Returns:
        The mean loss over queries (a scalar); with ``return_correct``, ``(loss, correct)``.
    """
    logits = logit_scale * queries @ candidates.T  # (B, C)
    if candidate_keys is not None:
        first = first_occurrence(candidate_keys)
        targets = first[targets]
        duplicate = first != torch.arange(first.shape[0], device=first.device)
        logits = logits.masked_fill(duplicate.unsqueeze(0), float("-inf"))
        if ignore is not None:
            # An "ignore" flag on a duplicate applies to its first copy.
            to_first = F.one_hot(first, first.shape[0]).to(logits.dtype)  # (C, C)
            ignore = (ignore.to(logits.dtype) @ to_first) > 0
    if ignore is not None:
        keep_target = F.one_hot(targets, logits.shape[1]).bool()
        logits = logits.masked_fill(ignore & ~keep_target, float("-inf"))
    loss = F.cross_entropy(logits, targets)
    if not return_correct:
        return loss
    with torch.no_grad():
        correct = (logits.argmax(dim=1) == targets).sum()
    return loss, correct


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's rows.

    (torch.distributed.nn's version is deprecated and was seen to abort gloo workers at
    interpreter exit.) Every rank must run the backward: callers make the gathered tensor
    part of each rank's loss, even when a rank has nothing to score against it.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        grad = torch.stack([g.contiguous() for g in grads])
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


def gather_with_grad(tensor: torch.Tensor, *more: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """All-gathers (C_r, ...) rows from every worker, keeping the gradient of the local part,
    so negatives scale with the global batch. Ranks may hold different row counts.

    Args:
        tensor: this rank's rows.
        more: further tensors with the same number of rows (e.g. the candidates' keys):
            they share the one exchange of row counts, so each costs a single collective.

    Returns:
        ``(gathered, offset)``: (sum C_r, ...) rows in rank order and the offset of this
        rank's rows; with ``more``, ``(gathered, *more_gathered, offset)``. Without an
        initialised process group (or with one process) the tensors come back as they are,
        with offset 0.
    """
    tensors = (tensor, *more)
    if any(t.shape[0] != tensor.shape[0] for t in more):
        raise ValueError(f"gather_with_grad: tensors must have the same row count, got "
                         f"{[t.shape[0] for t in tensors]}")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return (*tensors, 0)
    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    out = []
    for t in tensors:
        padded = t.new_zeros((max(counts), *t.shape[1:]))
        padded = torch.cat([t, padded[t.shape[0]:]]) if t.shape[0] < max(counts) else t
        if t.is_floating_point() and t.requires_grad:
            parts = list(_AllGather.apply(padded))
        else:
            parts = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(parts, padded)
        # The local slot is the live tensor, so gradient flows to this worker's encoder.
        parts[rank] = padded
        out.append(torch.cat([p[:n] for p, n in zip(parts, counts)]))
    return (*out, sum(counts[:rank]))
