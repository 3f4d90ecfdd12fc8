"""``ciea demo``: the whole ciea pipeline on the embedded synthetic corpus, on one machine,
exactly as a data team runs it on a cluster — every stage is the real job, run on the typed
config the job would parse (the command a user would type for it is printed first), all
sharing one local Ray:

1. ``ciea ingest``  — generate the corpus and merge it into Delta Lake with Ray Data;
2. pretrain the stand-in "CLIP" vision tower once (cached; no pretrained CLIP installs offline);
3. ``ciea pretrain-vision`` — MARVEL's visual pretraining (stage 0) on the corpus's image
   documents and captions, once; every variant with a projector starts from it, as the
   release does;
4. ``ciea train`` (Ray Train, 2 workers) → ``ciea mine-negatives`` → ``ciea train --stage 2``,
   for CIEA and each baseline, keeping whichever stage scored best on dev;
5. ``ciea embed``   — a Ray Data actor pool encodes the corpus into one LanceDB table per
   variant, indexed and tagged ``published``;
6. ``ciea evaluate`` — CIEA vs the baselines and BM25 on the test split (JSON, Markdown, PNG);
7. three example queries with their top results, one composed query (a picture + "but in
   blue") when the corpus has them, and how to open the search page.

Each stage is idempotent (ingest merges, train resumes by run name, embed skips what the
table holds), so a re-run after an interruption picks up where it stopped.

Examples::

    ciea demo                                    # the `make demo` run (~10 min on 2 cores)
    ciea demo --preset tiny                      # a minute; what the tests run
    ciea demo --variants ciea,text-only          # fewer baselines
    ciea demo --set corpus.num_image_docs=2000 --output-dir runs/demo-big
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from . import compare
from .common import (
    RaySettings,
    deep_merge,
    job_logging,
    job_overrides,
    job_parser,
    load_config,
    move_legacy_keys,
    parse_job_config,
    start_ray,
    write_json,
)

logger = logging.getLogger("ciea.demo")


class TrainStages(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stage0_epochs: int = Field(2, ge=0, description="MARVEL's visual pretraining (`ciea pretrain-vision`) epochs, once, "
                                                   "before every variant with a projector; 0 skips it")
    stage1_epochs: int = Field(5, ge=1, description="stage 1 (in-batch negatives) epochs: dev MRR@10 flattens after 4–5 "
                                                   "(BENCHMARKS.md, the recipe ablation); 2 shows where training starts")
    stage2_epochs: int = Field(3, ge=0, description="stage 2 (mined hard negatives) epochs; 0 skips mining and stage 2")
    workers: int = Field(2, ge=1, description="Ray Train workers (DDP)")
    set: list[str] = Field(default_factory=list, description="extra `ciea train --set` overrides for every run")


class DemoConfig(BaseModel):
    """The whole pipeline demo, validated before anything runs."""

    model_config = ConfigDict(extra="forbid")
    preset: Literal["demo", "tiny"] = Field("demo", description="model size (`ciea train` preset)")
    variants: list[compare.Variant] = Field(
        default_factory=lambda: ["ciea", "text-only", "marvel"], min_length=1,
        description="trained and embedded variants; BM25 (the CIEA table's full-text index) is always scored too")
    seed: int = Field(1234, description="training seed")
    corpus: compare.CorpusSettings = Field(default_factory=compare.CorpusSettings)
    vision_pretrain: compare.VisionPretrainSettings = Field(default_factory=compare.VisionPretrainSettings)
    train: TrainStages = Field(default_factory=TrainStages)
    examples: int = Field(3, ge=0, le=20, description="example queries printed with their top results")
    output_dir: str = Field("runs/demo", description="everything goes under here: data/, train/, lancedb/, eval/")
    ray: RaySettings = Field(default_factory=RaySettings, description="the one Ray every stage shares "
                                                                      "(ray.num_cpus: also the old num_cpus)")
    progress: bool = Field(True, description="progress bars")

    _unique = field_validator("variants")(compare.distinct_variants)

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        return move_legacy_keys(data, {"num_cpus": "ray.num_cpus"})

    @model_validator(mode="after")
    def _check(self) -> DemoConfig:
        if "ciea" not in self.variants:
            raise ValueError(f"variants {self.variants} must include ciea: the demo compares it with the baselines")
        compare.check_vision_seed(self.vision_pretrain, self.corpus)
        if self.preset == "tiny" and self.vision_pretrain.pairs:
            raise ValueError("the tiny preset trains its tokenizer per run, so it cannot share a pretrained "
                             "vision tower: set vision_pretrain.pairs=0")
        if self.ray.num_cpus is not None and self.ray.num_cpus < 2:
            raise ValueError(f"ray.num_cpus={self.ray.num_cpus}: the demo's Ray Train stage needs >= 2 CPUs")
        return self


PRESETS: dict[str, dict[str, Any]] = {
    # Composed queries (a document's picture + a change its caption does not name) train
    # beside the others and one is printed at the end; `--set 'corpus.num_composed=[0,0,0]'`
    # leaves them out (the corpus's other documents and queries stay exactly the same).
    "demo": {"corpus": {"num_composed": (300, 50, 100)}},
    "tiny": {
        "preset": "tiny",
        "variants": ["ciea", "text-only"],
        "corpus": {"num_image_docs": 120, "num_text_docs": 40, "num_queries": (96, 24, 40), "num_composed": (32, 8, 12)},
        "vision_pretrain": {"pairs": 0},
        "train": {"stage0_epochs": 1, "stage1_epochs": 4, "stage2_epochs": 1},
        "output_dir": "runs/demo-tiny",
    },
}

PROG = "ciea demo"
FLAGS = {"output_dir": "output_dir"}


def _parser() -> argparse.ArgumentParser:
    p = job_parser(PROG, __doc__, DemoConfig, presets=PRESETS, default_preset="demo", ray=True,
                   progress="no progress bars", set_example="train.stage2_epochs=0")
    p.add_argument("--variants", help="comma-separated: ciea plus any of text-only, marvel, univl-dr, ciea-no-cie, ciea-no-comp")
    p.add_argument("--output-dir", help="output directory (default runs/demo)")
    return p


def parse_config(argv: list[str] | None) -> tuple[DemoConfig, argparse.Namespace]:
    """The command line → the validated config (nothing run yet); exits with the errors."""
    args = _parser().parse_args(argv)
    overrides = job_overrides(args, FLAGS, extra=[f"variants=[{args.variants}]"] if args.variants else [])
    return parse_job_config(PROG, DemoConfig, args, overrides, presets=PRESETS), args


# ---------------------------------------------------------------------------------------
# The stages: each a job's typed config, run by the job itself
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobCall:
    """One stage: the job's typed config, the job's ``execute``, and the command a user
    would type for the same config (``ciea <command> <args>``)."""

    command: str
    config: Any
    args: list[str]
    execute: Callable[[Any], int]


class Stage:
    """Prints each stage's command line (what a user would type), runs it and times it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, label: str, call: JobCall) -> None:
        print(f"\n── {label}\n$ ciea {call.command} {shlex.join(call.args)}", flush=True)
        t0 = time.perf_counter()
        rc = call.execute(call.config)
        self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t0
        if rc != 0:
            raise SystemExit(f"ciea demo: stage {label!r} failed (exit {rc}); fix it and re-run `ciea demo` — "
                             "finished stages are not repeated")


