"""The prepared dataset on disk (docs/DESIGN.md): written once, atomically; opened by every stage.

    meta.json                 format_version, source, classes ([] if unlabelled), fingerprint,
                              per-split storage
    report.json               what `prepare` did: counts, skipped files, conversions
    <split>_labels.npy        int64 (N,): class index, or UNLABELED (-1) for every image of an
                              unlabelled source
    <split>_images.npy        uint8 (N, H, W, 3)                         (storage "array")
    <split>_manifest.jsonl    {"path": ..., "label": int} per line, in index order  ("manifest")
    files/                    images extracted from archives (manifest paths relative to root)

Row i of split "train" is memory-bank row i for as long as the fingerprint stays the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from instdisc.data.decode import DECODE_ERRORS, decode_rgb

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
UNLABELED = -1  # the label of every image of an unlabelled source (meta "classes" is then [])
META = "meta.json"
REPORT = "report.json"


@dataclass(frozen=True)
class SplitArrays:
    """One split to write: labels int64 (N,) plus either images uint8 (N, H, W, 3) or file paths.

    `paths` are relative to the prepared root (files under `files/`) or absolute (originals).
    """

    labels: np.ndarray
    images: np.ndarray | None = None
    paths: Sequence[str] | None = None

    def __post_init__(self) -> None:
        assert (self.images is None) != (self.paths is None), "give images or paths, not both"
        n = len(self.images if self.images is not None else self.paths)
        assert self.labels.shape == (n,) and self.labels.dtype == np.int64, self.labels.shape
        assert self.images is None or (self.images.dtype == np.uint8
                                       and self.images.ndim == 4 and self.images.shape[3] == 3)


@contextlib.contextmanager
def atomic_output_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `out_dir`; on success it replaces `out_dir`.

    On any error the temporary folder is removed and an existing `out_dir` is left untouched, so
    readers never see a half-written dataset. The swap is two renames (old out of the way, new
    in place); the old copy is deleted only after the new one is in place.
    """
    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset is not
    try:
        yield tmp
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.rename(out_dir, old / "data")
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if old is not None:
                os.rename(old / "data", out_dir)
            raise
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_prepared(root: Path, *, source: str, classes: Sequence[str],
                   splits: Mapping[str, SplitArrays],
                   report: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write arrays/manifests, report.json and meta.json into `root`; returns (meta, report).

    `root` is normally the folder yielded by `atomic_output_dir`. The report written is `report`
    plus the classes, the per-split summary of meta.json and the fingerprint.
    """
    root = Path(root)
    meta_splits = {}
    for name, split in splits.items():
        np.save(root / f"{name}_labels.npy", split.labels)
        if split.images is not None:
            np.save(root / f"{name}_images.npy", np.ascontiguousarray(split.images))
            size = list(split.images.shape[1:3])
        else:
            with open(root / f"{name}_manifest.jsonl", "w") as f:
                for path, label in zip(split.paths, split.labels.tolist()):
                    f.write(json.dumps({"path": path, "label": label}) + "\n")
            size = None
        meta_splits[name] = {"num_items": len(split.labels),
                             "storage": "array" if split.images is not None else "manifest",
                             "image_size": size}
    meta = {"format_version": FORMAT_VERSION, "source": source, "classes": list(classes),
            "fingerprint": fingerprint(root, classes, splits), "splits": meta_splits,
            "normalization": channel_stats(root, splits["train"]) if "train" in splits else None}
    report = {**report, "classes": meta["classes"], "splits": meta_splits,
              "fingerprint": meta["fingerprint"]}
    (root / REPORT).write_text(json.dumps(report, indent=1) + "\n")
    (root / META).write_text(json.dumps(meta, indent=1) + "\n")
    return meta, report


STATS_MAX_FILES = 2000  # manifest splits: channel statistics from this many evenly spaced files


def channel_stats(root: Path, split: SplitArrays) -> dict[str, Any]:
    """Per-channel mean and std of a split's pixels in [0, 1] (the training set's own statistics,
    used to normalise inputs, as lemniscate does with CIFAR-10's): {"mean", "std", "images"}.

    Array splits use every pixel; manifest splits decode up to STATS_MAX_FILES evenly spaced files.
    """
    total = np.zeros(3)
    squares = np.zeros(3)
    pixels = 0

    def add(chunk: np.ndarray) -> None:  # uint8 (..., 3)
        nonlocal pixels
        values = chunk.reshape(-1, 3).astype(np.float64) / 255.0
        total[:] += values.sum(axis=0)
        squares[:] += np.square(values).sum(axis=0)
        pixels += len(values)

    if split.images is not None:
        count = len(split.images)
        for start in range(0, count, 1024):
            add(np.asarray(split.images[start:start + 1024]))
    else:
        picks = np.unique(np.linspace(0, len(split.paths) - 1, STATS_MAX_FILES).round()
                          .astype(int)) if split.paths else []
        count = 0
        for i in picks:
            try:  # prepare decoded every manifest file already; a file that changed is no input
                add(np.asarray(decode_rgb(Path(root) / split.paths[i])[0]))
                count += 1
            except DECODE_ERRORS:
                continue
    if pixels == 0:
        return {"mean": None, "std": None, "images": 0}
    mean = total / pixels
    std = np.sqrt(np.maximum(squares / pixels - np.square(mean), 1e-12))
    return {"mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std],
            "images": int(count)}


def fingerprint(root: Path, classes: Sequence[str], splits: Mapping[str, SplitArrays]) -> str:
    """sha256 over the classes and, per split, labels and image bytes (or file bytes, in order).

    Paths and the source's location are not hashed: a folder and an archive of the same tree give
    the same fingerprint.
    """
    digest = hashlib.sha256(json.dumps({"classes": list(classes)}).encode())
    for name in sorted(splits):
        split = splits[name]
        shape = None if split.images is None else list(split.images.shape)
        digest.update(json.dumps({"split": name, "shape": shape}).encode())
        digest.update(split.labels.tobytes())
        if split.images is not None:
            digest.update(np.ascontiguousarray(split.images).data)
            continue
        for path in split.paths:
            data = (Path(root) / path).read_bytes()
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
    return digest.hexdigest()


@dataclass(eq=False)
class SplitData:
    """One split of a prepared dataset. `images` (array storage) is memory-mapped, not loaded."""

    name: str
    labels: Tensor  # int64 (N,)
    storage: str  # "array" | "manifest"
    images: Tensor | None  # uint8 (N, H, W, 3), array storage only
    paths: list[Path] | None  # absolute, manifest storage only
    image_size: tuple[int, int] | None  # (H, W) for array storage
    _on_device: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_items(self) -> int:
        return len(self.labels)

    def subset(self, indices: Tensor) -> SplitData:
        """Items `indices` (int64 (K,)) as a split of their own: item j is item indices[j] here."""
        indices = indices.to(torch.long)
        return SplitData(
            name=f"{self.name}-subset", labels=self.labels[indices], storage=self.storage,
            images=None if self.images is None else self.images[indices],
            paths=None if self.paths is None else [self.paths[i] for i in indices.tolist()],
            image_size=self.image_size)

    def images_on(self, device: torch.device | str) -> Tensor:
        """The images as uint8 (N, 3, H, W) on `device`, copied once and cached on this object."""
        if self.images is None:
            raise ValueError(f"split {self.name!r} is stored as files ({self.storage}); "
                             "it has no image array")
        key = str(torch.device(device))
        if key not in self._on_device:
            self._on_device.clear()  # keep one copy at most
            images = self.images.to(device).permute(0, 3, 1, 2)  # (N, 3, H, W)
            self._on_device[key] = images.contiguous()
        return self._on_device[key]


class PreparedDataset:
    """A prepared dataset folder, opened read-only: `PreparedDataset.open(root)`."""

    def __init__(self, root: Path, meta: dict[str, Any]) -> None:
        self.root = root
        self.meta = meta
        self.classes: list[str] = list(meta["classes"])
        self.fingerprint: str = meta["fingerprint"]

    @classmethod
    def open(cls, root: Path) -> PreparedDataset:
        """Read meta.json and check the format version and that every split's files exist."""
        root = Path(root).absolute()
        meta_path = root / META
        if not meta_path.is_file():
            raise FileNotFoundError(f"{str(meta_path)!r} not found: is {str(root)!r} a prepared "
                                    "dataset (run `instdisc prepare`)?")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{str(meta_path)!r} is not valid JSON: {err}") from err
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{str(meta_path)!r}: format_version = {version!r}, this code reads "
                             f"{FORMAT_VERSION}; re-run `instdisc prepare`")
        for key in ("classes", "fingerprint", "splits", "source"):
            if key not in meta:
                raise ValueError(f"{str(meta_path)!r} has no key {key!r}")
        for name, info in meta["splits"].items():
            suffix = "images.npy" if info["storage"] == "array" else "manifest.jsonl"
            for file in (root / f"{name}_labels.npy", root / f"{name}_{suffix}"):
                if not file.is_file():
                    raise FileNotFoundError(f"{str(file)!r} is missing from the prepared dataset")
        return cls(root, meta)

    @property
    def labeled(self) -> bool:
        """Whether images carry class labels (False: every label is UNLABELED, no classes)."""
        return bool(self.classes)

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """(mean, std) per channel of the training images, or None (older prepared folders)."""
        stats = self.meta.get("normalization") or {}
        if stats.get("mean") is None:
            return None
        return tuple(stats["mean"]), tuple(stats["std"])

    @property
    def report(self) -> dict[str, Any]:
        """The report.json written by `prepare` ({} if absent)."""
        path = self.root / REPORT
        return json.loads(path.read_text()) if path.is_file() else {}

    def split(self, name: str) -> SplitData:
        """Labels plus memory-mapped images (array storage) or absolute file paths (manifest)."""
        if name not in self.meta["splits"]:
            raise ValueError(f"split {name!r} not in {str(self.root)!r}; it has "
                             f"{sorted(self.meta['splits'])}")
        info = self.meta["splits"][name]
        labels = torch.from_numpy(np.load(self.root / f"{name}_labels.npy"))  # (N,)
        if len(labels) != info["num_items"]:
            raise ValueError(f"{name}_labels.npy has {len(labels)} rows, meta.json says "
                             f"{info['num_items']}")
        images, paths, size = None, None, None
        if info["storage"] == "array":
            file = self.root / f"{name}_images.npy"
            # mmap_mode="c": copy-on-write, so torch gets a writable view and nothing is read yet.
            images = torch.from_numpy(np.load(file, mmap_mode="c"))  # (N, H, W, 3) uint8
            if images.shape[0] != len(labels) or images.dtype != torch.uint8:
                raise ValueError(f"{str(file)!r}: shape {tuple(images.shape)} {images.dtype} does "
                                 f"not match {len(labels)} labels")
            size = (int(images.shape[1]), int(images.shape[2]))
        else:
            lines = (self.root / f"{name}_manifest.jsonl").read_text().splitlines()
            paths = [self.root / json.loads(line)["path"] for line in lines]
            if len(paths) != len(labels):
                raise ValueError(f"{name}_manifest.jsonl has {len(paths)} lines, "
                                 f"{name}_labels.npy {len(labels)}")
        return SplitData(name, labels, info["storage"], images, paths, size)
