"""flows.dag: the stage graph DVC builds (templated stages, wdir, nested paths) equals `dvc dag`."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from flows.dag import DagError, load_graph
from toy_project import DVC_YAML, PARAMS, dvc, init_repo, make_template

REPO_ROOT = Path(__file__).resolve().parents[2]

TEMPLATED_YAML = """\
vars:
  - shards: [a, b]
stages:
  fetch:
    foreach: ${shards}
    do:
      cmd: echo ${item} > raw/${item}.txt
      outs: ["raw/${item}.txt"]
  merge:
    cmd: cat raw/a.txt raw/b.txt > data/all.txt
    deps: [raw/a.txt, raw/b.txt]
    outs: [data/all.txt]
  train:
    matrix:
      lr: [0.1, 0.01]
      arch: [{name: small}, {name: big}]
    cmd: echo ${item.lr} ${item.arch.name}
    deps: [data/all.txt]
    outs: ["models/${item.arch.name}-${item.lr}.pt"]
  report:
    foreach:
      small: {model: models/small-0.1.pt}
      big: {model: models/big-0.01.pt}
    do:
      cmd: echo ${key}
      deps: ["${item.model}", "${paths.extra}"]
      metrics: ["reports/${key}.json"]
  sub:
    wdir: sub
    cmd: echo hi
    deps: [../data/all.txt]
    outs: [out.txt]
  final:
    cmd: echo done
    deps: [sub/out.txt, reports]
"""


def dvc_dag_edges(repo: Path) -> set[tuple[str, str]]:
    """Edges printed by `dvc dag --dot` ("a" -> "b" means b depends on a)."""
    dot = dvc(repo, "dag", "--dot").stdout
    return set(re.findall(r'"([^"]+)"\s*->\s*"([^"]+)"', dot))


def dvc_dag_nodes(repo: Path) -> set[str]:
    return set(re.findall(r'^"([^"]+)";$', dvc(repo, "dag", "--dot").stdout, re.M))


def test_toy_graph_equals_dvc_dag(tmp_path):
    repo = make_template(tmp_path)
    graph = load_graph(repo)
    assert graph.order == ["make", "train", "side", "eval"]
    assert graph.edges() == dvc_dag_edges(repo)
    assert graph.upstream["eval"] == ("train", "side")
    assert graph.stages["train"].metrics == ("metrics/train.json",)


def test_templated_graph_equals_dvc_dag(tmp_path):
    params = PARAMS + "paths:\n  extra: data/all.txt\n"
    repo = init_repo(tmp_path / "templated", {"dvc.yaml": TEMPLATED_YAML, "params.yaml": params})
    graph = load_graph(repo)
    assert set(graph.order) == dvc_dag_nodes(repo)
    assert "train@0.1-arch1" in graph.order and "fetch@a" in graph.order
    assert graph.edges() == dvc_dag_edges(repo)
    assert graph.stages["report@small"].metrics == ("reports/small.json",)
    order = graph.order
    assert order.index("merge") > order.index("fetch@b")
    assert order.index("final") > max(order.index("report@small"), order.index("sub"))


def test_project_dvc_yaml_graph_equals_dvc_dag(tmp_path):
    """The repository's own dvc.yaml, checked by DVC in a scratch git + DVC repo."""
    repo = tmp_path / "project"
    repo.mkdir()
    shutil.copy(REPO_ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(REPO_ROOT / "params.yaml", repo / "params.yaml")
    init_repo(repo, {})
    graph = load_graph(repo)
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    assert set(graph.order) == set(stages) == dvc_dag_nodes(repo)
    assert graph.edges() == dvc_dag_edges(repo)
    assert graph.order[0] == "prepare"


def test_cycle_is_an_error(tmp_path):
    cyclic = ("stages:\n  a:\n    cmd: echo\n    deps: [y]\n    outs: [x]\n"
              "  b:\n    cmd: echo\n    deps: [x]\n    outs: [y]\n")
    repo = init_repo(tmp_path / "cyclic", {"dvc.yaml": cyclic})
    with pytest.raises(DagError, match="cycle"):
        load_graph(repo)


def test_unresolvable_template_is_dvcs_error(tmp_path):
    repo = init_repo(tmp_path / "bad", {
        "dvc.yaml": "stages:\n  s:\n    foreach: ${missing.list}\n    do:\n      cmd: echo\n"})
    with pytest.raises(DagError, match=r"missing.list"):
        load_graph(repo)


def test_missing_dvc_yaml_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no dvc.yaml"):
        load_graph(tmp_path)


def test_toy_dvc_yaml_is_plain_yaml():
    assert set(yaml.safe_load(DVC_YAML)["stages"]) == {"make", "train", "side", "eval"}
