"""MLflow bookkeeping: the only module of the project that imports mlflow (flows use it too).

Every stage run becomes one MLflow run named after the stage, with the stage's params, per-epoch
metrics, its metrics/plot files as artifacts, and tags for the git commit and the DVC hashes of the
data it read. The store defaults to a local SQLite file (`sqlite:///mlflow.db` in the working
directory, i.e. the repository root under `dvc repro`); `MLFLOW_TRACKING_URI` points it anywhere
else. When a Prefect flow drives the pipeline it creates a parent run (`start_parent_run`) and
exports `INSTDISC_PARENT_RUN_ID`, and each stage run is nested under that parent run. The model
registry (`log_onnx_model`, `download_onnx_model`) lives here too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from instdisc.io import flatten, numeric

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "instdisc"
PARENT_RUN_ENV = "INSTDISC_PARENT_RUN_ID"


def project_root() -> Path:
    """The DVC repository the run belongs to: `DVC_ROOT` (set by DVC for stage commands, and
    pointing at the parent repository inside `dvc exp run --temp`/queued experiments), else the
    working directory."""
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


def tracking_uri(root: Path | None = None) -> str:
    """`MLFLOW_TRACKING_URI`, or the embedded SQLite store at the project root.

    A relative SQLite path is made absolute against `root` (default `project_root()`), so stage
    runs of temporary DVC experiments land in the same store as the workspace's.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and uri != prefix + ":memory:":
        base = project_root() if root is None else Path(root).resolve()
        return prefix + str(base / uri[len(prefix):])
    return uri


def experiment_name() -> str:
    """`MLFLOW_EXPERIMENT_NAME`, or "instdisc"."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def _experiment_id(client: Any, uri: str, root: Path) -> str:
    """Get or create the experiment; with a local SQLite store its artifacts go to
    `<root>/mlruns`, not to whatever the working directory happens to be."""
    from mlflow.exceptions import MlflowException

    name = experiment_name()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = (Path(root).resolve() / "mlruns").as_uri() if uri.startswith("sqlite:") else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by a concurrent stage
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def param_values(params: Mapping[str, Any] | Any) -> dict[str, Any]:
    """Flattened params as MLflow stores them: lists and tuples become strings."""
    return {k: str(list(v)) if isinstance(v, (list, tuple)) else v
            for k, v in flatten(params).items()}


def git_commit(repo: Path = Path(".")) -> str | None:
    """HEAD's commit hash, or None outside a git repository."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                             text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def dvc_input_hashes(stage: str, repo: Path = Path(".")) -> dict[str, str]:
    """{"dvc.dep.<path>": md5} for the stage's deps that an upstream stage wrote, from DVC.

    Asks DVC's own index (dvc.yaml + dvc.lock, as `dvc status` reads them). Under `dvc repro`
    the lock entry of the running stage is written only after it finishes, but its inputs
    produced by upstream stages are already locked: those hashes name the exact data version
    this run read. Outside a DVC repository: {}.
    """
    if not (Path(repo) / "dvc.yaml").is_file():
        return {}
    from dvc.repo import Repo  # stage commands run under DVC: it is installed

    with Repo(str(repo)) as dvc_repo:
        stages = list(dvc_repo.index.stages)
        produced = {str(out.fs_path): out.hash_info.value for s in stages for out in s.outs
                    if out.hash_info and out.hash_info.value}
        root = Path(dvc_repo.root_dir)
        return {f"dvc.dep.{Path(dep.fs_path).relative_to(root).as_posix()}":
                produced[str(dep.fs_path)]
                for s in stages if stage in (getattr(s, "name", None), s.addressing)
                for dep in s.deps if str(dep.fs_path) in produced}


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

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=_experiment_id(mlflow.MlflowClient(uri), uri,
                                                      project_root()))
    tags = {"instdisc.stage": stage, **dvc_input_hashes(stage, repo)}
    commit = git_commit(repo)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    parent = os.environ.get(PARENT_RUN_ENV) or None
    with mlflow.start_run(run_name=stage, parent_run_id=parent, tags=tags) as active:
        mlflow.log_params(param_values(params))
        log.info("MLflow run %s (%s) at %s", active.info.run_id, stage, uri)
        yield active.info.run_id


