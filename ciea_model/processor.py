"""The one place that turns raw documents and queries into model inputs.

Training, the embedding stage and search all call this processor, so tokenisation, image
transforms and the query-minus-caption construction cannot drift between them.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from .config import CIEAConfig

logger = logging.getLogger(__name__)

IM_START = "<im_start>"
IM_END = "<im_end>"
IM_PATCH = "<im_patch>"  # placeholder ids, overwritten by patch vectors inside the model
SPECIAL_TOKENS = (IM_START, IM_END, IM_PATCH)
CAPTION_PREFIX = "caption: "

MODALITIES = ("text", "image")


@dataclass(frozen=True)
class Document:
    """A corpus document. ``image`` may be a PIL image, encoded bytes (PNG/JPEG/...) or an
    already transformed (3, S, S) tensor; ``caption`` is the image's caption / alt text."""

    doc_id: str
    modality: str
    text: str = ""
    caption: str = ""
    image: Any = None

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(
                f"document {self.doc_id!r}: modality={self.modality!r} is not one of "
                f"{MODALITIES}."
            )
        if self.modality == "image" and self.image is None:
            raise ValueError(f"document {self.doc_id!r}: modality 'image' but no image given.")


@dataclass(frozen=True)
class TrainExample:
    """One training query with its positive, optional hard negatives, and everything
    needed for the complementary loss.

    Attributes:
        qid: query id.
        query: query text.
        positive: the positive document (an image document when the query has one).
        negatives: hard negatives (stage 2); empty for in-batch-only training.
        relevant_ids: every document relevant to the query, so that a relevant document
            that happens to be in the batch is never used as its negative.
        positive_captions: captions of the query's image positives, for ``q_comp``.
        query_image: the query's picture (a composed query's reference image: PIL image,
            encoded bytes or a transformed tensor, as :class:`Document` takes), or ``None``.
            A query with a picture is encoded with the document-side input construction
            (picture, then the query text in the caption's place), as search encodes it.
    """

    qid: str
    query: str
    positive: Document
    negatives: tuple[Document, ...] = ()
    relevant_ids: frozenset[str] = frozenset()
    positive_captions: tuple[str, ...] = ()
    query_image: Any = None


def doc_key(doc_id: str) -> int:
    """A stable signed 64-bit key for a ``doc_id`` (tensors cannot hold strings, and keys
    must agree across processes to de-duplicate gathered candidates)."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little", signed=True)


def _to_device(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


@dataclass
class DocumentBatch:
    """A collated batch of mixed text and image documents.

    ``text_index`` / ``image_index`` give each sub-batch's rows in the original order;
    ``text`` and ``image`` hold the tensors (``None`` when a sub-batch is empty).
    """

    size: int
    text_index: torch.Tensor
    image_index: torch.Tensor
    text: dict[str, torch.Tensor] | None = None
    image: dict[str, torch.Tensor] | None = None

    def to(self, device: torch.device | str) -> DocumentBatch:
        return DocumentBatch(
            self.size, self.text_index.to(device), self.image_index.to(device),
            _to_device(self.text, device), _to_device(self.image, device),
        )


@dataclass
class TrainBatch:
    """A collated training batch (see :meth:`CIEAProcessor.collate_training`)."""

    queries: dict[str, torch.Tensor]
    documents: DocumentBatch
    doc_ids: list[str]
    doc_keys: torch.Tensor  # (C,) int64
    targets: torch.Tensor  # (B,) index into documents
    ignore: torch.Tensor  # (B, C) true where a candidate is relevant but not the target
    comp_queries: dict[str, torch.Tensor] | None = None
    comp_targets: torch.Tensor | None = None  # (Bc,) index into the image sub-batch
    stats: dict[str, int] = field(default_factory=dict)
    #: Queries that carry a picture, as image documents (picture + query text), and their
    #: rows in the batch (``(Bp,)``); ``None`` when no query has one (or the model reads no
    #: image: then the text alone is the query).
    query_pictures: DocumentBatch | None = None
    query_picture_index: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> TrainBatch:
        return TrainBatch(
            _to_device(self.queries, device), self.documents.to(device), self.doc_ids,
            self.doc_keys.to(device), self.targets.to(device), self.ignore.to(device),
            _to_device(self.comp_queries, device), _to_device(self.comp_targets, device),
            dict(self.stats),
            None if self.query_pictures is None else self.query_pictures.to(device),
            _to_device(self.query_picture_index, device),
        )


class ImageTransform:
    """CLIP-style transform without torchvision: RGB → resize the short side (bicubic) →
    centre crop → scale to [0, 1] → normalise. Returns a (3, S, S) float tensor."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size = size
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    def __call__(self, image: Any) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            return image
        if isinstance(image, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(image)))
        image = image.convert("RGB")
        w, h = image.size
        scale = self.size / min(w, h)
        if (w, h) != (self.size, self.size):
            nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
            image = image.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - self.size) // 2, (nh - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
        arr = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy((arr - self.mean) / self.std)


