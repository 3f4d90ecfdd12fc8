"""Ingest throughput and memory: the Ray Data ingest job vs a plain single-process writer.

Both sides ingest the same synthetic documents (PNG images inline, ``--image-fraction`` of
them image documents) into a fresh Delta table, doing the same work per record: generate,
validate and normalise (``pipelines.ingest.validation.validate_batch``: Pillow decode, RGB,
NFC, limits), hash, write.

* ``ray``: ``jobs.ingest.run`` — the job's own code path: Ray Data reads the shards and
  validates them on the workers, the driver applies the duplicate rule and streams the
  accepted rows into ``corpus/documents`` (change data feed on) — a fresh table, so the
  job's bulk load: one streaming append commit (an existing table gets a MERGE).
* ``plain``: one process, one thread of Python: ``iter_document_batches`` → the same
  ``validate_batch`` → ``write_deltalake(mode="append")`` from a streaming reader.

Each measurement runs in a fresh child process; the parent samples the proportional set
size (PSS, so Ray's shared object store is not counted twice) of the child's whole process
tree — driver, Ray daemons and workers — every 0.2 s and reports the peak, and the CPU
seconds of every process of the tree, split into driver, Ray workers (task workers and Ray
Data's own actors) and Ray daemons (GCS, raylet, agents): CPU seconds hold up when a
neighbour loads the machine, rows/s does not. Rows/s is over the ingest itself (Ray
start-up, ~3–5 s, is reported separately, and in a second ratio that includes it). Rounds
alternate the order (plain, ray, ray, plain, ...) so a neighbour's load hits both sides alike.

    python -m bench.ingest                                  # 100k rows, memory at 100k and 400k
    python -m bench.ingest --rows 20000 --memory-rows 20000,80000 --rounds 1   # ~1 min

Two more suites (issue 17), each its own run:

* ``--suite webdataset``: the Ray ingest of WebDataset tar shards (1,000 samples of a
  64 px PNG + caption + json per shard, written before the clock starts): rows/s, CPU s
  and peak PSS at each of ``--memory-rows`` (goal: flat within 1.2× from 100k to 400k);
* ``--suite urls``: ``--urls`` image URLs fetched from a loopback image server in a
  process of its own (``bench/url_server.py``, asyncio, keep-alive) with ``--latency-ms``
  added to every response: the fetcher alone (one ``fetch_all`` over the list, no Ray),
  the Ray URL ingest (fetch + validate + Delta) and a sequential fetch loop (one
  ``httpx2.Client``, one GET after the other, on the first ``--seq-sample`` URLs and
  extrapolated per URL): fetches/s, CPU s of each side and of the server (goal ≥ 20×,
  issue 26). All URLs are on one host, so both run with ``per_host`` = ``concurrency``.

    python -m bench.ingest --suite webdataset --memory-rows 100000,400000
    python -m bench.ingest --suite urls --urls 20000 --latency-ms 50 --json bench/results/ingest_urls/urls_20k.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.meter import by_role, cpu_s, descendants, name, pss_kib, role

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------
# Children: one ingest each, JSON result on the last stdout line
# ---------------------------------------------------------------------------------------


def _synthetic(rows: int, image_fraction: float, image_size: int):
    from pipelines.ingest.sources.synthetic.generator import SyntheticConfig

    n_img = max(1, round(rows * image_fraction))
    return SyntheticConfig(seed=7, num_image_docs=n_img, num_text_docs=rows - n_img,
                           num_queries=(0, 0, 0), image_size=image_size)


def child_plain(args: argparse.Namespace) -> dict:
    import pyarrow as pa
    from deltalake import write_deltalake

    from pipelines.ingest.sources.synthetic.generator import iter_document_batches
    from pipelines.ingest.validation import Limits, validate_batch
    from pipelines.store import schema as S
    from pipelines.store.delta_tables import CDF_CONFIG

    cfg = _synthetic(args.rows, args.image_fraction, args.image_size)
    limits = Limits()
    from datetime import datetime, timezone

    now = datetime.now(timezone.utc)

    def batches():
        seq = 0
        for batch in iter_document_batches(cfg, 256):
            d = batch.to_pydict()
            n = batch.num_rows
            raw = pa.table({
                S.SOURCE: ["synthetic"] * n, S.RECORD_REF: [f"synthetic:{seq + i}" for i in range(n)],
                S.SEQ: pa.array(range(seq, seq + n), pa.int64()), S.DOC_ID: d["doc_id"],
                S.MODALITY: d["modality"], S.TEXT: [t or None for t in d["text"]],
                S.CAPTION: [c or None for c in d["caption"]], S.IMAGE: d["image"],
                S.IMAGE_URI: [None] * n, S.METADATA: d["attributes"], S.ERROR: [None] * n,
                S.ERROR_DETAIL: [None] * n, S.RAW_EXCERPT: [None] * n,
            }, schema=S.RAW_SCHEMA)
            seq += n
            v = validate_batch(raw, limits)
            ok = v.filter(pa.compute.equal(v[S.STATUS], S.STATUS_OK))
            cols = {name: ok[name] for name in S.DOCUMENTS_SCHEMA.names if name not in (S.RUN_ID, S.INGESTED_AT)}
            cols[S.RUN_ID] = pa.array(["bench"] * ok.num_rows)
            cols[S.INGESTED_AT] = pa.array([now] * ok.num_rows, pa.timestamp("us", tz="UTC"))
            yield from pa.table(cols).cast(S.DOCUMENTS_SCHEMA).to_batches()

    t0 = time.perf_counter()
    reader = pa.RecordBatchReader.from_batches(S.DOCUMENTS_SCHEMA, batches())
    write_deltalake(args.root, reader, mode="append", configuration=CDF_CONFIG)
    seconds = time.perf_counter() - t0
    from deltalake import DeltaTable

    from pipelines.store.delta_tables import Tables

    # args.root is the table itself here (a plain append, no data-root layout).
    n = Tables(args.root).open(args.root).count() if hasattr(DeltaTable, "count") else None
    return {"mode": "plain", "rows": args.rows, "seconds": seconds, "table_rows": n}


def child_ray(args: argparse.Namespace) -> dict:
    from jobs import ingest
    from jobs.common import start_ray

    cfg = ingest.IngestConfig.model_validate({
        "source": {"kind": "synthetic", "queries": False, "rows_per_shard": args.rows_per_shard,
                   "synthetic": {"seed": 7, "num_image_docs": max(1, round(args.rows * args.image_fraction)),
                                 "num_text_docs": args.rows - max(1, round(args.rows * args.image_fraction)),
                                 "num_queries": (0, 0, 0), "image_size": args.image_size}},
        "output": {"root": args.root, "run_dir": str(Path(args.root).parent / "runs")},
        "ray": {"num_cpus": args.num_cpus, "temp_dir": args.ray_tmp, "object_store_mb": args.object_store_mb},
        "progress": False,
    })
    source = ingest.make_source(cfg)
    shards = source.plan()
    t0, c0 = time.perf_counter(), time.process_time()
    start_ray(cfg.ray)
    startup = time.perf_counter() - t0
    t1, c1, window_start = time.perf_counter(), time.process_time(), time.time()
    summary = ingest.run(cfg, source, shards)
    seconds = time.perf_counter() - t1
    c2, window_end = time.process_time(), time.time()
    import ray

    ray.shutdown()
    assert summary["documents"]["inserted"] == args.rows, summary["documents"]
    # The driver's own CPU (all its threads: deltalake writes on a thread pool) per phase.
    return {"mode": "ray", "rows": args.rows, "seconds": seconds, "ray_startup_s": startup, "shards": len(shards),
            "driver_cpu_s": {"startup": round(c1 - c0, 2), "ingest": round(c2 - c1, 2)},
            "window": [window_start, window_end], "write": summary["documents"]["write"],
            "table_rows": summary["documents"]["inserted"]}


# ---------------------------------------------------------------------------------------
# Parent: spawn, sample memory, report
# ---------------------------------------------------------------------------------------


def measure(mode: str, rows: int, args: argparse.Namespace, extra: tuple[str, ...] = ()) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"bench-ingest-{mode}-", dir=args.tmp))
    ray_tmp = tempfile.mkdtemp(prefix="ray-b-", dir="/tmp")
    cmd = [sys.executable, "-m", "bench.ingest", "--child", mode, "--rows", str(rows), *extra,
           "--image-fraction", str(args.image_fraction), "--image-size", str(args.image_size),
           *(["--rows-per-shard", str(args.rows_per_shard)] if args.rows_per_shard else []),
           "--num-cpus", str(args.num_cpus),
           "--object-store-mb", str(args.object_store_mb),
           "--root", str(work / "documents"), "--ray-tmp", ray_tmp]
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"),
               RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = {"kib": 0}
    cpu: dict[int, float] = {}  # last CPU seconds seen per process of the tree
    roles: dict[int, str] = {}
    names: dict[int, str] = {}
    series: list[tuple[float, dict[str, float]]] = []  # (time, CPU seconds by role so far)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            pids = descendants(proc.pid)
            peak["kib"] = max(peak["kib"], sum(pss_kib(p) for p in pids))
            for p in pids:
                cpu[p] = max(cpu.get(p, 0.0), cpu_s(p))
                if not names.get(p, "").startswith("ray::"):  # a worker renames itself once it runs
                    roles[p], names[p] = role(p, proc.pid), name(p)
            series.append((time.time(), by_role(cpu, roles)))
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    done.set()
    t.join()
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["peak_pss_mib"] = peak["kib"] / 1024
    result["cpu_s"] = sum(cpu.values())  # whole tree, start-up included (sampled every 0.2 s)
    result["cpu_s_by_role"] = {k: round(v, 2) for k, v in by_role(cpu, roles).items()}
    if "window" in result:
        # CPU spent inside the timed ingest (Ray start-up excluded): the samples just before
        # it began and just after it ended bracket it, to within the 0.2 s sampling period.
        lo, hi = result["window"]
        before = max((x for x in series if x[0] <= lo), default=(lo, {}), key=lambda x: x[0])[1]
        after = min((x for x in series if x[0] >= hi), default=series[-1], key=lambda x: x[0])[1]
        result["window_cpu_s_by_role"] = {k: round(after[k] - before.get(k, 0.0), 2) for k in after}
    result["processes"] = sorted(([roles.get(p), names.get(p, "?"), round(c, 2)] for p, c in cpu.items()),
                                 key=lambda x: -x[2])
    result["rows_per_s"] = rows / result["seconds"]
    # End to end, Ray's start-up included: what a user waits for.
    result["rows_per_s_with_startup"] = rows / (result["seconds"] + result.get("ray_startup_s", 0.0))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000, help="documents for the throughput comparison")
    p.add_argument("--memory-rows", default="100000,400000",
                   help="comma-separated sizes for the Ray ingest's peak memory (default 100000,400000)")
    p.add_argument("--rounds", type=int, default=2, help="throughput rounds per side (order alternates)")
    p.add_argument("--image-fraction", type=float, default=2 / 3, help="share of image documents")
    p.add_argument("--image-size", type=int, default=64, help="synthetic image side (px)")
    p.add_argument("--rows-per-shard", type=int, default=None,
                   help="ray: documents per read shard (default: the job's, ~8 shards of up to 10,000)")
    p.add_argument("--num-cpus", type=int, default=2, help="ray: CPUs of the local Ray")
    p.add_argument("--object-store-mb", type=int, default=512,
                   help="ray: object store size (MiB); bounds Ray Data's in-flight blocks (default 512)")
    p.add_argument("--tmp", default="/tmp", help="scratch folder for the Delta tables")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--suite", choices=["synthetic", "webdataset", "urls"], default="synthetic",
                   help="synthetic: Ray vs plain writer (default); webdataset: tar shards; urls: URL fetching")
    p.add_argument("--urls", type=int, default=2000, help="urls: URLs in the list")
    p.add_argument("--latency-ms", type=float, default=50.0, help="urls: latency the server adds per response")
    p.add_argument("--concurrency", type=int, default=64, help="urls: requests in flight per read task")
    p.add_argument("--shard-kb", type=int, default=32, help="urls: URL-list bytes per read task (KiB)")
    p.add_argument("--seq-sample", type=int, default=1000,
                   help="urls: URLs the sequential loop fetches; its rate is per URL, so it is extrapolated "
                        "to the list (0: the whole list)")
    p.add_argument("--child", choices=["ray", "plain", "wds", "urls", "urls-seq", "urls-fetch"],
                   help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--ray-tmp", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        children = {"ray": child_ray, "plain": child_plain, "wds": child_wds, "urls": child_urls,
                    "urls-seq": child_urls_sequential, "urls-fetch": child_urls_fetch}
        print(json.dumps(children[args.child](args)))
        return 0
    if args.suite == "webdataset":
        return suite_webdataset(args)
    if args.suite == "urls":
        return suite_urls(args)

    load = os.getloadavg()[0]
    print(f"ingest bench: {args.rows} rows ({args.image_fraction:.0%} image docs, {args.image_size}px PNG), "
          f"{os.cpu_count()} CPUs, load avg {load:.2f}", flush=True)
    runs: dict[str, list[dict]] = {"plain": [], "ray": []}
    for r in range(args.rounds):
        order = ("plain", "ray") if r % 2 == 0 else ("ray", "plain")
        for mode in order:
            res = measure(mode, args.rows, args)
            runs[mode].append(res)
            print(f"  round {r + 1} {mode:>5}: {res['rows_per_s']:8.0f} rows/s  ({res['seconds']:.1f} s"
                  + (f", {res['shards']} shards, Ray start-up {res['ray_startup_s']:.1f} s" if mode == "ray" else "")
                  + f", peak PSS {res['peak_pss_mib']:.0f} MiB, CPU {res['cpu_s']:.1f} s: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in res["cpu_s_by_role"].items()) + ")"
                  + ("\n" + " " * 20 + "CPU s inside the timed ingest: " + ", ".join(
                      f"{k} {v:.1f}" for k, v in res["window_cpu_s_by_role"].items())
                     if "window_cpu_s_by_role" in res else ""), flush=True)
    med = {m: statistics.median(x["rows_per_s"] for x in v) for m, v in runs.items()}
    ratio = med["ray"] / med["plain"]
    e2e = statistics.median(x["rows_per_s_with_startup"] for x in runs["ray"])
    cpu = {m: statistics.median(x["cpu_s"] for x in v) * 100_000 / args.rows for m, v in runs.items()}
    print(f"throughput (median of {args.rounds}): ray {med['ray']:.0f} rows/s, plain {med['plain']:.0f} rows/s "
          f"→ ratio {ratio:.2f}× (with Ray's start-up: {e2e / med['plain']:.2f}×); "
          f"CPU s per 100k rows: ray {cpu['ray']:.1f}, plain {cpu['plain']:.1f}")

    memory = {}
    sizes = [int(s) for s in args.memory_rows.split(",") if s]
    for n in sizes:
        prior = [x for x in runs["ray"] if x["rows"] == n]
        res = prior[0] if prior else measure("ray", n, args)
        memory[n] = res
        print(f"  ray ingest of {n} rows: peak PSS {res['peak_pss_mib']:.0f} MiB "
              f"({res['rows_per_s']:.0f} rows/s)", flush=True)
    if len(sizes) >= 2:
        growth = memory[sizes[-1]]["peak_pss_mib"] / memory[sizes[0]]["peak_pss_mib"]
        print(f"peak memory {sizes[-1]} vs {sizes[0]} rows: {growth:.2f}×")
    else:
        growth = None
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "median_rows_per_s": med, "ratio": ratio,
                                               "ratio_with_ray_startup": e2e / med["plain"],
                                               "cpu_s_per_100k": cpu,
                                               "memory": {str(k): v for k, v in memory.items()},
                                               "memory_growth": growth, "load_avg_start": load}, indent=2))
    return 0


# ---------------------------------------------------------------------------------------
# WebDataset shards and URL lists (issue 17)
# ---------------------------------------------------------------------------------------


def _ray_ingest(args: argparse.Namespace, source: dict) -> dict:
    """``jobs.ingest.run`` on ``source`` settings into ``args.root``, timed as in child_ray."""
    from jobs import ingest
    from jobs.common import start_ray

    cfg = ingest.IngestConfig.model_validate({
        "source": {"queries": False, **source},
        "output": {"root": args.root, "run_dir": str(Path(args.root).parent / "runs")},
        "ray": {"num_cpus": args.num_cpus, "temp_dir": args.ray_tmp, "object_store_mb": args.object_store_mb},
        "progress": False,
    })
    src = ingest.make_source(cfg)
    shards = src.plan()
    t0 = time.perf_counter()
    start_ray(cfg.ray)
    startup = time.perf_counter() - t0
    t1, window_start = time.perf_counter(), time.time()
    summary = ingest.run(cfg, src, shards)
    seconds = time.perf_counter() - t1
    window_end = time.time()
    import ray

    ray.shutdown()
    return {"rows": args.rows, "seconds": seconds, "ray_startup_s": startup, "shards": len(shards),
            "window": [window_start, window_end], "documents": summary["documents"],
            "fetch": summary.get("fetch")}


def child_wds(args: argparse.Namespace) -> dict:
    res = _ray_ingest(args, {"kind": "webdataset", "path": args.path})
    assert res["documents"]["inserted"] == args.rows, res["documents"]
    return {"mode": "wds", **res}


def child_urls(args: argparse.Namespace) -> dict:
    res = _ray_ingest(args, {"kind": "urls", "path": args.path, "fetch": {
        "concurrency": args.concurrency, "per_host": args.concurrency, "shard_kb": args.shard_kb,
        "allow_private": True}})  # the test server is on loopback
    assert res["documents"]["inserted"] == args.rows, res["documents"]
    return {"mode": "urls", **res}


def child_urls_fetch(args: argparse.Namespace) -> dict:
    """The fetcher alone: one ``fetch_all`` over the whole list in this process (no Ray Data,
    no validation, no Delta), with the ingest's settings (``per_host`` = ``concurrency``)."""
    from pipelines.ingest.fetch import FetchSettings, fetch_all

    urls = [json.loads(line)["url"] for line in Path(args.path).read_text().splitlines()]
    settings = FetchSettings(concurrency=args.concurrency, per_host=args.concurrency, allow_private=True)
    t0 = time.perf_counter()
    results = fetch_all(urls, settings)
    seconds = time.perf_counter() - t0
    ok = sum(r.ok for r in results)
    assert ok == len(urls), f"{len(urls) - ok} fetches failed: {next(r.detail for r in results if not r.ok)}"
    return {"mode": "urls-fetch", "rows": len(urls), "seconds": seconds, "bytes": sum(r.bytes for r in results),
            "requests": sum(r.attempts for r in results)}