def _typed(model: type[BaseModel], values: dict[str, Any], base: dict[str, Any] | None = None,
           sets: list[str] | None = None) -> Any:
    """A job's config from its preset ``base``, the demo's ``values`` and ``--set`` pairs
    (exits listing every error, as the job itself would)."""
    return load_config(model, None, list(sets or []), deep_merge(base or {}, values))


def ingest_call(cfg: DemoConfig, data: Path) -> JobCall:
    from . import ingest

    c = cfg.corpus
    synthetic = c.model_dump(include={"seed", "num_image_docs", "num_text_docs", "num_queries", "image_size",
                                      "num_collections", "p_caption_states", "complementary_fraction",
                                      "text_query_fraction", "num_composed"})
    job = _typed(ingest.IngestJobConfig, {
        "source": {"kind": "synthetic", "synthetic": synthetic},
        "output": {"root": str(data), "run_dir": str(data.parent / "ingest")}, "progress": cfg.progress,
    }, ingest.PRESETS["default"])
    return JobCall("ingest", job, ingest.command(job, always=("source.kind",)), ingest.execute)


def train_call(cfg: DemoConfig, variant: str, data: Path, runs: Path, stage: int, vision: Path | None,
               init_from: str | None = None, negatives: Path | None = None, tokenizer: str | None = None) -> JobCall:
    from . import train

    model: dict[str, Any] = {"variant": variant}
    if vision is not None:
        model["vision_state"] = str(vision)
        if variant != "univl-dr":  # UniVL-DR fine-tunes its CLIP (and its random-init projection), as `ciea compare` does
            model["freeze_vision"] = cfg.vision_pretrain.freeze
    if tokenizer:
        model["tokenizer"] = tokenizer
    epochs = {0: cfg.train.stage0_epochs, 1: cfg.train.stage1_epochs, 2: cfg.train.stage2_epochs}[stage]
    steps: dict[str, Any] = {"stage": stage, "epochs": epochs, "seed": cfg.seed}
    if init_from:
        steps["init_from"] = init_from
    if negatives is not None:
        steps["negatives"] = str(negatives)
    if stage == 0:
        from . import pretrain_vision

        job = _typed(train.TrainJobConfig, {
            "data": {"root": str(data)}, "model": model, "train": steps, "scaling": {"num_workers": cfg.train.workers},
            "run": {"storage_path": str(runs), "name": "pretrain-vision", "progress": cfg.progress},
        }, pretrain_vision.PRESETS[cfg.preset], cfg.train.set)
        return JobCall("pretrain-vision", job, pretrain_vision.command(job), pretrain_vision.execute)
    job = _typed(train.TrainJobConfig, {
        "data": {"root": str(data)}, "model": model, "train": steps, "scaling": {"num_workers": cfg.train.workers},
        "run": {"storage_path": str(runs), "name": f"{variant}-s{stage}", "progress": cfg.progress},
    }, train.PRESETS[cfg.preset], cfg.train.set)
    return JobCall("train", job, train.command(job, always=("model.variant", "train.stage")), train.execute)


