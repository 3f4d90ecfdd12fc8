"""The real jobs at corpus scale: what each stage costs per document at 10k, 100k and 1M.

At each ``--sizes`` N, in a fresh work folder, one subprocess per stage (each job starts
its own local Ray with ``--num-cpus`` CPUs and a session folder of its own, so the
process tree is the job's alone and is measured whole: driver, GCS, raylet, workers —
``bench/meter.py``):

1. ``ingest``: ``ciea ingest --source synthetic`` of N documents (2/3 image, inline PNG)
   into ``corpus/documents`` (no queries);
2. ``embed``: ``ciea embed`` with the ``tiny`` checkpoint (a 32-wide toy: what is measured
   is the pipeline's own cost, not the model's), indexes off;
3. ``index``: ``ciea embed`` again on the same version: nothing to embed, so only the
   indexes are built (BTree, FTS, and IVF_PQ once the rule asks for one) — the ANN build
   is reported on its own, as the issue asks;
4. ``search``: one ``ciea search`` of ``--queries`` queries (vector mode, k = 10);
5. ``reindex``: ``ciea reindex`` after 1 % of the corpus changed (updates, deletes and
   inserts in three Delta commits, as ``bench/reindex.py`` makes them; not timed as a stage).

Per stage: wall time, CPU seconds of the whole process tree and per unit (a corpus
document for ingest / embed / index, a query for search, a changed document for
reindex), peak RSS of the driver and of the largest Ray worker (the kernel's high-water
mark), the tree's peak PSS, the job's own row counts; after each stage, bytes on disk per
document of the Delta and Lance tables, their files, fragments and versions. **CPU seconds
are what the goals use** (every stage's CPU-s per document at 1M within 1.2x of 100k): on a
shared machine wall time measures the neighbours too.

``--baselines`` adds, at each size, in the same run: the single-process pyarrow + deltalake
writer (``bench/ingest.py``'s ``plain`` side) beside the ingest; the bare in-process
embedding loop (``bench/embed_throughput.py``) beside the embed; and the embed with one
two-thread actor (``encode.actors=1, cpus_per_actor=1, threads=2``) against the job's
default of one single-thread actor per CPU.

Writes ``scale_<N>.json`` per size into ``--out`` and redraws ``scale_per_doc.png`` from
every ``scale_*.json`` there (CPU-s per unit against corpus size, one line per stage;
peak RSS of driver and largest worker beside it).

    python -m bench.scale --sizes 10000                        # ~5 min on 2 idle cores
    nice -n 5 python -m bench.scale --sizes 100000 --baselines
    python -m bench.scale --sizes 2000 --queries 8 --out /tmp/scale   # what the test runs
    python -m bench.scale --sizes 1000000 --embed-only             # the embed goal and layout at 1M
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.meter import DRIVER, WORKERS, TreeMeter, TreeUsage

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "scale"
TABLE = "docs"
#: Unit each stage's cost is divided by.
UNITS = {"ingest": "document", "embed": "document", "index": "document", "search": "query",
         "reindex": "changed document"}
#: Share of the corpus that changes before the re-index, split update / delete / insert.
CHANGED, MIX = 0.01, (0.4, 0.3, 0.3)


class StageFailed(RuntimeError):
    """A job exited non-zero; the message names its log."""


# ---------------------------------------------------------------------------------------
# Running one job, measured
# ---------------------------------------------------------------------------------------


class Runner:
    """Runs the stages of one corpus size: paths, environment, the meter, the log folder."""

    def __init__(self, args: argparse.Namespace, size: int, work: Path, logs: Path, ray_tmp: str) -> None:
        self.args, self.size, self.work, self.logs, self.ray_tmp = args, size, work, logs, ray_tmp
        self.root, self.db = work / "data", work / "lancedb"
        self.meter = TreeMeter(interval=args.interval)
        self.env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                        TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")

    def ray_flags(self) -> list[str]:
        return ["--num-cpus", str(self.args.num_cpus), "--ray-temp-dir", self.ray_tmp, "--no-progress",
                *(["--set", f"ray.object_store_mb={self.args.object_store_mb}"] if self.args.object_store_mb else [])]

    def job(self, label: str, argv: list[str]) -> tuple[TreeUsage, str]:
        """``ciea <argv>`` (or ``python -m <module>`` when argv starts with ``-m``) in a
        measured subprocess; returns its usage and stdout. Output goes to ``logs/<label>.log``."""
        cmd = [sys.executable, *(argv if argv[0] == "-m" else ["-m", "jobs.cli", *argv])]
        log = self.logs / f"{label}.log"
        with log.open("wb") as err:
            use, out, _ = self.meter.run(cmd, env=self.env, cwd=REPO, stderr=err)
        text = out.decode(errors="replace")
        with log.open("a") as f:
            f.write("\n--- stdout ---\n" + text[-20000:])
        if use.returncode != 0:
            raise StageFailed(f"stage {label} failed (exit {use.returncode}) at {self.size} documents: see {log}")
        return use, text


def stage_record(name: str, use: TreeUsage, units: int, rows: dict[str, Any]) -> dict[str, Any]:
    rec = {"unit": UNITS.get(name, "document"), "units": units, **use.summary(), "rows": rows}
    rec["cpu_s_per_unit"] = rec["cpu_s"] / units if units else None
    rec["wall_s_per_unit"] = rec["wall_s"] / units if units else None
    return rec


def progress(size: int, name: str, rec: dict[str, Any]) -> None:
    rss, own = rec["peak_rss_mib"], rec["peak_private_rss_mib"]
    print(f"  [{size}] {name:<14} {rec['wall_s']:8.1f} s wall  {rec['cpu_s']:8.1f} CPU-s  "
          f"= {1000 * rec['cpu_s_per_unit']:8.3f} CPU-ms/{rec['unit']}  peak RSS driver {rss[DRIVER]:6.0f} MiB "
          f"({own[DRIVER]:.0f} private), largest worker {rss[WORKERS]:6.0f} MiB ({own[WORKERS]:.0f} private), "
          f"tree PSS {rec['peak_tree_pss_mib']:6.0f} MiB", flush=True)


# ---------------------------------------------------------------------------------------
# Bytes on disk
# ---------------------------------------------------------------------------------------


def folder_bytes(path: Path) -> tuple[int, int]:
    """(bytes, files) under ``path``."""
    total = files = 0
    for p in path.rglob("*"):
        if p.is_file():
            total += p.stat().st_size
            files += 1
    return total, files


def disk_usage(r: Runner, docs: int) -> dict[str, Any]:
    """Bytes per document and file counts of ``corpus/documents`` and the Lance table."""
    delta = r.root / "corpus" / "documents"
    out: dict[str, Any] = {}
    if delta.is_dir():
        b, _ = folder_bytes(delta)
        out["delta"] = {"bytes": b, "bytes_per_doc": round(b / docs, 1),
                        "data_files": sum(1 for _ in delta.glob("*.parquet")) + sum(1 for _ in delta.glob("*/*.parquet")),
                        "log_entries": sum(1 for _ in (delta / "_delta_log").glob("*.json"))}
    lance = r.db / f"{TABLE}.lance"
    if lance.is_dir():
        b, _ = folder_bytes(lance)
        parts = {sub: folder_bytes(lance / sub)[0] for sub in ("data", "_indices", "_versions", "_deletions")
                 if (lance / sub).is_dir()}
        out["lance"] = {"bytes": b, "bytes_per_doc": round(b / docs, 1), "bytes_by_folder": parts,
                        "data_files": sum(1 for _ in (lance / "data").glob("*.lance")) if (lance / "data").is_dir() else 0,
                        "versions": sum(1 for _ in (lance / "_versions").glob("*.manifest"))
                        if (lance / "_versions").is_dir() else 0}
    return out


# ---------------------------------------------------------------------------------------
# The stages
# ---------------------------------------------------------------------------------------


def run_ingest(r: Runner) -> dict[str, Any]:
    n, n_img = r.size, round(r.size * 2 / 3)
    use, _ = r.job("ingest", ["ingest", "--source", "synthetic", "--root", str(r.root), "--no-queries",
                              "--run-dir", str(r.work / "runs" / "ingest"), *r.ray_flags(),
                              "--set", f"source.synthetic.num_image_docs={n_img}",
                              "--set", f"source.synthetic.num_text_docs={n - n_img}",
                              "--set", f"source.synthetic.image_size={r.args.image_size}"])
    d = json.loads((r.work / "runs" / "ingest" / "latest.json").read_text())["documents"]
    rows = {k: d[k] for k in ("read", "accepted", "quarantined", "inserted", "updated", "unchanged")}
    rows["write"], rows["accepted_ids_in"] = d.get("write"), d.get("accepted_ids_in")
    return stage_record("ingest", use, n, rows)


def embed_argv(r: Runner, table: str, run_dir: str, *extra: str) -> list[str]:
    return ["embed", "--checkpoint", r.args.checkpoint, "--root", str(r.root), "--db", str(r.db), "--table", table,
            "--run-dir", str(r.work / "runs" / run_dir), *r.ray_flags(),
            "--set", f"encode.batch_size={r.args.batch_size}", *extra]


def run_embed(r: Runner, table: str = TABLE, label: str = "embed", *extra: str) -> dict[str, Any]:
    use, _ = r.job(label, embed_argv(r, table, label, "--set", "index.enabled=false", *extra))
    s = json.loads((r.work / "runs" / label / "summary.json").read_text())
    rows = {k: s.get(k) for k in ("documents", "rows_written", "rows", "skipped", "failed", "fragments", "commits",
                                  "embed_seconds", "docs_per_s", "resources", "plan_route", "plan_seconds")}
    return stage_record("embed", use, r.size, rows)


def run_index(r: Runner) -> dict[str, Any]:
    use, _ = r.job("index", embed_argv(r, TABLE, "index"))
    s = json.loads((r.work / "runs" / "index" / "summary.json").read_text())
    rows = {"rows": s["rows"], "rows_written": s["rows_written"], "index_seconds": s.get("index_seconds"),
            "plan_route": s.get("plan_route"), "plan_seconds": s.get("plan_seconds"),
            "indexes": s.get("indexes"), "index_stats": s["index_stats"], "ann_plan": s["ann_plan"]}
    return stage_record("index", use, r.size, rows)


def query_texts(n: int) -> list[str]:
    """``n`` distinct query texts from the synthetic corpus's own query generator."""
    from pipelines.ingest.sources.synthetic.generator import SyntheticConfig, generate_queries

    cfg = SyntheticConfig(seed=5, num_image_docs=300, num_text_docs=150, num_queries=(0, 0, n), image_size=32)
    return [q["query"] for q in generate_queries(cfg)["test"]][:n]


