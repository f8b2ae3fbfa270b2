"""The pipeline and ablation flows on a toy DVC project, under one prefect_test_harness.

The fixtures live here rather than in a tests/flows/conftest.py because tests/conftest.py is
imported by name (`from conftest import ...`) from other test modules, and a second conftest.py
would shadow it.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import toy_project  # noqa: I001

toy_project.isolate_prefect()  # Prefect reads its settings when it is imported

import pytest  # noqa: E402
import yaml  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows.ablations import PRESETS, ablation, check_effective, combinations, parse_sweep  # noqa: E402,E501
from flows.dag import load_graph  # noqa: E402
from flows.experiments import parse_sets, set_arguments, validate_overrides  # noqa: E402
from flows.pipeline import pipeline  # noqa: E402
from flows.serve import deployments  # noqa: E402
from flows.table1 import ROWS, config_for, select_rows, table1, write_report  # noqa: E402
from toy_project import (  # noqa: E402
    copy_repo, dvc, init_repo, make_real_repo, make_template, read_metrics, reset_control, runs,
    times)

REPO_ROOT = Path(__file__).resolve().parents[2]
# Entries that differ between two identical runs: wall-clock timings, file sizes of the ONNX
# export (torch embeds absolute source paths, so they depend on the checkout's path), and the
# MLflow run id / registry version of the registered model (each run registers a new version).
VOLATILE = re.compile(r"time|second|duration|per_sec|throughput|img_s|timestamp|bytes"
                      r"|^registry\.(run_id|version)$", re.I)

FAST = {"retries": 2, "retry_delay_seconds": 0, "track": False}


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    """One temporary Prefect server and database for every flow test (~20 s to start), and
    the environment the flows' subprocesses see (DVC site cache, MLflow store in a temp dir)."""
    with pytest.MonkeyPatch.context() as env:
        for key, value in toy_project.TEST_ENV.items():
            env.setenv(key, value)
        for key in ("INSTDISC_PARENT_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
            env.delenv(key, raising=False)
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture(scope="session")
def toy_template(tmp_path_factory):
    return make_template(tmp_path_factory.mktemp("toy"))


@pytest.fixture
def toy_repo(tmp_path, toy_template):
    reset_control()
    return copy_repo(toy_template, tmp_path / "repo")


def show_revs(repo) -> dict[str, str]:
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    return {e["name"]: e["revs"][0]["rev"] for base in shown for e in base.get("experiments") or []}


def exp_names(repo) -> set[str]:
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    return {e["name"] for base in shown for e in base.get("experiments") or []}


def test_flow_writes_what_dvc_repro_writes_nests_mlflow_runs_then_skips_everything(
        toy_repo, tmp_path, toy_template):
    reference = copy_repo(toy_template, tmp_path / "reference")
    dvc(reference, "repro")
    reset_control()
    result = pipeline(repo=str(toy_repo), retries=0, track=True)
    assert result["stages"] == dict.fromkeys(["make", "train", "side", "eval"], "ran")
    assert read_metrics(toy_repo) == read_metrics(reference) != {}
    lock = [yaml.safe_load((r / "dvc.lock").read_text()) for r in (toy_repo, reference)]
    assert lock[0] == lock[1]  # same hashes; stage order follows completion order
    assert result["metrics"]["train.nested.lr"] == 0.5 and result["metrics"]["eval.acc"] == 0.12

    client = MlflowClient()
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert re.fullmatch(r"[0-9a-f]{40}", parent.data.tags["mlflow.source.git.commit"])
    assert parent.data.tags["prefect.flow_run_id"]
    assert parent.data.metrics["train.score"] == 12 and parent.data.metrics["eval.acc"] == 0.12
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert [c.data.tags["instdisc.stage"] for c in children] == ["train"]
    assert children[0].data.metrics["score"] == 12

    summary = pipeline_summary()
    assert "| eval | knn_top1 | 12 | 20 | **no** |" in summary  # acc 0.12: below random init
    assert "| eval | uniformity | -0.1 | -0.5 | **no** |" in summary

    ran_once = runs(toy_project.CONTROL)
    again = pipeline(repo=str(toy_repo), **FAST)
    assert again["stages"] == dict.fromkeys(["make", "train", "side", "eval"], "skipped")
    assert runs(toy_project.CONTROL) == ran_once


def pipeline_summary() -> str:
    """The markdown summary artifact the last pipeline flow run published."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["instdisc-pipeline"])))
    newest = max(found, key=lambda a: a.created)
    return newest.data


def overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Seconds during which the two (start, end) intervals both ran."""
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def test_gpu_stages_never_overlap_while_cpu_stages_run_side_by_side(toy_repo, tmp_path):
    """train and side both follow make; reading `device` makes them GPU stages (tag `gpu`)."""
    from prefect import get_client

    gpu_yaml = toy_project.DVC_YAML.replace("params: [train]", "params: [device, train]").replace(
        "deps: [out/data]\n    outs: [out/side.txt]",
        "deps: [out/data]\n    params: [device]\n    outs: [out/side.txt]")
    gpu_repo = init_repo(tmp_path / "gpu", {"params.yaml": toy_project.PARAMS + "device: cpu\n",
                                            "dvc.yaml": gpu_yaml, "stage.py": toy_project.STAGE_PY})
    assert load_graph(gpu_repo).gpu_stages == ["train", "side"]
    assert load_graph(toy_repo).gpu_stages == []
    control = reset_control({"sleep": {"train": 2, "side": 2}})
    assert set(pipeline(repo=str(gpu_repo), **FAST)["stages"].values()) == {"ran"}
    gpu_times = times(control)
    control = reset_control({"sleep": {"train": 2, "side": 2}})
    assert set(pipeline(repo=str(toy_repo), **FAST)["stages"].values()) == {"ran"}
    cpu_times = times(control)
    print("GPU-tagged train/side overlap: %.2f s; untagged: %.2f s"
          % (overlap(gpu_times["train"], gpu_times["side"]),
             overlap(cpu_times["train"], cpu_times["side"])))
    assert overlap(gpu_times["train"], gpu_times["side"]) == 0.0, gpu_times
    assert overlap(cpu_times["train"], cpu_times["side"]) > 0.5, cpu_times
    with get_client(sync_client=True) as client:  # created by the flow, one GPU slot
        assert client.read_concurrency_limit_by_tag("gpu").concurrency_limit == 1


def tree_size(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def test_a_second_clone_pulls_the_first_ones_outputs_from_the_dvc_remote(toy_repo, tmp_path):
    remote = tmp_path / "dvc-remote"
    dvc(toy_repo, "remote", "add", "-d", "shared", str(remote))
    toy_project.git(toy_repo, "commit", "-qam", "dvc remote")
    first = pipeline(repo=str(toy_repo), **FAST)  # pull (nothing there yet), run, push
    assert set(first["stages"].values()) == {"ran"}
    pushed = tree_size(remote)
    assert pushed[0] >= 3  # out/data .dir listing + contents (x.txt = side.txt = "3", deduped)
    toy_project.git(toy_repo, "add", "dvc.lock", "metrics")
    toy_project.git(toy_repo, "commit", "-qm", "pipeline results")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(toy_repo), str(clone)], check=True)
    control = reset_control()
    second = pipeline(repo=str(clone), **FAST)  # pull, then every stage is up to date
    assert set(second["stages"].values()) == {"skipped"} and runs(control) == []
    assert (clone / "out" / "model.txt").read_text() == "12"
    assert read_metrics(clone) == read_metrics(toy_repo)
    assert "up to date" in dvc(clone, "status").stdout
    print(f"dvc remote after the first clone's push: {pushed[0]} files, {pushed[1]} bytes; "
          f"clone cache after pull: {tree_size(clone / '.dvc' / 'cache')}")


