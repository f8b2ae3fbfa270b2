"""One MLflow parent run per flow run; every stage's run nests under it.

The stage runs are started by `instdisc.tracking.run` inside the `dvc` subprocesses; this module
only creates the parent (tagged with the git commit and the Prefect flow-run id) and hands its
id to the stages through `INSTDISC_PARENT_RUN_ID`. The tracking URI is made absolute first, so
stages running in DVC's temporary experiment directories write to the same store.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instdisc.tracking import DEFAULT_EXPERIMENT, DEFAULT_TRACKING_URI, PARENT_RUN_ENV, git_commit


def resolve_tracking_uri(repo: Path) -> str:
    """`MLFLOW_TRACKING_URI` (or the SQLite default), a relative SQLite path made absolute."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and uri != prefix + ":memory:":
        return prefix + str((repo / uri[len(prefix):]).resolve())
    return uri


def experiment_name() -> str:
    """The MLflow experiment the stages log to (same rule as instdisc.tracking)."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers among `metrics` (booleans and strings left out)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


@dataclass
class ParentRun:
    """Handle on the parent run; `run_id` is None when tracking is disabled (methods no-op)."""

    repo: Path
    tracking_uri: str
    run_id: str | None = None
    experiment_id: str | None = None
    status: str = "FINISHED"  # what the run ends as when its block exits without an error

    def env(self) -> dict[str, str]:
        """Environment for stage subprocesses: same store, same experiment, this parent."""
        env = {"MLFLOW_TRACKING_URI": self.tracking_uri,
               "MLFLOW_EXPERIMENT_NAME": experiment_name()}
        if self.run_id:
            env[PARENT_RUN_ENV] = self.run_id
        return env

    def log_metrics(self, metrics: Mapping[str, Any]) -> None:
        if not self.run_id:
            return
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, 0) for k, v in numeric_metrics(metrics).items()]
        if batch:
            MlflowClient(self.tracking_uri).log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.run_id:
            return
        from mlflow import MlflowClient

        client = MlflowClient(self.tracking_uri)
        for key, value in tags.items():
            client.set_tag(self.run_id, key, str(value))

    @contextlib.contextmanager
    def child(self, run_name: str, tags: Mapping[str, Any]) -> Iterator[ParentRun]:
        """A run nested under this one (an ablation's experiment), itself a parent for stages."""
        if not self.run_id:
            yield ParentRun(self.repo, self.tracking_uri)
            return
        with _started(self.repo, self.tracking_uri, run_name,
                      {**tags, "mlflow.parentRunId": self.run_id}) as run:
            yield run


@contextlib.contextmanager
def parent_run(repo: Path, run_name: str, tags: Mapping[str, Any], enabled: bool = True
               ) -> Iterator[ParentRun]:
    """Start the parent run (tagged with the git commit); FINISHED on exit, FAILED on error."""
    uri = resolve_tracking_uri(repo)
    if not enabled:
        yield ParentRun(repo, uri)
        return
    commit = git_commit(repo)
    all_tags = {**tags, **({"mlflow.source.git.commit": commit} if commit else {})}
    with _started(repo, uri, run_name, all_tags) as run:
        yield run


@contextlib.contextmanager
def _started(repo: Path, uri: str, run_name: str, tags: Mapping[str, Any]
             ) -> Iterator[ParentRun]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment_id = _experiment_id(client, repo, uri)
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={k: str(v) for k, v in tags.items()})
    handle = ParentRun(repo, uri, run.info.run_id, experiment_id)
    try:
        yield handle
    except BaseException:
        client.set_terminated(handle.run_id, status="FAILED")
        raise
    client.set_terminated(handle.run_id, status=handle.status)


def _experiment_id(client: Any, repo: Path, uri: str) -> str:
    """Get or create the experiment; a local store keeps artifacts in <repo>/mlruns."""
    from mlflow.exceptions import MlflowException

    name = experiment_name()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = (repo / "mlruns").resolve().as_uri() if uri.startswith("sqlite:") else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by a concurrent process
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id
