"""One MLflow parent run per flow run; every stage's run nests under it.

The stage runs are started by `instdisc.tracking.run` inside the `dvc` subprocesses; this module
only creates the parent (through `instdisc.tracking`, the only mlflow import; tagged with the
git commit and the Prefect flow-run id) and hands its
id to the stages through `INSTDISC_PARENT_RUN_ID`. The tracking URI is made absolute first, so
stages running in DVC's temporary experiment directories write to the same store.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instdisc import tracking
from instdisc.tracking import PARENT_RUN_ENV, experiment_name, git_commit


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
        if self.run_id:
            tracking.log_run_metrics(self.tracking_uri, self.run_id, metrics)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.run_id:
            tracking.set_run_tags(self.tracking_uri, self.run_id, tags)

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
    uri = tracking.tracking_uri(repo)
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
    run_id, experiment_id = tracking.start_parent_run(repo, run_name, tags, uri=uri)
    handle = ParentRun(repo, uri, run_id, experiment_id)
    try:
        yield handle
    except BaseException:
        tracking.end_run(uri, run_id, status="FAILED")
        raise
    tracking.end_run(uri, run_id, status=handle.status)
