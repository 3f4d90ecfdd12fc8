"""Settings shared by every test tier (unit, integration, e2e).

* The Hugging Face hub is never reachable from tests: force offline mode before anything
  imports ``transformers`` so a missing local file fails fast instead of retrying.
* Tests marked ``gpu`` are skipped when no CUDA device is present (see pyproject.toml).
* One local Ray for the session's e2e and integration modules (``ray_local``): started by
  the first module that asks, stopped when the run reaches the unit tier or ends. Ray 2.60
  turns token authentication on and writes ``~/.ray/auth_token`` unless told otherwise;
  these single-machine test clusters run with it off, so nothing is written outside the
  repository and /tmp (subprocesses inherit the setting).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

#: Tiers whose modules share the session's Ray.
_RAY_TIERS = tuple(Path(__file__).resolve().parent / tier for tier in ("e2e", "integration"))


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items or _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in gpu_items:
        item.add_marker(skip)


def _in_ray_tiers(item: pytest.Item | None) -> bool:
    return item is not None and any(tier in Path(str(item.path)).resolve().parents for tier in _RAY_TIERS)


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stops the shared Ray when the run leaves the tiers that share it: the unit tier's
    tests expect a process without Ray (a job that must fail before Ray starts, say)."""
    if _in_ray_tiers(item) and not _in_ray_tiers(nextitem):
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
        ray = sys.modules.get("ray")
        if ray is not None:
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_local(_ray_temp_dir):
    """The 2-CPU local Ray the modules share: started by the first module that asks, left
    running for the next one (a start costs ≈ 3 s and a stop ≈ 2 s), stopped when the run
    leaves the e2e and integration tiers. A module that needs a Ray of its own (workers that
    must start with other environment variables) stops this one first; the next module that
    asks starts it again. Jobs join it and never stop a Ray they did not start."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, _temp_dir=_ray_temp_dir, include_dashboard=False, log_to_driver=False)
    yield ray
