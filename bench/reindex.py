"""Incremental re-index vs full rebuild: what ``ciea reindex`` saves when 1 % of a corpus
changes.

What is measured
    A corpus of ``--docs`` synthetic documents (2/3 image with small inline PNGs, 1/3
    text) is written to Delta (version 0) and embedded into a LanceDB table with the
    ``tiny`` preset checkpoint by ``pipelines.index.build.run`` — indexes included (BTree, two FTS, and
    IVF_PQ once the rule asks for one): that is the **full rebuild**. Then ``--changed``
    (default 1 %) of the documents change in three Delta commits, as ingest writes them:
    updates (a merge that rewrites captions/texts), deletes, inserts of new doc_ids, in
    the proportions ``--mix``. ``pipelines.index.reindex.run`` brings the table to the new version:
    the **re-index** (change feed → delete → embed the changed documents on Ray → commit →
    fold into the indexes → record → publish). Both are timed end to end by the jobs'
    own summaries (Ray start-up excluded from both: one local Ray serves the run).

    Printed: both times, their ratio (goal <= 0.05), the CPU seconds of each (the job's
    process and every Ray process, sampled: :class:`CpuMeter`; on a shared machine the
    CPU ratio is the steadier number), the re-index's steps, and the re-embedded count
    against the number of inserted + updated documents (they must be equal: only the
    changed documents are embedded). ``--verify`` also embeds the new version into a
    fresh table and checks that each re-indexed table has the same ids and vectors.

    ``--routes`` re-indexes copies of the same table by several embed routes
    (``pipelines.index.reindex.embed_route``): ``auto`` (the job's own choice: in-process for 1 % of
    100k), ``in-process``, ``ray-rows`` (the changed rows read by the job, embedded on Ray)
    and ``ray-read`` (Ray reads the whole version and keeps the changed documents: what
    re-index did before), so before and after are measured in the same run.

Examples::

    python -m bench.reindex --docs 10000                 # a few minutes on 2 cores
    OMP_NUM_THREADS=1 python -m bench.reindex --docs 100000 --json reindex-100k.json  # the recorded run
    python -m bench.reindex --docs 2000 --verify --routes auto,ray-rows,ray-read
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import meter
from bench.embed_throughput import make_checkpoint, make_corpus


class CpuMeter:
    """CPU seconds (user + system) of this process and of every process it started — the
    local Ray's GCS, raylet and workers — while a phase runs.

    Worker processes come and go, so each one's CPU time is sampled every ``interval``
    seconds and its last sample counts (a worker that exits between samples loses at
    most ``interval`` seconds of CPU). Processes alive at the start count from there.
    """

    def __init__(self, interval: float = 0.2) -> None:
        self.pid = os.getpid()
        self.interval = interval
        self.base: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> dict[int, float]:
        # /proc (bench.meter), not psutil: it is not a dependency. An exited process reads 0.
        return {pid: t for pid in meter.descendants(self.pid) if (t := meter.cpu_s(pid)) > 0}

    def __enter__(self) -> CpuMeter:
        self.base = self._sample()
        self.last = dict(self.base)
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(self.interval):
                self.last.update(self._sample())

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.last.update(self._sample())

    @property
    def driver(self) -> float:
        return round(self.last.get(self.pid, 0.0) - self.base.get(self.pid, 0.0), 2)

    @property
    def total(self) -> float:
        return round(sum(v - self.base.get(pid, 0.0) for pid, v in self.last.items()), 2)

    def as_dict(self) -> dict[str, float]:
        return {"total": self.total, "driver": self.driver, "ray_processes": round(self.total - self.driver, 2)}


def _encode_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"device": "cpu", "batch_size": args.batch_size, "actors": 1, "cpus_per_actor": 1, "threads": args.threads}


def full_build(root: str, checkpoint: str, db: str, table: str, args: argparse.Namespace) -> dict[str, Any]:
    from pipelines.index.build import load_model_facts, run
    from pipelines.index.config import EmbedConfig

    cfg = EmbedConfig.model_validate({
        "input": {"root": root}, "model": {"checkpoint": checkpoint},
        "output": {"db": db, "table": table, "run_dir": str(Path(db) / "runs")},
        "encode": _encode_settings(args), "preprocess": {"thumbnail_px": args.thumbnail_px},
        "progress": False})
    return run(cfg, load_model_facts(checkpoint))


def reindex(root: str, checkpoint: str, db: str, table: str, args: argparse.Namespace,
            overrides: list[str] | None = None) -> dict[str, Any]:
    """``pipelines.index.reindex.run``; ``overrides`` are ``--set`` pairs (e.g. the embed route's thresholds)."""
    from jobs.common import deep_merge, parse_overrides
    from pipelines.index.build import load_model_facts
    from pipelines.index.reindex import ReindexConfig, run

    cfg = ReindexConfig.model_validate(deep_merge({
        "input": {"root": root}, "model": {"checkpoint": checkpoint},
        "output": {"db": db, "table": table, "run_dir": str(Path(db) / "runs")},
        "encode": _encode_settings(args), "preprocess": {"thumbnail_px": args.thumbnail_px},
        "progress": False}, parse_overrides(list(overrides or []))))
    return run(cfg, load_model_facts(checkpoint))


def change_corpus(root: str, n_changed: int, mix: tuple[float, float, float], seed: int,
                  image_size: int) -> dict[str, int]:
    """Updates, deletes and inserts ``n_changed`` documents in three Delta commits."""
    import hashlib

    import pyarrow as pa
    from deltalake import write_deltalake

    from pipelines.store import schema as S
    from pipelines.store.delta_tables import Tables

    tables = Tables(root)
    uri = tables.documents
    rng = random.Random(seed)
    n_upd = round(n_changed * mix[0])
    n_del = round(n_changed * mix[1])
    n_ins = n_changed - n_upd - n_del
    current = tables.read(uri)
    picked = rng.sample(range(current.num_rows), n_upd + n_del)
    upd = current.take(picked[:n_upd]).to_pylist()
    for r in upd:
        if r[S.MODALITY] == "image":
            r[S.CAPTION] = (r[S.CAPTION] or "") + " (re-captioned)"
        else:
            r[S.TEXT] = (r[S.TEXT] or "") + " (revised)"
        r[S.CONTENT_SHA256] = hashlib.sha256(json.dumps([r[S.TEXT], r[S.CAPTION]]).encode()
                                             + (r[S.IMAGE] or b"")).hexdigest()
    (tables.open(uri).merge(pa.Table.from_pylist(upd, schema=S.DOCUMENTS_SCHEMA), "t.doc_id = s.doc_id",
                           source_alias="s", target_alias="t")
     .when_matched_update_all().execute())
    gone = current.take(picked[n_upd:])[S.DOC_ID].to_pylist()
    tables.open(uri).delete(f"{S.DOC_ID} IN ({', '.join(repr(d) for d in gone)})")
    new = current.take(rng.sample(range(current.num_rows), n_ins)).to_pylist()
    for i, r in enumerate(new):
        r[S.DOC_ID] = f"bench-new-{i:07d}"
    write_deltalake(uri, pa.Table.from_pylist(new, schema=S.DOCUMENTS_SCHEMA), mode="append")
    return {"updated": n_upd, "deleted": n_del, "inserted": n_ins}


def verify(db: str, a: str, b: str) -> dict[str, Any]:
    import lance
    import numpy as np

    from pipelines.store.lance_tables import VectorTable

    def rows(name: str) -> dict[str, Any]:
        t = lance.dataset(VectorTable(db, name).uri).to_table(columns=["doc_id", "vector"])
        return dict(zip(t["doc_id"].to_pylist(), t["vector"].to_numpy(zero_copy_only=False)))

    ra, rb = rows(a), rows(b)
    same_ids = sorted(ra) == sorted(rb)
    err = max((float(np.abs(np.asarray(ra[d]) - np.asarray(rb[d])).max()) for d in ra if d in rb), default=0.0)
    return {"same_ids": same_ids, "max_abs_vector_diff": err}


#: ``--routes`` names → the ``ciea reindex`` settings that force that embed route.
ROUTES: dict[str, list[str]] = {
    "auto": [],
    "in-process": ["encode.in_process_max_docs=1000000000"],
    "ray-rows": ["encode.in_process_max_docs=0", "changes.read_max_docs=1000000000"],
    "ray-read": ["encode.in_process_max_docs=0", "changes.read_max_docs=0"],  # what re-index did before
}


def _route_result(inc: dict[str, Any], cpu: CpuMeter, full: dict[str, Any], expected: int) -> dict[str, Any]:
    return {"seconds": inc["seconds"], "ratio": round(inc["seconds"] / full["seconds"], 4),
            "cpu_seconds": cpu.as_dict(), "embed_route": inc.get("embed_route"), "rows_from": inc.get("rows_from"),
            "steps": inc.get("steps"), "embed_seconds": inc["embed_seconds"], "index_seconds": inc.get("index_seconds"),
            "reembedded": inc["embedded"], "expected_reembedded": expected, "rows_deleted": inc["deleted"],
            "method": inc["method"], "indexes": inc.get("indexes")}


def _print_route(name: str, r: dict[str, Any], full_cpu: float) -> None:
    cpu = r["cpu_seconds"]
    steps = ", ".join(f"{k} {v[0]:.2f}" for k, v in (r["steps"] or {}).items())
    print(f"re-index [{name} → {r['embed_route']}] {r['seconds']:8.2f} s  ratio {r['ratio']:.4f}   "
          f"CPU {cpu['total']:.1f} s (job process {cpu['driver']:.1f}, Ray {cpu['ray_processes']:.1f}; "
          f"CPU ratio {cpu['total'] / full_cpu if full_cpu else float('nan'):.4f})")
    print(f"    steps (wall s): {steps}")
    print(f"    re-embedded {r['reembedded']} of {r['expected_reembedded']} inserted+updated "
          f"({'equal' if r['reembedded'] == r['expected_reembedded'] else 'NOT EQUAL'}); rows deleted "
          f"{r['rows_deleted']}; rows read from {r['rows_from']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reindex", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=100_000, help="corpus documents (2/3 image)")
    p.add_argument("--changed", type=float, default=0.01, help="fraction of documents that change")
    p.add_argument("--mix", default="0.4,0.3,0.3", help="update,delete,insert shares of the changes")
    p.add_argument("--image-size", type=int, default=32, help="rendered image side = vision input (px)")
    p.add_argument("--batch-size", type=int, default=256, help="encoder batch size")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the encoder actor")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--thumbnail-px", type=int, default=32, help="thumbnail side (small: text-heavy rows)")
    p.add_argument("--routes", default="auto,ray-read",
                   help=f"embed routes to re-index with, each on its own copy of the table ({', '.join(ROUTES)}); "
                        "the first is the headline; ray-read is what re-index did before it read the changed "
                        "rows itself")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verify", action="store_true", help="also embed the new version afresh and compare")
    p.add_argument("--workdir", help="keep the corpus and tables here (default: a temp folder, removed)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    mix = tuple(float(x) for x in args.mix.split(","))
    if len(mix) != 3 or abs(sum(mix) - 1) > 1e-6 or min(mix) < 0:
        raise SystemExit(f"--mix {args.mix}: three non-negative shares (update,delete,insert) that sum to 1")
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    if not routes or set(routes) - set(ROUTES) or len(set(routes)) != len(routes):
        raise SystemExit(f"--routes {args.routes}: distinct names from {', '.join(ROUTES)}")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.basicConfig(level=logging.WARNING)
    import ray

    work = Path(args.workdir or tempfile.mkdtemp(prefix="ciea-bench-reindex-"))
    work.mkdir(parents=True, exist_ok=True)
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(num_cpus=args.num_cpus, _temp_dir=ray_tmp, include_dashboard=False, log_to_driver=False)
    try:
        root, db = str(work / "data"), str(work / "lancedb")
        t0 = time.perf_counter()
        make_corpus(Path(root), args.docs, args.image_size)
        ckpt = make_checkpoint(work / "model", "tiny", args.image_size)
        setup_s = time.perf_counter() - t0
        with CpuMeter() as full_cpu:
            full = full_build(root, ckpt, db, "docs", args)
        tables = {route: "docs" if i == 0 else f"docs_{route.replace('-', '_')}" for i, route in enumerate(routes)}
        for name in tables.values():  # every route starts from the same table
            if name != "docs":
                shutil.copytree(Path(db) / "docs.lance", Path(db) / f"{name}.lance")
        n_changed = max(1, round(args.docs * args.changed))
        changes = change_corpus(root, n_changed, mix, args.seed, args.image_size)  # type: ignore[arg-type]
        expected_embedded = changes["updated"] + changes["inserted"]
        results: dict[str, dict[str, Any]] = {}
        for route, name in tables.items():
            with CpuMeter() as cpu:
                inc = reindex(root, ckpt, db, name, args, ROUTES[route])
            results[route] = _route_result(inc, cpu, full, expected_embedded)
        head = results[routes[0]]
        out: dict[str, Any] = {
            "docs": args.docs, "changed": n_changed, **changes, "setup_seconds": round(setup_s, 1),
            "full_rebuild_seconds": full["seconds"], "full_embed_seconds": full["embed_seconds"],
            "full_index_seconds": full.get("index_seconds"), "full_rebuild_cpu_seconds": full_cpu.as_dict(),
            "reindex_seconds": head["seconds"], "ratio": head["ratio"],
            "cpu_ratio": round(head["cpu_seconds"]["total"] / full_cpu.total, 4) if full_cpu.total else None,
            "reembedded": head["reembedded"], "expected_reembedded": expected_embedded,
            "routes": results, "ann_plan": full.get("ann_plan"), "load_avg": os.getloadavg()[0],
        }
        if args.verify:
            full_new = full_build(root, ckpt, db, "check", args)
            out["verify"] = {route: verify(db, name, "check") for route, name in tables.items()}
            out["full_rebuild_new_version_seconds"] = full_new["seconds"]
        print(f"corpus {args.docs} documents; changed {n_changed} = {changes['updated']} updated + "
              f"{changes['deleted']} deleted + {changes['inserted']} inserted")
        fc = full_cpu.as_dict()
        print(f"full rebuild  {full['seconds']:8.1f} s  (embed {full['embed_seconds']} s, indexes "
              f"{full.get('index_seconds')} s)   CPU {fc['total']:.1f} s (job process {fc['driver']:.1f}, "
              f"Ray {fc['ray_processes']:.1f})")
        for route in routes:
            _print_route(route, results[route], full_cpu.total)
        print(f"ratio         {out['ratio']:.4f}   (goal <= 0.05; {routes[0]})")
        for route, v in out.get("verify", {}).items():
            print(f"verify [{route}] same ids: {v['same_ids']}, max |Δvector| {v['max_abs_vector_diff']:.2e}")
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
        ok = all(r["reembedded"] == expected_embedded for r in results.values())
        ok = ok and all(v["same_ids"] for v in out.get("verify", {}).values())
        return 0 if ok else 1
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
