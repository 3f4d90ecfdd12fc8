"""Confinement: ingest reads only regular files inside the roots it was given.

A source's roots are its own folder (a manifest's folder, EDIS's ``images_dir``, …) plus
``source.allow_roots`` (``--allow-root``); local roots are resolved (``realpath``), and an
object-store prefix (``s3://bucket/prefix``) is a root too. Every path a source opens goes
through :class:`Roots` first:

* a local path is resolved, symlinks included, and must lie inside a root, else it is
  refused as ``outside_root`` — before any byte of it is read;
* it must then be a regular file (``stat``, which opens nothing), else ``not_a_regular_file``:
  a FIFO or a device is never opened, so a FIFO cannot block a reader and a device cannot
  act on its open;
* the open itself is ``O_NOFOLLOW | O_NONBLOCK`` and the opened descriptor must be the file
  that was checked (same device and inode, still regular), so a file swapped for a symlink
  or a FIFO between the check and the open is refused rather than read;
* an object-store key is normalised (``a/../b`` → ``b``) and must lie under a root prefix of
  the same bucket; the normalised key is what is opened;
* a URI of any other scheme is refused as ``unsupported_uri`` (``http(s)://`` goes through
  the URL fetcher, never through here).

A refusal is a :class:`Refused` exception with a stable ``reason`` and a ``detail`` that names
the reference as the record wrote it and the fix; readers turn it into a read error, so the
record is quarantined and none of its bytes are stored or excerpted.

Listing a local folder (:func:`walk`) never follows a symlinked directory: one that points
outside the roots is reported as an ``outside_root`` entry, one inside is skipped (its
files are read at their real path, if a source walks that path).
"""

from __future__ import annotations

import logging
import os
import posixpath
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from pipelines.store import storage

logger = logging.getLogger(__name__)

OUTSIDE_ROOT = "outside_root"
NOT_A_REGULAR_FILE = "not_a_regular_file"
UNSUPPORTED_URI = "unsupported_uri"
#: Object-store schemes a root may name (``s3a`` is read as ``s3``).
REMOTE_SCHEMES = {"s3": "s3", "s3a": "s3"}
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_FIX = "move the file under the source's folder or add its folder with --allow-root (source.allow_roots)"