def child_urls_sequential(args: argparse.Namespace) -> dict:
    """The baseline: one client, one GET after the other, body read and kept in memory."""
    import httpx2

    urls = [json.loads(line)["url"] for line in Path(args.path).read_text().splitlines()]
    urls = urls[: args.seq_sample] if args.seq_sample else urls
    t0 = time.perf_counter()
    n_bytes = 0
    with httpx2.Client(timeout=10.0) as client:
        for url in urls:
            r = client.get(url)
            r.raise_for_status()
            n_bytes += len(r.content)
    return {"mode": "urls-seq", "rows": len(urls), "seconds": time.perf_counter() - t0, "bytes": n_bytes}


def write_shards(out: Path, samples: int, per_shard: int = 1000) -> None:
    """``samples`` WebDataset samples (64 px PNG, caption, json) in shards of ``per_shard``."""
    import io
    import tarfile

    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(256):  # distinct images to decode; reused across samples
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (i, 255 - i, (i * 7) % 256)).save(buf, format="PNG")
        images.append(buf.getvalue())

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    for s in range(0, samples, per_shard):
        with tarfile.open(out / f"{s // per_shard:06d}.tar", "w") as tar:
            for i in range(s, min(s + per_shard, samples)):
                key = f"{i:09d}"
                add(tar, f"{key}.png", images[i % len(images)])
                add(tar, f"{key}.txt", f"sample {i}: a coloured square".encode())
                add(tar, f"{key}.json", json.dumps({"width": 64, "height": 64, "i": i}).encode())


