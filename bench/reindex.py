"""Incremental re-index vs full rebuild: what ``ciea reindex`` saves when 1 % of a corpus
changes.

What is measured
    A corpus of ``--docs`` synthetic documents (2/3 image with small inline PNGs, 1/3
    text) is written to Delta (version 0) and embedded into a LanceDB table with the
    ``tiny`` preset checkpoint by ``jobs.embed.run`` — indexes included (BTree, two FTS, and
    IVF_PQ once the rule asks for one): that is the **full rebuild**. Then ``--changed``
    (default 1 %) of the documents change in three Delta commits, as ingest writes them:
    updates (a merge that rewrites captions/texts), deletes, inserts of new doc_ids, in
    the proportions ``--mix``. ``jobs.reindex.run`` brings the table to the new version:
    the **re-index** (change feed → delete → embed the changed documents on Ray → commit →
    fold into the indexes → record → publish). Both are timed end to end by the jobs'
    own summaries (Ray start-up excluded from both: one local Ray serves the run).

    Printed: both times, their ratio (goal <= 0.05), and the re-embedded count against
    the number of inserted + updated documents (they must be equal: only the changed
    documents are embedded). ``--verify`` also embeds the new version into a fresh table
    and checks that the re-indexed table has the same ids and vectors.

Examples::

    python -m bench.reindex --docs 10000                 # a few minutes on 2 cores
    python -m bench.reindex --docs 100000 --json reindex.json   # the recorded run
    python -m bench.reindex --docs 2000 --verify
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.embed_throughput import make_checkpoint, make_corpus


def _encode_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"device": "cpu", "batch_size": args.batch_size, "actors": 1, "cpus_per_actor": 1, "threads": args.threads}


def full_build(root: str, checkpoint: str, db: str, table: str, args: argparse.Namespace) -> dict[str, Any]:
    from jobs.embed import EmbedConfig, load_model_facts, run

    cfg = EmbedConfig.model_validate({
        "input": {"root": root}, "model": {"checkpoint": checkpoint},
        "output": {"db": db, "table": table, "run_dir": str(Path(db) / "runs")},
        "encode": _encode_settings(args), "preprocess": {"thumbnail_px": args.thumbnail_px},
        "progress": False})
    return run(cfg, load_model_facts(checkpoint))


def reindex(root: str, checkpoint: str, db: str, table: str, args: argparse.Namespace) -> dict[str, Any]:
    from jobs.embed import load_model_facts
    from jobs.reindex import ReindexConfig, run

    cfg = ReindexConfig.model_validate({
        "input": {"root": root}, "model": {"checkpoint": checkpoint},
        "output": {"db": db, "table": table, "run_dir": str(Path(db) / "runs")},
        "encode": _encode_settings(args), "preprocess": {"thumbnail_px": args.thumbnail_px},
        "progress": False})
    return run(cfg, load_model_facts(checkpoint))


def change_corpus(root: str, n_changed: int, mix: tuple[float, float, float], seed: int,
                  image_size: int) -> dict[str, int]:
    """Updates, deletes and inserts ``n_changed`` documents in three Delta commits."""
    import hashlib

    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    from pipelines.ingest import schema as S
    from pipelines.ingest.delta_store import Tables, plain_types

    uri = Tables(root).documents
    rng = random.Random(seed)
    n_upd = round(n_changed * mix[0])
    n_del = round(n_changed * mix[1])
    n_ins = n_changed - n_upd - n_del
    current = plain_types(pa.table(DeltaTable(uri).to_pyarrow_table()))
    picked = rng.sample(range(current.num_rows), n_upd + n_del)
    upd = current.take(picked[:n_upd]).to_pylist()
    for r in upd:
        if r[S.MODALITY] == "image":
            r[S.CAPTION] = (r[S.CAPTION] or "") + " (re-captioned)"
        else:
            r[S.TEXT] = (r[S.TEXT] or "") + " (revised)"
        r[S.CONTENT_SHA256] = hashlib.sha256(json.dumps([r[S.TEXT], r[S.CAPTION]]).encode()
                                             + (r[S.IMAGE] or b"")).hexdigest()
    (DeltaTable(uri).merge(pa.Table.from_pylist(upd, schema=S.DOCUMENTS_SCHEMA), "t.doc_id = s.doc_id",
                           source_alias="s", target_alias="t")
     .when_matched_update_all().execute())
    gone = current.take(picked[n_upd:])[S.DOC_ID].to_pylist()
    DeltaTable(uri).delete(f"{S.DOC_ID} IN ({', '.join(repr(d) for d in gone)})")
    new = current.take(rng.sample(range(current.num_rows), n_ins)).to_pylist()
    for i, r in enumerate(new):
        r[S.DOC_ID] = f"bench-new-{i:07d}"
    write_deltalake(uri, pa.Table.from_pylist(new, schema=S.DOCUMENTS_SCHEMA), mode="append")
    return {"updated": n_upd, "deleted": n_del, "inserted": n_ins}


def verify(db: str, a: str, b: str) -> dict[str, Any]:
    import lance
    import numpy as np

    from pipelines.lance_store import VectorTable

    def rows(name: str) -> dict[str, Any]:
        t = lance.dataset(VectorTable(db, name).uri).to_table(columns=["doc_id", "vector"])
        return dict(zip(t["doc_id"].to_pylist(), t["vector"].to_numpy(zero_copy_only=False)))

    ra, rb = rows(a), rows(b)
    same_ids = sorted(ra) == sorted(rb)
    err = max((float(np.abs(np.asarray(ra[d]) - np.asarray(rb[d])).max()) for d in ra if d in rb), default=0.0)
    return {"same_ids": same_ids, "max_abs_vector_diff": err}


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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verify", action="store_true", help="also embed the new version afresh and compare")
    p.add_argument("--workdir", help="keep the corpus and tables here (default: a temp folder, removed)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    mix = tuple(float(x) for x in args.mix.split(","))
    if len(mix) != 3 or abs(sum(mix) - 1) > 1e-6 or min(mix) < 0:
        raise SystemExit(f"--mix {args.mix}: three non-negative shares (update,delete,insert) that sum to 1")
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
        full = full_build(root, ckpt, db, "docs", args)
        n_changed = max(1, round(args.docs * args.changed))
        changes = change_corpus(root, n_changed, mix, args.seed, args.image_size)  # type: ignore[arg-type]
        inc = reindex(root, ckpt, db, "docs", args)
        expected_embedded = changes["updated"] + changes["inserted"]
        out: dict[str, Any] = {
            "docs": args.docs, "changed": n_changed, **changes, "setup_seconds": round(setup_s, 1),
            "full_rebuild_seconds": full["seconds"], "full_embed_seconds": full["embed_seconds"],
            "full_index_seconds": full.get("index_seconds"), "reindex_seconds": inc["seconds"],
            "reindex_embed_seconds": inc["embed_seconds"], "reindex_index_seconds": inc.get("index_seconds"),
            "ratio": round(inc["seconds"] / full["seconds"], 4), "reembedded": inc["embedded"],
            "expected_reembedded": expected_embedded, "rows_deleted": inc["deleted"], "method": inc["method"],
            "ann_plan": full.get("ann_plan"), "indexes": inc.get("indexes"), "load_avg": os.getloadavg()[0],
        }
        if args.verify:
            full_new = full_build(root, ckpt, db, "check", args)
            out["verify"] = verify(db, "docs", "check")
            out["full_rebuild_new_version_seconds"] = full_new["seconds"]
        print(f"corpus {args.docs} documents; changed {n_changed} = {changes['updated']} updated + "
              f"{changes['deleted']} deleted + {changes['inserted']} inserted")
        print(f"full rebuild  {full['seconds']:8.1f} s  (embed {full['embed_seconds']} s, indexes "
              f"{full.get('index_seconds')} s)")
        print(f"re-index      {inc['seconds']:8.1f} s  (embed {inc['embed_seconds']} s, indexes "
              f"{inc.get('index_seconds')} s, {inc['method']})")
        print(f"ratio         {out['ratio']:.4f}   (goal <= 0.05)")
        print(f"re-embedded   {inc['embedded']} of {expected_embedded} inserted+updated "
              f"({'equal' if inc['embedded'] == expected_embedded else 'NOT EQUAL'}); rows deleted {inc['deleted']}")
        if "verify" in out:
            print(f"verify        same ids: {out['verify']['same_ids']}, max |Δvector| "
                  f"{out['verify']['max_abs_vector_diff']:.2e}")
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
        return 0 if inc["embedded"] == expected_embedded else 1
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
