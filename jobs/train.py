"""``ciea train``: train CIEA with Ray Train (TorchTrainer, data parallel) on the Delta
tables that ``ciea ingest`` writes, checkpointing to ``<storage_path>/<name>``.

Training pairs are built with Ray Data (queries + qrels + a hash join of the documents they
need; the corpus is never gathered in the driver) and sharded across workers. Negatives are
the global batch (candidates gathered from every worker with gradient); stage 2 adds one
image and one text hard negative per query mined by ``ciea mine-negatives``. Re-running the
same ``--name`` resumes from its latest checkpoint; a checkpoint written with a different
config is refused. Metrics go to ``metrics.jsonl`` beside the checkpoints, with a PNG curve.

The two stages (CIEA_METHOD.md)::

    ciea pretrain-vision --preset tiny --root data --name s0         # stage 0 (optional here)
    ciea train --preset tiny --root data --name s1                  # stage 1: in-batch
    ciea mine-negatives --checkpoint runs/train/s1/model --root data --output data/negatives/s1
    ciea train --preset tiny --root data --name s2 --stage 2 \\
        --set train.negatives=data/negatives/s1 --set train.init_from=runs/train/s1/model

Presets: ``tiny`` (random 2-layer T5 + CLIP, tests, seconds), ``demo`` (all-MiniLM + a small
CLIP, CPU, minutes), ``paper`` (T5-ANCE + frozen CLIP ViT-B/32, GPU, batch 64, lr 5e-6, fp32,
and every other default the authors' release has; docs/training.md lists the switches).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from pipelines.train import driver
from pipelines.train.config import TrainJobConfig

from .common import (
    STORAGE,
    RayCluster,
    RaySettings,
    command_args,
    job_logging,
    job_overrides,
    job_parser,
    parse_job_config,
    preset_defaults,
    start_ray,
)

logger = logging.getLogger("ciea.train")

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "preset": "tiny",
        # Measured on the synthetic test corpus (96 train queries): lr 3e-3 lifts dev MRR@10
        # from 0.11 to 0.19 in 8 epochs; 1e-3 barely moves it.
        "train": {"epochs": 8, "batch_size": 16, "eval_every": 6, "patience": 4, "lr": 3e-3,
                  "new_lr": 3e-3, "weight_decay": 0.2, "log_every": 6},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "threads_per_worker": 1},
        "run": {"max_failures": 2},
    },
    "demo": {
        "preset": "demo",
        # 5 epochs: where stage 1's dev MRR@10 flattens on the synthetic corpus (BENCHMARKS.md).
        "train": {"epochs": 5, "batch_size": 32, "eval_every": 32, "patience": 3, "lr": 5e-5,
                  "new_lr": 1e-3, "log_every": 10},
        "data": {"dev_pool": 2000},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "threads_per_worker": 1},
    },
    "paper": {
        # The release's recipe (docs/training.md, "The paper preset and the release"): AdamW
        # 5e-6, batch 64, ≤ 40 epochs, dev every 500 steps, the checkpoint kept by dev in-batch
        # accuracy, patience 10 in stage 1 and 5 in stage 2, λ = 0.1 in stage 1 and no L_comp in
        # stage 2, L_comp's image-only candidates from the plain projected patches, unframed
        # (MARVEL's encode_images_only), fp32,
        # frozen CLIP, and stage 1 started from MARVEL's visual pretraining (`ciea
        # pretrain-vision`). The project's preferences are the switches' other values.
        "preset": "paper",
        "model": {"comp_weight": 0.1, "image_only_extractor": False, "image_only_frame": False},
        "train": {"epochs": 40, "batch_size": 64, "eval_every": 500, "patience": 10, "stage2_patience": 5,
                  "lr": 5e-6, "checkpoint_every": 500, "select_by": "dev_in_batch_acc",
                  "comp_loss_in_stage2": False, "bf16": False, "visual_pretraining": "require"},
        "data": {"dev_pool": 100000},
        "scaling": {"num_workers": 1, "use_gpu": True, "cpus_per_worker": 4, "threads_per_worker": 4},
    },
}


PROG = "ciea train"
#: Flags of this job → config keys (the shared ones are in ``jobs/common.py``).
FLAGS = {"root": "data.root", "name": "run.name", "storage_path": "run.storage_path", "stage": "train.stage",
         "variant": "model.variant", "workers": "scaling.num_workers"}


def _parser() -> argparse.ArgumentParser:
    p = job_parser(PROG, __doc__, TrainJobConfig, presets=PRESETS, default_preset="tiny", storage=STORAGE,
                   progress="no progress bar (log lines only)", set_example="train.epochs=5")
    p.add_argument("--root", help="data root with corpus/, queries/, qrels/ (data.root)")
    p.add_argument("--name", help="run name (run.name); the same name resumes")
    p.add_argument("--storage-path", help="where checkpoints go (run.storage_path; local or s3://)")
    p.add_argument("--stage", type=int, choices=(0, 1, 2), help="train.stage (0: `ciea pretrain-vision`)")
    p.add_argument("--variant", help="model.variant")
    p.add_argument("--workers", type=int, help="scaling.num_workers")
    return p


def parse_config(argv: list[str] | None) -> tuple[TrainJobConfig, argparse.Namespace]:
    """The command line → the validated config (nothing opened yet); exits with the errors."""
    args = _parser().parse_args(argv)
    overrides = job_overrides(args, FLAGS, storage=STORAGE, progress_key="run.progress")
    return parse_job_config(PROG, TrainJobConfig, args, overrides, storage=STORAGE, presets=PRESETS), args


def command(cfg: TrainJobConfig, always: tuple[str, ...] = ()) -> list[str]:
    """The arguments of ``ciea train`` that give ``cfg`` (what ``ciea demo`` prints): the
    preset, then what differs from it (and the keys in ``always``)."""
    defaults = preset_defaults(TrainJobConfig, PRESETS, cfg.preset)
    return ["--preset", cfg.preset, *command_args(cfg, defaults, FLAGS, progress_key="run.progress", always=always)]


def _start_ray(cfg: TrainJobConfig) -> None:
    settings = RaySettings(num_cpus=cfg.run.num_cpus, temp_dir=cfg.run.ray_temp_dir)
    start_ray(settings, log_to_driver=cfg.run.progress, progress=cfg.run.progress)
    cluster = RayCluster(settings)
    if not cluster.remote:  # a cluster's autoscaler may still add what is missing
        driver.check_fits(cfg, cluster.resources())


def execute(cfg: TrainJobConfig) -> int:
    """Runs the job on a parsed config (what ``main`` does after parsing, and what
    ``ciea demo`` calls): :func:`pipelines.train.driver.run` (the models it names located
    before Ray starts), then the printed result. Returns the exit code."""
    try:
        summary = driver.run(cfg, start_ray=lambda: _start_ray(cfg))
    except driver.ModelUnavailable as e:
        raise SystemExit(f"{PROG}: {e}") from None
    except driver.SetupError as e:
        raise SystemExit(str(e)) from None
    except driver.TrainingFailed as e:
        raise SystemExit(f"{PROG}: {e}") from None
    final = summary.get("final_metrics") or {}
    print(f"\nrun {cfg.run.name}: stage {cfg.train.stage}, {final.get('step', '?')} steps, "
          f"best dev MRR@10 {final.get('best_dev_mrr10', float('nan')):.4f} "
          f"(initial {final.get('initial_dev_mrr10') or float('nan'):.4f})"
          + (f", kept by {final['select_by']} {abs(final.get('best', float('nan'))):.4f}"
             if final.get("select_by", "dev_mrr10") != "dev_mrr10" else "") + "\n"
          f"model: {summary.get('model_dir')}\nmetrics: {summary.get('metrics')}\ncurve: {summary.get('curve')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv)
    job_logging(args.verbose)
    return execute(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
