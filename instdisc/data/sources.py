"""Read the files of an image source: a folder, a .zip or a .tar, labelled by folders or not.

Layouts (an archive or folder may wrap the tree in one extra top-level folder, `cifar10/train/...`):

- split folders (`train/`, and `test/`, `val/` or `validation/`, or any folder name the caller
  asks for): labelled `<split>/<class>/<file>` (ImageNet, Places365, CIFAR-10 as folders), or,
  with labels "none" (or "auto" and no class folder in any split), `<split>/<any nesting>/<file>`;
- no split folders: one tree, `Entry.split == ""` (NO_SPLIT); unlabelled, every file anywhere is
  an entry (labels "auto" or "none"), or with labels "folders" `<class>/<file>`.

Hidden entries (a name part starting with "." such as `.DS_Store`, and `__MACOSX/`) are skipped
silently. Files where an image may be are yielded whatever their type, so that the caller can
report a README or a corrupt JPEG as unreadable; files outside that place (`README.md` or a stray
`classes.tsv` next to the split folders, `train/labels.txt` in a labelled tree) are listed in
`ImageSource.ignored`. Files in sub-folders of a class folder belong to that class, as in
torchvision's ImageFolder. A split folder of a labelled source that holds images directly and no
class folder (ImageNet's `val/` as distributed, its labels in a separate file) is "flat": listed in
`ImageSource.flat_splits`, and an error when read as a split (`check_labelled_splits`).
"""

from __future__ import annotations

import logging
import os
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image

from instdisc.data.archive import Archive, source_kind

log = logging.getLogger(__name__)

REQUIRED_SPLITS = ("train", "test")  # the splits of a prepared dataset
EVAL_SPLITS = ("test", "val", "validation")  # folders taken as the evaluation split, in order
SPLIT_NAMES = ("train", *EVAL_SPLITS)  # folder names that make a source "split-laid-out"
LABEL_MODES = ("auto", "folders", "none")
NO_SPLIT = ""  # Entry.split of every file of a source without split folders


@dataclass(frozen=True)
class Entry:
    """One file of the source; `name` is its path below the class folder, or below the split
    folder when unlabelled (`class_name == ""`), '/'-separated; `split` is "" without splits."""

    split: str
    class_name: str
    name: str
    member: str  # path inside the archive or folder, as given there (for reports and errors)

    @property
    def relpath(self) -> str:
        """`<split>/<class>/<name>` without the empty parts and any top-level wrapper folder."""
        return "/".join(part for part in (self.split, self.class_name, self.name) if part)


@dataclass(frozen=True)
class SourceRecord:
    """An entry and its content: bytes for archives, the absolute file path for folders."""

    entry: Entry
    data: bytes | Path

    def read(self) -> bytes:
        return self.data.read_bytes() if isinstance(self.data, Path) else self.data


class ImageSource:
    """The sorted file listing of one source, and its contents on demand (a context manager).

    `entries` is sorted by (split, class, name); `records()` yields them in that order. A
    compressed tar is read fast only if its members are stored in that order too (otherwise
    every backward step re-reads the stream from the start); zips and folders do not care.

    labels: "folders" (class folders, as torchvision's ImageFolder), "none" (folders below the
    split are just nesting) or "auto" (class folders iff there are split folders and some split
    has a sub-folder). `split_names`: top-level folder names that mean "this source has split
    folders". After construction, `labeled` and `has_splits` say what was found, and
    `flat_splits` {folder: image count} the split folders of a labelled source whose images lie
    directly in them, with no class folder (they have no entries; see `check_labelled_splits`).
    """

    def __init__(self, path: Path, labels: str = "folders",
                 split_names: Iterable[str] = SPLIT_NAMES) -> None:
        if labels not in LABEL_MODES:
            raise ValueError(f"labels = {labels!r}: allowed one of {list(LABEL_MODES)}")
        self.path = Path(path).resolve()
        self.kind = source_kind(self.path)
        self._archive: Archive | None = None
        try:
            members = self._open_listing()
            (self.entries, self.ignored, self.labeled, self.has_splits,
             self.flat_splits) = _layout(members, self.path, labels, set(split_names))
        except (zipfile.BadZipFile, tarfile.TarError, EOFError) as err:
            self.close()
            raise ValueError(f"cannot read archive {str(self.path)!r}: {err}") from err
        except ValueError:
            self.close()
            raise

    def _open_listing(self) -> list[str]:
        """Open the archive (if any) and list its files."""
        if self.kind == "folder":
            return _walk(self.path)
        self._archive = Archive(self.path)
        links = self._archive.skipped_links
        if links:
            log.warning("%s: %d links or special members skipped, e.g. %s", self.path,
                        len(links), links[0])
        return self._archive.names()

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._archive is not None:
            self._archive.close()
            self._archive = None

    @property
    def splits(self) -> list[str]:
        """Split folder names found, sorted ([""] without split folders)."""
        return sorted({e.split for e in self.entries})

    def check_labelled_splits(self, folders: dict[str, str | None]) -> None:
        """ValueError if a folder of `folders` {prepared split: source folder} is flat (images
        directly in it, no class folder) in this labelled source; the message says the ways out.

        Nothing is guessed: reading it unlabelled would leave the test split without the labels
        kNN scores, and silently dropping it would evaluate on something else than asked for.
        """
        flat = [(split, f) for split, f in folders.items() if f in self.flat_splits]
        if not flat:
            return
        split, folder = flat[0]
        labelled = ", ".join(f"{s}/" for s in self.splits if s) or "the rest"
        holdout = (f"; or, to hold prepare.holdout_fraction of train out as the test split, move "
                   f"{folder}/ out of the source") if split == "test" else ""
        raise ValueError(
            f"{str(self.path)!r}: the {split} folder {folder}/ has {self.flat_splits[folder]} "
            f"images directly in it and no class folders, but {labelled} has class folders. "
            f"Sort them into {folder}/<class>/ (ImageNet's val/ ships flat, its labels in a "
            "separate file), point prepare.splits at folders with class folders, or set "
            "prepare.labels: none to use every image without labels (kNN skipped, label-free "
            f"metrics only){holdout}")

    def classes(self, split: str) -> list[str]:
        """Class folder names of one split, sorted."""
        return sorted({e.class_name for e in self.entries if e.split == split})

    def records(self, entries: list[Entry] | None = None) -> Iterator[SourceRecord]:
        """Yield (entry, content) for `entries` (default: all), in the order given.

        A member the archive cannot deliver (bad CRC, truncated stream) is a ValueError naming
        it: the archive itself is damaged, which is not the same as one unreadable image.
        """
        for entry in self.entries if entries is None else entries:
            if self.kind == "folder":
                yield SourceRecord(entry, self.path / entry.member)
                continue
            try:
                data = self._read_member(entry.member)
            except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error) as err:
                raise ValueError(f"cannot read {entry.member!r} from {str(self.path)!r}: "
                                 f"{err}") from err
            yield SourceRecord(entry, data)

    def _read_member(self, member: str) -> bytes:
        assert self._archive is not None, "source is closed"
        return self._archive.read(member)


