"""Which switch of the release's training path slows CIEA's start: an ablation over each
switch at a short and a long budget, several seeds, image queries reported apart.

Every arm is ``ciea compare``'s own in-process training (``pipelines.train.compare``: the
same corpus, the same frozen pretrained vision tower, the step the Ray workers take), stage 1
only, CIEA (and ``marvel`` as the reference that none of the switches touches). An arm turns
switches of today's path back to what the project did before the release's path landed
(2026-12-06):

- ``release``: today's defaults (extractor output dropout 0.05, ``q_comp`` without any
  image positive's caption tokens);
- ``no-output-dropout``: ``extractor_output_dropout=0``;
- ``trained-captions``: ``train.comp_captions=trained`` (``q_comp`` against the trained
  positive's caption only);
- ``before``: both turned back.

The two switches not ablated are idle on a CPU: ``w`` and the masked logits in float32
(autocast runs on CUDA only, so ``w`` is float32 either way) and the sparse token-embedding
gradients (the optimiser sees the same dense gradient; ``tests/unit/test_model_training.py``
checks the weights match). Each budget is its own run (the cosine schedule ends with it):
``--budgets 2,6`` trains 2 epochs (the demo's, patience 3) and 6 epochs (patience 6).

    python -m bench.recipe_ablation                                  # 4 arms × 2 budgets × 3 seeds
    python -m bench.recipe_ablation --arms release,before --seeds 1234 --budgets 2
    python -m bench.recipe_ablation --jobs 2                         # two runs side by side

Writes ``<out>/runs.json`` (every run: test metrics, steps, the dev curve, CPU seconds),
``<out>/table.md`` (mean ± std per arm and budget) and ``<out>/dev_curves.png``. CPU time
is the run's own process CPU (one torch thread per run), so runs side by side do not skew it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ARMS: dict[str, dict[str, Any]] = {
    "release": {},
    "no-output-dropout": {"extractor_output_dropout": 0.0},
    "trained-captions": {"comp_captions": "trained"},
    "before": {"extractor_output_dropout": 0.0, "comp_captions": "trained"},
}
#: patience per budget (epochs): the demo's 3 at its 2 epochs; 6 at the long budget.
PATIENCE = {2: 3}
METRICS = (("MRR@10", "all"), ("MRR@10", "image"), ("NDCG@10", "all"), ("NDCG@10", "image"))


def compare_config(arm: str, variant: str, seed: int, epochs: int, out: Path, preset: str):
    from pipelines.train.compare import CompareConfig

    switches = ARMS[arm]
    # stage 1 alone, from the raw projector, as measured on 2026-12-07 (before stage 0 was on by default)
    train = {"warmup_epochs": 0, "epochs": epochs, "stage2_epochs": 0, "patience": PATIENCE.get(epochs, 6)}
    if "comp_captions" in switches:
        train["comp_captions"] = switches["comp_captions"]
    extra = {k: v for k, v in switches.items() if k != "comp_captions"}
    return CompareConfig(preset=preset, variants=[variant], seeds=[seed], train=train, output_dir=str(out),
                         save_checkpoint=False, **extra)


_CORPUS: dict[str, Any] = {}


def run_one(task: dict[str, Any]) -> dict[str, Any]:
    """One (arm, variant, seed, budget) run in this process; returns its record."""
    import torch
    from safetensors.torch import load_file

    from jobs.compare import synthetic_corpus
    from pipelines.query.evaluation import evaluate
    from pipelines.train.compare import load_corpus, pretrained_vision_path, train_variant

    torch.set_num_threads(1)
    maker = synthetic_corpus()
    out = Path(task["out"])
    cfg = compare_config(task["arm"], task["variant"], task["seed"], task["epochs"], out / "cache", task["preset"])
    if "corpus" not in _CORPUS:
        _CORPUS["corpus"] = load_corpus(cfg, maker, out / "cache")
    corpus = _CORPUS["corpus"]
    vision = pretrained_vision_path(cfg, maker, corpus.tokenizer_dir, out / "cache", progress=False)
    c0, t0 = time.process_time(), time.perf_counter()
    model, processor, fits = train_variant(cfg, task["variant"], task["seed"], corpus,
                                           None if vision is None else load_file(vision))
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    report = evaluate(model, processor, corpus.documents, corpus.queries["test"])
    fit = fits[0]
    return {**task, "test": {f"{m}[{g}]": 100 * report.value(m, g) for m, g in METRICS},
            "steps": fit.steps, "best_step": fit.best_step, "best_dev": 100 * fit.best_score,
            "stopped_early": fit.stopped_early, "cpu_s": round(cpu, 1), "wall_s": round(wall, 1),
            "dev_curve": [(h["step"], 100 * h["dev"]) for h in fit.history if "dev" in h]}


def _cell(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"


def table(runs: list[dict[str, Any]]) -> str:
    """Mean ± std over seeds, one row per (budget, variant, arm)."""
    keys = [f"{m}[{g}]" for m, g in METRICS]
    lines = ["| budget | variant | arm | " + " | ".join(keys) + " | steps | best step | CPU s |",
             "|---|---|---|" + "---:|" * (len(keys) + 3)]
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["epochs"], r["variant"], r["arm"]), []).append(r)
    for (epochs, variant, arm), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], list(ARMS).index(kv[0][2]))):
        cells = [_cell([r["test"][k] for r in rs]) for k in keys]
        steps = "/".join(str(r["steps"]) for r in rs)
        best = "/".join(str(r["best_step"]) for r in rs)
        cpu = f"{statistics.fmean(r['cpu_s'] for r in rs):.0f}"
        lines.append(f"| {epochs} ep | {variant} | {arm} | " + " | ".join(cells) + f" | {steps} | {best} | {cpu} |")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Dev MRR@10 against steps, mean over seeds, one panel per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["epochs"] for r in runs})
    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4), squeeze=False)
    for ax, epochs in zip(axes[0], budgets):
        groups: dict[str, dict[int, list[float]]] = {}
        for r in runs:
            if r["epochs"] == epochs:
                curve = groups.setdefault(f"{r['variant']} {r['arm']}", {})
                for step, dev in r["dev_curve"]:
                    curve.setdefault(step, []).append(dev)
        for label, curve in groups.items():
            steps = sorted(curve)
            ax.plot(steps, [statistics.fmean(curve[s]) for s in steps], marker="o", ms=3, label=label)
        ax.set_title(f"stage 1, {epochs} epochs (mean over seeds)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("dev MRR@10 ×100")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--variants", default="ciea,marvel", help="marvel runs the release arm only (no switch reaches it)")
    p.add_argument("--seeds", default="1234,1235,1236")
    p.add_argument("--budgets", default="2,6", help="stage-1 epochs, one run each")
    p.add_argument("--preset", default="demo", choices=("demo", "tiny"))
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (one torch thread each)")
    p.add_argument("--out", default="bench/results/recipe")
    args = p.parse_args(argv)
    arms = args.arms.split(",")
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        p.error(f"unknown arm(s) {unknown}: pick from {', '.join(ARMS)}")
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [{"arm": arm, "variant": v, "seed": int(s), "epochs": int(b), "preset": args.preset, "out": str(out)}
             for b in args.budgets.split(",") for s in args.seeds.split(",") for v in args.variants.split(",")
             for arm in (arms if v == "ciea" else ["release"])]
    # The frozen vision tower, pretrained once here so that the runs share its cache.
    from jobs.compare import synthetic_corpus
    from pipelines.train.compare import load_corpus, pretrained_vision_path

    cfg = compare_config("release", "ciea", 0, 2, out / "cache", args.preset)
    maker = synthetic_corpus()
    pretrained_vision_path(cfg, maker, load_corpus(cfg, maker, out / "cache").tokenizer_dir, out / "cache",
                           progress=False)
    runs: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for r in pool.map(run_one, tasks):
            runs.append(r)
            print(f"[{time.perf_counter() - t0:6.0f}s] {r['epochs']} ep {r['variant']:<7} {r['arm']:<18} seed {r['seed']}: "
                  f"MRR@10 {r['test']['MRR@10[all]']:.2f} image {r['test']['MRR@10[image]']:.2f} "
                  f"NDCG@10 {r['test']['NDCG@10[all]']:.2f}  steps {r['steps']} (best {r['best_step']}) "
                  f"{r['cpu_s']:.0f} CPU-s", flush=True)
            (out / "runs.json").write_text(json.dumps(runs, indent=1) + "\n")
    md = table(runs)
    (out / "table.md").write_text(md + "\n")
    plot(runs, out / "dev_curves.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
