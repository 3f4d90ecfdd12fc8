"""The evaluation report of several variants side by side: ``report.json`` (the data),
``report.md`` (tables for people) and PNG bar charts (one per metric, groups on the x axis,
one bar per variant).

The Markdown and the charts are rendered from the JSON document alone, so a report can be
re-rendered (or merged with another) without re-running any search. Values are fractions
in the JSON and percentages (x100, two decimals) in the Markdown and the charts, like
:func:`pipelines.query.metrics.format_table`.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipelines.query.metrics import OVERALL, RetrievalReport
from pipelines.store.secrets import write_json

logger = logging.getLogger(__name__)

#: The group of ``metrics.webqa_image_protocol=release`` (``pipelines.query.evaluation.IMAGE_INDEX_GROUP``;
#: not imported from there, which would pull in the model to render a report).
IMAGE_INDEX_GROUP = "image-index"

__all__ = ["REPORT_VERSION", "build_report", "chart_filename", "plot_metric", "render_markdown", "write_report"]

REPORT_VERSION = 1


def _finite(value: float | None) -> float | None:
    """NaN (no query evaluated) → None: JSON has no NaN."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _clean(values: Mapping[str, float]) -> dict[str, float | None]:
    return {k: _finite(v) for k, v in values.items()}


def build_report(
    reports: Mapping[str, RetrievalReport], variants: Mapping[str, Mapping[str, Any]],
    metrics: Sequence[str], meta: Mapping[str, Any], include_per_query: bool = False,
) -> dict[str, Any]:
    """The JSON document of one evaluation.

    Args:
        reports: variant name → its report, in display order.
        variants: variant name → what it is (source, mode, model_id, version, failures...).
        metrics: metric names in display order.
        meta: split, root, query counts, ... (copied as is).
        include_per_query: also store every query's values.

    Returns:
        ``{"version", "created_at", "meta", "metrics", "groups", "variants": {name:
        {"info", "num_queries", "metrics", "by_group", "group_counts", ...}}}`` where
        ``groups`` lists :data:`~pipelines.query.metrics.OVERALL` then every group label seen.
    """
    groups: list[str] = [OVERALL]
    for rep in reports.values():
        groups += [g for g in rep.by_group if g not in groups]
    out: dict[str, Any] = {
        "version": REPORT_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "meta": dict(meta), "metrics": list(metrics), "groups": groups, "variants": {},
    }
    for name, rep in reports.items():
        d = rep.to_dict(include_per_query=include_per_query)
        d["metrics"] = _clean(d["metrics"])
        d["by_group"] = {g: _clean(m) for g, m in d["by_group"].items()}
        if include_per_query:
            d["per_query"] = {q: _clean(m) for q, m in d["per_query"].items()}
        out["variants"][name] = {"info": dict(variants.get(name, {})), **d}
    return out


def _value(doc: Mapping[str, Any], variant: str, metric: str, group: str) -> float | None:
    v = doc["variants"][variant]
    values = v["metrics"] if group == OVERALL else v["by_group"].get(group, {})
    return values.get(metric)


def _count(doc: Mapping[str, Any], group: str) -> int | None:
    """Queries in ``group``; the same for every variant (they all answer every query)."""
    for v in doc["variants"].values():
        n = v["num_queries"] if group == OVERALL else v["group_counts"].get(group)
        if n is not None:
            return n
    return None


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100.0 * value:.2f}"


def _table(doc: Mapping[str, Any], group: str) -> list[str]:
    """One Markdown table: a row per variant, a column per metric, the best in bold."""
    metrics, names = doc["metrics"], list(doc["variants"])
    best = {}
    for m in metrics:
        vals = [x for x in (_value(doc, n, m, group) for n in names) if x is not None]
        best[m] = max(vals) if vals and len(names) > 1 else None
    lines = ["| variant | " + " | ".join(metrics) + " |", "| --- |" + " ---: |" * len(metrics)]
    for n in names:
        cells = []
        for m in metrics:
            v = _value(doc, n, m, group)
            cells.append(f"**{_pct(v)}**" if v is not None and v == best[m] else _pct(v))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def _describe(info: Mapping[str, Any]) -> str:
    parts = [f"`{info['source']}`" if info.get("source") else None,
             f"mode {info['mode']}" if info.get("mode") else None,
             f"version {info['version']}" if info.get("version") is not None else None,
             f"model_id `{info['model_id']}`" if info.get("model_id") else None]
    if info.get("failed_queries"):
        parts.append(f"**{info['failed_queries']} failed searches (scored 0)**")
    if info.get("missing_relevant_docs"):
        parts.append(f"{info['missing_relevant_docs']} relevant documents not in it")
    if info.get("failed_documents"):
        parts.append(f"{info['failed_documents']} unreadable documents")
    return ", ".join(p for p in parts if p)


