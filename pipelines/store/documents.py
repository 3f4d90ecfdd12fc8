"""Rows of ``corpus/documents`` → the model library's :class:`~ciea_model.processor.Document`:
the one converter every phase uses (training rows and the dev pool, hard-negative mining,
evaluation, the in-memory path of ``ciea compare``, benchmarks and tests), so what a row
means cannot drift between them.

A row is a mapping of column names (:data:`DOCUMENT_COLUMNS`): a Delta row, a synthetic
generator record, or one *slot* of a joined training row (``pos_id``, ``pos_caption``, …:
:func:`slot_column`). What becomes of it:

* ``doc_id`` as a string; ``modality`` one of :data:`~pipelines.store.schema.MODALITIES`;
  ``text`` and ``caption`` strings, a missing or null one read as ``""``;
* an image document's image: its inline bytes (``image``), else the file at ``image_uri``
  (a local path, ``file://`` or ``s3://`` URI, read with the given storage options), then
  ``image_transform`` when one is given (the processor's: decoded once here rather than
  every epoch). A text document carries no image: its image columns are not read;
* a row that cannot become a Document is a :class:`Rejected` (doc_id, reason, detail), not an
  exception and never dropped: the caller counts it (evaluation) or raises it
  (:meth:`Converted.require`, :func:`expect_document`: rows a trainer cannot do without).

Column access is the only thing that differs between the row shapes, so there is one body
(``_convert``) behind the row (:func:`row_to_document`), slot (:func:`slot_to_document`) and
batch (:func:`batch_to_documents`) forms.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import pyarrow as pa

from ciea_model.processor import Document
from pipelines.store import schema as S
from pipelines.store import storage

#: Columns a Document is made of (the rest of ``corpus/documents`` is bookkeeping).
DOCUMENT_COLUMNS: tuple[str, ...] = (S.DOC_ID, S.MODALITY, S.TEXT, S.CAPTION, S.IMAGE, S.IMAGE_URI)
#: Columns a batch must have (the others may be absent: read as null).
REQUIRED_COLUMNS: tuple[str, ...] = (S.DOC_ID, S.MODALITY)

#: Why a row cannot become a Document (:attr:`Rejected.reason`).
NO_DOC_ID = "no_doc_id"  # doc_id null or empty
BAD_MODALITY = "bad_modality"  # modality null or not one of MODALITIES
BAD_FIELD = "bad_field"  # text/caption not a string, image a string or a number
NO_IMAGE = "no_image"  # an image document with neither image bytes nor image_uri
IMAGE_UNREADABLE = "image_unreadable"  # the file at image_uri could not be read
IMAGE_UNDECODABLE = "image_undecodable"  # image_transform failed on the image
REASONS = (NO_DOC_ID, BAD_MODALITY, BAD_FIELD, NO_IMAGE, IMAGE_UNREADABLE, IMAGE_UNDECODABLE)

#: The fix :class:`DocumentError` names for each reason.
FIXES = {
    NO_DOC_ID: "every row of corpus/documents has a doc_id; re-ingest the source (ingest quarantines such records)",
    BAD_MODALITY: f"modality is one of {S.MODALITIES}; re-ingest the source",
    BAD_FIELD: "text and caption are strings and image is encoded bytes (a path or URI goes in image_uri)",
    NO_IMAGE: "an image document needs image bytes or an image_uri; re-ingest the source",
    IMAGE_UNREADABLE: ("restore the file at image_uri, give the data root's storage_options, or re-ingest "
                       "the source so the record is quarantined"),
    IMAGE_UNDECODABLE: "the image bytes are not an image the processor decodes; re-ingest the source",
}


@dataclass(frozen=True)
class Rejected:
    """A row that cannot become a Document.

    Attributes:
        doc_id: the row's doc_id (``None`` when it has none).
        reason: one of :data:`REASONS`.
        detail: what was wrong, the underlying error included (``"FileNotFoundError: …"``).
    """

    doc_id: str | None
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"

    def error(self) -> DocumentError:
        """The exception a caller that cannot go on without this document raises."""
        return DocumentError([self])


class DocumentError(ValueError):
    """Rows that cannot become Documents where the caller needs every one; the message names
    the first rows, the reason and the fix. ``rejected`` holds them all."""

    def __init__(self, rejected: Sequence[Rejected]) -> None:
        self.rejected = list(rejected)
        first = self.rejected[0]
        more = f" (and {len(self.rejected) - 1} more rows)" if len(self.rejected) > 1 else ""
        super().__init__(f"document {first.doc_id!r} cannot be read: {first}{more}; {FIXES[first.reason]}")


class Converted(NamedTuple):
    """What :func:`batch_to_documents` makes of a batch: the Documents in row order, and the
    rows that could not become one."""

    documents: list[Document]
    rejected: list[Rejected]

    def require(self) -> list[Document]:
        """The Documents when every row became one.

        Raises:
            DocumentError: some row did not, naming it and the fix.
        """
        if self.rejected:
            raise DocumentError(self.rejected)
        return self.documents


def slot_column(slot: str, column: str) -> str:
    """The name ``column`` of ``corpus/documents`` takes in slot ``slot`` of a joined row:
    ``<slot>_id`` for ``doc_id``, ``<slot>_<column>`` for the others."""
    return f"{slot}_{'id' if column == S.DOC_ID else column}"


def image_bytes(image: Any, image_uri: str | None, storage_options: Mapping[str, str] | None = None) -> Any:
    """An image document's image: its inline value (encoded bytes, or a decoded image a
    generator handed over), else the bytes of the file at ``image_uri``.

    Raises:
        ValueError: neither is set (empty bytes count as none).
        OSError: the file cannot be read (``FileNotFoundError`` …), from the filesystem.
    """
    if image is not None and not (isinstance(image, (bytes, bytearray, memoryview)) and len(image) == 0):
        return image
    if not image_uri:
        raise ValueError("image document with neither image bytes nor image_uri")
    return storage.read_bytes(image_uri, dict(storage_options) if storage_options else None)


def _convert(get: Callable[[str], Any], storage_options: Mapping[str, str] | None,
             image_transform: Callable[[Any], Any] | None) -> Document | Rejected:
    raw_id = get(S.DOC_ID)
    doc_id = None if raw_id is None else str(raw_id)
    if not doc_id:
        return Rejected(None, NO_DOC_ID, f"doc_id is {raw_id!r}")
    modality = get(S.MODALITY)
    if modality not in S.MODALITIES:
        return Rejected(doc_id, BAD_MODALITY, f"modality is {modality!r}, not one of {S.MODALITIES}")
    fields = {}
    for column in (S.TEXT, S.CAPTION):
        value = get(column)
        if value is not None and not isinstance(value, str):
            return Rejected(doc_id, BAD_FIELD, f"{column} is a {type(value).__name__}, not a string")
        fields[column] = value or ""
    image = None
    if modality == "image":
        inline, uri = get(S.IMAGE), get(S.IMAGE_URI)
        if isinstance(inline, (str, int, float)):
            return Rejected(doc_id, BAD_FIELD, f"image is a {type(inline).__name__}, not encoded bytes")
        if uri is not None and not isinstance(uri, str):
            return Rejected(doc_id, BAD_FIELD, f"image_uri is a {type(uri).__name__}, not a string")
        try:
            image = image_bytes(inline, uri, storage_options)
        except ValueError as e:
            return Rejected(doc_id, NO_IMAGE, str(e))
        except Exception as e:  # an unreadable file is this row's problem, not the batch's
            return Rejected(doc_id, IMAGE_UNREADABLE, f"{type(e).__name__}: {e} ({uri})")
        if image_transform is not None:
            try:
                image = image_transform(image)
            except Exception as e:  # PIL raises UnidentifiedImageError, OSError, ValueError, …
                return Rejected(doc_id, IMAGE_UNDECODABLE, f"{type(e).__name__}: {e}")
    return Document(doc_id=doc_id, modality=modality, text=fields[S.TEXT], caption=fields[S.CAPTION], image=image)


def row_to_document(row: Mapping[str, Any], *, storage_options: Mapping[str, str] | None = None,
                    image_transform: Callable[[Any], Any] | None = None) -> Document | Rejected:
    """One row (a mapping of :data:`DOCUMENT_COLUMNS`; absent keys read as null) → a Document,
    or a :class:`Rejected` saying why not.

    Args:
        row: a ``corpus/documents`` row or a generator record.
        storage_options: object-store settings for ``image_uri`` (the data root's).
        image_transform: applied to an image document's image (the processor's
            ``image_transform``); ``None`` keeps it as it is (encoded bytes).
    """
    return _convert(row.get, storage_options, image_transform)


def slot_to_document(row: Mapping[str, Any], slot: str, *, storage_options: Mapping[str, str] | None = None,
                     image_transform: Callable[[Any], Any] | None = None) -> Document | Rejected | None:
    """The document in slot ``slot`` of a joined row (columns :func:`slot_column`), or
    ``None`` when the slot holds none: its id is null (no draw), or its ``modality`` is
    (a left outer join found no such document: e.g. a mined negative deleted since).
    Otherwise as :func:`row_to_document`."""
    if row.get(slot_column(slot, S.DOC_ID)) is None or row.get(slot_column(slot, S.MODALITY)) is None:
        return None
    return _convert(lambda c: row.get(slot_column(slot, c)), storage_options, image_transform)


def expect_document(result: Document | Rejected) -> Document:
    """``result`` when it is a Document.

    Raises:
        DocumentError: it is a :class:`Rejected`, with the fix.
    """
    if isinstance(result, Rejected):
        raise result.error()
    return result


def batch_rows(batch: pa.Table | pa.RecordBatch | Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """A batch as row dicts: an Arrow table or record batch (deltalake's view types read as
    the plain ones), or a mapping of column name → values (Ray's ``default`` format, tests)."""
    if isinstance(batch, (pa.Table, pa.RecordBatch)):
        return S.plain_types(batch).to_pylist()
    return [dict(zip(batch, values)) for values in zip(*batch.values())]


def batch_to_documents(batch: pa.Table | pa.RecordBatch | Mapping[str, Sequence[Any]], *,
                       storage_options: Mapping[str, str] | None = None,
                       image_transform: Callable[[Any], Any] | None = None) -> Converted:
    """A batch of ``corpus/documents`` rows → :class:`Converted` (:func:`row_to_document` on
    every row, in order).

    Raises:
        ValueError: the batch lacks a column of :data:`REQUIRED_COLUMNS` (a reader that
            selected too few columns), naming the missing and the present ones.
    """
    names = batch.schema.names if isinstance(batch, (pa.Table, pa.RecordBatch)) else list(batch)
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"a batch of documents lacks the columns {missing} (it has {list(names)}); "
                         f"read at least {list(REQUIRED_COLUMNS)}, usually DOCUMENT_COLUMNS")
    documents: list[Document] = []
    rejected: list[Rejected] = []
    for row in batch_rows(batch):
        result = row_to_document(row, storage_options=storage_options, image_transform=image_transform)
        (rejected if isinstance(result, Rejected) else documents).append(result)
    return Converted(documents, rejected)
