"""One writer per LanceDB table: a lease a run takes before it plans its work.

Two ``ciea embed`` (or ``ciea reindex``) runs on one table would each plan against the
rows the table held when they started and both append the same documents: Lance's
appends never conflict with each other, so the head would hold every document twice.
A run therefore takes the table's lease first — a small JSON object beside the table,
``<db>/_ciea_leases/<table>.json``, naming the run (id, command, host, pid, start time,
heartbeat) — and gives it back at the end. A second run finds it and stops before it
writes anything (:class:`TableBusyError`, whose message names the holder and the fix).

A lease whose holder is gone is taken over, with a warning: its process no longer
exists on this host, or its heartbeat (rewritten every :data:`HEARTBEAT_S` seconds by a
thread of the holder) is older than the TTL — a crashed run on another machine frees the
table after :data:`DEFAULT_TTL_S`; remove the file to free it sooner.

Atomicity: on a local file system every change to the lease happens under an exclusive
``flock`` on a lock file beside it, so reading, judging and replacing it is one step. On
an object store (``s3://``) pyarrow has no conditional put: the lease is written when
absent and read back after :data:`SETTLE_S` seconds, which catches all but a race of two
runs starting within that window. What makes the table safe even then is the commit-time
check of :meth:`pipelines.store.lance_tables.VectorTable.fence_writes`, which refuses a
commit when another run added rows after this one planned.

Nothing is written through the lease (on a local file system): the lease folder is opened
as a real directory (``O_DIRECTORY | O_NOFOLLOW``) and every file in it — the lease, its
lock, the temporary file a new lease is written to before it replaces the old one — is
opened relative to that folder without following symlinks, and read only when it is a
regular file (a FIFO is opened non-blocking and refused, never waited on). A symlink, a
FIFO or a lease whose fields are not what a run writes (types, ranges, keys) stops the run
with one line naming the file and the fix (:class:`LeaseFileError`); nothing outside the
database folder is ever written or deleted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import re
import socket
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from pipelines.store import storage

logger = logging.getLogger(__name__)

#: Folder (in the LanceDB database folder) that holds one lease file per table.
LEASE_DIR = "_ciea_leases"
#: A lease whose heartbeat is older than this is abandoned (its run died on another host).
DEFAULT_TTL_S = 600.0
#: How often the holder rewrites its heartbeat.
HEARTBEAT_S = 30.0
#: Object stores: how long a new lease is left before it is read back (see the module doc).
SETTLE_S = 1.0
#: A lease file is a few hundred bytes; anything larger is not one (and is not read whole).
MAX_LEASE_BYTES = 64 * 1024
#: Longest run id, command and host name a lease may hold (a host name is at most 255).
_MAX_TEXT = 255
#: Timestamps a lease may hold: after 1970, before the year 5000 (``time.localtime`` range).
_MAX_TIME = 9.5e10
#: Table names a local lease file may be named after (no path separators, no dot files).
_TABLE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}$")


class WriterConflict(RuntimeError):
    """Another run writes (or wrote) the table; the message names it and the fix."""


class LeaseFileError(WriterConflict):
    """The lease file (or its folder, or its lock) is not what a run writes: a symlink, not a
    regular file, or fields of the wrong type or range. The message names the file and the fix."""


class TableBusyError(WriterConflict):
    """The table's lease is held by a live run."""


class LeaseLostError(WriterConflict):
    """This run's lease was taken over (judged abandoned) or removed while it ran."""


@dataclass(frozen=True)
class LeaseInfo:
    """Who holds a table: the content of the lease file."""

    run_id: str
    command: str
    host: str
    pid: int
    started: float
    heartbeat: float

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"{self.command}, pid {self.pid} on host {self.host} since {since}"

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseInfo:
        """The lease a run wrote, checked field by field.

        Raises:
            ValueError: one line saying what is wrong (not JSON, a key missing or extra, a
                field of the wrong type or out of range).
        """
        if len(data) > MAX_LEASE_BYTES:
            raise ValueError(f"{len(data)} bytes, more than a lease's {MAX_LEASE_BYTES}")
        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ValueError("not a JSON object") from None
        if not isinstance(raw, dict):
            raise ValueError(f"not a JSON object but a {type(raw).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in raw]
        extra = sorted(str(k) for k in raw if k not in names)
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        if extra:
            raise ValueError(f"unknown key {', '.join(map(repr, extra))[:80]}")
        for name in ("run_id", "command", "host"):
            v = raw[name]
            if not isinstance(v, str) or not 0 < len(v) <= _MAX_TEXT or not v.isprintable():
                raise ValueError(f"{name} must be printable text of 1 to {_MAX_TEXT} characters")
        pid = raw["pid"]
        if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 2**31:
            raise ValueError("pid must be a process id (an integer from 1 to 2147483647)")
        for name in ("started", "heartbeat"):
            v = raw[name]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) \
                    or not 0 <= v <= _MAX_TIME:
                raise ValueError(f"{name} must be a Unix time in seconds (a finite number from 0 to {_MAX_TIME:.0f})")
        return cls(run_id=raw["run_id"], command=raw["command"], host=raw["host"], pid=pid,
                   started=float(raw["started"]), heartbeat=float(raw["heartbeat"]))


