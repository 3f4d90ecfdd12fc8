"""Training examples for Ray Train, built with Ray Data from the Delta tables that ingest
writes (``corpus/documents``, ``queries/<split>``, ``qrels/<split>``) and, in stage 2, the
mined hard negatives (:mod:`pipelines.train.negatives`).

What the driver holds: the queries and qrels of a split (orders of magnitude smaller than
the corpus, as ingest treats them) and, for stage 2, each query's top-``depth`` mined ids.
What it never holds: document contents. Documents are read by Ray Data, filtered to the
ids the split needs (positives and drawn negatives) and hash-joined onto the example rows
on the cluster, so each row carries everything one :class:`TrainExample` needs::

    qid, query, relevant_ids,  pos_*  (doc_id, modality, text, caption, image, image_uri)
                               neg0_* / neg1_*  (stage 2; null when none was mined)

Workers turn rows into ``TrainExample`` objects (:func:`rows_to_examples`) and collate them
with the model's processor. Rules reused from the in-memory path, not re-invented: the
positive is the query's ``target_doc_id`` when given, else its first image positive, else
its first positive (:func:`pipelines.train.examples.training_examples`); stage-2 negatives are
one image + one text drawn from the top ``depth`` of each modality, falling back to the
other modality (:func:`pipelines.train.negatives.with_hard_negatives`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ciea_model.processor import Document, TrainExample
from pipelines.store import schema as S
from pipelines.store import storage
from pipelines.train.negatives import with_hard_negatives

logger = logging.getLogger(__name__)

#: Document columns the training rows carry (``image_uri`` is resolved on the worker).
DOC_COLUMNS = (S.DOC_ID, S.MODALITY, S.TEXT, S.CAPTION, S.IMAGE, S.IMAGE_URI)
#: Prefixes of the joined document slots: the positive and up to two hard negatives.
POS, NEG_SLOTS = "pos", ("neg0", "neg1")
RELEVANT_IDS = "relevant_ids"


def documents_uri(root: str) -> str:
    return storage.join(storage.normalise_uri(root), "corpus", "documents")


def queries_uri(root: str, split: str) -> str:
    return storage.join(storage.normalise_uri(root), "queries", split)


def qrels_uri(root: str, split: str) -> str:
    return storage.join(storage.normalise_uri(root), "qrels", split)


def _plain(table: pa.Table) -> pa.Table:
    # deltalake returns string_view/binary_view from merged files: cast before compute.
    fields = []
    for f in table.schema:
        t = f.type
        if pa.types.is_string_view(t) or pa.types.is_large_string(t):
            t = pa.string()
        elif pa.types.is_binary_view(t) or pa.types.is_large_binary(t):
            t = pa.binary()
        fields.append(pa.field(f.name, t, f.nullable))
    return table.cast(pa.schema(fields))


def _read_small(uri: str, columns: list[str], storage_options: dict[str, str] | None) -> pa.Table:
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        table = DeltaTable(uri, storage_options=storage_options or None)
    except TableNotFoundError:
        raise FileNotFoundError(
            f"no Delta table at {uri}: run `ciea ingest --root <root>` first, or point "
            "data.root at the folder that holds corpus/, queries/ and qrels/"
        ) from None
    return _plain(pa.table(table.to_pyarrow_table(columns=columns)))


def read_queries(root: str, split: str, storage_options: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The queries of ``split`` with their qrels, in qid order (driver side; small).

    Returns:
        dicts with ``qid``, ``query``, ``positive_doc_ids`` (relevance > 0), ``kind`` and
        ``target_doc_id`` (from the query's metadata when the source records them, else
        ``None``).
    """
    q = _read_small(queries_uri(root, split), [S.QID, S.QUERY, S.METADATA], storage_options)
    r = _read_small(qrels_uri(root, split), [S.QID, S.DOC_ID, S.RELEVANCE], storage_options)
    positives: dict[str, list[str]] = {}
    for qid, doc_id, rel in zip(*(r.column(c).to_pylist() for c in (S.QID, S.DOC_ID, S.RELEVANCE))):
        if rel and rel > 0:
            positives.setdefault(qid, []).append(doc_id)
    out = []
    for qid, text, meta in zip(*(q.column(c).to_pylist() for c in (S.QID, S.QUERY, S.METADATA))):
        m = json.loads(meta) if meta else {}
        out.append({
            "qid": qid, "query": text, "positive_doc_ids": sorted(positives.get(qid, [])),
            "kind": str(m.get("kind", "all")), "target_doc_id": m.get("target_doc_id"),
        })
    return sorted(out, key=lambda x: x["qid"])


