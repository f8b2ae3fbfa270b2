"""The part of DVC's `dvc.yaml` templating that the stage graph needs (pure functions).

DVC expands `foreach`/`do` and `matrix` stages into `name@key` stages and substitutes
`${...}` from params.yaml, top-level and stage-level `vars`, and `item`/`key`. This module does
the same for the fields that decide the graph (deps, outs, metrics, plots, wdir) and raises
`TemplateError` naming the stage and expression for anything else, instead of guessing.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

_EXPRESSION = re.compile(r"\$\{\s*([^}]*?)\s*\}")
_NAME = re.compile(r"^[A-Za-z_][\w-]*(\.[\w-]+|\[\d+\])*$")
_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")
_VARS_SUFFIXES = (".yaml", ".yml", ".json")


class TemplateError(ValueError):
    """A `${...}` or `foreach`/`matrix` in dvc.yaml that flows.dag cannot resolve."""


def load_context(repo: Path, document: Mapping[str, Any]) -> dict[str, Any]:
    """params.yaml (if present) merged with the top-level `vars` of dvc.yaml, as DVC does."""
    context: dict[str, Any] = {}
    default = repo / "params.yaml"
    if default.is_file():
        context.update(yaml.safe_load(default.read_text()) or {})
    return merge_vars(context, document.get("vars", []), repo, where="vars")


def merge_vars(context: Mapping[str, Any], entries: Any, base: Path, where: str) -> dict[str, Any]:
    """`context` plus each `vars` entry: a mapping, or a YAML/JSON file path relative to `base`."""
    merged = dict(context)
    for entry in entries or []:
        if isinstance(entry, Mapping):
            merged.update(entry)
        elif isinstance(entry, str) and ":" not in entry and entry.endswith(_VARS_SUFFIXES):
            path = base / entry
            if not path.is_file():
                raise TemplateError(f"{where}: vars file {entry!r} does not exist")
            merged.update(yaml.safe_load(path.read_text()) or {})
        else:
            raise TemplateError(f"{where}: unsupported vars entry {entry!r} "
                                "(flows.dag reads mappings and whole YAML/JSON files)")
    return merged


def lookup(context: Mapping[str, Any], expression: str, where: str) -> Any:
    """The value of `a.b[0].c` in `context`."""
    if not _NAME.match(expression):
        raise TemplateError(f"{where}: cannot resolve '${{{expression}}}' "
                            "(only plain names such as item.a or params.key are supported)")
    value: Any = context
    for name, index in _PART.findall(expression):
        try:
            value = value[int(index)] if index else value[name]
        except (KeyError, IndexError, TypeError):
            raise TemplateError(f"{where}: '${{{expression}}}' is not defined in params.yaml, "
                                "vars, item or key") from None
    return value


def to_str(value: Any) -> str:
    """DVC's string form of a template value (booleans are lower case)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def interpolate(value: Any, context: Mapping[str, Any], where: str) -> Any:
    """Substitute `${...}` recursively; a string that is exactly one `${x}` becomes x's value."""
    if isinstance(value, str):
        whole = _EXPRESSION.fullmatch(value)
        if whole:
            return lookup(context, whole.group(1), where)
        return _EXPRESSION.sub(lambda m: to_str(lookup(context, m.group(1), where)), value)
    if isinstance(value, Mapping):
        return {interpolate(k, context, where): interpolate(v, context, where)
                for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, context, where) for v in value]
    return value


def expand(name: str, definition: Mapping[str, Any], context: Mapping[str, Any]
           ) -> Iterator[tuple[str, Mapping[str, Any], dict[str, Any]]]:
    """(stage name, body, context) for a plain, `foreach` or `matrix` stage, named as DVC does."""
    where = f"dvc.yaml stage {name!r}"
    if "foreach" in definition:
        if "do" not in definition:
            raise TemplateError(f"{where}: `foreach` without `do`")
        items = interpolate(definition["foreach"], context, where)
        for key, item in _foreach_keys(items, where):
            yield f"{name}@{key}", definition["do"], {**context, "item": item, "key": key}
    elif "matrix" in definition:
        body = {k: v for k, v in definition.items() if k != "matrix"}
        for key, item in _matrix_keys(interpolate(definition["matrix"], context, where), where):
            yield f"{name}@{key}", body, {**context, "item": item, "key": key}
    else:
        yield name, definition, dict(context)


def _foreach_keys(items: Any, where: str) -> list[tuple[str, Any]]:
    if isinstance(items, Mapping):
        return [(to_str(k), v) for k, v in items.items()]
    if not isinstance(items, list):
        raise TemplateError(f"{where}: `foreach` must be a list or a mapping, got {items!r}")
    if any(isinstance(v, (Mapping, list)) for v in items):
        return [(str(i), v) for i, v in enumerate(items)]  # composite items: keyed by index
    return [(to_str(v), v) for v in items]


def _matrix_keys(matrix: Any, where: str) -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(matrix, Mapping) or not all(isinstance(v, list) for v in matrix.values()):
        raise TemplateError(f"{where}: `matrix` must map names to lists, got {matrix!r}")
    combos = []
    for combo in itertools.product(*(list(enumerate(v)) for v in matrix.values())):
        fragments = [f"{k}{i}" if isinstance(v, (Mapping, list)) else to_str(v)
                     for k, (i, v) in zip(matrix, combo)]
        combos.append(("-".join(fragments), {k: v for k, (_, v) in zip(matrix, combo)}))
    return combos
