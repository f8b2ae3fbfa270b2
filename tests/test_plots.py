"""History CSV round trip and PNG output of `instdisc.plots`."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from instdisc.plots import plot_history, read_history_csv, write_history_csv

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def history(epochs=3):
    return [{"epoch": e + 1, "loss": 8.0 / (e + 1), "knn_top1": 10.0 * e, "z": math.nan}
            for e in range(epochs)]


def test_history_csv_round_trip(tmp_path):
    rows = history() + [{"epoch": 4, "loss": 1.5, "lr": 0.003}]  # a late new column
    path = tmp_path / "deep" / "history.csv"
    write_history_csv(rows, path)
    assert path.read_text().splitlines()[0] == "epoch,loss,knn_top1,z,lr"
    back = read_history_csv(path)
    assert [r["epoch"] for r in back] == [1.0, 2.0, 3.0, 4.0]
    assert [r["loss"] for r in back] == pytest.approx([8.0, 4.0, 8.0 / 3, 1.5])
    assert math.isnan(back[0]["z"]) and math.isnan(back[3]["knn_top1"])  # nan and empty cell
    assert back[3]["lr"] == 0.003 and math.isnan(back[0]["lr"])
    assert [p.name for p in path.parent.iterdir()] == ["history.csv"]  # no temp file left


def test_write_history_csv_replaces_previous_file(tmp_path):
    path = tmp_path / "history.csv"
    write_history_csv(history(3), path)
    write_history_csv(history(1), path)
    assert len(read_history_csv(path)) == 1


def test_plot_history_writes_png(tmp_path):
    csv_path, png_path = tmp_path / "h.csv", tmp_path / "plots" / "h.png"
    write_history_csv(history(), csv_path)
    plot_history(csv_path, png_path, columns=("loss", "knn_top1", "z"))  # z: all NaN
    assert png_path.read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(p.name for p in png_path.parent.iterdir()) == ["h.png"]


def test_plot_history_skips_missing_columns_and_rejects_none(tmp_path, caplog):
    csv_path = tmp_path / "h.csv"
    write_history_csv([{"epoch": 1, "loss": 2.0}], csv_path)
    plot_history(csv_path, tmp_path / "h.png")  # default columns: knn_top1 is absent
    assert (tmp_path / "h.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "knn_top1" in caplog.text
    with pytest.raises(ValueError, match=r"none of the columns \['acc'\]"):
        plot_history(csv_path, tmp_path / "x.png", columns=("acc",))
    write_history_csv([], csv_path)
    with pytest.raises(ValueError, match=r"has no rows to plot"):
        plot_history(csv_path, tmp_path / "x.png")


def test_import_does_not_touch_matplotlib():
    code = "import sys, instdisc.plots; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
