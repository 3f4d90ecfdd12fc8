"""``ciea mine-negatives``: hard negatives for stage 2, mined with a stage-1 checkpoint.

Embeds ``corpus/documents`` (Ray Data actor pool) and the queries of a split with the
checkpoint, ranks the whole corpus exactly for every query, removes the query's positives,
keeps the top ``k`` (mixed corpus; the release uses 100) and writes them to a Delta table
with their modality, rank, score and the checkpoint's ``model_id``. ``ciea train --stage 2``
reads it and draws one image and one text negative per query (modality-balanced).

Example::

    ciea mine-negatives --checkpoint runs/train/s1/model --root data --output data/negatives/s1
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from pipelines.train import config as run_config

from .common import (
    STORAGE,
    RaySettings,
    command_args,
    job_logging,
    job_overrides,
    job_parser,
    move_legacy_keys,
    parse_job_config,
    start_ray,
    write_json,
)

logger = logging.getLogger("ciea.mine_negatives")

PROG = "ciea mine-negatives"
#: Flags of this job → config keys (the shared ones are in ``jobs/common.py``).
FLAGS = {"checkpoint": "checkpoint", "root": "root", "split": "split", "output": "output", "k": "k"}


class MineJobConfig(run_config.MineConfig):
    """``ciea mine-negatives``' config: the run's (:class:`pipelines.train.config.MineConfig`)
    and where Ray runs."""

    ray: RaySettings = Field(default_factory=RaySettings, description="Ray of the job (ray.num_cpus: also "
                                                                      "accepted as the old top-level num_cpus)")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        return move_legacy_keys(data, {"num_cpus": "ray.num_cpus"})


#: The job config's earlier name (with its ``ray`` section and the old top-level ``num_cpus``).
MineConfig = MineJobConfig


def _parser() -> argparse.ArgumentParser:
    p = job_parser(PROG, __doc__, MineJobConfig, storage=STORAGE, ray=True, progress="no progress bar (progress=false)")
    p.add_argument("--checkpoint", help="stage-1 model directory")
    p.add_argument("--root", help="data root")
    p.add_argument("--split", help="query split (default train)")
    p.add_argument("--output", help="Delta table of mined negatives")
    p.add_argument("--k", type=int, help="negatives per query (default 100)")
    return p


def parse_config(argv: list[str] | None) -> tuple[MineJobConfig, argparse.Namespace]:
    """The command line → the validated config (nothing opened yet); exits with the errors."""
    args = _parser().parse_args(argv)
    overrides = job_overrides(args, FLAGS, storage=STORAGE)
    return parse_job_config(PROG, MineJobConfig, args, overrides, storage=STORAGE), args


def command(cfg: MineJobConfig, always: tuple[str, ...] = ()) -> list[str]:
    """The arguments of ``ciea mine-negatives`` that give ``cfg`` (what ``ciea demo`` prints)."""
    return command_args(cfg, MineJobConfig.model_construct(), FLAGS, always=always)


def execute(cfg: MineJobConfig) -> int:
    """Runs the job on a parsed config (what ``main`` does after parsing, and what
    ``ciea demo`` calls): the checkpoint checked before Ray,
    :func:`pipelines.train.negatives.run`, the summary written and printed. Returns the exit
    code."""
    from ciea_model.checkpoint import read_manifest
    from pipelines.store.storage import local_folder

    try:
        with local_folder(cfg.checkpoint, cfg.storage_options) as local:  # local, or s3:// (copied)
            read_manifest(local)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"invalid config: checkpoint: {e}") from None
    from pipelines.train import negatives

    start_ray(cfg.ray, log_to_driver=cfg.progress, progress=cfg.progress)
    summary = negatives.run(cfg)
    if cfg.summary_path:
        write_json(Path(cfg.summary_path), summary)
    print(f"mined {summary['rows']} negatives for {summary['queries']} queries "
          f"({summary['by_modality']}) with model {summary['model_id']} → {cfg.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv)
    job_logging(args.verbose)
    return execute(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
