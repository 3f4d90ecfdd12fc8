"""``ciea reindex`` on a real local Ray, a real Delta corpus with its change feed, and real
LanceDB tables.

One module-scoped corpus (90 synthetic documents) and two tiny checkpoints: ``trained``
(fitted in-process to the dev queries, the published model) and ``untrained`` (the same
model before training: randomly initialised weights, the deliberately worse one). The
table ``base`` is embedded at Delta version 0; then versions 1-3 update three documents,
delete two and insert four; ``full`` is a fresh ``ciea embed`` of version 3 — what every
re-index must equal. Each test re-indexes its own copy of ``base`` (or ``full``).

The seven changed documents take the in-process route by default (read from the feed,
embedded in the test's process); ``test_the_ray_routes_give_the_same_table`` forces the two
Ray Data routes (the feed's rows handed to Ray; Ray reading the version itself).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from deltalake import write_deltalake
from embed_helpers import (
    documents_table,
    make_checkpoint,
    run_embed,
    synthetic_records,
    write_corpus,
)
from train_fixtures import write_split

from ciea_model import load_checkpoint, model_id, save_checkpoint
from ciea_model.inference import encode_documents
from ciea_model.processor import TrainExample
from ciea_model.training import OptimConfig, TrainConfig, Trainer
from jobs import reindex
from pipelines.index.build import SimulatedCrash
from pipelines.store.delta_tables import Tables
from pipelines.store.documents import expect_document, row_to_document
from pipelines.store.lance_tables import META_MODEL_ID, META_SOURCE_VERSION, VectorTable

pytestmark = pytest.mark.usefixtures("ray_local")

N_IMAGES, N_TEXTS = 60, 30
UPDATED, DELETED, INSERTED = 3, 2, 4
CDF = {"delta.enableChangeDataFeed": "true"}


def train_checkpoint(init: str, rows: list[dict], queries: list[dict], out: Path) -> str:
    """``init`` fitted to ``queries`` for a few epochs (seconds): a model that beats its
    own random initialisation on those queries by a wide margin."""
    model, processor = load_checkpoint(init)
    docs = {r["doc_id"]: expect_document(row_to_document(r)) for r in rows}
    examples = [TrainExample(qid=q["qid"], query=q["query"], positive=docs[q["positive_doc_ids"][0]],
                             relevant_ids=frozenset(q["positive_doc_ids"]),
                             positive_captions=tuple(docs[d].caption for d in q["positive_doc_ids"]
                                                     if docs[d].modality == "image"))
                for q in queries]
    Trainer(model, processor, TrainConfig(epochs=10, batch_size=16, seed=0, optim=OptimConfig(lr=2e-3))).fit(examples)
    save_checkpoint(model, processor, out)
    return str(out)


def perturbed_checkpoint(src: str, out: Path) -> str:
    """Another model_id of equal quality: one weight nudged by 1e-5."""
    import torch

    model, processor = load_checkpoint(src)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.startswith("text.")).add_(1e-5)
    save_checkpoint(model, processor, out)
    return str(out)


def merge_documents(root: Path, records: list[dict]) -> None:
    """The ingest's merge: update changed content, insert new doc_ids (one Delta commit)."""
    (Tables(str(root)).documents_table()
     .merge(documents_table(records), "t.doc_id = s.doc_id", source_alias="s", target_alias="t")
     .when_matched_update_all(predicate="t.content_sha256 <> s.content_sha256")
     .when_not_matched_insert_all().execute())


def delete_documents(root: Path, doc_ids: list[str]) -> None:
    Tables(str(root)).documents_table().delete(
        "doc_id IN (" + ", ".join(f"'{d}'" for d in doc_ids) + ")")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reindex")
    root = tmp / "data"
    records = synthetic_records(N_IMAGES, N_TEXTS)
    write_corpus(root, records)  # version 0
    rows = documents_table(records).to_pylist()
    queries = [{"qid": f"q{i:03d}", "query": r["caption"] or r["text"], "positive_doc_ids": [r["doc_id"]],
                "kind": r["modality"]} for i, r in enumerate(rows)]
    write_split(root, "dev", queries)
    untrained = make_checkpoint(tmp, [q["query"] for q in queries], seed=0)
    trained = train_checkpoint(untrained, rows, queries, tmp / "trained")
    rc, base = run_embed(tmp, root, trained, "base")
    assert rc == 0 and base["rows"] == N_IMAGES + N_TEXTS

    changed = [dict(r, caption=f"{r['caption']} (re-captioned)") for r in records[:UPDATED]]
    merge_documents(root, changed)                                                        # 1
    deleted = [r["doc_id"] for r in records[UPDATED:UPDATED + DELETED]]
    delete_documents(root, deleted)                                                       # 2
    new = [dict(r, doc_id=f"new-{i}") for i, r in enumerate(synthetic_records(INSERTED - 1, 1, seed=9))]
    write_deltalake(str(root / "corpus" / "documents"), documents_table(new), mode="append")  # 3
    rc, full = run_embed(tmp, root, trained, "full")
    assert rc == 0 and full["source_version"] == 3
    return {"tmp": tmp, "root": root, "db": root / "lancedb", "records": records, "trained": trained,
            "untrained": untrained, "base": base, "full": full, "deleted": deleted,
            "changed": [r["doc_id"] for r in changed], "new": [r["doc_id"] for r in new]}


