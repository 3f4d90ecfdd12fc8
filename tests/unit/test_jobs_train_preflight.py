"""``ciea train`` locates every model the config names before Ray starts: with the hub
unreachable, ``--preset paper`` fails at once with one line naming the fix (it used to
prepare the data and then hang silently inside a worker)."""

from __future__ import annotations

import pytest
from huggingface_hub import constants

from jobs import pretrain_vision, train


@pytest.mark.parametrize(("job", "args"), [
    (train, ["--set", "train.init_from=PLACEHOLDER"]),  # stage 1 from a stage-0 model, as the release
    (train, ["--set", "train.visual_pretraining=skip"]),  # or from raw CLIP, said so
    (pretrain_vision, []),  # stage 0 itself
])
def test_paper_preset_without_the_models_fails_before_ray(monkeypatch, tmp_path, capsys, job, args):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    args = [a.replace("PLACEHOLDER", str(tmp_path / "stage0" / "model")) for a in args]
    with pytest.raises(SystemExit) as err:
        job.main(["--preset", "paper", "--root", str(tmp_path / "data"),
                  "--set", f"run.storage_path={tmp_path / 'runs'}", *args])
    msg = str(err.value)
    assert msg.startswith("ciea train: text tower 'OpenMatch/t5-ance'") and "HF_HUB_OFFLINE=1" in msg
    assert "\n" not in msg
    import sys

    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()
    assert not (tmp_path / "runs").exists()  # nothing prepared


def test_paper_preset_points_at_local_folders(tmp_path):
    """``model.text_model`` / ``model.vision_model`` replace the hub names of the paper preset
    (what a machine without the hub uses: folders written by save_pretrained)."""
    from pipelines.train.config import TrainJobConfig, model_config_for

    cfg = TrainJobConfig.model_validate({"preset": "paper", "model": {
        "text_model": str(tmp_path / "t5-ance"), "vision_model": str(tmp_path / "clip")}})
    model = model_config_for(cfg, None)
    assert model.text.name_or_path == str(tmp_path / "t5-ance")
    assert model.vision.name_or_path == str(tmp_path / "clip")
    assert model.text.pooling == "decoder_step0" and not model.vision.trainable
    with pytest.raises(ValueError, match="model.vision_model is for the paper preset"):
        TrainJobConfig.model_validate({"preset": "demo", "model": {"vision_model": "x"}})


@pytest.mark.parametrize(("scaling", "resources", "fix"), [
    # the paper preset's GPU worker on a CPU-only machine: Ray Train would wait forever
    ({"num_workers": 1, "use_gpu": True, "cpus_per_worker": 4}, {"CPU": 16.0}, "scaling.use_gpu=false"),
    # 2 workers × 1 CPU on 2 CPUs: no CPU left for Ray Data's read tasks (the silent deadlock)
    ({"num_workers": 2, "cpus_per_worker": 1}, {"CPU": 2.0}, "lower scaling.cpus_per_worker"),
])
def test_a_worker_group_a_local_ray_cannot_place_is_refused(scaling, resources, fix):
    from pipelines.train.config import TrainJobConfig
    from pipelines.train.driver import SetupError, check_fits

    cfg = TrainJobConfig.model_validate({"preset": "tiny", "scaling": scaling})
    with pytest.raises(SetupError, match=fix) as err:
        check_fits(cfg, resources)
    assert "\n" not in str(err.value)


def test_a_worker_group_that_fits_passes():
    from pipelines.train.config import TrainJobConfig
    from pipelines.train.driver import check_fits

    check_fits(TrainJobConfig.model_validate({"preset": "tiny"}), {"CPU": 2.0})  # 2 × 0.5 + 1 reader
    check_fits(TrainJobConfig.model_validate({"preset": "tiny", "scaling": {"use_gpu": True, "num_workers": 1}}),
               {"CPU": 2.0, "GPU": 1.0})


def test_paper_preset_stage1_requires_the_visual_pretraining(tmp_path, capsys):
    """The release starts stage 1 from MARVEL's pretrained visual module: without
    ``train.init_from`` the paper preset stops in one line naming ``ciea pretrain-vision`` and
    the switch that skips it; stage 2 (from stage 1) and the variants without a projector
    are not asked."""
    from pipelines.train.config import TrainJobConfig

    with pytest.raises(SystemExit) as err:
        train.main(["--preset", "paper", "--root", str(tmp_path), "--set", f"run.storage_path={tmp_path / 'runs'}"])
    msg = str(err.value)
    assert "ciea pretrain-vision" in msg and "train.visual_pretraining=skip" in msg and "\n" not in msg
    assert "got {" not in msg  # the whole config is not echoed
    paper = train.PRESETS["paper"]
    assert TrainJobConfig.model_validate(paper).missing_visual_pretraining()  # a valid config, refused at start
    for ok in ({"model": {"variant": "text-only"}}, {"model": {"variant": "univl-dr"}},
               {"train": {"visual_pretraining": "skip"}}, {"train": {"stage": 0}}, {"train": {"init_from": "x"}}):
        cfg = TrainJobConfig.model_validate({**paper, **{k: {**paper.get(k, {}), **v} for k, v in ok.items()}})
        assert cfg.missing_visual_pretraining() is None, ok
    # tiny and demo may start from raw towers (their default), or be asked to require it
    assert TrainJobConfig.model_validate({"preset": "demo"}).missing_visual_pretraining() is None
    asked = TrainJobConfig.model_validate({"preset": "demo", "train": {"visual_pretraining": "require"}})
    assert "ciea pretrain-vision" in asked.missing_visual_pretraining()


@pytest.mark.parametrize(("overrides", "match"), [
    (["--set", "train.stage=1"], "this command is stage 0"),
    (["--variant", "text-only"], "has none"),
    (["--variant", "univl-dr"], "has none"),
    (["--set", "train.negatives=x"], "only read in stage 2"),
])
def test_pretrain_vision_refuses_what_stage0_cannot_train(tmp_path, overrides, match):
    with pytest.raises(SystemExit, match=match) as err:
        pretrain_vision.main(["--root", str(tmp_path), *overrides])
    assert "\n" not in str(err.value)


def test_pretrain_vision_presets_are_stage0_with_the_release_recipe():
    """``ciea pretrain-vision --preset paper`` is MARVEL's pretrain/train.sh: LM frozen (the
    stage freezes it), CLIP trained, AdamW 5e-6, batch 64, ≤ 20 epochs, dev every 500 steps,
    early stop after 5."""
    from pipelines.train.config import TrainJobConfig

    cfg = TrainJobConfig.model_validate(pretrain_vision.PRESETS["paper"])
    assert (cfg.train.stage, cfg.train.lr, cfg.train.batch_size, cfg.train.epochs) == (0, 5e-6, 64, 20)
    assert (cfg.train.eval_every, cfg.train.patience, cfg.model.freeze_vision) == (500, 5, False)
    for preset in ("tiny", "demo"):
        assert TrainJobConfig.model_validate(pretrain_vision.PRESETS[preset]).train.stage == 0
    assert pretrain_vision.command(cfg)[:2] == ["--preset", "paper"]
