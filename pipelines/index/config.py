"""Typed settings of the indexing runs: ``ciea embed`` (:class:`EmbedConfig`, run by
:func:`pipelines.index.build.run`) and the sections ``ciea reindex`` shares with it
(:mod:`pipelines.index.reindex` extends them).

Nothing here knows about Ray's own settings (address, CPUs, session folder): the job that
calls a run owns Ray (``jobs/common.py``) and hands the run a way to reach it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.store import storage as storage_mod

if TYPE_CHECKING:
    from pipelines.store.delta_tables import Tables


class InputSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    root: str = Field("data", description="data root holding corpus/documents (local path or s3://)")
    version: int | None = Field(None, ge=0, description="Delta version of corpus/documents to embed (default: latest)")


class ModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: str | None = Field(None, description="checkpoint directory written by ciea_model.save_checkpoint (required)")


class OutputSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    db: str | None = Field(None, description="LanceDB database folder (default: <root>/lancedb)")
    table: str = Field("documents", pattern=r"^[A-Za-z0-9_.-]+$", description="table name (one model_id per table)")
    tag: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$",
                            description="tag for the finished version (default: src<version>-<model_id>); "
                                        "`published` always moves to it too")
    run_dir: str = Field("runs/embed", description="local folder for summary.json and the resolved config")


class EncodeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when the cluster has GPUs")
    batch_size: int = Field(64, ge=1, description="documents per encoder call (GPU: 256-1024)")
    actors: int | None = Field(None, ge=1, description="encoder actors (default: one per GPU; CPU: one per "
                                                      "CPU, each single-threaded)")
    cpus_per_actor: float | None = Field(
        None, gt=0, description="CPUs reserved per CPU actor (Ray resource; default: one single-thread actor "
                                "per CPU, sharing all but one CPU between them, at most 1 each)")
    threads: int | None = Field(None, ge=1, description="torch threads per CPU actor (default: cpus_per_actor, at least 1)")
    bf16: bool = Field(True, description="GPU: autocast to bfloat16")
    max_retries: int = Field(2, ge=0, description="in-place retries of a failed batch (model stays loaded); "
                                                  "a dead actor is restarted by Ray regardless")


class PreprocessSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_rows: int = Field(256, ge=1, description="documents per preprocessing task call")
    thumbnail_px: int = Field(96, ge=0, le=1024, description="thumbnail long side in px (0: no thumbnails)")
    thumbnail_quality: int = Field(75, ge=1, le=95, description="thumbnail JPEG quality")
    read_blocks: int | None = Field(None, ge=1, description="Delta read blocks (default: Ray decides)")
    placement: Literal["auto", "tasks", "actor"] = Field(
        "auto", description="where images are decoded: tasks (CPU tasks beside the encoder actors), actor "
                            "(fused into the encoder actor), auto (tasks on GPU, actor on CPU: measured "
                            "cheaper when encoder and decoding share the same cores, BENCHMARKS.md)")


class WriteSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rows_per_fragment: int = Field(16384, ge=1, description="rows per Lance fragment written by a worker")
    commit_every_rows: int | None = Field(
        None, ge=1, description="commit every N rows (default: one commit per run; set it for long runs so "
                                "a crash loses at most N rows of work)")


class IndexSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ann: Literal["ivf_pq", "ivf_hnsw_sq", "none"] = Field("ivf_pq", description="ANN index type")
    min_rows_for_ann: int | None = Field(
        None, ge=256, description="below this many rows exact search is used, no ANN index (default: "
                                  "2 000 000 / dim, where exact search stops being as fast: 2 604 rows at 768-d)")
    enabled: bool = Field(True, description="build indexes after writing")


class FaultSettings(BaseModel):
    """Fault injection for tests and failure drills; leave unset in production."""

    model_config = ConfigDict(extra="forbid")
    encoder_at_batch: int | None = Field(None, ge=1, description="drill: an encoder fails on its N-th batch, once")
    encoder_mode: Literal["raise", "exit"] = Field("raise", description="drill: raise an error or kill the actor process")
    marker: str | None = Field(None, description="drill: file that makes the encoder fault happen once (created on fire)")
    crash_after_commits: int | None = Field(None, ge=1, description="drill: the job dies right after its N-th commit")

    @model_validator(mode="after")
    def _check(self) -> FaultSettings:
        if self.encoder_at_batch is not None and not self.marker:
            raise ValueError("fault.encoder_at_batch needs fault.marker (a file path that makes it fire once)")
        return self


class PlanSettings(BaseModel):
    """Where the run's plan (its diff of the Delta version's keys against the table's) is
    made: in the driver, or as a hash-partitioned Ray Data job (``pipelines.index.keydiff``)."""

    model_config = ConfigDict(extra="forbid")
    distributed_min_rows: int = Field(
        250_000, ge=0, description="plan on Ray (hash-partitioned, nothing per document in the driver) when the "
        "version and the table hold at least this many rows together; below, the driver diffs the keys (≈ 180 B "
        "per document, no shuffle start-up); 0: always on Ray")
    partitions: int | None = Field(None, ge=1, description="hash partitions of the Ray plan (default: one per "
                                   "250 000 rows, at least 2)")


def lance_db_uri(output: OutputSettings, input_: InputSettings) -> str:
    """``output.db``, or ``<input.root>/lancedb``."""
    return output.db or storage_mod.join(storage_mod.normalise_uri(input_.root), "lancedb")


class IndexRunConfig(storage_mod.StorageOptionsConfig):
    """What an embedding and a re-index run share: the object-store settings (top level;
    older configs' ``input.storage_options`` is moved there) and the handles they give."""

    legacy_storage_keys = ("input.storage_options",)
    input: InputSettings
    output: OutputSettings
    plan: PlanSettings = Field(default_factory=PlanSettings)

    def tables(self) -> Tables:
        """The Delta handle of ``input.root`` with the storage options (made once per run)."""
        from pipelines.store.delta_tables import Tables

        return Tables(self.input.root, self.storage_options)

    @property
    def db_uri(self) -> str:
        return lance_db_uri(self.output, self.input)


class EmbedConfig(IndexRunConfig):
    """The whole embedding run, validated before Ray starts."""

    model_config = ConfigDict(extra="forbid")
    input: InputSettings = Field(default_factory=InputSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    encode: EncodeSettings = Field(default_factory=EncodeSettings)
    preprocess: PreprocessSettings = Field(default_factory=PreprocessSettings)
    write: WriteSettings = Field(default_factory=WriteSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)
    fault: FaultSettings = Field(default_factory=FaultSettings)
    progress: bool = Field(True, description="show a progress bar")

    @model_validator(mode="after")
    def _check(self) -> EmbedConfig:
        if not self.model.checkpoint:
            raise ValueError("model.checkpoint is required: pass --checkpoint DIR (a directory written by "
                             "ciea_model.save_checkpoint, e.g. runs/demo/<variant>/checkpoint)")
        return self


# ---- the re-index job (``ciea reindex``): the embed groups plus its own -------------------
CrashPoint = Literal["planned", "deleted", "committed", "indexed", "recorded", "rebuilt"]

class ReindexOutputSettings(OutputSettings):
    run_dir: str = Field("runs/reindex", description="local folder for summary.json and the resolved config")


class ReindexIndexSettings(IndexSettings):
    max_drift: float = Field(0.25, ge=0, description="keep the trained ANN index (fold new rows in) while the "
                                                     "row count is within this fraction of the size it was "
                                                     "trained at; beyond, retrain it")


class ChangeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["auto", "diff"] = Field(
        "auto", description="auto: the Delta change data feed, or a full diff by content_sha256 when the feed "
                            "cannot cover the range; diff: always the full diff")
    read_max_docs: int = Field(
        10_000, ge=0, description="up to this many documents to embed, the job reads their rows itself (from "
                                  "the change feed's post-images, or a filtered scan of the version) and hands "
                                  "them to the pipeline; above, Ray reads the whole version and keeps them "
                                  "(the rows then never pass through the job's memory)")


class ReindexEncodeSettings(EncodeSettings):
    in_process_max_docs: int = Field(
        1000, ge=0, description="up to this many documents to embed, they are embedded in the job's own process "
                                "(same encoder and Lance writer, one commit) instead of a Ray Data run, whose "
                                "actor start-up and checkpoint load cost more than encoding a small change set; "
                                "needs encode.device usable here (cpu, or a local GPU). 0: always Ray")


class GateSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    split: str = Field("dev", pattern=r"^[A-Za-z0-9_.-]+$", description="query split the gate scores on "
                                                                        "(queries/<split>, qrels/<split>)")
    k: int = Field(10, ge=1, le=1000, description="the gate's metric is MRR@k")
    tolerance: float = Field(0.01, ge=0, description="promote when candidate MRR@k >= published MRR@k - tolerance")
    max_queries: int | None = Field(None, ge=1, description="score on the first N queries of the split (default all)")
    published_checkpoint: str | None = Field(
        None, description="checkpoint of the published version's model (default: the one recorded in its "
                          "table metadata, ciea.checkpoint)")
    missing_split: Literal["refuse", "promote"] = Field(
        "refuse", description="no such query split: refuse the candidate (default), or promote it unscored")


class ReindexFaultSettings(BaseModel):
    """Fault injection for tests and failure drills; leave unset in production."""

    model_config = ConfigDict(extra="forbid")
    crash_at: CrashPoint | None = Field(
        None, description="drill: the job dies right after this step (planned, deleted, committed, indexed, "
                          "recorded; rebuilt: after a new model's rows are committed)")


class ReindexConfig(IndexRunConfig):
    """The whole re-index run, validated before Ray starts."""

    model_config = ConfigDict(extra="forbid")
    input: InputSettings = Field(default_factory=InputSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    output: ReindexOutputSettings = Field(default_factory=ReindexOutputSettings)
    changes: ChangeSettings = Field(default_factory=ChangeSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    encode: ReindexEncodeSettings = Field(default_factory=ReindexEncodeSettings)
    preprocess: PreprocessSettings = Field(default_factory=PreprocessSettings)
    write: WriteSettings = Field(default_factory=WriteSettings)
    index: ReindexIndexSettings = Field(default_factory=ReindexIndexSettings)
    fault: ReindexFaultSettings = Field(default_factory=ReindexFaultSettings)
    progress: bool = Field(True, description="show a progress bar")
