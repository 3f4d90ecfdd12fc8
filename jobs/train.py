"""``ciea train``: train CIEA with Ray Train (TorchTrainer, data parallel) on the Delta
tables that ``ciea ingest`` writes, checkpointing to ``<storage_path>/<name>``.

Training pairs are built with Ray Data (queries + qrels + a hash join of the documents they
need; the corpus is never gathered in the driver) and sharded across workers. Negatives are
the global batch (candidates gathered from every worker with gradient); stage 2 adds one
image and one text hard negative per query mined by ``ciea mine-negatives``. Re-running the
same ``--name`` resumes from its latest checkpoint; a checkpoint written with a different
config is refused. Metrics go to ``metrics.jsonl`` beside the checkpoints, with a PNG curve.

The two stages (CIEA_METHOD.md)::

    ciea train --preset tiny --root data --name s1                  # stage 1: in-batch
    ciea mine-negatives --checkpoint runs/train/s1/model --root data --output data/negatives/s1
    ciea train --preset tiny --root data --name s2 --stage 2 \\
        --set train.negatives=data/negatives/s1 --set train.init_from=runs/train/s1/model

Presets: ``tiny`` (random 2-layer T5 + CLIP, tests, seconds), ``demo`` (all-MiniLM + a small
CLIP, CPU, minutes), ``paper`` (T5-ANCE + frozen CLIP ViT-B/32, GPU, batch 64, lr 5e-6).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from pipelines.train.checkpoints import STATE_FILE, latest_checkpoint
from pipelines.train.config import (
    CheckpointMismatchError,
    TrainJobConfig,
    check_identity,
    fingerprint,
    model_config_for,
    resume_identity,
)
from pipelines.train.curves import METRICS_FILE, plot_curve
from pipelines.train.worker import train_loop_per_worker

from .common import (
    RaySettings,
    command_args,
    job_logging,
    job_overrides,
    job_parser,
    parse_job_config,
    preset_defaults,
    start_ray,
    write_json,
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
        "train": {"epochs": 2, "batch_size": 32, "eval_every": 32, "patience": 3, "lr": 5e-5,
                  "new_lr": 1e-3, "log_every": 10},
        "data": {"dev_pool": 2000},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "threads_per_worker": 1},
    },
    "paper": {
        # The release's recipe: AdamW 5e-6, batch 64, ≤ 40 epochs, dev every 500 steps,
        # patience 10 (stage 1; use 5 in stage 2), λ = 0.1, frozen CLIP; bf16 on GPU.
        "preset": "paper",
        "model": {"comp_weight": 0.1},
        "train": {"epochs": 40, "batch_size": 64, "eval_every": 500, "patience": 10, "lr": 5e-6,
                  "checkpoint_every": 500},
        "data": {"dev_pool": 100000},
        "scaling": {"num_workers": 1, "use_gpu": True, "cpus_per_worker": 4, "threads_per_worker": 4},
    },
}


PROG = "ciea train"
#: Flags of this job → config keys (the shared ones are in ``jobs/common.py``).
FLAGS = {"root": "data.root", "name": "run.name", "storage_path": "run.storage_path", "stage": "train.stage",
         "variant": "model.variant", "workers": "scaling.num_workers"}


def _parser() -> argparse.ArgumentParser:
    p = job_parser(PROG, __doc__, TrainJobConfig, presets=PRESETS, default_preset="tiny",
                   progress="no progress bar (log lines only)", set_example="train.epochs=5")
    p.add_argument("--root", help="data root with corpus/, queries/, qrels/ (data.root)")
    p.add_argument("--name", help="run name (run.name); the same name resumes")
    p.add_argument("--storage-path", help="where checkpoints go (run.storage_path; local or s3://)")
    p.add_argument("--stage", type=int, choices=(1, 2), help="train.stage")
    p.add_argument("--variant", help="model.variant")
    p.add_argument("--workers", type=int, help="scaling.num_workers")
    return p


def parse_config(argv: list[str] | None) -> tuple[TrainJobConfig, argparse.Namespace]:
    """The command line → the validated config (nothing opened yet); exits with the errors."""
    args = _parser().parse_args(argv)
    overrides = job_overrides(args, FLAGS, progress_key="run.progress")
    return parse_job_config(PROG, TrainJobConfig, args, overrides, presets=PRESETS), args


def command(cfg: TrainJobConfig, always: tuple[str, ...] = ()) -> list[str]:
    """The arguments of ``ciea train`` that give ``cfg`` (what ``ciea demo`` prints): the
    preset, then what differs from it (and the keys in ``always``)."""
    defaults = preset_defaults(TrainJobConfig, PRESETS, cfg.preset)
    return ["--preset", cfg.preset, *command_args(cfg, defaults, FLAGS, progress_key="run.progress", always=always)]


def tokenizer_dir(cfg: TrainJobConfig) -> str | None:
    if cfg.preset != "tiny":
        return None
    return cfg.model.tokenizer or str((cfg.run_dir / "tokenizer").resolve())


def validate(cfg: TrainJobConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Everything that can be checked before Ray starts. Returns the resolved model config
    and the resume identity.

    Raises:
        SystemExit: with the field, the value and the fix.
    """
    from ciea_model import ConfigError
    from ciea_model.hub import ModelUnavailableError, locate_models

    try:
        model_config = model_config_for(cfg, tokenizer_dir(cfg))
    except (ConfigError, ValueError) as e:
        raise SystemExit(f"invalid config: {e}") from None
    try:  # before Ray starts: a missing model fails here in seconds, not in a worker
        locate_models(model_config, skip=(tokenizer_dir(cfg),))
    except ModelUnavailableError as e:
        raise SystemExit(f"{PROG}: {e}") from None
    model_cfg = model_config.to_dict()
    for key, path in (("model.vision_state", cfg.model.vision_state), ("train.init_from", cfg.train.init_from)):
        if path and not Path(path).exists():
            raise SystemExit(f"invalid config: {key}={path!r} does not exist: point it at a local file/directory")
    if cfg.train.init_from:
        from ciea_model.checkpoint import read_manifest

        saved = read_manifest(cfg.train.init_from)["config"]
        for part in ("variant", "extractor"):
            if saved.get(part) != model_cfg.get(part):
                raise SystemExit(f"invalid config: train.init_from={cfg.train.init_from!r} holds a "
                                 f"{part}={saved.get(part)!r} model, but this job builds {part}={model_cfg.get(part)!r}")
    if cfg.is_remote_storage and cfg.debug.fail_at_step is not None:
        raise SystemExit("invalid config: debug.fail_at_step needs a local run.storage_path (its marker file)")
    return model_cfg, resume_identity(cfg, model_cfg)


