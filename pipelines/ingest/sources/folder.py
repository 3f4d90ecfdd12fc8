"""An image folder with sidecar caption files.

``root/**/<name>.<jpg|jpeg|png|gif|webp|bmp|tif|tiff>`` is an image document; its caption is
the UTF-8 text of ``<name>.txt`` beside it (optional: no sidecar → empty caption). The
``doc_id`` is the image's path relative to ``root`` without its extension
(``cats/001.jpg`` → ``cats/001``), so it is stable across re-ingests. A caption file with no
image beside it is a record too, quarantined as ``missing_image``; other files are ignored
(and counted in the log). Images are stored inline or, with ``image_mode="uri"``, by URI.

Confinement (``pipelines.ingest.confine``): the walk never follows a symlinked folder (one
pointing outside the roots is a record quarantined as ``outside_root``); an image or caption
that resolves outside the folder and ``allow_roots`` quarantines its record as
``outside_root``, a FIFO or device as ``not_a_regular_file`` — unopened, nothing of it stored.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa

from pipelines.ingest.confine import Refused, walk
from pipelines.ingest.sources.base import RawBuilder, Source, failure_fields, text_excerpt
from pipelines.store import storage

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")
CAPTION_SUFFIX = ".txt"


class FolderSource(Source):
    kind = "folder"

    def __init__(self, path: str, files_per_shard: int = 500, name: str | None = None,
                 storage_options: dict[str, str] | None = None, image_mode: str = "inline",
                 allow_roots: Iterable[str] = ()) -> None:
        super().__init__(name, storage_options, image_mode, allow_roots)
        self.path = storage.normalise_uri(path)
        self.files_per_shard = files_per_shard
        self._count: int | None = None

    def own_roots(self) -> list[str]:
        return [self.path]

    def _entries(self) -> list[list[Any]]:
        """``[image_rel, caption_rel, refusal]`` per record, in name order; ``refusal`` is
        ``[reason, detail]`` for a listed entry that is no record of its own (a symlinked
        folder outside the roots), else None."""
        try:
            listing = walk(self.path, self.roots(), self.storage_options)
        except FileNotFoundError:
            raise FileNotFoundError(f"image folder {self.path} is not a directory; check source.path") from None
        images: list[str] = []
        captions: dict[str, str] = {}
        ignored = 0
        refused: list[list[Any]] = []
        for item in listing:
            rel = item.rel
            stem, ext = posixpath.splitext(rel)
            if ext.lower() in IMAGE_SUFFIXES:
                images.append(rel)  # a.jpg beside a.png: one doc_id twice, the duplicate rule decides
            elif ext.lower() == CAPTION_SUFFIX:
                captions[stem] = rel  # a refused one is refused again, unread, when its record is read
            elif item.folder_link and item.refused is not None:
                refused.append([None, None, [rel, item.refused.reason, item.refused.detail]])
            else:
                ignored += 1
        if ignored:
            logger.info("%s: ignored %d files that are neither images nor .txt captions", self.path, ignored)
        image_stems = {posixpath.splitext(r)[0] for r in images}
        entries: list[list[Any]] = [
            [rel, captions.get(posixpath.splitext(rel)[0]), None] for rel in images]
        entries += [[None, rel, None] for stem, rel in captions.items() if stem not in image_stems]
        entries += refused
        entries.sort(key=lambda e: e[0] or e[1] or e[2][0])
        return entries

    def plan(self) -> list[dict[str, Any]]:
        entries = self._entries()
        self._count = len(entries)
        n = self.files_per_shard
        return [{"entries": entries[i : i + n]} for i in range(0, len(entries), n)]

    def estimated_records(self) -> int | None:
        return self._count

    def read(self, shard_index: int, spec: dict[str, Any]) -> Iterator[pa.Table]:
        builder = RawBuilder(self.name, shard_index)
        for entry in spec["entries"]:
            image_rel, caption_rel = entry[0], entry[1]
            refusal = entry[2] if len(entry) > 2 else None
            if refusal is not None:
                table = builder.error(refusal[0], refusal[1], refusal[2])
            else:
                rel = image_rel or caption_rel
                doc_id = posixpath.splitext(rel)[0]
                try:
                    fields, error = self._record(image_rel, caption_rel, doc_id)
                except Exception as e:  # one record never aborts the ingest
                    fields, error = {}, failure_fields(f"reading {rel}", e)
                if error:
                    table = builder.add(rel, doc_id=doc_id, **error)
                else:
                    table = builder.add(rel, **fields)
            if table is not None:
                yield table
        table = builder.flush()
        if table is not None:
            yield table

    def _read(self, rel: str, reason: str) -> tuple[str | None, bytes | None, dict[str, Any] | None]:
        """``(resolved path, bytes, None)``, or ``(None, None, error fields)`` when the roots
        refuse the file or it cannot be read (``reason``)."""
        try:
            resolved, data = self.roots().read(storage.join(self.path, rel), self.storage_options, shown=rel)
        except Refused as r:
            return None, None, r.fields()
        except OSError as e:
            return None, None, _error(reason, f"cannot read {rel}: {e}")
        if data is None:
            return None, None, _error(reason, f"cannot read {rel}: it no longer exists")
        return resolved, data, None

    def _record(self, image_rel: str | None, caption_rel: str | None,
                doc_id: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """``(raw fields, error fields or None)`` of one image (and its caption); each file is
        read only after the roots allow it (``pipelines.ingest.confine``)."""
        fields: dict[str, Any] = {"doc_id": doc_id, "modality": "image"}
        if caption_rel is not None:
            _, raw, failed = self._read(caption_rel, "caption_unreadable")
            if failed is not None:
                return fields, failed
            try:
                fields["caption"] = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return fields, _error("not_utf8", f"{caption_rel} is not valid UTF-8 ({e.reason} at byte "
                                      f"{e.start}); re-encode the caption file as UTF-8", text_excerpt(raw))
        if image_rel is None:
            return fields, _error("missing_image", f"caption file {caption_rel} has no image beside it "
                                  f"({'/'.join(IMAGE_SUFFIXES)}); add the image or remove the caption")
        # Read in both modes: validation then decodes these bytes, never reopens the path.
        resolved, data, failed = self._read(image_rel, "image_missing")
        if failed is not None:
            return fields, failed
        fields["image"] = data
        if self.image_mode != "inline":
            fields["image_uri"] = resolved
        return fields, None


def _error(reason: str, detail: str, excerpt: str | None = None) -> dict[str, Any]:
    return {"error": reason, "error_detail": detail, "raw_excerpt": excerpt}