def read_documents(root: str, storage_options: dict[str, str] | None = None, version: int | None = None,
                   columns: Sequence[str] = DOC_COLUMNS):
    """``corpus/documents`` as a lazy Ray Dataset (nothing is read in the driver)."""
    import ray.data

    return ray.data.read_delta(documents_uri(root), version=version, columns=list(columns),
                               storage_options=storage_options or None)


class _KeepIds:
    """``map_batches`` filter: rows whose ``doc_id`` is in a fixed id set."""

    def __init__(self, ids: Sequence[str]) -> None:
        self.ids = pa.array(sorted(set(ids)), pa.string())

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch = _plain(batch)
        return batch.filter(pc.is_in(batch.column(S.DOC_ID), value_set=self.ids))


def filter_ids(ds, ids: Sequence[str]):
    """Rows of a documents dataset whose ``doc_id`` is in ``ids`` (a semi-join against a
    small id set, done where the data is)."""
    keep = _KeepIds(ids)
    return ds.map_batches(keep, batch_format="pyarrow")


def document_modalities(root: str, ids: Sequence[str], storage_options: dict[str, str] | None = None,
                        version: int | None = None) -> dict[str, str]:
    """doc_id → modality for the given ids (read on the cluster; only the matches return)."""
    ds = filter_ids(read_documents(root, storage_options, version, columns=(S.DOC_ID, S.MODALITY)), ids)
    out: dict[str, str] = {}
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=65536):
        out.update(zip(batch.column(S.DOC_ID).to_pylist(), batch.column(S.MODALITY).to_pylist()))
    return out


@dataclass
class ExamplePlan:
    """The driver-side half of the training data: one row per usable query."""

    rows: pa.Table  # qid, query, relevant_ids, pos_id[, neg0_id, neg1_id]
    counts: dict[str, int]

    @property
    def needed_ids(self) -> list[str]:
        ids: set[str] = set()
        for name in self.rows.column_names:
            if name.endswith("_id") and name != "qid":
                ids.update(x for x in self.rows.column(name).to_pylist() if x)
        return sorted(ids)


class _IdOnly(Mapping):
    """``doc_id → Document`` stand-in so that :func:`with_hard_negatives` (which draws the
    picks) can run on ids alone: the drawn ids are read back from the examples."""

    def __getitem__(self, key: str) -> Document:
        return Document(key, "text")

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def plan_examples(
    queries: Sequence[Mapping[str, Any]], modalities: Mapping[str, str],
    mined: Mapping[str, Mapping[str, Sequence[str]]] | None = None, seed: int = 0, depth: int = 10,
) -> ExamplePlan:
    """Chooses each query's positive (and, with ``mined``, its two hard negatives).

    Args:
        queries: from :func:`read_queries`.
        modalities: doc_id → modality of the documents that exist (at least the positives).
        mined: qid → {"image": [...], "text": [...]} best first (stage 2), or ``None``.
        seed: seeds the negative draw.
        depth: each negative is drawn from the top ``depth`` of its modality.
    """
    qids, texts, relevant, pos = [], [], [], []
    skipped = 0
    for q in queries:
        positives = [d for d in q["positive_doc_ids"] if d in modalities]
        target = q.get("target_doc_id")
        if target not in modalities:
            target = next((d for d in positives if modalities[d] == "image"), positives[0] if positives else None)
        if target is None:
            skipped += 1
            continue
        qids.append(q["qid"])
        texts.append(q["query"])
        relevant.append(list(q["positive_doc_ids"]))
        pos.append(target)
    cols: dict[str, Any] = {
        "qid": pa.array(qids, pa.string()), S.QUERY: pa.array(texts, pa.string()),
        RELEVANT_IDS: pa.array(relevant, pa.list_(pa.string())), f"{POS}_id": pa.array(pos, pa.string()),
    }
    counts = {"used": len(qids), "skipped_no_positive": skipped}
    if mined is not None:
        stubs = [TrainExample(qid=qid, query="", positive=Document(p, "text")) for qid, p in zip(qids, pos)]
        drawn = with_hard_negatives(stubs, mined, _IdOnly(), seed=seed, depth=depth)
        picks = [[n.doc_id for n in ex.negatives] for ex in drawn]
        for i, slot in enumerate(NEG_SLOTS):
            cols[f"{slot}_id"] = pa.array([p[i] if len(p) > i else None for p in picks], pa.string())
        counts["with_negatives"] = sum(1 for p in picks if p)
    if skipped:
        logger.warning("%d queries have no positive in the corpus and were skipped", skipped)
    return ExamplePlan(pa.table(cols), counts)


