"""The one reader of a query split (``queries/<split>`` and ``qrels/<split>`` under a data
root, written by ``ciea ingest``): training, mining, the re-index gate and evaluation all
read splits here and shape what they need from :class:`Split`.

Small by construction (the queries and judgments of one split, never the corpus), so it is
read in the driver.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipelines.store import schema as S

if TYPE_CHECKING:
    from pipelines.store.delta_tables import Tables

logger = logging.getLogger(__name__)


class SplitNotFound(FileNotFoundError):
    """No ``queries/<split>`` table under the root; the message names the splits there."""


class EmptySplit(ValueError):
    """``queries/<split>`` holds no query."""


@dataclass(frozen=True)
class Split:
    """One split as ingest wrote it.

    Attributes:
        name: the split's name.
        queries: ``qid``, ``query``, ``metadata`` (the JSON object ingest stored, ``{}``
            when absent or malformed) and ``image`` (the query's normalised picture bytes,
            ``None`` for a text query and for every query of a table written before the
            column existed) per query, ordered by qid.
        qrels: qid → doc_id → relevance, for the split's own queries (judgments of other
            qids are dropped with a warning); a query without judgments has no key.
    """

    name: str
    queries: list[dict[str, Any]]
    qrels: dict[str, dict[str, int]]

    def positives(self, qid: str) -> list[str]:
        """The documents judged relevant (> 0) to ``qid``, sorted."""
        return sorted(d for d, r in self.qrels.get(qid, {}).items() if r > 0)

    def training_queries(self) -> list[dict[str, Any]]:
        """What training, mining and the re-index gate take, in qid order: ``qid``,
        ``query``, ``positive_doc_ids`` (sorted), ``kind`` (metadata's, else ``"all"``),
        ``target_doc_id`` (metadata's, else ``None``: WebQA and EDIS name none); a query that
        carries a picture also has ``image`` (its bytes) and ``near_miss_doc_ids``
        (metadata's, else ``[]``: a composed query's documents that match its image but not
        its change)."""
        out = []
        for q in self.queries:
            row = {"qid": q[S.QID], "query": q[S.QUERY], "positive_doc_ids": self.positives(q[S.QID]),
                   "kind": str(q["metadata"].get("kind", "all")), "target_doc_id": q["metadata"].get("target_doc_id")}
            if q.get(S.IMAGE) is not None:
                row.update(image=q[S.IMAGE], near_miss_doc_ids=_id_list(q["metadata"].get("near_miss_doc_ids")))
            out.append(row)
        return out


def splits_under(tables: Tables) -> list[str]:
    """Names of the query splits under ``<root>/queries`` (for error messages)."""
    import pyarrow.fs as pafs

    from pipelines.store import storage

    try:
        fs, path = tables.filesystem(storage.join(tables.root, "queries"))
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except Exception:  # only used to make an error message more helpful
        return []
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def _id_list(value: Any) -> list[str]:
    return [str(v) for v in value if isinstance(v, (str, int))] if isinstance(value, list) else []


def _metadata(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def read_split(tables: Tables, split: str) -> Split:
    """Reads ``queries/<split>`` and ``qrels/<split>`` (a missing qrels table: no judgments).

    Raises:
        SplitNotFound: no such split (the message names the ones there).
        EmptySplit: the split holds no query.
    """
    from deltalake.exceptions import TableNotFoundError

    try:
        uri = tables.queries(split)
        # A table written before queries carried pictures has no image column: all null.
        have = set(tables.dataset(uri).schema.names)
        qt = tables.read(uri, columns=[S.QID, S.QUERY, S.METADATA, *([S.IMAGE] if S.IMAGE in have else [])])
    except TableNotFoundError:
        have = splits_under(tables)
        there = f"splits there: {', '.join(have)}" if have else "no split there at all"
        raise SplitNotFound(
            f"no query split {split!r} at {tables.queries(split)} ({there}): ingest a source with that split "
            "(`ciea ingest ... --root <root>`), or name one of those") from None
    if qt.num_rows == 0:
        raise EmptySplit(f"query split {split!r} at {tables.queries(split)} is empty: re-ingest the source "
                         "that has its queries, or pick another split")
    try:
        rt = tables.read(tables.qrels(split), columns=[S.QID, S.DOC_ID, S.RELEVANCE])
    except TableNotFoundError:
        rt = pa.table({S.QID: pa.array([], pa.string()), S.DOC_ID: pa.array([], pa.string()),
                       S.RELEVANCE: pa.array([], pa.int32())})
    images = qt[S.IMAGE].to_pylist() if S.IMAGE in qt.column_names else [None] * qt.num_rows
    queries = sorted(({S.QID: qid, S.QUERY: text, "metadata": _metadata(meta), S.IMAGE: image}
                      for qid, text, meta, image in zip(*(qt[c].to_pylist() for c in (S.QID, S.QUERY, S.METADATA)),
                                                         images)),
                     key=lambda q: q[S.QID])
    qids = {q[S.QID] for q in queries}
    qrels: dict[str, dict[str, int]] = {}
    stray = 0
    for qid, doc_id, rel in zip(*(rt[c].to_pylist() for c in (S.QID, S.DOC_ID, S.RELEVANCE))):
        if qid not in qids:
            stray += 1
            continue
        qrels.setdefault(qid, {})[doc_id] = int(rel)
    if stray:
        logger.warning("qrels/%s has %d judgments for qids that are not in queries/%s; ignored", split, stray, split)
    return Split(split, queries, qrels)
