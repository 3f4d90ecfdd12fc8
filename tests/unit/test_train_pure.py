"""The pure parts of the distributed training stage (no Ray): the example plan (positive
and hard-negative rules), exact running top-k mining, the resume identity and its refusal
message, the job config's validation, and the in-batch accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from ciea_model.processor import Document, TrainExample
from pipelines.train.config import (
    CheckpointMismatchError,
    TrainJobConfig,
    check_identity,
    resume_identity,
)
from pipelines.train.dataset import expand_epochs, plan_examples, rows_to_examples, with_visit_order
from pipelines.train.draws import DrawSettings
from pipelines.train.negatives import (
    RunningTopK,
    mined_table,
    split_by_modality,
    with_hard_negatives,
)
from pipelines.train.profiling import StepProfile

MODALITIES = {"i1": "image", "i2": "image", "t1": "text", "t2": "text", "t3": "text"}


def test_plan_picks_target_then_image_positive_and_skips_unknown():
    queries = [
        {"qid": "a", "query": "qa", "positive_doc_ids": ["t1", "i2"], "target_doc_id": "t1"},
        {"qid": "b", "query": "qb", "positive_doc_ids": ["t2", "i1"], "target_doc_id": None},
        {"qid": "c", "query": "qc", "positive_doc_ids": ["t3"], "target_doc_id": "gone"},
        {"qid": "d", "query": "qd", "positive_doc_ids": ["missing"], "target_doc_id": None},
    ]
    plan = plan_examples(queries, MODALITIES)
    rows = plan.rows.to_pylist()
    assert [(r["qid"], r["candidate_ids"], r["fallback_id"]) for r in rows] == [
        ("a", ["t1"], "t1"), ("b", ["i1"], "i1"), ("c", ["t3"], "t3")]
    assert plan.counts == {"used": 3, "skipped_no_positive": 1}
    assert rows[1]["relevant_ids"] == ["t2", "i1"]
    assert rows[0]["caption_ids"] == ["i2"]  # q_comp: every image positive, even beside a target
    # b trains with its image positive only, so its text positive t2 is never joined.
    assert plan.needed_ids == ["i1", "i2", "t1", "t3"]
    expanded = expand_epochs(with_visit_order(plan, [0], seed=0), [0], DrawSettings(), num_shards=1).to_pylist()
    assert [(r["qid"], r["pos_id"]) for r in expanded] == [("a", "t1"), ("b", "i1"), ("c", "t3")]


def test_plan_negatives_follow_the_in_memory_rule():
    queries = [{"qid": q, "query": q, "positive_doc_ids": ["i1"], "target_doc_id": "i1"} for q in ("a", "b", "c")]
    mined = {"a": {"image": ["i2"], "text": ["t1", "t2"]}, "b": {"image": [], "text": ["t2", "t3"]},
             "c": {"image": [], "text": []}}
    plan = plan_examples(queries, MODALITIES, mined, depth=2)
    settings = DrawSettings(seed=7, depth=2)
    rows = expand_epochs(with_visit_order(plan, [0], seed=7), [0], settings, num_shards=2).to_pylist()
    docs = {d: Document(d, "text") for d in MODALITIES}
    stub = [TrainExample(q["qid"], q["query"], Document("i1", "text"), relevant_ids=frozenset({"i1"})) for q in queries]
    expected = [[n.doc_id for n in ex.negatives] for ex in with_hard_negatives(stub, mined, docs, seed=7, depth=2)]
    got = [[x for x in (r["neg0_id"], r["neg1_id"]) if x] for r in rows]
    assert got == expected
    assert got[0][0] == "i2" and got[0][1] in ("t1", "t2")  # one image, one text
    assert len(got[1]) == 2 and set(got[1]) <= {"t2", "t3"}  # no image mined: both from text
    assert got[2] == [] and plan.counts["with_negatives"] == 2


def test_compare_draws_each_epoch_as_the_ray_path_does(tmp_path):
    """``ciea compare`` trains on each epoch's draw (image positive and both hard negatives
    from the whole mined list), the same draws the Ray path's rows carry."""
    from pipelines.train.compare import CompareConfig, Corpus, draw_settings, epoch_examples
    from pipelines.train.config import TrainSettings

    images = [f"i{k}" for k in range(12)]
    texts = [f"t{k}" for k in range(12)]
    modalities = {**{d: "image" for d in images}, **{d: "text" for d in texts}}
    pixels = torch.zeros(3, 8, 8)  # any image: only the ids matter here
    docs = [Document(d, "image", caption=f"caption {d}", image=pixels) if m == "image" else Document(d, "text", text=d)
            for d, m in modalities.items()]
    queries = [{"qid": f"q{k}", "query": f"query {k}", "positive_doc_ids": images[3 * k : 3 * k + 3],
                "target_doc_id": None} for k in range(3)]
    mined = {q["qid"]: {"image": [d for d in images if d not in q["positive_doc_ids"]], "text": texts}
             for q in queries}
    cfg = CompareConfig()
    assert cfg.train.negative_depth == TrainSettings.model_fields["negative_depth"].default == 100
    settings = draw_settings(cfg, seed=5)
    examples_of = epoch_examples(Corpus(tmp_path, docs, {"train": queries}), settings, mined)
    epochs = [0, 1, 2, 3]
    plan = plan_examples(queries, modalities, mined, depth=settings.depth)
    ray_rows = expand_epochs(with_visit_order(plan, epochs, seed=5), epochs, settings, num_shards=1).to_pylist()
    draws = []
    for e in epochs:
        got = {ex.qid: (ex.positive.doc_id, [n.doc_id for n in ex.negatives]) for ex in examples_of(e)}
        want = {r["qid"]: (r["pos_id"], [r["neg0_id"], r["neg1_id"]]) for r in ray_rows if r["epoch"] == e}
        assert got == want, e
        draws.append(got)
    assert draws[0] != draws[1], "epoch 1 draws again"
    assert len({pos for d in draws for pos, _ in d.values()}) > 3, "several image positives get their turn"