def _active() -> bool:
    import mlflow

    return mlflow.active_run() is not None


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log the finite numbers of `metrics` to the active run (dots kept; the rest skipped)."""
    if not _active():
        return
    import mlflow

    mlflow.log_metrics(numeric(metrics), step=step)


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


def find_run(tag: str, value: str) -> str | None:
    """Id of the newest run of the current experiment tagged `tag` = `value`, or None."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.get_experiment_by_name(experiment_name())
    if experiment is None:
        return None
    runs = mlflow.MlflowClient().search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{tag}` = '{value}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def _requirement(dist: str) -> str:
    from importlib import metadata

    try:
        return f"{dist}=={metadata.version(dist)}"
    except metadata.PackageNotFoundError:
        return dist


def log_onnx_model(path: Path, registered_model_name: str | None = None, alias: str | None = None,
                   *, metadata: Mapping[str, Any] | None = None,
                   version_tags: Mapping[str, Any] | None = None,
                   input_example: Any = None, output_example: Any = None,
                   metrics: Mapping[str, Any] | None = None) -> str | None:
    """Log an ONNX file as the active run's model; register it and point `alias` at the version.

    The file is stored as one `model.onnx` (no external-data sidecar), with an `MLmodel` whose
    pip requirements name onnxruntime-gpu (set explicitly: inferring them costs seconds). With
    `input_example` (a uint8 (B, H, W, 3) batch, B >= 2) and the model's `output_example`, the
    model gets a tensor signature and that example, so `mlflow models serve` accepts
    `{"inputs": <array>}`. `metrics` are logged to the run *and* linked to the logged model.
    Returns the registered version (None without an active run or without a registered name).
    """
    if not _active():
        return None
    import mlflow
    import mlflow.onnx

    signature = None
    if input_example is not None:
        from mlflow.models import infer_signature

        signature = infer_signature(input_example, output_example)
    info = mlflow.onnx.log_model(
        Path(path).read_bytes(), name="model", registered_model_name=registered_model_name,
        save_as_external_data=False, metadata=dict(metadata or {}), signature=signature,
        input_example=input_example,
        pip_requirements=[_requirement(d) for d in ("onnxruntime-gpu", "numpy", "pillow")])
    if metrics:
        mlflow.log_metrics(numeric(metrics), model_id=info.model_id)
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


def registry_version(uri: str) -> str | None:
    """The version number `models:/name@alias` or `models:/name/N` names; None for other URIs."""
    if not uri.startswith("models:/"):
        return None
    name, _, rest = uri[len("models:/"):].partition("@")
    if rest:
        from mlflow import MlflowClient

        return str(MlflowClient(tracking_uri()).get_model_version_by_alias(name, rest).version)
    name, _, version = name.partition("/")
    return version or None


# ---- parent runs (created by the Prefect flows, outside any stage process)

def start_parent_run(root: Path, run_name: str, tags: Mapping[str, Any],
                     uri: str | None = None) -> tuple[str, str]:
    """Create a run that stage runs nest under; returns (run id, experiment id). End it with
    `end_run`. `uri` defaults to `tracking_uri(root)`."""
    from mlflow import MlflowClient

    uri = uri or tracking_uri(root)
    client = MlflowClient(uri)
    experiment_id = _experiment_id(client, uri, root)
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={k: str(v) for k, v in tags.items()})
    return run.info.run_id, experiment_id


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark a run created by `start_parent_run` as terminated (FINISHED, FAILED, KILLED)."""
    from mlflow import MlflowClient

    MlflowClient(uri).set_terminated(run_id, status=status)


def log_run_metrics(uri: str, run_id: str, metrics: Mapping[str, Any]) -> None:
    """Log the finite numbers of `metrics` to the run `run_id` (not the active run)."""
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, v, now, 0) for k, v in numeric(metrics).items()]
    if batch:
        MlflowClient(uri).log_batch(run_id, metrics=batch)


def set_run_tags(uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    """Tag the run `run_id` (not the active run)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))
