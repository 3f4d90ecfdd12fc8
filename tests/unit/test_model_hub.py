"""Every model and tokenizer a config names is located before anything heavy starts: a
missing one fails in seconds with one line naming the fix (``ciea_model.hub``)."""

from __future__ import annotations

import json
import socket
import time

import pytest
from huggingface_hub import constants

from ciea_model.config import CIEAConfig, TextTowerConfig, VisionTowerConfig
from ciea_model.hub import ModelUnavailableError, locate, locate_models
from ciea_model.presets import paper_config


def _folder(tmp_path, name, files):
    d = tmp_path / name
    d.mkdir()
    for f in files:
        (d / f).write_text("{}")
    return d


def test_a_folder_written_by_save_pretrained_is_found(tmp_path):
    from transformers import T5Config

    d = tmp_path / "t5"
    T5Config(d_model=8, d_ff=16, num_layers=1, num_heads=1, d_kv=8).save_pretrained(d)
    assert locate(str(d), "text tower").where == "folder"


def test_missing_folder_and_folder_without_config_name_the_fix(tmp_path):
    with pytest.raises(ModelUnavailableError, match="no such folder; point it to a folder written by save_pretrained"):
        locate(str(tmp_path / "nope"), "text tower")
    empty = _folder(tmp_path, "empty", [])
    with pytest.raises(ModelUnavailableError, match="has none of config.json") as err:
        locate(str(empty), "vision tower")
    assert "\n" not in str(err.value)


def test_uncached_hub_name_offline_fails_at_once(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    t0 = time.monotonic()
    with pytest.raises(ModelUnavailableError) as err:
        locate_models(paper_config("ciea"))
    assert time.monotonic() - t0 < 2
    msg = str(err.value)
    assert "'OpenMatch/t5-ance'" in msg and "HF_HUB_OFFLINE=1" in msg and "local folder" in msg
    assert "\n" not in msg


def test_unreachable_hub_fails_in_seconds_without_retries(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(ModelUnavailableError, match="hub is unreachable .*HF_HUB_OFFLINE=1"):
        locate("openai/clip-vit-base-patch32", "vision tower", timeout=2)
    assert time.monotonic() - t0 < 5


def test_a_cached_hub_name_is_found_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "cache"
    repo = cache / "models--OpenMatch--t5-ance"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    (repo / "snapshots" / "abc123" / "tokenizer_config.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    found = locate_models(CIEAConfig(variant="text-only", text=TextTowerConfig(name_or_path="OpenMatch/t5-ance")))
    assert [(f.what, f.where) for f in found] == [("text tower", "cache"), ("tokenizer", "cache")]


def test_every_named_part_is_checked(tmp_path):
    text = _folder(tmp_path, "lm", ["config.json"])
    tok = _folder(tmp_path, "tok", ["tokenizer.json"])
    config = CIEAConfig(variant="ciea", text=TextTowerConfig(name_or_path=str(text), tokenizer=str(tok)),
                        vision=VisionTowerConfig(name_or_path=str(tmp_path / "clip-missing")))
    with pytest.raises(ModelUnavailableError, match="vision tower .*clip-missing"):
        locate_models(config)
    # A text-only variant never loads the vision tower, so it is not asked for.
    found = locate_models(config.replace(variant="text-only"))
    assert [f.what for f in found] == ["text tower", "tokenizer"]
