"""Final metrics of a pipeline run: the `metrics:` files that dvc.yaml lists, flattened.

A metric is named `<stage>.<key>` with nested keys joined by dots (`evaluate.knn.top1`), the
same name in the Prefect artifact, the parent MLflow run and the ablation table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from flows.dag import StageGraph
from instdisc.io import flatten


def flatten_stage(data: Any, stage: str) -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"<stage>.a.b": 1}; lists are kept whole, a bare value is <stage>."""
    return flatten(data, f"{stage}.") if isinstance(data, Mapping) else {stage: data}


def read_workspace(repo: Path, graph: StageGraph) -> tuple[dict[str, Any], list[str]]:
    """({path: parsed content} of the metrics files in the workspace, [problems with the rest])."""
    files: dict[str, Any] = {}
    problems: list[str] = []
    for stage in graph.stages.values():
        for path in stage.metrics:
            file = repo / path
            if not file.is_file():
                problems.append(f"stage {stage.name}: metrics file {path} does not exist")
                continue
            try:
                files[path] = yaml.safe_load(file.read_text())  # JSON is YAML
            except yaml.YAMLError as error:
                problems.append(f"stage {stage.name}: cannot parse {path}: {error}")
    return files, problems


def by_stage(graph: StageGraph, files: Mapping[str, Any]) -> dict[str, Any]:
    """{"<stage>.<key>": value} from {metrics path: content}, in stage order."""
    flat: dict[str, Any] = {}
    for stage in graph.stages.values():
        for path in stage.metrics:
            if path in files and files[path] is not None:
                flat.update(flatten_stage(files[path], stage.name))
    return flat


def table_rows(flat: Mapping[str, Any]) -> list[dict[str, Any]]:
    """[{"stage", "metric", "value"}] for a Prefect table artifact."""
    rows = []
    for name, value in flat.items():
        stage, _, metric = name.partition(".")
        rows.append({"stage": stage, "metric": metric, "value": value})
    return rows


def random_init_rows(flat: Mapping[str, Any]) -> list[dict[str, Any]]:
    """[{"stage", "metric", "trained", "random init", "beats random init"}] for every
    `<stage>.beats_random_init.<metric>` flag (evaluate writes one per metric, kNN and label-free).

    The values are looked up as `<stage>.knn.top1` / `<stage>.random_init.knn.top1` for
    `knn_top1`, else `<stage>.label_free.<metric>` / `<stage>.random_init.label_free.<metric>`.
    """
    rows = []
    for name, flag in flat.items():
        stage, _, rest = name.partition(".")
        if not rest.startswith("beats_random_init."):
            continue
        metric = rest.removeprefix("beats_random_init.")
        key = "knn.top1" if metric == "knn_top1" else f"label_free.{metric}"
        rows.append({"stage": stage, "metric": metric, "trained": flat.get(f"{stage}.{key}"),
                     "random init": flat.get(f"{stage}.random_init.{key}"),
                     "beats random init": "yes" if flag else "**no**"})
    return rows


# The headline of each stage for `summary_rows`: (stage, metric, its baseline beside it or None).
HEADLINES = (
    ("prepare", "train_images", None), ("prepare", "test_images", None),
    ("pretrain", "epochs", None), ("pretrain", "images_per_second", None),
    ("evaluate", "knn.top1", "random_init.knn.top1"),
    ("evaluate", "label_free.retrieval_top1", "random_init.label_free.retrieval_top1"),
    ("linear", "top1.conv5", "random_init.top1.conv5"),
    ("places", "top1.conv5", "random_init.top1.conv5"),
    ("semi_supervised", "labels_10pct.pretrained", "labels_10pct.scratch"),
    ("semi_supervised", "labels_1pct.pretrained", "labels_1pct.scratch"),
    ("detection", "map", "random_init.map"),
    ("export", "parity.passed", None), ("export", "int8_parity.passed", None),
)


def summary_rows(flat: Mapping[str, Any]) -> list[dict[str, Any]]:
    """[{"stage", "metric", "value", "baseline"}]: the HEADLINES present in `flat` (a skipped
    stage shows its reason), short enough to read in a 100-column terminal."""
    rows = []
    for stage, metric, baseline in HEADLINES:
        first = metric == next(m for s, m, _ in HEADLINES if s == stage)
        if first and isinstance(flat.get(f"{stage}.skipped"), str):  # e.g. "no labels: ..."
            rows.append({"stage": stage, "metric": "skipped",
                         "value": str(flat[f"{stage}.skipped"])[:60], "baseline": None})
        elif f"{stage}.{metric}" in flat:
            rows.append({"stage": stage, "metric": metric, "value": flat[f"{stage}.{metric}"],
                         "baseline": flat.get(f"{stage}.{baseline}") if baseline else None})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flows.metrics [repo]`: the summary table of the workspace's metrics files."""
    import argparse
    import sys

    from flows.dag import load_graph

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("repo", nargs="?", default=".", type=Path)
    args = parser.parse_args(argv)
    graph = load_graph(args.repo)
    files, problems = read_workspace(args.repo, graph)
    rows = summary_rows(by_stage(graph, files))
    sys.stdout.write(markdown_table(rows, ["stage", "metric", "value", "baseline"]) + "\n")
    for problem in problems:
        sys.stdout.write(f"(missing) {problem}\n")
    sys.stdout.write("every metric: dvc metrics show; baselines are random init (scratch for "
                     "semi_supervised)\n")
    return 0


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured markdown table; floats to 4 significant digits."""
    if not rows:
        return "_no rows_"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [_cell(row.get(column)) for column in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


if __name__ == "__main__":
    raise SystemExit(main())
