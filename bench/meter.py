"""What a child process and everything it starts costs: CPU seconds and memory of a
process tree, read from ``/proc`` (Linux).

A job started as a subprocess starts its own local Ray: the GCS and the raylet are its
children, Ray's workers the raylet's. Ray reaps its workers without accounting them to
their parent (no ``cutime``), and workers come and go, so the tree is sampled every
``interval`` seconds and each process counts with the last CPU time seen (a process that
exits between two samples loses at most ``interval`` seconds). Peak RSS per process is the
kernel's own high-water mark (``VmHWM``), exact even between samples; the private part
(``RssAnon``, no file or shared-memory pages) is the largest seen at a sample; the tree's peak PSS
(shared pages, e.g. Ray's object store, counted once) is the largest sum seen at a sample.

``bench/ingest.py`` and ``bench/scale.py`` share these readers.
"""

from __future__ import annotations

import os
import resource
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_CLK = os.sysconf("SC_CLK_TCK")

#: Roles of a process in a job's tree.
DRIVER, WORKERS, DAEMONS = "driver", "workers", "ray daemons"


def descendants(pid: int) -> set[int]:
    """``pid`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo += children.get(p, [])
    return out


def _proc_kib(pid: int, file: str, field: str) -> int:
    """The ``field:`` line (KiB) of ``/proc/<pid>/<file>``; 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kib(pid: int) -> int:
    """Proportional set size (KiB): shared pages divided among the processes mapping them."""
    return _proc_kib(pid, "smaps_rollup", "Pss")


def hwm_kib(pid: int) -> int:
    """Peak resident set size of the process so far (``VmHWM``, KiB)."""
    return _proc_kib(pid, "status", "VmHWM")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of the process (its threads included, its children not)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK


