"""The release's training data path, on hand-worked cases (issue 16, items 1–3): q_comp
against every image positive's caption, one image positive picked at random per epoch, the
hard negatives re-drawn every epoch from the whole mined list, and draws that are pure
functions of (seed, epoch, qid), so a resumed run trains exactly the rows of an
uninterrupted one. The Ray path is exercised through the functions its rows are built and
consumed with (``expand_epochs`` on the cluster, ``EpochRows`` in the worker)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ciea_model.processor import Document
from pipelines.train.dataset import (
    EPOCH,
    SHARD,
    SLOT,
    EpochRows,
    expand_epochs,
    plan_examples,
    rows_to_examples,
    shard_sizes,
    with_visit_order,
)
from pipelines.train.draws import DrawSettings, choose_positive, draw_negatives, visit_order
from pipelines.train.examples import training_examples
from pipelines.train.joins import join_documents
from pipelines.train.negatives import with_hard_negatives

IMAGES = ("i1", "i2", "i3")
MINED = {"image": [f"mi{k}" for k in range(40)] + ["i2"], "text": ["t0"] + [f"mt{k}" for k in range(40)]}


def _query(qid: str = "q", target: str | None = None) -> dict:
    return {"qid": qid, "query": qid, "positive_doc_ids": [*IMAGES, "t0"], "target_doc_id": target}


def _modalities() -> dict[str, str]:
    out = {d: "image" for d in (*IMAGES, *MINED["image"])}
    out.update({d: "text" for d in MINED["text"]})
    return out


def _docs() -> dict[str, Document]:
    return {d: Document(d, m, text=f"text {d}" if m == "text" else "", caption=f"caption {d}" if m == "image" else "",
                        image=b"png" if m == "image" else None) for d, m in _modalities().items()}


# ---- item 2: q_comp removes every image positive's caption -------------------------------------
def test_q_comp_lacks_the_tokens_of_all_three_positive_captions(synthetic_corpus, make_model):
    records, _ = synthetic_corpus
    _, processor = make_model("ciea")
    captions = [r["caption"] for r in records if r["modality"] == "image"][:3]
    tok = processor.tokenizer

    def ids(text: str) -> set[int]:
        return set(tok(text, add_special_tokens=False)["input_ids"])

    caption_ids = set().union(*(ids(c) for c in captions))
    extra = next(w for r in records if r["modality"] == "text" for w in r["text"].split() if not ids(w) & caption_ids)
    query = " ".join([*captions, extra])
    docs = {f"i{k}": Document(f"i{k}", "image", caption=c, image=b"png") for k, c in enumerate(captions)}
    q = {"qid": "q", "query": query, "positive_doc_ids": sorted(docs), "target_doc_id": None}

    (ex,), _ = training_examples([q], docs)
    assert sorted(ex.positive_captions) == sorted(captions)
    comp = processor.query_minus_caption(ex.query, ex.positive_captions)
    assert comp is not None and not ids(comp) & caption_ids
    # Against the chosen positive's caption only (the old rule), the other two would stay.
    assert ids(processor.query_minus_caption(query, (ex.positive.caption,))) & caption_ids

    # The Ray rows: the caption list joined on the cluster reaches the example as it is.
    row = {"qid": ["q"], "query": [query], "relevant_ids": [sorted(docs)], "pos_id": ["i1"],
           "pos_modality": ["image"], "pos_text": [None], "pos_caption": [captions[1]], "pos_image": [b"png"],
           "pos_image_uri": [None], "positive_captions": [captions]}
    (from_row,) = rows_to_examples(row)
    assert sorted(from_row.positive_captions) == sorted(captions)
    assert rows_to_examples({**row, "pos_modality": ["text"], "pos_image": [None]})[0].positive_captions == ()


def test_a_target_stays_the_positive_and_text_positives_bring_no_caption():
    docs = _docs()
    (ex,), _ = training_examples([_query(target="i3")], docs)
    assert ex.positive.doc_id == "i3" and ex.positive_captions == ("caption i1", "caption i2", "caption i3")
    (text,), _ = training_examples([{**_query(target="t0")}], docs)
    assert text.positive.doc_id == "t0" and text.positive_captions == ()


# ---- item 3: the image positive, at random each epoch --------------------------------------------
def test_the_positive_varies_across_epochs_among_the_image_positives():
    settings = DrawSettings(seed=1234)
    picks = [choose_positive("q", IMAGES, "t0", settings, e) for e in range(20)]
    assert set(picks) == set(IMAGES)
    assert picks == [choose_positive("q", IMAGES, "t0", settings, e) for e in range(20)]  # pure
    fixed = DrawSettings(seed=1234, random_positive=False)
    assert {choose_positive("q", IMAGES, "t0", fixed, e) for e in range(20)} == {"i1"}
    assert choose_positive("q", (), "t0", settings, 3) == "t0"
    # The in-memory examples follow the same draw.
    for e in range(5):
        (ex,), _ = training_examples([_query()], _docs(), settings, epoch=e)
        assert ex.positive.doc_id == picks[e]


# ---- item 1: the negatives, re-drawn every epoch from the whole mined list ------------------------
def test_two_epochs_draw_different_negatives_from_the_mined_list_minus_positives():
    settings = DrawSettings(seed=1234)
    positives = {*IMAGES, "t0"}
    draws = [draw_negatives("q", MINED, positives, settings, e) for e in range(10)]
    allowed_image, allowed_text = set(MINED["image"]) - positives, set(MINED["text"]) - positives
    for image, text in draws:
        assert image in allowed_image and text in allowed_text
    assert draws[0] != draws[1] and len({tuple(d) for d in draws}) > 5
    # The whole list (depth 100), not its top 10: over 10 epochs some pick comes from deeper.
    assert any(int(d[1:].lstrip("it")) >= 10 for pair in draws for d in pair)
    once = DrawSettings(seed=1234, redraw_each_epoch=False)
    assert {tuple(draw_negatives("q", MINED, positives, once, e)) for e in range(10)} == {tuple(draws[0])}
    top2 = DrawSettings(seed=1234, depth=2)
    assert {n for e in range(10) for n in draw_negatives("q", MINED, positives, top2, e)} <= {"mi0", "mi1", "mt0"}


def test_in_memory_and_ray_rows_draw_alike():
    settings = DrawSettings(seed=7)
    queries = [_query(f"q{k}") for k in range(6)]
    plan = plan_examples(queries, _modalities(), {q["qid"]: MINED for q in queries}, depth=settings.depth)
    rows = expand_epochs(with_visit_order(plan, [0, 1, 2], settings.seed), [0, 1, 2], settings, num_shards=2).to_pylist()
    docs = _docs()
    for e in (0, 1, 2):
        examples, _ = training_examples(queries, docs, settings, epoch=e)
        drawn = with_hard_negatives(examples, {q["qid"]: MINED for q in queries}, docs, seed=7, epoch=e)
        want = {ex.qid: (ex.positive.doc_id, [n.doc_id for n in ex.negatives]) for ex in drawn}
        got = {r["qid"]: (r["pos_id"], [r["neg0_id"], r["neg1_id"]]) for r in rows if r[EPOCH] == e}
        assert got == want


# ---- the resume guarantee, through the worker's code path -------------------------------------------
def _shard_batches(table: pa.Table, shard: int, size: int) -> list[pa.Table]:
    """What a worker's iterator yields: its rows in (epoch, slot) order, in batches."""
    mine = table.filter(pc.equal(table.column(SHARD), shard)).sort_by([(EPOCH, "ascending"), (SLOT, "ascending")])
    return [mine.slice(i, size) for i in range(0, mine.num_rows, size)]


