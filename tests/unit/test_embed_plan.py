"""The embedding stage's pure parts: the resume diff, the ANN index rule, the table schema,
the preprocessing UDF and the job's resource check (no Ray)."""

from __future__ import annotations

import io
import math

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from jobs.embed import EmbedConfig, resolve_resources
from pipelines.index.embed import ERROR, PIXELS, plan_work, preprocess_batch
from pipelines.store.lance_tables import plan_ann_index, table_schema
from pipelines.store.schema import CONTENT_SHA256, DOC_ID


def keys(*pairs: tuple[str, str]) -> pa.Table:
    return pa.table({DOC_ID: [p[0] for p in pairs], CONTENT_SHA256: [p[1] for p in pairs]})


def test_plan_on_an_empty_table_embeds_everything():
    plan = plan_work(keys(("a", "1"), ("b", "2")), keys())
    assert plan.all_documents and plan.to_embed.to_pylist() == ["a", "b"] and plan.stale == []


def test_plan_skips_present_pairs_and_replaces_changed_deleted_and_duplicated_rows():
    source = keys(("a", "1"), ("b", "2-new"), ("c", "3"), ("d", "4"), ("e", "5"))
    table = keys(("a", "1"), ("b", "2-old"), ("gone", "9"), ("d", "4"), ("d", "4"))
    plan = plan_work(source, table)
    assert sorted(plan.to_embed.to_pylist()) == ["b", "c", "d", "e"]
    assert plan.stale == ["b", "d", "gone"]
    assert plan.skipped == 1 and plan.documents == 5 and not plan.all_documents


def test_plan_of_an_up_to_date_table_is_empty():
    t = keys(("a", "1"), ("b", "2"))
    plan = plan_work(t, t)
    assert len(plan.to_embed) == 0 and plan.stale == [] and plan.skipped == 2


@pytest.mark.parametrize(("rows", "dim", "parts", "subs", "refine"), [
    (100_000, 768, 316, 48, 5),
    (1_000_000, 768, 1000, 48, 5),
    (10_000_000, 384, 3162, 24, 5),
    (300, 32, 1, 2, 5),
    (5_000, 40, 19, 5, 5),  # 40 = 8 x 5: 8-dim sub-vectors → refine 5
    (5_000, 30, 19, 1, 20),  # 30 is not a multiple of 8: one code for the whole vector
])
def test_ann_rule(rows, dim, parts, subs, refine):
    plan = plan_ann_index(rows, dim, min_rows=256)
    assert (plan.num_partitions, plan.num_sub_vectors, plan.refine_factor) == (parts, subs, refine)
    assert plan.num_partitions * 256 <= rows  # every centroid trains on >= 256 vectors
    assert plan.nprobes == min(plan.num_partitions, max(20, math.ceil(parts / 50)))


def test_no_ann_index_while_exact_search_is_as_fast_or_below_256_rows():
    # 2M floats scanned per query: 2 604 rows at 768-d, 62 500 at 32-d.
    assert plan_ann_index(2_603, 768) is None and plan_ann_index(2_604, 768) is not None
    assert plan_ann_index(62_499, 32) is None and plan_ann_index(62_500, 32) is not None
    # Very wide vectors: 2M / 20 000 = 100 rows, but never below 256.
    assert plan_ann_index(255, 20_000) is None and plan_ann_index(256, 20_000) is not None
    assert plan_ann_index(255, 32, min_rows=1) is None
    hnsw = plan_ann_index(200_000, 768, kind="ivf_hnsw_sq")
    assert hnsw.kind == "ivf_hnsw_sq" and hnsw.num_sub_vectors is None and hnsw.refine_factor is None


def test_table_schema_stores_vectors_as_fixed_size_float32_lists():
    schema = table_schema(48)
    assert schema.field("vector").type == pa.list_(pa.float32(), 48)
    assert {"doc_id", "modality", "text", "caption", "thumbnail", "content_sha256", "model_id",
            "source_version", "embedded_at", "metadata"} <= set(schema.names)
    assert not schema.field("model_id").nullable and schema.field("thumbnail").type == pa.binary()


