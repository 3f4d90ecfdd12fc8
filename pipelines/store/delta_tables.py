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

One exception, the **bulk load**: when ``corpus/documents`` has no rows yet (a first ingest,
or the re-run of a first ingest that was killed before its commit) there is nothing to
compare with, so the documents are appended instead of merged — the same rows, the same
single commit, the change data feed reads them as inserts, but the writer streams files out
as rows arrive instead of joining against the (empty) target. Two bulk loads racing on one
empty table cannot both commit: each carries the same Delta application transaction id, and
the second one fails with a conflict.

A merge or a bulk append is one atomic Delta commit: a run killed midway leaves the table at
its previous version.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from pipelines.store import schema as S
from pipelines.store import storage
from pipelines.store.schema import plain_types

logger = logging.getLogger(__name__)

CDF_CONFIG = {"delta.enableChangeDataFeed": "true"}
#: Data files of about this size: the Delta writer buffers a file's rows before writing
#: it, so the target bounds the driver's memory during a merge (measured: 8 MiB keeps a
#: 600k-row merge flat at ~270 MiB; deltalake's default ~100 MiB grows it past 800 MiB).
DEFAULT_TARGET_FILE_BYTES = 16 * 1024 * 1024
#: Delta application transaction id that every bulk load of ``corpus/documents`` commits
#: with: a concurrent commit carrying the same id makes the later one fail (Delta's
#: "concurrent transaction" conflict) instead of appending the corpus twice.
BULK_LOAD_APP_ID = "ciea-ingest/bulk-load"
WRITE_APPEND = "append"
WRITE_MERGE = "merge"
#: Table kinds a :class:`Tables` handle resolves under its root (besides URIs).
KIND_DOCUMENTS = "documents"
KIND_QUARANTINE = "quarantine"
_SPLIT_KIND = re.compile(r"(queries|qrels)/([^/]+)")


