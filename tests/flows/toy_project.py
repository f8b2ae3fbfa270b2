"""A four-stage DVC project for the flow tests, plus the environment that isolates them.

    make -> train -> eval        (train, side and eval read make's outputs)
        \\-> side --/

Stage commands are `python stage.py <name>`; each appends its name to $TOY_CONTROL/runs.log.
Failures are injected through $TOY_CONTROL/control.json: {"train": "transient"} exits 75 on
the first attempt only; {"train": "fatal"} raises a ValueError every time; {"sleep": {"train":
2}} makes train last 2 s more. Each stage appends "<name> <start> <end>" (epoch seconds) to
$TOY_CONTROL/times.log. The train stage opens an instdisc.tracking run when
INSTDISC_PARENT_RUN_ID is set (as the real stages do).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

STAGES = ("make", "train", "side", "eval")
ENV_ROOT = Path(tempfile.mkdtemp(prefix="instdisc-flow-tests-"))
atexit.register(shutil.rmtree, ENV_ROOT, True)

PARAMS = """\
seed: 0
make:
  n: 3
train:
  m: 4
  lr: 0.5
"""

DVC_YAML = """\
stages:
  make:
    cmd: python stage.py make
    deps: [stage.py]
    params: [seed, make]
    outs: [out/data]
    metrics:
      - metrics/make.json: {cache: false}
  train:
    cmd: python stage.py train
    deps: [stage.py, out/data/x.txt]
    params: [train]
    outs: [out/model.txt]
    metrics:
      - metrics/train.json: {cache: false}
  side:
    cmd: python stage.py side
    deps: [out/data]
    outs: [out/side.txt]
  eval:
    cmd: python stage.py eval
    deps: [out/model.txt, out/side.txt]
    metrics:
      - metrics/eval.json: {cache: false}
