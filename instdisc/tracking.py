"""MLflow bookkeeping: the only module in `instdisc/` that imports mlflow.

Every stage run becomes one MLflow run named after the stage, with the stage's params, per-epoch
metrics, its metrics/plot files as artifacts, and tags for the git commit and the DVC hashes of the
data it read. The store defaults to a local SQLite file (`sqlite:///mlflow.db` in the working
directory, i.e. the repository root under `dvc repro`); `MLFLOW_TRACKING_URI` points it anywhere
else. When a Prefect flow drives the pipeline it exports `INSTDISC_PARENT_RUN_ID`, and each stage
run is nested under that parent run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "instdisc"
PARENT_RUN_ENV = "INSTDISC_PARENT_RUN_ID"


def project_root() -> Path:
    """The DVC repository the run belongs to: `DVC_ROOT` (set by DVC for stage commands, and
    pointing at the parent repository inside `dvc exp run --temp`/queued experiments), else the
    working directory."""
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, or the embedded SQLite store at the project root.

    A relative SQLite path is made absolute against `project_root()`, so stage runs of temporary
    DVC experiments land in the same store as the workspace's.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and uri != prefix + ":memory:":
        return prefix + str(project_root() / uri[len(prefix):])
    return uri


def _use_experiment(name: str) -> None:
    """Select (creating if needed) the experiment; with a local SQLite store its artifacts go to
    `<project root>/mlruns`, not to whatever the working directory happens to be."""
    import mlflow

    if mlflow.get_experiment_by_name(name) is None and tracking_uri().startswith("sqlite:"):
        try:
            mlflow.create_experiment(name, artifact_location=(project_root() / "mlruns").as_uri())
        except mlflow.exceptions.MlflowException:  # created meanwhile by a concurrent stage
            pass
    mlflow.set_experiment(name)


def flatten(params: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/dataclasses -> {"a.b": value}; lists and tuples become strings."""
    if dataclasses.is_dataclass(params):
        params = dataclasses.asdict(params)
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if dataclasses.is_dataclass(value) or isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(list(value)) if isinstance(value, (list, tuple)) else value
    return flat


def git_commit(repo: Path = Path(".")) -> str | None:
    """HEAD's commit hash, or None outside a git repository."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                             text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def dvc_input_hashes(stage: str, repo: Path = Path(".")) -> dict[str, str]:
    """{"dvc.dep.<path>": md5} for the stage's deps that an upstream stage wrote (from dvc.lock).

    Under `dvc repro` the lock entry of the running stage is written only after it finishes, but
    its inputs produced by upstream stages are already locked: those hashes name the exact data
    version this run read.
    """
    dvc_yaml, dvc_lock = repo / "dvc.yaml", repo / "dvc.lock"
    if not (dvc_yaml.is_file() and dvc_lock.is_file()):
        return {}
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
    deps = [d if isinstance(d, str) else next(iter(d)) for d in stages.get(stage, {}).get("deps", [])]
    lock = (yaml.safe_load(dvc_lock.read_text()) or {}).get("stages", {})
    produced = {o["path"]: o.get("md5") for entry in lock.values() for o in entry.get("outs", [])}
    return {f"dvc.dep.{d}": produced[d] for d in deps if produced.get(d)}


@contextlib.contextmanager
def run(stage: str, params: Mapping[str, Any] | Any, *, enabled: bool = True,
        repo: Path = Path(".")) -> Iterator[str | None]:
    """Start the MLflow run of one stage; yields its run id (None when `enabled` is False).

    `enabled=False` (non-zero DDP ranks) makes every call in this module a no-op inside the block.
    """
    if not enabled:
        yield None
        return
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    _use_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT)
    tags = {"instdisc.stage": stage, **dvc_input_hashes(stage, repo)}
    commit = git_commit(repo)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    parent = os.environ.get(PARENT_RUN_ENV) or None
    with mlflow.start_run(run_name=stage, parent_run_id=parent, tags=tags) as active:
        mlflow.log_params(flatten(params))
        log.info("MLflow run %s (%s) at %s", active.info.run_id, stage, tracking_uri())
        yield active.info.run_id


def _active() -> bool:
    import mlflow

    return mlflow.active_run() is not None


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log numeric metrics to the active run (dots kept; non-numbers skipped)."""
    if not _active():
        return
    import mlflow

    numeric = {k: float(v) for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    mlflow.log_metrics(numeric, step=step)


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    """Attach a file to the active run, if there is one and the file exists."""
    if not _active() or not Path(path).exists():
        return
    import mlflow

    mlflow.log_artifact(str(path), artifact_path=artifact_path)


def set_tags(tags: Mapping[str, Any]) -> None:
    """Tag the active run."""
    if not _active():
        return
    import mlflow

    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def _requirement(dist: str) -> str:
    from importlib import metadata

    try:
        return f"{dist}=={metadata.version(dist)}"
    except metadata.PackageNotFoundError:
        return dist


def log_onnx_model(path: Path, registered_model_name: str | None = None, alias: str | None = None,
                   *, metadata: Mapping[str, Any] | None = None,
                   version_tags: Mapping[str, Any] | None = None) -> str | None:
    """Log an ONNX file as the active run's model; register it and point `alias` at the version.

    The file is stored as one `model.onnx` (no external-data sidecar), with an `MLmodel` whose
    pip requirements name onnxruntime-gpu (set explicitly: inferring them costs seconds).
    Returns the registered version (None without an active run or without a registered name).
    """
    if not _active():
        return None
    import mlflow
    import mlflow.onnx

    info = mlflow.onnx.log_model(
        Path(path).read_bytes(), name="model", registered_model_name=registered_model_name,
        save_as_external_data=False, metadata=dict(metadata or {}),
        pip_requirements=[_requirement(d) for d in ("onnxruntime-gpu", "numpy", "pillow")])
    if registered_model_name is None:
        return None
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in (version_tags or {}).items():
        client.set_model_version_tag(registered_model_name, version, key, str(value))
    if alias:
        client.set_registered_model_alias(registered_model_name, alias, version)
    log.info("registered %s version %s%s", registered_model_name, version,
             f" as @{alias}" if alias else "")
    return version


def download_onnx_model(uri: str, dst_path: Path | None = None) -> Path:
    """A logged ONNX model (`models:/name@alias`, `models:/name/3`, `runs:/...`) -> local .onnx.

    This is how production code loads a registered encoder:
    `Embedder(download_onnx_model("models:/instdisc-encoder@candidate"))`.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=uri, dst_path=None if dst_path is None else str(dst_path)))
    found = sorted(local.rglob("*.onnx")) if local.is_dir() else [local]
    if len(found) != 1:
        raise ValueError(f"{uri!r} should hold exactly one .onnx file, found "
                         f"{[str(p.relative_to(local)) for p in found]}")
    return found[0]
