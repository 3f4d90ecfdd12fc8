"""Turns corpus records and queries into the model library's ``Document`` and
``TrainExample`` objects (the same records the Delta tables hold)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ciea_model.processor import Document, TrainExample

logger = logging.getLogger(__name__)


def to_document(record: Mapping[str, Any], image_transform: Callable[[Any], Any] | None = None) -> Document:
    """A corpus record (``doc_id``, ``modality``, ``text``, ``caption``, ``image``) → Document.

    Args:
        record: one row of the documents table / synthetic generator.
        image_transform: applied to the image once here (e.g. the processor's transform),
            so that repeated epochs do not decode the same PNG again.
    """
    image = record.get("image")
    if image is not None and image_transform is not None:
        image = image_transform(image)
    return Document(
        doc_id=str(record["doc_id"]), modality=str(record["modality"]),
        text=record.get("text") or "", caption=record.get("caption") or "", image=image,
    )


def training_examples(
    queries: Iterable[Mapping[str, Any]], documents: Mapping[str, Document]
) -> tuple[list[TrainExample], dict[str, int]]:
    """One :class:`TrainExample` per query whose positive is in ``documents``.

    The positive is the query's ``target_doc_id`` when given, else its first image
    positive, else its first positive (CIEA_METHOD.md: image positive when there is one).
    ``q_comp`` is taken against the chosen positive's caption: synthetic queries can
    have hundreds of relevant images whose captions together would cover every word.

    Returns:
        ``(examples, counts)`` with counts of queries used and skipped (no positive found).
    """
    examples, skipped = [], 0
    for q in queries:
        positives = [documents[d] for d in q["positive_doc_ids"] if d in documents]
        target = documents.get(q.get("target_doc_id") or "")
        if target is None and positives:
            target = next((d for d in positives if d.modality == "image"), positives[0])
        if target is None:
            skipped += 1
            continue
        examples.append(TrainExample(
            qid=q["qid"], query=q["query"], positive=target,
            relevant_ids=frozenset(q["positive_doc_ids"]),
            positive_captions=(target.caption,) if target.modality == "image" else (),
        ))
    if skipped:
        logger.warning("%d training queries have no positive in the corpus and were skipped", skipped)
    return examples, {"used": len(examples), "skipped_no_positive": skipped}

