"""Waiting for Ray's job server (the dashboard's REST API) of a head a test started."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest


def job_client(url: str, timeout_s: float = 90, failed: Callable[[], str | None] = lambda: None):
    """A ``JobSubmissionClient`` for ``url`` once the job server answers; fails the test
    after ``timeout_s``, or at once when ``failed()`` returns why the head is gone."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout_s
    while True:
        why = failed()
        if why:
            pytest.fail(why)
        if time.monotonic() > deadline:
            pytest.fail(f"Ray's job server did not answer on {url} within {timeout_s:.0f} s")
        try:
            return JobSubmissionClient(url)
        except Exception:  # the dashboard is still starting
            time.sleep(1)
