"""Typed settings of ``ciea evaluate``'s run (:class:`EvaluateConfig`, run by
:func:`pipelines.query.evaluation_run.run`): the query split, the variants scored side by
side (a LanceDB table in a search mode, or a checkpoint), the metrics, the search and the
outputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.store import storage as storage_mod

if TYPE_CHECKING:
    from pipelines.store.delta_tables import Tables


class InputSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    root: str = Field("data", description="data root holding queries/<split>, qrels/<split> and corpus/documents")
    split: str = Field("test", pattern=r"^[A-Za-z0-9_.-]+$", description="query split to score")
    corpus_version: int | None = Field(
        None, ge=0, description="corpus/documents version that checkpoint variants encode and answer modalities "
                                "come from (default: latest)")


class VariantSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.+-]+$", description="label in the report (and run file name)")
    table: str | None = Field(None, description="<db>/<table>[@version|@tag] of a LanceDB table (default version: "
                                                "the published one)")
    mode: Literal["vector", "fts", "hybrid"] = Field("vector", description="table search mode (fts = BM25)")
    checkpoint: str | None = Field(None, description="checkpoint directory: encode corpus/documents in-process "
                                                     "(instead of a table)")
    query_checkpoint: str | None = Field(None, description="table variants: checkpoint that encodes the queries "
                                                           "(default: the one recorded in the table)")

    @model_validator(mode="after")
    def _check(self) -> VariantSettings:
        if (self.table is None) == (self.checkpoint is None):
            raise ValueError(f"variant {self.name!r}: give exactly one of table (e.g. table:data/lancedb/documents) "
                             "or checkpoint (e.g. checkpoint:runs/demo/train/ciea-s2/model)")
        if self.checkpoint is not None and self.mode != "vector":
            raise ValueError(f"variant {self.name!r}: a checkpoint variant ranks by vector only; mode "
                             f"{self.mode!r} needs a table (--variant {self.name}={self.mode}:<db>/<table>)")
        if self.table is not None:
            parse_table_spec(self.table)
        return self

    @property
    def table_spec(self) -> tuple[str, str, int | str | None]:
        return parse_table_spec(self.table or "")


class MetricSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mrr: list[int] = Field([10, 20], description="MRR cutoffs")
    ndcg: list[int] = Field([10, 20], description="NDCG cutoffs")
    recall: list[int] = Field([1, 5, 20, 100], description="Recall cutoffs (trec_eval recall_k: share of the "
                              "relevant documents in the top k; Recall@1 <= 1/#relevant)")
    success: list[int] = Field([1, 5, 20, 100], description="Success cutoffs (trec_eval success_k: 1 if any relevant "
                               "document is in the top k; the release's 'Recall@1' is Success@1)")
    graded_ndcg: list[int] = Field([10, 20], description="graded NDCG cutoffs (gNDCG@k: trec_eval ndcg_cut "
                                   "with gain = the qrels grade)")
    group_by: list[str] = Field(["kind"], description="query metadata keys to split the report by (synthetic: kind)")
    answer_modality: bool = Field(True, description="also split by the modality of the relevant documents")
    charts: list[str] = Field(["MRR@10"], description="metrics drawn as PNG bar charts (groups x variants)")
    composed_baselines: bool = Field(
        True, description="queries that carry a picture (composed: reference image + modification text): also "
        "rank them by the image alone, the text alone and their late fusion (normalised sum), beside the model's "
        "composed encoding (groups composed=image-only/text-only/late-fusion/model)")
    webqa_image_protocol: Literal["shared-index", "release"] = Field(
        "shared-index", description="image-answer queries: 'shared-index' scores them only in the one index of "
        "every document (group modality=image); 'release' also ranks them against the image documents alone, "
        "the release's separate WebQA-Image index (group image-index)")

    @model_validator(mode="after")
    def _check(self) -> MetricSettings:
        for name in ("mrr", "ndcg", "recall", "graded_ndcg", "success"):
            bad = [k for k in getattr(self, name) if k < 1]
            if bad:
                raise ValueError(f"metrics.{name} cutoffs must be >= 1, got {bad}")
        if not (self.mrr or self.ndcg or self.recall or self.success):
            raise ValueError("no metric cutoff at all: give metrics.mrr, metrics.ndcg, metrics.recall or "
                             "metrics.success")
        names = self.names
        unknown = [c for c in self.charts if c not in names]
        if unknown:
            raise ValueError(f"metrics.charts {unknown} are not computed; chart some of {names}")
        return self

    @property
    def names(self) -> list[str]:
        from pipelines.query.metrics import metric_names

        return metric_names(self.mrr, self.ndcg, self.recall, self.graded_ndcg, self.success)

    @property
    def max_k(self) -> int:
        return max((*self.mrr, *self.ndcg, *self.recall, *self.graded_ndcg, *self.success), default=1)


class SearchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int | None = Field(None, ge=1, description="documents retrieved per query (default: the largest cutoff)")
    batch_size: int = Field(64, ge=1, description="queries per search / encoder call")
    doc_batch_size: int = Field(64, ge=1, description="checkpoint variants: documents per encoder call")
    nprobes: int | None = Field(None, ge=1, description="ANN probes (default: the table's stored plan)")
    refine_factor: int | None = Field(None, ge=1, description="ANN re-ranking factor (default: the stored plan)")
    device: Literal["cpu", "cuda"] = Field("cpu", description="torch device for query / corpus encoding")
    threads: int | None = Field(None, ge=1, description="torch threads (default: torch decides)")


class OutputSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    out: str = Field("runs/evaluate", description="folder for report.json, report.md, charts, TREC runs")
    per_query: bool = Field(True, description="store every query's values in report.json")
    trec: bool = Field(True, description="write qrels.txt and runs/<variant>.txt in TREC format")


class EvaluateConfig(storage_mod.StorageOptionsConfig):
    """The whole evaluation, validated before anything is opened."""

    model_config = ConfigDict(extra="forbid")
    legacy_storage_keys = ("input.storage_options",)
    input: InputSettings = Field(default_factory=InputSettings)
    variants: list[VariantSettings] = Field(
        default_factory=list, description="what to score: a list of {name, table: <db>/<table>[@version|@tag], "
                                          "mode: vector|fts|hybrid, query_checkpoint} or {name, checkpoint: DIR}")
    metrics: MetricSettings = Field(default_factory=MetricSettings)
    search: SearchSettings = Field(default_factory=SearchSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    max_missing_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="share of the judged documents a variant may lack (they rank nowhere)")
    progress: bool = Field(True, description="show progress bars")

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        if not self.variants:
            raise ValueError("no variant to evaluate: pass --variant NAME=KIND:WHERE, e.g. "
                             "--variant ciea=table:data/lancedb/documents --variant bm25=fts:data/lancedb/documents")
        names = [v.name for v in self.variants]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variant names {dup} are used twice; every variant needs its own name")
        if self.search.k is not None and self.search.k < self.metrics.max_k:
            raise ValueError(f"search.k={self.search.k} is below the largest cutoff {self.metrics.max_k}: "
                             f"raise it or drop that cutoff")
        return self

    @property
    def k(self) -> int:
        return self.search.k or self.metrics.max_k

    def tables(self) -> Tables:
        """The Delta handle of ``input.root`` with the storage options (made once per run)."""
        from pipelines.store.delta_tables import Tables

        return Tables(self.input.root, self.storage_options)


def parse_table_spec(spec: str) -> tuple[str, str, int | str | None]:
    """``"<db>/<table>[@version|@tag]"`` → ``(db_uri, table, version)``; ``version`` is an int,
    a tag name, or ``None`` (the published version).

    Raises:
        ValueError: no ``/`` between database and table, or an empty part, with an example.
    """
    path, at, version = spec.rpartition("@") if "@" in spec.rsplit("/", 1)[-1] else (spec, "", "")
    db, slash, table = path.rpartition("/")
    if not slash or not db or not table or (at and not version):
        raise ValueError(f"table {spec!r}: expected <db>/<table>[@version|@tag], e.g. data/lancedb/documents "
                         "or data/lancedb/documents@published or s3://bucket/lancedb/documents@12")
    return db, table, (int(version) if version.isdigit() else version) if at else None
