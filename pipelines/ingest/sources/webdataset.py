"""WebDataset tar shards (what img2dataset writes and most open image–text corpora ship).

``path`` names the shards, local or ``s3://``: a folder (every ``*.tar`` under it, in name
order), a single ``.tar``, a glob (``shards/*.tar``) or a brace range
(``shards/{00000..00099}.tar``, also lists ``{a,b}``). Consecutive members with the same
key (the member path up to the first dot of its file name) are one sample:

* ``.jpg`` / ``.jpeg`` / ``.png`` / ``.webp`` — the image (the first one; further images are
  named in the metadata, ``ignored_members``);
* ``.txt`` — the caption (UTF-8);
* ``.json`` — an object: ``doc_id`` (or ``id``), ``text``, ``caption`` (used when there is
  no ``.txt``); every other key is kept as metadata;
* anything else (``.cls``, ``.npy``, …) is named in ``ignored_members``.

``doc_id`` is the json's id, else ``<shard>/<key>`` where ``<shard>`` is the shard's path
below the listed folder without ``.tar``. ``record_ref`` is ``<shard>.tar#<key>``.

Shards are streamed (``tarfile`` stream mode over a pyarrow input stream): one sample's
members are in memory at a time, never a shard; one Ray Data task reads
``shards_per_task`` shards. A member that does not parse (a JSON that is not an object, a
caption that is not UTF-8, a member over ``max_member_bytes``) quarantines its sample at
read, a corrupt image at validation. A truncated shard keeps every sample read before the
cut and quarantines the sample it cut (``shard_truncated``); a shard that cannot be opened
or is not a tar at all is one quarantined record (``shard_unreadable``). Images are always
stored inline (they live inside the tar).

Confinement (``pipelines.ingest.confine``): a shard must resolve to a regular file inside the
pattern's folder or ``allow_roots``; a symlinked shard (or folder) pointing elsewhere is one
record quarantined as ``outside_root``, a FIFO as ``not_a_regular_file``, neither opened.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipelines.ingest.confine import Refused, walk
from pipelines.ingest.sources.base import (
    RawBuilder,
    Source,
    int_or_str_id,
    metadata_json,
    text_excerpt,
)
from pipelines.store import storage

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SHARD_SUFFIX = ".tar"
#: The most members a brace pattern may expand to (a typo like {0..99999999} fails fast).
MAX_EXPANDED = 1_000_000
_BRACE_RE = re.compile(r"\{([^{}]*)\}")
_GLOB_CHARS = "*?["


def expand_braces(pattern: str) -> list[str]:
    """Every string a brace pattern names, in order: ``{00000..00003}`` (zero-padded to the
    width of the first bound when it has leading zeros), ``{a,b}``; several groups multiply.

    Raises:
        ValueError: An empty or reversed range, or more than ``MAX_EXPANDED`` names.
    """
    m = _BRACE_RE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        if hi < lo:
            raise ValueError(f"brace range {{{body}}} in {pattern!r} runs backwards; write {{{rng.group(2)}.."
                             f"{rng.group(1)}}} the other way round")
        width = len(rng.group(1)) if rng.group(1).startswith("0") else 0
        if hi - lo + 1 > MAX_EXPANDED:
            raise ValueError(f"brace range {{{body}}} names {hi - lo + 1} shards; the limit is {MAX_EXPANDED}")
        options = [str(i).zfill(width) for i in range(lo, hi + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        raise ValueError(f"brace group {{{body}}} in {pattern!r} is neither a range {{00000..00099}} nor a "
                         "list {a,b}")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    out: list[str] = []
    for option in options:
        out.extend(expand_braces(head + option + tail))
        if len(out) > MAX_EXPANDED:
            raise ValueError(f"{pattern!r} names more than {MAX_EXPANDED} shards")
    return out


def split_key(name: str) -> tuple[str, str]:
    """``dir/abc.seg.jpg`` → (``dir/abc``, ``seg.jpg``): WebDataset's key and extension."""
    directory, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return (posixpath.join(directory, stem) if directory else stem), (ext.lower() if dot else "")


