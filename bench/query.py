"""Vector query latency, throughput and recall: the ANN index ``ciea embed`` builds vs exact search.

What is measured
    ``--rows`` (1M) synthetic ``--dim`` (768) float32 unit vectors are written to a LanceDB
    table with the project's own code (:class:`pipelines.store.lance_tables.VectorTable`: the
    table schema, fragments of ``--rows-per-fragment`` rows as ``ciea embed`` writes them,
    one commit), and indexed the way ``ciea embed`` indexes: :func:`plan_ann_index` picks
    the IVF_PQ partitions / sub-vectors and :meth:`VectorTable.build_indexes` builds it
    (scalar and full-text indexes first, timed apart). Then, side by side in the same run:

    * **exact search**: LanceDB's brute-force scan (``bypass_vector_index()``), and numpy
      (``base @ q`` + ``argpartition`` over the same vectors in memory) as a reference;
    * **ANN search** (IVF_PQ) at every ``--nprobes`` x ``--refine`` point of a sweep, plus
      the point the index rule prescribes (``plan.nprobes``, ``plan.refine_factor``).

    For each: single-query p50 / p99 latency (one query per call, after ``--warmup``
    untimed calls), batch throughput (``--batch-size`` query vectors per call; Lance runs
    a multi-vector query, numpy one matrix product) and recall@10 against the exact top 10
    (numpy, float32). The operating point is the fastest sweep point (p50) whose recall@10
    reaches ``--recall-goal`` (0.95); speed-up = exact (LanceDB) p50 / ANN p50 there.

Data
    A two-level Gaussian mixture, so neighbours mean something (uniform random vectors
    in 768-d are all about equally far apart, the worst case for any index and unlike
    real embeddings): ``--clusters`` centres (1000) grouped in ``clusters / 20`` topics,
    cluster sizes log-normal (a few big clusters, many small ones); each cluster spreads
    along its own random ``--intrinsic-dim`` (16)-dim subspace (``--spread``) plus
    isotropic noise (``--noise``), then every vector is L2-normalised. With the defaults
    a vector's cosine to its centre is ~0.69 and a query's nearest neighbour in 1M is at
    cosine ~0.80, its 10th at ~0.73 (printed each run). Queries come from the same
    mixture with another seed: new points, not copies of base vectors. The clusters are
    well separated (a query's 10 neighbours share its cluster), so IVF finds them within
    a few probes and recall is limited by PQ, i.e. by the refine factor; real embeddings,
    whose neighbourhoods cross partition borders, need more probes than this data shows.

    The base vectors are generated in chunks straight into a ``.npy`` memory map under
    ``--work`` (1M x 768 = 2.9 GiB, the only copy: the Lance writer and the numpy side
    read it chunk by chunk) and reused by later runs with the same data settings, as are
    the exact answers. The table and index are rebuilt each run (the build is timed)
    unless ``--reuse-table``.

Outputs
    A line per measurement, a summary table, ``--json`` (every number) and a
    recall-vs-latency plot (``--plot``, default ``bench/results/query_recall_latency.png``;
    ``--quick`` writes it under ``--work``). Latencies on a machine shared with other
    work are inflated; recall is not affected.

Examples::

    python -m bench.query                        # 1M x 768, the full sweep (~40 min on a busy 2-core box)
    python -m bench.query --quick                # 50k vectors, a small sweep (a few minutes)
    python -m bench.query --reuse-table --nprobes 20,40 --refine 5,10   # re-sweep, no rebuild
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PLOT = REPO / "bench" / "results" / "query_recall_latency.png"
DEFAULT_WORK = Path("/tmp/ciea-bench-query")
TABLE_PREFIX = "bench_query"
MODEL_ID = "bench-query"
#: Lance table-metadata key where the build time of the index is kept (for ``--reuse-table``).
META_BUILD = "bench.query.build"


# ---------------------------------------------------------------------------------------
# Data: a clustered Gaussian mixture of unit vectors
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixtureSpec:
    """The synthetic data set (the module docstring explains the shape)."""

    rows: int = 1_000_000
    dim: int = 768
    clusters: int = 1000
    intrinsic_dim: int = 16
    spread: float = 1.0
    noise: float = 0.4
    seed: int = 0

    def key(self) -> str:
        """A short stable name for files and tables made from this spec."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return f"{self.rows}x{self.dim}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


