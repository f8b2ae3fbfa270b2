"""`instdisc linear | places | semi_supervised | detection`: help, metrics files, MLflow runs, errors.

Real components: the stages run through `instdisc.cli.main` against a real SQLite MLflow store.
"""

from __future__ import annotations

import json
import logging

import mlflow
import pytest
import yaml

from instdisc import cli, tracking
from instdisc.stages import STAGES as ALL_STAGES

from conftest import REPO_ROOT, tiny_params
from transfer_helpers import tiny_encoder, tiny_prepared  # noqa: F401 (fixtures)

STAGES = ("linear", "places", "semi_supervised", "detection")
TINY = {
    "linear": {"layers": ["conv1", "conv5"], "target_dim": 64, "epochs": 2, "batch_size": 16,
               "random_init_baseline": True},
    "places": {"synthetic": {"num_classes": 3, "train_per_class": 8, "test_per_class": 4,
                             "image_size": 16},
               "probe": {"layers": ["conv5"], "target_dim": 64, "epochs": 2,
                         "random_init_baseline": False}},
    "semi_supervised": {"fractions": [0.1], "steps": 2, "batch_size": 8, "scratch_baseline": False},
    "detection": {"synthetic_train": 4, "synthetic_test": 2, "synthetic_size": 48, "min_size": 48,
                  "max_size": 48, "iterations": 1, "batch_size": 2, "warmup_iters": 1,
                  "fpn_channels": 16, "representation_size": 32},
}


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory) -> str:
    """One SQLite store for the module: creating one costs seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def workdir(tmp_path, monkeypatch, mlflow_db):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_db)
    monkeypatch.delenv(tracking.PARENT_RUN_ENV, raising=False)
    return tmp_path


def write_params(path, overrides=None):
    path.write_text(yaml.safe_dump(tiny_params({"device": "cpu", **TINY, **(overrides or {})})))
    return path


def argv_for(stage, workdir, encoder, prepared):
    argv = [stage, "--params", str(write_params(workdir / "params.yaml")), "--encoder",
            str(encoder), "--metrics", str(workdir / f"{stage}.json")]
    return argv + (["--data", str(prepared.root)] if stage in ("linear", "semi_supervised")
                   else ["--out", str(workdir / "data")])


@pytest.mark.parametrize("stage, options", [
    ("linear", ["--params", "--encoder", "--data", "--metrics"]),
    ("places", ["--params", "--encoder", "--out", "--metrics"]),
    ("semi_supervised", ["--params", "--encoder", "--data", "--metrics"]),
    ("detection", ["--params", "--encoder", "--out", "--metrics"]),
])
def test_every_transfer_subcommand_has_help(stage, options, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args([stage, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(option in text for option in options)


def test_cli_has_one_subcommand_per_stage_module_in_dvc_order():
    choices = next(a for a in cli.build_parser()._actions if hasattr(a, "choices")
                   and a.choices and "prepare" in a.choices).choices
    assert list(choices)[:len(ALL_STAGES)] == list(ALL_STAGES)
    dvc_stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    assert list(dvc_stages) == list(ALL_STAGES)
    for name, stage in dvc_stages.items():
        assert stage["cmd"] == f"python -m instdisc.stages.{name}"


@pytest.mark.parametrize("stage", STAGES)
def test_stage_writes_its_metrics_json_and_mlflow_run(stage, workdir, mlflow_db, tiny_prepared,
                                                      tiny_encoder):
    assert cli.main(argv_for(stage, workdir, tiny_encoder, tiny_prepared)) == 0
    metrics = json.loads((workdir / f"{stage}.json").read_text())
    assert metrics["seconds"] > 0
    if stage == "detection":
        assert 0.0 <= metrics["map"] <= 1.0
    elif stage == "semi_supervised":
        assert 0.0 <= metrics["labels_10pct"]["pretrained"] <= 100.0
    else:
        assert all(0.0 <= v <= 100.0 for v in metrics["top1"].values())
    client = mlflow.MlflowClient(mlflow_db)
    experiment = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    [run] = client.search_runs([experiment.experiment_id],
                               filter_string=f"tags.`instdisc.stage` = '{stage}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    assert run.info.run_name == stage and run.info.status == "FINISHED"
    assert run.data.metrics["seconds"] == pytest.approx(metrics["seconds"])
    if stage == "linear":
        assert {"top1.conv1", "top1.conv5", "random_init.top1.conv5"} <= set(run.data.metrics)


def test_linear_refuses_an_encoder_trained_on_other_data(workdir, tiny_prepared, caplog):
    from transfer_helpers import write_encoder

    encoder = write_encoder(workdir / "enc.pt", fingerprint="0" * 64)
    with caplog.at_level(logging.ERROR):
        assert cli.main(argv_for("linear", workdir, encoder, tiny_prepared)) == 2
    assert "was trained on dataset 000000000000" in caplog.text


def test_diverging_fine_tune_fails_with_its_own_message(workdir, tiny_prepared, tiny_encoder,
                                                         caplog):
    """The StageError of transfer/semi_supervised.py, not an AttributeError, reaches the user."""
    params = write_params(workdir / "params.yaml",
                          {"semi_supervised": {**TINY["semi_supervised"], "lr": 1e30}})
    with caplog.at_level(logging.ERROR):
        code = cli.main(["semi_supervised", "--params", str(params), "--encoder",
                         str(tiny_encoder), "--data", str(tiny_prepared.root)])
    assert code == 2
    assert "semi_supervised failed: fine-tuning diverged (loss nan); lower lr (1e+30)" \
        in caplog.text
    assert not (workdir / "metrics" / "semi_supervised.json").exists()
