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

Shards are streamed, their tar headers parsed here (``iter_tar_samples``; gzip, bzip2 and xz
shards are decompressed on the fly): one sample's members are in memory at a time, never a
shard, and every cap is checked on a header before its bytes are read — a member over
``max_member_bytes`` (``source.max_member_mb``), a sample over ``max_sample_bytes``
(``source.max_sample_mb``, all its members together) or a pax extended header / GNU long
name over ``max_header_bytes`` (``source.max_header_kb``) quarantines its sample
(``member_too_large``, ``sample_too_large``, ``header_too_large``) and its bytes are read
past in 1 MiB chunks, never held. One Ray Data task reads ``shards_per_task`` shards. A
member that does not parse (a JSON that is not an object, a caption that is not UTF-8)
quarantines its sample at read, a corrupt image at validation.

Every sample is a document or a quarantine row, for a shard cut at any byte: a shard that
ends before its end-of-archive block (a cut inside a header, inside a member, or exactly
between two members) keeps every sample read before the cut and quarantines the sample it
was reading (``shard_truncated``, naming the shard and the byte offset) — that sample may
have had more members, so it is never stored half-read; a header that fails its checksum
ends the shard the same way (``shard_corrupt``). A shard that cannot be opened, is empty or
is not a tar at all is one quarantined record (``shard_unreadable``). Images are always
stored inline (they live inside the tar). A storage that does not answer while shards are
listed (an ``s3://`` endpoint down) stops ``plan()`` with one line naming the URI and the
fix.

Confinement (``pipelines.ingest.confine``): a shard must resolve to a regular file inside the
pattern's folder or ``allow_roots``; a symlinked shard (or folder) pointing elsewhere is one
record quarantined as ``outside_root``, a FIFO as ``not_a_regular_file``, neither opened.
"""

from __future__ import annotations

import bz2
import fnmatch
import gzip
import json
import logging
import lzma
import os
import posixpath
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
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
#: Reasons that reject one sample and let the shard's reading go on.
_SAMPLE_REASONS = frozenset(("member_too_large", "sample_too_large", "header_too_large"))
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
                 allow_roots: Iterable[str] = (), max_sample_bytes: int = 96 << 20,
                 max_header_bytes: int = 64 << 10) -> None:
        super().__init__(name, storage_options, "inline", allow_roots)
        self.pattern = path if storage.is_remote(path) else _local(path)
        self.shards_per_task = max(1, shards_per_task)
        self.caps = TarCaps(max_member_bytes, max(max_sample_bytes, 1), max_header_bytes)

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
            ValueError: A malformed brace pattern, or storage that cannot be reached (one line
                naming the URI, the reason and the fix).
        """
        try:
            return self._shard_uris()
        except FileNotFoundError:
            raise
        except OSError as e:  # an object store that does not answer (endpoint down, DNS, TLS)
            reason = " ".join(str(e).split())[:300]
            if not storage.is_remote(self.pattern):
                raise ValueError(f"cannot list {self.pattern}: {reason}; check the path and its "
                                 "permissions") from None
            raise ValueError(f"cannot reach {self.pattern}: {reason}; check the endpoint / storage_options "
                             "(AWS_ENDPOINT_URL, AWS_REGION, AWS_ALLOW_HTTP) and the credentials") from None

    def _shard_uris(self) -> list[str]:
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
                                   "(a brace range names every shard whether or not it exists) and, for "
                                   "s3://, the endpoint / storage_options")
            return
        with stream:
            for sample in iter_tar_samples(stream, self.caps):
                if sample.reason is None:
                    yield self._record(shard, tar_name, sample.key, sample.members)
                elif sample.reason in _SAMPLE_REASONS:
                    yield f"{tar_name}#{sample.key}", _error(sample.reason, sample.detail,
                                                            doc_id=f"{shard}/{sample.key}")
                elif sample.key is None:  # broke before its first member: the shard's one row
                    yield tar_name, _error(sample.reason, f"shard {uri}: {sample.detail}; nothing of it was "
                                           "read — re-create the shard")
                else:
                    # Every sample before the cut was yielded; the one it cut (which may have
                    # had more members) is this row, and the shard is not read past it.
                    yield f"{tar_name}#{sample.key}", _error(
                        sample.reason, f"shard {uri}: {sample.detail} (sample {sample.key}); the samples "
                        "before it were kept — re-create the shard to recover this sample and any after it",
                        doc_id=f"{shard}/{sample.key}")

    def _record(self, shard: str, tar_name: str, key: str, members: dict[str, bytes]) -> tuple[str, dict[str, Any]]:
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


