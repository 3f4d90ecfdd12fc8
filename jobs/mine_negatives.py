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
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.store.storage import StorageOptions

from .common import (
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


class MineConfig(BaseModel):
    """The whole mining job, validated before Ray starts."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str = Field(..., description="stage-1 model directory (ciea_checkpoint.json + weights)")
    root: str = Field("data", description="data root with corpus/documents and queries/<split>")
    split: str = Field("train", description="queries to mine for")
    output: str = Field(..., description="Delta table to (over)write, local path or s3://")
    k: int = Field(100, ge=1, description="negatives kept per query (mixed corpus, positives removed)")
    version: int | None = Field(None, ge=0, description="corpus/documents Delta version")
    storage_options: StorageOptions = Field(default_factory=dict)
    pool_size: int = Field(1, ge=1, description="encoder actors")
    cpus_per_actor: float = Field(1.0, gt=0, description="keep pool_size × cpus_per_actor + 1 <= CPUs (read tasks need one)")
    threads: int | None = Field(None, ge=1, description="torch threads per encoder actor")
    batch_size: int = Field(64, ge=1, description="documents per encoder call")
    ray: RaySettings = Field(default_factory=RaySettings, description="Ray of the job (ray.num_cpus: also "
                                                                      "accepted as the old top-level num_cpus)")
    summary: str | None = Field(None, description="where to write the JSON summary (default <output>_summary.json when local)")
    progress: bool = True

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        return move_legacy_keys(data, {"num_cpus": "ray.num_cpus"})


def _parser() -> argparse.ArgumentParser:
    p = job_parser(PROG, __doc__, MineConfig, ray=True, progress="no progress bar (progress=false)")
    p.add_argument("--checkpoint", help="stage-1 model directory")
    p.add_argument("--root", help="data root")
    p.add_argument("--split", help="query split (default train)")
    p.add_argument("--output", help="Delta table of mined negatives")
    p.add_argument("--k", type=int, help="negatives per query (default 100)")
    return p


def parse_config(argv: list[str] | None) -> tuple[MineConfig, argparse.Namespace]:
    """The command line → the validated config (nothing opened yet); exits with the errors."""
    args = _parser().parse_args(argv)
    return parse_job_config(PROG, MineConfig, args, job_overrides(args, FLAGS)), args


def command(cfg: MineConfig, always: tuple[str, ...] = ()) -> list[str]:
    """The arguments of ``ciea mine-negatives`` that give ``cfg`` (what ``ciea demo`` prints)."""
    return command_args(cfg, MineConfig.model_construct(), FLAGS, always=always)


def execute(cfg: MineConfig) -> int:
    """Runs the job on a parsed config: mines with the checkpoint, writes the Delta table
    and the summary. Returns the exit code."""
    from ciea_model.checkpoint import read_manifest

    try:
        read_manifest(cfg.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"invalid config: checkpoint: {e}") from None
    from pipelines.train.negatives import mine, write_mined

    start_ray(cfg.ray, log_to_driver=cfg.progress)
    t0 = time.perf_counter()
    table, summary = mine(cfg.checkpoint, cfg.root, cfg.split, k=cfg.k, storage_options=cfg.storage_options,
                          version=cfg.version, pool_size=cfg.pool_size, cpus_per_actor=cfg.cpus_per_actor,
                          batch_size=cfg.batch_size, threads=cfg.threads, progress=cfg.progress)
    summary["table_version"] = write_mined(table, cfg.output, cfg.storage_options)
    summary.update(output=cfg.output, seconds=round(time.perf_counter() - t0, 1))
    path = cfg.summary or (None if "://" in cfg.output else f"{cfg.output.rstrip('/')}_summary.json")
    if path:
        write_json(Path(path), summary)
    print(f"mined {summary['rows']} negatives for {summary['queries']} queries "
          f"({summary['by_modality']}) with model {summary['model_id']} → {cfg.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv)
    job_logging(args.verbose)
    return execute(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
