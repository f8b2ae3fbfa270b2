"""flows.commands, flows.settings, flows.metrics: streaming, failure text, retry decisions."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from flows import metrics, settings
from flows.commands import (
    StageFailed, failure_reason, is_transient, raise_for_failure, retry_if_transient, run_streaming)
from flows.dag import Stage, StageGraph

DVC_FAILURE = [
    "Running stage 'train':",
    "> python stage.py train",
    "Traceback (most recent call last):",
    '  File "stage.py", line 3, in <module>',
    "ValueError: toy stage train failed for real: corrupt input",
    "ERROR: failed to reproduce 'train': failed to run: python stage.py train, exited with 1",
]


def test_run_streaming_emits_each_line_and_keeps_the_tail(tmp_path):
    lines: list[str] = []
    script = "import sys; print('one'); print('two', file=sys.stderr); sys.exit(3)"
    result = run_streaming([sys.executable, "-c", script], tmp_path, settings.subprocess_env(),
                           lines.append, markers=("two", "three"))
    assert lines == ["one", "two"] and result.tail == ["one", "two"]
    assert result.returncode == 3 and not result.ok
    assert result.text_seen == {"two"}


def test_progress_bar_updates_are_thinned_out(tmp_path):
    lines: list[str] = []
    script = ("import sys\nfor i in range(200): sys.stdout.write(f'step {i}\\r')\n"
              "print('done'); print('a\\r\\nb')")
    result = run_streaming([sys.executable, "-c", script], tmp_path, settings.subprocess_env(),
                           lines.append, markers=("step 150",))
    assert lines == ["step 0", "done", "a", "b"]
    assert result.ok and result.text_seen == {"step 150"}


def test_failure_reason_prefers_the_python_exception():
    expected = "ValueError: toy stage train failed for real: corrupt input"
    assert failure_reason(DVC_FAILURE) == expected
    dvc_only = ["Running stage 'x':", "ERROR: failed to reproduce 'x': exited with 2", "bye"]
    assert failure_reason(dvc_only) == "failed to reproduce 'x': exited with 2"
    assert failure_reason([]) == "no output"


@pytest.mark.parametrize("line, transient", [
    ("ERROR: failed to reproduce 'x': failed to run: python s.py, exited with 75", True),
    ("ERROR: Unable to acquire lock. Most likely another DVC process is running", True),
    ("sqlite3.OperationalError: database is locked", True),
    ("ConnectionResetError: [Errno 104] Connection reset by peer", True),
    ("ERROR: failed to reproduce 'x': failed to run: python s.py, exited with 1", False),
    ("exited with 750", False),
    ("torch.OutOfMemoryError: CUDA out of memory", False),
])
def test_transient_classification(line, transient):
    assert is_transient([line]) is transient


def test_extra_transient_patterns():
    assert is_transient(["NCCL timeout on rank 3"], [r"NCCL timeout"])


def test_raise_for_failure_carries_reason_tail_and_kind():
    result = SimpleNamespace(ok=False, returncode=1, tail=DVC_FAILURE)
    match = r"stage 'train' failed \(exit code 1\): ValueError"
    with pytest.raises(StageFailed, match=match) as info:
        raise_for_failure("stage 'train'", result, [])
    assert not info.value.transient
    assert "exited with 1" in str(info.value)


def test_retry_condition_retries_only_transient_failures():
    transient = StageFailed("s", 1, "r", [], transient=True)
    fatal = StageFailed("s", 1, "r", [], transient=False)
    assert retry_if_transient(None, None, SimpleNamespace(data=transient)) is True
    assert retry_if_transient(None, None, SimpleNamespace(data=fatal)) is False
    assert retry_if_transient(None, None, SimpleNamespace(data=OSError("EAGAIN"))) is True
    assert retry_if_transient(None, None, SimpleNamespace(data=KeyError("bug"))) is False


def test_apply_defaults_keeps_existing_values():
    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "true"}
    settings.apply_defaults(env)
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "true"
    assert env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "120"
    assert env["DO_NOT_TRACK"] == "true" and env["DVC_NO_ANALYTICS"] == "1"


def test_subprocess_env_puts_this_interpreter_first_on_path():
    env = settings.subprocess_env({"EXTRA": "1"})
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert env["EXTRA"] == "1" and env["PYTHONUNBUFFERED"] == "1"


def test_metrics_are_named_stage_dot_key(tmp_path):
    graph = StageGraph({"evaluate": Stage("evaluate", ("m/e.json",)),
                        "pretrain": Stage("pretrain", ("m/p.json",))},
                       {"evaluate": (), "pretrain": ()})
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "e.json").write_text('{"knn": {"top1": 51.5}, "n": 3}')
    files, problems = metrics.read_workspace(tmp_path, graph)
    assert problems == ["stage pretrain: metrics file m/p.json does not exist"]
    flat = metrics.by_stage(graph, files)
    assert flat == {"evaluate.knn.top1": 51.5, "evaluate.n": 3}
    assert metrics.table_rows(flat)[0] == {"stage": "evaluate", "metric": "knn.top1", "value": 51.5}
    table = metrics.markdown_table(metrics.table_rows(flat))
    assert table.splitlines()[2] == "| evaluate | knn.top1 | 51.5 |"


def test_summary_rows_show_each_stage_headline_beside_its_baseline():
    flat = {"prepare.train_images": 30, "prepare.skipped": 0, "evaluate.knn.top1": 43.8,
            "evaluate.random_init.knn.top1": 19.1, "evaluate.knn.top5": 88.0,
            "linear.skipped": "no labels: kNN and probes need classes", "detection.map": 0.5,
            "detection.random_init.map": 0.25, "export.int8_parity.passed": False}
    assert metrics.summary_rows(flat) == [
        {"stage": "prepare", "metric": "train_images", "value": 30, "baseline": None},
        {"stage": "evaluate", "metric": "knn.top1", "value": 43.8, "baseline": 19.1},
        {"stage": "linear", "metric": "skipped", "value": "no labels: kNN and probes need classes",
         "baseline": None},
        {"stage": "detection", "metric": "map", "value": 0.5, "baseline": 0.25},
        {"stage": "export", "metric": "int8_parity.passed", "value": False, "baseline": None}]


def test_random_init_rows_pair_each_flag_with_both_values():
    flat = {"evaluate.knn.top1": 43.8, "evaluate.random_init.knn.top1": 19.1,
            "evaluate.label_free.alignment": 0.34, "evaluate.random_init.label_free.alignment":
            0.01, "evaluate.beats_random_init.knn_top1": True,
            "evaluate.beats_random_init.alignment": False, "linear.conv5": 52.2}
    assert metrics.random_init_rows(flat) == [
        {"stage": "evaluate", "metric": "knn_top1", "trained": 43.8, "random init": 19.1,
         "beats random init": "yes"},
        {"stage": "evaluate", "metric": "alignment", "trained": 0.34, "random init": 0.01,
         "beats random init": "**no**"}]
    assert metrics.random_init_rows({"linear.conv5": 52.2}) == []
