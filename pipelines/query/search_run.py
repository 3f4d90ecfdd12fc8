"""``ciea search``'s run on a typed :class:`SearchConfig`: open the :class:`~pipelines.query.search.Searcher`
the config names, search a batch of queries (:func:`run`), and the results as a text table
or JSON (:func:`render_results`).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipelines.query.formatting import display, format_text_table
from pipelines.store import storage as storage_mod

if TYPE_CHECKING:
    from pipelines.query.search import Hit, Searcher


class TableSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    root: str = Field("data", description="data root; the LanceDB database is <root>/lancedb unless db is set")
    db: str | None = Field(None, description="LanceDB database folder, local or s3:// (default: <root>/lancedb)")
    name: str = Field("documents", pattern=r"^[A-Za-z0-9_.-]+$", description="table name")
    version: int | str | None = Field(None, description="table version number or tag (default: the `published` tag)")


class ModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: str | None = Field(None, description="checkpoint directory (default: the one recorded in the table; "
                                                     "its model_id must equal the table's)")
    device: Literal["cpu", "cuda"] = Field("cpu", description="device that encodes the queries")


class QuerySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(10, ge=1, le=10_000, description="results per query")
    mode: Literal["vector", "fts", "hybrid"] = Field("vector", description="vector, fts (BM25) or hybrid (RRF)")
    where_modality: Literal["image", "text"] | None = Field(None, description="only documents of this modality")
    where: list[str] = Field(default_factory=list, description="COLUMN=VALUE equality filters (typed by the column)")
    nprobes: int | None = Field(None, ge=1, description="ANN partitions probed (default: the stored index plan)")
    refine_factor: int | None = Field(None, ge=1, description="ANN re-rank factor (default: the stored index plan)")
    candidates: int | None = Field(None, ge=1, description="hybrid: candidates fused from each list (default max(k, 50))")


class OutputSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    json_output: bool = Field(False, description="print JSON instead of a table")
    width: int = Field(70, ge=10, description="table: longest caption/text excerpt")


class SearchConfig(storage_mod.StorageOptionsConfig):
    """The whole search command, validated before anything is opened."""

    model_config = ConfigDict(extra="forbid")
    legacy_storage_keys = ("table.storage_options",)
    table: TableSettings = Field(default_factory=TableSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    query: QuerySettings = Field(default_factory=QuerySettings)
    output: OutputSettings = Field(default_factory=OutputSettings)

    @property
    def db_uri(self) -> str:
        return self.table.db or storage_mod.join(storage_mod.normalise_uri(self.table.root), "lancedb")


def run(cfg: SearchConfig, queries: list[str], *, images: list[bytes] | None = None,
        likes: list[str] | None = None) -> tuple[Searcher, list[list[Hit]]]:
    """Opens the searcher and runs the batch: text ``queries``; or ``images`` (encoded
    pictures), each with the text of the same position in ``queries`` when there is one
    per picture; or ``likes`` ("more like this" these doc_ids, nothing else given).

    Returns:
        ``(searcher, one list of hits per query)``.

    Raises:
        SearchError: no such database, table, version, usable checkpoint or document, a bad
            filter or picture, with the fix.
    """
    from pipelines.query.search import Filter, Searcher, SearchError, parse_filter_pairs

    if likes and (images or queries):
        raise SearchError("--like takes doc_ids alone: drop the query text and --image")
    if images and queries and len(queries) != len(images):
        raise SearchError(f"{len(images)} picture(s) and {len(queries)} text(s): give one text per --image, or none")
    # Searcher.open refuses a missing or file --db before connecting: a read creates nothing.
    searcher = Searcher.open(cfg.db_uri, cfg.table.name, version=cfg.table.version, checkpoint=cfg.model.checkpoint,
                             storage_options=cfg.storage_options, device=cfg.model.device)
    q = cfg.query
    where = None
    if q.where_modality or q.where:
        where = Filter(modality=q.where_modality, equals=parse_filter_pairs(q.where, searcher.schema))
    settings = {"k": q.k, "mode": q.mode, "where": where, "nprobes": q.nprobes, "refine_factor": q.refine_factor}
    if likes:
        return searcher, searcher.search_like(likes, **settings)
    if images:
        return searcher, searcher.search_pictures(images, queries or None, **settings)
    return searcher, searcher.search_batch(queries, candidates=q.candidates, **settings)


def hit_record(hit: Any) -> dict[str, Any]:
    """A :class:`pipelines.query.search.Hit` as JSON-able fields (thumbnail as its size, no weights)."""
    return {"rank": hit.rank, "doc_id": hit.doc_id, "score": hit.score, "modality": hit.modality,
            "text": hit.text, "caption": hit.caption, "metadata": hit.metadata,
            "thumbnail_bytes": len(hit.thumbnail) if hit.thumbnail else 0}


def format_results(queries: list[str], results: list[list[Any]], header: str, width: int) -> str:
    """``header``, then per query a text table of its hits (caption or text cut at ``width``)."""
    blocks = [header]
    for q, hits in zip(queries, results, strict=True):
        blocks.append(f"\nquery: {q}")
        if not hits:
            blocks.append("  (no results)")
            continue
        rows = [(h.rank, round(h.score, 4), h.doc_id, h.modality,
                 display(h.caption if h.modality == "image" else (h.text or h.caption or ""), width)) for h in hits]
        blocks.append(format_text_table(["rank", "score", "doc_id", "modality", "caption / text"], rows, width))
    return "\n".join(blocks)


def render_results(cfg: SearchConfig, searcher: Any, queries: list[str], results: list[list[Any]]) -> str:
    """What ``ciea search`` prints: JSON when ``cfg.output.json_output``, else a header line
    (table, version, model, mode) and one text table per query."""
    if cfg.output.json_output:
        return json.dumps({
            "table": f"{searcher.db_uri}/{searcher.name}", "version": searcher.version, "tag": searcher.tag,
            "model_id": searcher.model_id, "mode": cfg.query.mode, "k": cfg.query.k,
            "results": [{"query": q, "hits": [hit_record(h) for h in hits]}
                        for q, hits in zip(queries, results, strict=True)]}, indent=1, ensure_ascii=False)
    at = f"tag {searcher.tag!r} = version {searcher.version}" if searcher.tag else f"version {searcher.version}"
    search_kind = "ANN" if searcher.has_ann else "exact"
    header = (f"{searcher.name} @ {at}, model_id {searcher.model_id}; mode {cfg.query.mode}"
              f"{f' ({search_kind})' if cfg.query.mode != 'fts' else ''}, k={cfg.query.k}")
    return format_results(queries, results, header, cfg.output.width)
