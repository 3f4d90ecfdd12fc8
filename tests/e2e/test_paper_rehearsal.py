"""The ``paper`` preset end to end, offline: T5-ANCE + frozen CLIP ViT-B/32 at their exact
sizes (random weights, ``tests/paper_models.py``), through the real jobs on one local Ray.

``ciea ingest`` (50 documents) → ``ciea pretrain-vision --preset paper`` (MARVEL's visual
pretraining: T5 frozen, CLIP and projector trained) → ``ciea train --preset paper`` stage 1
from it on 2 CPU workers,
stopped by a fault after its first checkpoint and re-run with the same name (it must
resume, not restart) → ``ciea mine-negatives`` → stage 2 → ``ciea embed`` → ``ciea
evaluate``. Then the paper's shapes are checked where they land: 49 patches, 768-d vectors,
step-0 decoder pooling, a vision tower that only stage 0 moved.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from paper_models import PaperModels, write_paper_models
from safetensors import safe_open

from jobs import embed, evaluate, ingest, mine_negatives, pretrain_vision, train
from pipelines.ingest.sources.synthetic.generator import (
    SyntheticConfig,
    generate_queries,
    iter_documents,
)
from pipelines.train.checkpoints import STATE_FILE
from pipelines.train.curves import METRICS_FILE, read_metrics

pytestmark = pytest.mark.slow

# 36 image + 14 text documents; 24 train queries: 6 steps of 4 per epoch, of which 1-2 are run.
CORPUS = SyntheticConfig(seed=7, num_image_docs=36, num_text_docs=14, num_queries=(24, 8, 8), image_size=32)
N_DOCS = CORPUS.num_image_docs + CORPUS.num_text_docs
PATCHES, DIM = 49, 768  # CLIP ViT-B/32: (224 / 32)² patches; t5-base: d_model 768
STAGE1_STEPS, FAULT_STEP, STAGE2_STEPS = 2, 2, 1
VISION_PREFIX = "vision.model."  # CIEAModel.vision (VisionTower).model: a CLIPVisionModel


def _corpus_texts() -> list[str]:
    docs = [d.get("text") or d.get("caption") or "" for d in iter_documents(CORPUS)]
    return docs + [q["query"] for split in generate_queries(CORPUS).values() for q in split]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The module's folder; removed at the end (its checkpoints of a 316M-parameter model
    with AdamW state take ~15 GB, more than pytest's kept temp folders should hold;
    ``KEEP_PAPER=1`` keeps them to look at)."""
    path = tmp_path_factory.mktemp("paper")
    yield path
    if not os.environ.get("KEEP_PAPER"):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def paper_models(work) -> PaperModels:
    return write_paper_models(work / "hub", _corpus_texts())


