"""Ablation sweeps: one DVC experiment per combination of swept params, one table of results.

`python -m flows.ablations --preset nce-m --set pretrain.epochs=10` or
`python -m flows.ablations --sweep pretrain.feature_dim=32,64,128,256`.
Each combination is `dvc exp run --temp -S key=value ...` (run one after another: one GPU);
the results come back from `dvc exp show --json` into reports/ablation.csv, a markdown and a
table artifact, and reports/ablation.png. A run that fails is a row with status "failed" and
its error, not a gap.
"""

if __name__ == "__main__":  # entry point: offline defaults must precede the Prefect import
    from flows.settings import apply_defaults

    apply_defaults()

import argparse  # noqa: E402
import itertools  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import yaml  # noqa: E402
from prefect import Task, flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from flows import ablation_report, metrics  # noqa: E402
from flows.commands import DEFAULT_TRANSIENT_PATTERNS, StageFailed, check_repo  # noqa: E402
from flows.dag import load_graph  # noqa: E402
from flows.experiments import (  # noqa: E402
    check_name, make_name, parse_sets, run_experiment, show_experiments, validate_overrides)
from flows.parent_run import parent_run  # noqa: E402
from instdisc.config import PretrainParams  # noqa: E402  (pure dataclasses: no torch)

# The paper's ablations (Wu et al. 2018, arXiv:1805.01978, Sec. 4): NCE noise samples m,
# embedding size, training-set size, proximal regularisation strength lambda.
# A preset that sweeps an NCE knob also pins `loss: nce` (a one-value axis), so it never runs
# the same softmax run four times; the first key is the plot's x axis.
PRESETS: dict[str, dict[str, list[Any]]] = {
    "nce-m": {"pretrain.num_negatives": [1, 10, 512, 4096], "pretrain.loss": ["nce"]},
    "feature-dim": {"pretrain.feature_dim": [32, 64, 128, 256]},
    "train-fraction": {"prepare.train_fraction": [0.1, 0.5, 1.0]},
    "proximal": {"pretrain.proximal_lambda": [0.0, 10.0, 30.0, 50.0]},
}


class AblationFailed(RuntimeError):
    """Every run of the sweep failed."""


def param_column(key: str) -> str:
    """Table column of a swept params key: `params.<key>`, apart from `<stage>.<metric>` names
    (`pretrain.epochs` is both a params key and a metric of the pretrain stage)."""
    return f"params.{key}"


