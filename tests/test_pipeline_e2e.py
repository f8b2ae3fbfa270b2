"""End to end: real `dvc repro` of the real dvc.yaml in a temp git repo, on tiny synthetic data."""

from __future__ import annotations

import json

import mlflow
import pytest
import yaml

from conftest import make_pipeline_repo, run


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    repo = make_pipeline_repo(tmp_path_factory.mktemp("e2e"))
    out = run(["dvc", "repro"], repo, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return repo, out


def test_repro_yields_knn_metrics_for_trained_and_random_encoders(reproduced):
    repo, _ = reproduced
    metrics = json.loads((repo / "metrics" / "evaluate.json").read_text())
    for key in ("top1", "top5"):
        assert 0.0 <= metrics["knn"][key] <= 100.0
        assert 0.0 <= metrics["random_init"]["knn"][key] <= 100.0
    assert metrics["knn"]["top5"] >= metrics["knn"]["top1"]
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    flat = json.dumps(shown)
    assert "random_init" in flat and "top1" in flat


def test_repro_writes_every_declared_output(reproduced):
    repo, _ = reproduced
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                path = entry if isinstance(entry, str) else next(iter(entry))
                assert (repo / path).exists(), f"stage {name} did not write {path}"
    history = (repo / "plots" / "pretrain_history.csv").read_text().splitlines()
    assert history[0].startswith("epoch") and len(history) == 1 + 2
    assert (repo / "plots" / "pretrain_history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    prepared = json.loads((repo / "metrics" / "prepare.json").read_text())
    assert (prepared["train_images"], prepared["test_images"], prepared["num_classes"]) == (48, 24, 3)


def test_second_repro_is_a_no_op(reproduced):
    repo, _ = reproduced
    out = run(["dvc", "repro"], repo, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Running stage" not in out.stdout
    status = run(["dvc", "status"], repo)
    assert "up to date" in status.stdout


def test_every_stage_is_an_mlflow_run_with_commit_and_data_tags(reproduced):
    repo, _ = reproduced
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["instdisc"], output_format="list")
    by_stage = {r.data.tags["instdisc.stage"]: r for r in runs}
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    assert set(stages) <= set(by_stage)
    pretrain = by_stage["pretrain"]
    assert pretrain.data.params["pretrain.loss"] == "nce"
    assert pretrain.data.tags["mlflow.source.git.commit"]
    assert pretrain.data.tags["dvc.dep.data/prepared"]
    client = mlflow.MlflowClient()
    losses = client.get_metric_history(pretrain.info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2]
    assert "knn.top1" in by_stage["evaluate"].data.metrics


def test_exp_run_overrides_any_key(reproduced):
    repo, _ = reproduced
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "after repro"], repo)
    out = run(["dvc", "exp", "run", "-S", "pretrain.epochs=1", "-S", "evaluate.k=3"], repo,
              timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    assert "pretrain.epochs" in json.dumps(shown) or '"epochs": 1' in json.dumps(shown)