def run_search(r: Runner) -> dict[str, Any]:
    queries = query_texts(r.args.queries)
    use, out = r.job("search", ["search", *queries, "--root", str(r.root), "--db", str(r.db), "--table", TABLE,
                                "--k", "10", "--json"])
    res = json.loads(out)
    rows = {"queries": len(res["results"]), "hits": sum(len(q["hits"]) for q in res["results"]), "k": res["k"],
            "table_version": res["version"]}
    return stage_record("search", use, len(queries), rows)


def run_change(r: Runner) -> dict[str, Any]:
    """1 % of the corpus changes in three Delta commits (not a job: set-up, timed apart)."""
    from bench.reindex import change_corpus

    n_changed = max(3, round(r.size * r.args.changed))
    t0 = time.perf_counter()
    counts = change_corpus(str(r.root), n_changed, MIX, seed=0, image_size=r.args.image_size)
    return {"changed": n_changed, **counts, "seconds": round(time.perf_counter() - t0, 2)}


def run_reindex(r: Runner, change: dict[str, Any]) -> dict[str, Any]:
    use, _ = r.job("reindex", ["reindex", "--checkpoint", r.args.checkpoint, "--root", str(r.root), "--db", str(r.db),
                               "--table", TABLE, "--run-dir", str(r.work / "runs" / "reindex"), *r.ray_flags()])
    s = json.loads((r.work / "runs" / "reindex" / "summary.json").read_text())
    rows = {k: s.get(k) for k in ("method", "embed_route", "upserts", "deletes", "embedded", "deleted", "rows",
                                  "failed", "embed_seconds", "index_seconds")}
    return stage_record("reindex", use, change["changed"], rows)


