"""Writes that never leave a half-written adapter or checkpoint behind.

Files are written under temporary names in their final directory (same file system), flushed, then
renamed into place with ``os.replace``, which is atomic. A directory is built whole under a
temporary name and renamed into place the same way (``replace_directory``), in steps that always leave
a complete copy that ``recover_directory`` finds.

Temporary names are ``.NAME.TOKEN.STAGE`` beside ``NAME``: ``tmp`` (being written), ``ready`` (complete,
about to be renamed into place) and ``old`` (the replaced copy, about to be removed).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

STAGING, READY, PREVIOUS = "tmp", "ready", "old"
TOKEN = "[a-z0-9_]{8}"  # tempfile's random part of mkstemp/mkdtemp names


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


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Give an ``OSError`` raised without a file name (a write to a full disk) the name of ``path``, so the
    message says where."""
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno is not None:
            err.filename = str(path)
        raise


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
            with naming(directory / name):
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
    """Write one file so that readers see the old content or the new, never a part.

    Raises:
        IsADirectoryError: ``path`` is a directory (never replaced by a file).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file name.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with naming(path):
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=f".{STAGING}", dir=parent))
    try:
        _public(tmp, directory=True)
    except BaseException:
        discard(tmp)
        raise
    return tmp


def discard(path: Path) -> None:
    """Remove a file, a link (never what it points to) or a directory tree, if it is there."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def replace_directory(tmp: Path, target: Path) -> None:
    """Put the finished ``tmp`` (from ``temporary_directory``) in place of ``target``.

    Three renames, each atomic, so that a kill at any point leaves a complete copy that
    ``recover_directory`` finds (issue 19; the newest first): ``tmp`` -> ``.NAME.X.ready`` (complete),
    ``target`` -> ``.NAME.X.old`` (the previous copy, still complete), ``.ready`` -> ``target``; then the
    old copy is removed. The files are flushed to disk before the first rename.
    """
    token = _token(tmp, target.name, STAGING)
    ready = target.parent / f".{target.name}.{token}.{READY}"
    old = target.parent / f".{target.name}.{token}.{PREVIOUS}"
    moved = False
    try:
        _fsync_tree(tmp)
        os.replace(tmp, ready)
        _fsync_dir(target.parent)
        if target.exists() or target.is_symlink():
            os.replace(target, old)
            moved = True
        os.replace(ready, target)
    except BaseException:  # an error (not a kill): leave things as they were, the previous copy in place
        if moved and not (target.exists() or target.is_symlink()):
            with contextlib.suppress(OSError):
                os.replace(old, target)
        for path in (tmp, ready):
            discard(path)
        raise
    _fsync_dir(target.parent)
    if moved:
        discard(old)


def leftovers(target: str | os.PathLike) -> list[Path]:
    """The temporary copies of ``target`` beside it: being written (``.tmp``), complete but not yet in
    place (``.ready``) or replaced but not yet removed (``.old``), left by an interrupted write."""
    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.{TOKEN}\.({STAGING}|{READY}|{PREVIOUS})$")
    if not target.parent.is_dir():
        return []
    return sorted(p for p in target.parent.iterdir() if pattern.match(p.name))


def complete_copy(target: str | os.PathLike) -> Path | None:
    """The newest complete copy of a directory written with ``replace_directory``, without changing
    anything: a ``.ready`` copy (a kill came before it was renamed into place), else ``target``, else
    the ``.old`` copy (a kill came between moving ``target`` aside and putting the new one in place).
    None when there is none."""
    target = Path(target)
    found = leftovers(target)
    newest = lambda paths: max(paths, key=lambda p: (p.stat().st_mtime_ns, p.name))  # noqa: E731
    ready = [p for p in found if p.name.endswith(f".{READY}") and p.is_dir()]
    if ready:
        return newest(ready)
    if target.exists():
        return target
    previous = [p for p in found if p.name.endswith(f".{PREVIOUS}") and p.is_dir()]
    return newest(previous) if previous else None


def recover_directory(target: str | os.PathLike) -> Path | None:
    """Make the newest complete copy (see ``complete_copy``) ``target`` again and remove every other
    temporary copy. Only for a caller that is the one writer of ``target`` (a run holds its lock).

    Returns:
        ``target``, or None when no complete copy exists.
    """
    target = Path(target)
    best = complete_copy(target)
    if best is not None and best != target:
        if target.exists() or target.is_symlink():
            aside = target.parent / f".{target.name}.{_token(best, target.name)}.{PREVIOUS}"
            os.replace(target, aside)
        os.replace(best, target)
        _fsync_dir(target.parent)
    for path in leftovers(target):
        discard(path)
    return target if best is not None else None


def discard_leftovers(directory: str | os.PathLike) -> list[Path]:
    """Remove every temporary file or copy that an interrupted write left in ``directory`` (not
    recursive). Only for a caller that is the one writer there. Returns what was removed."""
    directory = Path(directory)
    pattern = re.compile(rf"^\..+\.{TOKEN}\.({STAGING}|{READY}|{PREVIOUS})$")
    removed = [p for p in directory.iterdir() if pattern.match(p.name)] if directory.is_dir() else []
    for path in removed:
        discard(path)
    return removed


def _token(path: Path, name: str, stage: str | None = None) -> str:
    """The random part of a temporary name ``.NAME.TOKEN.STAGE``."""
    match = re.match(rf"^\.{re.escape(name)}\.({TOKEN})\.({stage or '[a-z]+'})$", path.name)
    if match is None:
        raise ValueError(f"{path} is not a temporary copy of {name} (made by temporary_directory).")
    return match.group(1)


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` and the directories themselves, so a rename that makes the tree
    visible as complete is never on disk before its contents."""
    for directory, _, files in os.walk(root):
        for name in files:
            path = Path(directory) / name
            if not path.is_symlink():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        _fsync_dir(Path(directory))


@contextlib.contextmanager
def new_directory(target: str | os.PathLike, *, overwrite: bool, what: str,
                  ours: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``target``; on success it replaces ``target``.

    Args:
        target: the directory to write.
        overwrite: replace a non-empty ``target``.
        what: what the directory holds, for messages ("merged checkpoint").
        ours: tells whether an existing ``target`` is such a directory; ``overwrite`` then replaces
            only those, never a directory of other files.
    Raises:
        FileExistsError: ``target`` exists and is not empty, and ``overwrite`` is False (or it is not ``ours``).
        NotADirectoryError: ``target`` is a file or a symbolic link (never replaced).
    """
    target = Path(target)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        kind = "a symbolic link" if target.is_symlink() else "a file"
        raise NotADirectoryError(f"{target} is {kind}, not a {what} directory; choose another path (it is left as it is).")
    if target.exists() and any(target.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{target} already exists and is not empty; pass overwrite=True to replace the {what}.")
        if ours is not None and not ours(target):
            raise FileExistsError(f"{target} is not a {what} (it holds other files); overwrite only replaces a {what}. "
                                  "Choose another path or remove it yourself.")
    tmp = temporary_directory(target.parent, target.name)
    try:
        with naming(target):
            yield tmp
    except BaseException:
        discard(tmp)
        raise
    replace_directory(tmp, target)  # removes its temporary copies itself if it fails
