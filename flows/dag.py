"""The stage graph of a DVC project, read from its `dvc.yaml` (pure: no DVC, no Prefect).

DVC stays the single source of truth: a stage depends on another when one of its `deps`
equals, lies under, or contains one of the other's `outs`/`metrics`/`plots` paths, the same
overlap rule `dvc dag` uses. `foreach`/`matrix` stages expand to DVC's `name@key` stages (see
`flows.templating`). Only the root `dvc.yaml` is read; stages in nested `dvc.yaml` files are
not part of the graph.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flows.templating import TemplateError, expand, interpolate, load_context, merge_vars

__all__ = ["DagError", "Stage", "StageGraph", "TemplateError", "load_graph", "build_graph",
           "parse_stages"]


class DagError(ValueError):
    """dvc.yaml does not describe an acyclic stage graph."""


@dataclass(frozen=True)
class Stage:
    """One DVC stage: repo-relative POSIX paths of what it reads and writes."""

    name: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]       # outs + metrics + plots: everything the stage writes
    metrics: tuple[str, ...]    # the metrics files among `outs`


@dataclass(frozen=True)
class StageGraph:
    """Stages in a topological order (dvc.yaml order among ready stages) and their parents."""

    stages: dict[str, Stage]
    upstream: dict[str, tuple[str, ...]]

    @property
    def order(self) -> list[str]:
        return list(self.stages)

    def edges(self) -> set[tuple[str, str]]:
        """{(upstream, downstream)}, the edges `dvc dag --dot` prints."""
        return {(parent, name) for name, parents in self.upstream.items() for parent in parents}

    def downstream_of(self, name: str) -> list[str]:
        """Every stage that (transitively) needs `name`, in topological order."""
        reached = {name}
        for stage in self.order:
            if reached.intersection(self.upstream[stage]):
                reached.add(stage)
        return [stage for stage in self.order if stage in reached and stage != name]


def load_graph(dvc_yaml: Path) -> StageGraph:
    """Parse `dvc_yaml` (params.yaml next to it feeds `${...}`) into a StageGraph."""
    if not dvc_yaml.is_file():
        raise FileNotFoundError(f"no dvc.yaml at {dvc_yaml}")
    document = yaml.safe_load(dvc_yaml.read_text()) or {}
    repo = dvc_yaml.parent
    return build_graph(parse_stages(document, load_context(repo, document), repo))


def parse_stages(document: Mapping[str, Any], context: Mapping[str, Any],
                 repo: Path = Path(".")) -> list[Stage]:
    """The stages of a parsed dvc.yaml, templated stages expanded, in file order."""
    definitions = document.get("stages") or {}
    if not isinstance(definitions, Mapping):
        raise DagError(f"dvc.yaml `stages` must be a mapping, got {type(definitions).__name__}")
    stages = []
    for name, definition in definitions.items():
        if not isinstance(definition, Mapping):
            raise DagError(f"dvc.yaml stage {name!r} must be a mapping")
        for stage_name, body, stage_context in expand(name, definition, context):
            stages.append(_stage(stage_name, body, stage_context, repo))
    return stages


def build_graph(stages: Iterable[Stage]) -> StageGraph:
    """Connect stages by path overlap and order them; a cycle raises DagError."""
    by_name = {stage.name: stage for stage in stages}
    upstream = {
        name: tuple(other for other in by_name if other != name and _feeds(by_name[other], stage))
        for name, stage in by_name.items()
    }
    ordered: dict[str, Stage] = {}
    while len(ordered) < len(by_name):
        ready = [n for n in by_name if n not in ordered and set(upstream[n]) <= set(ordered)]
        if not ready:
            stuck = sorted(set(by_name) - set(ordered))
            raise DagError(f"dvc.yaml stages form a cycle among {stuck}")
        for name in ready:
            ordered[name] = by_name[name]
    return StageGraph(stages=ordered, upstream=upstream)


def _feeds(producer: Stage, consumer: Stage) -> bool:
    return any(_overlap(dep, out) for dep in consumer.deps for out in producer.outs)


def _overlap(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def _stage(name: str, body: Mapping[str, Any], context: dict[str, Any], repo: Path) -> Stage:
    where = f"dvc.yaml stage {name!r}"
    wdir = str(interpolate(body.get("wdir", "."), context, where))
    context = merge_vars(context, body.get("vars"), repo / wdir, where)
    fields = {key: interpolate(body.get(key) or [], context, where)
              for key in ("deps", "outs", "metrics", "plots")}
    paths = {key: [_normalise(wdir, p) for p in _paths(value, f"{where} `{key}`")]
             for key, value in fields.items()}
    return Stage(name=name, deps=tuple(paths["deps"]),
                 outs=tuple(paths["outs"] + paths["metrics"] + paths["plots"]),
                 metrics=tuple(paths["metrics"]))


def _paths(entries: Any, where: str) -> list[str]:
    """A dvc.yaml path list: strings or one-key mappings `{path: {options}}`."""
    if not isinstance(entries, list):
        raise DagError(f"{where} must be a list, got {entries!r}")
    paths = []
    for entry in entries:
        if isinstance(entry, Mapping) and len(entry) == 1:
            entry = next(iter(entry))
        if not isinstance(entry, str):
            raise DagError(f"{where}: cannot read path entry {entry!r}")
        paths.append(entry)
    return paths


def _normalise(wdir: str, path: str) -> str:
    if "://" in path:
        return path  # remote deps (s3://, https://) never overlap a stage's outs
    joined = posixpath.normpath(posixpath.join(wdir.replace("\\", "/"), path.replace("\\", "/")))
    if joined == ".." or joined.startswith("../"):
        return joined
    return joined.rstrip("/")