def mine_call(cfg: DemoConfig, checkpoint: str, data: Path, negatives: Path) -> JobCall:
    from . import mine_negatives

    job = _typed(mine_negatives.MineJobConfig, {"checkpoint": checkpoint, "root": str(data), "output": str(negatives),
                                             "cpus_per_actor": 0.5, "progress": cfg.progress})
    return JobCall("mine-negatives", job, mine_negatives.command(job, always=("root",)), mine_negatives.execute)


def embed_call(cfg: DemoConfig, variant: str, model_dir: str, data: Path, db: Path, out: Path) -> JobCall:
    from . import embed

    job = _typed(embed.EmbedJobConfig, {
        "input": {"root": str(data)}, "model": {"checkpoint": model_dir},
        "output": {"db": str(db), "table": table_name(variant), "run_dir": str(out / "embed" / variant)},
        "progress": cfg.progress})
    return JobCall("embed", job, embed.command(job), embed.execute)


def evaluate_call(cfg: DemoConfig, data: Path, db: Path, out: Path) -> JobCall:
    from . import evaluate

    variants = [{"name": v, "table": f"{db}/{table_name(v)}", "mode": "vector"} for v in cfg.variants]
    variants.append({"name": "bm25", "table": f"{db}/{table_name('ciea')}", "mode": "fts"})
    job = _typed(evaluate.EvaluateConfig, {"input": {"root": str(data), "split": "test"},
                                           "output": {"out": str(out / "eval")}, "variants": variants,
                                           "progress": cfg.progress})
    return JobCall("evaluate", job, evaluate.command(job, always=("input.split",)), evaluate.execute)


def _summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def _best_dev(summary: dict[str, Any]) -> float:
    return float((summary.get("final_metrics") or {}).get("best_dev_mrr10") or float("-inf"))


#: Variants without a projector: they do not start from the visual pretraining.
NO_PROJECTOR = ("text-only", "univl-dr")


def visual_pretraining(cfg: DemoConfig, data: Path, runs: Path, vision: Path | None, stages: Stage) -> str | None:
    """``ciea pretrain-vision`` once (stage 0, as CIEA variant), or ``None`` when no variant
    has a projector or ``train.stage0_epochs`` is 0. Returns its model folder."""
    if not cfg.train.stage0_epochs or all(v in NO_PROJECTOR for v in cfg.variants):
        return None
    stages.run("pretrain the visual module (stage 0)", train_call(cfg, "ciea", data, runs, 0, vision))
    return _summary(runs / "pretrain-vision")["model_dir"]


