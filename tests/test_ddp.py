"""torchrun/DDP on CPU (gloo, 2 processes): the real `instdisc pretrain` stage, banks kept identical;
launched by torchrun directly, and by the stage itself under `dvc repro` (pretrain.nproc_per_node)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from conftest import make_pipeline_repo, pipeline_env, tiny_params

from instdisc import checkpoint


def test_torchrun_two_ranks_train_with_identical_banks(tmp_path: Path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params({"device": "cpu"})))
    env = {**pipeline_env(tmp_path), "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "OMP_NUM_THREADS": "1"}
    prepare = subprocess.run([sys.executable, "-m", "instdisc.cli", "prepare"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=300)
    assert prepare.returncode == 0, prepare.stderr
    torchrun = Path(sys.executable).parent / "torchrun"
    out = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node=2", "-m",
                          "instdisc.cli", "pretrain"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    log = out.stdout + out.stderr
    assert "rank 0/2" in log and "rank 1/2" in log
    # The kNN monitor reads the bank: identical banks on both ranks give identical values.
    monitors = re.findall(r"epoch (\d)/2 .* Z ([\d.e+-]+)\s+kNN ([\d.]+)%", log)
    by_epoch: dict[str, set] = {}
    for epoch, z, knn in monitors:
        by_epoch.setdefault(epoch, set()).add((z, knn))
    assert set(by_epoch) == {"1", "2"} and all(len(v) == 1 for v in by_epoch.values()), monitors
    state = checkpoint.load(tmp_path / "models" / "checkpoints" / "last.pt")
    assert state["epoch"] == 2
    norms = state["bank"]["features"].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    metrics = json.loads((tmp_path / "metrics" / "pretrain.json").read_text())
    assert metrics["epochs"] == 2


def monitor_lines(log: str, epochs: int) -> dict[int, list[tuple[str, str]]]:
    """{epoch: [(Z, kNN) as logged by each rank]} from the stage's epoch lines."""
    found: dict[int, list[tuple[str, str]]] = {}
    for epoch, z, knn in re.findall(rf"epoch (\d+)/{epochs} .* Z ([\d.e+-]+)\s+kNN ([\d.]+)%", log):
        found.setdefault(int(epoch), []).append((z, knn))
    return found


@pytest.mark.slow
def test_dvc_repro_launches_torchrun_from_params_and_resumes_after_a_kill(tmp_path: Path):
    """`dvc repro` with pretrain.nproc_per_node = 2: killed (SIGKILL to DVC, the stage,
    torchrun and both ranks) after the first checkpoint, then re-run: it resumes and runs only
    the missing epochs,
    both ranks log the same bank-based kNN monitor and Z, metrics are written once (~1-2 min)."""
    epochs = 6
    repo = make_pipeline_repo(tmp_path, {"device": "cpu", "pretrain": {
        "nproc_per_node": 2, "epochs": epochs, "lr_milestones": [4]}})
    env = {**pipeline_env(repo), "OMP_NUM_THREADS": "1"}
    last = repo / "models" / "checkpoints" / "last.pt"
    with open(tmp_path / "killed.log", "w") as out:
        first = subprocess.Popen(["dvc", "repro", "pretrain"], cwd=repo, env=env, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while not last.exists():  # written atomically by rank 0 after each epoch
            assert first.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.05)
        # Every process of the run (torchrun puts its workers in sessions of their own)
        tree = [first, *psutil.Process(first.pid).children(recursive=True)]
        for process in tree:
            process.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        psutil.wait_procs(tree[1:], timeout=30)
    killed = (tmp_path / "killed.log").read_text()
    assert "--nproc-per-node=2 --standalone -m instdisc.stages.pretrain" in killed
    done = checkpoint.load(last)["epoch"]
    assert 1 <= done < epochs and not (repo / "metrics" / "pretrain.json").exists()

    again = subprocess.run(["dvc", "repro", "pretrain"], cwd=repo, env=env, capture_output=True,
                           text=True, timeout=600)
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-3000:]
    assert log.count(f"resuming from models/checkpoints/last.pt after epoch {done}") == 2, log
    monitors = monitor_lines(log, epochs)
    assert sorted(monitors) == list(range(done + 1, epochs + 1)), monitors  # only what was missing
    for epoch, values in monitors.items():  # one line per rank, identical: identical banks
        assert len(values) == 2 and values[0] == values[1], (epoch, values)
    assert log.count("pretrain: metrics in metrics/pretrain.json") == 1  # rank 0 only
    metrics = json.loads((repo / "metrics" / "pretrain.json").read_text())
    assert metrics["epochs"] == epochs
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["pretrain"]
    assert lock["params"]["params.yaml"]["pretrain"]["nproc_per_node"] == 2
    status = subprocess.run(["dvc", "status", "pretrain"], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=120)
    assert "up to date" in status.stdout, status.stdout + status.stderr
