"""Self-describing checkpoints: save → load round trips, content-hash model ids, version and
layout checks, and no pickle anywhere."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open

from ciea_model import load_checkpoint, model_id, save_checkpoint
from ciea_model.checkpoint import FORMAT_VERSION, MANIFEST, TOKENIZER_DIR, WEIGHTS, read_manifest

QUERIES = ["a red circle", "find two blue squares in the garden collection"]



def _encode(model, processor, documents):
    model.eval()
    with torch.no_grad():
        q = model.encode_query(**processor.tokenize(QUERIES))
        d = model.encode_documents(processor.collate_documents(documents))
        img = [x for x in documents if x.modality == "image"]
        io = (
            model.encode_image_only(processor.collate_documents(img).image)
            if model.config.uses_images else None
        )
    return q, d, io


@pytest.mark.parametrize(
    ("variant", "family"),
    [("ciea", "t5"), ("ciea", "bert"), ("univl-dr", "t5"), ("text-only", "bert")],
)
def test_round_trip_gives_identical_outputs_and_model_id(variant, family, make_model, documents, tmp_path):
    model, processor = make_model(variant, family=family, seed=3)
    mid = save_checkpoint(model, processor, tmp_path / "ckpt", metadata={"step": 7})
    assert isinstance(mid, str) and len(mid) == 16
    assert mid == model_id(model)
    loaded, loaded_proc = load_checkpoint(tmp_path / "ckpt")
    assert not loaded.training
    assert model_id(loaded) == mid
    assert loaded.config.variant == variant
    assert len(loaded_proc) == len(processor)
    # Every parameter and buffer comes back bit for bit.
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for name, tensor in state.items():
        assert torch.equal(tensor, loaded_state[name]), name
    for a, b in zip(
        _encode(model, processor, documents), _encode(loaded, loaded_proc, documents), strict=True
    ):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    manifest = read_manifest(tmp_path / "ckpt")
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["model_id"] == mid
    assert manifest["metadata"] == {"step": 7}


def test_model_id_is_a_content_hash(make_model, tmp_path):
    a, _ = make_model("ciea", seed=0)
    b, _ = make_model("ciea", seed=0)
    c, _ = make_model("ciea", seed=1)
    assert model_id(a) == model_id(b)  # same config, same weights, built separately
    assert model_id(a) != model_id(c)
    before = model_id(a)
    with torch.no_grad():
        a.extractor.ffn[0].weight[0, 0] += 1e-3  # one weight changes
    assert model_id(a) != before
    with torch.no_grad():
        a.extractor.ffn[0].weight[0, 0] -= 1e-3
        b.logit_scale += 0.5  # a 0-d parameter counts too
    assert model_id(a) == before != model_id(b)
    # The config counts: same weights, different λ.
    d, _ = make_model("ciea", seed=0, comp_weight=0.2)
    assert model_id(d) != before


def test_future_format_version_is_refused(make_model, tmp_path):
    model, processor = make_model("ciea")
    save_checkpoint(model, processor, tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"format_version={FORMAT_VERSION + 1}.*upgrade ciea"):
        load_checkpoint(tmp_path)
    manifest["format_version"] = "1"  # not an int either
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="upgrade"):
        read_manifest(tmp_path)


def test_directory_without_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no ciea_checkpoint\.json.*save_checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a ciea checkpoint"):
        read_manifest(tmp_path / "missing")


def test_weights_are_safetensors_not_pickle(make_model, tmp_path):
    model, processor = make_model("ciea", family="t5")
    save_checkpoint(model, processor, tmp_path)
    files = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert MANIFEST in files and WEIGHTS in files
    assert any(f.startswith(TOKENIZER_DIR + "/") for f in files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    raw = (tmp_path / WEIGHTS).read_bytes()
    assert not raw.startswith(b"\x80")  # pickle protocol marker
    (header_len,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 header size, JSON header
    header = json.loads(raw[8 : 8 + header_len])
    with safe_open(str(tmp_path / WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
        assert keys == set(header) - {"__metadata__"}
        assert torch.equal(f.get_tensor("logit_scale"), model.logit_scale.detach())
    # Tied weights (T5's shared / encoder / decoder embeddings) are stored once; every
    # stored tensor is a real parameter or buffer of the model.
    assert keys <= set(model.state_dict())
    assert any(k.startswith("text.model.") for k in keys) and "projector.weight" in keys


def test_a_config_key_added_later_keeps_old_model_ids(make_model):
    """model_id hashes the config without the keys added since checkpoints were first
    written while they hold their original behaviour: a checkpoint saved before
    ``image_only_frame`` and ``text.projection_dim`` existed keeps its id (its manifest still
    matches its weights); a model that uses a new value gets a new id."""
    import hashlib
    import json

    from ciea_model.checkpoint import LATER_CONFIG_KEYS, _resolved_config, identity_config, model_id

    model, _ = make_model("ciea", seed=5)
    config = _resolved_config(model).to_dict()
    assert config["image_only_frame"] is True and config["text"]["projection_dim"] is None
    before = json.loads(json.dumps(config))
    del before["image_only_frame"], before["text"]["projection_dim"]  # as saved before the keys existed
    h = hashlib.sha256(json.dumps(before, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    assert model_id(model) == h.hexdigest()[:16]
    assert identity_config(config) == before and len(LATER_CONFIG_KEYS) == 2
    bare, _ = make_model("ciea", seed=5, image_only_frame=False)
    assert model_id(bare) != model_id(model)  # same weights, another input: another model