def lease_uri(db_uri: str, table: str) -> str:
    """Where the lease of ``table`` lives: ``<db>/_ciea_leases/<table>.json``."""
    return storage.join(storage.normalise_uri(db_uri), LEASE_DIR, f"{table}.json")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def abandoned(info: LeaseInfo, now: float, host: str, ttl_s: float) -> str | None:
    """Why the lease's holder is gone (its process is not running here, or its heartbeat
    is older than ``ttl_s``), or ``None`` while it may still be writing."""
    if info.host == host and not _pid_alive(info.pid):
        return f"its process {info.pid} no longer runs on this host"
    age = now - info.heartbeat
    if age > ttl_s:
        return f"no heartbeat for {age:.0f} s (TTL {ttl_s:.0f} s)"
    return None


class _LeaseFile:
    """Read-decide-write of the lease file as one step (see the module doc).

    Locally every open is relative to the lease folder's descriptor and never follows a
    symlink, so the lease, its lock and its temporary file are always inside the database
    folder; an object store has no symlinks and keeps plain reads and puts.
    """

    def __init__(self, uri: str, storage_options: dict[str, str] | None) -> None:
        self.uri = uri
        self.remote = storage.is_remote(uri)
        if self.remote:
            self.fs, self.path = storage.filesystem(uri, storage_options)
        else:  # as lease_uri made it: the db folder resolved, nothing below it (a link stays a link)
            self.fs, self.path = None, uri
        self.name = os.path.basename(self.path)
        self.folder = os.path.dirname(self.path)  # <db>/_ciea_leases

    # -- local: the folder, then files relative to it, never through a symlink ------------

    def _refuse(self, what: str, fix: str) -> LeaseFileError:
        return LeaseFileError(f"{what}; {fix} (nothing was written through it)")

    @contextlib.contextmanager
    def _dir(self) -> Iterator[int]:
        """The lease folder's descriptor: created inside the database folder when missing,
        refused when it is a symlink or not a folder."""
        db = os.path.dirname(self.folder)
        os.makedirs(db, exist_ok=True)
        db_fd = os.open(db, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(LEASE_DIR, 0o755, dir_fd=db_fd)
            try:
                fd = os.open(LEASE_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=db_fd)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                raise self._refuse(f"the lease folder {self.folder} is a symlink or not a folder",
                                   "remove it; ciea creates a real folder there") from None
        finally:
            os.close(db_fd)
        try:
            yield fd
        finally:
            os.close(fd)

    def _open(self, dir_fd: int, name: str, flags: int, what: str) -> int | None:
        """``name`` in the lease folder, opened without following a symlink or blocking on a
        FIFO, and only if it is a regular file; ``None`` when it does not exist."""
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise self._refuse(f"the {what} {os.path.join(self.folder, name)} is a symlink",
                               "remove the link; a lease is a regular file ciea writes itself") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise self._refuse(f"the {what} {os.path.join(self.folder, name)} is not a regular file",
                               "remove it; a lease is a regular file ciea writes itself")
        return fd

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int | None]:
        if self.remote:
            yield None
            return
        with self._dir() as dir_fd:
            # Never deleted: removing a lock file others may hold open would split the lock.
            fd = self._open(dir_fd, self.name + ".lock", os.O_CREAT | os.O_RDWR, "lease lock")
            assert fd is not None  # O_CREAT: it exists now
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield dir_fd
            finally:
                os.close(fd)  # releases the flock

    def _read_bytes(self, dir_fd: int | None) -> bytes | None:
        if self.remote:
            try:
                with self.fs.open_input_stream(self.path) as f:
                    return f.read(MAX_LEASE_BYTES + 1)
            except FileNotFoundError:
                return None
        if dir_fd is None:
            with self._dir() as fd:
                return self._read_bytes(fd)
        fd = self._open(dir_fd, self.name, os.O_RDONLY, "lease file")
        if fd is None:
            return None
        with os.fdopen(fd, "rb") as f:
            return f.read(MAX_LEASE_BYTES + 1)

    def read(self, dir_fd: int | None = None) -> LeaseInfo | None:
        """The lease, or ``None`` when there is none.

        Raises:
            LeaseFileError: it is a symlink, not a regular file, or not a lease a run wrote.
        """
        data = self._read_bytes(dir_fd)
        if data is None:
            return None
        try:
            return LeaseInfo.from_bytes(data)
        except ValueError as e:
            raise LeaseFileError(f"the lease file {self.uri} is not a lease ciea wrote ({e}); delete it if no "
                                 "run holds the table, then re-run") from None

    def _write(self, info: LeaseInfo | None, dir_fd: int | None) -> None:
        if self.remote:
            if info is None:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.delete_file(self.path)
            else:
                with self.fs.open_output_stream(self.path) as f:
                    f.write(info.to_bytes())
            return
        assert dir_fd is not None
        if info is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.name, dir_fd=dir_fd)  # unlink removes a link itself, never its target
            return
        tmp = f".{self.name}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(info.to_bytes())
                f.flush()
                os.fsync(f.fileno())
            # rename replaces the directory entry, never a file a link there points to; readers
            # see the old lease or the new one, never half of one.
            os.replace(tmp, self.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise

    def swap(self, decide: Callable[[LeaseInfo | None], LeaseInfo | None]) -> None:
        """Replaces the lease with ``decide(current)`` (``None``: removes it; the current
        object itself: leaves the file alone).

        Raises:
            LeaseFileError: the lease, its lock or its folder is not what a run writes.
        """
        with self._locked() as dir_fd:
            current = self.read(dir_fd)
            new = decide(current)
            if new is not current:
                self._write(new, dir_fd)


class TableLease:
    """The lease of one table for one run (a context manager: acquire, then release).

    Args:
        db_uri: the LanceDB database folder (local or ``s3://``).
        table: the table name.
        command: what holds it, for the other run's message (``ciea embed``).
        storage_options: object-store settings (never credentials).
        ttl_s: a lease with an older heartbeat is abandoned.
        heartbeat_s: how often the holder refreshes its heartbeat.
    """

    def __init__(self, db_uri: str, table: str, command: str, storage_options: dict[str, str] | None = None,
                 ttl_s: float = DEFAULT_TTL_S, heartbeat_s: float = HEARTBEAT_S) -> None:
        if not _TABLE_NAME.match(table):
            raise LeaseFileError(f"table name {table!r} cannot name a lease file: use letters, digits, _, . and - "
                                 "(not starting with .)")
        self.table = table
        self.uri = lease_uri(db_uri, table)
        self.file = _LeaseFile(self.uri, storage_options)
        self.ttl_s, self.heartbeat_s = ttl_s, heartbeat_s
        now = time.time()
        self.info = LeaseInfo(run_id=uuid.uuid4().hex, command=command, host=socket.gethostname(),
                              pid=os.getpid(), started=now, heartbeat=now)
        self._held = False
        self._lost: str | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @property
    def run_id(self) -> str:
        return self.info.run_id

    def _busy(self, holder: LeaseInfo) -> TableBusyError:
        return TableBusyError(
            f"table {self.table} is being written by another run ({holder.describe()}); wait for it to "
            f"finish, or remove {self.uri} if that run is dead")

    def acquire(self) -> LeaseInfo:
        """Takes the lease (or an abandoned one over, with a warning); returns this run's.

        Raises:
            TableBusyError: a live run holds it, naming that run and the fix.
            LeaseFileError: the lease, its lock or its folder is a symlink, not a regular
                file, or not a lease a run wrote (one line naming the file and the fix).
        """
        def decide(current: LeaseInfo | None) -> LeaseInfo:
            if current is not None:
                why = abandoned(current, time.time(), self.info.host, self.ttl_s)
                if why is None:
                    raise self._busy(current)
                logger.warning("taking over the lease of table %s from %s: %s", self.table, current.describe(), why)
            return self.info

        self.file.swap(decide)
        if self.file.remote:
            time.sleep(SETTLE_S)  # another run's put in the same instant wins or loses now
            holder = self.file.read()
            if holder is None or holder.run_id != self.run_id:
                raise self._busy(holder) if holder else self._lost_error(None)
        self._held = True
        self._beat = threading.Thread(target=self._heartbeat, name=f"lease-{self.table}", daemon=True)
        self._beat.start()
        logger.info("took the lease of table %s (%s)", self.table, self.uri)
        return self.info

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.file.swap(self._refresh)
            except (LeaseLostError, LeaseFileError) as e:
                self._lost = str(e)
                logger.error("%s", e)
                return
            except OSError as e:  # a storage hiccup: the next beat retries; the TTL is 20 beats
                logger.warning("could not refresh the lease %s: %s", self.uri, e)

    def _refresh(self, current: LeaseInfo | None) -> LeaseInfo:
        if current is None or current.run_id != self.run_id:
            raise self._lost_error(current)
        return replace(current, heartbeat=time.time())

    def _lost_error(self, current: LeaseInfo | None) -> LeaseLostError:
        whom = f"now held by {current.describe()}" if current else "removed"
        return LeaseLostError(f"this run's lease on table {self.table} was {whom} while it ran; nothing more "
                              "is committed — re-run when the table is free")

    def check(self) -> None:
        """Raises :class:`LeaseLostError` unless this run still holds the lease (read now)."""
        if self._lost is not None:
            raise LeaseLostError(self._lost)
        current = self.file.read()
        if current is None or current.run_id != self.run_id:
            raise self._lost_error(current)

    def release(self) -> None:
        """Stops the heartbeat and removes the lease if it is still this run's."""
        if not self._held:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        self._held = False

        def decide(current: LeaseInfo | None) -> LeaseInfo | None:
            return None if current is not None and current.run_id == self.run_id else current

        try:
            self.file.swap(decide)
        except (OSError, LeaseFileError) as e:
            logger.warning("could not remove the lease %s (%s): it frees itself after %.0f s", self.uri, e,
                           self.ttl_s)

    def __enter__(self) -> TableLease:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