"""

STAGE_PY = '''\
"""Toy stage: tiny deterministic computations, JSON metrics, injectable failures."""
import json, os, pathlib, sys, time
import yaml

name = sys.argv[1]
started = time.time()
control = pathlib.Path(os.environ["TOY_CONTROL"])
with open(control / "runs.log", "a") as log:
    log.write(name + "\\n")
settings = control / "control.json"
mode = json.loads(settings.read_text()).get(name) if settings.exists() else None
attempts = control / f"{name}.attempts"
attempts.write_text(str(int(attempts.read_text() or 0) + 1 if attempts.exists() else 1))
if mode == "transient" and attempts.read_text() == "1":
    print(f"{name}: scratch disk not mounted yet, try again", file=sys.stderr)
    sys.exit(75)
if mode == "fatal":
    raise ValueError(f"toy stage {name} failed for real: corrupt input")
p = yaml.safe_load(open("params.yaml"))
out, met = pathlib.Path("out"), pathlib.Path("metrics")
out.mkdir(exist_ok=True); met.mkdir(exist_ok=True)
if name == "make":
    (out / "data").mkdir(exist_ok=True)
    (out / "data" / "x.txt").write_text(str(p["make"]["n"]))
    json.dump({"n": p["make"]["n"]}, open(met / "make.json", "w"))
elif name == "train":
    n, m = int((out / "data" / "x.txt").read_text()), p["train"]["m"]
    (out / "model.txt").write_text(str(n * m))
    scores = {"score": n * m, "loss": round(1.0 / m, 6), "nested": {"lr": p["train"]["lr"]}}
    json.dump(scores, open(met / "train.json", "w"))
    if os.environ.get("INSTDISC_PARENT_RUN_ID"):
        from instdisc import tracking
        with tracking.run("train", p["train"]):
            tracking.log_metrics(scores)
elif name == "side":
    (out / "side.txt").write_text((out / "data" / "x.txt").read_text())
elif name == "eval":
    acc = int((out / "model.txt").read_text()) / 100
    side = int((out / "side.txt").read_text())
    json.dump({"acc": acc, "side": side, "knn": {"top1": 100 * acc},
               "random_init": {"knn": {"top1": 20.0}, "label_free": {"uniformity": -0.5}},
               "label_free": {"uniformity": -0.1},
               "beats_random_init": {"knn_top1": 100 * acc > 20.0, "uniformity": False}},
              open(met / "eval.json", "w"))
time.sleep(json.loads(settings.read_text()).get("sleep", {}).get(name, 0) if settings.exists() else 0)
with open(control / "times.log", "a") as log:  # start and end of the command, for overlaps
    log.write(f"{name} {started} {time.time()}\\n")
print(f"{name} done", flush=True)
'''


CONTROL = ENV_ROOT / "control"
# What the flows' subprocesses need while the flow tests run (set by a session fixture).
TEST_ENV = {
    "DVC_SITE_CACHE_DIR": str(ENV_ROOT / "dvc-site-cache"),
    "MLFLOW_TRACKING_URI": f"sqlite:///{ENV_ROOT / 'mlflow.db'}",
    "TOY_CONTROL": str(CONTROL),
}


def isolate_prefect() -> None:
    """Prefect home in a temp dir, offline defaults, no server URL: before Prefect is imported."""
    from flows.settings import apply_defaults

    os.environ["PREFECT_HOME"] = str(ENV_ROOT / "prefect-home")
    os.environ.pop("PREFECT_API_URL", None)
    apply_defaults()


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True)
    return out.stdout


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    from flows.settings import dvc_command, subprocess_env

    env = subprocess_env({"DVC_SITE_CACHE_DIR": TEST_ENV["DVC_SITE_CACHE_DIR"]})
    out = subprocess.run(dvc_command(*args), cwd=repo, env=env, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out


def init_repo(repo: Path, files: dict[str, str]) -> Path:
    """git init + dvc init + `files`, all committed."""
    repo.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "flows@localhost")
    git(repo, "config", "user.name", "flow tests")
    dvc(repo, "init", "-q")
    dvc(repo, "config", "core.analytics", "false")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "toy pipeline")
    return repo


def make_template(root: Path) -> Path:
    return init_repo(root / "toy-template", {"params.yaml": PARAMS, "dvc.yaml": DVC_YAML,
                                             "stage.py": STAGE_PY})


def copy_repo(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest, symlinks=True)
    return dest


def reset_control(control: dict[str, str] | None = None) -> Path:
    """Empty the control dir, then write `control` (stage -> "transient" | "fatal")."""
    shutil.rmtree(CONTROL, ignore_errors=True)
    CONTROL.mkdir(parents=True)
    if control:
        (CONTROL / "control.json").write_text(json.dumps(control))
    return CONTROL


def times(control_dir: Path) -> dict[str, tuple[float, float]]:
    """{stage: (start, end)} of the last run of each stage command."""
    log = control_dir / "times.log"
    lines = log.read_text().split("\n") if log.exists() else []
    return {name: (float(a), float(b)) for name, a, b in (l.split() for l in lines if l)}


def runs(control_dir: Path) -> list[str]:
    log = control_dir / "runs.log"
    return log.read_text().split() if log.exists() else []


def read_metrics(repo: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((repo / "metrics").glob("*.json"))}


# The real pipeline, shrunk: seconds per stage on 2 CPU cores.
REAL_TINY = {
    "device": "cpu",
    "prepare": {"synthetic": {"num_classes": 3, "train_per_class": 16, "test_per_class": 8,
                              "image_size": 16}},
    "pretrain": {"epochs": 1, "width": 0.125, "num_negatives": 8, "batch_size": 16,
                 "monitor_queries": 0, "num_workers": 0},
    "evaluate": {"k": 5},
}


def make_real_repo(repo: Path, source: Path) -> Path:
    """A git + DVC copy of `source`'s dvc.yaml and instdisc/ with REAL_TINY params."""
    import yaml

    repo.mkdir(parents=True)
    shutil.copytree(source / "instdisc", repo / "instdisc",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        if (source / name).exists():
            shutil.copy(source / name, repo / name)
    params = yaml.safe_load((source / "params.yaml").read_text())
    _merge(params, REAL_TINY)
    return init_repo(repo, {"params.yaml": yaml.safe_dump(params, sort_keys=False)})


def _merge(into: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
