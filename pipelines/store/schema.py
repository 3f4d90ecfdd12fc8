"""Column names and Arrow schemas of the ingest stages and of the Delta tables they write.

Schemas are code (house style): every stage imports its column names from here, so a
rename happens in one place. Four shapes:

* ``RAW_SCHEMA`` — what a source reader emits: one row per source record, already
  located (``source``, ``record_ref``, ``seq``) but not yet validated. A reader that cannot
  even parse a record emits it with ``error`` set, so the record is never dropped.
* ``VALIDATED_SCHEMA`` — what validation emits: the same rows, each either ``ok`` (a
  normalised document with its ``content_sha256``) or ``quarantined`` (stage, reason,
  detail, excerpt). ``in = accepted + quarantined`` is checked on this stream.
* ``DOCUMENTS_SCHEMA`` / ``QUARANTINE_SCHEMA`` — the Delta tables ``corpus/documents`` and
  ``corpus/quarantine``.
* ``QUERIES_SCHEMA`` / ``QRELS_SCHEMA`` — the Delta tables ``queries/<split>`` and
  ``qrels/<split>``.
"""

from __future__ import annotations

import pyarrow as pa

# --- identity and provenance -------------------------------------------------------------
DOC_ID = "doc_id"
SOURCE = "source"
RECORD_REF = "record_ref"
SEQ = "seq"

# --- content -----------------------------------------------------------------------------
MODALITY = "modality"
TEXT = "text"
CAPTION = "caption"
IMAGE = "image"
IMAGE_URI = "image_uri"
IMAGE_WIDTH = "image_width"
IMAGE_HEIGHT = "image_height"
METADATA = "metadata"
CONTENT_SHA256 = "content_sha256"

# --- read errors and validation outcome --------------------------------------------------
ERROR = "error"
ERROR_DETAIL = "error_detail"
RAW_EXCERPT = "raw_excerpt"
STATUS = "status"
STAGE = "stage"
REASON = "reason"
DETAIL = "detail"
EXCERPT = "excerpt"
FINGERPRINT = "fingerprint"

# --- bookkeeping -------------------------------------------------------------------------
RUN_ID = "run_id"
INGESTED_AT = "ingested_at"
QUARANTINE_ID = "quarantine_id"
QUARANTINED_AT = "quarantined_at"

# --- queries -----------------------------------------------------------------------------
QID = "qid"
QUERY = "query"
ANSWER = "answer"
SPLIT = "split"
RELEVANCE = "relevance"

STATUS_OK = "ok"
STATUS_QUARANTINED = "quarantined"
MODALITIES = ("text", "image")

#: Stages a record can be quarantined at.
STAGE_READ = "read"  # the source could not parse or locate the record
STAGE_VALIDATE = "validate"  # fields, text or image failed a check
STAGE_DEDUPE = "dedupe"  # a second record with an already accepted doc_id
STAGE_QUERY = "query"  # a query or qrel row failed a check

RAW_SCHEMA = pa.schema(
    [
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field(RECORD_REF, pa.string(), nullable=False),
        # Deterministic global order of the record in its source (shard index, then row):
        # the duplicate rule keeps the lowest.
        pa.field(SEQ, pa.int64(), nullable=False),
        pa.field(DOC_ID, pa.string()),
        pa.field(MODALITY, pa.string()),
        pa.field(TEXT, pa.string()),
        pa.field(CAPTION, pa.string()),
        pa.field(IMAGE, pa.binary()),
        pa.field(IMAGE_URI, pa.string()),
        pa.field(METADATA, pa.string()),  # JSON object as text
        pa.field(ERROR, pa.string()),  # reason code when the reader already failed
        pa.field(ERROR_DETAIL, pa.string()),
        pa.field(RAW_EXCERPT, pa.string()),
    ]
)