# ---------------------------------------------------------------------------------------
# The tar reader: headers parsed here, so every cap holds while reading
# ---------------------------------------------------------------------------------------

BLOCK = 512
_CHUNK = 1 << 20
#: Member types that carry no data blocks (hard/sym links, devices, folders, FIFOs).
_NO_DATA_TYPES = frozenset(b"123456")
_FILE_TYPES = frozenset((b"0", b"\0", b"7"))
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"))


@dataclass(frozen=True)
class TarCaps:
    """What one sample of a shard may hold; each is checked on the header, before its bytes
    are read (a member over a cap is skipped in 1 MiB chunks, never held)."""

    max_member_bytes: int = 64 << 20
    max_sample_bytes: int = 96 << 20
    #: A pax extended header or GNU long name: it is parsed in memory, so it is capped too.
    max_header_bytes: int = 64 << 10


@dataclass
class TarSample:
    """One sample read from a shard: its members (extension → bytes), or why it is not one.

    ``key`` is None when the shard broke before any member was read (the row is the shard's).
    ``reason`` ``shard_truncated`` / ``shard_corrupt`` / ``shard_unreadable`` end the shard.
    """

    key: str | None
    members: dict[str, bytes] = field(default_factory=dict)
    reason: str | None = None
    detail: str | None = None
    offset: int = 0


class _Stop(Exception):
    """The shard cannot be read past ``offset``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class _Prefixed:
    """A stream with bytes already read from it put back in front (for the compression sniff)."""

    def __init__(self, head: bytes, f: Any) -> None:
        self.head, self.f = head, f

    def read(self, n: int = -1) -> bytes:
        if self.head:
            out, self.head = (self.head, b"") if n < 0 or n >= len(self.head) else (self.head[:n], self.head[n:])
            return out
        return self.f.read(n) if n >= 0 else self.f.read()

    def readable(self) -> bool:
        return True


class _Reader:
    """Exact reads from a (possibly decompressed) stream, counting the offset."""

    def __init__(self, f: Any) -> None:
        self.f, self.pos = f, 0

    def read(self, n: int) -> bytes:
        """``n`` bytes, fewer only at the end of the stream (or a cut)."""
        try:
            first = self.f.read(n)
            if len(first) == n or not first:
                self.pos += len(first)
                return first
            parts, got = [first], len(first)
            while got < n:
                part = self.f.read(min(_CHUNK, n - got))
                if not part:
                    break
                parts.append(part)
                got += len(part)
            self.pos += got
            return b"".join(parts)
        except EOFError as e:  # a compressed stream cut short
            raise _Stop("shard_truncated", f"the compressed stream ends early ({e})") from None
        except (OSError, zlib.error, lzma.LZMAError, ValueError) as e:
            raise _Stop("shard_unreadable", f"reading failed at byte {self.pos} ({type(e).__name__}: "
                        f"{str(e)[:200]})") from None

    def data(self, n: int, what: str) -> bytes:
        """A member's ``n`` bytes and its padding to the block; raises ``_Stop`` at a cut."""
        out = self.read(n)
        if len(out) < n:
            raise _Stop("shard_truncated", f"the shard ends inside {what} at byte {self.pos} "
                        f"({len(out)} of its {n} bytes)")
        self.skip(-n % BLOCK, what)
        return out

    def skip(self, n: int, what: str) -> None:
        """Reads past ``n`` bytes in chunks, keeping none."""
        left = n
        while left > 0:
            part = self.read(min(_CHUNK, left))
            if not part:
                raise _Stop("shard_truncated", f"the shard ends inside {what} at byte {self.pos}")
            left -= len(part)

    def skip_member(self, n: int, what: str) -> None:
        self.skip(n + (-n % BLOCK), what)


