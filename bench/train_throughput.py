"""Training throughput: Ray Train (N workers × 1 torch thread, DDP-style, candidates
gathered across workers) vs the in-process trainer (1 process × N threads), same model
config, same global batch, same data, same run.

Both sides train on the same synthetic corpus, written once to Delta tables: Ray Train
through ``ciea train``'s own code path (Ray Data join → shards → ``train_loop_per_worker``),
the in-process side through ``ciea_model.training.train_step`` over
``iterate_batches`` (what ``Trainer.fit`` runs), twice: with dense gradients, and with the
token embedding's sparse gradients (``SparseEmbeddingGrads``: the step ``Trainer.fit``
and the Ray workers take), with images left as PNG bytes on both sides so each decodes
them per step alike. Throughput is queries/s over whole epochs
(data, collation, forward, backward, gradient all-reduce, optimiser), median over the
epochs after the first (warm-up); Ray Train's epoch clock excludes its checkpoint and
start-up, which are reported separately as end-to-end wall time.

    python -m bench.train_throughput                      # demo preset, 2 workers
    python -m bench.train_throughput --preset tiny --queries 256 --epochs 3
    python -m bench.train_throughput --profile            # + per-phase CPU/wall per step

``--profile`` prints, for Ray Train's rank 0 (``debug.profile``) and the in-process step
(cut into the same phases), the mean per step of each phase's training-thread CPU time,
whole-process CPU time and wall time: CPU time is what a phase costs even on a shared
machine; wall minus CPU is waiting (for the other rank, a core, or data).

GPU / MFU: with an accelerator, ``--gpu`` runs one Ray Train worker on it (bf16 autocast)
and prints samples/s; model FLOPs utilisation is not computed here.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("bench.train_throughput")


def _write_corpus(root: Path, queries: int, seed: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
    from train_fixtures import write_synthetic

    from pipelines.ingest.sources.synthetic.generator import SyntheticConfig

    write_synthetic(root, SyntheticConfig(seed=seed, num_image_docs=max(200, queries), num_text_docs=max(60, queries // 4),
                                          num_queries=(queries, 16, 4), image_size=32))


def run_ray(cfg) -> tuple[list[float], float, dict]:
    from pipelines.train import driver
    from pipelines.train.curves import read_metrics

    t0 = time.perf_counter()
    summary = driver.run(cfg)
    wall = time.perf_counter() - t0
    records = read_metrics(cfg.run_dir / "metrics.jsonl")
    summary["profiles"] = [r["profile"] for r in records if r["event"] == "step" and "profile" in r]
    return [r["samples_per_s"] for r in records if r["event"] == "epoch"], wall, summary


def _summarise(profiles: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Mean per step of each phase's [thread_cpu, process_cpu, wall] in ms, leaving out
    the first third of the steps (warm-up)."""
    steady = profiles[len(profiles) // 3:] or profiles
    phases: dict[str, list[float]] = {}
    for p in steady:
        for name, row in p.items():
            acc = phases.setdefault(name, [0.0, 0.0, 0.0])
            for i, x in enumerate(row):
                acc[i] += x
    return {k: [round(1000 * x / len(steady), 1) for x in v] for k, v in phases.items()}


def print_profile(title: str, phases: dict[str, list[float]]) -> None:
    total = [sum(v[i] for v in phases.values()) for i in range(3)]
    print(f"\n{title} (ms per step, mean)")
    print(f"  {'phase':<18}{'thread CPU':>11}{'process CPU':>13}{'wall':>9}{'% of CPU':>10}")
    for name, (t, p, w) in sorted(phases.items(), key=lambda kv: -kv[1][1]):
        print(f"  {name:<18}{t:>11.1f}{p:>13.1f}{w:>9.1f}{100 * p / max(total[1], 1e-9):>9.0f}%")
    print(f"  {'total':<18}{total[0]:>11.1f}{total[1]:>13.1f}{total[2]:>9.1f}")


def run_inprocess(cfg, threads: int, profile: bool = False,
                  sparse_embeddings: bool = False) -> tuple[list[float], float, list[dict]]:
    """The in-process trainer's loop. ``sparse_embeddings``: the token embedding gets the
    same sparse gradients as a Ray worker (``SparseEmbeddingGrads``, what ``Trainer.fit``
    and the Ray worker's ``GradientReducer`` use), so the baseline is not slowed by a cost
    the Ray side was relieved of."""
    import torch

    from ciea_model import create_model_and_processor
    from ciea_model.training import (
        OptimConfig,
        SparseEmbeddingGrads,
        build_optimizer,
        build_scheduler,
        compute_loss,
        iterate_batches,
        train_step,
    )
    from pipelines.store.documents import batch_to_documents
    from pipelines.train.config import NEW_MODULES, model_config_for
    from pipelines.train.dataset import read_queries
    from pipelines.train.driver import tokenizer_dir
    from pipelines.train.examples import training_examples
    from pipelines.train.profiling import StepProfile

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    tables = cfg.tables()
    docs = batch_to_documents(tables.read(tables.documents)).require()
    examples, _ = training_examples(read_queries(tables, "train"), {d.doc_id: d for d in docs})

    model, processor = create_model_and_processor(model_config_for(cfg, tokenizer_dir(cfg)), pretrained=True,
                                                  seed=cfg.train.seed)
    optim = build_optimizer(model, OptimConfig(lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                               module_lr={p: cfg.train.new_lr for p in NEW_MODULES} if cfg.train.new_lr else {}))
    steps = math.ceil(len(examples) / cfg.train.batch_size) * cfg.train.epochs
    sched = build_scheduler(optim, steps)
    embedding_grads = SparseEmbeddingGrads(model) if sparse_embeddings else None
    rates, profiles = [], []
    prof = StepProfile(profile)
    for epoch in range(cfg.train.epochs):
        t_epoch, n = time.perf_counter(), 0
        batches = iterate_batches(examples, processor, cfg.train.batch_size, cfg.train.seed, epoch)
        while True:
            with prof("collate"):
                batch = next(batches, None)
            if batch is None:
                break
            if profile:
                _profiled_train_step(model, batch, optim, sched, prof, compute_loss, embedding_grads)
                profiles.append(prof.pop())
            else:
                train_step(model, batch, optim, sched, embedding_grads=embedding_grads)
            n += len(batch.targets)
        rates.append(n / (time.perf_counter() - t_epoch))
    return rates, time.perf_counter() - t0, profiles


def _profiled_train_step(model, batch, optim, sched, prof, compute_loss, embedding_grads=None) -> None:
    """``ciea_model.training.train_step`` cut into the phases the Ray worker reports
    (``embedding_grads``: densify the sparse embedding gradients before the optimiser)."""
    from ciea_model.training import optimizer_step

    model.train()
    optim.zero_grad(set_to_none=True)
    with prof("forward"):
        out = compute_loss(model, batch)
    with prof("backward"):
        out.loss.backward()
    if embedding_grads is not None:
        with prof("allreduce"):
            embedding_grads.densify()
    with prof("optimizer"):
        optimizer_step(model, optim, sched)
    with prof("metrics"):
        float(out.loss.detach()), float(model.scale().detach())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("tiny", "demo"), default="demo")
    p.add_argument("--queries", type=int, default=256, help="training queries")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32, help="global batch (queries per step)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--inprocess-threads", type=int, help="torch threads of the in-process side (default: --workers)")
    p.add_argument("--gpu", action="store_true", help="one Ray Train worker on a GPU, bf16")
    p.add_argument("--profile", action="store_true",
                   help="also print each side's per-phase CPU and wall time per step (debug.profile)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--keep", action="store_true", help="keep the corpus and checkpoints (~0.6 GB) in /tmp")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import os

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from jobs.common import deep_merge
    from jobs.train import PRESETS
    from pipelines.train.config import TrainJobConfig

    work = Path(tempfile.mkdtemp(prefix="ciea-bench-train-"))
    _write_corpus(work / "data", args.queries, seed=11)
    workers = 1 if args.gpu else args.workers
    overrides = {
        "data": {"root": str(work / "data")},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "eval_every": 10**6, "patience": 10**6,
                  "log_every": 10**6, "shuffle_buffer": 0},
        "scaling": {"num_workers": workers, "threads_per_worker": 1, "cpus_per_worker": 0.5, "use_gpu": args.gpu},
        "run": {"name": "bench", "storage_path": str(work / "runs"), "progress": False, "max_failures": 0},
        "debug": {"probe": 0, "profile": args.profile},
    }
    cfg = TrainJobConfig.model_validate(deep_merge(PRESETS[args.preset], overrides))
    ray.init(num_cpus=max(2, workers), _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"),
             include_dashboard=False, log_to_driver=False)
    try:
        ray_rates, ray_wall, ray_summary = run_ray(cfg)
    finally:
        ray.shutdown()
    results = {"preset": args.preset, "queries": args.queries, "epochs": args.epochs, "batch_size": args.batch_size,
               "ray_workers": workers, "ray_epoch_samples_per_s": ray_rates, "ray_wall_s": round(ray_wall, 1)}
    if args.profile:
        results["ray_profile_ms"] = _summarise(ray_summary["profiles"])
    if not args.gpu:
        threads = args.inprocess_threads or args.workers
        local_rates, local_wall, local_profiles = run_inprocess(cfg, threads=threads, profile=args.profile)
        sparse_rates, sparse_wall, _ = run_inprocess(cfg, threads=threads, sparse_embeddings=True)
        if args.profile:
            results["inprocess_profile_ms"] = _summarise(local_profiles)
        steady = lambda r: statistics.median(r[1:] if len(r) > 1 else r)  # noqa: E731
        results.update(inprocess_threads=threads, inprocess_epoch_samples_per_s=local_rates,
                       inprocess_wall_s=round(local_wall, 1), ray_steady=steady(ray_rates),
                       inprocess_steady=steady(local_rates), ratio=steady(ray_rates) / steady(local_rates),
                       inprocess_sparse_epoch_samples_per_s=sparse_rates, inprocess_sparse_steady=steady(sparse_rates),
                       ratio_vs_sparse=steady(ray_rates) / steady(sparse_rates))
        print(f"\n{args.preset} preset, {args.queries} queries, batch {args.batch_size}, {args.epochs} epochs")
        print(f"Ray Train {workers} workers × 1 thread : {results['ray_steady']:.1f} samples/s "
              f"(epochs {', '.join(f'{r:.1f}' for r in ray_rates)}; end-to-end {ray_wall:.0f} s incl. start-up)")
        print(f"in-process 1 × {threads} threads     : {results['inprocess_steady']:.1f} samples/s "
              f"(epochs {', '.join(f'{r:.1f}' for r in local_rates)}; end-to-end {local_wall:.0f} s)")
        print(f"in-process, sparse embedding grads : {results['inprocess_sparse_steady']:.1f} samples/s "
              f"(epochs {', '.join(f'{r:.1f}' for r in sparse_rates)}; end-to-end {sparse_wall:.0f} s)")
        print(f"ratio Ray / in-process: {results['ratio']:.2f}; vs the sparse-gradient in-process loop: "
              f"{results['ratio_vs_sparse']:.2f} (goal ≥ 0.8)")
        if args.profile:
            print_profile(f"Ray Train rank 0 of {workers} (micro-batch {cfg.micro_batch})", results["ray_profile_ms"])
            print_profile(f"in-process, {threads} threads (batch {cfg.train.batch_size})", results["inprocess_profile_ms"])
    else:
        print(f"Ray Train on GPU (bf16): epochs {ray_rates} samples/s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.keep:
        print(f"corpus and checkpoints kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