def test_rows_to_examples_builds_documents_and_comp_captions():
    rows = {
        "qid": ["a"], "query": ["red circle"], "relevant_ids": [["i1", "t1"]],
        "pos_id": ["i1"], "pos_modality": ["image"], "pos_text": [None], "pos_caption": ["a circle"],
        "pos_image": [b"png"], "pos_image_uri": [None],
        "neg0_id": ["t9"], "neg0_modality": ["text"], "neg0_text": ["harbor"], "neg0_caption": [None],
        "neg0_image": [None], "neg0_image_uri": [None],
        "neg1_id": [None], "neg1_modality": [None], "neg1_text": [None], "neg1_caption": [None],
        "neg1_image": [None], "neg1_image_uri": [None],
    }
    (ex,) = rows_to_examples(rows)
    assert ex.positive == Document("i1", "image", caption="a circle", image=b"png")
    assert ex.negatives == (Document("t9", "text", text="harbor"),)
    assert ex.relevant_ids == frozenset({"i1", "t1"}) and ex.positive_captions == ("a circle",)


def test_running_topk_is_exact_and_drops_positives():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(5, 8)).astype(np.float32)
    d = rng.normal(size=(23, 8)).astype(np.float32)
    ids = [f"d{i}" for i in range(23)]
    mods = ["image" if i % 3 else "text" for i in range(23)]
    exclude = [{"d0", "d5"}, set(), {"d22"}, set(ids[:20]), set()]
    top = RunningTopK(q, k=4, exclude=exclude)
    for start in range(0, 23, 7):  # batches of 7, 7, 7, 2
        top.add(ids[start:start + 7], mods[start:start + 7], d[start:start + 7])
    scores = q @ d.T
    for i, hits in enumerate(top.results()):
        allowed = [j for j in range(23) if ids[j] not in exclude[i]]
        want = sorted(allowed, key=lambda j: -scores[i, j])[:4]
        assert [h[0] for h in hits] == [ids[j] for j in want]
        assert [h[1] for h in hits] == [mods[j] for j in want]
    assert len(top.results()[3]) == 3  # only 3 documents are not positives of query 3