class WebDatasetSource(Source):
    kind = "webdataset"

    def __init__(self, path: str, shards_per_task: int = 1, name: str | None = None,
                 storage_options: dict[str, str] | None = None, max_member_bytes: int = 64 << 20,
                 allow_roots: Iterable[str] = ()) -> None:
        super().__init__(name, storage_options, "inline", allow_roots)
        self.pattern = path if storage.is_remote(path) else _local(path)
        self.shards_per_task = max(1, shards_per_task)
        self.max_member_bytes = max_member_bytes

    def own_roots(self) -> list[str]:
        return [self._root()]

    # plan ---------------------------------------------------------------------------------
    def _root(self) -> str:
        """The folder that shard names are relative to: the pattern's last plain folder."""
        cut = min([i for i in (self.pattern.find(c) for c in "{" + _GLOB_CHARS) if i >= 0], default=-1)
        if cut < 0:
            return self.pattern
        return self.pattern[: cut].rsplit("/", 1)[0]

    def shard_uris(self) -> list[str]:
        """The shard URIs in order (a brace range is expanded without listing storage).

        Raises:
            FileNotFoundError: Nothing matches, with the pattern.
            ValueError: A malformed brace pattern.
        """
        if "{" in self.pattern:
            return expand_braces(self.pattern)
        fs, path = self.fs(self._root())
        prefix = self.pattern.split("://", 1)[0] + "://" if storage.is_remote(self.pattern) else ""
        if not any(c in self.pattern for c in _GLOB_CHARS):
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.File:
                return [self.pattern]
            if info.type != pafs.FileType.Directory:
                raise FileNotFoundError(f"WebDataset path {self.pattern} does not exist; give a folder of .tar "
                                        "shards, a glob (shards/*.tar) or a brace range (shards/{00000..00009}.tar)")
            # A symlinked folder is not walked; one pointing outside the roots is listed, so
            # its read quarantines it (outside_root) rather than it vanishing unseen.
            found = [e.uri for e in walk(self.pattern, self.roots(), self.storage_options)
                     if e.rel.endswith(SHARD_SUFFIX) or e.folder_link]
        elif not prefix:
            found = [e.uri for e in walk(self._root(), self.roots(), self.storage_options)
                     if fnmatch.fnmatchcase(e.uri, self.pattern)] if os.path.isdir(self._root()) else []
        else:
            _, pattern_path = storage.filesystem(self.pattern, self.storage_options) if prefix else (None, self.pattern)
            try:
                listing = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            except FileNotFoundError:
                listing = []
            found = [prefix + i.path for i in listing
                     if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, pattern_path)]
        if not found:
            raise FileNotFoundError(f"no WebDataset shards (*.tar) match {self.pattern}")
        return sorted(found)

    def plan(self) -> list[dict[str, Any]]:
        uris = self.shard_uris()
        root = self._root()
        named = [[u, relative_shard(u, root)] for u in uris]
        n = self.shards_per_task
        return [{"shards": named[i : i + n]} for i in range(0, len(named), n)]

    # read ---------------------------------------------------------------------------------
    def read(self, shard_index: int, spec: dict[str, Any]) -> Iterator[pa.Table]:
        builder = RawBuilder(self.name, shard_index)
        for uri, shard in spec["shards"]:
            for ref, fields in self._samples(uri, shard):
                table = builder.add(ref, **fields)
                if table is not None:
                    yield table
        table = builder.flush()
        if table is not None:
            yield table

    def _samples(self, uri: str, shard: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(record_ref, raw fields)`` per sample of one shard, streamed."""
        tar_name = shard + SHARD_SUFFIX
        try:
            stream = self.roots().open_file(uri, self.storage_options, shown=tar_name, stream=True)
        except Refused as r:  # outside the roots, a FIFO: not opened, one quarantined record
            yield tar_name, _error(r.reason, r.detail)
            return
        except (OSError, ValueError) as e:
            yield tar_name, _error("shard_unreadable", f"cannot open shard {uri}: {e}; check the shard list "
                                   "(a brace range names every shard whether or not it exists)")
            return
        key: str | None = None
        members: dict[str, bytes] = {}
        errors: list[str] = []
        position = "the start"
        try:
            with stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    k, ext = split_key(info.name)
                    if k != key:
                        if key is not None:
                            yield self._record(shard, tar_name, key, members, errors)
                        key, members, errors = k, {}, []
                    position = f"member {info.name}"
                    if info.size > self.max_member_bytes:
                        errors.append(f"member {info.name} is {info.size} bytes; the limit is "
                                      f"{self.max_member_bytes} (source.max_member_mb)")
                        continue  # the stream skips its bytes without keeping them
                    f = tar.extractfile(info)
                    members[ext] = f.read() if f is not None else b""
                if key is not None:
                    yield self._record(shard, tar_name, key, members, errors)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            if key is None and not members:
                yield tar_name, _error("shard_unreadable", f"{uri} is not a readable tar archive "
                                       f"({type(e).__name__}: {e}); re-create the shard")
                return
            # Every sample before the cut was already yielded; the one it cut is lost.
            ref = f"{tar_name}#{key}"
            yield ref, _error("shard_truncated", f"shard {uri} ends inside {position} ({type(e).__name__}: "
                              f"{e}); the samples before it were kept — re-create the shard to recover this "
                              "sample and any after it", doc_id=f"{shard}/{key}")

    def _record(self, shard: str, tar_name: str, key: str, members: dict[str, bytes],
                errors: list[str]) -> tuple[str, dict[str, Any]]:
        ref = f"{tar_name}#{key}"
        doc_id = f"{shard}/{key}"
        meta: dict[str, Any] = {}
        fields: dict[str, Any] = {}
        if "json" in members:
            raw = members["json"]
            try:
                value = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                return ref, _error("bad_json", f"{key}.json is not UTF-8 JSON ({e}); fix the member",
                                   text_excerpt(raw), doc_id=doc_id)
            if not isinstance(value, dict):
                return ref, _error("wrong_type", f"{key}.json holds a JSON {type(value).__name__}, expected an "
                                   "object", text_excerpt(raw), doc_id=doc_id)
            id_key = "doc_id" if "doc_id" in value else "id" if "id" in value else None
            if id_key is not None:
                json_id, id_error = int_or_str_id(value[id_key])
                if id_error:
                    return ref, _error("wrong_type", f"{key}.json {id_key}: {id_error}", text_excerpt(raw),
                                       doc_id=doc_id)
                doc_id = json_id or doc_id
            for name in ("text", "caption"):
                v = value.get(name)
                if v is not None and not isinstance(v, str):
                    return ref, _error("wrong_type", f"{key}.json {name} must be a string, got "
                                       f"{type(v).__name__}", text_excerpt(raw), doc_id=doc_id)
            fields["text"] = value.get("text")
            fields["caption"] = value.get("caption")
            meta.update({k: v for k, v in value.items() if k not in (id_key, "text", "caption")})
        if errors:
            return ref, _error("member_too_large", "; ".join(errors), doc_id=doc_id)
        if "txt" in members:
            try:
                fields["caption"] = members["txt"].decode("utf-8")
            except UnicodeDecodeError as e:
                return ref, _error("not_utf8", f"{key}.txt is not valid UTF-8 ({e.reason} at byte {e.start}); "
                                   "re-encode the caption as UTF-8", text_excerpt(members["txt"]), doc_id=doc_id)
        image_ext = next((ext for ext in IMAGE_EXTS if ext in members), None)
        if image_ext is not None:
            fields["image"] = members[image_ext]
        ignored = sorted(f"{key}.{ext}" for ext in members if ext not in ("json", "txt", image_ext))
        if ignored:
            meta["ignored_members"] = ignored
        fields.update(doc_id=doc_id, metadata=metadata_json(meta))
        if image_ext is None and "json" not in members and "txt" not in members:
            fields["error"] = "missing_content"
            fields["error_detail"] = (f"sample {key} has no image (.{'/.'.join(IMAGE_EXTS)}), .txt or .json "
                                      f"member, only {sorted(members)}")
        return ref, fields


def relative_shard(uri: str, root: str) -> str:
    """A shard's name: its path below ``root`` without ``.tar``."""
    name = uri[len(root.rstrip("/")) + 1 :] if uri.startswith(root.rstrip("/") + "/") else posixpath.basename(uri)
    return name[: -len(SHARD_SUFFIX)] if name.endswith(SHARD_SUFFIX) else name


def _local(path: str) -> str:
    """An absolute local path, keeping glob and brace characters as written."""
    cut = min([i for i in (path.find(c) for c in "{" + _GLOB_CHARS) if i >= 0], default=-1)
    if cut < 0:
        return storage.normalise_uri(path)
    head, _, _ = path[:cut].rpartition("/")
    return storage.normalise_uri(head or ".") + "/" + path[len(head) + 1 if head else 0 :]


def _error(reason: str, detail: str, excerpt: str | None = None, doc_id: str | None = None) -> dict[str, Any]:
    return {"error": reason, "error_detail": detail, "raw_excerpt": excerpt, "doc_id": doc_id}

