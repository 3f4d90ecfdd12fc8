"""Kill a job and everything it started, the way a lost machine would: all at once.

A Ray worker is started by the raylet, takes a process group of its own and retitles itself
(``ray::TrainController``): neither ``killpg`` on the job nor a match on its command line
reaches it, and a worker that outlives its job for a second can still write a checkpoint. So
the tree is found by parent pid, frozen (SIGSTOP) until no new child appears, then killed.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

# bench/ is not an installed package: the `pytest` script (unlike `python -m pytest`) does not
# put the repository root on sys.path.
_REPO = str(Path(__file__).resolve().parents[1])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from bench.meter import descendants  # noqa: E402  (the same walk the benchmarks measure with)


def _signal(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie is dead; only its parent's wait is missing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


def _matching(needle: str) -> set[int]:
    found = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and needle.encode() in (proc / "cmdline").read_bytes():
                found.add(int(proc.name))
        except OSError:
            continue
    return found


def kill_tree(root: int, also_matching: str | None = None, timeout_s: float = 10.0) -> None:
    """SIGKILL ``root``, its descendants and (if given) any process whose command line holds
    ``also_matching`` (a Ray session folder: daemons that were re-parented), frozen first so
    that none of them acts on another's death."""
    frozen: set[int] = set()
    while True:
        tree = descendants(root) | (_matching(also_matching) if also_matching else set())
        new = tree - frozen
        if not new:
            break
        _signal(new, signal.SIGSTOP)
        frozen |= new
    _signal(frozen, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(_running(p) for p in frozen):
            return
        time.sleep(0.1)