def iter_source(path: Path) -> Iterator[SourceRecord]:
    """Every file under a class folder of the source at `path`, sorted by (split, class, name)."""
    with ImageSource(path) as source:
        yield from source.records()


def _walk(root: Path) -> list[str]:
    """Relative '/'-separated paths of the files under `root`, hidden folders not entered."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not _hidden(d)]
        rel = Path(folder).relative_to(root)
        found.extend((rel / f).as_posix() for f in files)
    return found


def _hidden(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"


def _check_member(member: str, archive: Path) -> PurePosixPath:
    """The member's path; ValueError for absolute paths, '..' parts, drive letters or links."""
    path = PurePosixPath(member.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise ValueError(f"unsafe member {member!r} in {str(archive)!r}: absolute path or '..'")
    return path


def _layout(members: list[str], root: Path, labels: str, split_names: set[str],
            ) -> tuple[list[Entry], list[str], bool, bool, dict[str, int]]:
    """Map member paths to sorted entries plus the non-hidden leftovers; also (labeled,
    has_splits, flat splits {folder: images directly in it})."""
    parts: dict[str, tuple[str, ...]] = {}
    for member in members:
        path = _check_member(member, root)
        if any(_hidden(p) for p in path.parts):
            continue
        parts[member] = tuple(p for p in path.parts if p != ".")
    # One wrapper folder around the whole tree is dropped (`cifar10/train/...`), unless it is
    # itself a split folder; files next to it stay where they are (and are ignored).
    tops = {p[0] for p in parts.values() if len(p) > 1}
    if len(tops) == 1 and not tops & split_names:
        parts = {m: p[1:] if len(p) > 1 else p for m, p in parts.items()}
        tops = {p[0] for p in parts.values() if len(p) > 1}
    has_splits = bool(tops & split_names)
    if not has_splits:  # one tree: the split part is empty
        parts = {m: (NO_SPLIT, *p) for m, p in parts.items()}
    labeled = labels == "folders" or (labels == "auto" and has_splits and any(
        len(p) >= 3 for p in parts.values()))
    depth = 3 if labeled else 2  # <split>/<class>/<file> or <split>/<file>
    entries, ignored = [], []
    for member, p in parts.items():
        if len(p) < depth:
            ignored.append(member)
        elif labeled:
            entries.append(Entry(p[0], p[1], "/".join(p[2:]), member))
        else:
            entries.append(Entry(p[0], "", "/".join(p[1:]), member))
    entries.sort(key=lambda e: (e.split, e.class_name, e.name))
    if ignored:
        where = "<split>/<class>/" if labeled else "the split folders"
        log.info("%s: %d files outside %s ignored, e.g. %s", root, len(ignored), where,
                 sorted(ignored)[0])
    flat = _flat_splits(parts, {e.split for e in entries}, split_names) if labeled else {}
    if flat:
        log.warning("%s: split folders without class folders (images directly in them, no "
                    "labels): %s", root, flat)
    return entries, sorted(ignored), labeled, has_splits, flat


def _flat_splits(parts: dict[str, tuple[str, ...]], with_entries: set[str],
                 split_names: set[str]) -> dict[str, int]:
    """{split folder: image files (by suffix) directly in it} for the split folders of a
    labelled layout that hold such files but no class folder, sorted by folder."""
    suffixes = Image.registered_extensions()  # {".jpg": "JPEG", ...}
    counts: dict[str, int] = {}
    for p in parts.values():
        if (len(p) == 2 and p[0] in split_names and p[0] not in with_entries
                and PurePosixPath(p[1]).suffix.lower() in suffixes):
            counts[p[0]] = counts.get(p[0], 0) + 1
    return dict(sorted(counts.items()))