# ---------------------------------------------------------------------------------------
# Baselines (--baselines)
# ---------------------------------------------------------------------------------------


def run_plain_ingest(r: Runner) -> dict[str, Any]:
    """``bench/ingest.py``'s single-process pyarrow + deltalake writer, same documents."""
    root = r.work / "plain" / "documents"
    use, out = r.job("ingest_plain", ["-m", "bench.ingest", "--child", "plain", "--rows", str(r.size),
                                      "--image-fraction", str(2 / 3), "--image-size", str(r.args.image_size),
                                      "--root", str(root)])
    res = json.loads(out.strip().splitlines()[-1])
    shutil.rmtree(r.work / "plain", ignore_errors=True)
    return stage_record("ingest", use, r.size, {"table_rows": res["table_rows"], "seconds": res["seconds"]})


def run_loop(r: Runner) -> dict[str, Any]:
    """``bench/embed_throughput.py``'s bare in-process loop (no Ray), same corpus and checkpoint."""
    use, out = r.job("embed_loop", ["-m", "bench.scale", "--child-loop", str(r.root), "--checkpoint",
                                    r.args.checkpoint, "--child-db", str(r.db), "--batch-size", str(r.args.batch_size),
                                    "--threads", str(r.args.num_cpus)])
    res = json.loads(out.strip().splitlines()[-1])
    shutil.rmtree(r.db / "loop.lance", ignore_errors=True)
    return stage_record("embed", use, r.size, {"rows_written": res["docs"], "seconds": res["seconds"],
                                               "docs_per_s": res["docs_per_s"]})


