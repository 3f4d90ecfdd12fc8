"""The training step and loop (CIEA_METHOD.md, "Training recipe"): AdamW groups, the cosine
schedule, L = L_c + λ·L_comp, overfitting a batch, early stopping with best-state restore."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

from ciea_model import contrastive_loss
from ciea_model.training import (
    OptimConfig,
    SparseEmbeddingGrads,
    TrainConfig,
    Trainer,
    build_optimizer,
    build_scheduler,
    compute_loss,
    iterate_batches,
    optimizer_step,
    param_groups,
    train_step,
)

ZERO_COMP = ("marvel", "ciea-no-comp", "text-only", "univl-dr")



# --------------------------------------------------------------------------- optimiser


def _split(groups):
    """{id(param): (weight_decay, lr)} over the groups; fails on a param in two groups."""
    out = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in out
            out[id(p)] = (g["weight_decay"], g["lr"])
    return out


def test_param_groups(make_model):
    model, _ = make_model("ciea")
    groups = param_groups(model, 0.2, 1e-4)
    where = _split(groups)
    assert {g["weight_decay"] for g in groups} == {0.2, 0.0}
    for name, p in model.named_parameters():
        if not p.requires_grad:  # the frozen vision tower: in no group
            assert name.startswith("vision.")
            assert id(p) not in where, name
        else:
            assert where[id(p)] == ((0.2 if p.ndim >= 2 else 0.0), 1e-4), name
    assert not any(id(p) in where for p in model.vision.parameters())
    decay = {k for k, (wd, _) in where.items() if wd > 0}
    assert id(model.logit_scale) not in decay
    assert id(model.projector.weight) in decay and id(model.projector.bias) not in decay
    assert id(model.extractor.norm.weight) not in decay
    assert id(model.extractor.norm.bias) not in decay
    assert id(model.extractor.q_proj.weight) in decay
    assert id(model.text.model.get_input_embeddings().weight) in decay
    # A trainable vision tower joins the groups.
    trainable, _ = make_model("ciea", trainable_vision=True)
    assert len(_split(param_groups(trainable, 0.2, 1e-4))) == len(list(trainable.parameters()))


def test_param_groups_module_lr(make_model):
    model, _ = make_model("ciea", trainable_vision=True)
    lrs = {"vision.": 3e-4, "vision.model.encoder.": 1e-3, "extractor.": 2e-4}
    where = _split(param_groups(model, 0.2, 1e-5, lrs))
    for name, p in model.named_parameters():
        expected = (1e-3 if name.startswith("vision.model.encoder.")  # longest prefix wins
                    else 3e-4 if name.startswith("vision.")
                    else 2e-4 if name.startswith("extractor.") else 1e-5)
        assert where[id(p)] == ((0.2 if p.ndim >= 2 else 0.0), expected), name


def test_build_optimizer_uses_the_release_settings(make_model):
    model, _ = make_model("ciea")
    opt = build_optimizer(model, OptimConfig())
    assert isinstance(opt, torch.optim.AdamW)
    for g in opt.param_groups:
        assert g["lr"] == 5e-6 and g["betas"] == (0.9, 0.98) and g["eps"] == 1e-6
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.2]
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in opt.param_groups) == n_trainable


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [({"lr": 0.0}, "optim.lr"), ({"betas": (0.9, 1.0)}, "optim.betas"),
     ({"weight_decay": -1.0}, "optim.weight_decay")],
)
def test_bad_optim_config(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        OptimConfig(**kwargs)


def test_bad_train_config():
    with pytest.raises(ValueError, match=r"train\.patience=0"):
        TrainConfig(patience=0)
    with pytest.raises(ValueError, match=r"train\.max_steps=0"):
        TrainConfig(max_steps=0)


def test_cosine_schedule():
    base = 1e-3
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = build_scheduler(opt, total_steps=10)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(base)  # no warm-up
    assert lrs[5] == pytest.approx(base / 2)  # midpoint: half
    assert lrs[10] == pytest.approx(0.0, abs=1e-15)  # the end: 0
    assert lrs[11] == pytest.approx(0.0, abs=1e-15)  # and it stays there
    assert lrs[2] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert all(a >= b for a, b in pairwise(lrs))


# --------------------------------------------------------------------------- the loss


def _manual_losses(model, batch):
    """L_c and L_comp recomputed from the public encoders and losses."""
    scale = model.scale()
    q = model.encode_query(**batch.queries)
    d = model.encode_documents(batch.documents)
    l_c = contrastive_loss(q, d, batch.targets, scale, batch.doc_keys, batch.ignore)
    if batch.comp_queries is None:
        return l_c, None
    qc = model.encode_query(**batch.comp_queries)
    io = model.encode_image_only(batch.documents.image)
    keys = batch.doc_keys[batch.documents.image_index]
    return l_c, contrastive_loss(qc, io, batch.comp_targets, scale, keys)


@pytest.mark.parametrize("variant", ZERO_COMP)
def test_compute_loss_without_comp_is_l_c(variant, make_model, make_examples):
    model, processor = make_model(variant)
    model.eval()
    batch = processor.collate_training(make_examples(6))
    with torch.no_grad():
        out = compute_loss(model, batch)
        l_c, l_comp = _manual_losses(model, batch)
    assert l_comp is None and batch.comp_queries is None
    assert out.complementary == 0.0 and out.comp_queries == 0
    assert out.loss.item() == pytest.approx(out.contrastive, rel=1e-6)
    assert out.contrastive == pytest.approx(l_c.item(), rel=1e-5)


@pytest.mark.parametrize(("variant", "lam"), [("ciea", 0.1), ("ciea-no-cie", 0.1), ("ciea", 0.5)])
def test_compute_loss_with_comp(variant, lam, make_model, make_examples):
    model, processor = make_model(variant, comp_weight=lam)
    model.eval()
    batch = processor.collate_training(make_examples(6))
    assert batch.comp_queries is not None
    with torch.no_grad():
        out = compute_loss(model, batch)
        l_c, l_comp = _manual_losses(model, batch)
    assert out.contrastive == pytest.approx(l_c.item(), rel=1e-5)
    assert out.complementary == pytest.approx(l_comp.item(), rel=1e-5)
    assert out.complementary > 0
    assert out.loss.item() == pytest.approx(out.contrastive + lam * out.complementary, rel=1e-6)
    assert out.comp_queries == batch.comp_targets.numel()
    assert out.comp_skipped == batch.stats["comp_skipped"]


def test_compute_loss_gather_is_a_no_op_without_process_group(make_model, make_examples):
    model, processor = make_model("ciea")
    model.eval()
    batch = processor.collate_training(make_examples(4))
    with torch.no_grad():
        a, b = compute_loss(model, batch), compute_loss(model, batch, gather=True)
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-6)


# --------------------------------------------------------------------------- steps


def _eval_loss(model, batch) -> float:
    """The loss without dropout (train-mode losses at exp(θ) = 100 are too noisy to compare)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        value = compute_loss(model, batch).loss.item()
    model.train(was_training)
    return value


