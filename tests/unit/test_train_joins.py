"""The map-side join of training rows with their documents, on hand-worked cases: what an
inner join drops, what a left outer join leaves null, which captions ``q_comp`` gets, and
what a corpus with a doc_id twice does. Its equality with Ray Data's hash joins is checked
on Ray (tests/integration/test_train_webqa_shaped.py)."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.train.joins import DuplicateDocId, JoinDocuments, join_documents

DOCS = pa.table({
    "doc_id": ["i1", "i2", "t1", "i3"],
    "modality": ["image", "image", "text", "image"],
    "text": [None, None, "a text", None],
    "caption": ["cap one", None, None, "cap three"],
    "image": pa.array([b"p1", b"p2", None, b"p3"], pa.binary()),
    "image_uri": pa.array([None, None, None, "s3://b/i3.png"], pa.string()),
})


def _rows(pos, neg0=None, qids=None):
    n = len(pos)
    return pa.table({"qid": qids or [f"q{i}" for i in range(n)], "pos_id": pa.array(pos, pa.string()),
                     "neg0_id": pa.array(neg0 or [None] * n, pa.string())})


def test_the_positive_is_inner_joined_and_a_negative_left_outer():
    out = join_documents(_rows(["i1", "gone", None, "t1"], ["t1", "i2", None, "gone"]), DOCS, ["pos", "neg0"],
                         inner="pos")
    assert out.column("qid").to_pylist() == ["q0", "q3"], "a positive not in the corpus (or none) drops the row"
    assert out.column("pos_caption").to_pylist() == ["cap one", None]
    assert out.column("pos_text").to_pylist() == [None, "a text"]
    assert out.column("pos_image").to_pylist() == [b"p1", None]
    assert out.column("neg0_modality").to_pylist() == ["text", None], "a missing negative leaves its slot null"
    assert out.schema.field("pos_image").type == pa.binary()
    assert "pos_doc_id" not in out.column_names and "positive_captions" not in out.column_names


def test_q_comp_captions_are_the_image_positives_in_doc_id_order():
    captions = {"q0": ["i3", "t1", "i1", "gone"], "q1": ["t1"], "q2": ["i2"]}
    out = join_documents(_rows(["i1", "t1", "i2"]), DOCS, ["pos"], inner="pos", caption_ids=captions)
    assert out.column("positive_captions").to_pylist() == [
        ["cap one", "cap three"],  # sorted by doc_id; the text document and the missing one are not captions
        None,  # no image positive: null, as the left outer join of no caption group leaves it
        [""],  # an image whose caption is null: an empty caption
    ]


def test_a_doc_id_twice_is_refused_rather_than_multiplying_rows():
    with pytest.raises(DuplicateDocId, match="more than once"):
        join_documents(_rows(["i1"]), pa.concat_tables([DOCS, DOCS.slice(0, 1)]), ["pos"], inner="pos")


def test_the_udf_pickles_without_its_fetched_documents():
    import pickle

    udf = JoinDocuments(["ref"], ["pos"], "pos", None)
    udf._docs = (DOCS, {})
    assert pickle.loads(pickle.dumps(udf))._docs is None


@settings(max_examples=80, deadline=None)
@given(pos=st.lists(st.one_of(st.none(), st.sampled_from(["i1", "i2", "t1", "i3", "gone"])), max_size=12),
       cut=st.integers(0, 12))
def test_joining_in_batches_equals_joining_at_once(pos, cut):
    """Ray hands a UDF any cut of the rows: the join is row-wise."""
    rows = _rows(pos)
    whole = join_documents(rows, DOCS, ["pos"], inner="pos")
    parts = [join_documents(rows.slice(0, cut), DOCS, ["pos"], inner="pos"),
             join_documents(rows.slice(cut), DOCS, ["pos"], inner="pos")]
    assert pa.concat_tables(parts).equals(whole)
    assert whole.num_rows == sum(d in {"i1", "i2", "t1", "i3"} for d in pos)