def name(pid: int) -> str:
    """A short label: the script or binary, not the interpreter path."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in argv[:3] if a]
    return " ".join(w if i == 0 and w.startswith("ray::") else w.rsplit("/", 1)[-1] for i, w in enumerate(words))[:60]


def role(pid: int, driver: int) -> str:
    """:data:`DRIVER`, :data:`WORKERS` (Ray worker processes) or :data:`DAEMONS` (GCS, raylet, agents)."""
    if pid == driver:
        return DRIVER
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return DAEMONS
    argv = cmdline.split(b"\0")
    # Workers rename themselves ``ray::<task or actor>`` once they run (the per-node agents
    # do too: ``ray::DashboardAgent``); before that their command line names Ray's worker
    # entry point.
    if argv[0].startswith(b"ray::"):
        return DAEMONS if argv[0].rstrip().endswith(b"Agent") else WORKERS
    if len(argv) > 1 and argv[1].endswith(b"default_worker.py"):
        return WORKERS
    return DAEMONS


def by_role(cpu: dict[int, float], roles: dict[int, str]) -> dict[str, float]:
    """Sums per-process values by role (unknown processes count as Ray daemons)."""
    out: dict[str, float] = {}
    for pid, seconds in cpu.items():
        r = roles.get(pid, DAEMONS)
        out[r] = out.get(r, 0.0) + seconds
    return dict(sorted(out.items()))


@dataclass
class TreeUsage:
    """What one process tree used: :meth:`TreeMeter.run` fills it."""

    wall_s: float = 0.0
    returncode: int = 0
    cpu: dict[int, float] = field(default_factory=dict)  # last CPU seconds seen per process
    hwm_kib: dict[int, int] = field(default_factory=dict)  # peak RSS per process
    anon_kib: dict[int, int] = field(default_factory=dict)  # peak private (anonymous) RSS seen per process
    roles: dict[int, str] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    peak_pss_kib: int = 0
    rusage_cpu_s: float = 0.0  # the child's and its reaped descendants' CPU, from getrusage

    @property
    def cpu_s(self) -> float:
        """Both counts undercount in their own way (sampling misses the last ``interval`` of
        each process; ``wait4`` misses what was not reaped by its parent): the larger."""
        return max(sum(self.cpu.values()), self.rusage_cpu_s)

    def peak_rss_mib(self, of: str) -> float:
        """Largest peak RSS (MiB) of one process of role ``of``."""
        return max((k for p, k in self.hwm_kib.items() if self.roles.get(p) == of), default=0) / 1024

    def peak_private_mib(self, of: str) -> float:
        """Largest private RSS (``RssAnon``, MiB, sampled) of one process of role ``of``: the
        peak RSS less the pages of files and of shared memory — Ray's object store, which
        every process that reads or writes a block maps, counts in ``VmHWM`` but belongs to
        no process."""
        return max((k for p, k in self.anon_kib.items() if self.roles.get(p) == of), default=0) / 1024

    def summary(self) -> dict[str, Any]:
        top = sorted(((self.roles.get(p, DAEMONS), self.names.get(p, "?"), round(c, 2),
                       round(self.hwm_kib.get(p, 0) / 1024)) for p, c in self.cpu.items()), key=lambda x: -x[2])
        return {
            "wall_s": round(self.wall_s, 2), "cpu_s": round(self.cpu_s, 2),
            "cpu_s_sampled": round(sum(self.cpu.values()), 2), "cpu_s_rusage": round(self.rusage_cpu_s, 2),
            "cpu_s_by_role": {k: round(v, 2) for k, v in by_role(self.cpu, self.roles).items()},
            "peak_rss_mib": {r: round(self.peak_rss_mib(r), 1) for r in (DRIVER, WORKERS, DAEMONS)},
            "peak_private_rss_mib": {r: round(self.peak_private_mib(r), 1) for r in (DRIVER, WORKERS, DAEMONS)},
            "peak_tree_pss_mib": round(self.peak_pss_kib / 1024, 1), "processes": len(self.cpu),
            "top_processes": [list(t) for t in top[:8]],  # role, name, CPU s, peak RSS MiB
        }


class TreeMeter:
    """Runs a command and samples its process tree until it exits.

    Args:
        interval: seconds between samples (each costs a ``/proc`` walk: ~10 ms).
        pss: also sum the tree's PSS at every sample (``smaps_rollup`` is the costly read).
    """

    def __init__(self, interval: float = 0.5, pss: bool = True) -> None:
        self.interval = interval
        self.pss = pss

    def run(self, cmd: list[str], *, env: dict[str, str] | None = None, cwd: str | Path | None = None,
            stdout: Any = subprocess.PIPE, stderr: Any = subprocess.PIPE) -> tuple[TreeUsage, bytes, bytes]:
        """Runs ``cmd`` to the end; returns its usage, stdout and stderr."""
        use = TreeUsage()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=stdout, stderr=stderr)
        done = threading.Event()
        sampler = threading.Thread(target=self._sample_until, args=(proc.pid, use, done), daemon=True)
        sampler.start()
        out, err = proc.communicate()
        use.returncode = proc.returncode
        use.wall_s = time.perf_counter() - t0
        done.set()
        sampler.join()
        # The child, reaped, and whatever it reaped: one child at a time, so the delta is its own.
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        use.rusage_cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        return use, out or b"", err or b""

    def _sample_until(self, pid: int, use: TreeUsage, done: threading.Event) -> None:
        while True:
            self._sample(pid, use)
            if done.wait(self.interval):
                return

    def _sample(self, pid: int, use: TreeUsage) -> None:
        pids = descendants(pid)
        if self.pss:
            use.peak_pss_kib = max(use.peak_pss_kib, sum(pss_kib(p) for p in pids))
        for p in pids:
            use.cpu[p] = max(use.cpu.get(p, 0.0), cpu_s(p))
            use.hwm_kib[p] = max(use.hwm_kib.get(p, 0), hwm_kib(p))
            use.anon_kib[p] = max(use.anon_kib.get(p, 0), _proc_kib(p, "status", "RssAnon"))
            label = name(p)
            # A worker renames itself ``ray::<task>`` once it runs; an exiting one reads as "".
            if label and not use.names.get(p, "").startswith("ray::"):
                use.roles[p], use.names[p] = role(p, pid), label