def child_loop(args: argparse.Namespace) -> int:
    from bench.embed_throughput import run_loop as loop
    from pipelines.store.delta_tables import Tables

    res = loop(Tables(args.child_loop), args.checkpoint, args.child_db, "loop", args.batch_size, args.threads,
               thumbnail_px=96)
    print(json.dumps(res))
    return 0


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def run_embed_1x2(r: Runner) -> dict[str, Any]:
    """``ciea embed`` with one two-thread actor instead of the default one single-thread
    actor per CPU, into a table of its own (removed after)."""
    one = run_embed(r, "layout_1x2", "embed_1x2", "--set", "encode.actors=1", "--set", "encode.cpus_per_actor=1",
                    "--set", "encode.threads=2")
    shutil.rmtree(r.db / "layout_1x2.lance", ignore_errors=True)
    return one


def embed_ratios(emb: dict[str, Any], loop: dict[str, Any], one: dict[str, Any]) -> dict[str, float | None]:
    """The embed goal's ratios against the bare loop, and the layout's (> 1: the job is faster / cheaper)."""
    return {
        "embed_vs_loop_wall": ratio(loop["wall_s"], emb["wall_s"]),
        "embed_vs_loop_docs_per_s": ratio(emb["rows"]["docs_per_s"], loop["rows"]["docs_per_s"]),
        "embed_vs_loop_cpu": ratio(loop["cpu_s"], emb["cpu_s"]),
        "layout_2x1_vs_1x2_wall": ratio(one["wall_s"], emb["wall_s"]),
        "layout_2x1_vs_1x2_cpu": ratio(one["cpu_s"], emb["cpu_s"]),
    }


def baselines(r: Runner, stages: dict[str, Any]) -> dict[str, Any]:
    """The side-by-side baselines and their ratios (> 1: the job is faster / cheaper)."""
    plain, loop = run_plain_ingest(r), run_loop(r)
    progress(r.size, "ingest_plain", plain)
    progress(r.size, "embed_loop", loop)
    one = run_embed_1x2(r)
    progress(r.size, "embed_1x2", one)
    ing = stages["ingest"]
    return {
        "ingest_plain": plain, "embed_loop": loop, "embed_1x2": one,
        "ingest_vs_plain_wall": ratio(plain["wall_s"], ing["wall_s"]),
        "ingest_vs_plain_cpu": ratio(plain["cpu_s"], ing["cpu_s"]),
        **embed_ratios(stages["embed"], loop, one),
    }