def test_transient_failure_is_retried_and_then_succeeds(toy_repo):
    control = reset_control({"train": "transient"})
    result = pipeline(repo=str(toy_repo), **FAST)
    assert result["stages"]["train"] == "ran" and result["stages"]["eval"] == "ran"
    assert (control / "train.attempts").read_text() == "2"


def test_real_failure_fails_the_flow_with_the_stage_error_and_starts_nothing_downstream(toy_repo):
    control = reset_control({"train": "fatal"})
    state = pipeline(repo=str(toy_repo), return_state=True, **FAST)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "stage 'train' failed (exit code 1)" in message
    assert "ValueError: toy stage train failed for real: corrupt input" in message
    assert message.rstrip().endswith("not started: eval")
    assert (control / "train.attempts").read_text() == "1"  # not retried: not transient
    assert "eval" not in runs(control) and "side" in runs(control)
    assert not (toy_repo / "metrics" / "eval.json").exists()


@pytest.mark.parametrize("temp", [True, False], ids=["temp", "workspace"])
def test_override_run_is_a_dvc_experiment_and_leaves_params_untouched(toy_repo, temp):
    before = (toy_repo / "params.yaml").read_bytes()
    name = f"override-{'temp' if temp else 'ws'}"
    result = pipeline(repo=str(toy_repo), overrides={"train.m": 7}, experiment_name=name,
                      temp_experiment=temp, **FAST)
    assert (toy_repo / "params.yaml").read_bytes() == before
    assert result["experiment"] == name and name in exp_names(toy_repo)
    assert result["metrics"]["train.score"] == 21 and result["metrics"]["eval.acc"] == 0.21
    assert (toy_repo / "metrics" / "train.json").exists() is (not temp)


