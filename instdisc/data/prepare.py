"""Stage `prepare`: turn an image source into the prepared format of `instdisc.data.prepared`.

The source's folders become the splits train and test: `train/`, and `test/`, `val/` or
`validation/` (the first found), or the folders named in `splits`; a source without an evaluation
folder (or without split folders at all) gets a seeded, per-class `holdout_fraction` of its
training images as test. Labels are the class folders, or UNLABELED (-1) for an unlabelled source
(`labels`, see `instdisc.data.sources`). Every image file is decoded with Pillow and converted to
RGB; unreadable ones are reported and left out (or are an error with on_error = "fail"); files
with identical bytes are reported (and kept). Indices are stable: images are ordered by (class
index, file name), classes being the sorted train class folders. How the kept images are stored
(one uint8 array per split, or a manifest of files, optionally re-encoded at a bounded shorter
side) is `instdisc.data.storage`.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import UnidentifiedImageError
from tqdm import tqdm

from instdisc.config import PrepareParams, is_synthetic
from instdisc.data.archive import source_kind
from instdisc.data.decode import DECODE_ERRORS, decode_rgb
from instdisc.data.prepared import UNLABELED, atomic_output_dir, write_prepared
from instdisc.data.sources import EVAL_SPLITS, NO_SPLIT, REQUIRED_SPLITS, SPLIT_NAMES, ImageSource
from instdisc.data.storage import Item, Items, assemble, extract
from instdisc.data.synthetic import make_synthetic

log = logging.getLogger(__name__)

UNLABELED_COUNT = "(unlabeled)"  # the one key of a split's counts when the source has no labels


def prepare(params: PrepareParams, seed: int, out_dir: Path,
            progress: bool = True) -> dict[str, Any]:
    """Build the prepared dataset in `out_dir` (replaced atomically); returns the report.

    The report (also written as report.json) has: source, kind, labeled, classes, split_folders
    {split: source folder, "." for the whole source, or "held out of train"}, holdout, splits
    (as meta.json), counts per split and class, skipped [{file, reason}], duplicates [[files
    with the same bytes]], converted {mode: count}, ignored_splits, ignored_files, storage,
    image_size, resized, reencoded ({max_shorter_side, quality, count, bytes_before,
    bytes_after}, or null), fingerprint.

    `seed` draws the synthetic source and the held-out split. Raises ValueError for a missing or
    unknown source, a missing train or evaluation split (with holdout_fraction 0), a split
    folder without class folders in a labelled source, a test class absent from train, an empty
    split, or (with on_error = "fail") the first unreadable file.
    """
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir) as tmp:
        if is_synthetic(params.source):
            classes, items, report = _synthetic_items(params, seed)
        else:
            classes, items, report = _source_items(Path(params.source), params, seed, tmp,
                                                   progress)
        items["train"] = _keep_fraction(items["train"], params.train_fraction, tmp)
        splits, layout = assemble(items, params, tmp)
        report.update(layout)
        report["counts"] = {split: _counts(its, classes) for split, its in items.items()}
        meta, report = write_prepared(tmp, source=portable_source(params.source), classes=classes,
                                      splits=splits, report=report)
    log.info("prepared %s -> %s: %s, %s storage, %d skipped, fingerprint %s", params.source,
             out_dir, {s: len(v) for s, v in items.items()}, layout["storage"],
             len(report.get("skipped", [])), meta["fingerprint"][:12])
    return report


def portable_source(source: str) -> str:
    """How the prepared set names its source: a relative path (inside the repository) as given,
    an absolute one by its name only, so that nothing under data/prepared points outside it."""
    return Path(source).name if Path(source).is_absolute() else source


def _counts(items: list[Item], classes: list[str]) -> dict[str, int]:
    if not classes:
        return {UNLABELED_COUNT: len(items)}
    labels = np.array([it.label for it in items], dtype=np.int64)
    return dict(zip(classes, np.bincount(labels, minlength=len(classes)).tolist()))


def _synthetic_items(params: PrepareParams, seed: int) -> tuple[list[str], Items, dict[str, Any]]:
    """The embedded dataset as items (nothing to skip or convert)."""
    syn = params.synthetic
    arrays, classes = make_synthetic(syn.num_classes, syn.train_per_class, syn.test_per_class,
                                     syn.image_size, seed)
    items: Items = {}
    for split, (images, labels) in arrays.items():
        per_class = collections.Counter()
        items[split] = []
        for image, label in zip(images, labels.tolist()):
            name = f"{split}/{classes[label]}/{per_class[label]:05d}.png"
            per_class[label] += 1
            items[split].append(Item(label, name, image.shape[:2], pixels=image))
    report = {"source": "synthetic", "kind": "synthetic", "seed": seed, "labeled": True,
              "skipped": [], "duplicates": [], "converted": {}, "ignored_splits": [],
              "ignored_files": []}
    return classes, items, report


def _source_items(path: Path, params: PrepareParams, seed: int, tmp: Path,
                  progress: bool) -> tuple[list[str], Items, dict[str, Any]]:
    """Decode every file of a folder or archive; large images of an archive go to tmp/files/."""
    source_kind(path)  # a clear error for a missing or unknown source before anything else
    asked = [f for f in (params.splits.train, params.splits.test) if f]
    with ImageSource(path, labels=params.labels, split_names=[*SPLIT_NAMES, *asked]) as source:
        folders = _split_folders(source, params)
        classes = _check_layout(source, folders)
        split_of = {folder: split for split, folder in folders.items() if folder is not None}
        wanted = [e for e in source.entries if e.split in split_of]
        index = {name: i for i, name in enumerate(classes)}
        items: Items = {split: [] for split in REQUIRED_SPLITS}
        skipped, converted = [], collections.Counter()
        by_digest: dict[str, list[str]] = collections.defaultdict(list)
        bar = tqdm(source.records(wanted), total=len(wanted), desc=f"prepare {path.name}",
                   unit="img", disable=not progress, mininterval=1.0)
        for record in bar:
            entry, data = record.entry, record.read()
            try:
                image, mode = decode_rgb(data)
            except DECODE_ERRORS as err:
                reason = _reason(err)
                if params.on_error == "fail":
                    raise ValueError(f"unreadable image {entry.member!r} in {str(path)!r}: "
                                     f"{reason}") from err
                log.warning("skipping %s: %s", entry.member, reason)
                skipped.append({"file": entry.member, "reason": reason})
                continue
            by_digest[hashlib.sha256(data).hexdigest()].append(entry.member)
            if mode != "RGB":
                converted[mode] += 1
            size = (image.height, image.width)
            label = index[entry.class_name] if classes else UNLABELED
            item = Item(label, entry.relpath, size)
            if max(size) <= params.max_in_memory_size:
                item.pixels = np.asarray(image)  # (H, W, 3) uint8
            if isinstance(record.data, Path):
                item.path = str(record.data)
            elif item.pixels is None:
                item.path = extract(tmp, entry.relpath, data)
            else:
                item.raw = data
            items[split_of[entry.split]].append(item)
    holdout = None
    if folders["test"] is None:
        items["train"], items["test"] = _hold_out(items["train"], params.holdout_fraction, seed)
        holdout = {"fraction": params.holdout_fraction, "seed": seed}
    for split, its in items.items():
        if not its:
            raise ValueError(f"{str(path)!r}: split {split!r} has no readable image")
    shown = {s: "held out of train" if f is None else f or "." for s, f in folders.items()}
    log.info("%s: splits from %s, %s", path, shown, "labelled by class folders" if classes
             else "no labels")
    report = {"source": portable_source(str(path)), "kind": source.kind, "labeled": bool(classes),
              "split_folders": shown, "holdout": holdout, "skipped": skipped,
              "duplicates": _duplicates(by_digest), "converted": dict(sorted(converted.items())),
              "ignored_splits": [s for s in source.splits if s not in split_of],
              "ignored_files": source.ignored}
    return classes, items, report


def _split_folders(source: ImageSource, params: PrepareParams) -> dict[str, str | None]:
    """Prepared split -> source folder ("" = the whole source; test None = hold out of train)."""
    found, asked = source.splits, params.splits
    where = str(source.path)
    if not source.has_splits:
        if asked.train:
            raise ValueError(f"{where!r} has no split folders (no train/, test/, val/ or "
                             f"{asked.train!r}), but prepare.splits names {asked.train!r}")
        train, test = NO_SPLIT, None
    else:
        train = asked.train or "train"
        test = asked.test or next((s for s in EVAL_SPLITS if s != train and (
            s in found or s in source.flat_splits)), None)
        source.check_labelled_splits({"train": train, "test": test})  # flat val/: clear error
        missing = [f for f in (train, asked.test) if f and f not in found]
        if missing:
            raise ValueError(f"{where!r} has no {missing[0]} split: found {found}; expected "
                             "train/ and test/ (or val/, validation/) folders, or set "
                             "prepare.splits")
    if test is None and params.holdout_fraction == 0:
        raise ValueError(f"{where!r} has no test split: found {found}; expected a test/, val/ or "
                         "validation/ folder (or prepare.splits.test), or set "
                         "prepare.holdout_fraction > 0 to hold training images out")
    return {"train": train, "test": test}


def _check_layout(source: ImageSource, folders: dict[str, str | None]) -> list[str]:
    """The classes (sorted train class folders; [] unlabelled); ValueError for stray ones."""
    if not source.labeled:
        return []
    classes = source.classes(folders["train"])
    if folders["test"] is None:
        return classes
    test = source.classes(folders["test"])
    extra = sorted(set(test) - set(classes))
    if extra:
        raise ValueError(f"{str(source.path)!r}: test classes {extra} have no train folder "
                         f"(train classes: {classes}; folders train {folders['train']!r}, "
                         f"test {folders['test']!r})")
    absent = sorted(set(classes) - set(test))
    if absent:
        log.warning("%s: train classes %s have no test images", source.path, absent)
    return classes


def _hold_out(items: list[Item], fraction: float,
              seed: int) -> tuple[list[Item], list[Item]]:
    """(train, test): ceil(fraction * n_c) items of every label drawn with `seed` (a label's last
    item is never held out), both in index order."""
    generator = np.random.default_rng(seed)
    groups: dict[int, list[int]] = collections.defaultdict(list)
    for i, it in enumerate(items):
        groups[it.label].append(i)
    held: set[int] = set()
    for label in sorted(groups):
        members = groups[label]
        count = min(len(members) - 1, math.ceil(fraction * len(members)))
        held.update(generator.permutation(members)[:count].tolist())
    log.info("holdout_fraction %.3g: %d of %d training images held out as the test split",
             fraction, len(held), len(items))
    return ([it for i, it in enumerate(items) if i not in held],
            [it for i, it in enumerate(items) if i in held])


def _duplicates(by_digest: dict[str, list[str]]) -> list[list[str]]:
    """Groups of files with identical bytes (sha256), sorted; logged, not dropped."""
    groups = sorted(sorted(files) for files in by_digest.values() if len(files) > 1)
    if groups:
        log.warning("%d groups of files with identical bytes (kept; see report.json), e.g. %s",
                    len(groups), groups[0])
    return groups


def _reason(err: Exception) -> str:
    """A stable, readable reason for a decoding failure (no object addresses)."""
    if isinstance(err, UnidentifiedImageError):
        return "not an image (Pillow cannot identify the file)"
    return f"{type(err).__name__}: {err}"


def _keep_fraction(items: list[Item], fraction: float, tmp: Path) -> list[Item]:
    """The first ceil(fraction * count) items of every class, in index order."""
    if fraction >= 1.0:
        return items
    counts = collections.Counter(it.label for it in items)
    keep = {label: math.ceil(fraction * count) for label, count in counts.items()}
    seen: collections.Counter = collections.Counter()
    kept = []
    for it in items:
        seen[it.label] += 1
        if seen[it.label] <= keep[it.label]:
            kept.append(it)
        elif it.path and it.path.startswith("files/"):
            (tmp / it.path).unlink()  # extracted, then dropped
    log.info("train_fraction %.3g: kept %d of %d training images", fraction, len(kept), len(items))
    return kept
