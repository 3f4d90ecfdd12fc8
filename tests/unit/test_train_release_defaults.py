"""Issue 27 item 4: the ``paper`` preset's defaults are the authors' release, and each
departure the project prefers is a named switch (docs/training.md, "The paper preset and
the release"). Checked here: the presets' values against the release table, each switch's
effect on a tiny real model or on the loop's own code, the dev in-batch accuracy the release
selects by, and resuming checkpoints that predate the new keys."""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ciea_model.inference import encode_documents, encode_queries
from ciea_model.training import compute_loss, image_only_plain
from jobs.common import preset_defaults
from jobs.train import PRESETS
from pipelines.train import worker as worker_mod
from pipelines.train.config import (
    CheckpointMismatchError,
    TrainJobConfig,
    check_identity,
    model_config_for,
    resume_identity,
)
from pipelines.train.curves import MetricsLog, read_metrics
from pipelines.train.worker import (
    LoopState,
    TrainWorker,
    dev_in_batch_accuracy,
    dev_mrr10,
    dev_positive,
    dev_scores,
    step_autocast,
)

#: The authors' release (CIEA_METHOD.md, "Training recipe"; issue 27 item 4): switch → value.
RELEASE = {
    "train.comp_loss_in_stage2": False,
    "train.bf16": False,
    "train.select_by": "dev_in_batch_acc",
    "train.patience": 10,
    "train.stage2_patience": 5,
    "model.image_only_extractor": False,
    "model.image_only_frame": False,
}
#: What tiny and demo keep (the project's preferences; ``make demo`` figures depend on them).
PROJECT = {
    "train.comp_loss_in_stage2": True,
    "train.bf16": True,
    "train.select_by": "dev_mrr10",
    "train.stage2_patience": None,
    "model.image_only_extractor": True,
    "model.image_only_frame": True,
}


