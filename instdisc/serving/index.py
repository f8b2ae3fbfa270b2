"""An embedding index on disk, built resumably from a folder, an archive or a list of image files.

    <index>/embeddings.npy   float32 (N, D), unit rows; row i belongs to line i of ids.txt
    <index>/ids.txt          one id per line: the path below the folder, the archive member, or
                             the path as written in the list
    <index>/index.json       written last (its presence means "finished"): source, model sha256 and
                             ModelInfo, num_items, failed [{"id", "reason"}], number of ignored
                             non-image files
    <index>/.shards/         while building: part-NNNNN.npy + part-NNNNN.json (ids, failures), each
                             written atomically; a rerun skips every id already in a shard

Needs numpy, Pillow and onnxruntime only (no torch).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from instdisc.data.archive import Archive
from instdisc.io import atomic_path, atomic_write, file_sha256, write_json
from instdisc.serving.embedder import Embedder

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
LIST_SUFFIXES = {".txt", ".lst", ".list"}
SHARDS = ".shards"
OUTPUTS = ("embeddings.npy", "ids.txt", "index.json")


@dataclass
class Source:
    """Where images come from: kind folder | zip | tar | list, its location and the ids in it."""

    kind: str
    location: Path  # folder, archive, or the folder list entries are relative to
    ids: list[str] = field(default_factory=list)
    ignored: int = 0  # files skipped because their suffix is not an image's

    def describe(self) -> dict[str, str]:
        return {"kind": self.kind, "location": str(self.location)}

    def path_of(self, item_id: str) -> Path:
        return self.location / item_id  # an absolute id stays absolute

    def read(self, ids: Sequence[str]) -> Iterator[tuple[str, Path | bytes]]:
        """(id, file path or bytes) for `ids`; tar archives are streamed once, in archive order."""
        if self.kind in ("folder", "list"):
            yield from ((i, self.path_of(i)) for i in ids)
            return
        with Archive(self.location) as archive:
            yield from archive.stream(ids)

    def open_item(self, item_id: str) -> Path | bytes:
        """One item by id (random access; slow for large .tar.gz, fine for a result grid)."""
        if self.kind in ("folder", "list"):
            return self.path_of(item_id)
        with Archive(self.location) as archive:
            return archive.read(item_id)


def _is_image(name: str) -> bool:
    parts = PurePosixPath(name).parts
    hidden = any(p.startswith(".") or p == "__MACOSX" for p in parts)
    return not hidden and PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def open_source(paths: Sequence[Path]) -> Source:
    """A folder (recursive), a .zip/.tar/.tar.gz/.tgz, a .txt list (one path per line, relative
    to the list's folder), or image files given one by one; ValueError naming a bad path."""
    paths = [Path(p) for p in paths]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise ValueError(f"input {missing[0]!r} does not exist")
    first = paths[0]
    if len(paths) > 1 or (first.is_file() and first.suffix.lower() in IMAGE_SUFFIXES):
        if any(p.is_dir() for p in paths):
            raise ValueError("give one folder, one archive, one list file, or image files")
        return Source("list", Path.cwd(), [str(p) for p in paths])
    if first.is_dir():
        files = sorted(p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file())
        ids = [f for f in files if _is_image(f)]
        return Source("folder", first.absolute(), ids, ignored=len(files) - len(ids))
    if first.suffix.lower() in LIST_SUFFIXES:
        ids = [line.strip() for line in first.read_text().splitlines()]
        return Source("list", first.absolute().parent, [i for i in ids if i])
    try:
        with Archive(first) as archive:
            names, kind = archive.names(), archive.kind
    except ValueError:
        raise ValueError(f"input {str(first)!r} is neither a folder, a .zip/.tar(.gz) archive, "
                         f"a list file ({', '.join(sorted(LIST_SUFFIXES))}) nor an image "
                         "file") from None
    ids = [n for n in names if _is_image(n)]
    return Source(kind, first.absolute(), ids, ignored=len(names) - len(ids))


def _write_json(path: Path, data: Any) -> None:
    write_json(data, path, indent=1)


def _save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda handle: np.save(handle, array))


class _Shards:
    """The resumable part of a build: numbered shards, each an .npy and a .json written last."""

    def __init__(self, root: Path, state: dict[str, Any]) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        state_file = root / "state.json"
        if state_file.is_file():
            old = json.loads(state_file.read_text())
            if old != state:
                raise ValueError(f"{str(root)!r} holds an unfinished build with another model or "
                                 f"source ({old}); delete it or pass --overwrite")
        else:
            _write_json(state_file, state)
        self.parts = sorted(root.glob("part-*.json"))

    def load(self) -> Iterator[tuple[list[str], list[dict[str, str]], Path]]:
        for part in self.parts:
            meta = json.loads(part.read_text())
            yield meta["ids"], meta["failed"], part.with_suffix(".npy")

    def write(self, ids: list[str], embeddings: np.ndarray, failed: list[dict[str, str]]) -> None:
        part = self.root / f"part-{len(self.parts):05d}.json"
        _save_npy(part.with_suffix(".npy"), embeddings)
        _write_json(part, {"ids": ids, "failed": failed})  # last: marks the shard complete
        self.parts.append(part)


def _decode(embedder: Embedder, item: tuple[str, Path | bytes]):
    item_id, payload = item
    if "\n" in item_id or "\r" in item_id:
        return item_id, None, "file name contains a line break"
    try:
        return item_id, embedder.prepare(payload), None
    except ValueError as err:
        return item_id, None, str(err)


