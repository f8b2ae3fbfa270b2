"""Per-epoch training history: a CSV table and a PNG of its curves.

Both files are written atomically (temporary file in the same folder, then `os.replace`), so a
crash mid-write never leaves DVC a truncated plot or table. Matplotlib is drawn through
`Figure` + `FigureCanvasAgg` directly: no global backend switch and no pyplot state, and it is
imported inside `plot_history` so that importing this module stays cheap and side-effect free.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from instdisc.io import atomic_write

log = logging.getLogger(__name__)


def write_history_csv(rows: list[dict[str, Any]], path: Path | str) -> None:
    """One row per epoch; the header is the union of the rows' keys in first-seen order.

    A key missing from a row is written as an empty cell. Parent folders are created.
    """
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(Path(path), lambda fh: fh.write(buffer.getvalue().encode()))


def read_history_csv(path: Path | str) -> list[dict[str, float]]:
    """Rows of a history CSV as floats; empty or non-numeric cells become NaN."""
    with open(path, newline="") as fh:
        return [{key: _to_float(value) for key, value in row.items()}
                for row in csv.DictReader(fh)]


def plot_history(csv_path: Path | str, png_path: Path | str,
                 columns: Sequence[str] = ("loss", "knn_top1")) -> None:
    """One subplot per column of the history CSV against `epoch`, saved as a PNG.

    Columns absent from the CSV are skipped with a warning (e.g. `knn_top1` when monitoring is
    off); ValueError if the CSV has no rows, no `epoch` column or none of `columns`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_history_csv(csv_path)
    if not rows:
        raise ValueError(f"history file {str(csv_path)!r} has no rows to plot")
    if "epoch" not in rows[0]:
        raise ValueError(f"history file {str(csv_path)!r} has no 'epoch' column; "
                         f"columns: {sorted(rows[0])}")
    present = [c for c in columns if c in rows[0]]
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        log.warning("history %s has no column(s) %s; not plotted", csv_path, missing)
    if not present:
        raise ValueError(f"none of the columns {list(columns)} is in {str(csv_path)!r}; "
                         f"columns: {sorted(rows[0])}")
    figure = Figure(figsize=(4.0 * len(present), 3.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(present), squeeze=False)[0]
    for ax, column in zip(axes, present):
        points = [(r["epoch"], r[column]) for r in rows
                  if math.isfinite(r["epoch"]) and math.isfinite(r[column])]
        if points:
            epochs, values = zip(*points)
            ax.plot(epochs, values, marker="o" if len(points) < 30 else None)
        else:
            ax.text(0.5, 0.5, "no finite values", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_title(column)
        ax.set_xlabel("epoch")
        ax.set_ylabel(column)
        ax.grid(True, alpha=0.3)
    atomic_write(Path(png_path), lambda fh: figure.savefig(fh, format="png", dpi=100))


def plot_monitor(rows: Sequence[dict[str, float]], png_path: Path | str,
                 columns: Sequence[str], titles: dict[str, str] | None = None) -> None:
    """One subplot per column of `rows` (dicts with "epoch"; epoch 0 = the random-init encoder,
    drawn as a hollow marker) against epoch, saved as a PNG; `titles` per column. Columns no row
    has a finite value of are left out; with none left the figure says so (the file always
    exists: it is a DVC output)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    present = [c for c in columns if any(math.isfinite(r.get(c, math.nan)) for r in rows)]
    titles = titles or {}
    figure = Figure(figsize=(3.4 * max(1, len(present)), 3.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, max(1, len(present)), squeeze=False)[0]
    if not present:
        axes[0].text(0.5, 0.5, "monitor off: no held-out images\nor labels to score",
                     ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_axis_off()
    for ax, column in zip(axes, present):
        points = [(r["epoch"], r[column]) for r in rows if math.isfinite(r.get(column, math.nan))]
        epochs, values = zip(*points)
        ax.plot(epochs, values, marker="o" if len(points) < 30 else None, markersize=3)
        if epochs[0] == 0:
            ax.plot([0], [values[0]], marker="o", markersize=8, fillstyle="none", color="C3",
                    linestyle="none", label="random init")
            ax.legend(loc="best", fontsize="small")
        ax.set_title(titles.get(column, column), fontsize="medium")
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    atomic_write(Path(png_path), lambda fh: figure.savefig(fh, format="png", dpi=100))


def _to_float(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "") else math.nan
    except ValueError:
        return math.nan