def _doc_side(docs, prefix: str):
    return docs.rename_columns({c: f"{prefix}_{'id' if c == S.DOC_ID else c}" for c in DOC_COLUMNS})


def join_documents(plan: ExamplePlan, docs, num_partitions: int = 2):
    """Hash-joins the documents onto the example rows (``Dataset.join``): an inner join for
    the positive, left outer joins for the optional negatives.

    Args:
        plan: from :func:`plan_examples`.
        docs: the documents dataset (:func:`read_documents`), ideally pre-filtered to
            ``plan.needed_ids`` with :func:`filter_ids` so the shuffle moves only those.
        num_partitions: hash partitions of each join.
    """
    import ray.data

    ds = ray.data.from_arrow(plan.rows)
    ds = ds.join(_doc_side(docs, POS), join_type="inner", num_partitions=num_partitions, on=(f"{POS}_id",))
    for slot in NEG_SLOTS:
        if f"{slot}_id" in plan.rows.column_names:
            ds = ds.join(_doc_side(docs, slot), join_type="left_outer", num_partitions=num_partitions,
                         on=(f"{slot}_id",))
    return ds


def build_train_dataset(
    root: str, split: str, storage_options: dict[str, str] | None = None, *,
    version: int | None = None, mined: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    seed: int = 0, depth: int = 10, max_queries: int | None = None, num_partitions: int = 2,
):
    """The training rows of ``split`` as a Ray Dataset (lazy) plus the plan's counts."""
    queries = read_queries(root, split, storage_options)
    if max_queries is not None:
        queries = queries[:max_queries]
    if not queries:
        raise ValueError(f"queries/{split} under {root} is empty: ingest queries for split {split!r} first")
    # Modalities are looked up only for queries without a target (the rule then prefers an
    # image positive); a given target is trusted here and checked by the inner join, which
    # drops the query if the target is not in the corpus (counted below).
    need = sorted({d for q in queries if not q.get("target_doc_id") for d in q["positive_doc_ids"]})
    modalities = document_modalities(root, need, storage_options, version) if need else {}
    modalities.update({q["target_doc_id"]: "?" for q in queries if q.get("target_doc_id")})
    plan = plan_examples(queries, modalities, mined, seed=seed, depth=depth)
    if plan.counts["used"] == 0:
        raise ValueError(
            f"no query of split {split!r} has a positive in {documents_uri(root)}: the qrels "
            "point at documents that were never ingested (or were quarantined)")
    docs = filter_ids(read_documents(root, storage_options, version), plan.needed_ids)
    return join_documents(plan, docs, num_partitions), plan.counts


