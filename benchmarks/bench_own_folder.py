"""A user's own collection with the documented settings: prepare, pretrain, evaluate (prints figures).

    .venv/bin/python benchmarks/bench_own_folder.py                      # 15-Scene, params.yaml
    .venv/bin/python benchmarks/bench_own_folder.py --set pretrain.image_size=64 \
        --set pretrain.min_steps=900 --source ../shared/data/scene15/scene15.zip

What a new user gets who sets only `prepare.source`: the repository's params.yaml with
`prepare.source` and the `--set` overrides, the `prepare`, `pretrain` and `evaluate` stage
commands run as `dvc repro` runs them (one process each, in a scratch folder with its own MLflow
store), then the trained encoder's kNN top-1 and label-free metrics beside its random init's.
Results are printed as a table and appended as one JSON line to `--out`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
SCENE15 = REPO.parent / "shared" / "data" / "scene15" / "scene15.zip"
STAGES = ("prepare", "pretrain", "evaluate")

log = logging.getLogger("bench_own_folder")


def params_with(overrides: list[str], source: Path) -> dict[str, Any]:
    """params.yaml with prepare.source and each `section.key=value` (YAML value) applied."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"]["source"] = str(source.resolve())
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--set {item!r}: expected section.key=value")
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return params


def run_stages(params: dict[str, Any], work: Path) -> dict[str, float]:
    """Each stage in `work` as its own process; {stage: seconds}."""
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    seconds = {}
    for stage in STAGES:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", f"instdisc.stages.{stage}"], cwd=work,
                              env=env)
        if done.returncode != 0:
            raise SystemExit(f"stage {stage} failed (exit {done.returncode}); see its log above")
        seconds[stage] = round(time.perf_counter() - start, 1)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SCENE15)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--work", type=Path, default=None,
                        help="scratch folder to keep (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=Path(".cache/bench/own_folder.jsonl"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not args.source.exists():
        raise SystemExit(f"{args.source} not found (the default is ../shared/data/scene15)")
    params = params_with(args.set, args.source)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        seconds = run_stages(params, work)
        scores = json.loads((work / "metrics" / "evaluate.json").read_text())
        trained = json.loads((work / "metrics" / "pretrain.json").read_text())
    base = scores["random_init"]
    result = {"source": args.source.name, "overrides": args.set, "seconds": seconds,
              "epochs": trained["epochs"], "steps": trained.get("steps"),
              "images_per_second": trained["images_per_second"],
              "knn_top1": scores["knn"].get("top1"), "random_init_knn_top1":
              base.get("knn", {}).get("top1"), "label_free": scores["label_free"],
              "random_init_label_free": base["label_free"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as handle:
        handle.write(json.dumps(result) + "\n")
    print(f"{args.source.name}: {result['epochs']} epochs, {result['steps']} steps, "
          f"{result['images_per_second']:.0f} img/s, stages {seconds} s")
    print(f"{'metric':<16} {'trained':>9} {'random':>9}")
    print(f"{'knn_top1':<16} {result['knn_top1'] or float('nan'):>9.2f} "
          f"{result['random_init_knn_top1'] or float('nan'):>9.2f}")
    for name in ("alignment_ratio", "uniformity", "retrieval_top1"):
        print(f"{name:<16} {scores['label_free'][name]:>9.4g} {base['label_free'][name]:>9.4g}")


if __name__ == "__main__":
    main()
