"""``bench/query.py``: recall and exact top-k by hand, the synthetic mixture, and a tiny
end-to-end run (5 000 vectors in a real LanceDB table indexed by the project's rule)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lance
import numpy as np
import pytest

# bench/ is not an installed package (pyproject installs ciea_model, pipelines, jobs);
# `python -m pytest` puts the repository root on sys.path, the `pytest` script does not.
_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from bench import query as Q  # noqa: E402
from pipelines.store.lance_tables import ANN_INDEX, VectorTable, plan_ann_index  # noqa: E402


def test_recall_at_k_by_hand():
    truth = np.array([[0, 1, 2], [3, 4, 5]])
    # Query 0 finds 2 of its 3 neighbours, query 1 all three in another order: (2/3 + 3/3) / 2.
    assert Q.recall_at_k([[0, 1, 9], [5, 4, 3]], truth, 3) == pytest.approx(5 / 6)
    # Fewer results than k count as misses; only the first k of a longer list count.
    assert Q.recall_at_k([[0], [3, 4, 5]], truth, 3) == pytest.approx((1 / 3 + 1) / 2)
    assert Q.recall_at_k([[9, 0], [3, 9]], truth, 1) == pytest.approx(0.5)
    assert Q.recall_at_k([[2, 1, 0], [5, 3, 4]], truth, 3) == 1.0
    with pytest.raises(ValueError, match="2 result lists for 1 queries"):
        Q.recall_at_k([[0], [1]], truth[:1], 1)
    with pytest.raises(ValueError, match="needs >= 4 columns"):
        Q.recall_at_k([[0], [1]], truth, 4)


def test_exact_topk_streams_chunks_and_matches_a_full_sort():
    rng = np.random.default_rng(3)
    base = rng.standard_normal((1000, 16)).astype(np.float32)
    queries = rng.standard_normal((7, 16)).astype(np.float32)
    want = np.argsort(-(queries @ base.T), axis=1, kind="stable")[:, :5]
    # 128 does not divide 1000: the last chunk is short, and every chunk merges into the running top 5.
    np.testing.assert_array_equal(Q.exact_topk(queries, base, 5, chunk=128), want)
    np.testing.assert_array_equal(Q.exact_topk(queries, base, 5, chunk=4), want)
    with pytest.raises(ValueError, match="k=1001"):
        Q.exact_topk(queries, base, 1001)


def test_mixture_is_deterministic_normalised_float32_and_clustered():
    spec = Q.MixtureSpec(rows=3000, dim=64, clusters=12, seed=5)
    mix = Q.Mixture(spec)
    x, ids = mix.sample(3000, stream=0)
    assert x.dtype == np.float32 and x.shape == (3000, 64)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(Q.Mixture(spec).sample(3000, stream=0)[0], x)  # same spec, same vectors
    assert not np.allclose(mix.sample(10, stream=1)[0], x[:10])
    # Vectors sit near their own centre, nearer to it than to any other.
    cos = x @ mix.centres.T
    assert cos[np.arange(len(x)), ids].mean() > 0.6
    assert (np.argmax(cos, axis=1) == ids).mean() > 0.95
    # Queries come from the same mixture but are new points, and their neighbours share their cluster.
    queries = Q.generate_queries(mix, 50)
    top = Q.exact_topk(queries, x, 10)
    assert (queries @ x.T).max() < 0.999
    q_ids = np.argmax(queries @ mix.centres.T, axis=1)
    assert (ids[top] == q_ids[:, None]).mean() > 0.9


def test_generate_base_writes_a_memory_map_once_and_refuses_a_mismatched_file(tmp_path):
    spec = Q.MixtureSpec(rows=1000, dim=32, clusters=4)
    path = tmp_path / "base.npy"
    base = Q.generate_base(Q.Mixture(spec), path, chunk=300, progress=False)
    assert isinstance(base, np.memmap) and base.shape == (1000, 32)
    # Chunk i is stream i: the file is the concatenation of those samples.
    np.testing.assert_array_equal(base[300:600], Q.Mixture(spec).sample(300, stream=1)[0])
    mtime = path.stat().st_mtime_ns
    again = Q.generate_base(Q.Mixture(spec), path, chunk=300, progress=False)
    assert path.stat().st_mtime_ns == mtime and np.array_equal(again, base)
    with pytest.raises(SystemExit, match="delete it"):
        Q.generate_base(Q.Mixture(Q.MixtureSpec(rows=999, dim=32, clusters=4)), path, progress=False)


def test_sweep_points_and_operating_point():
    rule = Q.SearchPoint(20, 10)
    pts = Q.sweep_points([5, 50], [0, 10], partitions=30, rule=rule)
    assert pts == [Q.SearchPoint(5, 0), Q.SearchPoint(30, 0), Q.SearchPoint(5, 10), Q.SearchPoint(20, 10),
                   Q.SearchPoint(30, 10)]  # 50 probes capped at the 30 partitions
    results = [{"p50_ms": 2.0, "recall@10": 0.90}, {"p50_ms": 4.0, "recall@10": 0.96},
               {"p50_ms": 4.0, "recall@10": 0.99}, {"p50_ms": 9.0, "recall@10": 1.0}]
    assert Q.operating_point(results, 10, 0.95) == {"p50_ms": 4.0, "recall@10": 0.99}
    assert Q.operating_point(results, 10, 1.01) is None


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The whole benchmark at 5 000 x 768 (the smallest size the index rule indexes at 768-d)."""
    work = tmp_path_factory.mktemp("bench-query")
    args = ["--rows", "5000", "--clusters", "20", "--queries", "40", "--exact-queries", "3", "--warmup", "2",
            "--nprobes", "1,100", "--refine", "0,10", "--batch-size", "16", "--rows-per-fragment", "1024",
            "--work", str(work), "--plot", str(work / "plot.png"), "--json", str(work / "out.json"),
            "--no-progress"]
    assert Q.main(args) == 0
    return work, args, json.loads((work / "out.json").read_text())


