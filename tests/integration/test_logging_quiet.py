"""Quiet by default: the terminal shows our lines and everyone's warnings; Ray's, Ray
Train's and Ray Data's INFO lines go only to the run log (``jobs.common.setup_logging`` /
``log_to_file``). Logging is process-wide state, so each case runs in a fresh interpreter
with Ray's loggers configured as they are at import."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import logging, sys
    import ray.data, ray.train  # Ray's loggers: configured at import, own terminal handlers
    from jobs.common import log_to_file, setup_logging

    verbose = sys.argv[2] == "1"
    setup_logging(verbose=verbose)
    log_to_file(sys.argv[1], verbose=verbose)
    log_to_file(sys.argv[1], verbose=verbose)  # idempotent: one run-log handler
    assert sum(getattr(h, "_ciea_run_log", False) for h in logging.getLogger().handlers) == 1
    logging.getLogger("pipelines.index.embed").info("our summary line")
    logging.getLogger("jobs.ingest").info("our stage line")
    logging.getLogger("ray.train.v2.controller").info("ray train chatter")
    logging.getLogger("ray.data._internal.execution.streaming_executor").info("Execution plan of Dataset x")
    logging.getLogger("ray.data._internal.progress").warning("Progress bars disabled. To enable, set it")
    logging.getLogger("lance").warning("a real warning from a library")
    """
)


def _run(tmp_path: Path, verbose: bool) -> tuple[str, str]:
    log = tmp_path / "logs" / "run.log"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(log), "1" if verbose else "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr, log.read_text()


def test_terminal_shows_ours_and_warnings_run_log_has_everything(tmp_path):
    terminal, log = _run(tmp_path, verbose=False)
    assert "our summary line" in terminal and "our stage line" in terminal
    assert "a real warning from a library" in terminal
    assert "ray train chatter" not in terminal
    assert "Execution plan" not in terminal
    assert "Progress bars disabled" not in terminal
    for line in ("our summary line", "ray train chatter", "Execution plan of Dataset x",
                 "a real warning from a library"):
        assert line in log, line


def test_verbose_shows_everything(tmp_path):
    terminal, _ = _run(tmp_path, verbose=True)
    assert "ray train chatter" in terminal and "Execution plan" in terminal


def test_a_vanished_run_log_never_raises_into_the_caller(tmp_path):
    """Ray Data closes handlers when it re-configures its logger, and a test's (or an
    earlier run's) session folder can be deleted: logging afterwards must not raise."""
    script = textwrap.dedent(
        """
        import logging, shutil, sys
        from pathlib import Path
        from jobs.common import log_to_file, setup_logging

        setup_logging()
        folder = Path(sys.argv[1])
        handler_path = log_to_file(folder / "logs" / "ciea.log")
        for h in logging.getLogger().handlers:
            if getattr(h, "_ciea_run_log", False):
                h.close()  # what Ray Data's logging set-up does to the handlers it finds
        shutil.rmtree(folder)
        logging.getLogger("ray.data").info("after the folder is gone")
        logging.getLogger("pipelines.x").info("still fine")
        """
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "session")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "still fine" in done.stderr and "Traceback" not in done.stderr
