"""Result rows as text for people and machines, shared by ``ciea sql`` and ``ciea search``:
an aligned plain-text table, Markdown, CSV and JSON (:func:`render` picks one).

The text forms (table, Markdown) show one short cell per value (:func:`display`): vectors
and images are summarised, long text is cut with ``…``. The machine forms (CSV, JSON) keep
every value whole: bytes as base64, NaN and infinities as null.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
from collections.abc import Sequence
from datetime import date, datetime
from typing import Any, Literal

Format = Literal["table", "csv", "json", "markdown"]


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split())  # one line per row: newlines and tabs become spaces
    return text if len(text) <= width else text[: width - 1] + "…"


def display(value: Any, width: int) -> str:
    """A value as one short human-readable cell (vectors and images summarised)."""
    if value is None:
        return "NULL"
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        if len(value) > 4 and all(isinstance(v, (int, float)) or v is None for v in value):
            head = ", ".join("NULL" if v is None else f"{v:.3g}" for v in value[:3])
            return f"[{head}, … {len(value)} values]"
        return _cut(json.dumps(value, default=str), width)
    if isinstance(value, dict):
        return _cut(json.dumps(value, default=str), width)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return _cut(str(value), width)


def _plain(value: Any) -> Any:
    """A value for csv / json: complete (not cut), bytes as base64, NaN as null."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _numeric(rows: Sequence[tuple], i: int) -> bool:
    vals = [r[i] for r in rows if r[i] is not None]
    return bool(vals) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)


def format_text_table(columns: Sequence[str], rows: Sequence[tuple], width: int = 60) -> str:
    """An aligned plain-text table (numbers right-aligned)."""
    cells = [[display(v, width) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    right = [_numeric(rows, i) for i in range(len(columns))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True)).rstrip()

    return "\n".join([line(columns), line(["─" * w for w in widths]), *(line(r) for r in cells)])


def format_markdown(columns: Sequence[str], rows: Sequence[tuple], width: int = 60) -> str:
    """A Markdown table (numbers right-aligned, ``|`` in cells escaped)."""
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    right = [_numeric(rows, i) for i in range(len(columns))]
    out = ["| " + " | ".join(esc(c) for c in columns) + " |",
           "| " + " | ".join("---:" if r else "---" for r in right) + " |"]
    out += ["| " + " | ".join(esc(display(v, width)) for v in r) + " |" for r in rows]
    return "\n".join(out)


def format_csv(columns: Sequence[str], rows: Sequence[tuple]) -> str:
    """CSV with a header row; lists and objects as JSON, NULL as an empty cell."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if v is None else json.dumps(p) if isinstance(p := _plain(v), (list, dict)) else p for v in r])
    return buf.getvalue().rstrip("\n")


def format_json(columns: Sequence[str], rows: Sequence[tuple]) -> str:
    """A JSON list with one object per row."""
    return json.dumps([{c: _plain(v) for c, v in zip(columns, r, strict=True)} for r in rows], indent=1,
                      ensure_ascii=False)


def render(columns: Sequence[str], rows: Sequence[tuple], fmt: Format, width: int = 60) -> str:
    """The rows in ``fmt``: ``table``, ``csv``, ``json`` or ``markdown``."""
    if fmt == "csv":
        return format_csv(columns, rows)
    if fmt == "json":
        return format_json(columns, rows)
    if fmt == "markdown":
        return format_markdown(columns, rows, width)
    return format_text_table(columns, rows, width)
