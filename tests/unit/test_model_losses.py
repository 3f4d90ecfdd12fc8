"""Losses, computed analytically (CIEA_METHOD.md, "Losses"): in-batch cross-entropy over
de-duplicated candidates, relevant non-targets removed, and the all-gather of candidates
across workers with gradient (the real two-process test is in test_model_losses_ddp.py,
whose module imports stay light so that the spawned workers start fast)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ciea_model import contrastive_loss, gather_with_grad
from ciea_model.losses import first_occurrence


def _unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


def _rand_unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


# --------------------------------------------------------------------------- analytical values


@pytest.mark.parametrize("num_candidates", [1, 2, 5, 17])
def test_identical_candidates_give_log_c(num_candidates):
    q = _rand_unit(3, 8, seed=0)
    cands = _rand_unit(1, 8, seed=1).expand(num_candidates, 8)
    targets = torch.tensor([0, num_candidates - 1, num_candidates // 2])
    loss = contrastive_loss(q, cands, targets, logit_scale=100.0)
    assert loss.item() == pytest.approx(math.log(num_candidates), abs=1e-9)


def test_zero_logit_scale_gives_log_c():
    q, cands = _rand_unit(4, 8, seed=2), _rand_unit(6, 8, seed=3)
    loss = contrastive_loss(q, cands, torch.tensor([0, 1, 2, 5]), logit_scale=torch.tensor(0.0))
    assert loss.item() == pytest.approx(math.log(6), abs=1e-9)


def test_two_by_two_by_hand():
    # cos(q0, d0) = 0.6, cos(q0, d1) = 1, cos(q1, d0) = 0.8, cos(q1, d1) = 0.
    q = _unit([1.0, 0.0], [0.0, 1.0])
    d = _unit([0.6, 0.8], [1.0, 0.0])
    torch.testing.assert_close(q @ d.T, torch.tensor([[0.6, 1.0], [0.8, 0.0]], dtype=torch.float64))
    loss = contrastive_loss(q, d, torch.tensor([0, 1]), logit_scale=10.0)
    # q0: −log(e^6 / (e^6 + e^10)) = log(1 + e^4);  q1: −log(e^0 / (e^8 + e^0)) = log(1 + e^8).
    expected = (math.log(1 + math.exp(4)) + math.log(1 + math.exp(8))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_loss_is_differentiable_in_queries_candidates_and_scale():
    q = _rand_unit(3, 4, seed=4).requires_grad_(True)
    d = _rand_unit(5, 4, seed=5).requires_grad_(True)
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    contrastive_loss(q, d, torch.tensor([0, 2, 4]), scale).backward()
    for t in (q, d, scale):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


# --------------------------------------------------------------------------- duplicates


def test_first_occurrence():
    keys = torch.tensor([5, 3, 5, 7, 3, 3, -1])
    assert first_occurrence(keys).tolist() == [0, 1, 0, 3, 1, 1, 6]
    assert first_occurrence(torch.tensor([9])).tolist() == [0]
    assert first_occurrence(torch.arange(4)).tolist() == [0, 1, 2, 3]


def test_duplicates_are_removed():
    q = _rand_unit(3, 8, seed=6)
    d = _rand_unit(3, 8, seed=7)  # distinct documents a, b, c
    dedup = contrastive_loss(q, d, torch.tensor([0, 1, 2]), 20.0, torch.tensor([10, 11, 12]))
    plain = contrastive_loss(q, d, torch.tensor([0, 1, 2]), 20.0)
    assert dedup.item() == pytest.approx(plain.item(), rel=1e-12)  # no duplicate: no change
    # Candidates a, b, a, c, b: the repeats must not act as extra negatives.
    rep = d[[0, 1, 0, 2, 1]]
    keys = torch.tensor([10, 11, 10, 12, 11])
    loss = contrastive_loss(q, rep, torch.tensor([0, 1, 3]), 20.0, keys)
    assert loss.item() == pytest.approx(plain.item(), rel=1e-12)
    # Without the keys the duplicates would count and the loss would differ.
    assert contrastive_loss(q, rep, torch.tensor([0, 1, 3]), 20.0).item() != pytest.approx(
        plain.item(), rel=1e-6
    )


def test_target_on_a_later_duplicate_moves_to_the_first_copy():
    q = _rand_unit(2, 8, seed=8)
    d = _rand_unit(3, 8, seed=9)
    # Slot 2 repeats the key of slot 0 but (to make the move visible) holds another vector;
    # only the first copy's vector may count.
    cands = torch.cat([d[:2], _rand_unit(1, 8, seed=10)])
    keys = torch.tensor([4, 5, 4])
    loss = contrastive_loss(q, cands, torch.tensor([2, 1]), 5.0, keys)
    expected = contrastive_loss(q, d[:2], torch.tensor([0, 1]), 5.0)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


# --------------------------------------------------------------------------- ignore


def test_ignore_removes_a_relevant_non_target_candidate():
    q = _rand_unit(2, 8, seed=11)
    d = _rand_unit(4, 8, seed=12)
    targets = torch.tensor([0, 1])
    ignore = torch.zeros(2, 4, dtype=torch.bool)
    ignore[0, 2] = True  # candidate 2 is relevant to query 0 (not its target)
    loss = contrastive_loss(q, d, targets, 10.0, ignore=ignore)
    # Query 0 scored without candidate 2; query 1 over all four.
    keep = torch.tensor([0, 1, 3])
    l0 = contrastive_loss(q[:1], d[keep], torch.tensor([0]), 10.0)
    l1 = contrastive_loss(q[1:], d, torch.tensor([1]), 10.0)
    assert loss.item() == pytest.approx((l0.item() + l1.item()) / 2, rel=1e-12)


def test_ignore_never_removes_the_target():
    q, d = _rand_unit(2, 8, seed=13), _rand_unit(3, 8, seed=14)
    targets = torch.tensor([0, 2])
    ignore = torch.ones(2, 3, dtype=torch.bool)  # everything flagged, targets included
    loss = contrastive_loss(q, d, targets, 10.0, ignore=ignore)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)  # only the target is left


def test_ignore_on_a_duplicate_applies_to_its_first_copy():
    q, d = _rand_unit(1, 8, seed=15), _rand_unit(3, 8, seed=16)
    cands = d[[0, 1, 2, 1]]
    keys = torch.tensor([1, 2, 3, 2])
    ignore = torch.tensor([[False, False, False, True]])  # flags the repeat of candidate 1
    loss = contrastive_loss(q, cands, torch.tensor([0]), 10.0, keys, ignore)
    expected = contrastive_loss(q, d[[0, 2]], torch.tensor([0]), 10.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


def test_correct_counts_duplicates_and_ignores():
    q = torch.eye(3)
    # Candidates: query 0's positive, a duplicate of it (never a rival), the positive of
    # queries 1 and 2, and a document relevant to query 2 (not its target) that it scores highest.
    docs = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    keys, targets = torch.tensor([1, 1, 2, 3]), torch.tensor([0, 2, 2])
    ignore = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    loss, correct = contrastive_loss(q, docs, targets, 10.0, keys, ignore, return_correct=True)
    # q0 → a (correct); q1 → b (correct); q2's best (c) is ignored, then a and b tie at 0 and
    # argmax takes a: wrong.
    assert int(correct) == 2 and not correct.requires_grad
    assert torch.equal(loss, contrastive_loss(q, docs, targets, 10.0, keys, ignore))


# --------------------------------------------------------------------------- gather


def test_gather_without_process_group_is_identity():
    assert not dist.is_initialized()
    x = torch.randn(3, 4, requires_grad=True)
    out, offset = gather_with_grad(x)
    assert out is x and offset == 0
    keys = torch.tensor([1, 2, 3])
    out, offset = gather_with_grad(keys)
    assert out is keys and offset == 0
    out, out_keys, offset = gather_with_grad(x, keys)
    assert out is x and out_keys is keys and offset == 0
    with pytest.raises(ValueError, match="same row count"):
        gather_with_grad(x, torch.tensor([1, 2]))
