"""Integration tier: one real local Ray shared by the modules of a test session, session
files under /tmp.

Ray 2.60 turns token authentication on and writes ``~/.ray/auth_token`` unless told
otherwise; these single-machine test clusters run with it off so nothing is written
outside the repository and /tmp (subprocesses inherit the setting).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


_HERE = Path(__file__).resolve().parent


def pytest_runtest_teardown(item, nextitem):
    """Stops the shared Ray when the run leaves this tier: the other tiers' tests expect a
    process without Ray (a job that must fail before Ray starts, say)."""
    if nextitem is None or _HERE not in Path(str(nextitem.path)).resolve().parents:
        import sys

        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()


@pytest.fixture(scope="session")
def _ray_temp_dir():
    # Short path: Ray's unix sockets live under it (108-byte limit).
    tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    try:
        yield tmp
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_local(_ray_temp_dir):
    """The 2-CPU local Ray the modules share: started by the first module that asks, left
    running for the next one (a start costs ≈ 3 s and a stop ≈ 2 s), stopped at the end of
    the session. A module that needs a Ray of its own (workers that must start with other
    environment variables) stops this one first; the next module that asks starts it again.
    Jobs join it and never stop a Ray they did not start."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, _temp_dir=_ray_temp_dir, include_dashboard=False, log_to_driver=False)
    yield ray
