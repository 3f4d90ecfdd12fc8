"""What a training checkpoint holds, and which one a re-run resumes from.

A checkpoint directory (written by rank 0, registered with Ray Train) holds the model
(``ciea_model.save_checkpoint``: config, weights, tokenizer), the optimiser and schedule
(:data:`OPTIM_FILE`), the loop state with the resume identity (:data:`STATE_FILE`), the best
weights so far (:data:`BEST_DIR`), a copy of the metrics log, and in the final one a probe of
encoded dev vectors (:data:`PROBE_FILE`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STATE_FILE = "training_state.json"
OPTIM_FILE = "optimizer.pt"
BEST_DIR = "best"
PROBE_FILE = "probe.safetensors"


def _fs(uri: str, storage_options: dict[str, str] | None = None):
    import pyarrow.fs as pafs

    if "://" not in uri or uri.startswith("file://"):
        path = str(Path(uri.removeprefix("file://")).resolve())
        return pafs.LocalFileSystem(), path
    # The job's storage options (endpoint, region), as for its tables: pyarrow's own
    # from_uri would ignore them and look for the bucket on AWS.
    from pipelines.store.storage import filesystem

    return filesystem(uri, storage_options)


def checkpoint_at(storage_path: str, path: str, storage_options: dict[str, str] | None = None):
    """A ``ray.train.Checkpoint`` of ``path`` (as :func:`latest_checkpoint` names it) on the
    filesystem of ``storage_path``: what a re-run's workers resume from when Ray Train has
    registered no checkpoint of the run (a run killed before its controller wrote
    ``checkpoint_manager_snapshot.json``)."""
    import ray.train

    fs, _ = _fs(storage_path, storage_options)
    return ray.train.Checkpoint(path, filesystem=fs)


def latest_checkpoint(storage_path: str, name: str,
                      storage_options: dict[str, str] | None = None) -> tuple[str, dict[str, Any]] | None:
    """The checkpoint a re-run of ``name`` resumes from, and its training state, or ``None``.

    That is the latest checkpoint Ray Train *registered* (its
    ``checkpoint_manager_snapshot.json``): a run killed between a worker's upload and the
    controller's bookkeeping leaves a newer directory on disk that Ray will not resume
    from. Without a snapshot, the directory with the highest step."""
    import pyarrow.fs as pafs

    fs, base = _fs(storage_path, storage_options)
    run = f"{base.rstrip('/')}/{name}"

    def state_of(path: str) -> dict[str, Any] | None:
        try:
            with fs.open_input_stream(f"{path}/{STATE_FILE}") as f:
                return json.loads(f.read().decode())
        except (OSError, ValueError):
            return None  # an upload cut short has no state file

    try:
        with fs.open_input_stream(f"{run}/checkpoint_manager_snapshot.json") as f:
            latest = (json.loads(f.read().decode()).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
        if latest and (state := state_of(f"{run}/{latest}")) is not None:
            return f"{run}/{latest}", state
    except (OSError, ValueError):
        pass
    try:
        entries = fs.get_file_info(pafs.FileSelector(run, allow_not_found=True))
    except OSError:
        return None
    best: tuple[str, dict[str, Any]] | None = None
    for e in entries:
        if e.type != pafs.FileType.Directory or not e.base_name.startswith("checkpoint"):
            continue
        state = state_of(e.path)
        if state is not None and (best is None or (state["step"], state.get("finished", False))
                                  > (best[1]["step"], best[1].get("finished", False))):
            best = (e.path, state)
    return best