def test_unknown_override_key_is_rejected(toy_repo):
    with pytest.raises(ValueError, match=r"override 'train.mm': params.yaml has no key 'train.mm'"):
        validate_overrides(toy_repo, {"train.mm": 1})


def test_ablation_on_two_values_yields_a_two_row_table_failures_included(toy_repo):
    result = ablation(sweep={"train.m": [3, 0]}, repo=str(toy_repo), **FAST)
    ok, failed = result["rows"]
    assert (ok["params.train.m"], ok["status"]) == (3, "succeeded")
    assert (ok["train.score"], ok["eval.acc"]) == (9, 0.09)
    assert (failed["params.train.m"], failed["status"]) == (0, "failed")
    assert failed["error"] == "ZeroDivisionError: float division by zero"
    assert "train.score" not in failed
    assert result["metric"] == "eval.acc"  # default: first metric of the last stage
    csv_lines = (toy_repo / "reports" / "ablation.csv").read_text().splitlines()
    assert len(csv_lines) == 3
    assert csv_lines[0].startswith("experiment,status,params.train.m,make.n,")
    assert ",failed," in csv_lines[2] and "ZeroDivisionError" in csv_lines[2]
    assert (toy_repo / "reports" / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    assert ok["experiment"] in exp_names(toy_repo)
    assert (toy_repo / "params.yaml").read_text() == toy_project.PARAMS


def test_command_line_values_are_yaml_and_reach_dvc_as_such():
    sets = parse_sets(["pretrain.epochs=3", "prepare.source=../x.zip", "a.b=[1, 2]", "c=true"])
    assert sets == {"pretrain.epochs": 3, "prepare.source": "../x.zip", "a.b": [1, 2], "c": True}
    assert set_arguments(sets) == ["-S", "pretrain.epochs=3", "-S", "prepare.source=../x.zip",
                                   "-S", "a.b=[1, 2]", "-S", "c=true"]
    assert parse_sweep(["m=1,10,512", "ms=[[1], [2, 3]]", "arch=resnet18,resnet50"]) == {
        "m": [1, 10, 512], "ms": [[1], [2, 3]], "arch": ["resnet18", "resnet50"]}
    with pytest.raises(ValueError, match="--set expects key=value, got 'oops'"):
        parse_sets(["oops"])


def test_sweep_is_a_grid_and_deployment_has_the_cron(toy_repo):
    assert combinations({"a": [1, 2], "b": ["x"]}) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]
    nightly, sweep = deployments(toy_repo, "*/5 * * * *", "Europe/Paris")
    assert nightly.name == "nightly" and nightly.parameters["repo"] == str(toy_repo)
    assert nightly.schedules[0].schedule.cron == "*/5 * * * *"
    assert nightly.schedules[0].schedule.timezone == "Europe/Paris"
    assert nightly.entrypoint == "flows.pipeline.pipeline"
    assert sweep.schedules == [] and "sweep" in sweep.parameters


def test_a_sweep_of_a_knob_the_loss_ignores_is_refused(tmp_path):
    (tmp_path / "params.yaml").write_text("pretrain:\n  loss: softmax\n  num_negatives: 8\n")
    with pytest.raises(ValueError, match=r"sweeping 'pretrain.num_negatives' has no effect: "
                                         r"pretrain.loss is 'softmax'"):
        check_effective(tmp_path, {"pretrain.num_negatives": 10}, ["pretrain.num_negatives"])
    check_effective(tmp_path, {"pretrain.num_negatives": 10, "pretrain.loss": "nce"},
                    ["pretrain.num_negatives"])  # pinned to NCE: fine
    for combo in combinations(PRESETS["nce-m"]):  # the preset pins loss: nce itself
        assert combo["pretrain.loss"] == "nce"
        check_effective(tmp_path, combo, list(combo))


