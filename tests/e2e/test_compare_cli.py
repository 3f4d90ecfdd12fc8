"""``ciea compare`` (in-process training of CIEA and its baselines) end to end, tiny preset."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ciea_model import load_checkpoint, model_id
from jobs import compare


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    rc = compare.main([
        "--preset", "tiny", "--variants", "ciea,text-only", "--output-dir", str(out),
        "--set", "train.epochs=1",
    ])
    return rc, out


def test_compare_runs_and_writes_results(tiny_run):
    rc, out = tiny_run
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in results["runs"]] == ["ciea", "text-only"]
    for run in results["runs"]:
        test = run["test"]
        assert test["num_queries"] == 40
        assert set(test["by_group"]) == {"caption", "image", "text"}
        assert sum(test["group_counts"].values()) == 40
        for value in test["metrics"].values():
            assert math.isfinite(value) and 0.0 <= value <= 1.0
    assert "MRR@10[image]" in results["table"]
    resolved = json.loads((out / "compare_config.json").read_text())
    assert resolved["train"]["epochs"] == 1 and resolved["preset"] == "tiny"


def test_compare_checkpoint_reloads_offline(tiny_run):
    _, out = tiny_run
    model, processor = load_checkpoint(out / "checkpoint-ciea")
    manifest = json.loads((out / "checkpoint-ciea" / "ciea_checkpoint.json").read_text())
    assert model_id(model) == manifest["model_id"]
    assert model.config.variant == "ciea"


def test_compare_pretrains_the_vision_tower_once_and_keeps_it_frozen(tiny_run, caplog):
    _, out = tiny_run
    [cached] = out.glob("vision-pretrained-*.safetensors")
    pretrained = load_file(cached)
    model, _ = load_checkpoint(out / "checkpoint-ciea")
    assert not model.vision.trainable
    for name, value in model.vision.state_dict().items():
        assert torch.equal(value, pretrained[name]), name  # frozen through both stages
    # A re-run with the same settings reuses the pretrained tower instead of training again.
    with caplog.at_level("INFO", logger="ciea.compare"):
        assert compare.main(["--preset", "tiny", "--variants", "marvel", "--output-dir", str(out),
                          "--set", "train.epochs=1", "--set", "train.stage2_epochs=0"]) == 0
    assert any("reusing" in r.getMessage() for r in caplog.records)
    assert list(out.glob("vision-pretrained-*.safetensors")) == [cached]


@pytest.mark.parametrize(
    ("override", "field"),
    [("train.epochs=0", "train.epochs"), ("variants=[ciea,bogus]", "variants"), ("nope=1", "nope"),
     ("vision_pretrain.seed=0", "vision_pretrain.seed")],
)
def test_compare_rejects_bad_config_before_running(tmp_path, override, field):
    with pytest.raises(SystemExit) as exc:
        compare.main(["--preset", "tiny", "--output-dir", str(tmp_path), "--set", override])
    assert field in str(exc.value)
    assert not (tmp_path / "results.json").exists()


def test_console_script_lists_commands():
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout and "compare" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "jobs.cli", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command" in bad.stderr