def test_tiny_run_indexes_by_the_rule_and_measures_recall_against_exact_search(tiny_run):
    work, _, out = tiny_run
    plan = plan_ann_index(5000, 768)
    assert out["plan"]["num_partitions"] == plan.num_partitions and out["build"]["ann_seconds"] > 0
    # LanceDB's flat scan and numpy agree with the exact answers the recall is measured against.
    assert out["exact"]["recall@10"] == 1.0 and out["exact"]["batch_recall@10"] == 1.0
    assert out["exact_numpy"]["recall@10"] == 1.0 and out["exact_numpy"]["batch_recall@10"] == 1.0
    sweep = {(r["nprobes"], r["refine"]): r for r in out["sweep"]}
    assert set(sweep) == {(1, 0), (1, 10), (plan.num_partitions, 0), (plan.num_partitions, 10),
                          (plan.nprobes, plan.refine_factor)}
    assert [r["label"] for r in out["sweep"] if r["rule"]] == [Q.SearchPoint(plan.nprobes, plan.refine_factor).label]
    every = sweep[(plan.num_partitions, 10)]  # all partitions, re-ranked: near exact
    assert every["recall@10"] >= 0.9 and every["recall@10"] >= sweep[(1, 0)]["recall@10"]
    for r in out["sweep"]:
        assert 0 < r["recall@10"] <= 1 and r["p50_ms"] <= r["p99_ms"] and r["batch_qps"] > 0
        assert r["batch_recall@10"] == pytest.approx(r["recall@10"], abs=0.05)  # multi-vector query, same index
    assert (work / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiny_run_table_maps_doc_ids_to_the_generated_rows(tiny_run):
    work, _, out = tiny_run
    base = np.load(next(work.glob("base-*.npy")), mmap_mode="r")
    [name] = VectorTable(str(work / "lancedb"), "x").db.list_tables().tables
    vt = VectorTable(str(work / "lancedb"), name)
    assert vt.count_rows() == 5000 and vt.index_stats()[ANN_INDEX]["indexed"] == 5000
    rows = lance.dataset(vt.uri).take([0, 1234, 4999], columns=["doc_id", "vector"]).to_pylist()
    for r in rows:
        np.testing.assert_array_equal(np.asarray(r["vector"], np.float32), base[Q.row_index(r["doc_id"])])


def test_reuse_table_skips_the_build(tiny_run, capsys):
    work, args, _ = tiny_run
    out = work / "again.json"
    rerun = [a if a != str(work / "out.json") else str(out) for a in args]
    assert Q.main([*rerun, "--reuse-table", "--nprobes", "1", "--refine", "0"]) == 0
    again = json.loads(out.read_text())
    assert again["build"]["reused"] is True and "reusing table" in capsys.readouterr().out


def test_too_few_rows_for_an_index_names_the_fix(tmp_path):
    with pytest.raises(SystemExit, match="use more --rows"):
        Q.main(["--rows", "1000", "--clusters", "5", "--queries", "5", "--work", str(tmp_path), "--no-progress"])
