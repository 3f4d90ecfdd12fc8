"""The per-epoch random choices of a training query, as pure functions of
``(seed, epoch, qid)``: which of its positives it trains with, and which two of its mined
hard negatives (stage 2) join it, plus the order queries are visited in; and which
captions its ``q_comp`` removes.

The authors' release re-draws both every epoch: one positive at random among the query's
positives of the kind it trains with (its image positives when it has any, else its text
positives), and one image and one text hard negative at random from the whole mined list
(top 100 over the mixed corpus, positives removed, split by modality). Both the
Ray path (:mod:`pipelines.train.dataset`, on the cluster where the rows are built) and the
in-memory path (:func:`pipelines.train.examples.training_examples`,
:func:`pipelines.train.negatives.with_hard_negatives`) call these functions, so the two
cannot drift; and since nothing depends on what was drawn before, a run resumed at epoch
``e`` draws exactly what an uninterrupted run draws at epoch ``e``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

MODALITY_ORDER = ("image", "text")
# Independent random streams per (seed, epoch, qid): switching one choice on or off leaves
# the others' draws unchanged.
_POSITIVE, _NEGATIVES, _NEAR_MISSES, _MIXTURE = 1, 2, 3, 4


@dataclass(frozen=True)
class DrawSettings:
    """How a query's positive and hard negatives are chosen each epoch.

    Attributes:
        seed: the run's seed.
        depth: each negative is drawn from the top ``depth`` of its modality (the release:
            the whole mined list, 100).
        redraw_each_epoch: draw the negatives again every epoch (the release); ``False``
            draws them once (at epoch 0) for the whole run.
        random_positive: pick one positive at random every epoch among the query's image
            positives, or its text positives when it has no image one (the release);
            ``False`` always trains with the first one.
        comp_captions: whose captions ``q_comp`` removes: ``"all"``, every image
            positive's (the release); ``"trained"``, only the caption of the positive the
            query trains with that epoch (the project before 2026-12-06).
        composed_share: the share of the split's composed queries (those that carry a
            picture) that join the training mixture (:func:`composed_mixture`): 1 all of
            them, 0 none.
    """

    seed: int = 0
    depth: int = 100
    redraw_each_epoch: bool = True
    random_positive: bool = True
    comp_captions: Literal["all", "trained"] = "all"
    composed_share: float = 1.0

    @classmethod
    def from_train(cls, train, seed: int | None = None) -> DrawSettings:
        """From a job's ``train`` settings (:class:`pipelines.train.config.DrawSettingsGroup`:
        ``ciea train``'s and ``ciea compare``'s), with the run's seed (default ``train.seed``)."""
        return cls(seed=train.seed if seed is None else seed, depth=train.negative_depth,
                   redraw_each_epoch=train.redraw_each_epoch, random_positive=train.random_positive,
                   comp_captions=train.comp_captions, composed_share=getattr(train, "composed_share", 1.0))


def _key(qid: str) -> int:
    return int.from_bytes(hashlib.blake2b(qid.encode(), digest_size=8).digest(), "little")


def query_rng(seed: int, epoch: int, qid: str, stream: int) -> np.random.Generator:
    """The generator of one query's draw: a function of its arguments only."""
    return np.random.default_rng([seed % 2**64, epoch, _key(qid), stream])


def choose_positive(qid: str, candidates: Sequence[str], fallback: str, settings: DrawSettings,
                    epoch: int) -> str:
    """The positive ``qid`` trains with in ``epoch``.

    Args:
        candidates: the query's positives of the kind it trains with (in the corpus), in a
            fixed order (:func:`pipelines.train.examples.positive_candidates`).
        fallback: the positive when there is no candidate.
    """
    if not candidates:
        return fallback
    if not settings.random_positive or len(candidates) == 1:
        return candidates[0]
    rng = query_rng(settings.seed, epoch, qid, _POSITIVE)
    return candidates[int(rng.integers(len(candidates)))]


def draw_negatives(qid: str, mined: Mapping[str, Sequence[str]] | None, exclude: Collection[str],
                   settings: DrawSettings, epoch: int) -> list[str]:
    """One image and one text hard negative for ``qid`` in ``epoch``, each drawn uniformly
    from the top ``settings.depth`` of its modality minus ``exclude`` (the query's
    positives); when a modality has none, both come from the other. Fewer than two only
    when fewer were mined.

    Args:
        mined: ``{"image": [...], "text": [...]}`` best first, or ``None``.
    """
    if not mined:
        return []
    pools = {m: [d for d in list(mined.get(m, ()))[: settings.depth] if d not in exclude] for m in MODALITY_ORDER}
    rng = query_rng(settings.seed, epoch if settings.redraw_each_epoch else 0, qid, _NEGATIVES)
    picks: list[str] = []
    for m, other in (("image", "text"), ("text", "image")):
        pool = [d for d in (pools[m] or pools[other]) if d not in picks]
        if pool:
            picks.append(pool[int(rng.integers(len(pool)))])
    return picks


def draw_composed_negatives(qid: str, near_misses: Sequence[str], mined: Mapping[str, Sequence[str]] | None,
                            exclude: Collection[str], settings: DrawSettings, epoch: int) -> list[str]:
    """A composed query's two hard negatives in ``epoch``: its reference document (the first
    near miss: the picture it asks with, unchanged) and one drawn uniformly from the other
    documents that match the picture but not the change; when there is no other, one of
    :func:`draw_negatives` from ``mined`` (stage 2), else just the reference.

    Args:
        near_misses: the query's near misses, reference first
            (``generate_composed_queries``' ``near_miss_doc_ids``).
        exclude: the query's positives and the positive it trains with.
    """
    near = [d for d in dict.fromkeys(near_misses) if d not in exclude]
    picks, rest = near[:1], near[1:]
    if rest:
        rng = query_rng(settings.seed, epoch if settings.redraw_each_epoch else 0, qid, _NEAR_MISSES)
        picks.append(rest[int(rng.integers(len(rest)))])
    elif mined:
        picks += draw_negatives(qid, mined, {*exclude, *picks}, settings, epoch)[: 2 - len(picks)]
    return picks


def composed_mixture(queries: Sequence[Mapping], share: float, seed: int) -> list:
    """The training queries with ``share`` of the composed ones (those carrying an ``image``):
    all of the other queries, and ``round(share * n)`` of the ``n`` composed ones, chosen by
    a seeded hash of their qid (the same on both training paths), in the input order."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"composed_share={share!r} is not in [0, 1]: it is the share of the composed queries "
                         "that train (1 all, 0 none)")
    composed = [q["qid"] for q in queries if q.get("image") is not None]
    if share >= 1.0 or not composed:
        return list(queries)
    keep = set(sorted(composed, key=lambda qid: query_rng(seed, 0, qid, _MIXTURE).random())[: round(share * len(composed))])
    return [q for q in queries if q.get("image") is None or q["qid"] in keep]


def visit_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """``slot[i]``: where the ``i``-th query (in qid order) comes in ``epoch`` (a permutation
    of ``range(n)``); worker ``r`` of ``w`` trains the slots ``r, r + w, …`` in order."""
    order = np.random.default_rng([seed % 2**64, epoch]).permutation(n)
    slots = np.empty(n, dtype=np.int64)
    slots[order] = np.arange(n)
    return slots
