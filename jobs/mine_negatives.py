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

from pydantic import BaseModel, ConfigDict, Field

from pipelines.store.storage import StorageOptions

from .common import init_ray, load_config, setup_logging, write_json

logger = logging.getLogger("ciea.mine_negatives")


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
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray started by the job")
    summary: str | None = Field(None, description="where to write the JSON summary (default <output>_summary.json when local)")
    progress: bool = True


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ciea mine-negatives", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="stage-1 model directory")
    p.add_argument("--root", help="data root")
    p.add_argument("--split", help="query split (default train)")
    p.add_argument("--output", help="Delta table of mined negatives")
    p.add_argument("--k", type=int, help="negatives per query (default 100)")
    p.add_argument("--config", help="YAML file with MineConfig fields")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = list(args.set)
    for key in ("checkpoint", "root", "split", "output", "k"):
        if getattr(args, key) is not None:
            overrides.append(f"{key}={getattr(args, key)}")
    if args.no_progress:
        overrides.append("progress=false")
    cfg: MineConfig = load_config(MineConfig, args.config, overrides, {})  # type: ignore[assignment]
    setup_logging(args.verbose)
    from ciea_model.checkpoint import read_manifest

    try:
        read_manifest(cfg.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"invalid config: checkpoint: {e}") from None



    from pipelines.train.negatives import mine, write_mined

    init_ray(num_cpus=cfg.num_cpus, log_to_driver=cfg.progress)
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


if __name__ == "__main__":
    raise SystemExit(main())
