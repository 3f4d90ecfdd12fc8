"""The one line ``ciea train`` exits with when training fails beyond ``run.max_failures``:
each failing worker's own error and where a re-run resumes from (checkpoints on disk)."""

from __future__ import annotations

import json

from ray.train import ControllerError, WorkerGroupError

from pipelines.train.checkpoints import STATE_FILE
from pipelines.train.config import TrainJobConfig
from pipelines.train.driver import failure_message


def _cfg(tmp_path) -> TrainJobConfig:
    return TrainJobConfig(run={"name": "r", "storage_path": str(tmp_path), "max_failures": 1})


def test_names_each_failing_worker_and_the_checkpoint_to_resume_from(tmp_path):
    for step in (2, 4):
        ckpt = tmp_path / "r" / f"checkpoint_{step}"
        ckpt.mkdir(parents=True)
        (ckpt / STATE_FILE).write_text(json.dumps({"step": step, "finished": False}))
    error = WorkerGroupError("Traceback (most recent call last):\n  ...\nRuntimeError: boom\n",
                             {1: MemoryError("out of memory"), 0: RuntimeError("first line\nboom")})
    message = failure_message(_cfg(tmp_path), error)
    assert "\n" not in message
    assert "run.max_failures=1" in message
    assert "(rank 0: RuntimeError: boom; rank 1: MemoryError: out of memory)" in message
    assert "resume from its checkpoint at step 4" in message


def test_without_a_checkpoint_says_the_rerun_starts_afresh(tmp_path):
    message = failure_message(_cfg(tmp_path), ControllerError(ValueError("bad\nstate")))
    assert "\n" not in message
    assert "(ValueError: state)" in message and "starts afresh" in message
