"""The stages against a real `mlflow server` (SQLite backend, artifact root in a temp dir) on
loopback: `dvc repro pretrain` and the export stage with MLFLOW_TRACKING_URI=http://127.0.0.1:<port>, then the runs,
their artifacts and the registered encoder are read back from the server (~1-2 min)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_pipeline_repo, pipeline_env, stop_session, tiny_params, wait_healthy

BIN = Path(sys.executable).parent


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """`mlflow server` on 127.0.0.1:<free port>; yields its URL, stopped at teardown."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    log = open(tmp_path / "mlflow-server.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri",
         f"sqlite:///{tmp_path / 'server.db'}", "--default-artifact-root",
         str(tmp_path / "artifact-root"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], env=env, stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{url}/health", proc, tmp_path / "mlflow-server.log", 120)
        yield url
    finally:
        stop_session(proc)
        log.close()


@pytest.mark.slow
def test_stages_log_runs_artifacts_and_the_registered_model_to_an_mlflow_server(
        tmp_path, mlflow_server):
    from mlflow import MlflowClient

    overrides = {"device": "cpu"}
    if "int8" in tiny_params()["export"]:  # no int8 copy: its kNN gate needs more than 24 images
        overrides["export"] = {"int8": False}
    repo = make_pipeline_repo(tmp_path, overrides)
    env = {**pipeline_env(repo), "MLFLOW_TRACKING_URI": mlflow_server}
    # prepare and pretrain through DVC; the export stage's command itself (its outputs are in
    # flux elsewhere), which logs and registers the ONNX encoder
    for command in (["dvc", "repro", "pretrain"], [sys.executable, "-m", "instdisc.stages.export"]):
        out = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True,
                             timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert not (repo / "mlflow.db").exists()  # nothing went to the local default store

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("instdisc")
    runs = {r.data.tags["instdisc.stage"]: r
            for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"prepare", "pretrain", "export"}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    pretrain = runs["pretrain"]
    assert [m.step for m in client.get_metric_history(pretrain.info.run_id, "loss")] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(pretrain.info.run_id)}
    assert {"pretrain.json", "pretrain_history.csv", "pretrain_history.png"} <= artifacts
    downloaded = client.download_artifacts(pretrain.info.run_id, "pretrain.json",
                                           str(tmp_path / "download"))
    assert json.loads(Path(downloaded).read_text()) == json.loads(
        (repo / "metrics" / "pretrain.json").read_text())

    export = json.loads((repo / "metrics" / "export.json").read_text())
    name = "instdisc-encoder"
    version = client.get_model_version_by_alias(name, "candidate")
    assert version.run_id == runs["export"].info.run_id
    assert [v.version for v in client.search_model_versions(f"name = '{name}'")] == [
        version.version]
    print(f"export metrics: { {k: v for k, v in export.items() if 'regist' in k} }; "
          f"model version {version.version} source {version.source}")
