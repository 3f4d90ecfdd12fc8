"""The kill helper of the killed-job tests (``tests/process_tree.py``) reaches what ``killpg``
does not: a grandchild in a session (and process group) of its own, as Ray's actors are."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from process_tree import _running, descendants, kill_tree


def _wait_for(pred, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _outside_group(root: int) -> set[int]:
    out = set()
    for p in descendants(root) - {root}:
        try:
            if os.getpgid(p) != root:
                out.add(p)
        except ProcessLookupError:
            pass
    return out


def test_kill_tree_reaches_a_grandchild_in_its_own_session():
    job = subprocess.Popen(["bash", "-c", "setsid sleep 300 & sleep 300 & wait"], start_new_session=True)
    try:
        # setsid puts one sleep outside the job's process group, where killpg cannot reach it.
        _wait_for(lambda: len(_outside_group(job.pid)) == 1 and len(descendants(job.pid)) == 3)
        tree = descendants(job.pid) - {job.pid}
        kill_tree(job.pid)
        job.wait(timeout=10)
        _wait_for(lambda: not any(_running(p) for p in tree))
    finally:
        for p in descendants(job.pid):
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def test_a_zombie_is_not_running():
    child = subprocess.Popen(["true"])
    _wait_for(lambda: not _running(child.pid))  # exited, not yet waited for: a zombie
    assert os.path.exists(f"/proc/{child.pid}")
    child.wait()