class Refused(Exception):
    """A path a source must not read: ``reason`` is ``outside_root``, ``not_a_regular_file``
    or ``unsupported_uri``; ``detail`` names the reference and the fix."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail

    def fields(self) -> dict[str, Any]:
        """The raw-record error fields (no excerpt: nothing of the file was read)."""
        return {"error": self.reason, "error_detail": self.detail}


def _is_url(uri: str) -> bool:
    return "://" in uri


def _local_path(uri: str) -> str:
    """A local path (plain or ``file://``), absolute, symlinks not yet resolved."""
    if uri.startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise Refused(UNSUPPORTED_URI, f"{uri!r:.200} names host {parts.netloc!r}; a file:// URI must be "
                          "local (file:///path)")
        return os.path.abspath(os.path.expanduser(parts.path))
    return os.path.abspath(os.path.expanduser(uri))


def _remote(uri: str) -> tuple[str, str, str]:
    """``(scheme, bucket, normalised key)`` of an object-store URI."""
    scheme, _, rest = uri.partition("://")
    canonical = REMOTE_SCHEMES.get(scheme.lower())
    if canonical is None:
        raise Refused(UNSUPPORTED_URI, f"{uri!r:.200} has scheme {scheme!r}; ingest reads local paths, "
                      f"file:// and {'/'.join(sorted(REMOTE_SCHEMES))}:// URIs (http/https images only "
                      "through the URL fetcher)")
    bucket, _, key = rest.partition("/")
    key = posixpath.normpath("/" + key).lstrip("/") if key else ""
    return canonical, bucket, "" if key == "." else key


@dataclass(frozen=True)
class Roots:
    """The folders (and object-store prefixes) a source may read from.

    Args:
        uris: Local paths, ``file://`` or ``s3://`` URIs; local ones are resolved here.
    """

    uris: tuple[str, ...]

    @classmethod
    def of(cls, *uris: str | None, extra: Iterable[str] = ()) -> Roots:
        """Roots from a source's own folders (``None`` skipped) and ``extra`` (allow_roots)."""
        out: list[str] = []
        for uri in [*uris, *extra]:
            if not uri:
                continue
            if _is_url(uri) and not uri.startswith("file://"):
                scheme, bucket, key = _remote(uri)
                root = f"{scheme}://{bucket}/{key}".rstrip("/")
            else:
                root = os.path.realpath(_local_path(uri))
            if root not in out:
                out.append(root)
        return cls(tuple(out))

    def describe(self) -> str:
        return ", ".join(self.uris) or "none"

    # containment --------------------------------------------------------------------------
    def _inside_local(self, real: str) -> bool:
        for root in self.uris:
            if _is_url(root):
                continue
            if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
                return True
        return False

    def _inside_remote(self, scheme: str, bucket: str, key: str) -> bool:
        for root in self.uris:
            if not root.startswith(f"{scheme}://"):
                continue
            r_bucket, _, r_key = root[len(scheme) + 3 :].partition("/")
            if r_bucket == bucket and (not r_key or key == r_key or key.startswith(r_key + "/")):
                return True
        return False

    def resolve(self, uri: str, shown: str | None = None) -> str:
        """The resolved form of ``uri`` (local: real path; remote: normalised key), which is
        what may be opened.

        Args:
            uri: What to read.
            shown: The reference as the record wrote it, for the detail (default ``uri``).

        Raises:
            Refused: ``outside_root`` or ``unsupported_uri``; nothing is opened.
        """
        shown = uri if shown is None else shown
        try:
            if _is_url(uri) and not uri.startswith("file://"):
                scheme, bucket, key = _remote(uri)
                if not self._inside_remote(scheme, bucket, key):
                    raise Refused(OUTSIDE_ROOT, f"{shown!r:.200} is outside the source's allowed roots "
                                  f"({self.describe()}); it was not read: {_FIX}")
                return f"{scheme}://{bucket}/{key}"
            real = os.path.realpath(_local_path(uri))
        except ValueError as e:  # an embedded NUL byte, a malformed URI
            raise Refused(UNSUPPORTED_URI, f"{shown!r:.200} is not a usable path ({e})") from None
        if not self._inside_local(real):
            raise Refused(OUTSIDE_ROOT, f"{shown!r:.200} resolves outside the source's allowed roots "
                          f"({self.describe()}); it was not read: {_FIX}")
        return real

    def check(self, uri: str, storage_options: dict[str, str] | None = None, shown: str | None = None) -> str:
        """``resolve`` and require a regular file; returns the resolved URI.

        Raises:
            Refused: Outside the roots, an unsupported URI, or not a regular file.
            FileNotFoundError: Inside the roots but missing.
        """
        resolved = self.resolve(uri, shown)
        if _is_url(resolved):
            fs, path = storage.filesystem(resolved, storage_options)
            kind = fs.get_file_info(path).type
            if kind == pafs.FileType.NotFound:
                raise FileNotFoundError(f"{resolved} does not exist")
            if kind != pafs.FileType.File:
                raise Refused(NOT_A_REGULAR_FILE, f"{shown or uri!r:.200} is not a file ({kind.name}); "
                              "only regular files are read")
            return resolved
        _regular(os.stat(resolved), shown or uri)
        return resolved

    # reading ------------------------------------------------------------------------------
    def open_file(self, uri: str, storage_options: dict[str, str] | None = None,
                  shown: str | None = None, stream: bool = False) -> IO[bytes] | Any:
        """A binary file for ``uri`` once it passed :meth:`check` (the caller closes it):
        random access, or with ``stream`` a sequential stream (cheaper on object stores).

        Raises:
            Refused: See :meth:`check`; also a file that changed between check and open.
            FileNotFoundError: Missing.
            OSError: Unreadable.
        """
        resolved = self.check(uri, storage_options, shown)
        if _is_url(resolved):
            fs, path = storage.filesystem(resolved, storage_options)
            return fs.open_input_stream(path) if stream else fs.open_input_file(path)
        return os.fdopen(_open_checked(resolved, shown or uri), "rb")

    @contextmanager
    def open(self, uri: str, storage_options: dict[str, str] | None = None,
             shown: str | None = None) -> Iterator[IO[bytes] | Any]:
        """``open_file`` as a context manager (random access)."""
        f = self.open_file(uri, storage_options, shown)
        try:
            yield f
        finally:
            f.close()

    def read(self, uri: str, storage_options: dict[str, str] | None = None,
             shown: str | None = None) -> tuple[str, bytes | None]:
        """``(resolved uri, bytes)`` of a confined regular file; bytes ``None`` when the file
        is inside the roots but missing (the caller decides how to report that).

        Raises:
            Refused: Outside the roots, unsupported, not a regular file.
            OSError: Unreadable for another reason.
        """
        resolved = self.resolve(uri, shown)
        try:
            with self.open(resolved, storage_options, shown or uri) as f:
                return resolved, f.read()
        except FileNotFoundError:
            return resolved, None


def _regular(st: os.stat_result, shown: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or
                stat.S_ISBLK(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode) else
                "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise Refused(NOT_A_REGULAR_FILE, f"{shown!r:.200} is {kind}; only regular files are read "
                      "(it was not opened)")


def _open_checked(real: str, shown: str) -> int:
    """A read-only descriptor of ``real``, which was just checked to be a regular file:
    the open follows no final symlink and never blocks, and the descriptor must be that file."""
    before = os.stat(real)
    _regular(before, shown)
    try:
        fd = os.open(real, _OPEN_FLAGS)
    except OSError as e:
        if e.errno in (getattr(os, "ELOOP", 40),):
            raise Refused(NOT_A_REGULAR_FILE, f"{shown!r:.200} became a symlink while being opened; "
                          "it was not read") from None
        raise
    try:
        after = os.fstat(fd)
        if not stat.S_ISREG(after.st_mode) or (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
            raise Refused(NOT_A_REGULAR_FILE, f"{shown!r:.200} changed while being opened; it was not read")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


# ---------------------------------------------------------------------------------------
# Listing
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One file a folder listing found: ``uri`` (as listed), ``rel`` (``/``-separated,
    relative to the listed folder) and ``refused`` when it must not be read."""

    uri: str
    rel: str
    refused: Refused | None = None
    #: A symlink to a folder (never walked).
    folder_link: bool = False


def walk(folder: str, roots: Roots, storage_options: dict[str, str] | None = None) -> list[Entry]:
    """Every file under ``folder``, sorted by ``rel``, each checked against ``roots``.

    Local folders are walked without following symlinked directories; a symlink to a file is
    listed under its own name and refused when it resolves outside the roots or to
    something other than a regular file; special files are listed refused. An object-store
    prefix holds only objects (regular files), all inside it.

    Raises:
        FileNotFoundError: ``folder`` is not a directory.
    """
    if _is_url(folder) and not folder.startswith("file://"):
        fs, path = storage.filesystem(folder, storage_options)
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            raise FileNotFoundError(f"{folder} is not a folder")
        scheme = folder.split("://", 1)[0]
        out = [Entry(f"{scheme}://{i.path}", i.path[len(path) :].lstrip("/"))
               for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
               if i.type == pafs.FileType.File]
        return sorted(out, key=lambda e: e.rel)
    top = os.path.realpath(_local_path(folder))
    if not os.path.isdir(top):
        raise FileNotFoundError(f"{folder} is not a folder")
    out = []
    stack = [top]
    while stack:
        directory = stack.pop()
        try:
            items = list(os.scandir(directory))
        except OSError as e:
            logger.warning("cannot list %s (%s); its files are not read", directory, e)
            continue
        for item in items:
            rel = os.path.relpath(item.path, top).replace(os.sep, "/")
            try:
                if item.is_symlink():
                    entry = _link_entry(item.path, rel, roots)
                    if entry is not None:
                        out.append(entry)
                elif item.is_dir(follow_symlinks=False):
                    stack.append(item.path)
                elif item.is_file(follow_symlinks=False):
                    out.append(Entry(item.path, rel))
                else:
                    _regular(item.stat(follow_symlinks=False), rel)
            except Refused as r:
                out.append(Entry(item.path, rel, r))
            except OSError as e:
                logger.warning("cannot inspect %s (%s); it is not read", item.path, e)
    return sorted(out, key=lambda e: e.rel)


def _link_entry(path: str, rel: str, roots: Roots) -> Entry | None:
    try:
        real = roots.resolve(path, rel)
    except Refused as r:
        if os.path.isdir(path):
            return Entry(path, rel, Refused(r.reason, f"{rel!r:.200} is a symlink to a folder outside the "
                                            f"source's allowed roots ({roots.describe()}); it was not walked: "
                                            f"{_FIX}"), folder_link=True)
        return Entry(path, rel, r)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return Entry(path, rel)  # dangling: the reader reports it missing
    except OSError as e:  # a symlink loop, a permission error
        return Entry(path, rel, Refused(NOT_A_REGULAR_FILE, f"{rel!r:.200} cannot be resolved ({e.strerror}); "
                                        "it was not read"))
    if stat.S_ISDIR(st.st_mode):
        logger.info("%s is a symlink to a folder inside the roots; not walked (its files are read at "
                    "their own path)", path)
        return None
    _regular(st, rel)
    return Entry(path, rel)