def run_embed_comparison(args: argparse.Namespace, size: int, out: Path, ray_tmp: str) -> dict[str, Any]:
    """``--embed-only``: the embed goal and the actor layout at one size without the other
    stages: ingest, then the bare loop, the job's default layout and one two-thread actor,
    back to back on the same corpus and checkpoint."""
    work = Path(tempfile.mkdtemp(prefix=f"scale-embed-{size}-", dir=args.work))
    logs = out / "logs" / f"embed-{size}"
    logs.mkdir(parents=True, exist_ok=True)
    r = Runner(args, size, work, logs, ray_tmp)
    load0 = os.getloadavg()[0]
    runs: dict[str, Any] = {}
    try:
        for name, fn in (("ingest", run_ingest), ("embed_loop", run_loop), ("embed", run_embed),
                         ("embed_1x2", run_embed_1x2)):
            runs[name] = fn(r)
            progress(size, name, runs[name])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"size": size, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "load_avg_before": round(load0, 2),
                        "load_avg_after": round(os.getloadavg()[0], 2)},
            **runs, **embed_ratios(runs["embed"], runs["embed_loop"], runs["embed_1x2"])}


# ---------------------------------------------------------------------------------------
# One size, the checks, the plot
# ---------------------------------------------------------------------------------------


def reconcile(size: int, stages: dict[str, Any], change: dict[str, Any], queries: int) -> dict[str, bool]:
    """Row counts that must agree across the stages (the jobs' own summaries)."""
    ing, emb, idx = stages["ingest"]["rows"], stages["embed"]["rows"], stages["index"]["rows"]
    srch, rei = stages["search"]["rows"], stages["reindex"]["rows"]
    after = size - change["deleted"] + change["inserted"]
    return {
        "ingest_read_equals_size": ing["read"] == size and ing["inserted"] == size and ing["quarantined"] == 0,
        "embed_wrote_every_document": emb["rows_written"] == size == emb["rows"] and emb["failed"] == 0,
        "index_embedded_nothing_new": idx["rows_written"] == 0 and idx["rows"] == size,
        "search_k_hits_per_query": srch["queries"] == queries and srch["hits"] == queries * srch["k"],
        "reindex_embedded_the_changes": rei["embedded"] == change["updated"] + change["inserted"],
        "reindex_rows_after_change": rei["rows"] == after,
    }


def run_size(args: argparse.Namespace, size: int, out: Path, ray_tmp: str) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"scale-{size}-", dir=args.work))
    logs = out / "logs" / str(size)
    logs.mkdir(parents=True, exist_ok=True)
    r = Runner(args, size, work, logs, ray_tmp)
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    stages: dict[str, Any] = {}
    disk: dict[str, Any] = {}
    try:
        for name, fn in (("ingest", run_ingest), ("embed", run_embed), ("index", run_index), ("search", run_search)):
            stages[name] = fn(r)
            disk[name] = disk_usage(r, size)
            progress(size, name, stages[name])
        extra = baselines(r, stages) if args.baselines else None
        change = run_change(r)
        print(f"  [{size}] change          {change['changed']} documents: {change['updated']} updated, "
              f"{change['deleted']} deleted, {change['inserted']} inserted ({change['seconds']} s)", flush=True)
        stages["reindex"] = run_reindex(r, change)
        disk["reindex"] = disk_usage(r, size - change["deleted"] + change["inserted"])
        progress(size, "reindex", stages["reindex"])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return {
        "size": size, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "load_avg_before": round(load0, 2),
                    "load_avg_after": round(os.getloadavg()[0], 2), "memory_gib": round(_mem_gib(), 1)},
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("child")},
        "total_wall_s": round(time.perf_counter() - t0, 1), "stages": stages, "change": change, "disk": disk,
        "baselines": extra, "reconciled": reconcile(size, stages, change, args.queries),
        "note": "CPU-s (whole process tree, Ray's processes included) is what the goals use",
    }


