"""Every project file a DVC stage runs is one of its deps, so editing it makes the stage stale.

For each dvc.yaml stage, start at its module `instdisc/stages/<stage>.py` (the stage's `cmd`),
follow its imports inside the `instdisc` package with `ast` (transitively, imports inside
functions included, and the `__init__.py` of every package on the way, which Python runs too),
and require that each file reached is a dep of the stage or lies under a dep folder.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from dvc.repo import Repo

from instdisc.stages import STAGES

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "instdisc"


def module_file(name: str, root: Path = REPO_ROOT) -> Path | None:
    """The project file of module `name` (a package's __init__.py), None outside the package."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, module: str) -> set[str]:
    """Modules that `path` (module `module`) imports anywhere in its body, absolute names."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # submodules
    return found


def with_parents(name: str) -> list[str]:
    """`a.b.c` -> [a, a.b, a.b.c]: importing a module runs every parent package's __init__."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def project_files(start: str, root: Path = REPO_ROOT) -> set[Path]:
    """Files of the package that importing module `start` runs (transitively)."""
    seen: set[str] = set()
    files: set[Path] = set()
    todo = with_parents(start)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name, root)
        if path is None:
            continue
        files.add(path)
        for imported in imported_modules(path, name):
            todo.extend(with_parents(imported))
    return files


def stage_deps(root: Path = REPO_ROOT) -> dict[str, list[Path]]:
    """{stage: [absolute dep paths]} as DVC itself reads dvc.yaml."""
    with Repo(str(root)) as repo:
        return {stage.name: [Path(dep.fs_path) for dep in stage.deps]
                for stage in repo.index.stages if stage.cmd}


def uncovered(files: set[Path], deps: list[Path]) -> list[str]:
    """Repo-relative paths among `files` that no dep names or contains."""
    return sorted(str(f.relative_to(REPO_ROOT)) for f in files
                  if not any(f == d or d in f.parents for d in deps))


@pytest.fixture(scope="module")
def deps() -> dict[str, list[Path]]:
    return stage_deps()


def test_every_dvc_stage_has_its_module(deps):
    assert list(deps) == list(STAGES)
    for stage in STAGES:
        assert (REPO_ROOT / "instdisc" / "stages" / f"{stage}.py").is_file()


@pytest.mark.parametrize("stage", STAGES)
def test_stage_deps_cover_every_project_file_it_imports(stage, deps):
    files = project_files(f"{PACKAGE}.stages.{stage}")
    assert REPO_ROOT / "instdisc" / "stages" / f"{stage}.py" in files
    missing = uncovered(files, deps[stage])
    assert not missing, f"dvc.yaml stage {stage!r} imports {missing} but does not list them in deps"


def test_the_import_walk_follows_lazy_and_relative_imports(tmp_path):
    """The walk itself, on a throw-away package: it must find what a stage would run."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import helper\n")
    (pkg / "sub" / "helper.py").write_text("import os\n")
    (pkg / "lazy.py").write_text("")
    (pkg / "unused.py").write_text("")
    (pkg / "entry.py").write_text("def run():\n    from instdisc import lazy\n"
                                  "    import instdisc.sub\n")
    found = {p.relative_to(tmp_path).as_posix() for p in project_files(f"{PACKAGE}.entry",
                                                                        tmp_path)}
    assert found == {"instdisc/__init__.py", "instdisc/entry.py", "instdisc/lazy.py",
                     "instdisc/sub/__init__.py", "instdisc/sub/helper.py"}
