"""What a test tier costs: wall time, CPU-seconds and peak memory of the whole process tree
(pytest, the local Rays it starts, every subprocess), and its slowest tests.

    python -m bench.test_loop                         # unit, then the loop, then the slow tier
    python -m bench.test_loop --tiers unit            # one tier
    python -m bench.test_loop --repo /tmp/old-clone   # the same tiers of another checkout

Tiers: ``unit`` (``tests/unit``), ``loop`` (``make test``: every tier but ``slow``), ``slow``
(``make test-slow``). Memory is the tree's peak PSS (shared pages counted once, sampled every
second) and the largest single process's peak RSS. Writes one JSON per run under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from bench.meter import TreeMeter

TIERS = {
    "unit": ["tests/unit"],
    "loop": ["-m", "not slow", "tests"],
    "slow": ["-m", "slow", "--ignore=tests/integration/test_cluster_two_nodes.py", "tests"],
    "cluster": ["-m", "slow", "tests/integration/test_cluster_two_nodes.py"],  # its own pytest, as `make test-slow`
}
_DURATION = re.compile(r"^\s*([\d.]+)s (call|setup|teardown)\s+(\S+)", re.M)


def run_tier(repo: Path, tier: str, python: str) -> dict:
    cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=25", *TIERS[tier]]
    use, out, err = TreeMeter(interval=1.0).run(cmd, cwd=str(repo))
    text = out.decode(errors="replace")
    summary = next((line for line in reversed(text.splitlines()) if " in " in line and ("passed" in line or "failed" in line)), "")
    slowest = [{"seconds": float(s), "phase": ph, "test": t} for s, ph, t in _DURATION.findall(text)]
    failed = [line for line in text.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    peak_rss = max(use.hwm_kib.values(), default=0) / 1024
    return {"tier": tier, "repo": str(repo), "returncode": use.returncode, "summary": summary.strip("= "),
            "wall_s": round(use.wall_s, 1), "cpu_s": round(use.cpu_s, 1),
            "peak_tree_pss_mib": round(use.peak_pss_kib / 1024), "peak_process_rss_mib": round(peak_rss),
            "failed": failed, "slowest": slowest, "stdout_tail": text[-6000:], "stderr_tail": err.decode(errors="replace")[-2000:]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiers", default="unit,loop,slow,cluster")
    p.add_argument("--repo", default=".", help="the checkout whose tests run")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--out", default="bench/results/test_loop")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H%M")
    rc = 0
    for tier in args.tiers.split(","):
        r = run_tier(Path(args.repo).resolve(), tier, args.python)
        (out / f"{stamp}_{tier}.json").write_text(json.dumps(r, indent=1) + "\n")
        print(f"{tier:<5} {r['summary']}: {r['wall_s'] / 60:.1f} min wall, {r['cpu_s'] / 60:.1f} CPU-min, "
              f"peak tree PSS {r['peak_tree_pss_mib'] / 1024:.1f} GiB, largest process {r['peak_process_rss_mib'] / 1024:.1f} GiB",
              flush=True)
        for line in r["failed"]:
            print(f"      {line}")
        for s in r["slowest"][:10]:
            print(f"      {s['seconds']:7.1f}s {s['phase']:<8} {s['test']}")
        rc = rc or r["returncode"]
    return rc


if __name__ == "__main__":
    sys.exit(main())
