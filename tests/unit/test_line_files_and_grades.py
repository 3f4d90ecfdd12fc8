"""Line files and qrels grades (no Ray): every malformed grade is a quarantined ``BadQrel``,
never an exception; a line over the cap is read past unheld (bounded memory) and is one
``line_too_long`` record; ranged reading matches a plain split whatever the line lengths."""

from __future__ import annotations

import io
import json
import re
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.ingest.sources.base import (
    GRADE_MAX,
    GRADE_MIN,
    BadQrel,
    OverlongLine,
    byte_ranges,
    iter_json_records,
    iter_lines,
    parse_grade,
    parse_json_line,
)
from pipelines.ingest.sources.beir import BeirQueries
from pipelines.ingest.sources.webqa import parse_qrels

BAD_GRADES = ["+-5", "-+5", "²", "٣", "５", "1.0", "1e3", "1_0", "0x10", "", "2147483648", "-2147483649",
              "9" * 5000, "five", "+", "-", "1 2", "nan", "inf"]
GOOD_GRADES = {"0": 0, "1": 1, "+2": 2, "-1": -1, "007": 7, "2147483647": GRADE_MAX, "-2147483648": GRADE_MIN,
               "0000000000000000000042": 42}


def write_beir(root, grades: list[str]) -> BeirQueries:
    (root / "qrels").mkdir(parents=True)
    (root / "queries.jsonl").write_text(json.dumps({"_id": "q", "text": "t"}) + "\n")
    lines = ["query-id\tcorpus-id\tscore"] + [f"q\td{i}\t{g}" for i, g in enumerate(grades)]
    (root / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return BeirQueries(str(root))


def test_every_malformed_grade_form_is_a_bad_grade_row(tmp_path):
    b = write_beir(tmp_path / "b", BAD_GRADES + list(GOOD_GRADES))
    rows = list(b.iter_qrels("test"))
    assert len(rows) == len(BAD_GRADES) + len(GOOD_GRADES)
    bad, good = rows[: len(BAD_GRADES)], rows[len(BAD_GRADES) :]
    assert all(isinstance(r, BadQrel) and r.reason == "bad_grade" for r in bad), bad
    assert "beyond int32" in bad[BAD_GRADES.index("2147483648")].detail
    assert "empty" in bad[BAD_GRADES.index("")].detail
    assert [r[2] for r in good] == list(GOOD_GRADES.values())


def test_webqa_qrels_files_quarantine_bad_grades_too():
    lines = [(0, b"q1 d1 1"), (8, b"q1 0 d2 +-5"), (20, "q2 d3 \u00b2".encode()), (30, b"q2 d4 99999999999"),
             (50, b"only two"), (60, b"q3 d5 2")]
    got = list(parse_qrels(iter(lines), "test_qrels.txt"))
    assert got[0] == ("q1", "d1", 1) and got[-1] == ("q3", "d5", 2)
    assert [r.reason for r in got[1:-1]] == ["bad_grade", "bad_grade", "bad_grade", "bad_qrel"]
    assert got[1].record_ref == "test_qrels.txt@8"


GRADE_TEXT = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                   blacklist_characters="\t\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"), max_size=14),
    st.integers(-(2**40), 2**40).map(str),
    st.integers(GRADE_MIN, GRADE_MAX).map(lambda i: f"{'+' if i >= 0 else ''}{i}"),
)


@settings(max_examples=200, deadline=None)
@given(grades=st.lists(GRADE_TEXT, min_size=1, max_size=12))
def test_random_grades_valid_int32_accepted_everything_else_quarantined(tmp_path_factory, grades):
    # A grade is its field as the qrels line splits it (tabs, stripped).
    grades = [g.strip() for g in grades]
    b = write_beir(tmp_path_factory.mktemp("beir"), grades)
    rows = list(b.iter_qrels("test"))
    assert len(rows) == len(grades)  # in = accepted + quarantined, line for line
    for grade, row in zip(grades, rows):
        valid = re.fullmatch(r"[+-]?[0-9]+", grade, re.ASCII) is not None and \
            GRADE_MIN <= int(grade) <= GRADE_MAX
        if valid:
            assert row == ("q", row[1], int(grade))
        else:
            assert isinstance(row, BadQrel) and row.reason == "bad_grade", (grade, row)
        assert parse_grade(grade)[0] == (int(grade) if valid else None)


