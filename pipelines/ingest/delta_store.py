"""The Delta tables ingest writes, and the merges that make re-runs idempotent.

Layout under the data root (a local path or ``s3://`` URI)::

    corpus/documents     one row per document, keyed by doc_id, change data feed on
    corpus/quarantine    every rejected record, keyed by quarantine_id
    queries/<split>      one row per query, keyed by qid
    qrels/<split>        (qid, doc_id, relevance), keyed by (qid, doc_id)

Every write is a ``MERGE``, so running the same ingest twice — or again after a crash at any
point — converges on the table one clean run writes:

* documents: insert new doc_ids, update a doc_id whose ``content_sha256`` changed, leave the
  rest untouched (a re-ingest of unchanged content commits nothing: the version stays);
* quarantine: insert a ``quarantine_id`` not seen before, never rewrite one;
* queries / qrels: insert new keys, update changed ones.

A merge is one atomic Delta commit: a run killed mid-merge leaves the table at its previous
version.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from . import schema as S
from . import storage

logger = logging.getLogger(__name__)

CDF_CONFIG = {"delta.enableChangeDataFeed": "true"}
#: Data files of about this size: the Delta writer buffers a file's rows before writing
#: it, so the target bounds the driver's memory during a merge (measured: 8 MiB keeps a
#: 600k-row merge flat at ~270 MiB; deltalake's default ~100 MiB grows it past 800 MiB).
DEFAULT_TARGET_FILE_BYTES = 16 * 1024 * 1024


class Tables:
    """URIs of the ingest tables under one data root."""

    def __init__(self, root: str, storage_options: dict[str, str] | None = None,
                 target_file_bytes: int = DEFAULT_TARGET_FILE_BYTES) -> None:
        self.root = storage.normalise_uri(root)
        self.storage_options = dict(storage_options or {})
        self.target_file_bytes = target_file_bytes

    @property
    def documents(self) -> str:
        return storage.join(self.root, "corpus", "documents")

    @property
    def quarantine(self) -> str:
        return storage.join(self.root, "corpus", "quarantine")

    def queries(self, split: str) -> str:
        return storage.join(self.root, "queries", split)

    def qrels(self, split: str) -> str:
        return storage.join(self.root, "qrels", split)

    def open(self, uri: str) -> DeltaTable:
        return DeltaTable(uri, storage_options=self.storage_options or None)

    def version(self, uri: str) -> int | None:
        try:
            return self.open(uri).version()
        except TableNotFoundError:
            return None

    def ensure(self, uri: str, schema: pa.Schema) -> DeltaTable:
        """Open the table, creating it (change data feed on) if it does not exist.

        Raises:
            ValueError: The existing table's columns differ from ``schema``, with the fix.
        """
        try:
            table = self.open(uri)
        except TableNotFoundError:
            logger.info("creating Delta table %s", uri)
            config = {**CDF_CONFIG, "delta.targetFileSize": str(self.target_file_bytes)}
            return DeltaTable.create(uri, schema, configuration=config,
                                     storage_options=self.storage_options or None)
        have = [f.name for f in table.schema().fields]
        if have != schema.names:
            raise ValueError(
                f"Delta table {uri} has columns {have}, this ingest writes {schema.names}; "
                "point output.root at a new location or migrate the table")
        return table

    def read(self, uri: str, columns: list[str] | None = None) -> pa.Table:
        """The whole table as plain Arrow types (for tests and small tables)."""
        return plain_types(pa.table(self.open(uri).to_pyarrow_table(columns=columns)))

    def changes(self, uri: str, starting_version: int, ending_version: int | None = None) -> pa.Table:
        """Change data feed rows (``_change_type``, ``_commit_version``) as plain Arrow types."""
        reader = self.open(uri).load_cdf(starting_version=starting_version, ending_version=ending_version)
        return plain_types(pa.table(reader))


def plain_types(table: pa.Table) -> pa.Table:
    """Casts deltalake's view types (``string_view``, ``binary_view``) to ``string``/``binary``."""
    fields = []
    for f in table.schema:
        t = f.type
        if pa.types.is_string_view(t):
            t = pa.string()
        elif pa.types.is_binary_view(t):
            t = pa.binary()
        fields.append(pa.field(f.name, t, f.nullable))
    return table.cast(pa.schema(fields))


def merge_documents(
    tables: Tables, source: pa.RecordBatchReader, full_snapshot_source: str | None = None
) -> dict[str, Any]:
    """Merge accepted documents (``DOCUMENTS_SCHEMA``) into ``corpus/documents``.

    Args:
        tables: Table locations.
        source: Stream of accepted documents, unique by doc_id.
        full_snapshot_source: When set, the stream is the complete current content of that
            source: its documents missing from the stream are deleted.

    Returns:
        deltalake's merge metrics (``num_target_rows_inserted`` / ``_updated`` / ``_deleted``).
    """
    table = tables.ensure(tables.documents, S.DOCUMENTS_SCHEMA)
    merger = (
        table.merge(source, predicate="t.doc_id = s.doc_id", source_alias="s", target_alias="t")
        .when_matched_update_all(predicate="t.content_sha256 <> s.content_sha256")
        .when_not_matched_insert_all()
    )
    if full_snapshot_source is not None:
        merger = merger.when_not_matched_by_source_delete(
            predicate=f"t.source = '{full_snapshot_source.replace(chr(39), chr(39) * 2)}'")
    return merger.execute()


def merge_quarantine(tables: Tables, source: pa.RecordBatchReader) -> dict[str, Any]:
    """Insert quarantine rows (``QUARANTINE_SCHEMA``) whose id is new."""
    table = tables.ensure(tables.quarantine, S.QUARANTINE_SCHEMA)
    return (
        table.merge(source, predicate="t.quarantine_id = s.quarantine_id", source_alias="s",
                    target_alias="t")
        .when_not_matched_insert_all()
        .execute()
    )


def merge_queries(tables: Tables, split: str, source: pa.Table) -> dict[str, Any]:
    table = tables.ensure(tables.queries(split), S.QUERIES_SCHEMA)
    return (
        table.merge(source, predicate="t.qid = s.qid", source_alias="s", target_alias="t")
        .when_matched_update_all(predicate="t.content_sha256 <> s.content_sha256")
        .when_not_matched_insert_all()
        .execute()
    )


def merge_qrels(tables: Tables, split: str, source: pa.Table) -> dict[str, Any]:
    table = tables.ensure(tables.qrels(split), S.QRELS_SCHEMA)
    return (
        table.merge(source, predicate="t.qid = s.qid AND t.doc_id = s.doc_id", source_alias="s",
                    target_alias="t")
        .when_matched_update_all(predicate="t.relevance <> s.relevance")
        .when_not_matched_insert_all()
        .execute()
    )
