"""The driver side of a training run (``ciea train``'s run on a typed
:class:`~pipelines.train.config.TrainJobConfig`): the checks before Ray starts (the model
config, the models it names, the resume identity), the tokenizer of the tiny preset, the
training and dev datasets, the ``TorchTrainer`` that runs :mod:`pipelines.train.worker` on
every worker, and the outputs (``<run_dir>/model``, the curve, ``summary.json``).

The run never starts Ray itself: the caller has, or hands in ``start_ray``, called once the
checks pass (a missing model fails in seconds, before any Ray process exists).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.store.secrets import write_json
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

logger = logging.getLogger(__name__)


class SetupError(ValueError):
    """A config, a checkpoint or training data that cannot work, found before training; the
    message is complete and names the fix (the job exits with it)."""


class ModelUnavailable(SetupError):
    """A model the config names cannot be found (no hub, no local folder); found before Ray."""


class TrainingFailed(RuntimeError):
    """Training failed beyond ``run.max_failures`` restarts. The message is one line: what
    each failing worker raised and how to go on (the run's checkpoints are kept, so the same
    command resumes); Ray's own error, tracebacks included, is logged at DEBUG."""


@dataclass(frozen=True)
class Plan:
    """What the checks resolved: the model config, the resume identity, and the latest
    checkpoint's state when the run exists."""

    model_config: dict[str, Any]
    identity: dict[str, Any]
    resume: dict[str, Any] | None


def tokenizer_dir(cfg: TrainJobConfig) -> str | None:
    """The tiny preset's tokenizer folder (given, or trained into the run directory; with an
    object-store ``run.storage_path``, into ``<storage_path>/<name>/tokenizer`` there, where
    every worker, on whichever node, reads it)."""
    if cfg.preset != "tiny":
        return None
    if cfg.model.tokenizer:
        return cfg.model.tokenizer
    if cfg.is_remote_storage:
        from pipelines.store.storage import join

        return join(cfg.run.storage_path, cfg.run.name, "tokenizer")
    return str((cfg.run_dir / "tokenizer").resolve())