class Tables:
    """The one handle on the Delta tables under a data root: their URIs, and the only way to
    open one.

    Made once from a config's ``root`` and ``storage_options`` at the job's (or run's) boundary
    and passed down, so no function below takes the two loose. The storage options are
    checked here (a credential is refused, :func:`storage.check_storage_options`) and travel
    with every table this handle opens, every dataset it reads and every image file it fetches.

    A table is named by its URI or by its *kind* under the root: ``documents``
    (``corpus/documents``), ``quarantine`` (``corpus/quarantine``), ``queries/<split>``,
    ``qrels/<split>``. Anything else is taken as a URI, as is.

    Args:
        root: the data root (local path, ``file://`` or ``s3://``).
        storage_options: object-store settings (never credentials).
        target_file_bytes: data file size of the tables :meth:`ensure` creates.

    Raises:
        ValueError: ``storage_options`` holds a credential, with the fix.
    """

    def __init__(self, root: str, storage_options: dict[str, str] | None = None,
                 target_file_bytes: int = DEFAULT_TARGET_FILE_BYTES) -> None:
        options = dict(storage_options or {})
        storage.check_storage_options(options, root)
        self.root = storage.normalise_uri(root)
        self.storage_options = options
        self.target_file_bytes = target_file_bytes

    # ---- where the tables are -------------------------------------------------------------
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

    def uri(self, uri_or_kind: str) -> str:
        """The URI of a table kind under the root (``documents``, ``quarantine``,
        ``queries/<split>``, ``qrels/<split>``); any other string is a URI, returned as is."""
        if uri_or_kind in (KIND_DOCUMENTS, KIND_QUARANTINE):
            return getattr(self, uri_or_kind)
        m = _SPLIT_KIND.fullmatch(uri_or_kind)
        if m:
            return getattr(self, m.group(1))(m.group(2))
        return uri_or_kind

    # ---- opening ----------------------------------------------------------------------------
    def open(self, uri_or_kind: str, version: int | None = None) -> DeltaTable:
        """The Delta table (at ``version``, default the latest) with this root's storage options.

        Raises:
            TableNotFoundError: no Delta table there (phases import it from this module, never
                from ``deltalake``: their Delta I/O is the handle's).
        """
        return DeltaTable(self.uri(uri_or_kind), version=version, storage_options=self.storage_options or None)

    def documents_table(self, version: int | None = None) -> DeltaTable:
        """``corpus/documents`` at ``version`` (default the latest)."""
        return self.open(self.documents, version)

    def version(self, uri_or_kind: str = KIND_DOCUMENTS) -> int | None:
        """The table's latest version, ``None`` when there is no table there."""
        try:
            return self.open(uri_or_kind).version()
        except TableNotFoundError:
            return None

    def dataset(self, uri_or_kind: str = KIND_DOCUMENTS, version: int | None = None) -> pads.Dataset:
        """A pyarrow dataset over the table's files at ``version`` (nothing read yet)."""
        return self.open(uri_or_kind, version).to_pyarrow_dataset()

    def ray_dataset(self, uri_or_kind: str = KIND_DOCUMENTS, version: int | None = None,
                    columns: list[str] | None = None, **read_args: Any):
        """The table at ``version`` as a lazy Ray Dataset (read by Ray tasks, nothing in the
        caller), with this root's storage options.

        Args:
            read_args: passed on to ``ray.data.read_delta`` (``override_num_blocks``, …).
        """
        import ray.data

        return ray.data.read_delta(self.uri(uri_or_kind), version=version, columns=columns,
                                   storage_options=self.storage_options or None, **read_args)

    def schema(self, uri_or_kind: str = KIND_DOCUMENTS) -> pa.Schema:
        """The table's Arrow schema as its Delta log declares it."""
        return pa.schema(self.open(uri_or_kind).schema().to_arrow())

    # ---- files the tables point at (image URIs) --------------------------------------------
    def filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """``(pyarrow filesystem, path)`` of a file URI, with this root's storage options."""
        return storage.filesystem(uri, self.storage_options)

    def read_bytes(self, uri: str) -> bytes:
        """The bytes of a file URI (a document's ``image_uri``)."""
        return storage.read_bytes(uri, self.storage_options)

    # ---- writing and reading whole tables ---------------------------------------------------
    def ensure(self, uri: str, schema: pa.Schema) -> DeltaTable:
        """Open the table, creating it (change data feed on) if it does not exist.

        Raises:
            ValueError: The existing table's columns differ from ``schema``, with the fix.
        """
        uri = self.uri(uri)
        try:
            table = self.open(uri)
        except TableNotFoundError:
            logger.debug("creating Delta table %s", uri)
            config = {**CDF_CONFIG, "delta.targetFileSize": str(self.target_file_bytes)}
            return DeltaTable.create(uri, schema, configuration=config,
                                     storage_options=self.storage_options or None)
        have = [f.name for f in table.schema().fields]
        added = schema.names[len(have):]
        if have == schema.names[: len(have)] and added and all(schema.field(n).nullable for n in added):
            # A table written before nullable trailing columns were added to its schema
            # (queries' image): gain them in place; old rows read as null.
            from deltalake.schema import Schema as DeltaSchema

            logger.info("adding columns %s to Delta table %s", added, uri)
            table.alter.add_columns(DeltaSchema.from_arrow(pa.schema([schema.field(n) for n in added])).fields)
            return self.open(uri)
        if have != schema.names:
            raise ValueError(
                f"Delta table {uri} has columns {have}, this ingest writes {schema.names}; "
                "point output.root at a new location or migrate the table")
        return table

    def overwrite(self, uri_or_kind: str, table: pa.Table) -> int:
        """Replaces the table's rows and schema with ``table`` in one commit (creating the
        table if need be; readers of earlier versions keep them). Returns the new version."""
        uri = self.uri(uri_or_kind)
        write_deltalake(uri, table, mode="overwrite", schema_mode="overwrite",
                        storage_options=self.storage_options or None)
        return self.open(uri).version()

    def read(self, uri: str, columns: list[str] | None = None, version: int | None = None) -> pa.Table:
        """The whole table as plain Arrow types (for tests and small tables)."""
        return plain_types(pa.table(self.open(uri, version).to_pyarrow_table(columns=columns)))

    def changes(self, uri: str, starting_version: int, ending_version: int | None = None) -> pa.Table:
        """Change data feed rows (``_change_type``, ``_commit_version``) as plain Arrow types."""
        reader = self.open(uri).load_cdf(starting_version=starting_version, ending_version=ending_version)
        return plain_types(pa.table(reader))