def _epoch_picks(micro_batches) -> list[tuple]:
    return [(r["qid"], r["pos_id"], r["neg0_id"], r["neg1_id"]) for mb in micro_batches for r in mb.to_pylist()]


@pytest.mark.parametrize("shard", [0, 1])
def test_a_run_resumed_after_epoch_2_trains_the_epoch_3_rows_of_an_uninterrupted_run(shard):
    settings = DrawSettings(seed=1234)
    queries = [_query(f"q{k:02d}") for k in range(21)]
    mined = {q["qid"]: MINED for q in queries}
    plan = plan_examples(queries, _modalities(), mined, depth=settings.depth)

    def rows(epochs):  # what a driver started at epochs[0] builds (expand_epochs runs on the cluster)
        return expand_epochs(with_visit_order(plan, epochs, settings.seed), epochs, settings, num_shards=2)

    whole, resumed = rows(list(range(6))), rows(list(range(3, 6)))
    assert resumed.num_rows == sum(shard_sizes(21, range(3, 6), 2))

    def stream(table):
        return EpochRows(_shard_batches(table, shard, 5), micro_batch=4, shuffle=8, seed=1234, rank=shard)

    uninterrupted = stream(whole)
    epochs = {e: list(uninterrupted.epoch(e)) for e in range(6)}
    again = stream(resumed)
    assert _epoch_picks(again.epoch(3)) == _epoch_picks(epochs[3])
    assert _epoch_picks(again.epoch(4)) == _epoch_picks(epochs[4])
    assert _epoch_picks(epochs[2]) != _epoch_picks(epochs[3])  # a fresh draw (and order) per epoch
    # Resumed mid-epoch (a restarted worker group starts from the same dataset): the
    # earlier epochs are skipped and the micro-batches already trained are passed over.
    mid = stream(whole)
    it = mid.epoch(3)
    next(it)
    assert _epoch_picks(it) == _epoch_picks(epochs[3][1:])
    # Every query once per epoch over the two shards.
    assert {p[0] for p in _epoch_picks(epochs[3])} | {
        p[0] for p in _epoch_picks(EpochRows(_shard_batches(whole, 1 - shard, 5), 4).epoch(3))} == {q["qid"] for q in queries}