def _mem_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def plot(out: Path) -> Path:
    """``scale_per_doc.png`` from every ``scale_*.json`` in ``out``: CPU-s per unit and
    peak RSS (driver, largest worker) against corpus size, one line per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted((json.loads(p.read_text()) for p in out.glob("scale_*.json")), key=lambda d: d["size"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    for stage, unit in UNITS.items():
        pts = [(d["size"], d["stages"][stage]) for d in runs if stage in d["stages"]]
        xs = [x for x, _ in pts]
        a.plot(xs, [s["cpu_s_per_unit"] for _, s in pts], marker="o", label=f"{stage} (per {unit})")
        line = b.plot(xs, [s["peak_rss_mib"][DRIVER] for _, s in pts], marker="o", label=f"{stage} driver")
        b.plot(xs, [s["peak_rss_mib"][WORKERS] for _, s in pts], marker="s", linestyle="--",
               color=line[0].get_color(), label=f"{stage} largest worker")
    for ax, title, ylabel in ((a, "CPU seconds per unit (whole process tree)", "CPU-s per unit"),
                              (b, "peak RSS per process", "MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("corpus size (documents)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("bench/scale.py: ciea jobs against corpus size (tiny model, 2-CPU local Ray)")
    fig.tight_layout()
    path = out / "scale_per_doc.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ray_temp_dir(out: Path) -> str:
    """A session folder of the run's own, under ``out`` when that path is short enough for
    Ray's unix sockets (~107 bytes with Ray's session and socket names), else under /tmp."""
    candidate = out.resolve() / "ray"
    if len(str(candidate)) <= 40:
        candidate.mkdir(parents=True, exist_ok=True)
        return str(candidate)
    return tempfile.mkdtemp(prefix="ray-sc-", dir="/tmp")


def make_tiny_checkpoint(work: str, image_size: int) -> str:
    from bench.embed_throughput import make_checkpoint

    folder = Path(tempfile.mkdtemp(prefix="scale-model-", dir=work))
    return make_checkpoint(folder, "tiny", image_size)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000", help="comma-separated corpus sizes (documents)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder for scale_<N>.json, the plot and the job logs")
    p.add_argument("--baselines", action="store_true",
                   help="also the plain writer, the bare embedding loop and the 1x2-thread actor layout")
    p.add_argument("--queries", type=int, default=64, help="queries in the search batch")
    p.add_argument("--changed", type=float, default=CHANGED,
                   help="fraction of the corpus changed before the re-index (default 0.01)")
    p.add_argument("--image-size", type=int, default=32, help="synthetic image side = the model's input (px)")
    p.add_argument("--batch-size", type=int, default=64, help="encoder batch size (the job's default)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of each job's local Ray")
    p.add_argument("--object-store-mb", type=int, default=None, help="each job's object store (default: Ray's)")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between /proc samples")
    p.add_argument("--work", default=tempfile.gettempdir(), help="where the corpus and tables are written")
    p.add_argument("--keep", action="store_true", help="keep the work folder (tables) of each size")
    p.add_argument("--checkpoint", help="checkpoint to embed with (default: a fresh tiny one)")
    p.add_argument("--embed-only", action="store_true",
                   help="only the embed comparison (bare loop, the job, one 2-thread actor) after the ingest; "
                        "writes embed_vs_loop_<N>.json")
    p.add_argument("--child-loop", help=argparse.SUPPRESS)
    p.add_argument("--child-db", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_loop:
        return child_loop(args)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"bench.scale: --sizes {args.sizes!r}: comma-separated integers, e.g. 10000,100000") from None
    if not sizes or min(sizes) < 100:
        raise SystemExit(f"bench.scale: --sizes {args.sizes!r}: at least one size, each >= 100 documents")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ray_tmp = ray_temp_dir(out)
    own_model = args.checkpoint is None
    if own_model:
        args.checkpoint = make_tiny_checkpoint(args.work, args.image_size)
    print(f"scale bench: sizes {sizes}, {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.2f}; "
          f"checkpoint {args.checkpoint}", flush=True)
    try:
        for size in sizes:
            if args.embed_only:
                res = run_embed_comparison(args, size, out, ray_tmp)
                (out / f"embed_vs_loop_{size}.json").write_text(json.dumps(res, indent=2) + "\n")
                print(f"  [{size}] embed / loop docs/s {res['embed_vs_loop_docs_per_s']}x, "
                      f"layout 2x1 / 1x2 wall {res['layout_2x1_vs_1x2_wall']}x", flush=True)
                continue
            res = run_size(args, size, out, ray_tmp)
            (out / f"scale_{size}.json").write_text(json.dumps(res, indent=2) + "\n")
            bad = [k for k, ok in res["reconciled"].items() if not ok]
            print(f"  [{size}] done in {res['total_wall_s']} s; row counts "
                  f"{'reconciled' if not bad else 'NOT reconciled: ' + ', '.join(bad)}", flush=True)
            if bad:
                return 1
        if not args.embed_only:
            print(f"plot: {plot(out)}")
    except StageFailed as e:
        raise SystemExit(f"bench.scale: {e}") from None
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if own_model:
            shutil.rmtree(Path(args.checkpoint).parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
