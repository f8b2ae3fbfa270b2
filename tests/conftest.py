"""Shared fixtures: a tiny synthetic configuration and a throw-away git + DVC copy of the repo."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# Small enough that prepare -> pretrain -> evaluate -> export takes seconds on 2 CPU cores.
TINY_PARAMS = {
    "prepare": {"synthetic": {"num_classes": 3, "train_per_class": 16, "test_per_class": 8,
                              "image_size": 16}},
    "pretrain": {"loss": "nce", "width": 0.125, "feature_dim": 16, "num_negatives": 8, "epochs": 2,
                 "min_steps": 0,
                 "batch_size": 16, "lr_milestones": [1], "monitor_queries": 16,
                 "num_workers": 0},
    "evaluate": {"k": 5, "batch_size": 64},
    # int8 off: a kNN gate on 24 test images cannot resolve a 1-point drop (tests/serving covers
    # the int8 variant); the stage still writes its empty models/int8 out
    "export": {"parity_batch": 4, "int8": False},
    "linear": {"target_dim": 64, "epochs": 2, "random_init_baseline": False},
    "places": {"synthetic": {"num_classes": 3, "train_per_class": 8, "test_per_class": 4,
                             "image_size": 16},
               "probe": {"target_dim": 64, "epochs": 2, "random_init_baseline": False}},
    "semi_supervised": {"steps": 2, "batch_size": 8, "scratch_baseline": False},
    "detection": {"synthetic_train": 4, "synthetic_test": 2, "synthetic_size": 48,
                  "min_size": 48, "max_size": 48, "iterations": 1, "batch_size": 2,
                  "warmup_iters": 1, "fpn_channels": 16, "representation_size": 32},
}


def tiny_params(overrides: dict | None = None) -> dict:
    """The repo's params.yaml with TINY_PARAMS (and `overrides`) merged in, section by section."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for source in (TINY_PARAMS, overrides or {}):
        _merge(params, source)
    return params


def _merge(into: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def pipeline_env(repo: Path) -> dict[str, str]:
    """Environment for subprocesses in a temp pipeline repo: its own code, caches and stores."""
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": str(repo),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}",
        "DVC_SITE_CACHE_DIR": str(repo / ".dvc-site-cache"),
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@localhost",
        "GIT_COMMITTER_NAME": "ci", "GIT_COMMITTER_EMAIL": "ci@localhost",
    })
    env.pop("INSTDISC_PARENT_RUN_ID", None)
    return env


def run(cmd: list[str], repo: Path, **kwargs) -> subprocess.CompletedProcess:
    """Run `cmd` in `repo` with `pipeline_env`; output captured as text."""
    return subprocess.run(cmd, cwd=repo, env=pipeline_env(repo), capture_output=True,
                          text=True, **kwargs)


def make_pipeline_repo(root: Path, overrides: dict | None = None) -> Path:
    """A git + DVC repository holding a copy of this project's pipeline with tiny params."""
    repo = root / "repo"
    repo.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("instdisc", "flows"):
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(REPO_ROOT / name, repo / name, ignore=ignore)
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        if (REPO_ROOT / name).exists():
            shutil.copy(REPO_ROOT / name, repo / name)
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(overrides), sort_keys=False))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"],
                ["dvc", "config", "core.analytics", "false"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "pipeline"]):
        out = run(cmd, repo)
        assert out.returncode == 0, f"{cmd} failed: {out.stderr}"
    return repo


def declared_outputs(repo: Path, stages: list[str] | None = None) -> dict[str, list[str]]:
    """{stage: paths of its outs, metrics and plots} from `repo`'s dvc.yaml (`stages` or all)."""
    declared = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    return {name: [entry if isinstance(entry, str) else next(iter(entry))
                   for kind in ("outs", "metrics", "plots") for entry in stage.get(kind, [])]
            for name, stage in declared.items() if stages is None or name in stages}


@pytest.fixture
def pipeline_repo(tmp_path: Path) -> Path:
    """A fresh temp repo with the tiny pipeline (see `make_pipeline_repo`)."""
    return make_pipeline_repo(tmp_path)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll `url` until it answers 200; fail with the server's log if it exits or times out."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{url} not healthy after {timeout:.0f} s"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def stop_session(proc: subprocess.Popen) -> None:
    """SIGTERM to the process's session (server workers, child processes), then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def small_prepared(tmp_path_factory) -> Path:
    """A prepared synthetic set, 3 classes x (16 train + 4 test) images of 16 x 16 (one per
    test module)."""
    from instdisc.config import PrepareParams, SyntheticParams
    from instdisc.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "prepared"
    params = PrepareParams(synthetic=SyntheticParams(num_classes=3, train_per_class=16,
                                                     test_per_class=4, image_size=16))
    prepare(params, seed=0, out_dir=out, progress=False)
    return out


@pytest.fixture(autouse=True)
def _restore_mlflow_tracking_uri():
    """Stage code run in-process calls `mlflow.set_tracking_uri`, a process-wide global that
    outlives the test's MLFLOW_TRACKING_URI (monkeypatch restores only the variable); a later
    test's `MlflowClient()` would then read a deleted temp store. Put the global back (MLflow has
    no public way to unset it without also unsetting the variable)."""
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    before = getattr(utils, "_tracking_uri", None)
    yield
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    if utils is not None and utils._tracking_uri != before:
        utils._tracking_uri = before