def row_count(tables: Tables, version: int) -> int:
    """Rows of a version of ``corpus/documents`` from its file statistics (no data read)."""
    import pyarrow.compute as pc

    dt = tables.documents_table(version)
    actions = pa.table(dt.get_add_actions(flatten=True))
    if actions["num_records"].null_count:  # a writer that kept no statistics: count the ids
        return dt.to_pyarrow_dataset().count_rows()
    return int(pc.sum(actions["num_records"]).as_py() or 0)


def has_rows(table: DeltaTable) -> bool:
    """Whether the table holds any data file (a file is written only with rows in it)."""
    return bool(table.file_uris())


def write_documents(
    tables: Tables, source: pa.RecordBatchReader, full_snapshot_source: str | None = None
) -> dict[str, Any]:
    """Write accepted documents: bulk append into an empty table, else ``merge_documents``.

    Args:
        tables: Table locations.
        source: Stream of accepted documents (``DOCUMENTS_SCHEMA``), unique by doc_id.
        full_snapshot_source: As for ``merge_documents`` (an empty table has nothing to delete).

    Returns:
        ``num_target_rows_inserted`` / ``_updated`` / ``_deleted`` as deltalake's merge
        reports them, and ``write``: ``"append"`` (bulk load) or ``"merge"``.

    Raises:
        RuntimeError: Another writer changed the empty table while this bulk load ran.
    """
    table = tables.ensure(tables.documents, S.DOCUMENTS_SCHEMA)
    if has_rows(table):
        return {**merge_documents(tables, source, full_snapshot_source, table=table), "write": WRITE_MERGE}
    return {**append_documents(table, source), "write": WRITE_APPEND}


def append_documents(table: DeltaTable, source: pa.RecordBatchReader) -> dict[str, Any]:
    """Bulk load: append ``source`` to ``table`` (which must have no rows) in one commit.

    Nothing is committed when the stream holds no rows (a merge of nothing commits nothing
    either), so a run whose every record was quarantined leaves the version alone.
    """
    first = _next_batch(source)
    if first is None:
        return {"num_target_rows_inserted": 0, "num_target_rows_updated": 0, "num_target_rows_deleted": 0}
    rows = {"n": 0}

    def batches() -> Iterator[pa.RecordBatch]:
        batch: pa.RecordBatch | None = first
        while batch is not None:
            rows["n"] += batch.num_rows
            yield batch
            batch = _next_batch(source)

    read_version = table.version()
    commit = CommitProperties(app_transactions=[Transaction(app_id=BULK_LOAD_APP_ID, version=read_version + 1)])
    try:
        # The handle pins the version that was checked to be empty (and carries the table's
        # storage options); the writer streams data files out as batches arrive and honours
        # the table's delta.targetFileSize, so the driver holds about one file of rows.
        write_deltalake(table, pa.RecordBatchReader.from_batches(source.schema, batches()), mode="append",
                        commit_properties=commit)
    except CommitFailedError as e:
        if "oncurrent" not in str(e):  # not the race: let the store's own error through
            raise
        raise RuntimeError(
            f"{table.table_uri}: another ingest bulk-loaded corpus/documents while this one did ({e}); "
            "re-run this ingest: it will find the rows and merge into them") from e
    return {"num_target_rows_inserted": rows["n"], "num_target_rows_updated": 0, "num_target_rows_deleted": 0}


def _next_batch(reader: pa.RecordBatchReader) -> pa.RecordBatch | None:
    try:
        return reader.read_next_batch()
    except StopIteration:
        return None


def merge_documents(
    tables: Tables, source: pa.RecordBatchReader, full_snapshot_source: str | None = None,
    table: DeltaTable | None = None,
) -> dict[str, Any]:
    """Merge accepted documents (``DOCUMENTS_SCHEMA``) into ``corpus/documents``.

    Args:
        tables: Table locations.
        source: Stream of accepted documents, unique by doc_id.
        full_snapshot_source: When set, the stream is the complete current content of that
            source: its documents missing from the stream are deleted.
        table: ``corpus/documents`` already opened (default: open or create it).

    Returns:
        deltalake's merge metrics (``num_target_rows_inserted`` / ``_updated`` / ``_deleted``).
    """
    if table is None:
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
