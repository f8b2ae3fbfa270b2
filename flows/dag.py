"""The stage graph of a DVC project, as DVC itself computes it (`dvc.repo.Repo(root).index.graph`).

No dvc.yaml parsing here: DVC expands `foreach`/`matrix`, interpolates `${...}`, applies `wdir`
and its own path-overlap rule, and reads nested dvc.yaml files. This module only orders the
stages (dvc.yaml order among stages that are ready) and keeps what the flows need: each stage's
name as `dvc repro` accepts it, its upstream stages, its metrics files, and whether it uses the
accelerator: a stage that reads the `device` param (`params: [device, ...]` in dvc.yaml) is a GPU
stage, which the pipeline flow never runs beside another one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEVICE_PARAM", "DagError", "Stage", "StageGraph", "load_graph"]

DEVICE_PARAM = "device"  # the params key of the stages that run on the accelerator


class DagError(ValueError):
    """DVC could not build an acyclic stage graph from the project."""


@dataclass(frozen=True)
class Stage:
    """One DVC stage: its address (`name`, `name@key`, `sub/dvc.yaml:name`) and metrics files."""

    name: str
    metrics: tuple[str, ...]  # repo-relative POSIX paths
    gpu: bool = False  # reads the `device` param: runs on the accelerator when there is one


@dataclass(frozen=True)
class StageGraph:
    """Stages in a topological order and their upstream stages (what they need)."""

    stages: dict[str, Stage]
    upstream: dict[str, tuple[str, ...]]

    @property
    def order(self) -> list[str]:
        return list(self.stages)

    @property
    def gpu_stages(self) -> list[str]:
        return [name for name, stage in self.stages.items() if stage.gpu]

    def edges(self) -> set[tuple[str, str]]:
        """{(upstream, downstream)}, the edges `dvc dag --dot` prints."""
        return {(parent, name) for name, parents in self.upstream.items() for parent in parents}


def load_graph(repo: Path) -> StageGraph:
    """The pipeline stages of the DVC project at `repo` (stages with a command; `.dvc` files of
    tracked data are not tasks). A cycle or an invalid dvc.yaml raises DagError."""
    import networkx as nx
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    root = Path(repo).resolve()
    if not (root / "dvc.yaml").is_file():
        raise FileNotFoundError(f"no dvc.yaml at {root}")
    try:
        with Repo(str(root)) as dvc_repo:
            graph = dvc_repo.index.graph  # edge: dependent -> dependency
            position = {stage: i for i, stage in enumerate(dvc_repo.index.stages)}
            ordered = list(nx.lexicographical_topological_sort(
                graph.reverse(copy=True), key=lambda stage: position.get(stage, len(position))))
            stages, upstream = {}, {}
            for stage in ordered:
                if not stage.cmd:
                    continue
                name = _address(stage, root)
                stages[name] = Stage(name, tuple(
                    Path(out.fs_path).relative_to(root).as_posix()
                    for out in stage.outs if out.metric), _reads_device(stage))
                upstream[name] = tuple(_address(dep, root) for dep in graph.successors(stage)
                                       if dep.cmd)
    except (DvcException, nx.NetworkXUnfeasible) as err:
        raise DagError(f"DVC cannot build the stage graph of {root}: {err}") from err
    return StageGraph(stages, {name: tuple(sorted(upstream[name], key=list(stages).index))
                               for name in stages})


def _reads_device(stage) -> bool:
    """True when one of the stage's params dependencies is the top-level `device` key."""
    from dvc.dependency.param import ParamsDependency

    return any(DEVICE_PARAM in (dep.params or []) for dep in stage.deps
               if isinstance(dep, ParamsDependency))


def _address(stage, root: Path) -> str:
    """What `dvc repro` run at `root` accepts: `name` for the root dvc.yaml, else `path:name`
    (DVC's own `stage.addressing` is relative to the process's working directory)."""
    dvcfile = Path(stage.path).resolve()
    if dvcfile == root / "dvc.yaml":
        return stage.name
    return f"{dvcfile.relative_to(root).as_posix()}:{stage.name}"