def _open_tar_stream(f: Any) -> _Reader:
    """``f`` as a stream of tar blocks: gzip, bzip2 and xz shards are decompressed on the fly."""
    head = f.read(6)
    stream: Any = _Prefixed(head, f)
    for magic, kind in _COMPRESSED:
        if head.startswith(magic):
            if kind == "gzip":
                stream = gzip.GzipFile(fileobj=stream, mode="rb")
            elif kind == "bz2":
                stream = bz2.BZ2File(stream, mode="rb")
            else:
                stream = lzma.LZMAFile(stream, mode="rb")
            break
    return _Reader(stream)


def _octal(field_: bytes, what: str, offset: int) -> int:
    if field_[:1] and field_[0] & 0x80:  # GNU base-256 for numbers beyond the octal field
        value = int.from_bytes(field_[1:], "big")
        return -value if field_[0] & 0x40 else value
    text = field_.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise _Stop("shard_corrupt", f"the header at byte {offset} has a malformed {what} field "
                    f"{text[:20]!r}") from None


def _header(block: bytes, offset: int) -> tuple[bytes, str, int]:
    """``(type, name, size)`` of one 512-byte ustar/GNU header, its checksum verified."""
    stored = _octal(block[148:156], "checksum", offset)
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    signed = unsigned - 2 * sum(b for b in block[:148] + block[156:] if b > 127)
    if stored not in (unsigned, signed):
        raise _Stop("shard_corrupt", f"the header at byte {offset} fails its checksum (not a tar header: "
                    "the shard is corrupt there)")
    name = block[:100].split(b"\0", 1)[0]
    if block[257:265] == b"ustar\x0000":
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    size = _octal(block[124:136], "size", offset)
    if size < 0:
        raise _Stop("shard_corrupt", f"the header at byte {offset} gives a negative size")
    return block[156:157], name.decode("utf-8", "backslashreplace"), size


