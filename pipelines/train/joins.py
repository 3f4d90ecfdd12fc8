"""The map-side (broadcast) form of the training rows' document joins.

:func:`pipelines.train.dataset.epoch_dataset` joins each (epoch, example) row with the
documents its slots name — inner for the positive, left outer for the hard negatives — and
with the captions of the query's image positives. Ray Data does that with hash-partitioned
joins, which scale with the corpus but start shuffle actors for every join: on a small
training set (a tiny run, a demo, a test) the shuffles cost tens of seconds for a few
hundred rows. When the documents the plan can need fit a budget (``data.broadcast_join_mb``),
they are materialised once in the object store and every ``map_batches`` task joins its
rows against them in memory instead, as Spark's broadcast hash join does below
``autoBroadcastJoinThreshold``. :func:`join_documents` is that join, a pure function: the
same rows come out as from the hash joins (the equality is tested on Ray).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from pipelines.store import schema as S
from pipelines.store.documents import DOCUMENT_COLUMNS, slot_column

#: The per-query caption list ``q_comp`` removes (joined only when the plan needs it).
POSITIVE_CAPTIONS = "positive_captions"


class DuplicateDocId(ValueError):
    """The documents hold a doc_id twice (the hash join would multiply rows)."""


def index_documents(docs: pa.Table) -> dict[str, int]:
    """doc_id → row of ``docs``.

    Raises:
        DuplicateDocId: a doc_id occurs twice.
    """
    ids = docs.column(S.DOC_ID).to_pylist()
    index = {d: i for i, d in enumerate(ids)}
    if len(index) != len(ids):
        raise DuplicateDocId(f"{len(ids) - len(index)} doc_id(s) of corpus/documents occur more than once")
    return index


def join_documents(rows: pa.Table, docs: pa.Table, slots: Sequence[str], *, inner: str | None = None,
                   caption_ids: Mapping[str, Sequence[str]] | None = None,
                   index: Mapping[str, int] | None = None) -> pa.Table:
    """``rows`` with the document columns of each slot in ``slots`` appended
    (``<slot>_modality``, ``<slot>_text``, …: :func:`slot_column`), looked up by
    ``<slot>_id`` in ``docs``.

    Args:
        rows: training rows with a ``<slot>_id`` column per slot (and ``qid``).
        docs: documents with :data:`DOCUMENT_COLUMNS` (plain Arrow types).
        slots: the slots to fill, e.g. ``("pos", "neg0", "neg1")``.
        inner: the slot whose document must exist: rows whose id is null or not in ``docs``
            are dropped (an inner join); the other slots are left outer (null columns).
        caption_ids: qid → the doc_ids whose captions form ``positive_captions``: the
            image documents among them, in doc_id order, a null caption read as ``""``;
            null when none is found. ``None``: no caption column is added.
        index: :func:`index_documents` of ``docs``, when the caller keeps it across batches.
    """
    index = index_documents(docs) if index is None else index
    if inner is not None:
        found = pa.array([d is not None and d in index for d in rows.column(slot_column(inner, S.DOC_ID)).to_pylist()],
                         pa.bool_())
        rows = rows.filter(found)
    columns = [c for c in DOCUMENT_COLUMNS if c != S.DOC_ID]
    for slot in slots:
        ids = rows.column(slot_column(slot, S.DOC_ID)).to_pylist()
        picked = docs.select(columns).take(pa.array([index.get(d) if d is not None else None for d in ids],
                                                    pa.int64()))
        for c in columns:
            rows = rows.append_column(slot_column(slot, c), picked.column(c))
    if caption_ids is not None:
        rows = rows.append_column(POSITIVE_CAPTIONS, _caption_lists(rows.column(S.QID).to_pylist(), docs, index,
                                                                    caption_ids))
    return rows


def _caption_lists(qids: Sequence[str], docs: pa.Table, index: Mapping[str, int],
                   caption_ids: Mapping[str, Sequence[str]]) -> pa.Array:
    modality, caption = docs.column(S.MODALITY), docs.column(S.CAPTION)
    out: list[list[str] | None] = []
    for qid in qids:
        rows = [index[d] for d in sorted(caption_ids.get(qid, ())) if d in index]
        captions = [caption[i].as_py() or "" for i in rows if modality[i].as_py() == "image"]
        out.append(captions or None)
    return pa.array(out, pa.list_(pa.string()))


class JoinDocuments:
    """``map_batches`` UDF around :func:`join_documents`: the documents are object refs to
    the materialised blocks, fetched once per task process and indexed once."""

    def __init__(self, blocks: Sequence[Any], slots: Sequence[str], inner: str | None,
                 caption_ids: Mapping[str, Sequence[str]] | None) -> None:
        self.blocks, self.slots, self.inner, self.caption_ids = list(blocks), tuple(slots), inner, caption_ids
        self._docs: tuple[pa.Table, dict[str, int]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_docs": None}

    def _documents(self) -> tuple[pa.Table, dict[str, int]]:
        if self._docs is None:
            import ray

            tables = [S.plain_types(t) for t in ray.get(self.blocks)]
            docs = pa.concat_tables(tables, promote_options="permissive") if tables else _empty_documents()
            self._docs = (docs, index_documents(docs))
        return self._docs

    def __call__(self, batch: pa.Table) -> pa.Table:
        docs, index = self._documents()
        return join_documents(S.plain_types(batch), docs, self.slots, inner=self.inner,
                              caption_ids=self.caption_ids, index=index)


def _empty_documents() -> pa.Table:
    return pa.table({c: pa.array([], pa.binary() if c == S.IMAGE else pa.string()) for c in DOCUMENT_COLUMNS})

