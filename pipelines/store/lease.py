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
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import pyarrow.fs as pafs

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


class WriterConflict(RuntimeError):
    """Another run writes (or wrote) the table; the message names it and the fix."""


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
    def from_bytes(cls, data: bytes) -> LeaseInfo | None:
        """The lease, or ``None`` for a file that is not one (empty, half-written, edited)."""
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None


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
    """Read-decide-write of the lease file as one step (see the module doc)."""

    def __init__(self, uri: str, storage_options: dict[str, str] | None) -> None:
        self.uri = uri
        self.remote = storage.is_remote(uri)
        self.fs, self.path = storage.filesystem(uri, storage_options)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self.remote:
            yield
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        # Never deleted: removing a lock file others may hold open would split the lock.
        fd = os.open(self.path + ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def read(self) -> LeaseInfo | None:
        try:
            with self.fs.open_input_stream(self.path) as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return LeaseInfo.from_bytes(data)

    def _write(self, info: LeaseInfo | None) -> None:
        if info is None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.delete_file(self.path)
        elif self.remote:
            with self.fs.open_output_stream(self.path) as f:
                f.write(info.to_bytes())
        else:
            tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(info.to_bytes())
            os.replace(tmp, self.path)  # readers see the old lease or the new one, never half

    def swap(self, decide: Callable[[LeaseInfo | None, bool], LeaseInfo | None]) -> None:
        """Replaces the lease with ``decide(current, present)`` (``None``: removes it; the
        current object itself: leaves the file alone).

        ``present`` is True when a file exists, even one that is not a lease.
        """
        with self._locked():
            try:
                present = self.fs.get_file_info(self.path).type != pafs.FileType.NotFound
            except OSError:
                present = False
            current = self.read()
            new = decide(current, present)
            if new is not current:
                self._write(new)


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
        """
        def decide(current: LeaseInfo | None, present: bool) -> LeaseInfo:
            if current is None and present:
                logger.warning("the lease %s is not readable (a crash while writing it?): taking it over", self.uri)
            elif current is not None:
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
            except LeaseLostError as e:
                self._lost = str(e)
                logger.error("%s", e)
                return
            except OSError as e:  # a storage hiccup: the next beat retries; the TTL is 20 beats
                logger.warning("could not refresh the lease %s: %s", self.uri, e)

    def _refresh(self, current: LeaseInfo | None, present: bool) -> LeaseInfo:
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

        def decide(current: LeaseInfo | None, present: bool) -> LeaseInfo | None:
            return None if current is not None and current.run_id == self.run_id else current

        try:
            self.file.swap(decide)
        except OSError as e:
            logger.warning("could not remove the lease %s (%s): it frees itself after %.0f s", self.uri, e,
                           self.ttl_s)

    def __enter__(self) -> TableLease:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