def clone(env, src: str, dst: str, db: Path | None = None) -> VectorTable:
    """A copy of a table (all versions and tags): each test re-indexes its own."""
    target = db or env["db"]
    shutil.copytree(env["db"] / f"{src}.lance", target / f"{dst}.lance")
    return VectorTable(str(target), dst)


def run_reindex(env, table: str, checkpoint: str, *extra: str, root: Path | None = None) -> tuple[int, dict | None]:
    run_dir = env["tmp"] / f"runs-reindex-{table}"
    summary_path = run_dir / "summary.json"
    summary_path.unlink(missing_ok=True)
    rc = reindex.main(["--checkpoint", checkpoint, "--root", str(root or env["root"]), "--table", table,
                       "--run-dir", str(run_dir), "--no-progress", "--set", "encode.threads=1",
                       "--set", "encode.batch_size=32", "--set", "preprocess.batch_rows=64", *extra])
    return rc, (json.loads(summary_path.read_text()) if summary_path.exists() else None)


def rows_of(vt: VectorTable, version: int | None = None) -> dict[str, dict]:
    import lance

    ds = lance.dataset(vt.uri, version=version) if version is not None else vt.dataset()
    return {r["doc_id"]: r for r in ds.to_table().to_pylist()}


def assert_equal_tables(got: dict[str, dict], want: dict[str, dict]) -> None:
    assert sorted(got) == sorted(want)
    ids = sorted(want)
    a = np.array([got[d]["vector"] for d in ids], np.float32)
    b = np.array([want[d]["vector"] for d in ids], np.float32)
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5)
    for d in ids:
        assert got[d]["content_sha256"] == want[d]["content_sha256"]
        assert got[d]["model_id"] == want[d]["model_id"]


def test_reindex_equals_a_full_rebuild_embeds_only_the_changes_and_readers_see_whole_versions(env):
    from pipelines.query.search import Searcher

    vt = clone(env, "base", "inc")
    published_before = vt.published_version()
    probe = np.asarray(next(iter(rows_of(vt).values()))["vector"], np.float32)
    seen: list[tuple[int, int, int]] = []
    errors: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        import lance

        while not stop.is_set():
            try:
                s = Searcher.open(str(env["db"]), "inc")
                hits = s.search_vectors(probe, k=5)[0]
                seen.append((s.version, lance.dataset(vt.uri, version=s.version).count_rows(), len(hits)))
            except Exception as e:  # any error at all fails the test
                errors.append(f"{type(e).__name__}: {e}")

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        rc, s = run_reindex(env, "inc", env["trained"])
    finally:
        stop.set()
        thread.join(timeout=60)
    assert rc == 0, s
    assert s["method"] == "cdf" and s["from_version"] == 0 and s["to_version"] == 3
    # Only the changed documents were embedded; the updated and deleted rows were removed.
    assert s["upserts"] == UPDATED + INSERTED and s["deletes"] == DELETED
    assert s["embedded"] == UPDATED + INSERTED and s["deleted"] == UPDATED + DELETED
    # A change this small is embedded in-process, its rows read from the feed's post-images.
    assert s["embed_route"] == "in-process" and s["rows_from"] == {"feed": UPDATED + INSERTED, "scan": 0}
    rows = rows_of(vt)
    assert_equal_tables(rows, rows_of(VectorTable(str(env["db"]), "full")))
    base_rows = rows_of(VectorTable(str(env["db"]), "base"))
    untouched = set(rows) - set(env["changed"]) - set(env["new"])
    assert all(rows[d]["embedded_at"] == base_rows[d]["embedded_at"] for d in untouched)
    assert all(rows[d]["source_version"] == 3 for d in env["changed"] + env["new"])
    assert vt.published_version() == vt.version() and vt.metadata()[META_SOURCE_VERSION] == "3"
    # Readers: no error, and only ever one of the two published versions, whole.
    total = N_IMAGES + N_TEXTS - DELETED + INSERTED
    states = {published_before: N_IMAGES + N_TEXTS, vt.published_version(): total}
    assert not errors, errors[:3]
    assert seen and all(states.get(v) == n and k == 5 for v, n, k in seen), set(seen)
    # A second run has nothing to do.
    rc, again = run_reindex(env, "inc", env["trained"])
    assert rc == 0 and again["noop"] and again["embedded"] == 0 and vt.published_version() == s["published_version"]