def _get(cfg: TrainJobConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _preset(name: str, **train) -> TrainJobConfig:
    cfg = preset_defaults(TrainJobConfig, PRESETS, name)
    if train:
        cfg = TrainJobConfig.model_validate({**cfg.model_dump(), "train": {**cfg.train.model_dump(), **train}})
    return cfg


# ---- the presets ------------------------------------------------------------------------------
def test_paper_preset_is_the_release():
    cfg = _preset("paper")
    assert {k: _get(cfg, k) for k in RELEASE} == RELEASE
    assert cfg.train.effective_patience == 10 and cfg.train.trains_comp_loss
    s2 = _preset("paper", stage=2, negatives="neg")
    assert s2.train.effective_patience == 5 and not s2.train.trains_comp_loss


@pytest.mark.parametrize("name", ["tiny", "demo"])
def test_tiny_and_demo_keep_the_project_values(name):
    cfg = _preset(name)
    assert {k: _get(cfg, k) for k in PROJECT} == PROJECT
    s2 = _preset(name, stage=2, negatives="neg")
    assert s2.train.effective_patience == cfg.train.patience and s2.train.trains_comp_loss


def test_paper_preset_model_config_drops_l_comp_in_stage_2_only(tmp_path):
    folders = {"text_model": str(tmp_path / "t5"), "vision_model": str(tmp_path / "clip")}
    s1 = TrainJobConfig.model_validate({**_preset("paper").model_dump(), "model": {
        **_preset("paper").model.model_dump(), **folders}})
    s2 = TrainJobConfig.model_validate({**s1.model_dump(), "train": {
        **s1.train.model_dump(), "stage": 2, "negatives": "neg"}})
    m1, m2 = model_config_for(s1, None), model_config_for(s2, None)
    assert (m1.comp_weight, m2.comp_weight) == (0.1, 0.0)
    assert not m1.image_only_extractor and not m2.image_only_extractor


# ---- each switch's effect ---------------------------------------------------------------------
def test_comp_loss_in_stage2_off_trains_l_c_alone(tokenizer_dirs, make_model, make_examples):
    """Stage 2 with ``comp_loss_in_stage2=false`` resolves to λ = 0: the loss is L_c."""
    tiny = {"preset": "tiny", "train": {"stage": 2, "negatives": "neg"}}
    keep = model_config_for(TrainJobConfig.model_validate(tiny), tokenizer_dirs["t5"])
    drop = model_config_for(TrainJobConfig.model_validate(
        {**tiny, "train": {**tiny["train"], "comp_loss_in_stage2": False}}), tokenizer_dirs["t5"])
    assert (keep.comp_weight, drop.comp_weight) == (0.1, 0.0)
    stage1 = TrainJobConfig.model_validate({"train": {"comp_loss_in_stage2": False}})
    assert model_config_for(stage1, tokenizer_dirs["t5"]).comp_weight == 0.1  # stage 1 unaffected
    for lam in (keep.comp_weight, drop.comp_weight):
        model, processor = make_model("ciea", comp_weight=lam)
        model.eval()
        with torch.no_grad():
            out = compute_loss(model, processor.collate_training(make_examples(6)))
        if lam:
            assert out.complementary > 0 and out.loss.item() > out.contrastive
        else:
            assert out.complementary == 0.0 and out.loss.item() == pytest.approx(out.contrastive, rel=1e-6)


def test_image_only_extractor_switch(make_model, documents):
    """false (the release): L_comp's image-only candidates are the projected patches P in
    ``[<im_start>] P [<im_end>]`` (the extractor bypassed); true: P̂ from the extractor."""
    image = None
    vecs = {}
    for flag in (True, False):
        model, processor = make_model("ciea", seed=2, image_only_extractor=flag)
        model.eval()
        image = processor.collate_documents([d for d in documents if d.modality == "image"]).image
        with torch.no_grad():
            vecs[flag] = (model.encode_image_only(image), image_only_plain(model, image),
                          model.encode_image_documents(image))
    torch.testing.assert_close(vecs[False][0], vecs[False][1])  # plain patches
    assert (vecs[True][0] - vecs[True][1]).abs().max() > 1e-3  # through the extractor
    torch.testing.assert_close(vecs[True][2], vecs[False][2])  # the documents are the same


def test_image_only_frame_switch_by_hand(make_model, documents):
    """false (the release, MARVEL's ``encode_images_only``): an image alone is its projected
    patches and nothing else through the LM — no prefix, no ``<im_start>``/``<im_end>``,
    every position attended; true: the patches in their frame. Image documents (with
    their caption) are the same either way."""
    framed, processor = make_model("ciea", seed=3, image_only_extractor=False)
    bare, _ = make_model("ciea", seed=3, image_only_extractor=False, image_only_frame=False)
    framed.eval(), bare.eval()
    image = processor.collate_documents([d for d in documents if d.modality == "image"][:4]).image
    with torch.no_grad():
        patches = bare.project_patches(image["pixel_values"])
        expect = torch.nn.functional.normalize(
            bare.text(torch.ones(patches.shape[:2], dtype=torch.long), inputs_embeds=patches), dim=-1)
        torch.testing.assert_close(image_only_plain(bare, image), expect)
        torch.testing.assert_close(bare.encode_image_only(image), expect)
        assert (image_only_plain(framed, image) - expect).abs().max() > 1e-3
        torch.testing.assert_close(framed.encode_image_documents(image), bare.encode_image_documents(image))


def test_bf16_switch_picks_the_forward_precision():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert isinstance(step_autocast(cpu, True), contextlib.nullcontext)  # ignored on CPU
    assert isinstance(step_autocast(cuda, False), contextlib.nullcontext)  # fp32: the release
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else contextlib.nullcontext():
        auto = step_autocast(cuda, True)
    assert isinstance(auto, torch.autocast) and auto.fast_dtype == torch.bfloat16


# ---- the dev in-batch accuracy ----------------------------------------------------------------
def test_dev_in_batch_accuracy_by_hand():
    # 2-D unit vectors: documents a, b, c; four queries in batches of 2.
    docs = {"a": np.array([1.0, 0.0]), "b": np.array([0.0, 1.0]), "c": np.array([0.6, 0.8])}
    q = np.array([[1.0, 0.0],    # → a: vs {a, b}: a wins ✓
                  [0.8, 0.6],    # → b: vs {a, b}: a (0.8) beats b (0.6) ✗
                  [0.0, 1.0],    # → c: vs {c} only (both queries share c) ✓
                  [1.0, 0.0]])   # → c ✓ (c is the batch's one candidate)
    assert dev_in_batch_accuracy(q, docs, ["a", "b", "c", "c"], 2) == 0.75
    # One batch of 4: candidates {a, b, c}; query 2 (0,1) → b beats c (1.0 vs 0.8) ✗; query 3 → a ✗.
    assert dev_in_batch_accuracy(q, docs, ["a", "b", "c", "c"], 4) == 0.25
    # A query without a positive in the pool is left out, not counted wrong.
    assert dev_in_batch_accuracy(q, docs, ["a", None, None, None], 4) == 1.0
    assert dev_in_batch_accuracy(q, docs, [None] * 4, 4) == 0.0


def test_dev_positive_follows_the_training_rule():
    pool = {"i1": "image", "i2": "image", "t1": "text"}
    assert dev_positive({"positive_doc_ids": ["t1", "i2"], "target_doc_id": "i1"}, pool) == "i1"
    assert dev_positive({"positive_doc_ids": ["t1", "i2", "i1"], "target_doc_id": None}, pool) == "i2"
    assert dev_positive({"positive_doc_ids": ["t9", "t1"], "target_doc_id": "gone"}, pool) == "t1"
    assert dev_positive({"positive_doc_ids": ["t9"]}, pool) is None


@pytest.fixture(scope="module")
def dev_case(synthetic_corpus, make_model):
    from ciea_model.processor import Document

    docs, queries = synthetic_corpus
    model, processor = make_model("ciea", seed=3)
    documents = [Document(d["doc_id"], d["modality"], text=d["text"], caption=d["caption"],
                          image=processor.image_transform(d["image"]) if d["image"] is not None else None)
                 for d in docs]
    return model, processor, documents, queries["dev"] + queries["test"]


def test_dev_scores_equal_their_parts(dev_case):
    model, processor, documents, queries = dev_case
    scores = dev_scores(model, processor, documents, queries, batch_size=8)
    assert scores["dev_mrr10"] == dev_mrr10(model, processor, documents, queries)
    modality = {d.doc_id: d.modality for d in documents}
    positives = [dev_positive(x, modality) for x in queries]
    d = dict(zip([x.doc_id for x in documents], encode_documents(model, processor, documents)))
    q = encode_queries(model, processor, [x["query"] for x in queries])
    assert scores["dev_in_batch_acc"] == pytest.approx(dev_in_batch_accuracy(q, d, positives, 8), abs=1e-12)
    assert 0 < scores["dev_in_batch_acc"] <= 1


# ---- selection and early stopping in the worker's evaluation ---------------------------------
def _worker(tmp_path: Path, make_model, **train) -> TrainWorker:
    """A rank-0 worker without Ray: the evaluation path only."""
    w = TrainWorker.__new__(TrainWorker)
    w.cfg = TrainJobConfig.model_validate({"train": train})
    w.model, w.processor = make_model("ciea", seed=1)
    w.rank, w.gather, w.device = 0, False, torch.device("cpu")
    w.state, w.dev_queries = LoopState(), []
    w.log = MetricsLog(tmp_path / "metrics.jsonl")
    w.best_dir = tmp_path / "best"
    w._dev_documents = lambda: []
    return w


# (MRR@10, in-batch acc) per evaluation: MRR peaks at the 2nd, accuracy at the 3rd.
SCORES = [(0.30, 0.50), (0.40, 0.55), (0.35, 0.70), (0.34, 0.60), (0.33, 0.65), (0.32, 0.60)]


@pytest.mark.parametrize(("select_by", "best_step", "stops_at"),
                         [("dev_mrr10", 1, 4), ("dev_in_batch_acc", 2, 5)])
def test_the_checkpoint_is_kept_and_stopping_decided_by_select_by(
        tmp_path, make_model, monkeypatch, select_by, best_step, stops_at):
    w = _worker(tmp_path, make_model, select_by=select_by, patience=2, stage2_patience=1)
    it = iter(SCORES)
    monkeypatch.setattr(worker_mod, "dev_scores", lambda *a, **k: dict(zip(("dev_mrr10", "dev_in_batch_acc"), next(it))))
    stopped = None
    for step in range(len(SCORES)):
        w.state.step = step
        if w.evaluate():
            stopped = step
            break
    assert (w.state.best_step, stopped) == (best_step, stops_at - 1)  # stage 1: patience 2
    mrr, acc = SCORES[best_step]
    assert (w.state.best_dev_mrr10, w.state.best_dev_in_batch_acc) == (mrr, acc)
    assert w.state.best == (mrr if select_by == "dev_mrr10" else acc)
    evals = [r for r in read_metrics(w.log.path) if r["event"] == "eval"]
    assert [(r["dev_mrr10"], r["dev_in_batch_acc"]) for r in evals] == SCORES[:stops_at]
    assert all(r["select_by"] == select_by and r["best_dev_mrr10"] is not None for r in evals)
    assert evals[-1]["best_dev_mrr10"] == mrr
    kept = json.loads((w.best_dir / "ciea_checkpoint.json").read_text())["metadata"]
    assert kept["step"] == best_step and kept["select_by"] == select_by


def test_stage2_patience_applies_in_stage_2(tmp_path, make_model, monkeypatch):
    w = _worker(tmp_path, make_model, stage=2, negatives="neg", patience=10, stage2_patience=1)
    it = iter(SCORES)
    monkeypatch.setattr(worker_mod, "dev_scores", lambda *a, **k: dict(zip(("dev_mrr10", "dev_in_batch_acc"), next(it))))
    decisions = []
    for step in range(4):
        w.state.step = step
        decisions.append(w.evaluate())
    assert decisions == [False, False, True, True]  # one evaluation without gain after the best


# ---- resume identity --------------------------------------------------------------------------
MODEL = {"variant": "ciea"}


#: Identity keys added since checkpoints were first written (by 2026-12-07).
NEW_KEYS = ("train.select_by", "train.comp_loss_in_stage2", "train.composed_share", "model.image_only_frame",
            "model_config.image_only_frame", "model_config.text.projection_dim")


def _old(identity: dict) -> dict:
    """An identity as checkpoints written before the new keys store it."""
    return {k: v for k, v in identity.items() if k not in NEW_KEYS}


def test_a_checkpoint_from_before_composed_queries_and_the_frame_switch_resumes():
    from ciea_model.presets import tiny_config

    model = tiny_config("ciea", "tok").to_dict()
    now = resume_identity(TrainJobConfig(), model)
    assert {"train.composed_share", "model.image_only_frame", "model_config.image_only_frame",
            "model_config.text.projection_dim"} <= set(now)
    check_identity(_old(now), now, "old checkpoint")
    framed_off = resume_identity(TrainJobConfig.model_validate({"model": {"image_only_frame": False}}),
                                 {**model, "image_only_frame": False})
    with pytest.raises(CheckpointMismatchError, match="image_only_frame: checkpoint True"):
        check_identity(_old(now), framed_off, "old checkpoint")


def test_old_checkpoints_resume_when_the_new_keys_keep_their_behaviour():
    s1 = resume_identity(TrainJobConfig(), MODEL)
    s2 = resume_identity(TrainJobConfig.model_validate({"train": {"stage": 2, "negatives": "n"}}), MODEL)
    assert "train.select_by" in s1 and "train.comp_loss_in_stage2" in s2
    assert "train.comp_loss_in_stage2" not in s1  # stage 1 trains alike either way
    check_identity(_old(s1), s1, "old checkpoint")
    check_identity(_old(s2), s2, "old checkpoint")
    # stage2_patience, like patience, is a budget: not in the identity.
    other = TrainJobConfig.model_validate({"train": {"stage": 2, "negatives": "n", "stage2_patience": 3}})
    assert resume_identity(other, MODEL) == s2


@pytest.mark.parametrize(("train", "key"), [
    ({"select_by": "dev_in_batch_acc"}, "train.select_by"),
    ({"stage": 2, "negatives": "n", "comp_loss_in_stage2": False}, "train.comp_loss_in_stage2"),
    ({"bf16": False}, "train.bf16"),
])
def test_old_checkpoints_are_refused_when_a_new_value_changes_the_run(train, key):
    base = {"stage": 2, "negatives": "n"} if train.get("stage") == 2 else {}
    old = _old(resume_identity(TrainJobConfig.model_validate({"train": base}), MODEL))
    now = resume_identity(TrainJobConfig.model_validate({"train": train}), MODEL)
    with pytest.raises(CheckpointMismatchError, match=re.escape(key) + ": checkpoint"):
        check_identity(old, now, "old checkpoint")


def test_old_loop_state_restores_with_the_new_fields():
    saved = {"step": 3, "best": 0.4, "best_step": 2, "initial_dev": 0.1}  # an old STATE_FILE's loop
    state = LoopState(**saved)
    assert state.best_dev_mrr10 is None and state.initial_dev_mrr10 is None
    w = TrainWorker.__new__(TrainWorker)
    w.state = state
    assert w._best_mrr10() == 0.4 and w._initial_mrr10() == 0.1
    assert not math.isinf(w._best_mrr10())
