"""``ciea pretrain-vision``: MARVEL's visual pretraining, the stage CIEA's release starts from
(stage 0 of ``ciea train``), on Ray Train.

Every image document of ``corpus/documents`` with a caption is one example: the image alone
(``<im_start>`` + projected patches + ``<im_end>``, through the LM) against its own caption
(through the same LM), a symmetric in-batch contrastive loss over the global batch, with the
LM frozen. What learns is the visual module: the projector and, unless the preset freezes it,
the vision tower (MARVEL's release trains CLIP too; the demo keeps its stand-in frozen). The
run is an ordinary training run: Ray Data builds the rows, checkpoints resume by ``--name``,
dev queries score each evaluation, ``metrics.jsonl`` and a curve are written.

Stage 1 starts from it with ``--set train.init_from=<storage_path>/<name>/model`` (only the
vision tower and projector are taken, so any variant with a projector can start from one
run); the paper preset requires it, as the release does (``train.visual_pretraining``)::

    ciea pretrain-vision --preset paper --root data --name marvel-pretrain
    ciea train --preset paper --root data --name s1 \\
        --set train.init_from=runs/train/marvel-pretrain/model

Presets: ``paper`` is the release's ``pretrain/train.sh`` (AdamW 5e-6, batch 64, ≤ 20
epochs, dev every 500 steps, patience 5, LM frozen, CLIP trained); ``demo`` and ``tiny``
are CPU-sized (docs/training.md, "Stage 0").
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from pipelines.train.config import TrainJobConfig

from . import train as train_job
from .common import STORAGE, job_logging, job_overrides, job_parser, parse_job_config

logger = logging.getLogger("ciea.pretrain_vision")

PROG = "ciea pretrain-vision"


def _stage0(preset: dict[str, Any], **train: Any) -> dict[str, Any]:
    """``ciea train``'s preset turned into stage 0 (the run name and the settings given)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in preset.items()}
    out["train"] = {**out.get("train", {}), "stage": 0, **train}
    out["run"] = {"name": "pretrain-vision", **out.get("run", {})}
    return out


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _stage0(train_job.PRESETS["tiny"], epochs=2),
    # The demo's tower is the frozen stand-in for CLIP (`ciea demo`'s first step); the
    # projector starts random, hence its 1e-3; one pass over the corpus's images is where
    # the image–caption loss flattens (BENCHMARKS.md, "Stage 0").
    "demo": _stage0(train_job.PRESETS["demo"], epochs=2, batch_size=64, eval_every=32, patience=3),
    # MARVEL's pretrain/train.sh: --freeze_language_model --only_image_caption_contrastive_loss,
    # lr 5e-6, batch 64, 20 epochs, dev every 500 steps, early stop 5; CLIP is trained.
    "paper": _stage0(train_job.PRESETS["paper"], epochs=20, batch_size=64, eval_every=500, patience=5,
                     checkpoint_every=500),
}
PRESETS["paper"]["model"] = {**PRESETS["paper"].get("model", {}), "freeze_vision": False}


def _parser() -> argparse.ArgumentParser:
    p = job_parser(PROG, __doc__, TrainJobConfig, presets=PRESETS, default_preset="tiny", storage=STORAGE,
                   progress="no progress bar (log lines only)", set_example="train.epochs=1")
    p.add_argument("--root", help="data root with corpus/ and the dev split's queries/ and qrels/ (data.root)")
    p.add_argument("--name", help="run name (run.name); the same name resumes")
    p.add_argument("--storage-path", help="where checkpoints go (run.storage_path; local or s3://)")
    p.add_argument("--variant", help="model.variant (any with a projector: ciea, marvel, ciea-no-cie, ciea-no-comp)")
    p.add_argument("--workers", type=int, help="scaling.num_workers")
    return p


FLAGS = {k: v for k, v in train_job.FLAGS.items() if k != "stage"}


def parse_config(argv: list[str] | None) -> tuple[TrainJobConfig, argparse.Namespace]:
    """The command line → the validated stage-0 config; exits with the errors."""
    args = _parser().parse_args(argv)
    overrides = job_overrides(args, FLAGS, storage=STORAGE, progress_key="run.progress")
    cfg = parse_job_config(PROG, TrainJobConfig, args, overrides, storage=STORAGE, presets=PRESETS)
    if cfg.train.stage != 0:
        raise SystemExit(f"{PROG}: train.stage={cfg.train.stage} — this command is stage 0; "
                         "stages 1 and 2 are `ciea train`")
    return cfg, args


def command(cfg: TrainJobConfig, always: tuple[str, ...] = ()) -> list[str]:
    """The arguments of ``ciea pretrain-vision`` that give ``cfg`` (what ``ciea demo`` prints)."""
    from .common import command_args, preset_defaults

    defaults = preset_defaults(TrainJobConfig, PRESETS, cfg.preset)
    return ["--preset", cfg.preset, *command_args(cfg, defaults, FLAGS, progress_key="run.progress", always=always)]


#: Stage 0 runs through ``ciea train``'s driver and prints where its model is.
execute = train_job.execute


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv)
    job_logging(args.verbose)
    return execute(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
