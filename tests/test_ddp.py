"""torchrun/DDP on CPU (gloo, 2 processes): the real `instdisc pretrain` stage, banks kept identical."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from conftest import pipeline_env, tiny_params

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