def build_index(embedder: Embedder, inputs: Path | Sequence[Path], out_dir: Path, *,
                shard_size: int = 4096, overwrite: bool = False, workers: int | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Embed every image of `inputs` into `out_dir` (see module docstring); returns index.json.

    Unreadable files are skipped and listed under "failed". An interrupted build resumes from its
    shards when rerun with the same model and source. Decoding runs on `workers` threads.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    if shard_size < 1:
        raise ValueError(f"shard_size = {shard_size}: must be >= 1")
    if (out_dir / "index.json").is_file() and not overwrite:
        raise ValueError(f"{str(out_dir)!r} already holds a finished index; pass --overwrite "
                         "to rebuild it")
    if overwrite:  # only what a build writes: -o may name a folder holding other files
        for name in OUTPUTS:
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / SHARDS, ignore_errors=True)
    source = open_source([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)
    if not source.ids:
        raise ValueError(f"no image files in {source.location} ({source.ignored} other files)")
    model = model_record(embedder)
    shards = _Shards(out_dir / SHARDS, {"source": source.describe(), "sha256": model["sha256"]})
    done = {i for ids, failed, _ in shards.load() for i in ids + [f["id"] for f in failed]}
    todo = [i for i in source.ids if i not in done]
    log.info("embedding %d images from %s %s (%d already done) on %s", len(todo), source.kind,
             source.location, len(source.ids) - len(todo), embedder.provider)
    with tqdm(total=len(source.ids), initial=len(source.ids) - len(todo), unit="img",
              disable=not progress) as bar:
        _embed_into_shards(embedder, source.read(todo), shards, shard_size, bar,
                           workers or min(8, os.cpu_count() or 1))
    return _finish(out_dir, shards, source, model, embedder.feature_dim)


def model_record(embedder: Embedder) -> dict[str, Any]:
    """index.json's "model": the file, its sha256 (what `Index.check_model` compares), its info."""
    return {"path": str(embedder.model_path), "sha256": file_sha256(embedder.model_path),
            "info": embedder.info.as_dict()}


def write_index(out_dir: Path, ids: Sequence[str], embeddings: np.ndarray,
                source: dict[str, Any], embedder: Embedder) -> dict[str, Any]:
    """An index folder from embeddings in memory (float32 (N, D) unit rows, row i = ids[i]), in
    the layout `build_index` writes; index.json last. Returns index.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if len(ids) != len(embeddings):
        raise ValueError(f"{len(ids)} ids for {len(embeddings)} embeddings")
    (out_dir / "index.json").unlink(missing_ok=True)  # unfinished until it is written again
    _save_npy(out_dir / "embeddings.npy", np.ascontiguousarray(embeddings, dtype=np.float32))
    ids_text = "".join(f"{i}\n" for i in ids).encode()
    atomic_write(out_dir / "ids.txt", lambda handle: handle.write(ids_text))
    report = {"format_version": FORMAT_VERSION, "source": source, "model": model_record(embedder),
              "num_items": len(ids), "feature_dim": int(embeddings.shape[1]), "failed": [],
              "ignored": 0}
    _write_json(out_dir / "index.json", report)
    return report


def _embed_into_shards(embedder: Embedder, items: Iterator[tuple[str, Path | bytes]],
                       shards: _Shards, shard_size: int, bar, workers: int) -> None:
    """Decode batches on `workers` threads, embed them, write a shard every `shard_size` ids."""
    ids, rows, failed = [], [], []
    with ThreadPoolExecutor(workers) as pool:
        while chunk := [item for _, item in zip(range(embedder.batch_size), items)]:
            decoded = list(pool.map(lambda item: _decode(embedder, item), chunk))
            good = [(i, pixels) for i, pixels, _ in decoded if pixels is not None]
            failed += [{"id": i, "reason": why} for i, _, why in decoded if why is not None]
            if good:
                rows.append(embedder.run(np.stack([p for _, p in good])))      # (b, D)
                ids += [i for i, _ in good]
            bar.update(len(chunk))
            if len(ids) + len(failed) >= shard_size:
                shards.write(ids, _concat(rows, embedder.feature_dim), failed)
                ids, rows, failed = [], [], []
    if ids or failed:
        shards.write(ids, _concat(rows, embedder.feature_dim), failed)


def _concat(rows: list[np.ndarray], dim: int) -> np.ndarray:
    return np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)   # (n, D)


def _finish(out_dir: Path, shards: _Shards, source: Source, model: dict[str, Any],
            dim: int) -> dict[str, Any]:
    """Merge the shards (one at a time, into a memory-mapped .npy), write ids and index.json."""
    wanted = set(source.ids)
    parts = list(shards.load())
    count = sum(sum(i in wanted for i in ids) for ids, _, _ in parts)
    all_ids, failed = [], []

    with atomic_path(out_dir / "embeddings.npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(count, dim))
        row = 0
        for ids, bad, npy in parts:
            keep = np.array([i in wanted for i in ids], dtype=bool)              # (n,)
            block = np.load(npy)[keep]                                           # (n', D)
            out[row:row + len(block)] = block
            row += len(block)
            all_ids.extend(i for i, k in zip(ids, keep) if k)
            failed.extend(f for f in bad if f["id"] in wanted)
        out.flush()
        del out
    ids_text = "".join(f"{i}\n" for i in all_ids).encode()
    atomic_write(out_dir / "ids.txt", lambda handle: handle.write(ids_text))
    report = {"format_version": FORMAT_VERSION, "source": source.describe(), "model": model,
              "num_items": count, "feature_dim": dim, "failed": failed, "ignored": source.ignored}
    _write_json(out_dir / "index.json", report)
    shutil.rmtree(shards.root)
    if failed:
        log.warning("%d unreadable files skipped, e.g. %s: %s", len(failed), failed[0]["id"],
                    failed[0]["reason"])
    return report
