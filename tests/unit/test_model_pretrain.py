"""Image–text pretraining of the vision tower (ciea_model/pretrain.py): the offline
stand-in for a pretrained CLIP."""

from __future__ import annotations

import pytest
import torch

from ciea_model.config import CLIP_MEAN, CLIP_STD
from ciea_model.pretrain import PretrainConfig, pretrain_vision_tower
from ciea_model.processor import ImageTransform
from pipelines.ingest.sources.synthetic.generator import BACKGROUND_RGB, iter_image_text_pairs

BACKGROUNDS = tuple(BACKGROUND_RGB)


def _pairs(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images and locked text features that name only the background colour (one-hot),
    so the task is learnable in a few steps and ties are exactly same-colour pairs."""
    transform = ImageTransform(32, CLIP_MEAN, CLIP_STD)
    pixels, labels = [], []
    for image, text in iter_image_text_pairs(seed, n, 32):
        pixels.append(transform(image))
        labels.append(next(i for i, bg in enumerate(BACKGROUNDS) if f" {bg} " in f" {text} "))
    labels_t = torch.tensor(labels)
    return torch.stack(pixels), torch.eye(len(BACKGROUNDS))[labels_t], labels_t


@pytest.fixture(scope="module")
def data():
    return _pairs(1, 384), _pairs(2, 96)


def test_pretraining_teaches_the_tower_what_the_images_show(make_model, data):
    (px, feats, keys), heldout = data
    model, _ = make_model(trainable_vision=False, seed=0)
    before = {k: v.clone() for k, v in model.vision.state_dict().items()}
    result = pretrain_vision_tower(
        model.vision, px, feats, keys, PretrainConfig(epochs=6, batch_size=64, lr=3e-3, seed=0),
        heldout=heldout[:2],
    )
    assert len(result.losses) == 6 * (384 // 64)
    assert sum(result.losses[-6:]) / 6 < 0.7 * sum(result.losses[:6]) / 6
    assert result.heldout_top1 is not None and result.heldout_top1 > 0.6  # chance is 1/6
    after = model.vision.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # A frozen tower is trained here but leaves frozen and in eval mode.
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert not model.vision.training


def test_pretraining_is_deterministic_by_seed(make_model, data):
    (px, feats, keys), _ = data
    cfg = PretrainConfig(epochs=1, batch_size=64, seed=3)
    states = []
    for _ in range(2):
        model, _ = make_model(trainable_vision=True, seed=0)
        pretrain_vision_tower(model.vision, px[:128], feats[:128], keys[:128], cfg)
        assert all(p.requires_grad for p in model.vision.parameters())  # flags restored
        states.append(model.vision.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_pretraining_rejects_bad_input(make_model, data):
    (px, feats, keys), _ = data
    model, _ = make_model()
    with pytest.raises(ValueError, match="3 images but 2 text features"):
        pretrain_vision_tower(model.vision, px[:3], feats[:2])
    with pytest.raises(ValueError, match="batch_size=1"):
        PretrainConfig(batch_size=1)
    with pytest.raises(ValueError, match="lr"):
        PretrainConfig(lr=0)