class Mixture:
    """Draws vectors from the mixture: ``sample(n, stream)`` is deterministic per stream.

    Cluster ``c`` has a centre ``mu_c`` (near its topic's centre) and a basis ``B_c``
    (``dim x intrinsic_dim``, entries N(0, 1/dim)); a vector is
    ``normalise(mu_c + spread * B_c z + noise * e / sqrt(dim))`` with ``z ~ N(0, I/r)``,
    ``e ~ N(0, I)``: both offsets have norm ~``spread`` and ~``noise``.
    """

    def __init__(self, spec: MixtureSpec) -> None:
        if spec.rows < 1 or spec.dim < 2 or spec.clusters < 1 or spec.intrinsic_dim < 1:
            raise ValueError(f"bad mixture {spec}: rows, clusters, intrinsic_dim must be >= 1 and dim >= 2")
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 0])
        d, k, r = spec.dim, spec.clusters, spec.intrinsic_dim
        topics = _normalise(rng.standard_normal((max(1, k // 20), d), dtype=np.float32))
        # Centres of one topic have cosine ~0.5 with each other: topics, as real corpora have.
        centres = topics[rng.integers(0, len(topics), k)] + rng.standard_normal((k, d), dtype=np.float32) / np.float32(np.sqrt(d))
        self.centres = _normalise(centres).astype(np.float32, copy=False)
        weights = rng.lognormal(0.0, 0.5, k)
        self.weights = weights / weights.sum()
        self.bases = rng.standard_normal((k, d, r), dtype=np.float32) / np.float32(np.sqrt(d))

    def sample(self, n: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` unit vectors ``(n, dim)`` float32 and their cluster ids, from RNG stream ``stream``."""
        s = self.spec
        rng = np.random.default_rng([s.seed, 1, stream])
        ids = rng.choice(s.clusters, size=n, p=self.weights)
        x = self.centres[ids]  # a fresh (n, dim) array: fancy indexing copies
        z = rng.standard_normal((n, s.intrinsic_dim), dtype=np.float32) / np.float32(np.sqrt(s.intrinsic_dim))
        # One small matmul per cluster present (sorting groups the rows of each cluster).
        order = np.argsort(ids, kind="stable")
        bounds = np.flatnonzero(np.diff(ids[order])) + 1
        for rows in np.split(order, bounds):
            x[rows] += np.float32(s.spread) * (z[rows] @ self.bases[ids[rows[0]]].T)
        x += np.float32(s.noise / np.sqrt(s.dim)) * rng.standard_normal((n, s.dim), dtype=np.float32)
        return _normalise(x).astype(np.float32, copy=False), ids


def _normalise(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


#: RNG streams: base chunk i uses stream i; queries use this one (never a base stream).
QUERY_STREAM = 1 << 40


def generate_base(mixture: Mixture, path: Path, chunk: int = 65_536, progress: bool = True) -> np.ndarray:
    """Writes ``spec.rows`` vectors to a ``.npy`` memory map at ``path`` in chunks; returns it.

    Chunk ``i`` draws from RNG stream ``i``: the same spec and ``chunk`` give the same
    file. An existing complete file is reused (opened read-only).
    """
    from tqdm import tqdm

    s = mixture.spec
    if path.exists():
        base = np.load(path, mmap_mode="r")
        if base.shape == (s.rows, s.dim) and base.dtype == np.float32:
            return base
        raise SystemExit(f"{path} holds {base.shape} {base.dtype}, expected ({s.rows}, {s.dim}) float32: "
                         "delete it (or choose another --work) to regenerate")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(s.rows, s.dim))
    for i, start in enumerate(tqdm(range(0, s.rows, chunk), desc="generate base vectors", unit="chunk",
                                   disable=not progress)):
        n = min(chunk, s.rows - start)
        out[start:start + n] = mixture.sample(n, stream=i)[0]
    out.flush()
    del out
    tmp.rename(path)  # only a complete file carries the final name
    return np.load(path, mmap_mode="r")


def generate_queries(mixture: Mixture, n: int) -> np.ndarray:
    """``n`` query vectors from the same mixture, a stream no base chunk uses."""
    return mixture.sample(n, stream=QUERY_STREAM)[0]


# ---------------------------------------------------------------------------------------
# Exact answers and recall
# ---------------------------------------------------------------------------------------


def exact_topk(queries: np.ndarray, base: np.ndarray, k: int, chunk: int = 65_536,
               progress: bool = False) -> np.ndarray:
    """Indices ``(len(queries), k)`` of the ``k`` base rows of highest dot product, best first.

    Cosine similarity for unit vectors. Streams ``base`` in chunks (a memory map is read
    once), keeping a running top ``k`` per query, so memory is ``queries x chunk``.
    """
    from tqdm import tqdm

    if k > len(base):
        raise ValueError(f"k={k} is more than the {len(base)} base vectors")
    nq = len(queries)
    best_s = np.full((nq, 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((nq, 0), dtype=np.int64)
    for start in tqdm(range(0, len(base), chunk), desc="exact top-k (numpy)", unit="chunk", disable=not progress):
        scores = queries @ np.asarray(base[start:start + chunk]).T  # (nq, chunk)
        kk = min(k, scores.shape[1])
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        cand_s = np.concatenate([best_s, np.take_along_axis(scores, part, 1)], axis=1)
        cand_i = np.concatenate([best_i, part + start], axis=1)
        keep = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1)
    return best_i


def recall_at_k(found: Sequence[Sequence[int]], truth: np.ndarray, k: int) -> float:
    """Mean over queries of ``|found[q][:k] & truth[q][:k]| / k`` (missing results are misses).

    Raises:
        ValueError: when ``found`` and ``truth`` have different query counts, or ``truth``
            has fewer than ``k`` columns.
    """
    if len(found) != len(truth):
        raise ValueError(f"{len(found)} result lists for {len(truth)} queries")
    if truth.ndim != 2 or truth.shape[1] < k:
        raise ValueError(f"truth has shape {truth.shape}; it needs >= {k} columns for recall@{k}")
    if len(truth) == 0:
        raise ValueError("recall of zero queries is undefined")
    hits = [len(set(map(int, f[:k])) & set(map(int, t[:k]))) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits) / k)


# ---------------------------------------------------------------------------------------
# The LanceDB table, written and indexed as `ciea embed` does
# ---------------------------------------------------------------------------------------


def doc_id(i: int) -> str:
    return f"v{i:09d}"


def row_index(doc: str) -> int:
    """Inverse of :func:`doc_id`."""
    return int(doc[1:])


def _rows(base: np.ndarray, start: int, n: int, schema: Any) -> Any:
    """Rows ``start .. start+n`` as a table of the embedding schema (lineage columns filled)."""
    from datetime import datetime

    import pyarrow as pa

    dim = base.shape[1]
    vec = np.ascontiguousarray(base[start:start + n], dtype=np.float32)
    return pa.table({
        "doc_id": pa.array([doc_id(i) for i in range(start, start + n)]),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), dim),
        "modality": pa.array(["text"] * n), "text": pa.nulls(n, pa.string()), "caption": pa.nulls(n, pa.string()),
        "thumbnail": pa.nulls(n, pa.binary()), "content_sha256": pa.array(["0" * 64] * n),
        "model_id": pa.array([MODEL_ID] * n), "source_version": pa.array([0] * n, pa.int64()),
        "embedded_at": pa.array([datetime(2026, 1, 1)] * n, pa.timestamp("us")),
        "metadata": pa.nulls(n, pa.string())}, schema=schema)


def write_table(db: str, name: str, base: np.ndarray, rows_per_fragment: int = 16_384,
                progress: bool = True) -> Any:
    """A fresh :class:`VectorTable` holding ``base``, ``doc_id`` = :func:`doc_id` (row index).

    Fragments of ``rows_per_fragment`` rows (``ciea embed``'s ``write.rows_per_fragment``
    default), committed once, like the embedding job's distributed writer.
    """
    import pyarrow as pa
    from lance.fragment import write_fragments
    from tqdm import tqdm

    from pipelines.store.lance_tables import VectorTable

    vt = VectorTable(db, name)
    if vt.exists():
        vt.db.drop_table(name)
        vt = VectorTable(db, name)
    vt.create_if_missing(MODEL_ID, base.shape[1])
    ds = vt.dataset()

    def batches():
        for start in tqdm(range(0, len(base), rows_per_fragment), desc="write LanceDB table", unit="fragment",
                          disable=not progress):
            yield from _rows(base, start, min(rows_per_fragment, len(base) - start), ds.schema).to_batches()

    # Files of rows_per_fragment rows, streamed from the memory map; no commit until all are written.
    frags = write_fragments(pa.RecordBatchReader.from_batches(ds.schema, batches()), vt.uri, schema=ds.schema,
                            max_rows_per_file=rows_per_fragment, data_storage_version=ds.data_storage_version)
    vt.commit_fragments(frags)
    return vt


def build_indexes(vt: Any, plan: Any) -> dict[str, float]:
    """Builds the table's indexes as ``ciea embed`` does; seconds for the scalar/full-text
    indexes and for the ANN index apart (they are one call in the job)."""
    from pipelines.store.lance_tables import ANN_INDEX, META_INDEX_PLAN

    t = time.perf_counter()
    vt.build_indexes(None, None)  # no ANN plan: doc_id BTree + full-text indexes only
    scalar = time.perf_counter() - t
    t = time.perf_counter()
    vt.build_indexes(plan, None)
    ann = time.perf_counter() - t
    stats = vt.index_stats()[ANN_INDEX]
    if stats["indexed"] != plan.rows:
        raise RuntimeError(f"the ANN index covers {stats['indexed']} of {plan.rows} rows ({stats})")
    vt.update_metadata({META_INDEX_PLAN: plan.to_json(),
                        META_BUILD: json.dumps({"ann_seconds": ann, "scalar_seconds": scalar})})
    return {"ann_seconds": round(ann, 2), "scalar_seconds": round(scalar, 2)}


# ---------------------------------------------------------------------------------------
# Searches and timing
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchPoint:
    """One way to answer a query: exact (``nprobes`` 0) or IVF_PQ at ``nprobes`` / ``refine``."""

    nprobes: int = 0
    refine: int = 0  # 0: no re-ranking with the full vectors

    @property
    def exact(self) -> bool:
        return self.nprobes == 0

    @property
    def label(self) -> str:
        return "exact" if self.exact else f"nprobes={self.nprobes} refine={self.refine or 'none'}"


def lance_query(table: Any, q: np.ndarray, k: int, point: SearchPoint) -> Any:
    """The LanceDB query (vector search, cosine, top ``k``, ``doc_id`` only) for ``point``."""
    from pipelines.store.lance_tables import VECTOR

    b = table.search(q, vector_column_name=VECTOR).distance_type("cosine").limit(k).select(["doc_id", "_distance"])
    if point.exact:
        return b.bypass_vector_index()
    b = b.nprobes(point.nprobes)
    return b.refine_factor(point.refine) if point.refine else b


def lance_ids(result: Any, n_queries: int | None = None) -> list[list[int]]:
    """Row indices from a result table, per query when it came from a multi-vector query."""
    docs = [row_index(d) for d in result["doc_id"].to_pylist()]
    if n_queries is None:
        return [docs]
    out: list[list[int]] = [[] for _ in range(n_queries)]
    # Rows come grouped by query, best first within a query.
    for qi, d in zip(result["query_index"].to_pylist(), docs, strict=True):
        out[qi].append(d)
    return out


def time_single(fn: Callable[[np.ndarray], list[int]], queries: np.ndarray, warmup: int,
                desc: str = "", progress: bool = False) -> tuple[list[float], list[list[int]]]:
    """Per-query wall-clock seconds of ``fn(q)`` (after ``warmup`` untimed calls) and its answers."""
    from tqdm import tqdm

    for q in queries[:warmup]:
        fn(q)
    lat, found = [], []
    for q in tqdm(queries, desc=desc, unit="query", leave=False, disable=not progress):
        t = time.perf_counter()
        ids = fn(q)
        lat.append(time.perf_counter() - t)
        found.append(ids)
    return lat, found


def time_batches(fn: Callable[[np.ndarray], list[list[int]]], queries: np.ndarray,
                 batch_size: int) -> tuple[float, list[list[int]]]:
    """Queries/s of ``fn(batch)`` over ``queries`` in batches of ``batch_size``, and the answers."""
    found: list[list[int]] = []
    t = time.perf_counter()
    for start in range(0, len(queries), batch_size):
        found += fn(queries[start:start + batch_size])
    return len(queries) / (time.perf_counter() - t), found


def latency_stats(lat: Sequence[float]) -> dict[str, float]:
    a = np.asarray(lat) * 1000.0
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3),
            "mean_ms": round(float(a.mean()), 3), "n": len(a)}


def numpy_single(base: np.ndarray, k: int) -> Callable[[np.ndarray], list[int]]:
    """Exact top ``k`` of one query by numpy: one matrix-vector product over all of ``base``."""

    def search(q: np.ndarray) -> list[int]:
        s = base @ q
        top = np.argpartition(-s, k - 1)[:k]
        return top[np.argsort(-s[top])].tolist()

    return search


def numpy_batch(base: np.ndarray, k: int, chunk: int) -> Callable[[np.ndarray], list[list[int]]]:
    def search(qs: np.ndarray) -> list[list[int]]:
        return exact_topk(qs, base, k, chunk).tolist()

    return search


def measure(name: str, single: Callable, batch: Callable, queries: np.ndarray, truth: np.ndarray, k: int,
            warmup: int, batch_size: int, batch_queries: int | None = None,
            progress: bool = False) -> dict[str, Any]:
    """Latency, batch throughput and recall@k of one search method over ``queries``."""
    lat, found = time_single(single, queries, warmup, desc=name, progress=progress)
    nb = len(queries) if batch_queries is None else min(batch_queries, len(queries))
    qps, found_b = time_batches(batch, queries[:nb], min(batch_size, nb))
    res = {"method": name, **latency_stats(lat), "batch_qps": round(qps, 2), "batch_size": min(batch_size, nb),
           "batch_queries": nb, f"recall@{k}": round(recall_at_k(found, truth[:len(found)], k), 4),
           f"batch_recall@{k}": round(recall_at_k(found_b, truth[:nb], k), 4)}
    return res


# ---------------------------------------------------------------------------------------
# Sweep, operating point, plot
# ---------------------------------------------------------------------------------------


def sweep_points(nprobes: Sequence[int], refine: Sequence[int], partitions: int,
                 rule: SearchPoint | None = None) -> list[SearchPoint]:
    """Every ``nprobes x refine`` pair (nprobes capped at the partitions), plus the rule's point."""
    pts = {SearchPoint(min(n, partitions), r) for n in nprobes for r in refine}
    if rule is not None:
        pts.add(rule)
    return sorted(pts, key=lambda p: (p.refine, p.nprobes))


def operating_point(results: Sequence[dict[str, Any]], k: int, recall_goal: float) -> dict[str, Any] | None:
    """The ANN result with the lowest p50 among those with recall@k >= ``recall_goal``
    (ties: higher recall), or ``None`` when no point reaches the goal."""
    ok = [r for r in results if r[f"recall@{k}"] >= recall_goal]
    return min(ok, key=lambda r: (r["p50_ms"], -r[f"recall@{k}"])) if ok else None


def plot(results: Sequence[dict[str, Any]], exact: dict[str, Any], chosen: dict[str, Any] | None,
         rule: dict[str, Any] | None, k: int, recall_goal: float, latency_goal_ms: float, title: str,
         path: Path) -> None:
    """Recall@k vs p50 latency, one line per refine factor, nprobes beside each point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for refine in sorted({r["refine"] for r in results}):
        pts = sorted((r for r in results if r["refine"] == refine), key=lambda r: r["nprobes"])
        xs, ys = [r["p50_ms"] for r in pts], [r[f"recall@{k}"] for r in pts]
        ax.plot(xs, ys, "o-", label=f"IVF_PQ, refine {refine or 'none'}", ms=4)
        for r in pts:
            ax.annotate(str(r["nprobes"]), (r["p50_ms"], r[f"recall@{k}"]), fontsize=7,
                        xytext=(3, -9), textcoords="offset points")
    ax.plot([exact["p50_ms"]], [exact[f"recall@{k}"]], "ks", label=f"exact (LanceDB flat), {exact['p50_ms']:.0f} ms")
    if rule is not None:
        ax.plot([rule["p50_ms"]], [rule[f"recall@{k}"]], "D", mfc="none", mec="tab:red", ms=11,
                label=f"index rule ({rule['label']})")
    if chosen is not None:
        ax.plot([chosen["p50_ms"]], [chosen[f"recall@{k}"]], "*", color="gold", mec="k", ms=16,
                label=f"operating point ({chosen['label']})")
    ax.axhline(recall_goal, color="grey", ls="--", lw=0.8)
    ax.axvline(latency_goal_ms, color="grey", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("single-query p50 latency (ms, log scale)")
    ax.set_ylabel(f"recall@{k} vs exact top {k}")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"expected a comma-separated list of integers, got {text!r}") from None


def _emit(record: dict[str, Any]) -> None:
    """One JSON result line (``RESULT {...}``), easy to grep out of the log."""
    print("RESULT " + json.dumps(record, sort_keys=True), flush=True)


def neighbour_stats(queries: np.ndarray, base: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Mean cosine of the 1st and k-th exact neighbour: how clustered the data is."""
    first = np.einsum("qd,qd->q", queries, np.asarray(base[truth[:, 0]]))
    last = np.einsum("qd,qd->q", queries, np.asarray(base[truth[:, -1]]))
    return {"cos_nn1": round(float(first.mean()), 3), f"cos_nn{truth.shape[1]}": round(float(last.mean()), 3)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns every number (also printed as it goes)."""
    from pipelines.store.lance_tables import (
        META_INDEX_PLAN,
        VectorTable,
        plan_ann_index,
        plan_from_json,
    )

    progress = not args.no_progress
    k = args.k
    spec = MixtureSpec(rows=args.rows, dim=args.dim, clusters=args.clusters, intrinsic_dim=args.intrinsic_dim,
                       spread=args.spread, noise=args.noise, seed=args.seed)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"spec": dataclasses.asdict(spec), "load_1m_start": round(os.getloadavg()[0], 2),
                           "cpus": os.cpu_count(), "omp_threads": os.environ.get("OMP_NUM_THREADS")}
    print(f"query bench: {spec.rows} x {spec.dim} float32, {spec.clusters} clusters; {os.cpu_count()} CPUs, "
          f"load average {out['load_1m_start']:.2f}; work folder {work}", flush=True)

    # -- data and exact answers (cached by spec) --------------------------------------
    mixture = Mixture(spec)
    t = time.perf_counter()
    base = generate_base(mixture, work / f"base-{spec.key()}.npy", progress=progress)
    out["generate_seconds"] = round(time.perf_counter() - t, 1)
    queries = generate_queries(mixture, args.queries)
    truth_path = work / f"truth-{spec.key()}-q{args.queries}-k{k}.npy"
    if truth_path.exists():
        truth = np.load(truth_path)
    else:
        truth = exact_topk(queries, base, k, progress=progress)
        np.save(truth_path, truth)
    out["data"] = neighbour_stats(queries, base, truth)
    print(f"  data ready in {out['generate_seconds']} s; query → 1st / {k}th exact neighbour: cosine "
          f"{out['data']['cos_nn1']} / {out['data'][f'cos_nn{k}']}", flush=True)

    # -- table and index, as `ciea embed` builds them ----------------------------------
    plan = plan_ann_index(spec.rows, spec.dim)
    if plan is None:
        raise SystemExit(f"{spec.rows} rows of {spec.dim}-d: the index rule builds no ANN index below "
                         f"{2_000_000 // spec.dim} rows (exact search); use more --rows")
    if args.partitions or args.sub_vectors:
        # An experiment, not the rule: nprobes stays the rule's for these rows, capped at the partitions.
        parts = args.partitions or plan.num_partitions
        plan = dataclasses.replace(plan, num_partitions=parts, nprobes=min(plan.nprobes, parts),
                                   num_sub_vectors=args.sub_vectors or plan.num_sub_vectors)
    db = str(work / "lancedb")
    # One table per data set and index shape, so runs with other --partitions keep theirs.
    name = f"{TABLE_PREFIX}_{spec.key().replace('-', '_')}_p{plan.num_partitions}_s{plan.num_sub_vectors}"
    vt = VectorTable(db, name)
    reuse = (args.reuse_table and vt.exists() and vt.count_rows() == spec.rows
             and plan_from_json(vt.metadata().get(META_INDEX_PLAN)) == plan)
    if reuse:
        build = json.loads(vt.metadata().get(META_BUILD, "{}"))
        out["build"] = {**build, "reused": True}
        print(f"  reusing table {name} (index built earlier in {build.get('ann_seconds', float('nan')):.1f} s)")
    else:
        t = time.perf_counter()
        vt = write_table(db, name, base, args.rows_per_fragment, progress=progress)
        write_s = time.perf_counter() - t
        print(f"  wrote {spec.rows} rows in {write_s:.1f} s; building indexes "
              f"(IVF_PQ, {plan.num_partitions} partitions, {plan.num_sub_vectors} sub-vectors) ...", flush=True)
        out["build"] = {**build_indexes(vt, plan), "write_seconds": round(write_s, 2), "reused": False}
        print(f"  index build: ANN {out['build']['ann_seconds']:.1f} s "
              f"(doc_id + full-text indexes {out['build']['scalar_seconds']:.1f} s before it)", flush=True)
    out["plan"] = dataclasses.asdict(plan)
    _emit({"kind": "build", **out["build"], **{f"plan_{a}": b for a, b in out["plan"].items()}})
    table = vt.table

    # -- exact search: LanceDB flat scan, numpy reference ------------------------------
    nq_exact = min(args.exact_queries, len(queries))
    exact_pt = SearchPoint()

    def lance_single(point: SearchPoint) -> Callable[[np.ndarray], list[int]]:
        return lambda q: lance_ids(lance_query(table, q, k, point).to_arrow())[0]

    def lance_batch(point: SearchPoint) -> Callable[[np.ndarray], list[list[int]]]:
        return lambda qs: lance_ids(lance_query(table, qs, k, point).to_arrow(), len(qs))

    print(f"exact search, {nq_exact} queries after {args.exact_warmup} warm-up:", flush=True)
    exact = measure("exact (LanceDB)", lance_single(exact_pt), lance_batch(exact_pt), queries[:nq_exact], truth, k,
                    args.exact_warmup, args.batch_size, progress=progress)
    exact.update(nprobes=0, refine=0, label="exact")
    _emit({"kind": "exact_lance", **exact})
    ref = measure("exact (numpy)", numpy_single(base, k), numpy_batch(base, k, 65_536), queries[:nq_exact], truth,
                  k, args.exact_warmup, args.batch_size, batch_queries=len(queries), progress=progress)
    _emit({"kind": "exact_numpy", **ref})
    for r in (exact, ref):
        print(f"  {r['method']:<16} p50 {r['p50_ms']:9.2f} ms  p99 {r['p99_ms']:9.2f} ms  "
              f"batch {r['batch_qps']:9.2f} q/s  recall@{k} {r[f'recall@{k}']:.3f}", flush=True)
    out["exact"], out["exact_numpy"] = exact, ref

    # -- ANN sweep ----------------------------------------------------------------------
    rule_pt = SearchPoint(plan.nprobes, plan.refine_factor or 0)
    points = sweep_points(_ints(args.nprobes), _ints(args.refine), plan.num_partitions, rule_pt)
    print(f"IVF_PQ sweep: {len(points)} points x {len(queries)} queries ({args.warmup} warm-up each):", flush=True)
    results = []
    for pt in points:
        r = measure(pt.label, lance_single(pt), lance_batch(pt), queries, truth, k, args.warmup, args.batch_size,
                    progress=progress)
        r.update(nprobes=pt.nprobes, refine=pt.refine, label=pt.label, rule=pt == rule_pt,
                 speedup_p50=round(exact["p50_ms"] / r["p50_ms"], 1))
        results.append(r)
        _emit({"kind": "ann", **r})
        print(f"  {pt.label:<26} p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  batch {r['batch_qps']:8.1f} q/s"
              f"  recall@{k} {r[f'recall@{k}']:.4f}  speed-up {r['speedup_p50']:.0f}x"
              + ("  ← index rule" if pt == rule_pt else ""), flush=True)
    out["sweep"] = results
    chosen = operating_point(results, k, args.recall_goal)
    rule = next(r for r in results if r["rule"])
    out["operating_point"], out["rule_point"] = chosen, rule
    out["load_1m_end"] = round(os.getloadavg()[0], 2)

    # -- summary and plot ----------------------------------------------------------------
    print(summary(out, k, args.recall_goal, args.latency_goal_ms, args.speedup_goal), flush=True)
    plot_path = Path(args.plot) if args.plot else (work / "query_recall_latency.png" if args.quick else DEFAULT_PLOT)
    title = (f"{spec.rows:,} x {spec.dim} clustered unit vectors, IVF_PQ {plan.num_partitions} partitions x "
             f"{plan.num_sub_vectors} sub-vectors\n{len(queries)} queries, {os.cpu_count()} CPUs"
             f" (load {out['load_1m_start']:.1f}–{out['load_1m_end']:.1f})")
    plot(results, exact, chosen, rule, k, args.recall_goal, args.latency_goal_ms, title, plot_path)
    out["plot"] = str(plot_path)
    print(f"plot: {plot_path}", flush=True)
    return out


def summary(out: dict[str, Any], k: int, recall_goal: float, latency_goal_ms: float, speedup_goal: float) -> str:
    ex, ref, plan, b = out["exact"], out["exact_numpy"], out["plan"], out["build"]
    lines = [
        "",
        f"summary ({out['spec']['rows']:,} x {out['spec']['dim']}, load average {out['load_1m_start']:.1f} → "
        f"{out['load_1m_end']:.1f} on {out['cpus']} CPUs)",
        f"  index: IVF_PQ {plan['num_partitions']} partitions, {plan['num_sub_vectors']} sub-vectors; "
        f"built in {b.get('ann_seconds', float('nan')):.1f} s" + (" (earlier run, reused)" if b.get("reused") else ""),
        f"  {'method':<28} {'p50 ms':>9} {'p99 ms':>9} {'batch q/s':>10} {'recall@' + str(k):>9} {'speed-up':>9}",
    ]

    def row(name: str, r: dict[str, Any]) -> str:
        return (f"  {name:<28} {r['p50_ms']:9.2f} {r['p99_ms']:9.2f} {r['batch_qps']:10.1f} "
                f"{r[f'recall@{k}']:9.4f} {ex['p50_ms'] / r['p50_ms']:8.1f}x")

    lines += [row("exact, LanceDB flat", ex), row("exact, numpy (reference)", ref),
              row(f"rule: {out['rule_point']['label']}", out["rule_point"])]
    op = out["operating_point"]
    if op is None:
        lines.append(f"  no sweep point reaches recall@{k} >= {recall_goal}: widen --nprobes / --refine")
    else:
        lines.append(row(f"chosen: {op['label']}", op))
        ok = lambda c: "met" if c else "NOT met"  # noqa: E731
        lines.append(f"  goals: recall@{k} >= {recall_goal} at p50 <= {latency_goal_ms:g} ms: "
                     f"{ok(op['p50_ms'] <= latency_goal_ms)} ({op['p50_ms']:.2f} ms); speed-up >= {speedup_goal:g}x: "
                     f"{ok(ex['p50_ms'] / op['p50_ms'] >= speedup_goal)} ({ex['p50_ms'] / op['p50_ms']:.0f}x)")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.query", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = MixtureSpec()
    g = p.add_argument_group("data")
    g.add_argument("--rows", type=int, default=d.rows, help=f"base vectors (default {d.rows})")
    g.add_argument("--dim", type=int, default=d.dim, help=f"vector width (default {d.dim})")
    g.add_argument("--clusters", type=int, default=d.clusters, help=f"mixture centres (default {d.clusters})")
    g.add_argument("--intrinsic-dim", type=int, default=d.intrinsic_dim,
                   help=f"dimensions each cluster spreads along (default {d.intrinsic_dim})")
    g.add_argument("--spread", type=float, default=d.spread, help=f"in-cluster spread (default {d.spread})")
    g.add_argument("--noise", type=float, default=d.noise, help=f"isotropic noise (default {d.noise})")
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("queries")
    g.add_argument("--queries", type=int, default=1000, help="ANN queries (recall and latency; default 1000)")
    g.add_argument("--exact-queries", type=int, default=10, help="queries timed with exact search (default 10)")
    g.add_argument("--k", type=int, default=10, help="top k (default 10)")
    g.add_argument("--warmup", type=int, default=20, help="untimed ANN queries before each sweep point")
    g.add_argument("--exact-warmup", type=int, default=1, help="untimed exact queries before timing")
    g.add_argument("--batch-size", type=int, default=100, help="query vectors per call for batch q/s")
    g = p.add_argument_group("index and sweep")
    g.add_argument("--nprobes", default="5,10,20,30,50,80,120", help="comma list (capped at the partitions)")
    g.add_argument("--refine", default="0,1,2,5,10", help="comma list of refine factors; 0 = no re-ranking")
    g.add_argument("--partitions", type=int, default=0, help="override the rule's IVF partitions (experiments)")
    g.add_argument("--sub-vectors", type=int, default=0, help="override the rule's PQ sub-vectors (experiments)")
    g.add_argument("--rows-per-fragment", type=int, default=16_384, help="Lance fragment size (ciea embed's default)")
    g.add_argument("--reuse-table", action="store_true",
                   help="keep the table and index of an earlier run with the same data and plan (no rebuild)")
    g = p.add_argument_group("goals and outputs")
    g.add_argument("--recall-goal", type=float, default=0.95)
    g.add_argument("--latency-goal-ms", type=float, default=10.0)
    g.add_argument("--speedup-goal", type=float, default=20.0)
    g.add_argument("--work", default=str(DEFAULT_WORK), help=f"data, exact answers, table (default {DEFAULT_WORK})")
    g.add_argument("--plot", default=None, help=f"PNG path (default {DEFAULT_PLOT.relative_to(REPO)})")
    g.add_argument("--json", default=None, help="write every number here")
    g.add_argument("--quick", action="store_true",
                   help="50k vectors, 100 clusters, 200 queries, a small sweep: a few minutes")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


QUICK = {"rows": 50_000, "clusters": 100, "queries": 200, "exact_queries": 5, "nprobes": "5,10,20,40",
         "refine": "0,5,10"}


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    if args.quick:
        # --quick sets smaller defaults; flags given explicitly still win.
        given = {a.dest for a in p._actions if any(o.split("=")[0] in a.option_strings for o in argv)}
        for key, value in QUICK.items():
            if key not in given:
                setattr(args, key, value)
    if args.k < 1 or args.queries < 1 or args.exact_queries < 1 or args.batch_size < 1:
        raise SystemExit("--k, --queries, --exact-queries and --batch-size must be >= 1")
    out = run(args)
    out["args"] = vars(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
