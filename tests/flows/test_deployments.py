"""prefect.yaml for real: `prefect deploy --all` to a `prefect server start` on loopback, then a
`prefect worker start --pool instdisc` (process pool) runs a scheduled pipeline run and an
on-demand ablation run, each in a fresh clone made by the deployment's pull steps.

Everything is a subprocess with its own PREFECT_HOME and a free port; the fixtures stop the
server and the worker. No Prefect import in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import toy_project
from conftest import stop_session as stop, wait_healthy

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(args: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "INSTDISC_"))}
    env.update(toy_project.TEST_ENV)
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the worker's `dvc` and Python
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",  # default 60
        "PREFECT_WORKER_QUERY_SECONDS": "2", "DO_NOT_TRACK": "true", "DVC_NO_ANALYTICS": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@localhost",
        "GIT_COMMITTER_NAME": "ci", "GIT_COMMITTER_EMAIL": "ci@localhost",
        "PORT": str(port),
    })
    return env


@pytest.fixture
def server(env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """`prefect server start` on 127.0.0.1:<free port>; yields the API URL."""
    proc = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                  "--port", env["PORT"]], env, tmp_path / "server.log", tmp_path)
    try:
        wait_healthy(f"{env['PREFECT_API_URL']}/health", proc, tmp_path / "server.log", 180)
        yield env["PREFECT_API_URL"]
    finally:
        stop(proc)


def origin_repo(root: Path) -> Path:
    """The toy DVC project + this repository's flows/ and prefect.yaml (cron: every minute)."""
    files = {"params.yaml": toy_project.PARAMS, "dvc.yaml": toy_project.DVC_YAML,
             "stage.py": toy_project.STAGE_PY}
    for path in sorted((REPO_ROOT / "flows").glob("*.py")):
        files[f"flows/{path.name}"] = path.read_text()
    prefect_yaml = (REPO_ROOT / "prefect.yaml").read_text()
    assert 'cron: "0 2 * * *"' in prefect_yaml
    files["prefect.yaml"] = prefect_yaml.replace('cron: "0 2 * * *"', 'cron: "* * * * *"')
    return toy_project.init_repo(root / "origin", files)


def prefect(env: dict[str, str], cwd: Path, *args: str) -> str:
    out = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"prefect {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def finished_runs(api: str) -> list[dict]:
    """Flow runs that ended (the scheduler also keeps up to 100 future runs of a cron)."""
    ended = {"flow_runs": {"state": {"type": {"any_": ["COMPLETED", "FAILED", "CRASHED"]}}}}
    response = httpx.post(f"{api}/flow_runs/filter", json=ended, timeout=10)
    response.raise_for_status()
    return response.json()


def test_deploy_all_then_a_worker_runs_a_scheduled_and_an_on_demand_run(server, env, tmp_path):
    reset = toy_project.reset_control()
    origin = origin_repo(tmp_path)
    env["INSTDISC_GIT_URL"] = str(origin)  # what the git_clone pull step clones
    prefect(env, origin, "work-pool", "create", "instdisc", "--type", "process")
    started = time.monotonic()
    deployed = prefect(env, origin, "deploy", "--all")
    assert "instdisc-pipeline/nightly" in deployed and "instdisc-ablation/sweep" in deployed
    deploy_seconds = time.monotonic() - started
    worker = start([str(BIN / "prefect"), "worker", "start", "--pool", "instdisc"], env,
                   tmp_path / "worker.log", tmp_path)
    try:
        prefect(env, origin, "deployment", "run", "instdisc-ablation/sweep",
                "--param", 'sweep={"train.m": [2]}')
        deployments = {d["id"]: d["name"] for d in httpx.post(
            f"{server}/deployments/filter", json={}, timeout=10).json()}
        deadline = time.monotonic() + 300
        while True:
            runs = finished_runs(server)
            bad = [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")]
            assert not bad, (json.dumps(bad, indent=1)[:3000]
                             + (tmp_path / "worker.log").read_text()[-6000:])
            done = {(deployments[r["deployment_id"]], r["auto_scheduled"]) for r in runs
                    if r["state_type"] == "COMPLETED"}
            if {("nightly", True), ("sweep", False)} <= done:
                break
            assert time.monotonic() < deadline, (
                f"{done} after 300 s\n" + (tmp_path / "worker.log").read_text()[-6000:])
            time.sleep(3)
        total_seconds = time.monotonic() - started
    finally:
        stop(worker)
    ran = toy_project.runs(reset)
    assert {"make", "train", "side", "eval"} <= set(ran)  # the scheduled pipeline, in a clone
    log = (tmp_path / "worker.log").read_text()
    for step in ("git_clone", "run_shell_script"):  # the pull steps of prefect.yaml
        assert f"Deployment step '{step}' completed successfully" in log
    assert not (origin / "dvc.lock").exists()  # runs happen in clones, never in the origin
    print(f"deploy {deploy_seconds:.1f} s; scheduled + on-demand runs done after "
          f"{total_seconds:.1f} s")
