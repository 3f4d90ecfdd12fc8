"""Where a training step's time goes, phase by phase (``debug.profile``)."""

from __future__ import annotations

import contextlib
import time


class StepProfile:
    """Per-phase cost of training steps: CPU time of the training thread
    (``time.thread_time``), of the whole process (``time.process_time``: Ray Data's
    prefetch and gloo's threads included) and wall time, in seconds.

    CPU time of the training thread is what a phase costs whatever else runs on the
    machine, so phases are compared by it on a shared box; wall minus CPU is time spent
    waiting (for the other rank at a collective, for a core, for data). Disabled, the
    phases cost one ``if`` each."""

    COLUMNS = ("thread_cpu", "process_cpu", "wall")

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.totals: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if not self.enabled:
            yield
            return
        t, p, w = time.thread_time(), time.process_time(), time.perf_counter()
        try:
            yield
        finally:
            row = self.totals.setdefault(phase, [0.0, 0.0, 0.0])
            row[0] += time.thread_time() - t
            row[1] += time.process_time() - p
            row[2] += time.perf_counter() - w

    def start(self) -> None:
        """Begins a step: forgets phases recorded since the last :meth:`pop` (e.g. the
        fetch that found the epoch's data exhausted)."""
        self.totals = {}

    def pop(self) -> dict[str, list[float]]:
        """The phases recorded since the last call, ``{phase: [thread_cpu, process_cpu, wall]}``."""
        out = {k: [round(x, 6) for x in v] for k, v in self.totals.items()}
        self.totals = {}
        return out
