"""Uniform read access to a dataset stored as a folder, a tar archive (any compression) or a zip archive.

Archives are read in memory, never extracted, so a hostile member name cannot write anywhere; such names are
refused anyway, since no honest dataset has them.
"""

from __future__ import annotations

import functools
import os
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..errors import DataError, printable
from .limits import check_file_bytes, check_total_bytes, regular_file_size

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")


def _checked_member(archive: Path, name: str) -> str:
    """Return the member name normalised, refusing absolute paths and `..` (path traversal)."""
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or name.startswith(("/", "\\")) or ":" in pure.parts[0]:
        raise DataError(f"{archive}: member {name!r} escapes the archive (unsafe path); refusing to read it")
    return str(pure)


@dataclass
class Tree:
    """Files of a dataset by relative POSIX path. `prefix` narrows the view to a sub-folder."""

    location: Path
    files: list[str]
    dirs: list[str] = field(default_factory=list)  # every folder, so that an empty one is seen too
    prefix: str = ""
    _dir: Path | None = None
    _members: dict[str, bytes] = field(default_factory=dict)
    _zip: zipfile.ZipFile | None = None

    def names(self) -> list[str]:
        """Relative paths below the prefix, sorted."""
        start = self.prefix
        return sorted(name[len(start) :] for name in self.files if name.startswith(start))

    def sub(self, folder: str) -> Tree:
        prefix = self.prefix + folder.strip("/") + "/"
        return Tree(self.location, self.files, self.dirs, prefix, self._dir, self._members, self._zip)

    def children(self) -> tuple[list[str], list[str]]:
        """Immediate (files, folders) below the prefix, sorted."""
        start = self.prefix
        files = [n[len(start) :] for n in self.files if n.startswith(start) and "/" not in n[len(start) :]]
        folders = {n[len(start) :].split("/")[0] for n in self.files if n.startswith(start) and "/" in n[len(start) :]}
        folders |= {d[len(start) :].split("/")[0] for d in self.dirs if d.startswith(start) and len(d) > len(start)}
        return sorted(files), sorted(folders)

    def has(self, name: str) -> bool:
        return self.prefix + name in self._fileset

    def has_dir(self, folder: str) -> bool:
        start = self.prefix + folder.strip("/") + "/"
        return any(name.startswith(start) for name in self.files) or start.rstrip("/") in self.dirs

    def read(self, name: str) -> bytes:
        full = self.prefix + name
        try:
            if self._dir is not None:
                path = self._dir / full
                regular_file_size(path, self.describe(name))  # a FIFO would block, a device read forever
                return path.read_bytes()
            if self._zip is not None:
                return self._zip.read(full)
        except OSError as exc:
            raise DataError(f"{self.describe(name)}: cannot be read ({exc.strerror or exc}); check the file") from exc
        except (zipfile.BadZipFile, RuntimeError, NotImplementedError, EOFError) as exc:  # CRC, password, method
            raise DataError(f"{self.describe(name)}: damaged or encrypted member ({exc}); repack the archive") from exc
        return self._members[full]

    def describe(self, name: str) -> str:
        """Human-readable location of a file for error messages."""
        separator = "/" if self._dir is not None else ":"  # archive members read as archive:member
        return printable(f"{self.location}{separator}{self.prefix}{name}")  # a newline in a name stays one line

    @functools.cached_property
    def _fileset(self) -> set[str]:
        return set(self.files)


def open_tree(path: Path) -> Tree:
    if path.is_dir():
        files: list[str] = []
        dirs: list[str] = []
        total = 0
        for dirpath, dirnames, filenames in os.walk(path):
            rel = PurePosixPath(Path(dirpath).relative_to(path))
            files += [str(rel / f) for f in filenames]
            dirs += [str(rel / d) for d in dirnames]
            total += sum(regular_file_size(Path(dirpath) / f, f"{Path(dirpath) / f}") for f in filenames)
        check_total_bytes(total, str(path))
        return Tree(path, sorted(files), sorted(dirs), _dir=path)
    name = path.name.lower()
    if name.endswith(".zip"):
        return _open_zip(path)
    if name.endswith(ARCHIVE_SUFFIXES):
        return _open_tar(path)
    raise DataError(f"{path}: not a folder or a known archive ({', '.join(ARCHIVE_SUFFIXES)}); give a dataset folder")


def _open_zip(path: Path) -> Tree:
    try:
        archive = zipfile.ZipFile(path)
        infos = archive.infolist()
        for info in infos:  # declared sizes, before anything is inflated
            check_file_bytes(info.file_size, f"{path}:{info.filename}")
        check_total_bytes(sum(i.file_size for i in infos), str(path))
        names = [_checked_member(path, i.filename) for i in infos if not i.is_dir()]
        dirs = [_checked_member(path, i.filename.rstrip("/")) for i in infos if i.is_dir()]
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path}: unreadable zip archive ({exc}); download it again") from exc
    return Tree(path, sorted(names), sorted(dirs), _zip=archive)


def _open_tar(path: Path) -> Tree:
    members: dict[str, bytes] = {}
    dirs: list[str] = []
    total = 0
    try:
        with tarfile.open(path) as archive:  # streamed once: compressed tars have no random access
            for info in archive:
                check_file_bytes(info.size, f"{path}:{info.name}")  # declared sizes, before inflating each
                total += info.size
                check_total_bytes(total, str(path))
                if info.issym() or info.islnk():
                    raise DataError(f"{path}: member {info.name!r} is a link; refusing an archive with links")
                if info.isdir():
                    dirs.append(_checked_member(path, info.name.rstrip("/")))
                if not info.isfile():
                    continue
                extracted = archive.extractfile(info)
                if extracted is not None:
                    members[_checked_member(path, info.name)] = extracted.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{path}: unreadable or truncated archive ({exc}); download it again") from exc
    return Tree(path, sorted(members), sorted(dirs), _members=members)


def fingerprint(path: Path) -> str:
    """Cheap identity of a dataset location: names, sizes and mtimes (folders) or size and mtime (files).

    Every cached load of a folder pays for this walk: with scandir and relative names built as it descends (no
    `relpath` per file), CIFAR-10's 60,000 files take 0.33 s instead of os.walk's 1.4 s.
    """
    if not path.is_dir():
        st = path.stat()
        return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"
    parts: list[str] = []

    def walk(folder: str, prefix: str) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError:  # unreadable: skipped here as os.walk does; reading the tree then names it
            return
        for entry in entries:
            if entry.is_dir():
                if not entry.is_symlink():  # a linked folder is listed by os.walk but not entered
                    walk(entry.path, f"{prefix}{entry.name}/")
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:  # a dangling link, or a file gone since the listing
                raise DataError(
                    f"{entry.path}: a broken link (its target does not exist); remove it or fix the link"
                ) from None
            except OSError as exc:
                raise DataError(f"{entry.path}: cannot be read ({exc.strerror}); check its permissions") from exc
            parts.append(f"{prefix}{entry.name}:{st.st_size}:{st.st_mtime_ns}")

    walk(str(path), "")
    return "\n".join(sorted(parts))