def suite_webdataset(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in args.memory_rows.split(",") if s]
    print(f"webdataset bench: {sizes} samples, 1,000 per shard, {os.cpu_count()} CPUs, "
          f"load avg {os.getloadavg()[0]:.2f}", flush=True)
    results = {}
    for n in sizes:
        shards = Path(tempfile.mkdtemp(prefix="bench-wds-", dir=args.tmp))
        write_shards(shards, n)
        try:
            res = measure("wds", n, args, ("--path", str(shards)))
        finally:
            shutil.rmtree(shards, ignore_errors=True)
        results[n] = res
        print(f"  {n} samples: {res['rows_per_s']:.0f} rows/s ({res['seconds']:.1f} s, {res['shards']} tasks, "
              f"Ray start-up {res['ray_startup_s']:.1f} s), CPU {res['cpu_s']:.1f} s "
              f"(inside the ingest: {sum(res['window_cpu_s_by_role'].values()):.1f} s), "
              f"peak PSS {res['peak_pss_mib']:.0f} MiB", flush=True)
    if len(sizes) >= 2:
        print(f"peak memory {sizes[-1]} vs {sizes[0]} samples: "
              f"{results[sizes[-1]]['peak_pss_mib'] / results[sizes[0]]['peak_pss_mib']:.2f}×")
    if args.json:
        Path(args.json).write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))
    return 0