def test_epoch_rows_stop_at_the_next_epoch_and_skip_a_tail():
    table = pa.table({EPOCH: [0] * 5 + [1] * 5 + [2] * 3, "x": list(range(13))})
    rows = EpochRows([table.slice(0, 4), table.slice(4, 7), table.slice(11)], micro_batch=2)
    first = rows.epoch(0)
    assert next(first).column("x").to_pylist() == [0, 1]  # the rest of epoch 0 is left (ranks agreed it ended)
    assert [mb.column("x").to_pylist() for mb in rows.epoch(1)] == [[5, 6], [7, 8], [9]]
    assert [mb.column("x").to_pylist() for mb in rows.epoch(2)] == [[10, 11], [12]]
    assert list(rows.epoch(3)) == []
    bad = EpochRows([pa.table({EPOCH: [1, 1]}), pa.table({EPOCH: [0]})], micro_batch=2)
    with pytest.raises(RuntimeError, match="out of epoch order"):
        list(bad.epoch(1)), list(bad.epoch(2))


def test_visit_order_deals_every_query_once_per_epoch():
    a, b = visit_order(10, 1, 0), visit_order(10, 1, 1)
    assert sorted(a) == list(range(10)) and sorted(b) == list(range(10)) and list(a) != list(b)
    assert shard_sizes(10, range(3), 3) == [12, 9, 9]


# ---- issue 27: WebQA's shapes (no target, several positives of one kind) -----------------------
def test_a_query_without_target_joins_every_image_positives_caption():
    two = {"qid": "w", "query": "w", "positive_doc_ids": ["i1", "i2"], "target_doc_id": None}
    one = {"qid": "v", "query": "v", "positive_doc_ids": ["i3", "t0"], "target_doc_id": None}
    assert plan_examples([two], _modalities()).needs_captions, "whichever is drawn, the other's caption is needed"
    assert not plan_examples([one], _modalities()).needs_captions, "the trained positive's own caption is all"
    assert not plan_examples([two], _modalities(), comp_captions="trained").needs_captions
    (ex,), _ = training_examples([two], _docs(), DrawSettings(comp_captions="trained"))
    assert ex.positive_captions == (f"caption {ex.positive.doc_id}",)


