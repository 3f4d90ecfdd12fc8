"""An image folder with sidecar caption files.

``root/**/<name>.<jpg|jpeg|png|gif|webp|bmp|tif|tiff>`` is an image document; its caption is
the UTF-8 text of ``<name>.txt`` beside it (optional: no sidecar → empty caption). The
``doc_id`` is the image's path relative to ``root`` without its extension
(``cats/001.jpg`` → ``cats/001``), so it is stable across re-ingests. A caption file with no
image beside it is a record too, quarantined as ``missing_image``; other files are ignored
(and counted in the log). Images are stored inline or, with ``image_mode="uri"``, by URI.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipelines.ingest.sources.base import RawBuilder, Source, text_excerpt
from pipelines.store import storage

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")
CAPTION_SUFFIX = ".txt"


class FolderSource(Source):
    kind = "folder"

    def __init__(self, path: str, files_per_shard: int = 500, name: str | None = None,
                 storage_options: dict[str, str] | None = None, image_mode: str = "inline") -> None:
        super().__init__(name, storage_options, image_mode)
        self.path = storage.normalise_uri(path)
        self.files_per_shard = files_per_shard
        self._count: int | None = None

    def _entries(self) -> list[tuple[str | None, str | None]]:
        fs, root = self.fs(self.path)
        info = fs.get_file_info(root)
        if info.type != pafs.FileType.Directory:
            raise FileNotFoundError(f"image folder {self.path} is not a directory; check source.path")
        images: list[str] = []
        captions: dict[str, str] = {}
        ignored = 0
        for item in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
            if item.type != pafs.FileType.File:
                continue
            rel = item.path[len(root) :].lstrip("/")
            stem, ext = posixpath.splitext(rel)
            if ext.lower() in IMAGE_SUFFIXES:
                images.append(rel)  # a.jpg beside a.png: one doc_id twice, the duplicate rule decides
            elif ext.lower() == CAPTION_SUFFIX:
                captions[stem] = rel
            else:
                ignored += 1
        if ignored:
            logger.info("%s: ignored %d files that are neither images nor .txt captions", self.path, ignored)
        image_stems = {posixpath.splitext(r)[0] for r in images}
        entries: list[tuple[str | None, str | None]] = [
            (rel, captions.get(posixpath.splitext(rel)[0])) for rel in images]
        entries += [(None, rel) for stem, rel in captions.items() if stem not in image_stems]
        entries.sort(key=lambda e: e[0] or e[1] or "")
        return entries

    def plan(self) -> list[dict[str, Any]]:
        entries = self._entries()
        self._count = len(entries)
        n = self.files_per_shard
        return [{"entries": [list(e) for e in entries[i : i + n]]} for i in range(0, len(entries), n)]

    def estimated_records(self) -> int | None:
        return self._count

    def read(self, shard_index: int, spec: dict[str, Any]) -> Iterator[pa.Table]:
        builder = RawBuilder(self.name, shard_index)
        fs, root = self.fs(self.path)
        for image_rel, caption_rel in spec["entries"]:
            rel = image_rel or caption_rel
            doc_id = posixpath.splitext(rel)[0]
            fields: dict[str, Any] = {"doc_id": doc_id, "modality": "image"}
            error = None
            if caption_rel is not None:
                try:
                    with fs.open_input_file(f"{root}/{caption_rel}") as f:
                        raw = f.read()
                    fields["caption"] = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    error = ("not_utf8", f"{caption_rel} is not valid UTF-8 ({e.reason} at byte "
                             f"{e.start}); re-encode the caption file as UTF-8", text_excerpt(raw))
                except OSError as e:
                    error = ("caption_unreadable", f"cannot read {caption_rel}: {e}", None)
            if image_rel is None:
                error = error or ("missing_image", f"caption file {caption_rel} has no image "
                                  f"beside it ({'/'.join(IMAGE_SUFFIXES)}); add the image or "
                                  "remove the caption", None)
            elif self.image_mode == "inline":
                try:
                    with fs.open_input_file(f"{root}/{image_rel}") as f:
                        fields["image"] = f.read()
                except OSError as e:
                    error = error or ("image_missing", f"cannot read {image_rel}: {e}", None)
            else:
                fields["image_uri"] = storage.join(self.path, image_rel)
            if error:
                table = builder.error(rel, error[0], error[1], error[2], doc_id=doc_id)
            else:
                table = builder.add(rel, **fields)
            if table is not None:
                yield table
        table = builder.flush()
        if table is not None:
            yield table
