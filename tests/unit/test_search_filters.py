"""The search surfaces' pure parts: structured filters (typed, quoted, injection refused),
CLI filter parsing, reciprocal-rank fusion and ``ciea sql``'s read-only check (no Ray)."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pytest

from pipelines.query.formatting import format_csv, format_json, format_markdown, format_text_table
from pipelines.query.search import (
    RRF_K,
    Filter,
    FilterError,
    filterable_columns,
    parse_filter_pairs,
    reciprocal_rank_fusion,
)
from pipelines.query.sql import SqlError, check_read_only
from pipelines.store.lance_tables import table_schema

SCHEMA = table_schema(8)

INJECTIONS = [
    "x' OR 1=1 --",
    "x'; DROP TABLE documents; --",
    "a' OR 'a'='a",
    'x" OR "1"="1',
    "doc;1",
    "doc -- comment",
    "doc /* c */",
    "back\\slash",
    "tab\there",
    "`tick`",
]


@pytest.mark.parametrize("value", INJECTIONS)
def test_string_values_that_could_leave_the_literal_are_refused(value):
    with pytest.raises(FilterError, match="doc_id") as e:
        Filter(equals={"doc_id": value}).to_sql(SCHEMA)
    assert "pass the plain" in str(e.value).lower()
    with pytest.raises(FilterError):
        Filter(doc_ids=["ok", value]).to_sql(SCHEMA)
    with pytest.raises(FilterError):
        Filter(in_={"caption": [value]}).to_sql(SCHEMA)


@pytest.mark.parametrize("modality", ["image' OR 1=1 --", "image;", "IMAGE", "audio", ""])
def test_modality_must_be_one_of_the_modalities(modality):
    with pytest.raises(FilterError, match="use one of text, image"):
        Filter(modality=modality).to_sql(SCHEMA)


@pytest.mark.parametrize("column", ["nope", "doc_id = 'x' OR 1", "doc_id;", "1=1", "", "DOC_ID"])
def test_unknown_columns_are_refused_with_the_allowed_list(column):
    with pytest.raises(FilterError, match="use one of doc_id, modality") as e:
        Filter(equals={column: "x"}).to_sql(SCHEMA)
    assert "vector" not in str(e.value).split("use one of")[1]  # not offered as filterable


@pytest.mark.parametrize(("column", "value", "fix"), [
    ("source_version", "3", "pass an integer"),
    ("source_version", "3 OR 1=1", "pass an integer"),
    ("source_version", True, "pass an integer"),
    ("source_version", 1.5, "pass an integer"),
    ("doc_id", 3, "pass a string"),
    ("doc_id", None, "pass a string"),
    ("vector", 1, "string, integer, float and boolean columns only"),
    ("thumbnail", b"x", "string, integer, float and boolean columns only"),
    ("embedded_at", "2024-01-01", "string, integer, float and boolean columns only"),
])
def test_values_must_have_the_columns_type(column, value, fix):
    with pytest.raises(FilterError, match=fix):
        Filter(equals={column: value}).to_sql(SCHEMA)


def test_float_and_bool_columns_and_non_finite_values():
    schema = pa.schema([("score", pa.float32()), ("flag", pa.bool_())])
    assert Filter(equals={"score": 2, "flag": False}).to_sql(schema) == "(score = 2.0) AND (flag = false)"
    for bad in (float("nan"), float("inf")):
        with pytest.raises(FilterError, match="finite"):
            Filter(equals={"score": bad}).to_sql(schema)
    with pytest.raises(FilterError, match="true or false"):
        Filter(equals={"flag": 1}).to_sql(schema)


def test_empty_lists_and_single_strings_are_refused():
    with pytest.raises(FilterError, match="match nothing"):
        Filter(doc_ids=[]).to_sql(SCHEMA)
    with pytest.raises(FilterError, match="wrap it in a list"):
        Filter(doc_ids="d1").to_sql(SCHEMA)
    with pytest.raises(FilterError, match="needs a list"):
        Filter(in_={"doc_id": "d1"}).to_sql(SCHEMA)


def test_valid_filters_compile_to_typed_quoted_conjunctions():
    assert Filter().to_sql(SCHEMA) is None and Filter().is_empty()
    sql = Filter(modality="image", equals={"source_version": 3, "model_id": "abc"},
                 in_={"source_version": [1, 2]}, doc_ids=["d-1", "O Brien"]).to_sql(SCHEMA)
    assert sql == ("(modality = 'image') AND (source_version = 3) AND (model_id = 'abc') AND "
                   "(source_version IN (1, 2)) AND (doc_id IN ('d-1', 'O Brien'))")


def test_compiled_filters_select_exactly_the_matching_rows():
    # Run the predicates on a real SQL engine over rows that include look-alike values.
    rows = pa.table({"doc_id": ["a", "b", "c", "x", "OR 1=1"], "modality": ["image", "text", "image", "text", "text"],
                     "source_version": [1, 1, 2, 3, 1]})
    con = duckdb.connect()
    con.register("t", rows)

    def ids(f: Filter) -> list[str]:
        return sorted(r[0] for r in con.sql(f"SELECT doc_id FROM t WHERE {f.to_sql(rows.schema)}").fetchall())

    assert ids(Filter(modality="image")) == ["a", "c"]
    assert ids(Filter(modality="text", equals={"source_version": 1})) == ["OR 1=1", "b"]
    assert ids(Filter(doc_ids=["c", "x", "zz"])) == ["c", "x"]
    # Text that looks like SQL but has no quote is just a value: it matches itself only.
    assert ids(Filter(equals={"doc_id": "OR 1=1"})) == ["OR 1=1"]


def test_filterable_columns_are_the_scalar_ones():
    assert filterable_columns(SCHEMA) == ["doc_id", "modality", "text", "caption", "content_sha256", "model_id",
                                          "source_version", "metadata"]


def test_cli_pairs_are_typed_by_the_column():
    assert parse_filter_pairs(["source_version=3", "modality=image", "doc_id=a=b"], SCHEMA) == {
        "source_version": 3, "modality": "image", "doc_id": "a=b"}
    with pytest.raises(FilterError, match="integer column"):
        parse_filter_pairs(["source_version=3 OR 1=1"], SCHEMA)
    with pytest.raises(FilterError, match="COLUMN=VALUE"):
        parse_filter_pairs(["source_version"], SCHEMA)
    with pytest.raises(FilterError, match="single quote"):
        parse_filter_pairs(["doc_id=x' OR 1=1 --"], SCHEMA)
    with pytest.raises(FilterError, match="not in the table"):
        parse_filter_pairs(["nope=1"], SCHEMA)


@pytest.mark.parametrize(("dtype", "low", "high"), [
    (pa.int64(), -(2**63), 2**63 - 1), (pa.int32(), -(2**31), 2**31 - 1), (pa.int8(), -128, 127),
    (pa.uint8(), 0, 255), (pa.uint64(), 0, 2**64 - 1)])
def test_integer_values_must_fit_the_columns_type(dtype, low, high):
    schema = pa.schema([pa.field("n", dtype)])
    for inside in (low, high, 0):
        assert Filter(equals={"n": inside}).to_sql(schema) is not None
        assert parse_filter_pairs([f"n={inside}"], schema) == {"n": inside}
    for outside in (low - 1, high + 1, 10**30):
        with pytest.raises(FilterError, match=rf"^filter value {outside} for 'n' is out of range: 'n' is {dtype} and "
                                              rf"holds {low}\.\.{high}; pass an integer in that range$"):
            parse_filter_pairs([f"n={outside}"], schema)
        with pytest.raises(FilterError, match="out of range"):
            Filter(in_={"n": [0, outside]}).to_sql(schema)


def test_the_extreme_int64_values_select_their_rows():
    # "-9223372036854775808" is minus a number int64 cannot hold to SQL parsers: it is spelled
    # so that both DuckDB and Lance read it as the int64 minimum.
    rows = pa.table({"n": pa.array([-(2**63), 2**63 - 1, 0], pa.int64())})
    con = duckdb.connect()
    con.register("t", rows)
    for value in (-(2**63), 2**63 - 1):
        where = Filter(equals={"n": value}).to_sql(rows.schema)
        assert con.sql(f"SELECT n FROM t WHERE {where}").fetchall() == [(value,)]


def test_rrf_by_hand():
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["c", "a", "d"]])
    expected = {"a": 1 / 61 + 1 / 62, "b": 1 / 62, "c": 1 / 63 + 1 / 61, "d": 1 / 63}
    assert [d for d, _ in fused] == ["a", "c", "b", "d"]
    for d, s in fused:
        assert s == pytest.approx(expected[d], abs=1e-15)
    # Equal fused scores: the better best rank first, then doc_id.
    assert [d for d, _ in reciprocal_rank_fusion([["x", "y"], ["y", "x"]])] == ["x", "y"]
    assert reciprocal_rank_fusion([[], []]) == []
    assert RRF_K == 60
    assert reciprocal_rank_fusion([["a"]], rrf_k=0)[0][1] == 1.0


@pytest.mark.parametrize("sql", ["SELECT 1", "select * from documents limit 3;", "WITH a AS (SELECT 1) SELECT * FROM a",
                                 "DESCRIBE documents", "SHOW TABLES", "SUMMARIZE documents", "FROM documents"])
def test_read_only_statements_pass(sql):
    assert check_read_only(sql) == sql


@pytest.mark.parametrize(("sql", "why"), [
    ("INSERT INTO documents VALUES (1)", "INSERT statement is refused"),
    ("DELETE FROM documents", "DELETE statement is refused"),
    ("UPDATE documents SET doc_id = 'x'", "UPDATE statement is refused"),
    ("DROP TABLE documents", "DROP statement is refused"),
    ("CREATE TABLE x AS SELECT 1", "CREATE statement is refused"),
    ("COPY documents TO 'out.csv'", "COPY statement is refused"),
    ("ATTACH 'other.db'", "ATTACH statement is refused"),
    ("SET enable_external_access = true", "SET statement is refused"),
    ("SELECT 1; DROP TABLE documents", r"exactly one statement, got 2 \(SELECT, DROP\)"),
    ("SELECT 1; SELECT 2", "exactly one statement"),
    ("SELEC 1", "does not parse"),
    ("   ", "no SQL given"),
])
def test_writes_and_multiple_statements_are_refused(sql, why):
    with pytest.raises(SqlError, match=why):
        check_read_only(sql)


def test_output_formats():
    cols = ["doc_id", "score", "vector", "thumb"]
    rows = [("a|b", 0.5, [0.1, 0.2, 0.3, 0.4, 0.5], b"\xff\xd8"), ("c", None, None, None)]
    text = format_text_table(cols, rows).splitlines()
    assert text[0].split() == cols and len(text) == 4
    assert "[0.1, 0.2, 0.3, … 5 values]" in text[2] and "<2 bytes>" in text[2] and "NULL" in text[3]
    md = format_markdown(cols, rows).splitlines()
    assert md[1] == "| --- | ---: | --- | --- |" and "a\\|b" in md[2]
    assert format_csv(cols, rows).splitlines()[1] == 'a|b,0.5,"[0.1, 0.2, 0.3, 0.4, 0.5]",/9g='
    import json

    assert json.loads(format_json(cols, rows))[1] == {"doc_id": "c", "score": None, "vector": None, "thumb": None}
