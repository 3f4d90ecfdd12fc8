"""Turns queries and their documents into the model library's ``TrainExample`` objects: the
in-memory path (``ciea compare``; records become ``Document`` objects through the store's one
converter, :mod:`pipelines.store.documents`). Which positive a query trains with in an epoch
is decided by :mod:`pipelines.train.draws`, as on the Ray path."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from ciea_model.processor import Document, TrainExample
from pipelines.train.draws import (
    DrawSettings,
    choose_positive,
    composed_mixture,
    draw_composed_negatives,
)

logger = logging.getLogger(__name__)


def positive_candidates(q: Mapping[str, Any], modality: Mapping[str, str],
                        comp_captions: str = "all") -> tuple[list[str], str | None, list[str]]:
    """The rule both training paths share for one query, on ids: ``(candidates, fallback,
    caption_ids)``.

    The query's ``target_doc_id``, when its source names one and it is in the corpus, is its
    only candidate. Otherwise (every WebQA and EDIS query) the candidates are its image
    positives, or its text positives when it has no image one: one is drawn per epoch (see
    :func:`pipelines.train.draws.choose_positive`), as the release draws "a random positive
    of each kind". ``fallback`` is the first candidate (``None`` when no positive is in the
    corpus). ``caption_ids``: the image documents whose captions ``q_comp`` removes — with
    ``comp_captions="all"`` every image positive of the query (CIEA_METHOD.md), with
    ``"trained"`` none listed (the trained positive's own caption is used).

    Args:
        q: a query (``positive_doc_ids``, optional ``target_doc_id``).
        modality: doc_id → modality of the documents in the corpus (for a query with a
            target, at least the target's; "?" when unknown).
        comp_captions: :attr:`pipelines.train.draws.DrawSettings.comp_captions`.
    """
    target = q.get("target_doc_id")
    if target in modality:
        # The choice is made: the other positives' modalities matter only for their
        # captions, and may be left out of ``modality`` ("?" kept, checked where the
        # captions are read).
        maybe = [d for d in dict.fromkeys([*q["positive_doc_ids"], target]) if modality.get(d, "?") in ("image", "?")]
        return [target], target, (maybe if comp_captions == "all" else [])
    positives = [d for d in dict.fromkeys(q["positive_doc_ids"]) if d in modality]
    images = [d for d in positives if modality[d] == "image"]
    candidates = images or positives
    return candidates, (candidates[0] if candidates else None), (images if comp_captions == "all" else [])


def training_examples(
    queries: Iterable[Mapping[str, Any]], documents: Mapping[str, Document],
    settings: DrawSettings | None = None, epoch: int = 0,
) -> tuple[list[TrainExample], dict[str, int]]:
    """One :class:`TrainExample` per query whose positive is in ``documents``, as epoch
    ``epoch`` of a run trains it (the Ray path builds its rows with the same rule).

    The positive is the query's ``target_doc_id`` when given, else one of its image
    positives, else one of its text positives (CIEA_METHOD.md: image positive when there is
    one; picked at random per epoch with ``settings.random_positive``, else the first).
    ``q_comp`` removes the tokens of every image positive's caption
    (``settings.comp_captions="all"``) or of the trained positive's only (``"trained"``).
    A composed query (one with an ``image``) carries its picture (``query_image``) and its
    hard negatives: the reference document and another near miss
    (:func:`pipelines.train.draws.draw_composed_negatives`); ``settings.composed_share`` of
    them train (:func:`pipelines.train.draws.composed_mixture`).

    Returns:
        ``(examples, counts)`` with counts of queries used and skipped (no positive found).
    """
    settings = settings or DrawSettings()
    modality = {d: doc.modality for d, doc in documents.items()}
    examples, skipped = [], 0
    for q in composed_mixture(list(queries), settings.composed_share, settings.seed):
        candidates, fallback, caption_ids = positive_candidates(q, modality, settings.comp_captions)
        if fallback is None:
            skipped += 1
            continue
        target = documents[choose_positive(q["qid"], candidates, fallback, settings, epoch)]
        captions: tuple[str, ...] = ()
        if target.modality == "image":
            captions = tuple(dict.fromkeys([*(documents[d].caption for d in caption_ids if d in documents),
                                            target.caption]))
        negatives: tuple[Document, ...] = ()
        if q.get("image") is not None:
            picks = draw_composed_negatives(q["qid"], q.get("near_miss_doc_ids") or (), None,
                                            {*q["positive_doc_ids"], target.doc_id}, settings, epoch)
            negatives = tuple(documents[d] for d in picks if d in documents)
        examples.append(TrainExample(
            qid=q["qid"], query=q["query"], positive=target, negatives=negatives,
            relevant_ids=frozenset(q["positive_doc_ids"]), positive_captions=captions,
            query_image=q.get("image"),
        ))
    if skipped:
        logger.warning("%d training queries have no positive in the corpus and were skipped", skipped)
    return examples, {"used": len(examples), "skipped_no_positive": skipped}
