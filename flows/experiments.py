"""Whole-pipeline DVC experiments: `dvc exp run [--temp] -n <name> -S key=value ...`.

A run with parameter overrides is a DVC experiment, so its params, metrics and outputs stay
versioned (`dvc exp show`, `dvc exp apply <name>`). By default it runs with `--temp`, in a copy
of the repository under `.dvc/tmp/exps`: the workspace (params.yaml, outputs, dvc.lock) is left
exactly as it was. `--temp` copies git-tracked files only (modified ones included); untracked
files are missing there, so they are reported before the run. With `temp=False` the experiment
runs in the workspace and its results stay there, except params.yaml, which is restored.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.commands import raise_for_failure, retry_if_transient, run_streaming
from flows.settings import dvc_command, subprocess_env

_EXP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")


def set_arguments(overrides: Mapping[str, Any]) -> list[str]:
    """["-S", "key=value", ...]; non-string values written as JSON, which DVC parses as YAML."""
    args: list[str] = []
    for key, value in overrides.items():
        text = value if isinstance(value, str) else json.dumps(value)
        args += ["-S", f"{key}={text}"]
    return args


def parse_sets(items: list[str]) -> dict[str, Any]:
    """["a.b=3", "c=x"] -> {"a.b": 3, "c": "x"} (values parsed as YAML)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def validate_overrides(repo: Path, overrides: Mapping[str, Any]) -> None:
    """Every key must exist: `a.b.c` in params.yaml, or `file.yaml:a.b` in that file."""
    if not overrides:
        raise ValueError("overrides is empty: nothing to set")
    for key in overrides:
        file, _, dotted = key.rpartition(":") if ":" in key else ("params.yaml", "", key)
        path = repo / file
        if not path.is_file():
            raise ValueError(f"override {key!r}: params file {file} does not exist in {repo}")
        node: Any = yaml.safe_load(path.read_text()) or {}
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise ValueError(f"override {key!r}: {file} has no key {dotted!r}")
            node = node[part]


def params_files(overrides: Mapping[str, Any]) -> list[str]:
    """params.yaml plus every file named as `file:key` in `overrides`."""
    return sorted({"params.yaml"} | {k.rpartition(":")[0] for k in overrides if ":" in k})


def make_name(prefix: str, index: int | None = None) -> str:
    """A fresh experiment name, `<prefix>-YYYYmmdd-HHMMSS[-<index>]` (UTC)."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{prefix}-{stamp}" + ("" if index is None else f"-{index}")


def check_name(name: str) -> str:
    if not _EXP_NAME.match(name):
        raise ValueError(f"experiment name {name!r} must be letters, digits, '-' or '_'")
    return name


@contextlib.contextmanager
def files_preserved(repo: Path, names: list[str]) -> Iterator[list[str]]:
    """Put the bytes of `names` back if the block changed them (`dvc exp run -S` does).

    Yields a list that, after the block, names the files that were restored.
    """
    before = {n: (repo / n).read_bytes() for n in names if (repo / n).is_file()}
    restored: list[str] = []
    try:
        yield restored
    finally:
        for name, data in before.items():
            if (repo / name).read_bytes() != data:
                (repo / name).write_bytes(data)
                restored.append(name)


def untracked_files(repo: Path) -> list[str]:
    """Files git does not track and does not ignore (left out of a --temp experiment)."""
    out = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=repo,
                         capture_output=True, text=True, check=False)
    return out.stdout.split() if out.returncode == 0 else []


@task(cache_policy=NO_CACHE, retry_condition_fn=retry_if_transient, task_run_name="exp-{name}")
def run_experiment(repo: Path, name: str, overrides: dict[str, Any], temp: bool,
                   env: dict[str, str], transient_patterns: list[str],
                   targets: list[str] | None = None) -> str:
    """`dvc exp run` with `overrides` of the whole pipeline, or of `targets` and the stages
    they depend on; returns the experiment name."""
    logger = get_run_logger()
    if temp and (missing := untracked_files(repo)):
        logger.warning("untracked files are not part of a --temp experiment (git add them if "
                       "the pipeline needs them): %s", ", ".join(missing[:20]))
    args = ["exp", "run", "-n", name] + (["--temp"] if temp else [])
    args += set_arguments(overrides) + list(targets or [])
    logger.info("dvc %s", " ".join(args))
    with files_preserved(repo, params_files(overrides)) as restored:
        result = run_streaming(dvc_command("--wait-for-lock", *args), repo, subprocess_env(env),
                               lambda line: logger.info("[%s] %s", name, line))
    if restored:
        logger.info("restored %s: dvc exp run had left the overrides there", ", ".join(restored))
    raise_for_failure(f"experiment {name!r}", result, transient_patterns)
    return name


def show_experiments(repo: Path) -> dict[str, dict[str, Any]]:
    """{name: {"rev", "params": {file: data}, "metrics": {path: data}}} from `dvc exp show`."""
    out = subprocess.run(dvc_command("exp", "show", "--json"), cwd=repo, env=subprocess_env(),
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"dvc exp show failed: {out.stderr.strip()[-2000:]}")
    found: dict[str, dict[str, Any]] = {}
    for baseline in json.loads(out.stdout):
        for experiment in baseline.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                name = rev.get("name") or experiment.get("name") or rev.get("rev")
                data = rev.get("data") or {}
                found[name] = {
                    "rev": rev.get("rev"),
                    "params": _contents(data.get("params")),
                    "metrics": _contents(data.get("metrics")),
                }
    return found


def _contents(files: Mapping[str, Any] | None) -> dict[str, Any]:
    """{path: {"data": ...}} -> {path: ...}, files that DVC could not read left out."""
    return {path: entry["data"] for path, entry in (files or {}).items()
            if isinstance(entry, Mapping) and "data" in entry}
