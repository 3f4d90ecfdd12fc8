"""Validation and normalisation: raw source records in, documents or quarantine rows out.

A pure batch function (no Ray, no Delta), so unit tests call it directly and the ingest job
maps it over a Ray Dataset. Every input row yields exactly one output row, ``ok`` or
``quarantined``: nothing is dropped, so ``in = accepted + quarantined`` holds by
construction and is re-checked by the job.

Rules, in the order they are applied:

1. A record the reader already failed on (``error`` set: bad JSON, non-UTF-8 bytes, wrong
   types, a missing image entry) is quarantined at stage ``read`` with the reader's reason.
2. ``doc_id``: required, a string of 1..``max_doc_id_chars`` characters without control
   characters (integers from JSON/Parquet are converted to their decimal string by the
   readers).
3. Text and caption: bytes must be valid UTF-8 (``not_utf8``); Unicode NFC, ``\\r\\n`` →
   ``\\n``, control characters other than tab/newline removed, surrounding whitespace
   stripped, empty → null; longer than ``max_text_chars`` / ``max_caption_chars`` →
   ``text_too_long`` / ``caption_too_long`` (quarantined, never truncated silently).
4. Modality: ``text`` needs text, ``image`` needs an image (``missing_text`` /
   ``missing_image``); when the source does not say, an image makes it ``image``, text alone
   ``text``, neither → ``missing_content``.
5. Image: at most ``max_image_bytes`` encoded; the header's width × height at most
   ``max_image_pixels`` *before* any pixel is decoded (decompression-bomb guard,
   ``image_too_large``); it must be recognised (``image_unrecognised``) and fully decode
   (``image_decode_failed``: truncated or corrupt data). EXIF orientation is applied and the
   image converted to RGB (alpha composited on white); the original bytes are kept when
   they already are an upright RGB JPEG or PNG, otherwise the image is re-encoded (JPEG
   stays JPEG at quality 95, everything else becomes PNG).
6. ``content_sha256`` = SHA-256 over the normalised text, caption and image bytes
   (length-prefixed, so field boundaries cannot collide). Metadata is not part of it: a
   metadata-only change is not an update.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipelines.store import images, storage
from pipelines.store import schema as S
from pipelines.store.secrets import redact_text

# Every control character except tab and newline (C0, DEL, C1).
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class Limits:
    """Size limits; a record over any of them is quarantined with the limit in the detail."""

    max_doc_id_chars: int = 512
    max_text_chars: int = 100_000
    max_caption_chars: int = 10_000
    max_image_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    excerpt_chars: int = 200


class Rejected(Exception):
    """A record fails a rule: ``reason`` is a stable code, ``detail`` says what and how to fix."""

    def __init__(self, reason: str, detail: str, stage: str = S.STAGE_VALIDATE) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.stage = reason, detail, stage


# ---------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------


def normalise_text(value: Any, field: str, max_chars: int) -> str | None:
    """NFC-normalised, cleaned text, or None when empty.

    Raises:
        Rejected: ``not_utf8`` for undecodable bytes, ``wrong_type`` for a non-string,
            ``{field}_too_long`` past ``max_chars``.
    """
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise Rejected(
                "not_utf8", f"{field} is not valid UTF-8 ({e.reason} at byte {e.start}); "
                "re-encode the source as UTF-8") from None
    if not isinstance(value, str):
        raise Rejected("wrong_type", f"{field} must be a string, got {type(value).__name__}")
    # Length is checked before normalising too: NFC of a 10 MB string is wasted work.
    if len(value) > 4 * max_chars:
        raise Rejected(f"{field}_too_long", f"{field} has {len(value)} characters; the limit is "
                       f"{max_chars} (limits.max_{field}_chars)")
    text = unicodedata.normalize("NFC", value.replace("\r\n", "\n"))
    text = _CONTROL_RE.sub("", text).strip()
    if len(text) > max_chars:
        raise Rejected(f"{field}_too_long", f"{field} has {len(text)} characters; the limit is "
                       f"{max_chars} (limits.max_{field}_chars)")
    return text or None


# ---------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------


def normalise_image(data: bytes, limits: Limits) -> tuple[bytes, int, int]:
    """Decoded, upright, RGB image bytes and their size: the store's one image rule
    (:func:`pipelines.store.images.normalise_image`, which searches with a picture apply too)
    under ``limits``.

    Returns:
        ``(bytes, width, height)``: the original bytes when already an upright RGB JPEG/PNG,
        else a re-encoding.

    Raises:
        Rejected: ``image_too_large``, ``image_unrecognised`` or ``image_decode_failed``.
    """
    try:
        return images.normalise_image(data, limits.max_image_bytes, limits.max_image_pixels,
                                      limit_names=("limits.max_image_bytes", "limits.max_image_pixels"))
    except images.ImageRejected as e:
        raise Rejected(e.reason, e.detail) from None


# ---------------------------------------------------------------------------------------
# Hashing and excerpts
# ---------------------------------------------------------------------------------------


def content_sha256(text: str | None, caption: str | None, image: bytes | None) -> str:
    """SHA-256 (hex) over the normalised content; the document's change detector."""
    h = hashlib.sha256()
    for part in (
        None if text is None else text.encode("utf-8"),
        None if caption is None else caption.encode("utf-8"),
        image,
    ):
        if part is None:
            h.update(b"\xff" * 8)  # distinct from an empty value
        else:
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    return h.hexdigest()