def _png(color, size=(40, 20)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def test_preprocess_transforms_images_makes_thumbnails_and_flags_unreadable_ones():
    from ciea_model.processor import ImageTransform

    transform = ImageTransform(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    batch = pa.table({
        "doc_id": ["i", "t", "bad"], "modality": ["image", "text", "image"], "text": [None, "hi", None],
        "caption": ["red", None, "x"], "image": pa.array([_png((255, 0, 0)), None, b"not an image"]),
        "image_uri": pa.array([None, None, None], pa.string()), "metadata": [None, None, None],
        "content_sha256": ["1", "2", "3"]})
    out = preprocess_batch(batch, transform, 3 * 8 * 8, thumbnail_px=16, thumbnail_quality=70)
    assert out[DOC_ID].to_pylist() == ["i", "t", "bad"]
    pixels = out[PIXELS].to_pylist()
    np.testing.assert_allclose(pixels[0], transform(_png((255, 0, 0))).numpy().reshape(-1), atol=1e-6)
    assert pixels[1] is None and pixels[2] is None
    thumb = Image.open(io.BytesIO(out["thumbnail"][0].as_py()))
    assert thumb.format == "JPEG" and thumb.size == (16, 8)
    errors = out[ERROR].to_pylist()
    assert errors[0] is None and errors[1] is None and "image" in errors[2]


def test_resources_obey_the_two_cpu_deadlock_rule():
    cfg = EmbedConfig.model_validate({"model": {"checkpoint": "x"}})
    # CPU default: one single-thread actor per CPU, their reservations leaving 1 CPU for tasks.
    assert resolve_resources(cfg, {"CPU": 2}) == {
        "device": "cpu", "actors": 2, "cpus_per_actor": 0.5, "gpus_per_actor": 0.0, "threads": 1}
    assert resolve_resources(cfg, {"CPU": 16}) == {
        "device": "cpu", "actors": 16, "cpus_per_actor": 15 / 16, "gpus_per_actor": 0.0, "threads": 1}
    with pytest.raises(SystemExit, match="wait forever"):
        resolve_resources(cfg, {"CPU": 1})
    three = EmbedConfig.model_validate({"model": {"checkpoint": "x"}, "encode": {"actors": 3}})
    assert resolve_resources(three, {"CPU": 4})["cpus_per_actor"] == 1.0
    one = EmbedConfig.model_validate({"model": {"checkpoint": "x"}, "encode": {"cpus_per_actor": 1, "threads": 2}})
    assert resolve_resources(one, {"CPU": 2}) == {
        "device": "cpu", "actors": 1, "cpus_per_actor": 1.0, "gpus_per_actor": 0.0, "threads": 2}
    assert resolve_resources(cfg, {"CPU": 16, "GPU": 2})["actors"] == 2
    bad = EmbedConfig.model_validate({"model": {"checkpoint": "x"}, "encode": {"actors": 2, "cpus_per_actor": 1}})
    with pytest.raises(SystemExit, match="wait forever.*cpus_per_actor <= 0.50"):
        resolve_resources(bad, {"CPU": 2})
    half = EmbedConfig.model_validate({"model": {"checkpoint": "x"}, "encode": {"actors": 2, "cpus_per_actor": 0.5}})
    assert resolve_resources(half, {"CPU": 2})["actors"] == 2
    gpu = EmbedConfig.model_validate({"model": {"checkpoint": "x"}, "encode": {"device": "cuda"}})
    with pytest.raises(SystemExit, match="no GPU"):
        resolve_resources(gpu, {"CPU": 2})


def test_config_requires_a_checkpoint_and_names_the_flag():
    with pytest.raises(ValueError, match="--checkpoint"):
        EmbedConfig.model_validate({})


def test_help_documents_every_config_key(capsys):
    from jobs.common import config_keys
    from jobs.embed import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    keys = [line.split("=")[0].strip() for line in config_keys(EmbedConfig) if "=" in line.split("\n")[0]]
    assert len(keys) > 20
    for key in keys:
        assert key in out


def test_a_missing_corpus_or_version_names_the_fix(tmp_path):
    import pyarrow as pa
    from deltalake import write_deltalake

    from pipelines.index.embed import EmbedError, resolve_source
    from pipelines.store.delta_tables import Tables

    with pytest.raises(EmbedError, match="run `ciea ingest"):
        resolve_source(Tables(str(tmp_path / "nope")), None)
    tables = Tables(str(tmp_path / "t"))
    write_deltalake(tables.documents, pa.table({"x": [1]}))
    assert resolve_source(tables, None) == 0
    with pytest.raises(EmbedError, match="versions 0..0; --version 3 does not exist"):
        resolve_source(tables, 3)