def combinations(sweep: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of the swept values, first key varying slowest."""
    if not sweep:
        raise ValueError("sweep is empty: give at least one key with a list of values")
    for key, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"sweep[{key!r}] must be a non-empty list, got {values!r}")
    return [dict(zip(sweep, combo)) for combo in itertools.product(*sweep.values())]


@flow(name="instdisc-ablation")
def ablation(sweep: dict[str, list[Any]], repo: str = ".", fixed: dict[str, Any] | None = None,
             metric: str | None = None, name_prefix: str = "abl", out_dir: str = "reports",
             retries: int = 1, retry_delay_seconds: float = 30.0,
             transient_patterns: list[str] | None = None, temp_experiment: bool = True,
             track: bool = True) -> dict[str, Any]:
    """One DVC experiment per combination of `sweep` (plus `fixed` overrides); one table.

    `metric` (e.g. "evaluate.knn.top1", default: the last stage's first metric) is plotted
    against the first swept key. Returns {"rows", "csv", "plot", "metric"}.
    """
    root = Path(repo).resolve()
    combos = combinations(sweep)
    tags = {"instdisc.flow": "ablation", "ablation.sweep": sweep, "ablation.fixed": fixed or {}}
    rows = run_experiments(root, combos, fixed=fixed or {}, name_prefix=name_prefix,
                           title="ablation", tags=tags, retries=retries,
                           retry_delay_seconds=retry_delay_seconds,
                           transient_patterns=transient_patterns,
                           temp_experiment=temp_experiment, track=track)
    return report(rows, [param_column(k) for k in sweep], metric, root / out_dir)


def run_experiments(root: Path, combos: list[dict[str, Any]], *, fixed: dict[str, Any],
                    name_prefix: str, title: str, tags: dict[str, Any], retries: int = 1,
                    retry_delay_seconds: float = 30.0,
                    transient_patterns: list[str] | None = None, temp_experiment: bool = True,
                    track: bool = True, targets: list[str] | None = None) -> list[dict[str, Any]]:
    """Run `fixed + combo` as one DVC experiment per combo (one after another); a row each.

    Rows: experiment, status, `params.<key>` per combo key, every metric as `<stage>.<key>`,
    error, rev. Everything is checked before the first run; raises AblationFailed only when
    every run failed. `targets`: the dvc.yaml stages to reproduce (default: all).
    """
    check_repo(root, experiments=True)
    graph = load_graph(root)
    for combo in combos:
        validate_overrides(root, {**fixed, **combo})
        check_effective(root, {**fixed, **combo}, swept=list(combo))
    check_name(name_prefix)
    names = [make_name(name_prefix, i) for i in range(len(combos))]
    patterns = [*DEFAULT_TRANSIENT_PATTERNS, *(transient_patterns or [])]
    experiment = run_experiment.with_options(retries=retries,
                                             retry_delay_seconds=retry_delay_seconds)
    tags = {"prefect.flow_run_id": flow_run.id, "prefect.flow_run_name": flow_run.name, **tags}
    with parent_run(root, f"{title}-{flow_run.name}", tags, enabled=track) as sweep_run:
        errors, children = {}, {}
        for name, combo in zip(names, combos):
            with sweep_run.child(name, {"dvc.experiment": name, **combo}) as child:
                error = run_one(experiment, root, name, {**fixed, **combo}, temp_experiment,
                                child.env(), patterns, targets)
                if error is not None:
                    errors[name], child.status = error, "FAILED"
            children[name] = child
        shown = show_experiments(root)
        rows = []
        for name, combo in zip(names, combos):
            flat = metrics.by_stage(graph, shown.get(name, {}).get("metrics", {}))
            children[name].log_metrics(flat)
            rows.append({"experiment": name, "status": "failed" if name in errors else "succeeded",
                         **{param_column(k): v for k, v in combo.items()}, **flat,
                         "error": errors.get(name, ""), "rev": shown.get(name, {}).get("rev")})
    if len(errors) == len(rows):
        first = next(iter(errors.values()))
        raise AblationFailed(f"all {len(rows)} runs failed; first error: {first}")
    return rows


def check_effective(root: Path, overrides: dict[str, Any], swept: list[str]) -> None:
    """A swept `pretrain.*` key that the run's loss ignores is an error (the runs would be the
    same run): e.g. sweeping pretrain.num_negatives while pretrain.loss is softmax."""
    params = yaml.safe_load((root / "params.yaml").read_text()) or {}
    loss = overrides.get("pretrain.loss", (params.get("pretrain") or {}).get("loss", "nce"))
    ignored = PretrainParams(loss=loss).ignored_by_loss()
    for key in swept:
        stage, _, name = key.partition(".")
        if stage == "pretrain" and name in ignored:
            raise ValueError(f"sweeping {key!r} has no effect: pretrain.loss is {loss!r}, which "
                             f"ignores it; add --set pretrain.loss=nce (or sweep pretrain.loss)")


def run_one(experiment: Task, repo: Path, name: str, overrides: dict[str, Any], temp: bool,
            env: dict[str, str], patterns: list[str],
            targets: list[str] | None = None) -> str | None:
    """Run one experiment of the sweep; its error line if it failed (the sweep goes on)."""
    logger = get_run_logger()
    logger.info("experiment %s: %s", name, overrides)
    state = experiment(repo, name, overrides, temp, env, patterns, targets, return_state=True)
    if state.is_completed():
        return None
    error = state.result(raise_on_failure=False)
    reason = error.reason if isinstance(error, StageFailed) else str(error)
    logger.warning("experiment %s failed: %s", name, reason)
    return reason


def report(rows: list[dict[str, Any]], swept: list[str], metric: str | None,
           out_dir: Path) -> dict[str, Any]:
    """Write the CSV and the plot, publish the Prefect artifacts; `swept` are column names."""
    header = ablation_report.columns(rows, swept)
    not_metrics = {"experiment", "status", "error", "rev", *swept}
    metric_columns = [c for c in header if c not in not_metrics]
    metric = metric or ablation_report.default_metric(rows, metric_columns)
    csv_path = ablation_report.write_csv(rows, header, out_dir / "ablation.csv")
    png = ablation_report.plot(rows, swept, metric, out_dir / "ablation.png") if metric else None
    create_table_artifact(rows, key="instdisc-ablation-table", description="ablation results")
    keys = ", ".join(c.removeprefix("params.") for c in swept)
    plot_line = f"  \nPlot ({metric}): `{png}`" if png else ""
    create_markdown_artifact(
        f"# Ablation over {keys}\n\n{metrics.markdown_table(rows, header)}\n\n"
        f"CSV: `{csv_path}`{plot_line}\n", key="instdisc-ablation", description="ablation results")
    return {"rows": rows, "csv": str(csv_path), "plot": str(png) if png else None,
            "metric": metric}


def parse_sweep(items: list[str]) -> dict[str, list[Any]]:
    """["a.b=1,2", "c=[[1,2],[3]]"] -> {"a.b": [1, 2], "c": [[1, 2], [3]]} (YAML values)."""
    sweep: dict[str, list[Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key or not text:
            raise ValueError(f"--sweep expects key=v1,v2,..., got {item!r}")
        values = yaml.safe_load(text) if text.lstrip().startswith("[") else [
            yaml.safe_load(v) for v in text.split(",")]
        sweep[key] = values
    return sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.ablations", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=".")
    parser.add_argument("--preset", choices=sorted(PRESETS), action="append", default=[],
                        help="one of the paper's ablations (combine with --sweep for a grid)")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied to every run (e.g. a shorter schedule)")
    parser.add_argument("--metric", help="metric to plot, e.g. evaluate.knn.top1")
    parser.add_argument("--prefix", default="abl", help="experiment name prefix")
    parser.add_argument("--out-dir", default="reports")
    parser.add_argument("--retries", type=int, default=1)
    parser.add_argument("--no-track", action="store_true", help="no MLflow parent runs")
    args = parser.parse_args(argv)
    sweep = {k: v for preset in args.preset for k, v in PRESETS[preset].items()}
    sweep.update(parse_sweep(args.sweep))
    state = ablation(sweep=sweep, repo=args.repo, fixed=parse_sets(args.sets) or None,
                     metric=args.metric, name_prefix=args.prefix, out_dir=args.out_dir,
                     retries=args.retries, track=not args.no_track, return_state=True)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