@pytest.mark.parametrize(("route", "settings"), [
    ("ray-rows", ["encode.in_process_max_docs=0"]),
    ("ray-read", ["encode.in_process_max_docs=0", "changes.read_max_docs=0"]),
])
def test_the_ray_routes_give_the_same_table(env, route, settings):
    name = route.replace("-", "_")
    vt = clone(env, "base", name)
    rc, s = run_reindex(env, name, env["trained"], *[a for kv in settings for a in ("--set", kv)])
    assert rc == 0, s
    assert s["embed_route"] == route and s["embedded"] == UPDATED + INSERTED
    assert ("rows_from" in s) == (route == "ray-rows")
    assert_equal_tables(rows_of(vt), rows_of(VectorTable(str(env["db"]), "full")))
    assert vt.published_version() == vt.version() and vt.metadata()[META_SOURCE_VERSION] == "3"


def test_the_full_diff_planned_on_ray_gives_the_same_table(env):
    # changes.method=diff with the plan's threshold at 0: the hash-partitioned Ray diff.
    vt = clone(env, "base", "diff_on_ray")
    rc, s = run_reindex(env, "diff_on_ray", env["trained"], "--set", "changes.method=diff",
                        "--set", "plan.distributed_min_rows=0", "--set", "plan.partitions=3")
    assert rc == 0, s
    assert s["method"] == "diff" and s["embedded"] == UPDATED + INSERTED
    assert s["upserts"] == UPDATED + INSERTED and s["deletes"] == DELETED
    assert_equal_tables(rows_of(vt), rows_of(VectorTable(str(env["db"]), "full")))
    assert vt.published_version() == vt.version() and vt.metadata()[META_SOURCE_VERSION] == "3"


def test_a_scheduled_run_with_a_small_change_starts_no_ray(env, tmp_path):
    # A fresh process, as cron runs it: no Ray in it, none to join.
    vt = clone(env, "base", "noray")
    session = tmp_path / "ray-session"  # init_ray creates it before ray.init: absent = never started
    cmd = [sys.executable, "-m", "jobs.reindex", "--checkpoint", env["trained"], "--root", str(env["root"]),
           "--table", "noray", "--run-dir", str(tmp_path / "run"), "--no-progress",
           "--set", f"ray.temp_dir={session}", "--set", "encode.threads=1"]
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], env=environ, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["embed_route"] == "in-process" and s["embedded"] == UPDATED + INSERTED
    assert "(in-process)" in proc.stdout
    assert not session.exists()
    assert_equal_tables(rows_of(vt), rows_of(VectorTable(str(env["db"]), "full")))
    assert vt.published_version() == vt.version()


@pytest.mark.parametrize("step", ["planned", "deleted", "committed", "indexed", "recorded"])
def test_a_reindex_killed_at_any_step_converges_on_rerun(env, step):
    name = f"crash_{step}"
    vt = clone(env, "base", name)
    published = vt.published_version()
    with pytest.raises(SimulatedCrash):
        run_reindex(env, name, env["trained"], "--set", f"fault.crash_at={step}")
    assert vt.published_version() == published  # readers still see the old version
    # The new source version is recorded only once rows and indexes are complete.
    recorded = step == "recorded"
    assert vt.metadata()[META_SOURCE_VERSION] == ("3" if recorded else "0")
    rc, s = run_reindex(env, name, env["trained"])
    assert rc == 0 and s["from_version"] == (3 if recorded else 0)
    assert_equal_tables(rows_of(vt), rows_of(VectorTable(str(env["db"]), "full")))
    assert vt.published_version() == vt.version() != published
    # Work done before the crash is not done again.
    redone = UPDATED + INSERTED if step in ("planned", "deleted") else 0
    assert s["embedded"] == redone


