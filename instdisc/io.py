"""The one way to write files that readers never see half of, and the one dict flattener.

`atomic_write`/`atomic_path`: a temporary file in the destination folder, fsync, rename over the
destination; on any error the temporary file goes and the destination keeps its old content.
`write_json` writes sorted, indented JSON with NaN/inf as null (JSON has no NaN). `flatten` turns
nested dicts/dataclasses into {"a.b": value}, the names metrics have in MLflow, Prefect and DVC.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary file name next to `path`; on success it is renamed over `path`.

    For writers that need a file name rather than a handle (memory-mapped arrays, `torch.save`
    is not one of them: see `atomic_write`). The file exists (empty, mode 0600) when yielded.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(handle)` on a binary handle of a temporary file, then rename it over `path`.

    The handle has no meaningful `.name` for the writer to embed (torch.save names its zip
    archive after a path it is given, never after a handle), so the bytes do not depend on the
    temporary name.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        write(handle)
        handle.flush()


def json_safe(value: Any) -> Any:
    """NaN/inf -> None, recursively through dicts, lists and tuples."""
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(data: Mapping[str, Any], path: Path, indent: int = 2) -> None:
    """Atomic, sorted, indented JSON; NaN/inf become null."""
    text = json.dumps(json_safe(data), indent=indent, sort_keys=True, allow_nan=False) + "\n"
    atomic_write(Path(path), lambda handle: handle.write(text.encode()))


def flatten(data: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {prefix + "a.b": 1}; dataclasses are read as dicts, lists kept whole."""
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        data = dataclasses.asdict(data)
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) or (dataclasses.is_dataclass(value)
                                          and not isinstance(value, type)):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers among `metrics` as floats (booleans, strings and None left out)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
