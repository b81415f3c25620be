"""Writes that never leave a half-written adapter or checkpoint behind.

Files are written under temporary names in their final directory (same file system), flushed, then
renamed into place with ``os.replace``, which is atomic. A directory is built whole under a
temporary name and renamed into place the same way.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _public(path: Path, directory: bool = False) -> None:
    """The permissions a plain open()/mkdir() would give: mkstemp/mkdtemp make files 0600 and
    directories 0700, which would hide saved adapters from other users of a shared machine."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def make_directories(directory: Path) -> list[Path]:
    """``directory.mkdir(parents=True, exist_ok=True)``; returns the directories it created, outermost first."""
    missing = [d for d in (directory, *directory.parents) if not d.exists()][::-1]
    directory.mkdir(parents=True, exist_ok=True)
    return missing


def remove_empty(created: list[Path]) -> None:
    """Remove the directories ``make_directories`` created, innermost first, while they are empty."""
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:  # not empty (someone else wrote there) or already gone: keep what is not ours
            return


def write_files(directory: str | os.PathLike, writers: dict[str, Callable[[Path], None]], marker: str) -> None:
    """Write several files into ``directory`` so that readers see the old set or the new set.

    Args:
        directory: created if missing; other files in it are left alone.
        writers: file name -> function that writes the file at the path it is given.
        marker: the file whose presence makes the directory valid (an adapter's config). It is
            removed before the others are replaced and put back last, so an interruption leaves
            either the complete old set, or no marker (which readers report), never a mix.
    """
    directory = Path(directory)
    created = make_directories(directory)
    staged: dict[str, Path] = {}
    try:
        for name, write in writers.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
            os.close(fd)
            staged[name] = Path(tmp)
            write(staged[name])
            _public(staged[name])
            with open(staged[name], "rb+") as handle:
                os.fsync(handle.fileno())
    except BaseException:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        remove_empty(created)  # a failed first save leaves no empty directory behind (issue 14)
        raise
    (directory / marker).unlink(missing_ok=True)
    for name, tmp in staged.items():
        if name != marker:
            os.replace(tmp, directory / name)
    if marker in staged:
        os.replace(staged[marker], directory / marker)
    _fsync_dir(directory)


def write_file(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Write one file so that readers see the old content or the new, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        _public(Path(tmp))
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    """``write_file`` for UTF-8 text (JSON, CSV, JSONL)."""
    write_file(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_csv(path: str | os.PathLike, rows: list[dict], columns: list[str]) -> None:
    """A CSV file with a header row, written whole."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def temporary_directory(parent: Path, name: str) -> Path:
    """An empty directory beside ``parent / name``, to be renamed over it by ``replace_directory``."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent))
    _public(tmp, directory=True)
    return tmp


def discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def replace_directory(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` over ``target`` (the old one is moved aside first, then removed)."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, old / "previous")
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def new_directory(target: str | os.PathLike, *, overwrite: bool, what: str) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``target``; on success it replaces ``target``.

    Raises:
        FileExistsError: ``target`` exists and is not empty, and ``overwrite`` is False.
    """
    target = Path(target)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} already exists and is not empty; pass overwrite=True to replace the {what}.")
    tmp = temporary_directory(target.parent, target.name)
    try:
        yield tmp
    except BaseException:
        discard(tmp)
        raise
    replace_directory(tmp, target)
