"""Each pipeline job runs as ``python -m jobs.<name>`` (what ``ray job submit -- python -m
jobs.<name>`` does): one fresh interpreter per job, so this lives in the integration tier."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: The jobs the KubeRay manifests run (tests/unit/test_infra_manifests.py checks that list).
PIPELINE_JOBS = {"jobs.ingest", "jobs.train", "jobs.embed", "jobs.reindex"}


@pytest.mark.parametrize("module", sorted(PIPELINE_JOBS))
def test_python_dash_m_runs_the_job(module):
    """`ray job submit -- python -m jobs.<name>` needs a `__main__` block: without one the
    module imports, does nothing and the Ray job 'succeeds'."""
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={"PATH": str(Path(sys.executable).parent), "OMP_NUM_THREADS": "1",
                                           "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout, f"`python -m {module} --help` printed no usage: add `if __name__ == \"__main__\"`"