def test_train_step_overfits_a_fixed_batch(make_model, make_examples):
    torch.manual_seed(0)
    model, processor = make_model("ciea")
    batch = processor.collate_training(make_examples(4))
    assert batch.documents.size >= 2
    opt = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.0))
    initial = _eval_loss(model, batch)
    history = [train_step(model, batch, opt) for _ in range(20)]
    final = _eval_loss(model, batch)
    assert model.training and not model.vision.training
    first = history[0]
    assert set(first) >= {"loss", "loss_c", "loss_comp", "comp_queries", "comp_skipped",
                          "logit_scale", "lr"}
    assert first["comp_queries"] > 0 and first["loss_comp"] > 0
    assert all(math.isfinite(h["loss"]) for h in history)
    # Measured over seeds 0-5: the eval loss falls to 0.06-0.35 of its start.
    assert final < 0.5 * initial, (initial, final, [round(h["loss"], 2) for h in history])
    # θ never leaves the clamp (where it would get no gradient).
    assert model.logit_scale.item() <= math.log(model.config.logit_scale_max) + 1e-6


def test_train_step_with_scheduler_and_clipping(make_model, make_examples):
    model, processor = make_model("marvel")
    batch = processor.collate_training(make_examples(4))
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    sched = build_scheduler(opt, total_steps=4)
    lrs = [train_step(model, batch, opt, sched, max_grad_norm=0.5)["lr"] for _ in range(4)]
    assert lrs[0] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_optimizer_step_clips_steps_clamps_theta_schedules_and_clears(make_model, make_examples):
    """The tail shared by ``train_step`` and the Ray worker, once gradients are final."""
    model, processor = make_model("ciea")
    batch = processor.collate_training(make_examples(4))
    opt = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.0))
    sched = build_scheduler(opt, total_steps=4)

    def grad_norm() -> float:
        norms = [p.grad.norm() for p in model.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    seen = []  # the global gradient norm the optimiser steps with
    opt.register_step_pre_hook(lambda *_: seen.append(grad_norm()))
    compute_loss(model, batch).loss.backward()
    assert grad_norm() > 0.01
    with torch.no_grad():
        model.logit_scale.fill_(math.log(model.config.logit_scale_max) + 1.0)  # above the clamp
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    optimizer_step(model, opt, sched, max_grad_norm=0.01)
    assert seen == [pytest.approx(0.01, rel=1e-4)]
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "the optimiser stepped"
    assert model.logit_scale.item() == pytest.approx(math.log(model.config.logit_scale_max))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert all(p.grad is None for p in model.parameters()), "gradients are cleared"
    optimizer_step(model, opt)  # no gradients, no schedule, no clipping: a no-op step
    assert seen[1] == 0.0 and opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_iterate_batches_is_seeded_and_covers_everything(make_model, make_examples):
    _, processor = make_model("ciea")
    examples = make_examples(10)
    qids = [ex.qid for ex in examples]

    def order(seed, epoch):
        return [b.queries["input_ids"].shape[0] for b in iterate_batches(examples, processor, 4, seed, epoch)]

    assert order(1, 0) == [4, 4, 2]  # the last partial batch too
    first = [processor.tokenizer.batch_decode(b.queries["input_ids"], skip_special_tokens=True)
             for b in iterate_batches(examples, processor, 10, 1, 0)][0]
    again = [processor.tokenizer.batch_decode(b.queries["input_ids"], skip_special_tokens=True)
             for b in iterate_batches(examples, processor, 10, 1, 0)][0]
    other = [processor.tokenizer.batch_decode(b.queries["input_ids"], skip_special_tokens=True)
             for b in iterate_batches(examples, processor, 10, 1, 1)][0]
    assert first == again and first != other and sorted(first) == sorted(other)
    assert len(qids) == 10


# --------------------------------------------------------------------------- trainer


class _Recorder:
    """An ``evaluate`` that returns scripted scores and snapshots the weights it saw."""

    def __init__(self, scores):
        self.scores = list(scores)
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def __call__(self, model) -> float:
        self.snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        i = len(self.snapshots) - 1
        return self.scores[min(i, len(self.scores) - 1)]


def _same_weights(model, snapshot) -> bool:
    return all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


def _fit(make_model, make_examples, scores, **cfg):
    model, processor = make_model("ciea")
    rec = _Recorder(scores)
    settings = {"epochs": 20, "batch_size": 4, "eval_every": 1, "patience": 2, "seed": 0,
                "optim": OptimConfig(lr=1e-3)}
    settings.update(cfg)
    trainer = Trainer(model, processor, TrainConfig(**settings), evaluate=rec)
    result = trainer.fit(make_examples(8))
    return model, rec, result


def test_fit_early_stops_on_a_constant_score(make_model, make_examples):
    model, rec, result = _fit(make_model, make_examples, [0.5])
    # Best at the first evaluation, then `patience` evaluations without improvement.
    assert result.stopped_early
    assert len(rec.snapshots) == 3 and result.steps == 3
    assert result.best_step == 1 and result.best_score == 0.5
    assert _same_weights(model, rec.snapshots[0])
    assert not _same_weights(model, rec.snapshots[-1])  # it did train past the best
    assert not model.training
    assert [h["dev"] for h in result.history if "dev" in h] == [0.5, 0.5, 0.5]


def test_fit_restores_the_best_state_decreasing_scores(make_model, make_examples):
    model, rec, result = _fit(make_model, make_examples, [1.0, 0.9, 0.8, 0.7, 0.6], patience=3)
    assert result.stopped_early and result.steps == 4 and result.best_step == 1
    assert result.best_score == 1.0
    assert _same_weights(model, rec.snapshots[0])


def test_fit_restores_a_best_state_in_the_middle(make_model, make_examples):
    model, rec, result = _fit(make_model, make_examples, [0.1, 0.5, 0.3, 0.2])
    assert result.best_step == 2 and result.best_score == 0.5 and result.steps == 4
    assert _same_weights(model, rec.snapshots[1])


def test_fit_evaluates_after_the_last_step_when_eval_every_never_fires(make_model, make_examples):
    # eval_every is longer than the run: the final weights are still evaluated, once.
    model, rec, result = _fit(make_model, make_examples, [0.3], eval_every=100, patience=1)
    assert not result.stopped_early
    assert [h["step"] for h in result.history if "dev" in h] == [result.steps]
    assert result.best_step == result.steps and result.best_score == 0.3
    assert _same_weights(model, rec.snapshots[0])


def test_fit_without_evaluate_runs_to_max_steps(make_model, make_examples):
    model, processor = make_model("marvel")
    trainer = Trainer(model, processor, TrainConfig(epochs=5, batch_size=4, max_steps=3, seed=0))
    result = trainer.fit(make_examples(8))
    assert result.steps == 3 and not result.stopped_early and result.best_score == -math.inf
    assert [h["step"] for h in result.history] == [1, 2, 3]
    with pytest.raises(ValueError, match="no training examples"):
        trainer.fit([])


def test_fit_draws_the_examples_of_each_epoch(make_model, make_examples):
    """``fit(epoch -> examples)``: every epoch trains on that epoch's draw (the release
    re-draws the positive and the hard negatives each epoch)."""
    model, processor = make_model("marvel")
    pool = make_examples(16)
    draws = {0: pool[:8], 1: pool[8:]}
    asked: list[int] = []

    def examples_of(epoch: int):
        asked.append(epoch)
        return draws[epoch]

    seen: list[set[str]] = []
    collate = processor.collate_training
    processor.collate_training = lambda exs: seen.append({ex.qid for ex in exs}) or collate(exs)
    result = Trainer(model, processor, TrainConfig(epochs=2, batch_size=8, seed=0)).fit(examples_of)
    assert asked == [0, 1] and result.steps == 2 and result.epochs_run == 2
    assert seen == [{ex.qid for ex in draws[0]}, {ex.qid for ex in draws[1]}]
    assert seen[0] != seen[1]


def _one_step(model, batch, embedding_grads=None) -> dict[str, torch.Tensor]:
    # eps well above rounding noise: Adam's first step is lr·g/(|g| + eps), which with the
    # default 1e-8 turns the last-bit differences of near-zero gradients (the sparse and the
    # dense path sum them in different orders) into lr-sized weight differences.
    opt = build_optimizer(model, OptimConfig(lr=1e-2, max_grad_norm=1.0, eps=1e-4))
    torch.manual_seed(7)  # the same dropout masks on both paths
    train_step(model, batch, opt, max_grad_norm=1.0, embedding_grads=embedding_grads)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_sparse_embedding_step_gives_the_dense_step_weights(make_model, make_examples):
    """One in-process step with the token embedding's sparse gradients (what the Ray
    trainer runs) lands on the weights of the dense step: the optimiser, clipping and
    weight decay see the same dense gradient."""
    dense_model, processor = make_model("ciea")
    sparse_model, _ = make_model("ciea")
    grads = SparseEmbeddingGrads(sparse_model, min_rows=1)  # the tiny vocabulary is small
    emb = sparse_model.text.model.get_input_embeddings()
    assert emb.sparse and any(p is emb.weight for p in grads.params)
    assert not dense_model.text.model.get_input_embeddings().sparse
    start = emb.weight.detach().clone()
    was_sparse = []
    emb.weight.register_hook(lambda g: was_sparse.append(g.is_sparse))
    dense = _one_step(dense_model, processor.collate_training(make_examples(6)))
    sparse = _one_step(sparse_model, processor.collate_training(make_examples(6)), grads)
    assert was_sparse and all(was_sparse), "the embedding's backward was sparse"
    assert not torch.equal(emb.weight, start), "the step moved the embedding"
    for name, value in dense.items():
        torch.testing.assert_close(sparse[name], value, rtol=0, atol=1e-6, msg=name)
    grads.restore()
    assert not emb.sparse


def test_sparse_embedding_grads_refuse_stale_gradients(make_model, make_examples):
    model, processor = make_model("marvel")
    grads = SparseEmbeddingGrads(model, min_rows=1)
    compute_loss(model, processor.collate_training(make_examples(4))).loss.backward()
    grads.densify()
    assert grads.params and all(not p.grad.is_sparse for p in grads.params)
    with pytest.raises(RuntimeError, match="set_to_none=True"):
        grads.densify()


def test_fit_trains_with_sparse_embeddings_and_switches_them_back(make_model, make_examples, monkeypatch):
    import ciea_model.training as training

    monkeypatch.setattr(training, "SPARSE_EMBEDDING_MIN_ROWS", 1)  # the tiny vocabulary is small
    model, processor = make_model("marvel")
    emb = model.text.model.get_input_embeddings()
    was_sparse = []
    emb.weight.register_hook(lambda g: was_sparse.append(g.is_sparse))
    Trainer(model, processor, TrainConfig(epochs=1, batch_size=4, max_steps=1, seed=0)).fit(make_examples(4))
    assert was_sparse == [True] and not emb.sparse
    was_sparse.clear()
    Trainer(model, processor, TrainConfig(epochs=1, batch_size=4, max_steps=1, seed=0,
                                          sparse_embeddings=False)).fit(make_examples(4))
    assert was_sparse == [False]


def test_warmup_vision_trains_vision_and_projector_with_the_lm_frozen(make_model, documents):
    from ciea_model.training import OptimConfig, TrainConfig, warmup_vision

    model, processor = make_model("ciea", trainable_vision=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(epochs=1, batch_size=4, optim=OptimConfig(lr=1e-2))
    losses = warmup_vision(model, processor, documents, cfg)
    assert losses and all(math.isfinite(v) for v in losses)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("vision.") for n in changed)
    assert any(n.startswith("projector.") for n in changed)
    assert not any(n.startswith("text.") for n in changed)  # the LM stayed frozen
    assert all(p.requires_grad for p in model.text.parameters())  # and is unfrozen again
    text_only, text_processor = make_model("text-only")
    assert warmup_vision(text_only, text_processor, documents, cfg) == []  # nothing to warm up


def test_warmup_loss_is_the_symmetric_image_caption_loss_by_hand(make_model, documents):
    """Stage 0's loss, recomputed from the two encoders by hand: image-only vectors against
    the LM's caption vectors, cross-entropy both ways over θ·cos, averaged; a repeated
    document is one candidate (here: two copies of one document)."""
    import torch.nn.functional as F

    from ciea_model.training import image_only_plain, warmup_loss

    model, processor = make_model("ciea")
    model.eval()
    images = [d for d in documents if d.modality == "image" and d.caption][:5]
    docs = [*images, images[0]]  # a repeated caption: its twin must not count as a negative
    loss, correct = warmup_loss(model, processor, docs)
    with torch.no_grad():
        img = image_only_plain(model, processor.collate_documents(docs).image)
        cap = model.encode_text(**processor.tokenize([d.caption for d in docs]))
        # The twin (last) is one candidate with the first copy: its column goes, its row
        # targets the first copy, both ways.
        logits = model.scale() * img @ cap.T
        target = torch.tensor([0, 1, 2, 3, 4, 0])
        expect = 0.5 * (F.cross_entropy(logits[:, :5], target) + F.cross_entropy(logits.T[:, :5], target))
        right = int((logits[:, :5].argmax(1) == target).sum())
    assert float(loss.detach()) == pytest.approx(float(expect), rel=1e-5)
    assert correct == right


def test_freeze_for_warmup_freezes_the_lm_and_the_extractor_only(make_model):
    from ciea_model.training import freeze_for_warmup

    model, _ = make_model("ciea", trainable_vision=True)
    frozen = freeze_for_warmup(model)
    assert frozen and all(not p.requires_grad for p in (*model.text.parameters(), *model.extractor.parameters()))
    assert all(p.requires_grad for p in (*model.vision.parameters(), *model.projector.parameters()))
    marvel, _ = make_model("marvel")
    assert freeze_for_warmup(marvel) and not any(p.requires_grad for p in marvel.text.parameters())


def test_load_visual_module_takes_the_vision_tower_and_projector_only(make_model, tmp_path):
    """A stage-0 model hands over its visual module: every ``vision.*`` and ``projector.*``
    tensor is loaded, nothing else moves, and a variant without the extractor takes it too.
    A file that is not this model's visual module is refused in one line."""
    from safetensors.torch import save_model

    from ciea_model.checkpoint import CheckpointError, load_visual_module

    source, _ = make_model("ciea", seed=1)
    save_model(source, str(tmp_path / "s0.safetensors"))
    for variant in ("ciea", "marvel"):
        target, _ = make_model(variant, seed=2)
        before = {k: v.clone() for k, v in target.state_dict().items()}
        names = load_visual_module(target, tmp_path / "s0.safetensors")
        assert names and all(n.startswith(("vision.", "projector.")) for n in names)
        after, theirs = target.state_dict(), source.state_dict()
        for k in after:
            if k in names:
                assert torch.equal(after[k], theirs[k]), k
            else:
                assert torch.equal(after[k], before[k]), k
    other, _ = make_model("text-only")
    save_model(other, str(tmp_path / "text.safetensors"))
    with pytest.raises(CheckpointError, match="not this model's visual module") as err:
        load_visual_module(make_model("ciea")[0], tmp_path / "text.safetensors")
    assert "\n" not in str(err.value)