def train_variant(cfg: DemoConfig, variant: str, data: Path, runs: Path, vision: Path | None,
                  stages: Stage, stage0: str | None = None) -> dict[str, Any]:
    """(From the stage-0 model, for a variant with a projector) stage 1 → mine → stage 2
    through the real jobs; returns the better stage's summary (the method keeps whichever
    stage scored best on dev)."""
    start = stage0 if variant not in NO_PROJECTOR else None
    # The tiny preset's tokenizer is trained per run: a variant starting from stage 0 uses its own.
    tokenizer = str(Path(start) / "tokenizer") if start and cfg.preset == "tiny" else None
    stages.run(f"train {variant} (stage 1)", train_call(cfg, variant, data, runs, 1, vision, start, tokenizer=tokenizer))
    s1 = _summary(runs / f"{variant}-s1")
    best = {**s1, "stage": 1}
    if not cfg.train.stage2_epochs:
        return best
    negatives = runs / f"{variant}-negatives"
    if not (negatives / "_delta_log").is_dir() or _mined_by(negatives) != s1["model_id"]:
        stages.run(f"mine negatives for {variant}", mine_call(cfg, s1["model_dir"], data, negatives))
    tokenizer = str(Path(s1["model_dir"]) / "tokenizer") if cfg.preset == "tiny" else None
    stages.run(f"train {variant} (stage 2)",
               train_call(cfg, variant, data, runs, 2, vision, s1["model_dir"], negatives, tokenizer))
    s2 = _summary(runs / f"{variant}-s2")
    if _best_dev(s2) >= _best_dev(s1):
        best = {**s2, "stage": 2}
    return best


def _mined_by(negatives: Path) -> str | None:
    summary = Path(f"{negatives}_summary.json")
    return json.loads(summary.read_text()).get("model_id") if summary.is_file() else None


def table_name(variant: str) -> str:
    return variant.replace("-", "_")


def print_examples(cfg: DemoConfig, data: Path, db: Path) -> list[dict[str, Any]]:
    """Image queries (what only the pixels show) with CIEA's top 3 and where text-only
    ranks the answer — what the page shows, in the terminal. Picks the queries where CIEA
    gains most over text-only (ties: split order), so the examples show the difference."""
    from pipelines.query.evaluation import load_split
    from pipelines.query.search import Searcher
    from pipelines.store.delta_tables import Tables

    queries, qrels = load_split(Tables(str(data)), "test")
    image = [q for q in queries if q.get("kind") == "image"]
    if not image or not cfg.examples:
        return []

    def first_relevant(hits, q) -> int | None:
        relevant = set(qrels.get(q["qid"], {}))
        return next((h.rank for h in hits if h.doc_id in relevant), None)

    texts = [q["query"] for q in image]
    ciea = Searcher.open(str(db), table_name("ciea")).search_batch(texts, k=10)
    other = (Searcher.open(str(db), table_name("text-only")).search_batch(texts, k=10)
             if "text-only" in cfg.variants else [[] for _ in image])
    ranks = [(first_relevant(c, q), first_relevant(o, q)) for q, c, o in zip(image, ciea, other)]
    gain = [(o or 11) - (c or 11) for c, o in ranks]
    picked = sorted(range(len(image)), key=lambda i: -gain[i])[: cfg.examples]
    print("\nExample image queries (the relevant documents' captions do not state what the query asks; "
          "✓ = relevant):")
    shown = []
    for i in picked:
        q, hits = image[i], ciea[i]
        relevant = set(qrels.get(q["qid"], {}))
        print(f"\n  “{q['query']}”")
        for h in hits[:3]:
            mark = "✓" if h.doc_id in relevant else " "
            print(f"    {mark} {h.rank:>2}. {h.score:6.3f}  {h.doc_id:<14} {(h.caption or h.text or '')[:72]}")
        c, o = ranks[i]
        where = {"ciea": c, **({"text-only": o} if "text-only" in cfg.variants else {})}
        print("    first relevant: " + ", ".join(f"{v} at {r if r else '>10'}" for v, r in where.items()))
        shown.append({"qid": q["qid"], "query": q["query"], "top": [h.doc_id for h in hits[:3]], "first_relevant": where})
    return shown


