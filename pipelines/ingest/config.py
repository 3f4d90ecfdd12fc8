"""Typed settings of ``ciea ingest``'s run (:class:`IngestConfig`, run by
:func:`pipelines.ingest.runner.run`): the source, the output tables, the validation limits.

Nothing here knows about Ray's own settings (address, CPUs, session folder): the job that
calls the run owns Ray (``jobs/common.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.ingest.validation import Limits
from pipelines.store import storage as storage_mod

if TYPE_CHECKING:
    from pipelines.ingest.fetch import FetchSettings
    from pipelines.store.delta_tables import Tables

SourceKind = Literal["synthetic", "webqa", "edis", "manifest", "folder", "webdataset", "urls"]
#: The ``--source`` choices, in the order ``--help`` lists them.
SOURCE_KINDS: tuple[str, ...] = SourceKind.__args__  # type: ignore[attr-defined]


class SyntheticSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = Field(0, ge=0, description="corpus seed")
    num_image_docs: int = Field(2000, ge=1, description="image documents")
    num_text_docs: int = Field(1000, ge=0, description="text documents")
    num_queries: tuple[int, int, int] = Field((2000, 200, 400), description="train, dev, test queries")
    image_size: int = Field(64, ge=16, le=1024, description="rendered image side (px)")
    num_collections: int | None = Field(None, ge=1, le=40, description="collections in use (default: all 40)")
    p_caption_states: float = Field(0.35, ge=0, lt=1, description="chance a caption states each optional attribute")
    complementary_fraction: float = Field(0.5, ge=0, le=1, description="share of 'image' queries (need the image)")
    text_query_fraction: float = Field(0.3, ge=0, le=1, description="share of 'text' queries (text-document answers)")
    num_composed: tuple[int, int, int] = Field(
        (0, 0, 0), description="train, dev, test composed queries (reference image + modification text, kind "
                               "'composed'), in addition to num_queries")


class FetchOptions(BaseModel):
    """urls: how images are fetched (``pipelines.ingest.fetch``), per Ray Data read task."""

    model_config = ConfigDict(extra="forbid")
    concurrency: int = Field(16, ge=1, le=512, description="requests in flight per read task")
    per_host: int = Field(4, ge=1, description="requests in flight per host, per read task")
    connect_timeout_s: float = Field(5.0, gt=0, description="connect timeout (s)")
    read_timeout_s: float = Field(10.0, gt=0, description="timeout between two reads of a response (s)")
    total_timeout_s: float = Field(30.0, gt=0, description="deadline of one attempt, body included (s)")
    retries: int = Field(3, ge=0, le=20, description="more attempts on 429, 408, 5xx, timeouts, broken bodies")
    backoff_s: float = Field(0.5, ge=0, description="first backoff (s); doubles, full jitter")
    max_backoff_s: float = Field(8.0, ge=0, description="longest backoff (s)")
    max_retry_after_s: float = Field(30.0, ge=0, description="longest Retry-After honoured; a longer one gives up")
    max_redirects: int = Field(5, ge=0, description="redirects followed")
    max_mb: float = Field(16.0, gt=0, description="largest body (MiB), enforced while streaming")
    shard_kb: int = Field(256, ge=1, description="JSON-lines URL lists: bytes per read task (KiB)")
    refetch_failed: bool = Field(False, description="fetch again the URLs whose fetch failed in an earlier run")
    allow_private: bool = Field(
        False, description="also connect to loopback, private, link-local, multicast and reserved addresses "
                           "(off: such a URL, or a redirect there, is quarantined as fetch_blocked_address)")
    signed_urls: Literal["strip", "refuse"] = Field(
        "strip", description="a URL with userinfo or signature/token parameters: strip stores it with them "
                             "masked (the fetch still uses them); refuse quarantines it (signed_url_refused)")

    def settings(self) -> FetchSettings:
        from pipelines.ingest.fetch import FetchSettings

        return FetchSettings(**self.model_dump(exclude={"max_mb", "shard_kb", "refetch_failed"}),
                             max_bytes=int(self.max_mb * (1 << 20)))


class SourceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: SourceKind = Field("synthetic", description="source format: synthetic, webqa, edis, manifest, folder, "
                                                      "webdataset, urls")
    path: str | None = Field(None, description="source folder/file (local path or s3:// URI); not for synthetic")
    name: str | None = Field(None, description="label stored with every row (default: the kind)")
    images_dir: str | None = Field(None, description="edis: folder of candidate images (default <path>/images)")
    image_mode: Literal["inline", "uri"] = Field(
        "inline", description="store image bytes in Delta (inline) or their URI (uri: manifest, folder, edis)")
    shard_mb: float = Field(8.0, gt=0, description="line files: bytes per read shard, in MiB")
    rows_per_shard: int | None = Field(
        None, ge=1, description="synthetic: documents per read shard (default: the corpus in ~8 shards of "
                                "500..10000; Ray Data idles a worker ~0.2 s between tasks, so small shards cost)")
    files_per_shard: int = Field(500, ge=1, description="folder: images per read shard")
    shards_per_task: int = Field(1, ge=1, description="webdataset: tar shards per Ray Data read task")
    max_member_mb: float = Field(64.0, gt=0, description="webdataset: largest tar member (MiB); a larger one "
                                 "quarantines its sample unread")
    max_sample_mb: float = Field(96.0, gt=0, description="webdataset: largest sample, its members together "
                                 "(MiB); a larger one is quarantined (sample_too_large), the rest left unread")
    max_header_kb: int = Field(64, ge=1, le=1 << 20, description="webdataset: largest pax extended header or "
                               "GNU long name (KiB); a larger one quarantines its sample unread (header_too_large)")
    max_line_mb: float = Field(16.0, gt=0, description="line files (JSON lines, BEIR queries.jsonl and qrels): "
                               "longest line (MiB); a longer one is read past unheld and quarantined "
                               "(line_too_long)")
    queries: bool = Field(True, description="also ingest queries and qrels when the source has them")
    queries_path: str | None = Field(
        None, description="BEIR queries folder (queries.jsonl + qrels/<split>.tsv, graded scores kept) for "
                          "manifest, folder, webdataset and urls sources; local or s3://")
    full_snapshot: bool = Field(
        False, description="the source is complete: delete this source's documents that it no longer has "
                           "(a record that is now quarantined counts as gone)")
    allow_roots: list[str] = Field(
        default_factory=list, description="more folders or s3:// prefixes files may be read from, besides the "
                                          "source's own (a file outside them is quarantined as outside_root)")
    fetch_urls: bool = Field(False, description="manifest: fetch http(s):// images with the URL fetcher "
                                                "(source.fetch); off: such records are quarantined (url_not_fetched)")
    synthetic: SyntheticSettings = Field(default_factory=SyntheticSettings)
    fetch: FetchOptions = Field(default_factory=FetchOptions)

    @model_validator(mode="after")
    def _check(self) -> SourceSettings:
        if self.kind != "synthetic" and not self.path:
            raise ValueError(f"source.kind={self.kind!r} needs source.path (--path): the folder or file to read")
        if self.kind == "synthetic" and self.path:
            raise ValueError("source.path is not used by the synthetic source; drop --path or pick --source")
        if self.queries_path and self.kind in ("synthetic", "webqa", "edis"):
            raise ValueError(f"source.queries_path (--queries) is for manifest, folder, webdataset and urls "
                             f"sources; {self.kind} reads its own queries — drop --queries")
        if self.image_mode == "uri" and self.kind in ("synthetic", "webqa", "webdataset", "urls"):
            raise ValueError(f"source.image_mode=uri needs images addressable by URI; {self.kind} images "
                             "are generated or packed in imgs.tsv or tar shards — use inline")
        return self


class OutputSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    root: str = Field("data", description="data root: local path or s3://bucket/prefix; tables go under it")
    run_dir: str = Field("runs/ingest", description="local folder for the run summary and resolved config")
    target_file_mb: int = Field(16, ge=1, description="Delta data file size for new tables (MiB); "
                                "bounds the driver's memory during a merge")


class LimitsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_doc_id_chars: int = Field(512, ge=1, description="longest doc_id")
    max_text_chars: int = Field(100_000, ge=1, description="longest document text (characters)")
    max_caption_chars: int = Field(10_000, ge=1, description="longest caption (characters)")
    max_query_chars: int = Field(2_000, ge=1, description="longest query (characters)")
    max_image_bytes: int = Field(32 * 1024 * 1024, ge=1, description="largest encoded image (bytes)")
    max_image_pixels: int = Field(40_000_000, ge=1,
                                  description="largest width x height, checked on the header (bomb guard)")
    excerpt_chars: int = Field(200, ge=16, description="length of the excerpt kept in quarantine")

    def limits(self) -> Limits:
        return Limits(**self.model_dump(exclude={"max_query_chars"}))


class DedupeSettings(BaseModel):
    """Where the duplicate rule keeps the doc_ids accepted so far (``pipelines.ingest.dedupe``)."""

    model_config = ConfigDict(extra="forbid")
    distributed_min_records: int = Field(
        250_000, ge=0, description="keep the accepted ids in Ray actors, hash-partitioned, from this many on "
        "(a source that says its size starts there; others move there when they pass it); below, in the "
        "driver (≈ 100 B per document); 0: always in actors")
    ids_per_shard: int = Field(250_000, ge=1, description="accepted ids per actor the shard count is sized for")


class IngestConfig(storage_mod.StorageOptionsConfig):
    """The whole ingest, validated before Ray starts (Ray's own settings are the job's)."""

    model_config = ConfigDict(extra="forbid")
    legacy_storage_keys = ("output.storage_options",)
    source: SourceSettings = Field(default_factory=SourceSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    dedupe: DedupeSettings = Field(default_factory=DedupeSettings)
    progress: bool = Field(True, description="show progress bars")

    def tables(self) -> Tables:
        """The Delta handle of ``output.root`` with the storage options (made once per run)."""
        from pipelines.store.delta_tables import Tables

        return Tables(self.output.root, self.storage_options, self.output.target_file_mb * 1024 * 1024)