def _pax(data: bytes, offset: int) -> dict[str, str]:
    """The records of a pax extended header (``"<len> <key>=<value>\\n"``)."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.find(b" ", pos, pos + 24)
        try:
            length = int(data[pos:space]) if space > pos else -1
        except ValueError:
            length = -1
        record = data[space + 1 : pos + length] if length > 0 else b""
        if length <= 0 or pos + length > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise _Stop("shard_corrupt", f"the pax header at byte {offset} has a malformed record at "
                        f"{pos}")
        key, _, value = record[:-1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "backslashreplace")
        pos += length
    return out


def iter_tar_samples(f: Any, caps: TarCaps = TarCaps()) -> Iterator[TarSample]:
    """Every sample of one tar shard in order, streamed from ``f`` (anything with ``read``).

    Never raises for what the shard holds: a sample over a cap is yielded with its
    reason and no members; a shard that ends early (a cut at any byte, a missing
    end-of-archive block) or stops parsing yields the sample it was reading (or, before any
    member, one sample with ``key=None``) with ``shard_truncated`` / ``shard_corrupt`` and
    ends. Only one sample's members are in memory, each under ``caps``.
    """
    try:
        r = _open_tar_stream(f)
    except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as e:
        yield TarSample(None, reason="shard_unreadable", detail=f"cannot read the shard ({type(e).__name__}: "
                        f"{str(e)[:200]})")
        return
    key: str | None = None
    members: dict[str, bytes] = {}
    held = 0
    error: tuple[str, str] | None = None
    pending_name: str | None = None  # from a pax header or a GNU long name
    pending_error: tuple[str, str] | None = None
    pending_size: int | None = None
    started = False
    try:
        while True:
            offset = r.pos
            block = r.read(BLOCK)
            if len(block) < BLOCK:
                if not block and offset == 0:
                    raise _Stop("shard_unreadable", "the shard is empty (0 bytes)")
                raise _Stop("shard_truncated", f"the shard ends at byte {r.pos} without its end-of-archive "
                            "blocks" if not block else f"the shard ends inside the header at byte {offset}")
            if not any(block):
                if pending_name is not None or pending_error is not None or pending_size is not None:
                    raise _Stop("shard_corrupt", f"the archive ends at byte {offset} after an extended header "
                                "with no member for it")
                break
            try:
                kind, name, size = _header(block, offset)
            except _Stop:
                if not started:  # the first block is no tar header: not a tar at all
                    raise _Stop("shard_unreadable", "it is not a tar archive (its first block is no tar "
                                "header)") from None
                raise
            started = True
            if kind in (b"x", b"g", b"L", b"K"):
                what = {b"x": "pax header", b"g": "global pax header", b"L": "GNU long name",
                        b"K": "GNU long link"}[kind]
                if kind == b"K":
                    r.skip_member(size, f"the {what} at byte {offset}")
                    continue
                if size > caps.max_header_bytes:
                    r.skip_member(size, f"the {what} at byte {offset}")
                    pending_error = pending_error or (
                        "header_too_large", f"the {what} at byte {offset} is {size} bytes; the limit is "
                        f"{caps.max_header_bytes} (source.max_header_kb)")
                    continue
                data = r.data(size, f"the {what} at byte {offset}")
                if kind == b"x":
                    pax = _pax(data, offset)
                    if "size" in pax:  # a member beyond the octal field's 8 GiB
                        if not pax["size"].isascii() or not pax["size"].isdigit():
                            raise _Stop("shard_corrupt", f"the pax header at byte {offset} gives the size "
                                        f"{pax['size'][:24]!r}, not a number")
                        pending_size = int(pax["size"])
                    if "path" in pax:
                        pending_name = pax["path"]
                elif kind == b"L":
                    pending_name = data.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")
                continue
            if pending_name is not None:
                name, pending_name = pending_name, None
            if pending_size is not None:
                size, pending_size = pending_size, None
            if kind in _NO_DATA_TYPES:
                size = 0
            if kind not in _FILE_TYPES:
                r.skip_member(size, f"member {name!r}")
                pending_error = None
                continue
            k, ext = split_key(name)
            if k != key:
                if key is not None:
                    yield _sample(key, members, error)
                key, members, held, error = k, {}, 0, None
            if pending_error is not None:
                error, pending_error = error or pending_error, None
            what = f"member {name!r} at byte {offset}"
            if error is None and size > caps.max_member_bytes:
                error = ("member_too_large", f"member {name} is {size} bytes; the limit is "
                         f"{caps.max_member_bytes} (source.max_member_mb)")
            elif error is None and held + size > caps.max_sample_bytes:
                error = ("sample_too_large", f"sample {k} holds more than {caps.max_sample_bytes} bytes "
                         f"(at least {held + size}); the limit is source.max_sample_mb")
            if error is not None:
                members, held = {}, 0  # nothing of a rejected sample is kept
                r.skip_member(size, what)
                continue
            members[ext] = r.data(size, what)
            held += size
    except _Stop as stop:
        yield TarSample(key, {}, stop.reason, f"{stop.detail}", offset=r.pos)
        return
    if key is not None:
        yield _sample(key, members, error)


def _sample(key: str, members: dict[str, bytes], error: tuple[str, str] | None) -> TarSample:
    if error is not None:
        return TarSample(key, {}, error[0], error[1])
    return TarSample(key, members)
