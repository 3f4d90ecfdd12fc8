"""The synthetic corpus (``pipelines.ingest.sources.synthetic.generator``) as an ingest source.

Documents are generated on the workers, shard by shard over index ranges (any range is
independent of the rest), with PNG images inline. Queries and qrels come from
``generate_queries`` — the same ids and relevance as the demo.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.ingest.sources.base import BATCH_ROWS, SHARD_SHIFT, Query, Source
from pipelines.ingest.sources.synthetic.generator import (
    COMPOSED_KIND,
    SPLITS,
    SyntheticConfig,
    document_image,
    generate_queries,
    iter_document_batches,
)
from pipelines.store import schema as S

#: Automatic shard size (``rows_per_shard=None``): the corpus in about ``AUTO_SHARDS``
#: shards, each ``AUTO_MIN_ROWS`` .. ``AUTO_MAX_ROWS`` documents. Measured on 2 idle cores
#: (100k documents): Ray Data leaves a worker idle ~0.2 s between two of its tasks, so
#: 2,000-document shards (~0.4 s of work each) kept the two workers busy only two thirds
#: of the time (13.1 s); 10,000-document shards (~2 s) brought it to 10.7 s. Several shards
#: per worker are still needed so the last ones (the cheap text documents come last) even
#: out the end, and a small corpus still spreads over a few workers.
AUTO_SHARDS = 8
AUTO_MIN_ROWS = 500
AUTO_MAX_ROWS = 10_000


def auto_rows_per_shard(num_documents: int) -> int:
    """Documents per shard when none is configured (see ``AUTO_SHARDS``)."""
    return max(AUTO_MIN_ROWS, min(AUTO_MAX_ROWS, -(-num_documents // AUTO_SHARDS)))


class SyntheticSource(Source):
    kind = "synthetic"

    def __init__(self, config: SyntheticConfig, rows_per_shard: int | None = None, name: str | None = None,
                 with_queries: bool = True) -> None:
        super().__init__(name)
        self.config = config
        self.rows_per_shard = rows_per_shard or auto_rows_per_shard(config.num_documents)
        self.with_queries = with_queries
        self._queries: dict[str, list[dict]] | None = None

    def plan(self) -> list[dict[str, Any]]:
        n = self.config.num_documents
        return [{"start": lo, "stop": min(lo + self.rows_per_shard, n)}
                for lo in range(0, n, self.rows_per_shard)]

    def estimated_records(self) -> int | None:
        return self.config.num_documents

    def read(self, shard_index: int, spec: dict[str, Any]) -> Iterator[pa.Table]:
        # Column by column: the generator already yields Arrow batches, so the raw table
        # is built without a Python object per record (the image bytes are never copied).
        seq = shard_index << SHARD_SHIFT
        index = spec["start"]
        for batch in iter_document_batches(self.config, BATCH_ROWS, spec["start"], spec["stop"]):
            yield raw_table(self.name, batch, index, seq)
            index += batch.num_rows
            seq += batch.num_rows

    # queries ----------------------------------------------------------------------------
    def query_splits(self) -> list[str]:
        return list(SPLITS) if self.with_queries else []

    def _all_queries(self) -> dict[str, list[dict]]:
        if self._queries is None:
            self._queries = generate_queries(self.config)
        return self._queries

    def iter_queries(self, split: str) -> Iterator[Query]:
        for q in self._all_queries()[split]:
            meta = {"kind": q["kind"], "target_doc_id": q["target_doc_id"],
                    "constraints": q["constraints"]}
            image = None
            if q["kind"] == COMPOSED_KIND:
                # The reference document's own picture travels with the query (inline bytes).
                meta.update({k: q[k] for k in ("reference_doc_id", "near_miss_doc_ids", "changed")})
                image = document_image(self.config, q["reference_doc_id"])
            yield Query(qid=q["qid"], query=q["query"], record_ref=f"synthetic:{q['qid']}",
                        metadata=json.loads(json.dumps(meta)), image=image)

    def iter_qrels(self, split: str) -> Iterator[tuple[str, str, int]]:
        for q in self._all_queries()[split]:
            for doc_id in q["positive_doc_ids"]:
                yield q["qid"], doc_id, 1


def raw_table(source: str, batch: pa.RecordBatch, first_index: int, first_seq: int) -> pa.Table:
    """A ``RAW_SCHEMA`` table from a batch of ``pipelines.ingest.sources.synthetic.generator.DOCUMENT_SCHEMA`` rows.

    Args:
        source: Source name stored with every row.
        batch: Generated documents ``first_index ..``.
        first_index: Global index of the batch's first document (its record ref).
        first_seq: ``seq`` of the batch's first row.
    """
    n = batch.num_rows
    null = pa.nulls(n, pa.string())
    return pa.table({
        S.SOURCE: pa.repeat(pa.scalar(source, pa.string()), n),
        S.RECORD_REF: [f"synthetic:{i}" for i in range(first_index, first_index + n)],
        S.SEQ: pa.array(range(first_seq, first_seq + n), pa.int64()),
        S.DOC_ID: batch["doc_id"],
        S.MODALITY: batch["modality"],
        # The generator writes "" for the half a document does not have; raw rows use null.
        S.TEXT: _empty_to_null(batch["text"]),
        S.CAPTION: _empty_to_null(batch["caption"]),
        S.IMAGE: batch["image"],
        S.IMAGE_URI: null,
        S.METADATA: batch["attributes"],
        S.ERROR: null,
        S.ERROR_DETAIL: null,
        S.RAW_EXCERPT: null,
    }, schema=S.RAW_SCHEMA)


def _empty_to_null(values: pa.Array) -> pa.Array:
    return pc.if_else(pc.equal(values, ""), pa.scalar(None, values.type), values)
