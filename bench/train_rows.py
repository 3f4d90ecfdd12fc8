"""What building the training rows costs by join route: map-side (the documents a run needs
held by every task) against Ray Data's hash-partitioned joins, side by side on the same
corpus, in the same run.

Each measurement is a child process (its own local Ray, 2 CPUs) that builds stage 1's rows
the way ``ciea train`` does (:func:`pipelines.train.dataset.build_train_shards`: plan, draws,
joins, sort, one dataset per worker), with a route forced by ``data.broadcast_join_mb``:
``map-side`` (64 MiB) or ``hash`` (0). Reported per route: the build's wall seconds (in
the child), and the CPU seconds of the child's whole process tree (driver, Ray daemons and
workers: ``bench/meter.py``), Ray's start included (the same for both). Routes alternate
within each repeat so a busy machine weighs on both alike; the ratio is hash / map-side.
The rows of both routes are compared (they must be equal).

    python -m bench.train_rows                    # the tiny corpus and a 10x one, 3 repeats
    python -m bench.train_rows --sizes 1 --repeats 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.meter import TreeMeter

ROUTES = {"map-side": 64.0, "hash": 0.0}


def _ingest(root: Path, scale: int) -> None:
    from jobs import ingest

    docs = {"num_image_docs": 200 * scale, "num_text_docs": 60 * scale}
    sets = [f"source.synthetic.{k}={v}" for k, v in docs.items()]
    sets.append(f"source.synthetic.num_queries=[{60 * scale}, 20, 20]")
    argv = ["--preset", "tiny", "--root", str(root), "--run-dir", str(root / "_ingest"), "--no-progress"]
    for s in sets:
        argv += ["--set", s]
    assert ingest.main(argv) == 0


def child(root: str, broadcast_mb: float, epochs: int) -> dict[str, Any]:
    """One build on a fresh local Ray; its figures and a digest of the rows."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    import ray.data

    from pipelines.store.delta_tables import Tables
    from pipelines.train.dataset import build_train_shards
    from pipelines.train.draws import DrawSettings

    ray.data.DataContext.get_current().enable_progress_bars = False
    t0 = time.perf_counter()
    shards, counts = build_train_shards(Tables(root, {}), "train", epochs=range(epochs), num_shards=2,
                                        settings=DrawSettings(seed=0), broadcast_mb=broadcast_mb)
    build_s = time.perf_counter() - t0
    digest = hashlib.sha256()
    for name in sorted(shards):
        for row in shards[name].take_all():
            digest.update(json.dumps(row, sort_keys=True, default=repr).encode())
    ray.shutdown()
    return {"build_s": build_s, "rows": counts["rows"] * counts["epochs"], "digest": digest.hexdigest()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_rows", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 10],
                   help="corpus scales: 1 = the tiny preset's (260 documents, 60 training queries)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--child", nargs=2, metavar=("ROOT", "BROADCAST_MB"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], float(args.child[1]), args.epochs)))
        return 0
    meter = TreeMeter(pss=False)
    report: dict[str, Any] = {"epochs": args.epochs, "repeats": args.repeats, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="bench-rows-") as tmp:
        for scale in args.sizes:
            root = Path(tmp) / f"x{scale}"
            _ingest(root, scale)
            runs: dict[str, list[dict[str, Any]]] = {r: [] for r in ROUTES}
            for _ in range(args.repeats):
                for route, mb in ROUTES.items():
                    use, out, err = meter.run([sys.executable, "-m", "bench.train_rows", "--epochs", str(args.epochs),
                                               "--child", str(root), str(mb)])
                    if use.returncode != 0:
                        sys.exit(err.decode(errors="replace")[-3000:])
                    runs[route].append({**json.loads(out.decode().splitlines()[-1]), "tree_cpu_s": use.cpu_s,
                                        "wall_s": use.wall_s})
            digests = {r["digest"] for rs in runs.values() for r in rs}
            size = {"rows": runs["map-side"][0]["rows"], "same_rows": len(digests) == 1}
            for route, rs in runs.items():
                size[route] = {k: statistics.median(r[k] for r in rs) for k in ("build_s", "tree_cpu_s", "wall_s")}
            size["hash_over_map_side"] = {k: size["hash"][k] / size["map-side"][k] for k in ("build_s", "tree_cpu_s")}
            report["sizes"][scale] = size
            print(f"x{scale}: {size['rows']} rows, same rows: {size['same_rows']}; build wall s (median) map-side "
                  f"{size['map-side']['build_s']:.1f}, hash {size['hash']['build_s']:.1f} "
                  f"({size['hash_over_map_side']['build_s']:.2f}x); tree CPU s map-side "
                  f"{size['map-side']['tree_cpu_s']:.1f}, hash {size['hash']['tree_cpu_s']:.1f}", flush=True)
    report["load_avg"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if all(s["same_rows"] for s in report["sizes"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
