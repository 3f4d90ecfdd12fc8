"""Stage 0's examples (``ciea pretrain-vision``): exactly the image documents whose caption
holds something besides whitespace, whatever shapes the rows take as Delta returns them —
null or blank captions, text documents with captions, unicode, view types."""

from __future__ import annotations

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.train.dataset import captioned_image_ids

CAPTIONS = st.one_of(st.none(), st.just(""), st.sampled_from([" ", "\t\n", "\u3000", "a", " red circle ", "é"]),
                     st.text(max_size=12))
ROWS = st.lists(st.tuples(st.sampled_from(["image", "text", None]), CAPTIONS), max_size=30)


def _batch(rows, view: bool) -> pa.Table:
    string = pa.string_view() if view else pa.string()
    return pa.table({"doc_id": pa.array([f"d{i}" for i in range(len(rows))], string),
                     "modality": pa.array([m for m, _ in rows], string),
                     "caption": pa.array([c for _, c in rows], string)})


@settings(max_examples=200, deadline=None)
@given(rows=ROWS, view=st.booleans())
def test_only_captioned_images_are_stage0_examples(rows, view):
    got = captioned_image_ids(_batch(rows, view)).column("doc_id").to_pylist()
    # Arrow's utf8_trim_whitespace trims what Unicode calls whitespace, as str.strip does.
    expect = [f"d{i}" for i, (m, c) in enumerate(rows) if m == "image" and c is not None and c.strip()]
    assert got == expect


@given(st.lists(st.lists(st.text(max_size=6), max_size=7), max_size=6), st.one_of(st.none(), st.integers(0, 9)))
def test_stage0_keeps_the_smallest_ids_without_holding_them_all(batches, n):
    from pipelines.train.dataset import smallest_ids

    columns = [pa.array(b, pa.string()) for b in batches]
    want = sorted(i for b in batches for i in b)
    # Arrow orders strings by bytes, as Python does for str of the same code points' UTF-8.
    assert smallest_ids(iter(columns), n) == sorted(want, key=lambda s: s.encode())[:n]
    assert smallest_ids([pa.chunked_array([pa.array(["b", "a"], pa.large_string())])], 1) == ["a"]
