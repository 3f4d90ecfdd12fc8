"""Integration tier: one real local Ray per test module, session files under /tmp.

Ray 2.60 turns token authentication on and writes ``~/.ray/auth_token`` unless told
otherwise; these single-machine test clusters run with it off so nothing is written
outside the repository and /tmp (subprocesses inherit the setting).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="module")
def ray_local():
    """A 2-CPU local Ray shared by every test of the module."""
    import ray

    # Short path: Ray's unix sockets live under it (108-byte limit).
    tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(num_cpus=2, _temp_dir=tmp, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
