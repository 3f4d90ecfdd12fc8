"""The loop every Ray Train worker runs (``TorchTrainer(train_loop_per_worker, ...)``):
:class:`TrainWorker`, built and run by :func:`train_loop_per_worker`.

Data parallelism: gradients are averaged by :class:`~pipelines.train.gradients.GradientReducer`
(why not DDP: see that module), and ranks start from rank 0's weights (broadcast), so
identical weights after every step follow; the integration test checks it.

Data: each rank reads its own dataset (:func:`pipelines.train.dataset.shard_name`) through
one iterator for the whole run, holding its rows of every epoch still to run in epoch order;
each row already carries that epoch's positive and hard negatives, drawn as pure functions
of (seed, epoch, qid) where the rows were built (:mod:`pipelines.train.draws`), so a resumed
run trains exactly the rows an uninterrupted one would (:class:`~pipelines.train.dataset.EpochRows`).

Everything a worker decides together with the others is decided collectively: the number
of micro-batches in a step (an all-reduce MIN, so ranks whose shards differ by a row never
diverge in their collective calls), early stopping (rank 0 evaluates, the decision is
broadcast), and ``ray.train.report`` (called by every rank at the same steps; only rank 0
attaches the checkpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipelines.train.checkpoints import BEST_DIR, OPTIM_FILE, PROBE_FILE, STATE_FILE
from pipelines.train.config import TrainJobConfig, check_identity, new_modules
from pipelines.train.curves import METRICS_FILE, MetricsLog
from pipelines.train.gradients import GradientReducer
from pipelines.train.profiling import StepProfile

logger = logging.getLogger(__name__)

#: Per-step sums a step returns (all ranks): loss·n, L_c·n, L_comp·n, correct, queries,
#: steps, candidates.
N_SUMS = 7


@dataclasses.dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint (:data:`STATE_FILE`) and resumed from."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # optimiser steps already taken in ``epoch``
    total_steps: int = 0
    best: float = -math.inf  # of the selection measure (``train.select_by``)
    best_step: int = -1
    bad_evals: int = 0
    evals: int = 0
    last_eval_step: int = -1
    initial_dev: float | None = None  # of the selection measure
    # Both dev measures of the kept checkpoint, and the initial MRR@10 (None in checkpoints
    # that predate them: those selected by MRR@10, so ``best``/``initial_dev`` hold it).
    best_dev_mrr10: float | None = None
    best_dev_in_batch_acc: float | None = None
    initial_dev_mrr10: float | None = None
    stopped_early: bool = False
    finished: bool = False


def dev_mrr10(model, processor, documents: Sequence, queries: Sequence[Mapping[str, Any]],
              device: torch.device | str = "cpu", corpus=None) -> float:
    """MRR@10 of ``queries`` ranked exhaustively by cosine over ``documents`` (on ``device``),
    with the evaluation code every other score of the project comes from (``corpus``: the
    documents already encoded, an ``EncodedCorpus``)."""
    from pipelines.query.evaluation import encode_corpus, rank
    from pipelines.query.metrics import evaluate_run

    if corpus is None:
        corpus = encode_corpus(model, processor, documents, device=device)
    run = rank(model, processor, corpus, queries, k=10, device=device)
    qrels = {x["qid"]: set(x["positive_doc_ids"]) for x in queries}
    return evaluate_run(run, qrels, ks_recall=(10,)).value("MRR@10")


def dev_positive(query: Mapping[str, Any], modality_of: Mapping[str, str]) -> str | None:
    """The positive a dev query is scored against in-batch, as training picks one (without
    the random draw): its ``target_doc_id``, else its first image positive, else its first
    positive (only those in the dev pool, ``modality_of``); ``None`` if none is there."""
    target = query.get("target_doc_id")
    if target and target in modality_of:
        return target
    there = [d for d in query["positive_doc_ids"] if d in modality_of]
    images = [d for d in there if modality_of[d] == "image"]
    return (images or there or [None])[0]


def dev_in_batch_accuracy(query_vectors: np.ndarray, doc_vectors: Mapping[str, np.ndarray],
                          positives: Sequence[str | None], batch_size: int) -> float:
    """The release's dev measure: the queries, in order, in batches of ``batch_size``; each
    query is correct when its own positive scores highest among the distinct positives of
    its batch (a document shared by two queries is one candidate, right for both; ties go to
    the earlier candidate, as ``argmax`` breaks them in training's ``in_batch_acc``).
    Queries without a positive in the pool (``None``) are left out.

    Args:
        query_vectors: (Q, D) unit query vectors.
        doc_vectors: doc_id → (D,) unit vector, holding every positive named.
        positives: per query, the doc id of its positive, or ``None``.
        batch_size: queries per batch (the training batch).

    Returns:
        The fraction correct in [0, 1] (0 with no scorable query).
    """
    keep = [i for i, d in enumerate(positives) if d is not None]
    correct = 0
    for start in range(0, len(keep), batch_size):
        rows = keep[start : start + batch_size]
        ids = list(dict.fromkeys(positives[i] for i in rows))  # distinct, in first-seen order
        cands = np.stack([doc_vectors[d] for d in ids])  # (C, D)
        scores = query_vectors[rows] @ cands.T  # (B, C)
        target = np.array([ids.index(positives[i]) for i in rows])
        correct += int((scores.argmax(axis=1) == target).sum())
    return correct / len(keep) if keep else 0.0


def dev_scores(model, processor, documents: Sequence, queries: Sequence[Mapping[str, Any]],
               batch_size: int, device: torch.device | str = "cpu") -> dict[str, float]:
    """Both dev measures from one encoding of ``documents``: ``dev_mrr10``
    (:func:`dev_mrr10`) and ``dev_in_batch_acc`` (:func:`dev_in_batch_accuracy`, batches of
    ``batch_size`` queries in their given order)."""
    from pipelines.query.evaluation import encode_corpus, encode_query_vectors

    corpus = encode_corpus(model, processor, documents, device=device)
    mrr = dev_mrr10(model, processor, documents, queries, device, corpus=corpus)
    modality_of = {d.doc_id: d.modality for d in documents}
    positives = [dev_positive(q, modality_of) for q in queries]
    row_of = {d: i for i, d in enumerate(corpus.doc_ids)}
    vectors = {d: corpus.vectors[row_of[d]] for d in set(positives) if d is not None}
    # Picture (composed) queries through the document tower, as rank() and search encode them.
    q = encode_query_vectors(model, processor, queries, device=str(device))
    return {"dev_mrr10": mrr, "dev_in_batch_acc": dev_in_batch_accuracy(q, vectors, positives, batch_size)}


#: Stage 0's selection measure, as the release keeps MARVEL's pretraining checkpoint: the
#: image–caption loss on held-out pairs (the dev pool's captioned images), lowest best;
#: ``LoopState.best`` holds its negative.
CAPTION_LOSS = "dev_caption_loss"


def dev_caption_loss(model, processor, documents: Sequence, batch_size: int) -> float | None:
    """Stage 0's loss (:func:`ciea_model.training.warmup_loss`) over the image documents of
    ``documents`` that have a caption, in their order, in batches of ``batch_size``,
    averaged per image; ``None`` when fewer than two such documents exist."""
    from ciea_model.training import warmup_loss

    images = [d for d in documents if d.modality == "image" and d.caption]
    total = count = 0.0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            if len(chunk) < 2:
                continue
            loss, _ = warmup_loss(model, processor, chunk)
            total, count = total + float(loss) * len(chunk), count + len(chunk)
    return total / count if count else None


def step_autocast(device: torch.device, bf16: bool):
    """The precision of the training forward: bfloat16 autocast on CUDA with ``train.bf16``
    (the projected patches and the extractor's ``w`` stay float32 inside it), else fp32
    (the release)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and bf16 else contextlib.nullcontext()


class TrainWorker:
    """One Ray Train worker: :meth:`setup` builds (or restores) the model, optimiser and
    loop state; :meth:`run` trains epoch by epoch (:meth:`step`), evaluates on dev
    (:meth:`evaluate`), checkpoints (:meth:`checkpoint`) and ends (:meth:`finish`).

    Args:
        config: the ``train_loop_config``: ``job`` (TrainJobConfig as a dict),
            ``model_config`` (CIEAConfig dict), ``identity``, ``fingerprint``, ``n_train`` (rows per epoch),
            ``dev_queries``, ``metrics_path``, ``marker_dir``.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        import ray.train
        import ray.train.torch

        self.config = config
        self.cfg = cfg = TrainJobConfig.model_validate(config["job"])
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(cfg.scaling.threads_per_worker)
        self.device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
        self.gather = self.world > 1 and dist.is_initialized()
        self.storage_options = cfg.storage_options or None
        self.dev_queries: list[dict[str, Any]] = config["dev_queries"]
        self.dev_docs: list | None = None
        self.autocast = step_autocast(self.device, cfg.train.bf16)
        self.prof = StepProfile(cfg.debug.profile and self.rank == 0)
        self.bar = None
        self.window = (0, time.perf_counter())  # samples and start time of the progress line

    # ---- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        """Model, optimiser, schedule and loop state, fresh or from Ray's latest checkpoint;
        every rank then holds rank 0's weights."""
        from ciea_model.training import OptimConfig, build_optimizer, seed_everything

        cfg = self.cfg
        seed_everything(cfg.train.seed)
        self._build_model()
        self.reducer = GradientReducer(self.model, self.world if self.gather else 1)
        fresh = new_modules(self.model.config, vision_pretrained=cfg.model.vision_state is not None)
        optim_cfg = OptimConfig(lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                max_grad_norm=cfg.train.max_grad_norm,
                                module_lr={p: cfg.train.new_lr for p in fresh} if cfg.train.new_lr else {})
        self.optimizer = build_optimizer(self.model, optim_cfg)
        per_rank = self.config["n_train"] // self.world
        steps_per_epoch = math.ceil(per_rank / (cfg.micro_batch * cfg.train.grad_accum)) or 1
        self.state = LoopState(total_steps=steps_per_epoch * cfg.train.epochs)
        if cfg.train.max_steps is not None:
            self.state.total_steps = min(self.state.total_steps, cfg.train.max_steps)
        metrics_path = self.config.get("metrics_path")
        self.log = MetricsLog(Path(metrics_path) if self.rank == 0 and metrics_path else None)
        self.best_dir = Path(tempfile.mkdtemp(prefix="ciea-best-"))
        resumed_from = self._restore()
        if self.gather:  # every rank starts from rank 0's weights, as DDP does
            self._broadcast_weights()
        if self.rank == 0:
            self.log.write({"event": "start", "resumed_from_step": resumed_from, "world_size": self.world,
                            "total_steps": self.state.total_steps, "steps_per_epoch": steps_per_epoch,
                            "time": time.time()})

    def _build_model(self) -> None:
        from safetensors.torch import load_file, load_model

        from ciea_model import CIEAConfig, create_model_and_processor
        from ciea_model.checkpoint import load_visual_module
        from ciea_model.training import freeze_for_warmup
        from pipelines.store.storage import is_remote, local_folder

        cfg = self.cfg
        model_cfg = CIEAConfig.from_dict(self.config["model_config"])
        tokenizer = model_cfg.text.tokenizer
        if tokenizer and is_remote(tokenizer):
            # The tiny preset's tokenizer on the run's storage: copied onto this worker's node for
            # the build (the checkpoint saves the loaded tokenizer, not the path).
            with local_folder(tokenizer, cfg.storage_options) as local:
                here = model_cfg.replace(text=dataclasses.replace(model_cfg.text, tokenizer=local))
                self.model, self.processor = create_model_and_processor(here, pretrained=True, seed=cfg.train.seed)
        else:
            self.model, self.processor = create_model_and_processor(model_cfg, pretrained=True, seed=cfg.train.seed)
        if cfg.train.init_from and self.config.get("init_visual_only"):
            # A stage-0 model (`ciea pretrain-vision`): its vision tower and projector only.
            load_visual_module(self.model, Path(cfg.train.init_from) / "model.safetensors")
        elif cfg.train.init_from:
            load_model(self.model, str(Path(cfg.train.init_from) / "model.safetensors"), strict=True)
        elif cfg.model.vision_state and self.model.vision is not None:
            # A pretrained ViT shared by every variant; univl-dr keeps its own projection.
            self.model.vision.load_encoder_state(load_file(cfg.model.vision_state))
        if cfg.train.stage == 0:  # MARVEL's visual pretraining: the LM (and extractor) frozen
            freeze_for_warmup(self.model)
        self.model.to(self.device)

    def _restore(self) -> int:
        """Resumes from Ray's checkpoint, if any (the schedule is built either way);
        returns the step resumed from (0: a fresh start)."""
        import ray.train
        from safetensors.torch import load_model

        from ciea_model.training import build_scheduler

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None and self.config.get("resume_from"):
            # Ray registered no checkpoint of this run (it was killed before its controller's
            # bookkeeping): the one the driver found on storage, as it told the user.
            from pipelines.train.checkpoints import checkpoint_at

            checkpoint = checkpoint_at(self.cfg.run.storage_path, self.config["resume_from"],
                                       self.cfg.storage_options)
        if checkpoint is None:
            self.scheduler = build_scheduler(self.optimizer, self.state.total_steps)
            return 0
        with checkpoint.as_directory() as ckpt_dir:
            ckpt = Path(ckpt_dir)
            saved = json.loads((ckpt / STATE_FILE).read_text())
            check_identity(saved["identity"], self.config["identity"], f"checkpoint {ckpt}")
            load_model(self.model, str(ckpt / "model.safetensors"), strict=True, device=str(self.device))
            self.state = LoopState(**{k: (-math.inf if k == "best" and v is None else v)
                                      for k, v in saved["loop"].items()})
            # The optimizer state holds tensors and numbers only: weights_only refuses anything else.
            opt = torch.load(ckpt / OPTIM_FILE, map_location=self.device, weights_only=True)
            self.optimizer.load_state_dict(opt["optimizer"])
            if self.rank == 0:
                if (ckpt / BEST_DIR).is_dir():
                    shutil.copytree(ckpt / BEST_DIR, self.best_dir, dirs_exist_ok=True)
                if not Path(self.log.path).exists() and (ckpt / METRICS_FILE).exists():
                    shutil.copy(ckpt / METRICS_FILE, self.log.path)
        self.scheduler = build_scheduler(self.optimizer, self.state.total_steps)
        self.scheduler.load_state_dict(opt["scheduler"])
        return self.state.step

    def _broadcast_weights(self) -> None:
        for t in self.model.state_dict().values():
            dist.broadcast(t, src=0)

    # ---- the loop ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any] | None:
        """Trains to the end (or early stop) and finishes; rank 0 returns the result."""
        import ray.train

        from pipelines.train.dataset import EpochRows, shard_name

        state, cfg = self.state, self.cfg
        # One iterator for the whole run: the shard holds this rank's rows of every epoch
        # still to run, in epoch order, each epoch's draws made where the rows were built.
        self.shard = ray.train.get_dataset_shard(shard_name(self.rank))
        self.rows = EpochRows(self.shard.iter_batches(batch_size=cfg.micro_batch, batch_format="pyarrow"),
                              cfg.micro_batch, shuffle=cfg.train.shuffle_buffer, seed=cfg.train.seed, rank=self.rank)
        stop = state.finished or state.stopped_early
        if not stop and state.step == 0 and state.evals == 0:
            stop = self.evaluate()  # the initial dev score: training must beat it
        self.window = (0, time.perf_counter())
        if self.rank == 0 and cfg.run.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.total_steps, initial=state.step, desc=f"train stage {cfg.train.stage}",
                            unit="step")
        while not stop and state.epoch < cfg.train.epochs and state.step < state.total_steps:
            if not self._run_epoch():
                break  # stopped early or out of steps: the final report follows
            state.epoch += 1
            state.batch_in_epoch = 0
            if state.epoch < cfg.train.epochs:
                self.checkpoint({"step": state.step, "epoch": state.epoch})  # the per-epoch checkpoint
        if self.bar is not None:
            self.bar.close()
        return self.finish()

    def _epoch_batches(self) -> Iterator:
        """This rank's micro-batches of the current epoch, past those already trained on."""
        cfg, state = self.cfg, self.state
        it = self.rows.epoch(state.epoch)
        for _ in range(state.batch_in_epoch * cfg.train.grad_accum):  # resuming mid-epoch
            next(it, None)
        return it

    def _next_micros(self, it: Iterator) -> list:
        """The next step's micro-batches, as many as every rank has (none: epoch over)."""
        with self.prof("fetch"):
            micros = [b for b in (next(it, None) for _ in range(self.cfg.train.grad_accum)) if b is not None]
        n_micro = torch.tensor([len(micros)])
        with self.prof("agree"):
            if self.gather:  # ranks agree on how many micro-batches (and so collective calls) follow
                dist.all_reduce(n_micro, op=dist.ReduceOp.MIN)
        return micros[: int(n_micro)]

    def _run_epoch(self) -> bool:
        """Steps through the current epoch; ``True`` when its data ran out (``False``:
        stopped early or out of steps)."""
        cfg, state = self.cfg, self.state
        epoch_sums = torch.zeros(N_SUMS, dtype=torch.float64)
        t_epoch = time.perf_counter()
        it = self._epoch_batches()
        exhausted = False
        while state.step < state.total_steps:
            t0 = time.perf_counter()
            self.prof.start()
            micros = self._next_micros(it)
            if not micros:
                exhausted = True
                break
            sums = self.step(micros)
            state.step += 1
            state.batch_in_epoch += 1
            seconds = time.perf_counter() - t0
            epoch_sums += sums
            self._log_step(sums, seconds)
            self._inject_fault()
            if state.step % cfg.train.eval_every == 0 and self.evaluate():
                state.stopped_early = True
                break
            if cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0:
                self.checkpoint({"step": state.step, "epoch": state.epoch,
                                 "loss": sums[0].item() / max(1.0, float(sums[4]))})
        if self.rank == 0 and epoch_sums[5] > 0:
            q = max(1.0, float(epoch_sums[4]))
            self.log.write({
                "event": "epoch", "epoch": state.epoch, "step": state.step, "loss": epoch_sums[0].item() / q,
                "loss_c": epoch_sums[1].item() / q, "loss_comp": epoch_sums[2].item() / q,
                "in_batch_acc": epoch_sums[3].item() / q, "lr": self.optimizer.param_groups[0]["lr"],
                "samples_per_s": float(epoch_sums[4]) / (time.perf_counter() - t_epoch)})
        return exhausted

    def step(self, micros: list) -> torch.Tensor:
        """One optimiser step over this rank's micro-batches; returns the summed metrics
        of all ranks (see :data:`N_SUMS`)."""
        from ciea_model.training import compute_loss, optimizer_step
        from pipelines.train.dataset import rows_to_examples

        prof = self.prof
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(N_SUMS, dtype=torch.float64)
        for mb in micros:
            with prof("rows"):
                examples = rows_to_examples(mb, self.storage_options)
            if self.cfg.debug.trace_rows:
                self._trace(examples)
            if self.cfg.train.stage == 0:
                sums += self._warmup_micro(examples, len(micros))
                continue
            with prof("collate"):
                batch = self.processor.collate_training(examples).to(self.device)
            with prof("forward"), self.autocast:
                out = compute_loss(self.model, batch, gather=self.gather)
            with prof("backward"):
                (out.loss / len(micros)).backward()
            with prof("metrics"):
                # In-batch accuracy over the global pool, from L_c's own logits (no second gather).
                count = out.queries
                sums += torch.tensor([float(out.loss.detach()) * count, out.contrastive * count,
                                      out.complementary * count, out.correct, count, 0, len(batch.doc_ids)],
                                     dtype=torch.float64)
        with prof("grad_allreduce"):
            self.reducer.reduce()
        with prof("optimizer"):
            optimizer_step(self.model, self.optimizer, self.scheduler, self.cfg.train.max_grad_norm)
        with prof("metrics_allreduce"):
            if self.gather:
                dist.all_reduce(sums)
        sums[5] = 1
        return sums

    def _warmup_micro(self, examples: list, n_micro: int) -> torch.Tensor:
        """Stage 0's micro-batch: each example's positive is an image document, aligned with
        its own caption (:func:`ciea_model.training.warmup_loss`, candidates gathered from
        every rank). Returns its sums (:data:`N_SUMS`; L_comp is 0, accuracy is image →
        caption)."""
        from ciea_model.training import warmup_loss

        docs = [ex.positive for ex in examples]
        with self.prof("forward"), self.autocast:
            loss, correct = warmup_loss(self.model, self.processor, docs, gather=self.gather)
        with self.prof("backward"):
            (loss / n_micro).backward()
        n = len(docs)
        value = float(loss.detach())
        return torch.tensor([value * n, value * n, 0.0, correct, n, 0, n],
                            dtype=torch.float64)

    def _trace(self, examples: list) -> None:
        """``debug.trace_rows``: the examples of this micro-batch, as the step trains them."""
        marker_dir = self.config.get("marker_dir")
        if marker_dir is None:
            return
        state = self.state
        with (Path(marker_dir) / f"trace-rank{self.rank}.jsonl").open("a") as f:
            for ex in examples:
                comp = (self.processor.query_minus_caption(ex.query, ex.positive_captions)
                        if ex.positive.modality == "image" else None)
                f.write(json.dumps({"epoch": state.epoch, "step": state.step + 1, "qid": ex.qid,
                                    "positive": ex.positive.doc_id, "negatives": [d.doc_id for d in ex.negatives],
                                    "comp_captions": sorted(ex.positive_captions), "q_comp": comp}) + "\n")

    def _log_step(self, sums: torch.Tensor, seconds: float) -> None:
        """Rank 0: the step's record, the progress bar and, every ``log_every`` steps, a line."""
        samples, t_window = self.window
        self.window = (samples + int(sums[4]), t_window)
        if self.rank != 0:
            return
        state, q = self.state, max(1.0, float(sums[4]))
        loss, acc = sums[0].item() / q, sums[3].item() / q
        record = {"event": "step", "step": state.step, "epoch": state.epoch, "loss": loss,
                  "loss_c": sums[1].item() / q, "loss_comp": sums[2].item() / q, "in_batch_acc": acc,
                  "lr": self.optimizer.param_groups[0]["lr"], "samples_per_s": float(sums[4]) / seconds,
                  "queries": int(sums[4]), "seconds": seconds, "candidates": int(sums[6]),
                  "logit_scale": float(self.model.scale().detach())}
        if self.prof.enabled:
            record["profile"] = self.prof.pop()
        self.log.write(record)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.2f}")
        if state.step % self.cfg.train.log_every == 0:
            samples, t_window = self.window
            elapsed = time.perf_counter() - t_window
            logger.info("step %d/%d epoch %d: loss %.4f, in-batch acc %.3f, %.1f samples/s",
                        state.step, state.total_steps, state.epoch, loss, acc, samples / max(elapsed, 1e-9))
            self.window = (0, time.perf_counter())

    def _inject_fault(self) -> None:
        # Test hook: raise once (a marker file beside the checkpoints remembers it) so that
        # Ray Train restarts the worker group from the latest checkpoint.
        cfg, step = self.cfg, self.state.step
        if cfg.debug.fail_at_step != step or self.rank != cfg.debug.fail_rank or self.config.get("marker_dir") is None:
            return
        marker = Path(self.config["marker_dir"]) / f".fault-injected-step-{step}"
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("injected\n")
            raise RuntimeError(f"injected fault at step {step} (debug.fail_at_step)")

    # ---- dev evaluation ----------------------------------------------------------------------
    def evaluate(self) -> bool:
        """Rank 0 scores dev (keeping the best weights); every rank returns the broadcast
        decision to stop (the stage's patience: evaluations without gain in
        ``train.select_by``)."""
        decision = torch.zeros(2)
        if self.rank == 0:
            score = self._score_dev()
            decision[0] = float(self.state.bad_evals >= self.cfg.train.effective_patience)
            decision[1] = score
        if self.gather:
            dist.broadcast(decision, src=0)
        self.state.last_eval_step = self.state.step
        self.model.train()
        return bool(decision[0] > 0)

    def _score_dev(self) -> float:
        from ciea_model import save_checkpoint

        state, select_by = self.state, self.select_by
        docs = self._dev_documents()
        t0 = time.perf_counter()
        scores = dev_scores(self.model, self.processor, docs, self.dev_queries, self.cfg.train.batch_size, self.device)
        if select_by == CAPTION_LOSS:
            scores[CAPTION_LOSS] = dev_caption_loss(self.model, self.processor, docs, self.cfg.train.batch_size)
            if scores[CAPTION_LOSS] is None:  # no captioned image in the dev pool: the run's other measure
                logger.warning("stage 0: the dev pool holds no two captioned images; keeping the checkpoint by %s",
                               self.cfg.train.select_by)
                select_by = self.cfg.train.select_by
        score = -scores[CAPTION_LOSS] if select_by == CAPTION_LOSS else scores[select_by]
        state.evals += 1
        if state.initial_dev is None:
            state.initial_dev = score
        if state.initial_dev_mrr10 is None:
            state.initial_dev_mrr10 = scores["dev_mrr10"]
        if score > state.best:
            state.best, state.best_step, state.bad_evals = score, state.step, 0
            state.best_dev_mrr10, state.best_dev_in_batch_acc = scores["dev_mrr10"], scores["dev_in_batch_acc"]
            shutil.rmtree(self.best_dir, ignore_errors=True)
            save_checkpoint(self.model, self.processor, self.best_dir,
                            metadata={**scores, "select_by": select_by, "step": state.step})
        else:
            state.bad_evals += 1
        self.log.write({"event": "eval", "step": state.step, "epoch": state.epoch, **scores, "select_by": select_by,
                        "best": state.best, "best_dev_mrr10": self._best_mrr10(), "best_step": state.best_step,
                        "seconds": time.perf_counter() - t0})
        logger.info("step %d: dev MRR@10 %.4f, dev in-batch acc %.4f (best %s %.4f at step %d)", state.step,
                    scores["dev_mrr10"], scores["dev_in_batch_acc"], select_by, state.best, state.best_step)
        return score

    @property
    def select_by(self) -> str:
        """The dev measure that keeps the best checkpoint: ``train.select_by``; in stage 0,
        the held-out image–caption loss (:data:`CAPTION_LOSS`), as the release selects."""
        return CAPTION_LOSS if self.cfg.train.stage == 0 else self.cfg.train.select_by

    def _best_mrr10(self) -> float:
        """Dev MRR@10 of the kept checkpoint (``best`` itself in checkpoints that predate
        ``best_dev_mrr10``: they were selected by it)."""
        s = self.state
        return s.best_dev_mrr10 if s.best_dev_mrr10 is not None else s.best

    def _initial_mrr10(self) -> float | None:
        s = self.state
        return s.initial_dev_mrr10 if s.initial_dev_mrr10 is not None else s.initial_dev

    def _dev_documents(self) -> list:
        """The dev pool (rank 0), read once, images already transformed."""
        import ray.train

        from pipelines.store.documents import batch_to_documents

        if self.dev_docs is None:
            self.dev_docs = []
            for b in ray.train.get_dataset_shard("dev").iter_batches(batch_format="pyarrow", batch_size=256):
                self.dev_docs += batch_to_documents(b, storage_options=self.storage_options,
                                                    image_transform=self.processor.image_transform).require()
        return self.dev_docs

    # ---- checkpoints and the end -------------------------------------------------------------
    def checkpoint(self, metrics: dict[str, Any], final: bool = False) -> None:
        """Every rank reports; rank 0 attaches the checkpoint (model + state + best + log)."""
        import ray.train

        from ciea_model import model_id, save_checkpoint

        if self.rank != 0:
            ray.train.report(metrics)
            return
        state = self.state
        tmp = Path(tempfile.mkdtemp(prefix="ciea-ckpt-"))
        try:
            save_checkpoint(self.model, self.processor, tmp, metadata={
                "step": state.step, "epoch": state.epoch, "stage": self.cfg.train.stage, "final": final})
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       tmp / OPTIM_FILE)
            if (self.best_dir / "model.safetensors").exists():
                shutil.copytree(self.best_dir, tmp / BEST_DIR)
            if Path(self.log.path).exists():
                shutil.copy(self.log.path, tmp / METRICS_FILE)
            loop = dataclasses.asdict(state)
            loop["best"] = None if loop["best"] == -math.inf else loop["best"]
            if final:
                self._write_probe(tmp)
            (tmp / STATE_FILE).write_text(json.dumps({
                "identity": self.config["identity"], "fingerprint": self.config["fingerprint"], "loop": loop,
                "step": state.step, "finished": state.finished, "model_id": model_id(self.model)},
                indent=2, sort_keys=True))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
            self.log.write({"event": "checkpoint", "step": state.step, "epoch": state.epoch, "final": final})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _write_probe(self, directory: Path) -> None:
        # Vectors the trained model gives a few dev queries and documents, so that a test
        # (or a user) can check that the checkpoint reloads into the very same encoder.
        from safetensors.torch import save_file

        from ciea_model.inference import encode_documents, encode_queries

        n = self.cfg.debug.probe
        if not n or self.dev_docs is None:
            return
        queries, docs = self.dev_queries[:n], self.dev_docs[:n]
        qv = encode_queries(self.model, self.processor, [q["query"] for q in queries], device=self.device)
        dv = encode_documents(self.model, self.processor, docs, device=self.device)
        save_file({"queries": torch.from_numpy(qv), "documents": torch.from_numpy(dv)}, str(directory / PROBE_FILE),
                  metadata={"qids": json.dumps([q["qid"] for q in queries]),
                            "doc_ids": json.dumps([d.doc_id for d in docs])})

    def finish(self) -> dict[str, Any] | None:
        """Unless a finished run was resumed: the final evaluation, every rank back on the
        best weights, and the final checkpoint. Rank 0 returns the result."""
        state = self.state
        if not state.finished:
            if not state.stopped_early and state.last_eval_step != state.step:
                self.evaluate()  # the final weights get their evaluation too
            ids = self._rank_model_ids()
            self._restore_best()
            state.finished = True
            summary = {"step": state.step, "best_dev_mrr10": self._best_mrr10(), "best_step": state.best_step,
                       "initial_dev_mrr10": self._initial_mrr10(), "stopped_early": state.stopped_early,
                       "select_by": self.select_by, "best": state.best,
                       "best_dev_in_batch_acc": state.best_dev_in_batch_acc, "rank_model_ids": ids, "final": True}
            if self.rank == 0:
                self.log.write({"event": "end", **summary})
            self.checkpoint(summary, final=True)
        shutil.rmtree(self.best_dir, ignore_errors=True)
        self.log.close()  # a temporary log (no local run folder): its copies are in the checkpoints
        if self.rank == 0:
            return {"step": state.step, "best_dev_mrr10": self._best_mrr10(),
                    "initial_dev_mrr10": self._initial_mrr10(), "select_by": self.select_by,
                    "best": state.best, "best_dev_in_batch_acc": state.best_dev_in_batch_acc,
                    "stopped_early": state.stopped_early}
        return None

    def _rank_model_ids(self) -> list[str | None]:
        """Every rank's weight hash (they must all agree)."""
        from ciea_model import model_id

        mine = model_id(self.model)
        if not self.gather:
            return [mine]
        ids: list[str | None] = [None] * self.world
        dist.all_gather_object(ids, mine)
        return ids

    def _restore_best(self) -> None:
        # The best weights, loaded on every rank, so that all end on the same model.
        from safetensors.torch import load_model

        best_weights = self.best_dir / "model.safetensors"
        flag = torch.tensor([1.0 if self.rank == 0 and best_weights.exists() else 0.0])
        if self.gather:
            dist.broadcast(flag, src=0)
        if flag.item():
            if self.rank == 0:
                load_model(self.model, str(best_weights), strict=True, device=str(self.device))
            if self.gather:
                self._broadcast_weights()


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """The Ray Train worker function (see :class:`TrainWorker` for ``config``)."""
    worker = TrainWorker(config)
    worker.setup()
    return worker.run()
