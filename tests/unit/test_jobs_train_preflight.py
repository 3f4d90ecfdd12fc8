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
