"""``ciea embed`` on a real local Ray, a real Delta corpus and a real LanceDB table.

One module-scoped Ray and corpus (300 synthetic documents, tiny random-init checkpoints).
Each test writes its own table, except the ones that check what a first run left behind.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from embed_helpers import embedded_corpus, run_embed, synthetic_records, write_corpus
from PIL import Image

from ciea_model import load_checkpoint
from ciea_model.inference import encode_documents
from pipelines.index.build import SimulatedCrash
from pipelines.store.delta_tables import Tables
from pipelines.store.documents import batch_to_documents
from pipelines.store.lance_tables import VectorTable

pytestmark = pytest.mark.usefixtures("ray_local")

N_IMAGES, N_TEXTS = 200, 100


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    out = embedded_corpus(tmp_path_factory.mktemp("embed"), N_IMAGES, N_TEXTS, seeds=(0, 1))
    return {**out, "other": out["ckpt-1"]}


def _table(env, name: str) -> VectorTable:
    return VectorTable(str(env["root"] / "lancedb"), name)


def _rows(vt: VectorTable) -> dict[str, dict]:
    return {r["doc_id"]: r for r in vt.dataset().to_table().to_pylist()}


@pytest.fixture(scope="module")
def first_run(env):
    rc, summary = run_embed(env["tmp"], env["root"], env["ckpt"], "main",
                            "--set", "index.min_rows_for_ann=256")
    assert rc == 0
    return summary


def test_rows_equal_accepted_documents_and_vectors_match_in_process_encoding(env, first_run):
    vt = _table(env, "main")
    rows = _rows(vt)
    delta_table = Tables(str(env["root"])).read("documents")
    delta = delta_table.to_pylist()
    assert sorted(rows) == sorted(r["doc_id"] for r in delta)
    assert vt.count_rows() == len(delta) == N_IMAGES + N_TEXTS
    assert first_run["rows_written"] == len(delta) and first_run["skipped"] == 0

    model, processor = load_checkpoint(env["ckpt"])
    docs = batch_to_documents(delta_table).require()
    expected = encode_documents(model, processor, docs, batch_size=64)
    got = np.stack([np.asarray(rows[d.doc_id]["vector"], dtype=np.float32) for d in docs])
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)
    # A random-init model still separates documents: the comparison is not vacuous.
    assert np.abs(expected[0] - expected[1]).max() > 1e-3

    schema = vt.dataset().schema
    assert schema.field("vector").type == pa.list_(pa.float32(), 32)
    by_id = {r["doc_id"]: r for r in delta}
    for doc_id, row in rows.items():
        assert row["model_id"] == first_run["model_id"]
        assert row["source_version"] == first_run["source_version"] == 0
        assert row["content_sha256"] == by_id[doc_id]["content_sha256"]
        assert row["metadata"] == by_id[doc_id]["metadata"]
        if row["modality"] == "image":
            thumb = Image.open(io.BytesIO(row["thumbnail"]))
            assert thumb.format == "JPEG" and max(thumb.size) <= 96
            assert row["caption"] == by_id[doc_id]["caption"]
        else:
            assert row["thumbnail"] is None and row["text"] == by_id[doc_id]["text"]


def test_indexes_are_built_above_the_threshold_and_the_version_is_published(env, first_run):
    vt = _table(env, "main")
    stats = vt.index_stats()
    n = N_IMAGES + N_TEXTS
    assert stats["vector_idx"]["type"] == "IVF_PQ" and stats["vector_idx"]["indexed"] == n
    assert stats["doc_id_idx"]["type"] == "BTREE" and stats["doc_id_idx"]["indexed"] == n
    assert stats["text_idx"]["type"] == "FTS" and stats["caption_idx"]["type"] == "FTS"
    assert vt.published_version() == vt.version() == first_run["published_version"]
    assert first_run["tag"] in vt.table.tags.list()
    # The published version answers both kinds of query.
    one = vt.dataset().to_table(columns=["doc_id", "vector", "caption"], limit=1, filter="modality = 'image'")
    hit = vt.table.search(np.asarray(one["vector"][0].as_py(), np.float32)).limit(1).to_arrow()
    assert hit["doc_id"][0].as_py() == one["doc_id"][0].as_py()
    word = one["caption"][0].as_py().split()[-2]
    assert vt.table.search(word, query_type="fts", fts_columns="caption").limit(3).to_arrow().num_rows > 0


def test_below_the_threshold_no_ann_index_is_built(env, first_run):
    # The default threshold (100 000 rows) is far above this corpus: exact search only.
    # (This run also decodes images in CPU tasks beside the actor instead of inside it.)
    rc, summary = run_embed(env["tmp"], env["root"], env["ckpt"], "small", "--set", "preprocess.placement=tasks")
    assert rc == 0 and summary["ann_plan"] is None and summary["rows"] == N_IMAGES + N_TEXTS
    stats = _table(env, "small").index_stats()
    assert "vector_idx" not in stats and {"doc_id_idx", "text_idx", "caption_idx"} <= set(stats)


def test_a_second_run_is_a_no_op(env, first_run):
    vt = _table(env, "main")
    before = vt.version()
    rc, summary = run_embed(env["tmp"], env["root"], env["ckpt"], "main", "--set", "index.min_rows_for_ann=256")
    assert rc == 0
    assert summary["noop"] is True and summary["rows_written"] == 0 and summary["commits"] == 0
    assert summary["skipped"] == N_IMAGES + N_TEXTS
    assert vt.version() == before and vt.count_rows() == N_IMAGES + N_TEXTS


def test_a_different_model_id_is_refused(env, first_run, capsys):
    vt = _table(env, "main")
    before = vt.version()
    rc, summary = run_embed(env["tmp"], env["root"], env["other"], "main")
    assert rc == 2 and summary is None
    err = capsys.readouterr().err
    assert first_run["model_id"] in err and "never mixes two models" in err and "--table" in err
    assert vt.version() == before
    assert set(vt.dataset().to_table(columns=["model_id"])["model_id"].to_pylist()) == {first_run["model_id"]}


@pytest.mark.parametrize("mode", ["raise", "exit"])
def test_an_encoder_that_fails_once_still_ends_with_one_row_per_document(env, mode):
    marker = env["tmp"] / f"fault-{mode}"
    rc, summary = run_embed(env["tmp"], env["root"], env["ckpt"], f"fault_{mode}",
                            "--set", "fault.encoder_at_batch=3", "--set", f"fault.marker={marker}",
                            "--set", f"fault.encoder_mode={mode}")
    assert marker.exists(), "the fault never fired"
    assert rc == 0 and summary["rows_written"] == N_IMAGES + N_TEXTS
    ids = _table(env, f"fault_{mode}").dataset().to_table(columns=["doc_id"])["doc_id"].to_pylist()
    assert len(ids) == len(set(ids)) == N_IMAGES + N_TEXTS


#: The two places a run's plan is made: the driver's Arrow diff, and the hash-partitioned
#: Ray Data diff (``pipelines.index.keydiff``) that large corpora take.
ROUTES = {"driver": (), "ray": ("--set", "plan.distributed_min_rows=0", "--set", "plan.partitions=3")}
#: The Ray route's runs pay two hash shuffles each (≈ 1 min a test here): the slow tier, which
#: CI always runs; the loop keeps the driver route, and the unit tier the routes' equality.
ROUTE_PARAMS = [pytest.param("driver"), pytest.param("ray", marks=pytest.mark.slow)]


@pytest.mark.parametrize("route", ROUTE_PARAMS)
def test_a_crashed_run_resumes_with_only_the_missing_documents(env, route):
    name = f"resume-{route}"
    with pytest.raises(SimulatedCrash):
        run_embed(env["tmp"], env["root"], env["ckpt"], name, "--set", "write.commit_every_rows=64",
                  "--set", "write.rows_per_fragment=64", "--set", "fault.crash_after_commits=1", *ROUTES[route])
    vt = _table(env, name)
    done = vt.count_rows()
    assert 64 <= done < N_IMAGES + N_TEXTS
    assert vt.published_version() is None  # readers never saw the half-written table
    rc, summary = run_embed(env["tmp"], env["root"], env["ckpt"], name, *ROUTES[route])
    assert rc == 0 and summary["plan_route"] == route
    assert summary["skipped"] == done and summary["rows_written"] == N_IMAGES + N_TEXTS - done
    ids = vt.dataset().to_table(columns=["doc_id"])["doc_id"].to_pylist()
    assert len(ids) == len(set(ids)) == N_IMAGES + N_TEXTS
    assert vt.published_version() == vt.version()


@pytest.mark.parametrize("route", ROUTE_PARAMS)
def test_a_new_delta_version_embeds_only_new_and_changed_documents(env, tmp_path, route):
    root = tmp_path / "data"
    records = synthetic_records(20, 10, seed=5)
    write_corpus(root, records)
    rc, first = run_embed(tmp_path, root, env["ckpt"], "incr", *ROUTES[route])
    assert rc == 0 and first["rows_written"] == 30 and first["plan_route"] == route
    vt = VectorTable(str(root / "lancedb"), "incr")
    old = _rows(vt)
    # Version 1: one caption changed, one document gone, five new ones.
    changed = dict(records[0], caption="a completely different caption")
    more = [dict(r, doc_id=f"new-{i}") for i, r in enumerate(synthetic_records(4, 1, seed=9))]
    write_corpus(root, [changed, *records[2:], *more])
    assert Tables(str(root)).version("documents") == 1
    rc, second = run_embed(tmp_path, root, env["ckpt"], "incr", *ROUTES[route])
    assert rc == 0
    assert second["source_version"] == 1 and second["rows_written"] == 6 and second["skipped"] == 28
    assert second["deleted_stale"] == 2
    rows = _rows(vt)
    assert sorted(rows) == sorted([changed["doc_id"], *(r["doc_id"] for r in records[2:]), *(m["doc_id"] for m in more)])
    assert rows[changed["doc_id"]]["caption"] == "a completely different caption"
    assert rows[changed["doc_id"]]["source_version"] == 1
    assert rows[records[2]["doc_id"]]["source_version"] == 0  # untouched rows keep their lineage
    assert rows[records[2]["doc_id"]]["vector"] == old[records[2]["doc_id"]]["vector"]
    # The previously published version is still there to read, unchanged.
    import lance  # after ray.init (lance is not fork-safe)

    assert len(lance.dataset(vt.uri, version=first["published_version"]).to_table()) == 30