def validate(cfg: TrainJobConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Everything that can be checked before Ray starts. Returns the resolved model config
    and the resume identity.

    Raises:
        ModelUnavailable: a model the config names is not on the hub or on disk.
        SetupError: with the field, the value and the fix.
    """
    from ciea_model import ConfigError
    from ciea_model.hub import ModelUnavailableError, locate_models

    missing = cfg.missing_visual_pretraining()
    if missing:
        raise SetupError(f"invalid config: {missing}")
    try:
        model_config = model_config_for(cfg, tokenizer_dir(cfg))
    except (ConfigError, ValueError) as e:
        raise SetupError(f"invalid config: {e}") from None
    try:  # before Ray starts: a missing model fails here in seconds, not in a worker
        locate_models(model_config, skip=(tokenizer_dir(cfg),))
    except ModelUnavailableError as e:
        raise ModelUnavailable(str(e)) from None
    model_cfg = model_config.to_dict()
    for key, path in (("model.vision_state", cfg.model.vision_state), ("train.init_from", cfg.train.init_from)):
        if path and not Path(path).exists():
            raise SetupError(f"invalid config: {key}={path!r} does not exist: point it at a local file/directory")
    if cfg.train.init_from:
        from ciea_model.checkpoint import read_manifest

        manifest = read_manifest(cfg.train.init_from)
        saved = manifest["config"]
        # A stage-0 model (`ciea pretrain-vision`) hands over its visual module only: any
        # variant with a projector starts from it (its shapes are checked as it loads).
        for part in () if visual_only_init(cfg, manifest) else ("variant", "extractor"):
            if saved.get(part) != model_cfg.get(part):
                raise SetupError(f"invalid config: train.init_from={cfg.train.init_from!r} holds a "
                                 f"{part}={saved.get(part)!r} model, but this job builds {part}={model_cfg.get(part)!r}")
    if cfg.is_remote_storage and cfg.debug.fail_at_step is not None:
        raise SetupError("invalid config: debug.fail_at_step needs a local run.storage_path (its marker file)")
    _check_root(cfg.data.root)
    return model_cfg, resume_identity(cfg, model_cfg)


def visual_only_init(cfg: TrainJobConfig, manifest: dict[str, Any] | None = None) -> bool:
    """Whether ``train.init_from`` is a stage-0 model that a later stage starts from: then
    only its visual module (vision tower and projector) is loaded
    (:func:`ciea_model.checkpoint.load_visual_module`)."""
    if not cfg.train.init_from or cfg.train.stage == 0:
        return False
    if manifest is None:
        from ciea_model.checkpoint import read_manifest

        manifest = read_manifest(cfg.train.init_from)
    return manifest.get("metadata", {}).get("stage") == 0


def _check_root(root: str) -> None:
    """A local data root must be a folder that exists (an object-store root is read later)."""
    from pipelines.store import storage

    if storage.is_remote(root):
        return
    path = Path(storage.normalise_uri(root))
    if not path.exists():
        raise SetupError(f"ciea train: the data root {path} does not exist (data.root): run `ciea ingest --root "
                         f"{path}` first, or point --root at the folder it wrote")
    if not path.is_dir():
        raise SetupError(f"ciea train: the data root {path} is a file, not a folder (data.root): point --root at "
                         "the folder `ciea ingest` wrote")


def check_resume(cfg: TrainJobConfig, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The latest checkpoint's state when the run exists; refuses a mismatching one
    (:class:`~pipelines.train.config.CheckpointMismatchError`)."""
    found = latest_checkpoint(cfg.run.storage_path, cfg.run.name, cfg.storage_options)
    if found is None:
        return None
    path, state = found
    check_identity(state["identity"], identity, f"checkpoint {path}")
    return {"path": path, **state}


def check(cfg: TrainJobConfig) -> Plan:
    """:func:`validate` and :func:`check_resume`: everything before Ray.

    Raises:
        ModelUnavailable, SetupError: with the fix (a mismatching checkpoint included).
    """
    model_cfg, identity = validate(cfg)
    try:
        resume = check_resume(cfg, identity)
    except CheckpointMismatchError as e:
        raise SetupError(str(e)) from None
    return Plan(model_cfg, identity, resume)


def train_tokenizer(cfg: TrainJobConfig, path: Path | str) -> None:
    """Tiny preset: a WordPiece tokenizer trained on the corpus texts and training queries,
    streamed from Ray Data (never collected). Kept in the run directory, so a resumed run
    uses the very same vocabulary (the trainer breaks ties in hash-map order)."""
    from ciea_model.tokenizer import train_wordpiece_tokenizer
    from pipelines.store import schema as S
    from pipelines.store import storage
    from pipelines.train.dataset import read_documents, read_queries

    if storage.is_remote(str(path)):  # trained here, kept on the run's storage only
        if storage.exists(storage.join(str(path), "tokenizer_config.json"), cfg.storage_options):
            return
        import tempfile

        with tempfile.TemporaryDirectory(prefix="ciea-tokenizer-") as tmp:
            train_tokenizer(cfg, Path(tmp))
            storage.upload_folder(tmp, str(path), cfg.storage_options)
        return
    path = Path(path)
    if (path / "tokenizer_config.json").exists():
        return

    tables = cfg.tables()

    def texts():
        for q in read_queries(tables, cfg.data.train_split):
            yield q["query"]
        docs = read_documents(tables, cfg.data.version, columns=(S.TEXT, S.CAPTION))
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
    ``start_epoch`` (a resumed run's) on, each with its own draws.

    Raises:
        SetupError: a split is missing or empty, or the dev split has no query with a positive.
    """
    from pipelines.store.splits import EmptySplit, SplitNotFound
    from pipelines.train.dataset import (
        build_train_shards,
        caption_pairs,
        dev_documents_dataset,
        read_queries,
    )
    from pipelines.train.draws import DrawSettings
    from pipelines.train.negatives import read_mined

    tables = cfg.tables()
    mined = None
    if cfg.train.stage == 2:
        expect = None
        if cfg.train.init_from:
            from ciea_model.checkpoint import read_manifest

            expect = read_manifest(cfg.train.init_from)["model_id"]
        mined = read_mined(tables, cfg.train.negatives, depth=cfg.train.negative_depth, expect_model_id=expect)
    # Stage 0: every image document with a caption is an example (its own positive).
    pairs = caption_pairs(tables, cfg.data.version, cfg.data.max_train_queries) if cfg.train.stage == 0 else None
    try:
        train, counts = build_train_shards(
            tables, cfg.data.train_split, version=cfg.data.version, mined=mined, queries=pairs,
            settings=DrawSettings.from_train(cfg.train),
            epochs=range(min(start_epoch, cfg.train.epochs - 1), cfg.train.epochs),
            num_shards=cfg.scaling.num_workers, max_queries=cfg.data.max_train_queries,
            num_partitions=cfg.data.join_partitions, broadcast_mb=cfg.data.broadcast_join_mb)
        dev_queries = [q for q in read_queries(tables, cfg.data.dev_split)
                       if q["positive_doc_ids"]][: cfg.data.max_dev_queries]
    except (SplitNotFound, EmptySplit) as e:
        raise SetupError(f"{e} (data.train_split={cfg.data.train_split!r}, data.dev_split={cfg.data.dev_split!r})") from None
    if not dev_queries:
        raise SetupError(f"queries/{cfg.data.dev_split} has no query with a positive: early stopping needs a dev split")
    dev = dev_documents_dataset(tables, dev_queries, cfg.data.version,
                                pool=cfg.data.dev_pool, seed=cfg.train.seed).materialize()
    counts["dev_documents"] = dev.count()
    counts["dev_queries"] = len(dev_queries)
    return train, dev, dev_queries, counts


def run(cfg: TrainJobConfig, start_ray: Callable[[], object] | None = None) -> dict[str, Any]:
    """Checks, resumes or starts the run, trains, and writes the outputs.

    Args:
        cfg: The validated config.
        start_ray: Joins or starts Ray, called once the checks pass (``None``: the caller
            has started Ray).

    Returns:
        The summary (also ``<run_dir>/summary.json``); a finished run's, with
        ``already_finished``, when there is nothing left to do.

    Raises:
        ModelUnavailable, SetupError: with the fix, before any training.
    """
    plan = check(cfg)
    resume = plan.resume
    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume and resume.get("finished"):
        logger.info("run %s already finished at step %d (%s); nothing to do", cfg.run.name, resume["step"], resume["path"])
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
        return {**summary, "already_finished": True}
    if resume:
        logger.info("resuming run %s from its latest checkpoint, step %d (%s)", cfg.run.name, resume["step"], resume["path"])
    write_json(run_dir / "train_config.json", cfg.model_dump(mode="json"), sort_keys=False)

    if start_ray is not None:
        start_ray()
    t0 = time.perf_counter()
    if cfg.preset == "tiny" and not cfg.model.tokenizer:
        train_tokenizer(cfg, tokenizer_dir(cfg))
    train, dev, dev_queries, counts = build_datasets(cfg, start_epoch=(resume or {}).get("loop", {}).get("epoch", 0))
    logger.info("training rows %d (%s), dev: %d queries over %d documents; data ready in %.1fs",
                counts["rows"], counts, counts["dev_queries"], counts["dev_documents"], time.perf_counter() - t0)
    if counts["rows"] < cfg.scaling.num_workers * cfg.micro_batch:
        raise SetupError(f"{counts['rows']} training rows cannot fill one micro-batch of {cfg.micro_batch} on each "
                         f"of {cfg.scaling.num_workers} workers: lower train.batch_size or add queries")
    result = fit(cfg, plan, {**train, "dev": dev}, dev_queries, counts["rows"])
    return finish(cfg, result, counts, time.perf_counter() - t0)


def check_fits(cfg: TrainJobConfig, resources: dict[str, float]) -> None:
    """Refuses a worker group that a local Ray of ``resources`` can never place.

    Ray Train waits for resources without a word, so ``--preset paper`` (one GPU worker,
    4 CPUs) on a CPU-only machine would hang; Ray Data's read tasks also need a CPU
    beside the workers, or they stall the same way (STACK_NOTES: "deadlock on 2 CPUs").
    Only for a Ray this job started: a cluster's autoscaler may still add nodes.

    Raises:
        SetupError: what the run needs, what there is, and the settings that fix it.
    """
    s = cfg.scaling
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if s.use_gpu and gpus < s.num_workers:
        raise SetupError(f"scaling.use_gpu=true needs {s.num_workers} GPU(s), but this Ray has {gpus:g}: set "
                         f"scaling.use_gpu=false (and scaling.cpus_per_worker=0.5 on a small machine), or run "
                         f"on a machine with GPUs")
    need = s.num_workers * s.cpus_per_worker
    if need + 1 > cpus:
        raise SetupError(f"scaling.num_workers={s.num_workers} × scaling.cpus_per_worker={s.cpus_per_worker:g} "
                         f"= {need:g} CPUs leaves none of this Ray's {cpus:g} for reading data, and the run would "
                         f"wait forever: lower scaling.cpus_per_worker (0.5 on 2 CPUs) or scaling.num_workers")


def fit(cfg: TrainJobConfig, plan: Plan, datasets: dict[str, Any], dev_queries: list[dict],
        n_train: int) -> Any:
    """Runs ``TorchTrainer`` over the workers (each reads its own train dataset, in epoch
    order); returns its result.

    Raises:
        TrainingFailed: the run failed beyond ``run.max_failures``.
    """
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
        TrainingFailedError,
    )
    from ray.train.torch import TorchTrainer

    from pipelines.store.storage import filesystem

    run_dir = cfg.run_dir.resolve()
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = 1
    local = not cfg.is_remote_storage
    storage_fs = None if local else filesystem(cfg.run.storage_path, cfg.storage_options)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": json.loads(cfg.model_dump_json()), "model_config": plan.model_config, "identity": plan.identity,
            "fingerprint": fingerprint(plan.identity), "n_train": n_train, "dev_queries": dev_queries,
            "metrics_path": str(run_dir / METRICS_FILE) if local else None,
            "marker_dir": str(run_dir) if local else None,
            "resume_from": plan.resume["path"] if plan.resume else None,
            "init_visual_only": visual_only_init(cfg),
        },
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=cfg.scaling.placement_strategy),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=str(Path(cfg.run.storage_path).resolve()) if local else storage_fs[1],
            # The storage options (endpoint, region) reach Ray Train through the filesystem.
            storage_filesystem=None if local else storage_fs[0],
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.num_to_keep),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as e:
        logger.debug("training failed", exc_info=e)
        raise TrainingFailed(failure_message(cfg, e)) from None
    if result.error is not None:
        raise TrainingFailed(failure_message(cfg, result.error)) from None
    return result


def failure_message(cfg: TrainJobConfig, error: BaseException) -> str:
    """One line for a run that failed beyond its restarts: each failing worker's own error
    (Ray's message carries every traceback) and where a re-run resumes from."""
    failures = getattr(error, "worker_failures", None) or {}
    causes = [f"rank {rank}: {_last_line(e)}" for rank, e in sorted(failures.items())]
    cause = "; ".join(causes) or _last_line(getattr(error, "controller_failure", None) or error)
    found = latest_checkpoint(cfg.run.storage_path, cfg.run.name, cfg.storage_options)
    resume = (f"re-run the same command to resume from its checkpoint at step {found[1]['step']}" if found
              else "no checkpoint was written, so a re-run starts afresh")
    return (f"training failed beyond run.max_failures={cfg.run.max_failures} restarts ({cause}): fix that, "
            f"then {resume} (raise run.max_failures to ride out transient faults)")


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1]}" if lines else type(error).__name__


def finish(cfg: TrainJobConfig, result: Any, counts: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Copies the final (best) model to ``<run_dir>/model`` (with an object-store
    ``run.storage_path``: to ``<storage_path>/<name>/model`` there, which the next jobs read
    on whichever node they run), writes the curve and summary."""
    import tempfile

    from ciea_model.checkpoint import MANIFEST, TOKENIZER_DIR, WEIGHTS
    from pipelines.store import storage

    run_dir = cfg.run_dir.resolve()
    staging = tempfile.TemporaryDirectory(prefix="ciea-model-") if cfg.is_remote_storage else None
    model_dir = Path(staging.name) / "model" if staging else run_dir / "model"
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
    if staging:
        with staging:
            model_uri = storage.join(cfg.run.storage_path, cfg.run.name, "model")
            storage.upload_folder(model_dir, model_uri, cfg.storage_options)
        model_dir = model_uri
    curve = plot_curve(run_dir / METRICS_FILE, run_dir / "training_curve.png")
    summary = {
        "name": cfg.run.name, "stage": cfg.train.stage, "variant": cfg.model.variant,
        "checkpoint": result.checkpoint.path, "model_dir": str(model_dir), "model_id": state["model_id"],
        "metrics": str(run_dir / METRICS_FILE), "curve": str(curve) if curve else None,
        "result": result.return_value, "final_metrics": result.metrics, "data": counts,
        "seconds": round(seconds, 1),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "summary.json", summary)
    return summary
