"""The paper's Table 1 as one command: every objective on one dataset and config, our kNN top-1
beside the paper's (Wu et al. 2018, arXiv:1805.01978, Table 1: ResNet-18 on CIFAR-10).

    python -m flows.table1 --source ../shared/data/cifar10/cifar10.zip            # CPU scale
    python -m flows.table1 --source .../cifar10.zip --scale full                    # the paper's
    python -m flows.table1 --source ... --rows softmax,nce-4096 --set pretrain.epochs=10

Each row is one `dvc exp run --temp` of the stages up to `evaluate` (prepare is shared through
DVC's run cache), so every row stays a versioned experiment (`dvc exp show`). The report in
`--out-dir` (default reports/table1): table1.csv and table1.md (ours, random init and the paper
per row, the config, the time) and table1.png (final kNN per row beside the paper's, and every
row's per-epoch kNN monitor), plus Prefect artifacts and MLflow runs.
"""

if __name__ == "__main__":  # entry point: offline defaults must precede the Prefect import
    from flows.settings import apply_defaults

    apply_defaults()

import argparse  # noqa: E402
import csv  # noqa: E402
import io  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from prefect import flow  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402

from flows import ablation_report, metrics  # noqa: E402
from flows.ablations import run_experiments  # noqa: E402
from flows.experiments import parse_sets  # noqa: E402

# Table 1 of arXiv:1805.01978 (kNN top-1 %, ResNet-18, CIFAR-10): (row, overrides, paper).
ROWS: list[tuple[str, dict[str, Any], float]] = [
    ("parametric", {"pretrain.loss": "parametric"}, 63.0),
    ("nce-1", {"pretrain.loss": "nce", "pretrain.num_negatives": 1}, 42.5),
    ("nce-10", {"pretrain.loss": "nce", "pretrain.num_negatives": 10}, 63.4),
    ("nce-512", {"pretrain.loss": "nce", "pretrain.num_negatives": 512}, 78.4),
    ("nce-4096", {"pretrain.loss": "nce", "pretrain.num_negatives": 4096}, 80.4),
    ("softmax", {"pretrain.loss": "softmax"}, 80.8),
]
# `cpu`: 10% of every training class, quarter width, 30 epochs at a constant lr (each row a few
# minutes on 2 cores); `full`: the paper's recipe (all images, full width, 200 epochs, lr x0.1 at
# 120 and 160). Both: batch 128, tau 0.1, SGD lr 0.03, weighted kNN with k = 200.
SCALES: dict[str, dict[str, Any]] = {
    "cpu": {"prepare.train_fraction": 0.1, "pretrain.width": 0.25, "pretrain.epochs": 30,
            "pretrain.lr_milestones": []},
    "full": {"prepare.train_fraction": 1.0, "pretrain.width": 1.0, "pretrain.epochs": 200,
             "pretrain.lr_milestones": [120, 160]},
}
# The CIFAR-10 recipe of docs/fidelity.md's ablation (params.yaml's augmentation is tuned for the
# embedded set, where colour is a nuisance): PyTorch's default init, no hue jitter, jitter p 0.8.
COMMON = {"pretrain.batch_size": 128, "pretrain.temperature": 0.1, "pretrain.lr": 0.03,
          "pretrain.lr_gamma": 0.1, "pretrain.init": "pytorch", "pretrain.hue": 0.0,
          "pretrain.color_jitter_prob": 0.8, "pretrain.normalization": "dataset",
          "pretrain.z_estimate": "auto", "evaluate.k": 200, "evaluate.sigma": 0.0}
METRIC, BASELINE = "evaluate.knn.top1", "evaluate.random_init.knn.top1"