class CIEAProcessor:
    """Tokenisation with the image special tokens, image transforms, query-minus-caption,
    and collation of mixed text/image batches for every variant.

    Args:
        tokenizer: a Hugging Face tokenizer; the special tokens are added if missing
            (``univl-dr`` adds none: it never builds image sequences, and CLIP keeps its
            own vocabulary).
        config: the model config (decides how image documents are laid out).
        image_size: the vision tower's input size.
        num_patches: patch vectors per image (``(image_size / patch_size)²``).
    """

    def __init__(self, tokenizer: Any, config: CIEAConfig, image_size: int, num_patches: int) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.max_length = config.text.max_length
        self.num_patches = num_patches
        missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
        if missing and not config.is_dual_encoder:
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
        if tokenizer.pad_token is None:
            # Decoder-only LMs (GPT-2) ship without a pad token; pooling reads the last
            # non-pad position from the attention mask, so any id works as padding.
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        tokenizer.padding_side = "right"
        self.im_start_id, self.im_end_id, self.im_patch_id = (
            tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS
        )
        self.pad_id = tokenizer.pad_token_id
        self.image_transform = ImageTransform(image_size, config.vision.image_mean, config.vision.image_std)
        self._prefix = self._leading_specials()

    def __len__(self) -> int:
        return len(self.tokenizer)

    # ---- tokenisation -------------------------------------------------------------------
    def _leading_specials(self) -> list[int]:
        """The special tokens a tokenizer puts in front of any text ([CLS] for BERT, <s> for
        BART, none for T5 and GPT-2): image sequences keep them in front too."""
        enc = self.tokenizer("x", add_special_tokens=True, return_special_tokens_mask=True)
        n = 0
        while n < len(enc["input_ids"]) and enc["special_tokens_mask"][n]:
            n += 1
        return list(enc["input_ids"][:n])

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Queries and text documents: (B,) strings → ``input_ids``/``attention_mask`` (B, L)."""
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def _pad(self, rows: list[list[int]], n_masks: int = 0) -> tuple[torch.Tensor, ...]:
        """Right-pads id rows; returns ids, attention mask and ``n_masks`` empty bool masks."""
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attn[i, : len(row)] = 1
        masks = (torch.zeros((len(rows), length), dtype=torch.bool) for _ in range(n_masks))
        return (ids, attn, *masks)

    @property
    def patch_start(self) -> int:
        """Position of the first patch in every image sequence (after the prefix and
        ``<im_start>``); the caption side starts ``num_patches`` later."""
        return len(self._prefix) + 1

    def image_document_ids(self, captions: Sequence[str]) -> list[list[int]]:
        """Token ids of image documents: ``prefix + <im_start> + N×<im_patch> + <im_end>
        + "caption:" caption + suffix``, one list per caption (tokenised as one batch)."""
        enc = self.tokenizer(
            [CAPTION_PREFIX + c for c in captions], add_special_tokens=True, truncation=True,
            max_length=self.max_length,
        )
        n_pre = len(self._prefix)
        image = [self.im_start_id] + [self.im_patch_id] * self.num_patches + [self.im_end_id]
        return [ids[:n_pre] + image + ids[n_pre:] for ids in enc["input_ids"]]

    def image_only_ids(self) -> list[int]:
        """``prefix + <im_start> + N×<im_patch> + <im_end>``."""
        return self._prefix + [self.im_start_id] + [self.im_patch_id] * self.num_patches + [self.im_end_id]

    def collate_image_sequences(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token-side inputs of image documents (the pixel values are added by the caller).

        Returns ``input_ids``, ``attention_mask``, ``patch_mask`` (where the patches go) and
        ``caption_mask`` (the caption-side tokens ``<im_end> caption: … </s>`` the extractor
        compares patches with), plus the ``io_*`` image-only sequences.
        """
        rows = self.image_document_ids(captions)
        ids, attn, patch_mask, caption_mask = self._pad(rows, n_masks=2)
        p0, c0 = self.patch_start, self.patch_start + self.num_patches
        patch_mask[:, p0:c0] = True
        caption_mask[:, c0:] = attn[:, c0:].bool()  # the caption side, padding excluded
        io_ids = torch.tensor([self.image_only_ids()] * len(captions), dtype=torch.long)
        io_patch = torch.zeros_like(io_ids, dtype=torch.bool)
        io_patch[:, p0:c0] = True
        return {
            "input_ids": ids, "attention_mask": attn, "patch_mask": patch_mask,
            "caption_mask": caption_mask, "io_input_ids": io_ids,
            "io_attention_mask": torch.ones_like(io_ids), "io_patch_mask": io_patch,
        }

    # ---- documents ----------------------------------------------------------------------
    def collate_documents(self, docs: Sequence[Document]) -> DocumentBatch:
        """Collates mixed documents in one batch, laid out for the configured variant.

        ``text-only`` reads an image document as its caption; ``univl-dr`` tokenises the
        bare caption as text beside the pixels (the release feeds CLIP the caption alone,
        ``clip.tokenize(cap_inputs)`` in UniVL-DR/data.py); the CIEA family builds the image
        sequence.
        """
        if not docs:
            raise ValueError("collate_documents got an empty batch")
        as_image = [d.modality == "image" and self.config.uses_images for d in docs]
        text_idx = [i for i, img in enumerate(as_image) if not img]
        image_idx = [i for i, img in enumerate(as_image) if img]
        batch = DocumentBatch(
            len(docs), torch.tensor(text_idx, dtype=torch.long), torch.tensor(image_idx, dtype=torch.long)
        )
        if text_idx:
            batch.text = self.tokenize([_document_text(docs[i]) for i in text_idx])
        if image_idx:
            captions = [docs[i].caption for i in image_idx]
            if self.config.is_dual_encoder:
                image = self.tokenize(captions)
            else:
                image = self.collate_image_sequences(captions)
            image["pixel_values"] = torch.stack([self.image_transform(docs[i].image) for i in image_idx])
            batch.image = image
        return batch

    # ---- query minus caption ------------------------------------------------------------
    def query_minus_caption(self, query: str, captions: Sequence[str]) -> str | None:
        """``q_comp``: the query with every token that occurs in the positive captions
        removed (set difference on token ids, the release's behaviour), decoded to text so
        that it is re-tokenised like any query. Returns ``None`` when nothing is left.

        Example (word-level tokenizer): query "a red circle from the harbor", caption
        "a circle from the harbor" → "red".
        """
        q_ids = self.tokenizer(query, add_special_tokens=False)["input_ids"]
        caption_ids: set[int] = set()
        for c in captions:
            caption_ids.update(self.tokenizer(c, add_special_tokens=False)["input_ids"])
        kept = [i for i in q_ids if i not in caption_ids]
        if not kept:
            return None
        text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
        return text or None

    # ---- training batches ---------------------------------------------------------------
    def collate_training(self, examples: Sequence[TrainExample]) -> TrainBatch:
        """Collates queries, de-duplicated candidates (positives, then hard negatives) and
        the complementary-loss inputs.

        Documents are de-duplicated by ``doc_id`` so that a document repeated in the batch
        is encoded once and is never its own negative.
        """
        docs: list[Document] = []
        index: dict[str, int] = {}

        def add(doc: Document) -> int:
            if doc.doc_id not in index:
                index[doc.doc_id] = len(docs)
                docs.append(doc)
            return index[doc.doc_id]

        targets = [add(ex.positive) for ex in examples]
        for ex in examples:
            for neg in ex.negatives:
                add(neg)
        ignore = torch.zeros((len(examples), len(docs)), dtype=torch.bool)
        for qi, ex in enumerate(examples):
            for doc_id in ex.relevant_ids:
                j = index.get(doc_id)
                if j is not None and j != targets[qi]:
                    ignore[qi, j] = True
        documents = self.collate_documents(docs)
        batch = TrainBatch(
            queries=self.tokenize([ex.query for ex in examples]),
            documents=documents,
            doc_ids=[d.doc_id for d in docs],
            doc_keys=torch.tensor([doc_key(d.doc_id) for d in docs], dtype=torch.long),
            targets=torch.tensor(targets, dtype=torch.long),
            ignore=ignore,
        )
        pictures = [i for i, ex in enumerate(examples) if ex.query_image is not None] if self.config.uses_images else []
        if pictures:
            # The document-side construction, exactly as search encodes a picture query.
            batch.query_pictures = self.collate_documents([
                Document(doc_id=f"query:{examples[i].qid}", modality="image", caption=examples[i].query,
                         image=examples[i].query_image) for i in pictures])
            batch.query_picture_index = torch.tensor(pictures, dtype=torch.long)
            batch.stats["picture_queries"] = len(pictures)
        if self.config.effective_comp_weight > 0 and documents.image is not None:
            self._add_comp(batch, examples, targets)
        return batch

    def _add_comp(self, batch: TrainBatch, examples: Sequence[TrainExample], targets: list[int]) -> None:
        image_pos = {int(j): k for k, j in enumerate(batch.documents.image_index.tolist())}
        texts, comp_targets, eligible, skipped = [], [], 0, 0
        for ex, t in zip(examples, targets):
            if t not in image_pos or ex.query_image is not None:
                # L_comp only concerns text queries whose positive is an image document (a
                # picture query already holds an image).
                continue
            eligible += 1
            captions = ex.positive_captions or (ex.positive.caption,)
            comp = self.query_minus_caption(ex.query, captions)
            if comp is None:
                skipped += 1
                continue
            texts.append(comp)
            comp_targets.append(image_pos[t])
        batch.stats.update(comp_eligible=eligible, comp_skipped=skipped)
        if texts:
            batch.comp_queries = self.tokenize(texts)
            batch.comp_targets = torch.tensor(comp_targets, dtype=torch.long)


def _document_text(doc: Document) -> str:
    # Read as text: a text document's body, or (text-only variant) an image's caption.
    return doc.text if doc.modality == "text" else doc.caption