def render_markdown(doc: Mapping[str, Any], charts: Mapping[str, str] | None = None) -> str:
    """``report.md``: an overall table, one table per group, the variants, the charts.

    Args:
        doc: a :func:`build_report` document.
        charts: metric → chart file name (relative to the Markdown file).
    """
    meta = doc.get("meta", {})
    title = f"# Retrieval evaluation: split `{meta['split']}`" if meta.get("split") else "# Retrieval evaluation"
    lines = [title, ""]
    facts = [f"{k.replace('_', ' ')}: `{v}`" for k, v in meta.items() if k != "split" and v is not None]
    facts.append(f"created {doc['created_at']}")
    lines += ["; ".join(facts) + ".", "",
              "Values are percentages (mean over the judged queries), computed by trec_eval (pytrec_eval) "
              "on the runs' scores, equal scores ranked by doc id descending as trec_eval ranks them; "
              "the best variant per column is in bold. Recall@k is the share of a query's relevant documents "
              "in the top k (trec_eval recall_k: with several, Recall@1 is at most 1/#relevant); Success@k is 1 "
              "when any relevant document is in the top k (success_k: what the release calls Recall@1).", ""]
    for group in doc["groups"]:
        head = "Overall" if group == OVERALL else f"`{group}`"
        if group == IMAGE_INDEX_GROUP:
            head += ": image-answer queries ranked against the image documents alone (the release's WebQA-Image)"
        lines += [f"## {head} ({_count(doc, group)} queries)", "", *_table(doc, group), ""]
    lines += ["## Variants", ""]
    lines += [f"- **{n}**: {_describe(v['info'])}" for n, v in doc["variants"].items()]
    lines.append("")
    for metric, fname in (charts or {}).items():
        lines += [f"![{metric} per group]({fname})", ""]
    return "\n".join(lines)


def chart_filename(metric: str) -> str:
    """``"MRR@10"`` → ``"mrr_at_10.png"``."""
    return re.sub(r"[^a-z0-9_]+", "_", metric.lower().replace("@", "_at_")).strip("_") + ".png"


def plot_metric(doc: Mapping[str, Any], metric: str, path: str | Path) -> Path:
    """A grouped bar chart of ``metric``: groups on the x axis, one bar per variant.

    Raises:
        ValueError: ``metric`` is not in the report.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    if metric not in doc["metrics"]:
        raise ValueError(f"metric {metric!r} is not in the report; choose one of {doc['metrics']}")
    names, groups = list(doc["variants"]), list(doc["groups"])
    width = 0.8 / max(1, len(names))
    # Wide enough for every bar's label; capped so a long report stays readable.
    fig, ax = plt.subplots(figsize=(min(18.0, max(6.0, 1.0 + len(groups) * (0.35 * len(names) + 0.6))), 4.5))
    try:
        for i, name in enumerate(names):
            vals = [_value(doc, name, metric, g) for g in groups]
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(groups))]
            bars = ax.bar(xs, [0.0 if v is None else 100.0 * v for v in vals], width, label=name)
            ax.bar_label(bars, labels=[_pct(v) for v in vals], fontsize=7, padding=1)
        ax.set_xticks(range(len(groups)), [f"{g}\n(n={_count(doc, g)})" for g in groups], fontsize=8)
        ax.set_ylabel(f"{metric} (%)")
        ax.set_ylim(0, 118)  # headroom for the legend above the 100 % line
        ax.set_yticks(range(0, 101, 20))
        split = doc.get("meta", {}).get("split")
        ax.set_title(f"{metric} by group" + (f", split {split}" if split else ""))
        ax.legend(fontsize=8, loc="upper center", ncols=min(6, len(names)), frameon=False)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def write_report(doc: Mapping[str, Any], out_dir: str | Path, chart_metrics: Sequence[str] = ("MRR@10",)) -> dict[str, str]:
    """Writes ``report.json``, the charts and ``report.md`` into ``out_dir``.

    Returns:
        What was written: ``{"json": path, "markdown": path, "<metric>": png path, ...}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": str(out / "report.json")}
    write_json(out / "report.json", doc, sort_keys=False, allow_nan=False)
    charts = {}
    for metric in chart_metrics:
        charts[metric] = chart_filename(metric)
        written[metric] = str(plot_metric(doc, metric, out / charts[metric]))
    (out / "report.md").write_text(render_markdown(doc, charts))
    written["markdown"] = str(out / "report.md")
    return written