def reference_lines(data: bytes, cap: int) -> list[tuple[int, bytes, int | None]]:
    """``(offset, line, length when over the cap)`` by a plain split."""
    out, pos = [], 0
    segments = data.split(b"\n")
    for i, raw in enumerate(segments):
        if i == len(segments) - 1 and not raw:
            break  # the file ends with "\n": no empty last line
        over = len(raw) > cap
        out.append((pos, (raw[:1024] if over else raw).rstrip(b"\r"), len(raw) if over else None))
        pos += len(raw) + 1
    return out


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300).map(lambda b: b.replace(b"\x00", b"\n")) | st.text("ab\n\r", max_size=300).map(
    str.encode), shard=st.integers(1, 64), cap=st.integers(1, 40))
def test_ranged_reading_matches_a_plain_split(data, shard, cap):
    got = []
    for lo, hi in byte_ranges(len(data), shard):
        for offset, line in iter_lines(io.BytesIO(data), lo, hi, cap):
            got.append((offset, bytes(line), line.length if isinstance(line, OverlongLine) else None))
    assert got == reference_lines(data, cap)


def test_a_huge_line_is_read_past_in_bounded_memory_and_quarantined(tmp_path):
    path = tmp_path / "big.jsonl"
    huge = 64 << 20
    with path.open("wb") as f:
        f.write(b'{"_id": "a", "text": "before"}\n')
        f.write(b'{"_id": "huge", "text": "')
        for _ in range(huge // (1 << 20)):
            f.write(b"x" * (1 << 20))
        f.write(b'"}\n{"_id": "b", "text": "after"}\n')
    size = path.stat().st_size
    with path.open("rb") as f:
        tracemalloc.start()
        got = [(ref, value, error["error"] if error else None)
               for ref, value, error, _ in iter_json_records(f, 0, size, "big.jsonl", max_line_bytes=1 << 20)]
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert [g[2] for g in got] == [None, "line_too_long", None]
    assert got[0][1]["text"] == "before" and got[2][1]["text"] == "after"
    assert got[1][0] == "big.jsonl@31"
    # A 64 MiB line over a 1 MiB cap: the reader holds the cap and a chunk or two, not the line.
    assert peak < 4 << 20, f"peak {peak} bytes reading a {huge}-byte line"


def test_beir_queries_and_qrels_take_the_line_cap(tmp_path):
    root = tmp_path / "b"
    (root / "qrels").mkdir(parents=True)
    (root / "queries.jsonl").write_text(
        json.dumps({"_id": "q1", "text": "ok"}) + "\n" + json.dumps({"_id": "q2", "text": "y" * 5000}) + "\n")
    (root / "qrels" / "test.tsv").write_text("q1\td1\t1\nq2\td2\t1\n" + "q3\td3\t" + "1" * 5000 + "\n")
    b = BeirQueries(str(root), max_line_bytes=1000)
    qrels = list(b.iter_qrels("test"))
    assert qrels[:2] == [("q1", "d1", 1), ("q2", "d2", 1)]
    assert isinstance(qrels[2], BadQrel) and qrels[2].reason == "line_too_long"
    assert "source.max_line_mb" in qrels[2].detail
    queries = list(b.iter_queries("test"))
    assert [(q.qid, q.error) for q in queries] == [("q1", None), (None, "line_too_long"), ("q2", "missing_query")]


@pytest.mark.parametrize("grade", ["+-5", "²", "2147483648"])
def test_grade_detail_names_the_line(grade):
    value, problem = parse_grade(grade)
    assert value is None and problem


@pytest.mark.parametrize("line", [b'{"_id": ' + b"1" * 5000 + b"}", b"[" * 100_000 + b"]" * 100_000,
                                  b'{"_id": "q", "text": "\xff"}'])
def test_a_json_line_python_cannot_take_is_a_bad_line_not_an_error(line):
    value, reason, detail = parse_json_line(line)
    assert value is None and reason in ("bad_json", "not_utf8") and "\n" not in detail
