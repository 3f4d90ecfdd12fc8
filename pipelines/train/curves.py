"""The training curve: the metrics log rank 0 writes (JSON lines, one record per event:
``start``, ``step``, ``eval``, ``checkpoint``, ``epoch``, ``end``), reading it back, and its plot."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """JSON lines written by rank 0 beside the checkpoints (and copied into each)."""

    def __init__(self, path: Path | None) -> None:
        # No local run folder (object storage, or a rank other than 0): a temporary one, whose
        # log reaches the run only through the checkpoints; :meth:`close` removes it.
        self._owned = None if path else tempfile.mkdtemp(prefix="ciea-metrics-")
        self.path = path or Path(self._owned) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        """Removes the temporary folder of a log without a local path (nothing else)."""
        if self._owned:
            shutil.rmtree(self._owned, ignore_errors=True)
            self._owned = None

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True, default=float) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics log, in order (none when it does not exist)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_curve(metrics_path: Path, out: Path) -> Path | None:
    """A PNG of loss, in-batch accuracy and dev MRR@10 over steps (matplotlib, Agg)."""
    if not metrics_path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    # A step logged again after a restart replaces the lost attempt's value.
    steps: dict[int, dict[str, Any]] = {}
    evals: dict[int, float] = {}
    for r in records:
        if r.get("event") == "step":
            steps[r["step"]] = r
        elif r.get("event") == "eval":
            evals[r["step"]] = r["dev_mrr10"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    xs = sorted(steps)
    axes[0].plot(xs, [steps[s]["loss"] for s in xs], label="loss")
    axes[0].plot(xs, [steps[s]["loss_c"] for s in xs], label="L_c", alpha=0.7)
    axes[0].plot(xs, [steps[s]["loss_comp"] for s in xs], label="L_comp", alpha=0.7)
    axes[0].set_title("loss")
    axes[0].legend()
    axes[1].plot(xs, [steps[s]["in_batch_acc"] for s in xs])
    axes[1].set_title("in-batch accuracy")
    es = sorted(evals)
    axes[2].plot(es, [evals[s] for s in es], marker="o")
    axes[2].set_title("dev MRR@10")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
