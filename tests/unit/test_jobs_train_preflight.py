"""``ciea train`` locates every model the config names before Ray starts: with the hub
unreachable, ``--preset paper`` fails at once with one line naming the fix (it used to
prepare the data and then hang silently inside a worker)."""

from __future__ import annotations

import pytest
from huggingface_hub import constants

from jobs import train


def test_paper_preset_without_the_models_fails_before_ray(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(SystemExit) as err:
        train.main(["--preset", "paper", "--root", str(tmp_path / "data"),
                    "--set", f"run.storage_path={tmp_path / 'runs'}"])
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
