"""Archives as file containers: what a path is (`source_kind`) and the one archive reader
(`Archive`: listing, random reads and one streamed pass over a .zip or .tar(.gz))."""

from __future__ import annotations

import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


def source_kind(path: Path) -> str:
    """'folder', 'zip' or 'tar'; ValueError naming the path if it is missing or of unknown type."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"image source {str(path)!r} does not exist")
    if path.is_dir():
        return "folder"
    name = path.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "tar"
    raise ValueError(f"image source {str(path)!r} is neither a folder nor one of "
                     f"{', '.join(ARCHIVE_SUFFIXES)}")


class Archive:
    """The files of a .zip or .tar(.gz) archive: listing, random reads and one streamed pass.

    The one archive reader of the project (image sources, embedding indexes, VOC sets). Only
    regular files are listed; tar links and special members are counted in `skipped_links`.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.kind = source_kind(self.path)
        if self.kind == "folder":
            raise ValueError(f"{str(self.path)!r} is a folder, not an archive")
        self.skipped_links: list[str] = []
        self._members: dict[str, tarfile.TarInfo] = {}
        if self.kind == "zip":
            self._handle: zipfile.ZipFile | tarfile.TarFile | None = zipfile.ZipFile(self.path)
            self._names = [i.filename for i in self._handle.infolist() if not i.is_dir()]
        else:
            self._handle = tarfile.open(self.path)
            infos = self._handle.getmembers()
            self.skipped_links = [i.name for i in infos if not (i.isfile() or i.isdir())]
            self._members = {i.name: i for i in infos if i.isfile()}
            self._names = list(self._members)

    def names(self) -> list[str]:
        """Regular files, in archive order."""
        return list(self._names)

    def read(self, name: str) -> bytes:
        """One member's bytes (KeyError for an unknown name)."""
        if isinstance(self._handle, zipfile.ZipFile):
            return self._handle.read(name)
        assert isinstance(self._handle, tarfile.TarFile), "archive is closed"
        handle = self._handle.extractfile(self._members[name])
        assert handle is not None, name
        return handle.read()

    def stream(self, names: Iterable[str]) -> Iterator[tuple[str, bytes]]:
        """(name, bytes) for `names`: zips in the order given, tars in archive order (one pass)."""
        if self.kind == "zip":
            yield from ((name, self.read(name)) for name in names)
            return
        wanted = set(names)
        for name in self._names:
            if name in wanted:
                yield name, self.read(name)

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