def test_mined_table_round_trips_by_modality():
    table = mined_table(["a", "b"], [[("i1", "image", 0.9), ("t1", "text", 0.8), ("i2", "image", 0.7)], []], "m1")
    assert table.num_rows == 3 and set(table.column("model_id").to_pylist()) == {"m1"}
    assert split_by_modality(table) == {"a": {"image": ["i1", "i2"], "text": ["t1"]}}
    assert split_by_modality(table, depth=1) == {"a": {"image": ["i1"], "text": ["t1"]}}


def test_resume_identity_ignores_budget_but_not_recipe():
    a = TrainJobConfig()
    model = {"variant": "ciea", "vision": {"image_mean": (0.1, 0.2, 0.3)}}
    base = resume_identity(a, model)
    longer = TrainJobConfig.model_validate({"train": {"epochs": 80, "max_steps": 9}, "run": {"name": "x"},
                                            "scaling": {"num_workers": 4}})
    assert resume_identity(longer, model) == base  # budget and scaling: a legitimate resume
    assert base["model_config.vision.image_mean"] == [0.1, 0.2, 0.3]  # as stored (JSON)
    other = resume_identity(TrainJobConfig.model_validate({"train": {"lr": 1e-4}}), model)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)train\.lr: checkpoint 5e-06, now 0\.0001.*new run\.name"):
        check_identity(base, other, "checkpoint X")
    check_identity(base, dict(base), "checkpoint X")


@pytest.mark.parametrize("data, message", [
    ({"train": {"batch_size": 10}, "scaling": {"num_workers": 4}}, "not divisible"),
    ({"train": {"stage": 2}}, "train.negatives"),
    ({"train": {"negatives": "x"}}, "only read in stage 2"),
    ({"debug": {"fail_rank": 2}}, "fail_rank"),
    ({"train": {"lr": 0}}, "greater than 0"),
])
def test_job_config_is_validated(data, message):
    with pytest.raises(ValidationError, match=message):
        TrainJobConfig.model_validate(data)


def test_micro_batch_splits_the_global_batch():
    cfg = TrainJobConfig.model_validate({"train": {"batch_size": 64, "grad_accum": 2}, "scaling": {"num_workers": 4}})
    assert cfg.micro_batch == 8


@pytest.mark.parametrize("job", ["jobs.train", "jobs.mine_negatives"])
def test_credentials_in_storage_options_are_refused_and_not_echoed(job):
    import importlib

    module = importlib.import_module(job)
    args = ["--set", "data.storage_options={AWS_SECRET_ACCESS_KEY: s3cr3t-value}"] if job == "jobs.train" else [
        "--checkpoint", "x", "--root", "r", "--output", "o", "--set", "storage_options={AWS_SECRET_ACCESS_KEY: s3cr3t-value}"]
    with pytest.raises(SystemExit) as exc:
        module.main(args)
    assert "credential" in str(exc.value) and "s3cr3t-value" not in str(exc.value)


# ---- gradient averaging ---------------------------------------------------------------------
def test_step_profile_separates_cpu_from_waiting():
    import time

    prof = StepProfile(True)
    with prof("wait"):
        time.sleep(0.05)
    for _ in range(2):  # phases accumulate within a step
        with prof("work"):
            t = time.thread_time()
            while time.thread_time() - t < 0.01:
                pass
    phases = prof.pop()
    assert set(phases) == {"wait", "work"}
    wait_cpu, _, wait_wall = phases["wait"]
    work_cpu, work_process, work_wall = phases["work"]
    assert wait_wall >= 0.05 and wait_cpu < 0.02, "sleeping is wall time, not CPU"
    assert work_cpu >= 0.02 and work_process >= work_cpu * 0.99 and work_wall >= work_cpu * 0.99
    assert prof.pop() == {}, "pop starts the next step afresh"
    with prof("fetch"):  # e.g. the fetch that finds an epoch exhausted: not the next step's
        pass
    prof.start()
    assert prof.pop() == {}
    off = StepProfile(False)
    with off("work"):
        pass
    assert off.pop() == {}
