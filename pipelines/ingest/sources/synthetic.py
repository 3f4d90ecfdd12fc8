"""The synthetic corpus (``pipelines.synthetic``) as an ingest source.

Documents are generated on the workers, shard by shard over index ranges (any range is
independent of the rest), with PNG images inline. Queries and qrels come from
``generate_queries`` — the same ids and relevance as the demo.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from pipelines.synthetic import SPLITS, SyntheticConfig, generate_queries, iter_document_batches

from .base import BATCH_ROWS, Query, RawBuilder, Source


class SyntheticSource(Source):
    kind = "synthetic"

    def __init__(self, config: SyntheticConfig, rows_per_shard: int = 2000, name: str | None = None,
                 with_queries: bool = True) -> None:
        super().__init__(name)
        self.config = config
        self.rows_per_shard = rows_per_shard
        self.with_queries = with_queries
        self._queries: dict[str, list[dict]] | None = None

    def plan(self) -> list[dict[str, Any]]:
        n = self.config.num_documents
        return [{"start": lo, "stop": min(lo + self.rows_per_shard, n)}
                for lo in range(0, n, self.rows_per_shard)]

    def estimated_records(self) -> int | None:
        return self.config.num_documents

    def read(self, shard_index: int, spec: dict[str, Any]) -> Iterator[pa.Table]:
        builder = RawBuilder(self.name, shard_index)
        for batch in iter_document_batches(self.config, BATCH_ROWS, spec["start"], spec["stop"]):
            for i, row in enumerate(batch.to_pylist()):
                table = builder.add(
                    f"synthetic:{spec['start'] + i}",
                    doc_id=row["doc_id"], modality=row["modality"],
                    text=row["text"] or None, caption=row["caption"] or None, image=row["image"],
                    metadata=row["attributes"],
                )
                if table is not None:
                    yield table
        table = builder.flush()
        if table is not None:
            yield table

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
            yield Query(qid=q["qid"], query=q["query"], record_ref=f"synthetic:{q['qid']}",
                        metadata=json.loads(json.dumps(meta)))

    def iter_qrels(self, split: str) -> Iterator[tuple[str, str, int]]:
        for q in self._all_queries()[split]:
            for doc_id in q["positive_doc_ids"]:
                yield q["qid"], doc_id, 1