def config_for(source: str, scale: str, repo: Path,
               fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    """The overrides every row shares: scale, common recipe, absolute source, then `fixed`."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale!r}")
    if source != "synthetic":
        path = Path(source) if Path(source).is_absolute() else (repo / source)
        if not path.exists():
            raise ValueError(f"source {source!r} does not exist (resolved to {path})")
        source = str(path.resolve())  # temp experiments run in a copy of the repository
    return {**SCALES[scale], **COMMON, "prepare.source": source, **(fixed or {})}


def select_rows(names: list[str] | None) -> list[tuple[str, dict[str, Any], float]]:
    if not names:
        return ROWS
    known = {row[0]: row for row in ROWS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown Table 1 rows {unknown}; allowed: {list(known)}")
    return [known[n] for n in names]


@flow(name="instdisc-table1")
def table1(source: str, repo: str = ".", scale: str = "cpu", rows: list[str] | None = None,
           fixed: dict[str, Any] | None = None, out_dir: str = "reports/table1",
           retries: int = 1, track: bool = True) -> dict[str, Any]:
    """Run the Table 1 rows as DVC experiments and write the report; returns its paths/rows."""
    root = Path(repo).resolve()
    config = config_for(source, scale, root, fixed)
    chosen = select_rows(rows)
    combos = [row_overrides for _, row_overrides, _ in chosen]
    results = run_experiments(root, combos, fixed=config, name_prefix="table1", title="table1",
                              tags={"instdisc.flow": "table1", "table1.scale": scale},
                              retries=retries, track=track, targets=["evaluate"])
    table = []
    for (label, _, paper), result in zip(chosen, results):
        table.append({"row": label, "ours": result.get(METRIC), "random_init":
                      result.get(BASELINE), "paper": paper,
                      "train_seconds": result.get("pretrain.train_seconds"),
                      "status": result["status"], "error": result["error"],
                      "experiment": result["experiment"],
                      "curve": monitor_curve(root, result.get("rev"))})
    return write_report(table, config, scale, root / out_dir)


def monitor_curve(repo: Path, rev: str | None) -> list[float]:
    """The per-epoch kNN monitor of an experiment, read from its committed history CSV."""
    if not rev:
        return []
    out = subprocess.run(["git", "show", f"{rev}:plots/pretrain_history.csv"], cwd=repo,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return []
    return [float(r["knn_top1"]) if r.get("knn_top1") not in (None, "") else float("nan")
            for r in csv.DictReader(io.StringIO(out.stdout))]


def write_report(table: list[dict[str, Any]], config: dict[str, Any], scale: str,
                 out_dir: Path) -> dict[str, Any]:
    """table1.csv, table1.md, table1.png and the Prefect artifacts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = ["row", "ours", "random_init", "paper", "train_seconds", "status", "experiment",
               "error"]
    csv_path = ablation_report.write_csv(table, columns, out_dir / "table1.csv")
    config_lines = "\n".join(f"- `{k}`: `{v}`" for k, v in config.items())
    markdown = (f"# Table 1 (arXiv:1805.01978), scale `{scale}`\n\n"
                f"kNN top-1 (%), k = 200; `paper` is ResNet-18 on all of CIFAR-10, 200 epochs.\n\n"
                f"{metrics.markdown_table(table, columns[:-1])}\n\n## Config\n{config_lines}\n")
    (out_dir / "table1.md").write_text(markdown)
    png = plot(table, out_dir / "table1.png")
    create_table_artifact([{k: r[k] for k in columns} for r in table], key="instdisc-table1",
                          description="Table 1: ours vs paper")
    create_markdown_artifact(markdown, key="instdisc-table1-report", description="Table 1")
    return {"rows": table, "csv": str(csv_path), "markdown": str(out_dir / "table1.md"),
            "plot": str(png)}


def plot(table: list[dict[str, Any]], path: Path) -> Path:
    """Left: final kNN per row, ours / random init / paper; right: kNN monitor per epoch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(figure)
    bars, curves = figure.subplots(1, 2)
    x = range(len(table))
    for offset, key, label in ((-0.27, "ours", "ours"), (0.0, "random_init", "random init"),
                               (0.27, "paper", "paper (full scale)")):
        values = [r[key] if isinstance(r[key], (int, float)) else 0.0 for r in table]
        bars.bar([i + offset for i in x], values, width=0.27, label=label)
    bars.set_xticks(list(x), [r["row"] for r in table], rotation=30)
    bars.set_ylabel("kNN top-1 (%)")
    bars.set_title("Table 1: final kNN top-1")
    bars.legend(fontsize=8)
    for r in table:
        if r["curve"]:
            curves.plot(range(1, len(r["curve"]) + 1), r["curve"], label=r["row"])
    curves.set_xlabel("epoch")
    curves.set_ylabel("kNN monitor top-1 (%)")
    curves.set_title("per-epoch kNN monitor (bank vs test subset)")
    curves.grid(True, alpha=0.3)
    curves.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.table1", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="prepare.source: a folder or archive")
    parser.add_argument("--repo", default=".")
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--rows", help=f"comma-separated subset of {[r[0] for r in ROWS]}")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied to every row (after the scale's)")
    parser.add_argument("--out-dir", default="reports/table1")
    parser.add_argument("--retries", type=int, default=1)
    parser.add_argument("--no-track", action="store_true", help="no MLflow parent runs")
    args = parser.parse_args(argv)
    state = table1(source=args.source, repo=args.repo, scale=args.scale,
                   rows=args.rows.split(",") if args.rows else None,
                   fixed=parse_sets(args.sets) or None, out_dir=args.out_dir,
                   retries=args.retries, track=not args.no_track, return_state=True)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