def _fingerprint(raw: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for name in (S.DOC_ID, S.MODALITY, S.TEXT, S.CAPTION, S.IMAGE_URI, S.ERROR, S.RAW_EXCERPT):
        value = raw.get(name)
        h.update(b"\x00" if value is None else str(value).encode("utf-8", "backslashreplace"))
        h.update(b"\x1f")
    image = raw.get(S.IMAGE)
    if image is not None:
        h.update(hashlib.sha256(image).digest())
    return h.hexdigest()


def _short(value: str, n: int) -> str:
    return value if len(value) <= n else value[: n - 1] + "…"


def excerpt(raw: dict[str, Any], n: int) -> str:
    """A short, printable view of a record for the quarantine table, its URLs redacted
    (:func:`pipelines.store.secrets.redact_text`: no credential reaches the quarantine)."""
    if raw.get(S.RAW_EXCERPT):
        return _short(redact_text(raw[S.RAW_EXCERPT]), n)
    parts: dict[str, Any] = {}
    for name in (S.DOC_ID, S.MODALITY, S.TEXT, S.CAPTION, S.IMAGE_URI):
        value = raw.get(name)
        if value is None:
            continue
        if isinstance(value, (bytes, bytearray)):
            value = bytes(value[:60]).decode("utf-8", "backslashreplace")
        parts[name] = _short(redact_text(str(value)), max(n // 2, 16))
    image = raw.get(S.IMAGE)
    if image is not None:
        parts["image"] = f"{len(image)} bytes, starts {bytes(image[:12]).hex()}"
    return _short(json.dumps(parts, ensure_ascii=False), n)


# ---------------------------------------------------------------------------------------
# One record, one batch
# ---------------------------------------------------------------------------------------


def validate_record(
    raw: dict[str, Any],
    limits: Limits,
    image_mode: str = "inline",
    storage_options: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Validate and normalise one raw record (``RAW_SCHEMA`` fields).

    Args:
        raw: The record as a dict.
        limits: Size limits.
        image_mode: ``"inline"`` stores the normalised bytes; ``"uri"`` keeps ``image_uri``
            (the bytes are still read, decoded and hashed here, so a bad image is caught at
            ingest, never at query time).
        storage_options: For reading ``image_uri`` from object storage.

    Returns:
        A ``VALIDATED_SCHEMA`` row: ``status`` ``ok`` or ``quarantined``.
    """
    out: dict[str, Any] = {name: None for name in S.VALIDATED_SCHEMA.names}
    out.update({S.SOURCE: raw[S.SOURCE], S.RECORD_REF: raw[S.RECORD_REF], S.SEQ: raw[S.SEQ],
                S.DOC_ID: raw.get(S.DOC_ID)})
    try:
        if raw.get(S.ERROR):
            raise Rejected(raw[S.ERROR], raw.get(S.ERROR_DETAIL) or raw[S.ERROR], S.STAGE_READ)
        doc_id = raw.get(S.DOC_ID)
        if doc_id is None or (isinstance(doc_id, str) and not doc_id.strip()):
            raise Rejected("missing_doc_id", "doc_id is missing or empty; every record needs a "
                           "stable string id")
        if not isinstance(doc_id, str):
            raise Rejected("wrong_type", f"doc_id must be a string, got {type(doc_id).__name__}")
        if len(doc_id) > limits.max_doc_id_chars or _CONTROL_RE.search(doc_id) or doc_id != doc_id.strip():
            raise Rejected("bad_doc_id", f"doc_id must be 1..{limits.max_doc_id_chars} characters "
                           "without control characters or surrounding whitespace")
        text = normalise_text(raw.get(S.TEXT), "text", limits.max_text_chars)
        caption = normalise_text(raw.get(S.CAPTION), "caption", limits.max_caption_chars)
        image, uri = raw.get(S.IMAGE), raw.get(S.IMAGE_URI)
        modality = raw.get(S.MODALITY)
        if modality is None:
            modality = "image" if (image is not None or uri) else "text"
        if modality not in S.MODALITIES:
            raise Rejected("bad_modality", f"modality {modality!r} is not one of {list(S.MODALITIES)}")
        if modality == "image" and image is None and not uri:
            raise Rejected("missing_image" if (text or caption) else "missing_content",
                           "an image document needs image bytes or an image path/URI")
        if modality == "text" and text is None:
            raise Rejected("missing_content" if caption is None else "missing_text",
                           "a text document needs non-empty text (an image document needs an image)")
        width = height = None
        if modality == "image":
            if image is None:
                try:
                    image = storage.read_bytes(uri, storage_options)
                except (FileNotFoundError, OSError) as e:
                    raise Rejected("image_missing", f"cannot read image {uri!r}: {e}; fix the "
                                   "path or URI (relative paths resolve against the source file)") from None
            image, width, height = normalise_image(bytes(image), limits)
        else:
            image = None
            uri = None
        out.update({
            S.STATUS: S.STATUS_OK, S.DOC_ID: doc_id, S.MODALITY: modality, S.TEXT: text,
            S.CAPTION: caption, S.IMAGE: image if image_mode == "inline" else None,
            S.IMAGE_URI: None if image_mode == "inline" else uri,
            S.IMAGE_WIDTH: width, S.IMAGE_HEIGHT: height, S.METADATA: raw.get(S.METADATA),
            S.CONTENT_SHA256: content_sha256(text, caption, image),
        })
    except Rejected as r:
        doc_id = raw.get(S.DOC_ID)
        out.update({
            S.STATUS: S.STATUS_QUARANTINED, S.STAGE: r.stage, S.REASON: r.reason,
            S.DETAIL: redact_text(r.detail), S.EXCERPT: excerpt(raw, limits.excerpt_chars),
            S.FINGERPRINT: _fingerprint(raw),
            S.DOC_ID: doc_id if isinstance(doc_id, str) else None,
        })
    return out


def validate_batch(
    batch: pa.Table,
    limits: Limits,
    image_mode: str = "inline",
    storage_options: dict[str, str] | None = None,
) -> pa.Table:
    """``validate_record`` over a ``RAW_SCHEMA`` batch; one output row per input row."""
    rows = [validate_record(r, limits, image_mode, storage_options) for r in batch.to_pylist()]
    return pa.Table.from_pylist(rows, schema=S.VALIDATED_SCHEMA)


def quarantine_id(source: str, record_ref: str, stage: str, reason: str, fingerprint: str) -> str:
    """Stable id of a quarantine row (see ``QUARANTINE_SCHEMA``)."""
    key = "\x1f".join((source, record_ref, stage, reason, fingerprint))
    return hashlib.sha256(key.encode("utf-8")).hexdigest()