def suite_urls(args: argparse.Namespace) -> int:
    """Issue 26: the image server in its own process; the fetcher alone, the whole Ray ingest
    and the sequential loop over the same list (the loop on ``--seq-sample`` URLs)."""
    from bench.url_server import ServerProcess

    with ServerProcess(args.latency_ms) as server:
        work = Path(tempfile.mkdtemp(prefix="bench-urls-", dir=args.tmp))
        lst = work / "urls.jsonl"
        lst.write_text("".join(json.dumps({"url": f"{server.url}/img/{i}.png", "caption": f"image {i}"}) + "\n"
                               for i in range(args.urls)))
        load = os.getloadavg()[0]
        print(f"urls bench: {args.urls} URLs, +{args.latency_ms:g} ms per response from a server process of "
              f"its own, concurrency {args.concurrency} per task, {os.cpu_count()} CPUs, load avg {load:.2f}",
              flush=True)
        sample = min(args.seq_sample or args.urls, args.urls)
        runs = {}
        for mode, rows, extra in (
                ("urls-seq", sample, ("--seq-sample", str(sample))),
                ("urls-fetch", args.urls, ("--concurrency", str(args.concurrency))),
                ("urls", args.urls, ("--concurrency", str(args.concurrency), "--shard-kb", str(args.shard_kb)))):
            s0 = server.cpu_s()
            res = measure(mode, rows, args, ("--path", str(lst), *extra))
            res["server_cpu_s"] = round(server.cpu_s() - s0, 2)
            runs[mode] = res
        shutil.rmtree(work, ignore_errors=True)
    seq, alone, ray_res = runs["urls-seq"], runs["urls-fetch"], runs["urls"]
    seq_rate = seq["rows_per_s"]
    seq_wall = args.urls / seq_rate  # extrapolated per URL when the loop ran on a sample
    print(f"  sequential loop ({sample} URLs{', extrapolated per URL' if sample < args.urls else ''}): "
          f"{seq_rate:.1f} fetches/s ({seq['seconds']:.1f} s → {seq_wall:.0f} s for {args.urls}), "
          f"CPU {seq['cpu_s']:.1f} s, server CPU {seq['server_cpu_s']:.1f} s", flush=True)
    print(f"  fetcher alone (fetch_all, one process): {alone['rows_per_s']:.0f} fetches/s ({alone['seconds']:.1f} s), "
          f"CPU {alone['cpu_s']:.1f} s ({alone['cpu_s'] / args.urls * 1000:.2f} ms/URL), "
          f"server CPU {alone['server_cpu_s']:.1f} s → {alone['rows_per_s'] / seq_rate:.1f}×", flush=True)
    f = ray_res["fetch"]
    inside = sum(ray_res["window_cpu_s_by_role"].values())
    total = ray_res["seconds"] + ray_res["ray_startup_s"]
    print(f"  Ray URL ingest: {ray_res['rows_per_s']:.0f} fetches/s ({ray_res['seconds']:.1f} s, "
          f"{ray_res['shards']} tasks, {f['requests']} requests, {f['bytes']} bytes; Ray start-up "
          f"{ray_res['ray_startup_s']:.1f} s = {ray_res['ray_startup_s'] / total:.0%} of {total:.1f} s), "
          f"CPU {ray_res['cpu_s']:.1f} s (inside the ingest: {inside:.1f} s = "
          f"{inside / args.urls * 1000:.2f} ms/URL), server CPU {ray_res['server_cpu_s']:.1f} s, "
          f"peak PSS {ray_res['peak_pss_mib']:.0f} MiB", flush=True)
    ratio = {"fetcher": alone["rows_per_s"] / seq_rate, "ingest": ray_res["rows_per_s"] / seq_rate,
             "ingest_with_startup": ray_res["rows_per_s_with_startup"] / seq_rate}
    print(f"ratio vs the sequential loop: fetcher alone {ratio['fetcher']:.1f}×, Ray ingest {ratio['ingest']:.1f}× "
          f"(with Ray's start-up: {ratio['ingest_with_startup']:.1f}×)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "urls": args.urls, "latency_ms": args.latency_ms, "concurrency": args.concurrency,
            "shard_kb": args.shard_kb, "seq_sample": sample, "load_avg_start": load, "cpus": os.cpu_count(),
            "ratio": ratio, "sequential_extrapolated_s": seq_wall,
            "sequential": seq, "fetcher": alone, "ray": ray_res}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