DOCUMENTS_SCHEMA = pa.schema(
    [
        pa.field(DOC_ID, pa.string(), nullable=False),
        pa.field(MODALITY, pa.string(), nullable=False),
        pa.field(TEXT, pa.string()),
        pa.field(CAPTION, pa.string()),
        pa.field(IMAGE, pa.binary()),  # inline, normalised bytes (null for text / URI mode)
        pa.field(IMAGE_URI, pa.string()),  # set in URI mode: the embedding stage resolves it
        pa.field(IMAGE_WIDTH, pa.int32()),
        pa.field(IMAGE_HEIGHT, pa.int32()),
        pa.field(METADATA, pa.string()),
        pa.field(CONTENT_SHA256, pa.string(), nullable=False),
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field(RECORD_REF, pa.string(), nullable=False),
        pa.field(RUN_ID, pa.string(), nullable=False),
        pa.field(INGESTED_AT, pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        # sha256 of (source, record_ref, stage, reason, fingerprint of the raw record): the
        # same bad record quarantined again (a re-run, a crash) is not a second row.
        pa.field(QUARANTINE_ID, pa.string(), nullable=False),
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field(RECORD_REF, pa.string(), nullable=False),
        pa.field(DOC_ID, pa.string()),
        pa.field(STAGE, pa.string(), nullable=False),
        pa.field(REASON, pa.string(), nullable=False),
        pa.field(DETAIL, pa.string()),
        pa.field(EXCERPT, pa.string()),
        pa.field(RUN_ID, pa.string(), nullable=False),
        pa.field(QUARANTINED_AT, pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)

VALIDATED_SCHEMA = pa.schema(
    [
        pa.field(STATUS, pa.string(), nullable=False),
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field(RECORD_REF, pa.string(), nullable=False),
        pa.field(SEQ, pa.int64(), nullable=False),
        pa.field(DOC_ID, pa.string()),
        pa.field(MODALITY, pa.string()),
        pa.field(TEXT, pa.string()),
        pa.field(CAPTION, pa.string()),
        pa.field(IMAGE, pa.binary()),
        pa.field(IMAGE_URI, pa.string()),
        pa.field(IMAGE_WIDTH, pa.int32()),
        pa.field(IMAGE_HEIGHT, pa.int32()),
        pa.field(METADATA, pa.string()),
        pa.field(CONTENT_SHA256, pa.string()),
        pa.field(STAGE, pa.string()),
        pa.field(REASON, pa.string()),
        pa.field(DETAIL, pa.string()),
        pa.field(EXCERPT, pa.string()),
        pa.field(FINGERPRINT, pa.string()),
    ]
)

QUERIES_SCHEMA = pa.schema(
    [
        pa.field(QID, pa.string(), nullable=False),
        pa.field(QUERY, pa.string(), nullable=False),
        pa.field(ANSWER, pa.string()),  # JSON (WebQA answers are a list), null when absent
        pa.field(METADATA, pa.string()),
        pa.field(CONTENT_SHA256, pa.string(), nullable=False),
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field(RECORD_REF, pa.string(), nullable=False),
        pa.field(RUN_ID, pa.string(), nullable=False),
        pa.field(INGESTED_AT, pa.timestamp("us", tz="UTC"), nullable=False),
        # The query's picture, normalised like a document image (a composed query's reference
        # image); null for a text query. Last, and nullable: a table written before it existed
        # reads as it is and gains the column on its next ingest (``Tables.ensure``).
        pa.field(IMAGE, pa.binary()),
    ]
)

QRELS_SCHEMA = pa.schema(
    [
        pa.field(QID, pa.string(), nullable=False),
        pa.field(DOC_ID, pa.string(), nullable=False),
        pa.field(RELEVANCE, pa.int32(), nullable=False),
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field(RUN_ID, pa.string(), nullable=False),
    ]
)

#: Columns that say *what* a row is; the rest (run id, time) say when it was written. Two
#: tables with equal content columns are the same corpus.
DOCUMENT_CONTENT_COLUMNS = tuple(n for n in DOCUMENTS_SCHEMA.names if n not in (RUN_ID, INGESTED_AT))
QUARANTINE_CONTENT_COLUMNS = tuple(
    n for n in QUARANTINE_SCHEMA.names if n not in (RUN_ID, QUARANTINED_AT)
)


def empty_raw() -> dict[str, list]:
    """Column lists for building a ``RAW_SCHEMA`` batch row by row."""
    return {name: [] for name in RAW_SCHEMA.names}


# --- one cast of what deltalake hands out ---------------------------------------------------
def plain_type(t: pa.DataType) -> pa.DataType:
    """``string``/``binary`` for deltalake's view types (``string_view``, ``binary_view``:
    the change feed and files written by a merge) and for the large variants; any other
    type as it is. pyarrow compute, sorting, ``is_in`` and Parquet reads want the plain ones."""
    if pa.types.is_string_view(t) or pa.types.is_large_string(t):
        return pa.string()
    if pa.types.is_binary_view(t) or pa.types.is_large_binary(t):
        return pa.binary()
    return t


def plain_array(arr: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """``arr`` cast to :func:`plain_type` (unchanged when it already is)."""
    t = plain_type(arr.type)
    return arr if t == arr.type else arr.cast(t)


def plain_types(table: pa.Table | pa.RecordBatch) -> pa.Table:
    """Every column of ``table`` cast to :func:`plain_type` (the one cast every phase uses
    on rows read from Delta)."""
    table = table if isinstance(table, pa.Table) else pa.Table.from_batches([table])
    schema = pa.schema([pa.field(f.name, plain_type(f.type), f.nullable, f.metadata) for f in table.schema])
    return table if schema == table.schema else table.cast(schema)