def print_composed_example(cfg: DemoConfig, data: Path, db: Path) -> dict[str, Any] | None:
    """One composed query of the test split (a document's picture + a change its caption does
    not name) with CIEA's top 3, and where the picture alone and late fusion (the normalised
    sum of the picture's and the text's vectors) rank the first relevant document. Picks the
    query where CIEA gains most over late fusion (ties: split order). ``None`` when the
    corpus has no composed test query (``corpus.num_composed``)."""
    from pipelines.query.evaluation import composed_search_runs, load_split
    from pipelines.query.search import Searcher
    from pipelines.store.delta_tables import Tables

    if not cfg.corpus.num_composed[2] or not cfg.examples:
        return None
    queries, qrels = load_split(Tables(str(data)), "test")
    composed = [q for q in queries if q.get("kind") == "composed" and q.get("image") is not None]
    if not composed:
        return None
    searcher = Searcher.open(str(db), table_name("ciea"))
    runs = composed_search_runs(searcher, composed, k=10)

    def first_relevant(encoding: str, q: dict[str, Any]) -> int | None:
        relevant = set(qrels.get(q["qid"], {}))
        ranked = list(runs[encoding][q["qid"]])
        return next((i + 1 for i, d in enumerate(ranked) if d in relevant), None)

    ranks = [{e: first_relevant(e, q) for e in ("model", "late-fusion", "image-only")} for q in composed]
    best = min(range(len(composed)), key=lambda i: ((ranks[i]["model"] or 11) - (ranks[i]["late-fusion"] or 11), i))
    q, where = composed[best], ranks[best]
    relevant = set(qrels.get(q["qid"], {}))
    hits = searcher.search_pictures([q["image"]], [q["query"]], k=3)[0]
    reference = (q.get("metadata") or {}).get("reference_doc_id") or "?"
    print(f"\nA composed query (the picture of {reference} + a change its caption does not name; ✓ = relevant):")
    print(f"\n  [picture of {reference}] “{q['query']}”")
    for h in hits:
        mark = "✓" if h.doc_id in relevant else " "
        print(f"    {mark} {h.rank:>2}. {h.score:6.3f}  {h.doc_id:<14} {(h.caption or h.text or '')[:72]}")
    names = {"model": "ciea", "late-fusion": "late fusion", "image-only": "the picture alone"}
    print("    first relevant: " + ", ".join(f"{names[e]} at {r if r else '>10'}" for e, r in where.items()))
    return {"qid": q["qid"], "query": q["query"], "reference_doc_id": reference, "top": [h.doc_id for h in hits],
            "first_relevant": {names[e]: r for e, r in where.items()}}


def pretrain_vision(cfg: DemoConfig, out: Path, stages: Stage) -> Path | None:
    """The stand-in CLIP vision tower, pretrained once and cached (``None``: not pretrained)."""
    if not cfg.vision_pretrain.pairs:
        return None
    t0 = time.perf_counter()
    print("\n── pretrain the stand-in CLIP vision tower (once; cached)", flush=True)
    vision = compare.pretrained_vision_path(
        compare.DemoConfig(preset=cfg.preset, corpus=cfg.corpus, vision_pretrain=cfg.vision_pretrain),
        out / "tokenizer", out, progress=cfg.progress)
    stages.seconds["pretrain vision"] = time.perf_counter() - t0
    return vision


def execute(cfg: DemoConfig) -> int:
    """Runs every stage on a parsed config and prints where to go next. Returns the exit code."""
    out = Path(cfg.output_dir).resolve()
    data, runs, db = out / "data", out / "train", out / "lancedb"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "demo_config.json", cfg.model_dump(mode="json"))
    t_start = time.perf_counter()
    stages = Stage()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start_ray(cfg.ray, log_to_driver=False, progress=cfg.progress)
    stages.run("ingest the corpus into Delta", ingest_call(cfg, data))
    vision = pretrain_vision(cfg, out, stages)
    stage0 = visual_pretraining(cfg, data, runs, vision, stages)
    trained = {v: train_variant(cfg, v, data, runs, vision, stages, stage0) for v in cfg.variants}
    for variant, summary in trained.items():
        stages.run(f"embed with {variant}", embed_call(cfg, variant, summary["model_dir"], data, db, out))
    stages.run("evaluate on the test split", evaluate_call(cfg, data, db, out))
    examples = print_examples(cfg, data, db)
    composed = print_composed_example(cfg, data, db)

    minutes = (time.perf_counter() - t_start) / 60
    write_json(out / "demo_summary.json", {
        "config": cfg.model_dump(mode="json"), "minutes": round(minutes, 2),
        "stages": [{"stage": k, "seconds": round(v, 1)} for k, v in stages.seconds.items()],  # in run order
        "models": {v: {"model_dir": s["model_dir"], "model_id": s["model_id"], "stage": s["stage"],
                       "best_dev_mrr10": _best_dev(s)} for v, s in trained.items()},
        "examples": examples,
        "composed_example": composed,
    })
    print(f"\nDone in {minutes:.1f} min. Report: {out / 'eval' / 'report.md'} (charts beside it).")
    print(f"Search it:   ciea search \"a red circle\" --db {db} --table {table_name('ciea')}")
    print(f"Query it:    ciea sql \"SELECT modality, count(*) FROM {table_name('ciea')} GROUP BY 1\" --db {db}")
    print(f"Open the page: ciea serve --db {db} --table {table_name('ciea')}   → http://127.0.0.1:8000")
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv)
    job_logging(args.verbose)
    return execute(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
