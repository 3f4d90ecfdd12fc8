"""Model configs: bad values fail early with a message naming the value and the fix; JSON
round trips; the variant switches of CIEA_METHOD.md's baseline table."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from ciea_model import (
    VARIANTS,
    CIEAConfig,
    ConfigError,
    ExtractorConfig,
    TextTowerConfig,
    VisionTowerConfig,
    create_model_and_processor,
)
from ciea_model.config import POOLINGS

T5 = {"model_type": "t5", "d_model": 32}
CLIP_TEXT = {"model_type": "clip_text_model", "hidden_size": 32, "projection_dim": 16}


def _text(**kw) -> TextTowerConfig:
    return TextTowerConfig(**{"hf_config": dict(T5), "tokenizer": "/tok", **kw})


def _vision() -> VisionTowerConfig:
    return VisionTowerConfig(hf_config={"hidden_size": 32})


# --------------------------------------------------------------------------- bad values


def test_unknown_variant():
    with pytest.raises(ConfigError, match=r"variant='clip'.*not one of.*'ciea'.*pick one"):
        CIEAConfig("clip", text=_text(), vision=_vision())


def test_unknown_pooling():
    with pytest.raises(ConfigError, match=r"text\.pooling='max'.*not one of.*'auto'"):
        _text(pooling="max")


def test_negative_comp_weight():
    with pytest.raises(ConfigError, match=r"comp_weight=-0\.1 must be >= 0.*0\.1"):
        CIEAConfig(text=_text(), vision=_vision(), comp_weight=-0.1)


def test_hf_config_without_model_type():
    with pytest.raises(ConfigError, match=r"text\.hf_config=\{'d_model': 32\} has no 'model_type'.*add one"):
        TextTowerConfig(hf_config={"d_model": 32}, tokenizer="/tok")


def test_tower_without_weights_or_config():
    with pytest.raises(ConfigError, match=r"text\.name_or_path and text\.hf_config are both unset.*set name_or_path"):
        TextTowerConfig(tokenizer="/tok")
    with pytest.raises(ConfigError, match=r"vision\.name_or_path and vision\.hf_config are both unset"):
        VisionTowerConfig()


def test_random_init_without_tokenizer():
    with pytest.raises(ConfigError, match=r"text\.tokenizer is unset.*train_wordpiece_tokenizer"):
        TextTowerConfig(hf_config=dict(T5))
    # With a name_or_path the tokenizer is taken from there.
    assert TextTowerConfig(name_or_path="some/lm").tokenizer_path == "some/lm"
    assert _text().tokenizer_path == "/tok"


@pytest.mark.parametrize(
    ("build", "pattern"),
    [
        (lambda: _text(max_length=4), r"text\.max_length=4 is too small"),
        (lambda: _text(num_layers=0), r"text\.num_layers=0 must be None"),
        (lambda: VisionTowerConfig(hf_config={}, image_std=(1.0, 0.0, 1.0)), r"image_std=.*positive"),
        (lambda: VisionTowerConfig(hf_config={}, image_mean=(0.5, 0.5)), r"must have 3"),
        (lambda: ExtractorConfig(num_heads=0), r"extractor\.num_heads=0"),
        (lambda: ExtractorConfig(ffn_dim=0), r"extractor\.ffn_dim=0"),
        (lambda: ExtractorConfig(dropout=1.0), r"extractor\.dropout=1\.0 must be in \[0, 1\)"),
        (lambda: ExtractorConfig(mask_threshold=-1e-3), r"extractor\.mask_threshold"),
        (lambda: CIEAConfig(text=_text(), vision=_vision(), logit_scale_init=math.log(200.0)),
         r"logit_scale_init=.*above logit_scale_max=100"),
    ],
)
def test_other_bad_values(build, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build()


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_unknown_key_in_from_dict_lists_the_allowed_keys():
    good = CIEAConfig(text=_text(), vision=_vision()).to_dict()
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['varient'\].*allowed keys.*'variant'"):
        CIEAConfig.from_dict({**good, "varient": "ciea"})
    bad_text = {**good, "text": {**good["text"], "poolling": "cls"}}
    with pytest.raises(ConfigError, match=r"\['text\.poolling'\].*'text\.pooling'"):
        CIEAConfig.from_dict(bad_text)
    bad_extractor = {**good, "extractor": {**good["extractor"], "heads": 8}}
    with pytest.raises(ConfigError, match=r"\['extractor\.heads'\].*'extractor\.num_heads'"):
        CIEAConfig.from_dict(bad_extractor)


def test_extractor_heads_must_divide_the_lm_width(make_config):
    cfg = make_config("ciea")
    cfg = cfg.replace(extractor=ExtractorConfig(num_heads=5, ffn_dim=64))
    with pytest.raises(ValueError, match=r"num_heads=5 does not divide the LM width 32.*divisor"):
        create_model_and_processor(cfg, pretrained=False)
    # Variants without the extractor do not care.
    create_model_and_processor(cfg.replace(variant="marvel"), pretrained=False)


def test_decoder_step0_on_an_encoder_only_lm(make_config):
    cfg = make_config("text-only", family="bert", pooling="decoder_step0")
    with pytest.raises(ValueError, match=r"decoder_step0.*encoder-decoder.*'bert'.*'cls', 'mean' or 'last'"):
        create_model_and_processor(cfg, pretrained=False)


# --------------------------------------------------------------------------- serialisation


def _full_config(tokenizer_dir: str) -> CIEAConfig:
    return CIEAConfig(
        variant="ciea-no-cie",
        text=TextTowerConfig(
            hf_config={"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2},
            tokenizer=tokenizer_dir, pooling="mean", max_length=64, num_layers=1,
        ),
        vision=VisionTowerConfig(
            hf_config={"hidden_size": 32, "image_size": 32, "patch_size": 8},
            trainable=True, image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.25, 0.3),
        ),
        extractor=ExtractorConfig(num_heads=2, ffn_dim=16, dropout=0.1, mask_threshold=1e-4),
        comp_weight=0.3,
        logit_scale_init=math.log(20.0),
        logit_scale_max=50.0,
        image_only_extractor=False,
    )


def test_dict_and_json_round_trip(tmp_path):
    cfg = _full_config("/tok")
    assert CIEAConfig.from_dict(cfg.to_dict()) == cfg
    assert CIEAConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    cfg.save_json(tmp_path / "cfg.json")
    loaded = CIEAConfig.load_json(tmp_path / "cfg.json")
    assert loaded == cfg
    assert isinstance(loaded.vision.image_mean, tuple)
    assert json.loads((tmp_path / "cfg.json").read_text())["variant"] == "ciea-no-cie"
    # Defaults round-trip too (the paper's towers; nothing is loaded).
    default = CIEAConfig()
    assert CIEAConfig.from_dict(default.to_dict()) == default
    assert default.text.name_or_path == "OpenMatch/t5-ance"
    assert default.vision.name_or_path == "openai/clip-vit-base-patch32"


def test_configs_are_frozen():
    cfg = CIEAConfig(text=_text(), vision=_vision())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.variant = "marvel"  # type: ignore[misc]
    assert cfg.replace(variant="marvel").variant == "marvel" and cfg.variant == "ciea"
    with pytest.raises(ConfigError):
        cfg.replace(variant="nope")


def test_method_defaults():
    cfg = CIEAConfig()
    assert cfg.variant == "ciea" and cfg.comp_weight == 0.1
    assert cfg.logit_scale_init == pytest.approx(math.log(100.0)) and cfg.logit_scale_max == 100.0
    assert cfg.image_only_extractor is True
    assert cfg.extractor == ExtractorConfig(num_heads=8, ffn_dim=2048, dropout=0.05, mask_threshold=1e-5)
    assert cfg.text.max_length == 128 and cfg.text.pooling == "auto"
    assert cfg.vision.trainable is False
    assert "auto" in POOLINGS and "decoder_step0" in POOLINGS


# --------------------------------------------------------------------------- variant switches

# CIEA_METHOD.md "Baselines": (uses images, uses the extractor, dual encoder, λ used)
SWITCHES = {
    "ciea": (True, True, False, True),
    "text-only": (False, False, False, False),
    "marvel": (True, False, False, False),
    "ciea-no-cie": (True, False, False, True),
    "ciea-no-comp": (True, True, False, False),
    "univl-dr": (True, False, True, False),
}


def test_switch_table_covers_every_variant():
    assert set(SWITCHES) == set(VARIANTS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_switches(variant):
    # univl-dr's text tower is CLIP's text encoder, never an LM.
    text = _text(hf_config=dict(CLIP_TEXT)) if variant == "univl-dr" else _text()
    cfg = CIEAConfig(variant, text=text, vision=_vision(), comp_weight=0.25)
    images, extractor, dual, comp = SWITCHES[variant]
    assert cfg.uses_images is images
    assert cfg.uses_extractor is extractor
    assert cfg.is_dual_encoder is dual
    assert cfg.uses_projector is (images and not dual)
    assert cfg.effective_comp_weight == (0.25 if comp else 0.0)