def test_table1_rows_config_and_report(tmp_path):
    assert [r[0] for r in select_rows(["softmax", "nce-1"])] == ["softmax", "nce-1"]
    with pytest.raises(ValueError, match=r"unknown Table 1 rows \['nce-7'\]"):
        select_rows(["nce-7"])
    assert [paper for *_, paper in ROWS] == [63.0, 42.5, 63.4, 78.4, 80.4, 80.8]
    archive = tmp_path / "data.zip"
    archive.write_bytes(b"")
    config = config_for("data.zip", "cpu", tmp_path, {"pretrain.epochs": 2})
    assert config["prepare.source"] == str(archive.resolve())  # temp experiments: absolute
    assert (config["pretrain.width"], config["pretrain.epochs"], config["evaluate.k"]) == \
        (0.25, 2, 200)
    assert config_for("synthetic", "full", tmp_path)["pretrain.lr_milestones"] == [120, 160]
    with pytest.raises(ValueError, match="source 'nope.zip' does not exist"):
        config_for("nope.zip", "cpu", tmp_path)
    table = [{"row": "softmax", "ours": 41.5, "random_init": 28.0, "paper": 80.8,
              "train_seconds": 200.0, "status": "succeeded", "experiment": "t-0", "error": "",
              "curve": [20.0, 30.0, 41.0]},
             {"row": "nce-4096", "ours": None, "random_init": None, "paper": 80.4,
              "train_seconds": None, "status": "failed", "experiment": "t-1",
              "error": "ParamsError: num_negatives", "curve": []}]
    result = write_report(table, config, "cpu", tmp_path / "out")
    lines = (tmp_path / "out" / "table1.csv").read_text().splitlines()
    assert lines[0] == "row,ours,random_init,paper,train_seconds,status,experiment,error"
    assert lines[1].startswith("softmax,41.5,28.0,80.8,200.0,succeeded")
    assert lines[2].startswith("nce-4096,,,80.4,,failed")
    markdown = (tmp_path / "out" / "table1.md").read_text()
    assert "| softmax | 41.5 | 28 | 80.8 |" in markdown and "`pretrain.epochs`: `2`" in markdown
    assert Path(result["plot"]).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_table1_flow_runs_rows_as_experiments_on_the_real_pipeline(tmp_path, monkeypatch):
    """Two rows of Table 1 through real `dvc exp run --temp ... evaluate` (~2 min)."""
    repo = make_real_repo(tmp_path / "t1", REPO_ROOT)
    monkeypatch.setenv("PYTHONPATH", str(repo))
    fixed = {"prepare.train_fraction": 1.0, "pretrain.epochs": 2, "pretrain.batch_size": 16,
             "pretrain.width": 0.125, "evaluate.k": 10}
    result = table1(source="synthetic", repo=str(repo), rows=["nce-10", "softmax"],
                    fixed=fixed, track=False)
    rows = {r["row"]: r for r in result["rows"]}
    assert set(rows) == {"nce-10", "softmax"}
    for row in rows.values():
        assert row["status"] == "succeeded", row["error"]
        assert 0.0 <= row["ours"] <= 100.0 and len(row["curve"]) == 2
    assert rows["nce-10"]["ours"] != rows["softmax"]["ours"]  # two different objectives ran
    assert {r["experiment"] for r in result["rows"]} <= exp_names(repo)
    rev = show_revs(repo)[rows["softmax"]["experiment"]]
    committed = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "metrics"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.split()
    assert committed == ["metrics/evaluate.json", "metrics/prepare.json",
                         "metrics/pretrain.json"]  # only the stages up to evaluate ran


def stable(data, prefix=""):
    """A metrics document without the VOLATILE entries."""
    if isinstance(data, dict):
        return {k: stable(v, f"{prefix}{k}.") for k, v in data.items()
                if not VOLATILE.search(f"{prefix}{k}")}
    return data


@pytest.mark.slow
def test_real_pipeline_flow_writes_the_metrics_dvc_repro_writes(tmp_path, monkeypatch):
    """The project's own dvc.yaml and instdisc/ on the tiny synthetic config (~2-5 min)."""
    flow_repo = make_real_repo(tmp_path / "flow", REPO_ROOT)
    repro_repo = make_real_repo(tmp_path / "repro", REPO_ROOT)
    monkeypatch.setenv("PYTHONPATH", str(repro_repo))  # stage commands import the copy
    dvc(repro_repo, "repro")
    monkeypatch.setenv("PYTHONPATH", str(flow_repo))
    result = pipeline(repo=str(flow_repo), retries=0, track=True)
    assert set(result["stages"].values()) == {"ran"}
    client = MlflowClient()
    parent = client.get_run(result["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.data.tags["instdisc.stage"] for c in children} == set(result["stages"])
    flow_metrics = {k: stable(json.loads(v)) for k, v in read_metrics(flow_repo).items()}
    repro_metrics = {k: stable(json.loads(v)) for k, v in read_metrics(repro_repo).items()}
    declared = {Path(p).name for s in load_graph(flow_repo).stages.values()
                for p in s.metrics}
    assert set(flow_metrics) == declared and flow_metrics == repro_metrics