def check_resume(cfg: TrainJobConfig, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The latest checkpoint's state when the run exists; refuses a mismatching one."""
    found = latest_checkpoint(cfg.run.storage_path, cfg.run.name)
    if found is None:
        return None
    path, state = found
    check_identity(state["identity"], identity, f"checkpoint {path}")
    return {"path": path, **state}


def _ensure_ray(cfg: TrainJobConfig) -> None:
    start_ray(RaySettings(num_cpus=cfg.run.num_cpus, temp_dir=cfg.run.ray_temp_dir), log_to_driver=cfg.run.progress)


def train_tokenizer(cfg: TrainJobConfig, path: Path) -> None:
    """Tiny preset: a WordPiece tokenizer trained on the corpus texts and training queries,
    streamed from Ray Data (never collected). Kept in the run directory, so a resumed run
    uses the very same vocabulary (the trainer breaks ties in hash-map order)."""
    from ciea_model.tokenizer import train_wordpiece_tokenizer
    from pipelines.store import schema as S
    from pipelines.train.dataset import read_documents, read_queries

    if (path / "tokenizer_config.json").exists():
        return

    def texts():
        for q in read_queries(cfg.data.root, cfg.data.train_split, cfg.data.storage_options):
            yield q["query"]
        docs = read_documents(cfg.data.root, cfg.data.storage_options, cfg.data.version, columns=(S.TEXT, S.CAPTION))
        for batch in docs.iter_batches(batch_format="pyarrow", batch_size=4096):
            for text, caption in zip(batch.column(S.TEXT).to_pylist(), batch.column(S.CAPTION).to_pylist()):
                if caption or text:
                    yield caption or text

    path.mkdir(parents=True, exist_ok=True)
    train_wordpiece_tokenizer(texts(), path, vocab_size=400, style="t5")


def build_datasets(cfg: TrainJobConfig, start_epoch: int = 0) -> tuple[Any, Any, list[dict], dict[str, Any]]:
    """(train rows: one dataset per worker, dev documents, dev queries, counts): materialised
    in the object store (not the driver) before the workers start, so no Ray Data task waits
    for a CPU that the train workers hold. The train rows cover the epochs from
    ``start_epoch`` (a resumed run's) on, each with its own draws."""
    from pipelines.train.dataset import build_train_shards, dev_documents_dataset, read_queries
    from pipelines.train.draws import DrawSettings
    from pipelines.train.negatives import read_mined

    mined = None
    if cfg.train.stage == 2:
        expect = None
        if cfg.train.init_from:
            from ciea_model.checkpoint import read_manifest

            expect = read_manifest(cfg.train.init_from)["model_id"]
        mined = read_mined(cfg.train.negatives, cfg.data.storage_options, depth=cfg.train.negative_depth,
                           expect_model_id=expect)
    train, counts = build_train_shards(
        cfg.data.root, cfg.data.train_split, cfg.data.storage_options, version=cfg.data.version, mined=mined,
        settings=DrawSettings.from_train(cfg.train), epochs=range(min(start_epoch, cfg.train.epochs - 1), cfg.train.epochs),
        num_shards=cfg.scaling.num_workers, max_queries=cfg.data.max_train_queries,
        num_partitions=cfg.data.join_partitions)
    dev_queries = [q for q in read_queries(cfg.data.root, cfg.data.dev_split, cfg.data.storage_options)
                   if q["positive_doc_ids"]][: cfg.data.max_dev_queries]
    if not dev_queries:
        raise SystemExit(f"queries/{cfg.data.dev_split} has no query with a positive: early stopping needs a dev split")
    dev = dev_documents_dataset(cfg.data.root, dev_queries, cfg.data.storage_options, cfg.data.version,
                                pool=cfg.data.dev_pool, seed=cfg.train.seed).materialize()
    counts["dev_documents"] = dev.count()
    counts["dev_queries"] = len(dev_queries)
    return train, dev, dev_queries, counts


def run(cfg: TrainJobConfig) -> dict[str, Any]:
    """Validates, resumes or starts the run, trains, and writes the outputs. Returns the summary."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    model_cfg, identity = validate(cfg)
    try:
        resume = check_resume(cfg, identity)
    except CheckpointMismatchError as e:
        raise SystemExit(str(e)) from None
    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume and resume.get("finished"):
        logger.info("run %s already finished at step %d (%s); nothing to do", cfg.run.name, resume["step"], resume["path"])
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
        return {**summary, "already_finished": True}
    if resume:
        logger.info("resuming run %s from its latest checkpoint, step %d (%s)", cfg.run.name, resume["step"], resume["path"])
    (run_dir / "train_config.json").write_text(cfg.model_dump_json(indent=2) + "\n")

    _ensure_ray(cfg)
    t0 = time.perf_counter()
    if cfg.preset == "tiny" and not cfg.model.tokenizer:
        train_tokenizer(cfg, Path(tokenizer_dir(cfg)))
    train, dev, dev_queries, counts = build_datasets(cfg, start_epoch=(resume or {}).get("loop", {}).get("epoch", 0))
    logger.info("training rows %d (%s), dev: %d queries over %d documents; data ready in %.1fs",
                counts["rows"], counts, counts["dev_queries"], counts["dev_documents"], time.perf_counter() - t0)
    if counts["rows"] < cfg.scaling.num_workers * cfg.micro_batch:
        raise SystemExit(f"{counts['rows']} training rows cannot fill one micro-batch of {cfg.micro_batch} on each "
                         f"of {cfg.scaling.num_workers} workers: lower train.batch_size or add queries")
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = 1
    local = not cfg.is_remote_storage
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": json.loads(cfg.model_dump_json()), "model_config": model_cfg, "identity": identity,
            "fingerprint": fingerprint(identity), "n_train": counts["rows"], "dev_queries": dev_queries,
            "metrics_path": str(run_dir / METRICS_FILE) if local else None,
            "marker_dir": str(run_dir) if local else None,
        },
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=str(Path(cfg.run.storage_path).resolve()) if local else cfg.run.storage_path,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.num_to_keep),
        ),
        datasets={**train, "dev": dev},  # each worker reads its own train dataset, in epoch order
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return finish(cfg, result, counts, time.perf_counter() - t0)


def finish(cfg: TrainJobConfig, result: Any, counts: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Copies the final (best) model to ``<run_dir>/model``, writes the curve and summary."""
    from ciea_model.checkpoint import MANIFEST, TOKENIZER_DIR, WEIGHTS

    run_dir = cfg.run_dir.resolve()
    model_dir = run_dir / "model"
    with result.checkpoint.as_directory() as d:
        src = Path(d)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        model_dir.mkdir(parents=True)
        for name in (MANIFEST, WEIGHTS):
            shutil.copy(src / name, model_dir / name)
        shutil.copytree(src / TOKENIZER_DIR, model_dir / TOKENIZER_DIR)
        metrics = run_dir / METRICS_FILE
        if not metrics.exists() and (src / METRICS_FILE).exists():
            shutil.copy(src / METRICS_FILE, metrics)
        state = json.loads((src / STATE_FILE).read_text())
    curve = plot_curve(run_dir / METRICS_FILE, run_dir / "training_curve.png")
    summary = {
        "name": cfg.run.name, "stage": cfg.train.stage, "variant": cfg.model.variant,
        "checkpoint": result.checkpoint.path, "model_dir": str(model_dir), "model_id": state["model_id"],
        "metrics": str(run_dir / METRICS_FILE), "curve": str(curve) if curve else None,
        "result": result.return_value, "final_metrics": result.metrics, "data": counts,
        "seconds": round(seconds, 1),
    }
    write_json(run_dir / "summary.json", summary)
    return summary


def execute(cfg: TrainJobConfig) -> int:
    """Runs the job on a parsed config (what ``main`` does after parsing, and what
    ``ciea demo`` calls): :func:`run`, then the printed result. Returns the exit code."""
    summary = run(cfg)
    final = summary.get("final_metrics") or {}
    print(f"\nrun {cfg.run.name}: stage {cfg.train.stage}, {final.get('step', '?')} steps, "
          f"best dev MRR@10 {final.get('best_dev_mrr10', float('nan')):.4f} "
          f"(initial {final.get('initial_dev_mrr10') or float('nan'):.4f})\n"
          f"model: {summary.get('model_dir')}\nmetrics: {summary.get('metrics')}\ncurve: {summary.get('curve')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv)
    job_logging(args.verbose)
    return execute(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
