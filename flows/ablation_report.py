"""The ablation table as files: CSV and a PNG of one metric against the swept value.

matplotlib's object API with the Agg canvas: no pyplot state, no display needed.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def columns(rows: Sequence[Mapping[str, Any]], swept: Sequence[str]) -> list[str]:
    """experiment, status, the swept keys, every metric (first-seen order), error, rev."""
    fixed_head = ["experiment", "status", *swept]
    fixed_tail = ["error", "rev"]
    metric_columns: list[str] = []
    for row in rows:
        metric_columns += [k for k in row if k not in fixed_head + fixed_tail + metric_columns]
    return fixed_head + metric_columns + fixed_tail


def write_csv(rows: Sequence[Mapping[str, Any]], header: Sequence[str], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(header), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in header})
    return path


def default_metric(rows: Sequence[Mapping[str, Any]], metric_columns: Sequence[str]) -> str | None:
    """The first numeric metric of the last stage that reported any (e.g. evaluate.knn.top1)."""
    numeric = [c for c in metric_columns if any(_is_number(r.get(c)) for r in rows)]
    if not numeric:
        return None
    last_stage = numeric[-1].split(".", 1)[0]
    return next(c for c in numeric if c.split(".", 1)[0] == last_stage)


def plot(rows: Sequence[Mapping[str, Any]], swept: Sequence[str], metric: str,
         path: Path) -> Path | None:
    """`metric` against the first swept key, one line per combination of the other keys.

    Failed runs have no point; a numeric x axis spanning 100x or more is logarithmic
    (NCE m from 1 to 4096). Returns None when no run produced `metric`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = [r for r in rows if r.get("status") == "succeeded" and _is_number(r.get(metric))]
    if not points:
        return None
    key, others = swept[0], list(swept[1:])
    values = list(dict.fromkeys(r[key] for r in rows))
    numeric_x = all(_is_number(v) for v in values)
    position = {repr(v): (float(v) if numeric_x else i) for i, v in enumerate(values)}
    figure = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for group in dict.fromkeys(tuple(r.get(o) for o in others) for r in points):
        series = sorted((position[repr(r[key])], float(r[metric])) for r in points
                        if tuple(r.get(o) for o in others) == group)
        label = ", ".join(f"{o.removeprefix('params.')}={g}" for o, g in zip(others, group))
        axes.plot([x for x, _ in series], [y for _, y in series], marker="o", label=label or None)
    low, high = min(position.values()), max(position.values())
    if numeric_x and low > 0 and high / low >= 100:
        axes.set_xscale("log")
    if numeric_x:
        axes.set_xticks(sorted(position.values()), [str(v) for v in sorted(values)])
    else:
        axes.set_xticks(list(position.values()), [str(v) for v in values])
    axes.set_xlabel(key.removeprefix("params."))
    axes.set_ylabel(metric)
    axes.set_title(f"{metric} vs {key.removeprefix('params.')}")
    axes.grid(True, alpha=0.3)
    if others:
        axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _csv_value(value: Any) -> Any:
    return "" if value is None else value
