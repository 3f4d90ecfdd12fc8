"""The one cast of what deltalake hands out (``pipelines.store.schema.plain_types``): view and
large string/binary types become plain ``string``/``binary``, values and nulls unchanged,
every other type left alone — whatever mix of columns a Delta read returns."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.store import schema as S

_TEXT = st.lists(st.one_of(st.none(), st.text(max_size=8)), max_size=6)
_BYTES = st.lists(st.one_of(st.none(), st.binary(max_size=8)), max_size=6)
_KINDS = {
    "string_view": (pa.string_view(), _TEXT, pa.string()),
    "large_string": (pa.large_string(), _TEXT, pa.string()),
    "string": (pa.string(), _TEXT, pa.string()),
    "binary_view": (pa.binary_view(), _BYTES, pa.binary()),
    "large_binary": (pa.large_binary(), _BYTES, pa.binary()),
    "int64": (pa.int64(), st.lists(st.one_of(st.none(), st.integers(-2**63, 2**63 - 1)), max_size=6), pa.int64()),
}


@settings(max_examples=80, deadline=None)
@given(kinds=st.lists(st.sampled_from(sorted(_KINDS)), min_size=1, max_size=5), data=st.data())
def test_every_view_and_large_column_becomes_plain_with_its_values(kinds, data):
    n = data.draw(st.integers(0, 6))
    columns, want = {}, {}
    for i, kind in enumerate(kinds):
        arrow_type, values, plain = _KINDS[kind]
        vals = (data.draw(values) + [None] * n)[:n]
        columns[f"c{i}"] = pa.array(vals, arrow_type)
        want[f"c{i}"] = (plain, vals)
    table = pa.table(columns)
    out = S.plain_types(table)
    assert out.column_names == table.column_names
    for name, (plain, vals) in want.items():
        assert out.schema.field(name).type == plain
        assert out.column(name).to_pylist() == vals
    # What the cast is for: compute kernels take the plain columns.
    if "c0" in out.column_names and out.schema.field("c0").type == pa.string() and n:
        pc.is_in(out.column("c0"), value_set=pa.array(["x"]))


def test_plain_arrays_and_record_batches():
    arr = pa.array(["a", None], pa.string_view())
    assert S.plain_array(arr).type == pa.string() and S.plain_array(arr).to_pylist() == ["a", None]
    plain = pa.array([1, 2])
    assert S.plain_array(plain) is plain
    batch = pa.record_batch({"b": pa.array([b"x"], pa.binary_view())})
    assert S.plain_types(batch).schema.field("b").type == pa.binary()