def test_without_the_change_feed_it_falls_back_to_a_full_diff(env, tmp_path, caplog):
    # A copy of the corpus whose feed is switched off, then one more delete (version 5).
    root = tmp_path / "data"
    shutil.copytree(env["root"] / "corpus", root / "corpus")
    (root / "lancedb").mkdir()
    vt = clone(env, "base", "nofeed", db=root / "lancedb")
    Tables(str(root)).documents_table().alter.set_table_properties({"delta.enableChangeDataFeed": "false"})
    gone = env["records"][10]["doc_id"]
    delete_documents(root, [gone])
    rc, s = run_reindex(env, "nofeed", env["trained"], root=root)
    assert rc == 0 and s["method"] == "diff" and "not enabled" in s["fallback_reason"]
    assert "falling back to a full diff" in caplog.text
    assert s["embedded"] == UPDATED + INSERTED and s["deleted"] == UPDATED + DELETED + 1
    # No feed: the changed rows come from a scan of the version.
    assert s["rows_from"] == {"feed": 0, "scan": UPDATED + INSERTED}
    want = rows_of(VectorTable(str(env["db"]), "full"))
    del want[gone]
    assert_equal_tables(rows_of(vt), want)
    assert vt.metadata()[META_SOURCE_VERSION] == "5"


def test_the_gate_refuses_a_worse_model_and_keeps_the_published_version(env):
    vt = clone(env, "full", "gate_refuse")
    published = vt.published_version()
    before = rows_of(vt, published)
    rc, s = run_reindex(env, "gate_refuse", env["untrained"])
    assert rc == reindex.EXIT_GATE_REFUSED, s
    g = s["gate"]
    assert not g["promote"] and "worse" in g["reason"]
    assert g["candidate"] < g["published"] - g["tolerance"]
    assert g["candidate"] == g["candidate_eval"]["metrics"]["MRR@10"] and g["candidate_eval"]["queries"] > 0
    assert g["published_eval"]["version"] == published and g["published_eval"]["model_id"] == env["full"]["model_id"]
    assert vt.published_version() == published
    # The head is the published content again; the candidate stays inspectable by its tag.
    assert vt.metadata()[META_MODEL_ID] == env["full"]["model_id"]
    assert_equal_tables(rows_of(vt), before)
    cand = vt.table.tags.list()[s["candidate_tag"]]
    cand_version = cand["version"] if isinstance(cand, dict) else cand.version
    cand_rows = rows_of(vt, cand_version)
    assert {r["model_id"] for r in cand_rows.values()} == {s["model_id"]} != {env["full"]["model_id"]}
    assert len(cand_rows) == len(before)
    # The old model keeps re-indexing incrementally on top.
    rc, again = run_reindex(env, "gate_refuse", env["trained"])
    assert rc == 0 and again["method"] == "cdf" and again["embedded"] == 0


def test_a_model_that_is_not_worse_is_promoted_after_a_crashed_rebuild(env):
    import lance

    vt = clone(env, "full", "gate_pass")
    published = vt.published_version()
    better = perturbed_checkpoint(env["trained"], env["tmp"] / "perturbed")
    with pytest.raises(SimulatedCrash):
        run_reindex(env, "gate_pass", better, "--set", "fault.crash_at=rebuilt")
    assert vt.published_version() == published
    rc, s = run_reindex(env, "gate_pass", better)
    assert rc == 0, s
    assert s["method"] == "rebuild" and s["gate"]["promote"] and s["promoted"]
    assert s["embedded"] == N_IMAGES + N_TEXTS - DELETED + INSERTED
    assert vt.published_version() == vt.version() != published
    rows = rows_of(vt)
    model, processor = load_checkpoint(better)
    mid = model_id(model)
    assert {r["model_id"] for r in rows.values()} == {mid} and vt.metadata()[META_MODEL_ID] == mid
    delta = Tables(str(env["root"])).read("documents").to_pylist()
    assert sorted(rows) == sorted(r["doc_id"] for r in delta)
    want = encode_documents(model, processor, [expect_document(row_to_document(r)) for r in delta], batch_size=64)
    got = np.array([rows[r["doc_id"]]["vector"] for r in delta], np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    # The model changed in the new version only: the old published version is intact.
    old = lance.dataset(vt.uri, version=published)
    assert old.metadata[META_MODEL_ID] == env["full"]["model_id"]
    assert set(old.to_table(columns=["model_id"])["model_id"].to_pylist()) == {env["full"]["model_id"]}