@pytest.fixture(scope="module")
def ray_session():
    """One 2-CPU local Ray that every job of the module joins."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's unix sockets live under it
    ray.shutdown()  # a Ray started by an earlier module of the session
    ray.init(num_cpus=2, _temp_dir=tmp, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def _train_args(work: Path, models: PaperModels, name: str, *extra: str, stage: int = 1) -> list[str]:
    """``ciea train --preset paper`` pointed at the local folders, sized for 2 CPUs; ``extra``
    are ``--set`` overrides."""
    sets = [f"model.text_model={models.t5}", f"model.vision_model={models.clip}",
            "scaling.use_gpu=false", "scaling.cpus_per_worker=0.5", "scaling.threads_per_worker=1",
            "train.batch_size=4", "train.epochs=1", "train.log_every=1",
            "data.dev_pool=4", "data.max_dev_queries=2", "debug.probe=0", *extra]
    args = ["--preset", "paper", "--root", str(work / "data"), "--storage-path", str(work / "runs"),
            "--name", name, "--workers", "2", "--no-progress", *(a for s in sets for a in ("--set", s))]
    return args if stage == 0 else [*args, "--stage", str(stage)]


@pytest.fixture(scope="module")
def pipeline(work, paper_models, ray_session) -> dict:
    """Every job once, in order; returns where their outputs are."""
    data = work / "data"
    assert ingest.main([
        "--preset", "tiny", "--root", str(data), "--run-dir", str(work / "ingest"), "--no-progress",
        "--set", f"source.synthetic.seed={CORPUS.seed}",
        "--set", f"source.synthetic.num_image_docs={CORPUS.num_image_docs}",
        "--set", f"source.synthetic.num_text_docs={CORPUS.num_text_docs}",
        "--set", f"source.synthetic.num_queries={list(CORPUS.num_queries)}",
        "--set", f"source.synthetic.image_size={CORPUS.image_size}"]) == 0

    # Stage 0, MARVEL's visual pretraining, with the release's `pretrain/train.sh` values.
    assert pretrain_vision.main(_train_args(work, paper_models, "s0", "train.max_steps=1",
                                            "train.checkpoint_every=1", stage=0)) == 0
    s0 = json.loads((work / "runs" / "s0" / "summary.json").read_text())
    from_s0 = f"train.init_from={s0['model_dir']}"

    # Stage 1: a fault right after step 2 ends the job (no restarts) with one line that says
    # how to go on; the same command then resumes from the step-1 checkpoint.
    with pytest.raises(SystemExit, match=rf"^ciea train: training failed .*injected fault at step {FAULT_STEP}"
                       rf".*re-run the same command to resume from its checkpoint at step {FAULT_STEP - 1}"):
        train.main(_train_args(work, paper_models, "s1", f"train.max_steps={STAGE1_STEPS}", from_s0,
                               "train.checkpoint_every=1", f"debug.fail_at_step={FAULT_STEP}",
                               "run.max_failures=0"))
    assert train.main(_train_args(work, paper_models, "s1", f"train.max_steps={STAGE1_STEPS}", from_s0)) == 0
    s1 = json.loads((work / "runs" / "s1" / "summary.json").read_text())

    negatives = data / "negatives" / "s1"
    assert mine_negatives.main(["--checkpoint", s1["model_dir"], "--root", str(data), "--output", str(negatives),
                                "--k", "20", "--no-progress", "--set", "threads=1", "--set", "batch_size=16"]) == 0
    assert train.main(_train_args(work, paper_models, "s2", f"train.negatives={negatives}",
                                  f"train.init_from={s1['model_dir']}", f"train.max_steps={STAGE2_STEPS}", stage=2)) == 0
    s2 = json.loads((work / "runs" / "s2" / "summary.json").read_text())

    assert embed.main(["--checkpoint", s2["model_dir"], "--root", str(data), "--table", "paper",
                       "--run-dir", str(work / "embed"), "--no-progress", "--set", "encode.threads=1",
                       "--set", "encode.batch_size=16"]) == 0
    assert evaluate.main(["--root", str(data), "--split", "test", "--out", str(work / "eval"), "--no-progress",
                          "--variant", f"ciea=table:{data / 'lancedb'}/paper", "--set", "search.threads=1"]) == 0
    return {"s0": s0, "s1": s1, "s2": s2, "negatives": negatives, "db": data / "lancedb", "eval": work / "eval"}


def _numel(weights: Path) -> int:
    with safe_open(str(weights), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def test_stand_ins_have_the_sizes_of_the_hub_checkpoints(paper_models):
    # The published parameter counts of t5-base (T5-ANCE's architecture) and of
    # openai/clip-vit-base-patch32: the stand-ins differ from them in values only.
    assert _numel(paper_models.t5 / "model.safetensors") == 222_903_552
    assert _numel(paper_models.clip / "model.safetensors") == 151_277_313


def _config(model_dir: str) -> dict:
    return json.loads((Path(model_dir) / "ciea_checkpoint.json").read_text())["config"]


def test_checkpoint_has_the_paper_shapes(pipeline):
    for stage in ("s1", "s2"):
        cfg = _config(pipeline[stage]["model_dir"])
        assert cfg["variant"] == "ciea" and cfg["text"]["pooling"] == "decoder_step0"
        assert cfg["text"]["max_length"] == 128
        text, vision = cfg["text"]["hf_config"], cfg["vision"]["hf_config"]
        assert (text["model_type"], text["d_model"], text["num_layers"], text["num_decoder_layers"]) == ("t5", DIM, 12, 12)
        assert (vision["image_size"] // vision["patch_size"]) ** 2 == PATCHES
        assert vision["hidden_size"] == 768 and vision["num_hidden_layers"] == 12
        assert cfg["vision"]["trainable"] is False
        extractor = cfg["extractor"]
        assert (extractor["num_heads"], extractor["ffn_dim"], extractor["dropout"]) == (8, 2048, 0.05)


def test_resumed_run_continues_from_its_checkpoint(pipeline, work):
    records = read_metrics(work / "runs" / "s1" / METRICS_FILE)
    starts = [i for i, r in enumerate(records) if r["event"] == "start"]
    assert len(starts) == 2, "the faulted run, then the re-run"
    first = [r["step"] for r in records[: starts[1]] if r["event"] == "step"]
    assert first == list(range(1, FAULT_STEP + 1))
    resumed = records[starts[1]]["resumed_from_step"]
    checkpointed = {r["step"] for r in records[: starts[1]] if r["event"] == "checkpoint"}
    assert resumed == FAULT_STEP - 1 and resumed in checkpointed
    after = [r["step"] for r in records[starts[1]:] if r["event"] == "step"]
    assert after == list(range(resumed + 1, STAGE1_STEPS + 1)), "the step count continues"
    assert pipeline["s1"]["final_metrics"]["step"] == STAGE1_STEPS
    end = next(r for r in records if r["event"] == "end")
    assert len(end["rank_model_ids"]) == 2 and len(set(end["rank_model_ids"])) == 1, "both workers agree"


def test_stage2_trained_on_mined_negatives(pipeline, work):
    mined = json.loads(Path(f"{pipeline['negatives']}_summary.json").read_text())
    assert mined["model_id"] == pipeline["s1"]["model_id"] and mined["queries"] == CORPUS.num_queries[0]
    assert pipeline["s2"]["data"]["with_negatives"] == CORPUS.num_queries[0]
    steps = [r for r in read_metrics(work / "runs" / "s2" / METRICS_FILE) if r["event"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, STAGE2_STEPS + 1))
    # 4 queries, each with its positive and an image and a text hard negative (fewer only
    # where a document repeats within the step).
    assert all(4 < r["candidates"] <= 12 and np.isfinite(r["loss"]) for r in steps), steps


def _checkpoint_at(run: Path, step: int, final: bool = False) -> Path:
    found = [d for d in run.glob("checkpoint_*") if d.is_dir()
             and json.loads((d / STATE_FILE).read_text())["step"] == step
             and json.loads((d / STATE_FILE).read_text())["finished"] == final]
    assert len(found) == 1, f"{run}: one checkpoint at step {step} (run.num_to_keep=2)"
    return found[0]


def test_only_stage0_moves_the_vision_tower(pipeline, paper_models, work):
    """Stage 0 trains CLIP and the projector with T5 frozen (MARVEL's recipe): after its
    step, its vision weights moved from the CLIP folder's and its LM is the T5 folder's bit
    for bit. Stage 1 starts from the stage-0 model and keeps CLIP frozen: the checkpoint it
    resumed from (weights after a real optimiser step; the final models hold the best on
    dev, which may be the initial ones) holds the stage-0 model's vision weights bit for bit,
    while the LM moved."""
    lm = "encoder.block.0.layer.0.SelfAttention.q.weight"
    stepped = _checkpoint_at(work / "runs" / "s0", 1)
    resumed = _checkpoint_at(work / "runs" / "s1", FAULT_STEP - 1)
    with safe_open(str(paper_models.clip / "model.safetensors"), "pt") as clip, \
            safe_open(str(stepped / "model.safetensors"), "pt") as s0, \
            safe_open(str(Path(pipeline["s0"]["model_dir"]) / "model.safetensors"), "pt") as start, \
            safe_open(str(resumed / "model.safetensors"), "pt") as s1, \
            safe_open(str(paper_models.t5 / "model.safetensors"), "pt") as t5:
        vision = {k.removeprefix(VISION_PREFIX) for k in s1.keys() if k.startswith(VISION_PREFIX)}
        assert vision == {k.removeprefix("vision_model.") for k in clip.keys() if k.startswith("vision_model.")}
        assert any(not torch.equal(s0.get_tensor(VISION_PREFIX + k), clip.get_tensor(f"vision_model.{k}"))
                   for k in vision), "stage 0 trained CLIP"
        assert torch.equal(s0.get_tensor(f"text.model.{lm}"), t5.get_tensor(lm)), "stage 0 kept T5 frozen"
        for key in vision:
            assert torch.equal(s1.get_tensor(VISION_PREFIX + key), start.get_tensor(VISION_PREFIX + key)), key
        assert not torch.equal(s1.get_tensor(f"text.model.{lm}"), t5.get_tensor(lm)), "the LM trained in stage 1"


def test_table_holds_768d_vectors_pooled_at_decoder_step0(pipeline):
    """The table's vectors are the T5 decoder's hidden state at step 0 (start token 0),
    recomputed here with transformers' T5Model on the checkpoint's weights."""
    import lancedb

    from ciea_model import load_checkpoint

    table = lancedb.connect(str(pipeline["db"])).open_table("paper")
    rows = table.to_arrow()
    assert rows.num_rows == N_DOCS
    assert rows.schema.field("vector").type.list_size == DIM
    assert rows.schema.field("patch_weights").type.list_size == PATCHES
    assert {r["model_id"] for r in rows.select(["model_id"]).to_pylist()} == {pipeline["s2"]["model_id"]}

    model, processor = load_checkpoint(pipeline["s2"]["model_dir"])
    assert model.vision.num_patches == PATCHES and model.patch_grid == (7, 7) and model.dim == DIM
    assert not any(p.requires_grad for p in model.vision.parameters())
    ids = processor.collate_image_sequences(["a caption"])["input_ids"][0].tolist()
    assert ids.count(processor.im_patch_id) == PATCHES
    texts = [r for r in rows.to_pylist() if r["modality"] == "text"][:3]
    enc = processor.tokenize([r["text"] for r in texts])
    with torch.no_grad():
        out = model.text.model(**enc, decoder_input_ids=torch.zeros((len(texts), 1), dtype=torch.long))
    step0 = torch.nn.functional.normalize(out.last_hidden_state[:, 0], dim=-1).numpy()
    mean = torch.nn.functional.normalize(out.encoder_last_hidden_state.mean(1), dim=-1).numpy()
    stored = np.stack([r["vector"] for r in texts])
    np.testing.assert_allclose(stored, step0, atol=1e-4)
    assert not np.allclose(stored, mean, atol=1e-2), "the check tells poolings apart"


def test_evaluate_scored_the_table(pipeline):
    report = json.loads((pipeline["eval"] / "report.json").read_text())
    assert report["meta"]["judged_queries"] == CORPUS.num_queries[2]
    ciea = report["variants"]["ciea"]
    assert ciea["info"]["model_id"] == pipeline["s2"]["model_id"]
    assert ciea["info"]["missing_relevant_docs"] == 0 and ciea["info"]["failed_queries"] == 0
    assert set(ciea["metrics"]) >= {"MRR@10", "NDCG@10", "Recall@100"}
    assert all(0.0 <= v <= 1.0 for v in ciea["metrics"].values())
    assert ciea["metrics"]["Recall@100"] == 1.0, "every document of the 50 is ranked"
    assert "MRR@10" in (pipeline["eval"] / "report.md").read_text()