def test_a_text_answer_query_draws_among_its_text_positives():
    q = {"qid": "t", "query": "t", "positive_doc_ids": ["mt1", "mt2", "mt3"], "target_doc_id": None}
    settings = DrawSettings(seed=1234)
    picks = [training_examples([q], _docs(), settings, epoch=e)[0][0].positive.doc_id for e in range(12)]
    assert set(picks) == {"mt1", "mt2", "mt3"}
    fixed = DrawSettings(seed=1234, random_positive=False)
    assert {training_examples([q], _docs(), fixed, epoch=e)[0][0].positive.doc_id for e in range(5)} == {"mt1"}


_IDS = [*IMAGES, "i4", "t0", "mt1", "mt2", "mt3"]


@st.composite
def _webqa_like(draw):
    """Queries of any shape over the fixture's documents: with or without a target (in the
    corpus or not), any mix of image and text positives, some not in the corpus."""
    queries = []
    for k in range(draw(st.integers(1, 6))):
        positives = draw(st.lists(st.sampled_from([*_IDS, "gone"]), min_size=1, max_size=5, unique=True))
        target = draw(st.one_of(st.none(), st.sampled_from(positives)))
        queries.append({"qid": f"q{k}", "query": f"q{k}", "positive_doc_ids": positives, "target_doc_id": target})
    return queries


def _ray_examples(queries, docs, settings, epochs):
    """The Ray path on the same queries: the plan expanded per epoch, then joined with the
    documents as ``epoch_dataset`` does on a small corpus (:func:`join_documents`, the
    map-side join; the hash-joined route is checked equal to it on Ray)."""
    modalities = {d: doc.modality for d, doc in docs.items()}
    plan = plan_examples(queries, modalities, comp_captions=settings.comp_captions)
    rows = expand_epochs(with_visit_order(plan, epochs, settings.seed), epochs, settings, num_shards=2)
    table = pa.table({"doc_id": [d.doc_id for d in docs.values()], "modality": [d.modality for d in docs.values()],
                      "text": [d.text for d in docs.values()], "caption": [d.caption for d in docs.values()],
                      "image": pa.array([d.image for d in docs.values()], pa.binary()),
                      "image_uri": pa.array([None] * len(docs), pa.string())})
    captions = dict(zip(plan.rows.column("qid").to_pylist(), plan.rows.column("caption_ids").to_pylist()))
    joined = join_documents(rows, table, ["pos"], inner="pos", caption_ids=captions if plan.needs_captions else None)
    return {(r[EPOCH], ex.qid): ex for r, ex in zip(joined.to_pylist(), rows_to_examples(joined))}


@settings(max_examples=60, deadline=None)
@given(queries=_webqa_like(), comp=st.sampled_from(["all", "trained"]), seed=st.integers(0, 2**31))
def test_both_training_paths_train_the_same_positive_and_q_comp_captions(queries, comp, seed):
    docs = {**_docs(), "i4": Document("i4", "image", caption="caption i4", image=b"png"),
            **{d: Document(d, "text", text=f"text {d}") for d in ("mt1", "mt2", "mt3")}}
    draw = DrawSettings(seed=seed, comp_captions=comp)
    ray = _ray_examples(queries, docs, draw, [0, 1])
    for e in (0, 1):
        examples, counts = training_examples(queries, docs, draw, epoch=e)
        assert counts["used"] + counts["skipped_no_positive"] == len(queries)
        for ex in examples:
            q = next(x for x in queries if x["qid"] == ex.qid)
            kinds = {docs[d].modality for d in q["positive_doc_ids"] if d in docs}
            assert ex.positive.doc_id in q["positive_doc_ids"]
            if q["target_doc_id"] is None and "image" in kinds:
                assert ex.positive.modality == "image", "an image positive is trained when there is one"
            if comp == "all" and ex.positive.modality == "image":
                wanted = {docs[d].caption for d in q["positive_doc_ids"] if d in docs and docs[d].modality == "image"}
                assert set(ex.positive_captions) == wanted
            r = ray[(e, ex.qid)]
            assert (r.positive.doc_id, sorted(r.positive_captions)) == (ex.positive.doc_id, sorted(ex.positive_captions))