def dev_documents_dataset(root: str, queries: Sequence[Mapping[str, Any]], storage_options: dict[str, str] | None = None,
                          version: int | None = None, pool: int | None = None, seed: int = 0):
    """Documents rank 0 scores dev queries against: the whole corpus (``pool=None``), or
    every dev positive plus about ``pool`` other documents picked by a hash of their id."""
    docs = read_documents(root, storage_options, version)
    if pool is None:
        return docs
    positives = sorted({d for q in queries for d in q["positive_doc_ids"]})
    total = docs.count()
    keep = _KeepPool(positives, fraction=min(1.0, pool / max(1, total)), seed=seed)
    return docs.map_batches(keep, batch_format="pyarrow")


class _KeepPool:
    def __init__(self, ids: Sequence[str], fraction: float, seed: int) -> None:
        self.ids = pa.array(ids, pa.string())
        self.fraction, self.seed = fraction, seed

    def __call__(self, batch: pa.Table) -> pa.Table:
        import hashlib

        batch = _plain(batch)
        ids = batch.column(S.DOC_ID).to_pylist()
        lucky = [int.from_bytes(hashlib.blake2b(f"{self.seed}:{d}".encode(), digest_size=8).digest(), "little")
                 / 2**64 < self.fraction for d in ids]
        mask = pc.or_(pc.is_in(batch.column(S.DOC_ID), value_set=self.ids), pa.array(lucky))
        return batch.filter(mask)


# ---- worker side ---------------------------------------------------------------------------
def _image(row: Mapping[str, Any], prefix: str, storage_options: dict[str, str] | None) -> Any:
    image = row.get(f"{prefix}_{S.IMAGE}")
    if image is None and row.get(f"{prefix}_{S.IMAGE_URI}"):
        image = storage.read_bytes(row[f"{prefix}_{S.IMAGE_URI}"], storage_options)
    return image


def row_document(row: Mapping[str, Any], prefix: str, storage_options: dict[str, str] | None = None) -> Document | None:
    """The document in slot ``prefix`` of a joined row, or ``None`` when the slot is empty."""
    doc_id = row.get(f"{prefix}_id")
    modality = row.get(f"{prefix}_{S.MODALITY}")
    if doc_id is None or modality is None:
        return None
    return Document(
        doc_id=str(doc_id), modality=str(modality), text=row.get(f"{prefix}_{S.TEXT}") or "",
        caption=row.get(f"{prefix}_{S.CAPTION}") or "",
        image=_image(row, prefix, storage_options) if modality == "image" else None,
    )


def rows_to_examples(batch: pa.Table | Mapping[str, Sequence[Any]], storage_options: dict[str, str] | None = None) -> list[TrainExample]:
    """Joined rows → :class:`TrainExample` objects (``q_comp`` against the positive's caption,
    as :func:`pipelines.train.examples.training_examples` does)."""
    rows = batch.to_pylist() if isinstance(batch, pa.Table) else [
        dict(zip(batch, values)) for values in zip(*batch.values())]
    out = []
    for row in rows:
        pos = row_document(row, POS, storage_options)
        if pos is None:
            raise ValueError(f"training row for query {row.get('qid')!r} has no positive document: "
                             "build rows with join_documents (an inner join on the positive)")
        negatives = tuple(d for d in (row_document(row, s, storage_options) for s in NEG_SLOTS) if d is not None)
        out.append(TrainExample(
            qid=str(row["qid"]), query=str(row[S.QUERY]), positive=pos, negatives=negatives,
            relevant_ids=frozenset(row[RELEVANT_IDS] or ()),
            positive_captions=(pos.caption,) if pos.modality == "image" else (),
        ))
    return out


def rows_to_documents(batch: pa.Table, storage_options: dict[str, str] | None = None) -> list[Document]:
    """Rows of the documents table → :class:`Document` objects (images stay encoded)."""
    out = []
    for row in _plain(batch).to_pylist():
        image = row.get(S.IMAGE)
        if image is None and row.get(S.IMAGE_URI):
            image = storage.read_bytes(row[S.IMAGE_URI], storage_options)
        out.append(Document(doc_id=row[S.DOC_ID], modality=row[S.MODALITY], text=row.get(S.TEXT) or "",
                            caption=row.get(S.CAPTION) or "", image=image if row[S.MODALITY] == "image" else None))
    return out
