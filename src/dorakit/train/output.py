"""The run directory (``--output``): which directories are runs, who writes one, what ``--overwrite`` deletes.

    OUTPUT/.dorakit-run    written first by every run: marks the directory as a dorakit run, and is the
                           file the run's lock is taken on: an OS lock (flock) that ends with the process
                           however it ends, so a kill -9 leaves no stale lock

What this guarantees (issue 19; docs/guarantees.md names the tests):
- ``--overwrite`` deletes only the files a run writes (``RUN_FILES`` and their temporary copies), only in a
  directory with the marker, never a symbolic link (nor what it points to), and never the model, data or
  config file the new run reads. A directory without the marker that holds such names is refused.
- One run at a time per directory: a second ``dorakit train`` on the same ``--output`` stops before
  touching anything, naming the process that holds it.
- What a killed run left behind is cleaned up by the next run in that directory; ``--resume`` first puts
  the newest complete checkpoint in place (``atomic.recover_directory``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from .. import atomic
from .checkpoint import read_state
from .options import TrainConfig, math_differences

MARKER_NAME = ".dorakit-run"
# Everything a run writes in its directory (besides the marker). Only these are ever deleted, by --overwrite.
RUN_FILES = ("adapter", "model", "checkpoint", "checkpoints", "metrics.jsonl", "summary.json", "loss.png", "demo.json")
INPUTS = ("model", "data", "val_data", "config")  # what a run reads: never deleted by its own --overwrite

_held: dict[str, list] = {}  # marker path -> [file descriptor, depth]: the locks this process holds


class OutputInUseError(FileExistsError):
    """Another process is running in this --output."""


def is_run_directory(out: Path) -> bool:
    """Marked by a run, or a run of a dorakit older than the marker (its summary or checkpoint state says so)."""
    return (out / MARKER_NAME).is_file() or _older_run(out)


def _older_run(out: Path) -> bool:
    """What only a dorakit run writes: summary.json with its status, config and versions, or a checkpoint's
    state.json with its format and progress (never a name alone: a user's model/ is not a run's)."""
    for path, keys in ((out / "summary.json", {"status", "config", "versions"}),
                       (out / "checkpoint" / "state.json", {"format", "progress", "config"})):
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(content, dict) and keys <= set(content):
            return True
    return False


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold the run lock of ``out`` (which must exist) for the ``with`` block; re-entrant in one process.

    Raises:
        OutputInUseError: another process holds it.
    """
    marker = out / MARKER_NAME
    key = str(marker.resolve())
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    fd = os.open(marker, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _lock(fd)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        os.close(fd)
        try:
            who = "process {pid} on {host}, started {started}".format(**json.loads(holder))
        except (ValueError, KeyError, TypeError):
            who = "another process"
        raise OutputInUseError(f"Another dorakit train is writing to {out} ({who}). Wait for it to finish or stop "
                               "it, or choose another --output.") from None
    except BaseException:
        os.close(fd)
        raise
    try:
        record = {"written_by": "dorakit train", "pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        data = (json.dumps(record) + "\n").encode()
        with atomic.naming(marker):
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)  # in place: replacing the file would drop the lock taken on it
        _held[key] = [fd, 1]
    except BaseException:
        os.close(fd)
        raise
    try:
        yield
    finally:
        _held[key][1] -= 1
        if _held[key][1] == 0:
            del _held[key]
            os.close(fd)  # releases the lock


def _lock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # no flock on this platform: runs are not protected from each other
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


@contextlib.contextmanager
def claim_output(cfg: TrainConfig, main: bool = True) -> Iterator[dict | None]:
    """Check, lock and prepare ``--output`` for a run, held for the ``with`` block; yields the saved state
    when resuming. Only the ``main`` process of a multi-process run locks and changes the directory."""
    if not main:
        yield prepare_output(cfg, clear=False)
        return
    out = Path(cfg.output)
    created, marked = not out.exists(), is_run_directory(out)
    out = _checked_directory(cfg)
    try:
        with run_lock(out):
            yield prepare_output(cfg)
    except BaseException:
        _undo_claim(out, created, marked)
        raise


def _undo_claim(out: Path, created: bool, marked: bool) -> None:
    """A run that failed before writing anything leaves the directory as it found it (bad input changes nothing)."""
    if [p.name for p in out.iterdir()] != [MARKER_NAME]:
        return
    if not marked:
        (out / MARKER_NAME).unlink(missing_ok=True)
    if created:
        with contextlib.suppress(OSError):
            out.rmdir()


def prepare_output(cfg: TrainConfig, clear: bool = True) -> dict | None:
    """Check --output against --resume/--overwrite; returns the saved state when resuming. With ``clear``
    (the one process that writes), lock it, recover an interrupted checkpoint, remove what killed runs
    left and, with --overwrite, the earlier run's files.

    Raises:
        FileExistsError / NotADirectoryError / ValueError: the directory cannot be used as asked.
    """
    out = Path(cfg.output)
    if not clear:
        return _resumed_state(cfg, out) if cfg.resume else None
    out = _checked_directory(cfg)
    with run_lock(out):
        links = [name for name in RUN_FILES if (out / name).is_symlink()]
        if links:
            raise FileExistsError(f"{out / links[0]} is a symbolic link; a run's files are never links, so dorakit "
                                  "neither writes through nor deletes it. Remove the link (what it points to is "
                                  "not touched) or choose another --output.")
        if cfg.resume:
            atomic.recover_directory(out / "checkpoint")  # a kill between renames: the newest complete copy
            _discard_leftovers(out)
            return _resumed_state(cfg, out)
        existing = [name for name in RUN_FILES if (out / name).exists()]
        if existing and not cfg.overwrite:
            raise FileExistsError(f"{out} already holds a run ({', '.join(existing)}). Continue it with --resume, "
                                  "replace it with --overwrite, or choose another --output.")
        _refuse_deleting_inputs(cfg, [out / name for name in existing])
        for name in existing:
            atomic.discard(out / name)
        _discard_leftovers(out)
    return None


def resumable_state(out: Path) -> dict:
    """The checkpoint state of the unfinished run in ``out``, or an error saying why there is none."""
    try:
        finished = json.loads((out / "summary.json").read_text(encoding="utf-8")).get("status") == "finished"
    except (OSError, ValueError, AttributeError):
        finished = False
    if finished:
        raise ValueError(f"The run in {out} has finished; there is nothing to resume. Its adapter: {out / 'adapter'}.")
    return read_state(out / "checkpoint")


def _resumed_state(cfg: TrainConfig, out: Path) -> dict:
    state = resumable_state(out)
    try:
        saved = TrainConfig(**state["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{out / 'checkpoint'} holds options this dorakit cannot use ({err}); start the run again "
                         "with --overwrite or in another --output.") from None
    diffs = math_differences(saved, cfg)
    if diffs:
        raise ValueError("--resume must continue the same run, but these options changed: " + "; ".join(diffs)
                         + ". Drop them to use the saved values, or start a new --output.")
    return state


def _checked_directory(cfg: TrainConfig) -> Path:
    """``--output`` as a directory this run may use (created if missing), or an error before anything changes."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--output {out} is a file; give a directory (a new one, or an earlier run's).")
    if cfg.resume:
        if not out.is_dir():
            raise FileNotFoundError(f"No run in {out}: there is nothing to resume. Start the run without --resume.")
        return out  # resuming deletes nothing
    if out.is_dir() and not is_run_directory(out):
        foreign = [name for name in RUN_FILES if (out / name).exists() or (out / name).is_symlink()]
        if foreign:
            raise FileExistsError(
                f"{out} holds {', '.join(foreign)} but is not a dorakit run directory (every run writes "
                f"{MARKER_NAME} there first). dorakit never deletes or mixes with files it did not write: choose "
                "another --output.")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _refuse_deleting_inputs(cfg: TrainConfig, doomed: list[Path]) -> None:
    """--overwrite never deletes what this run reads (the model it trains, its data, its config file)."""
    for name in INPUTS:
        value = getattr(cfg, name)
        if value is None:
            continue
        used = Path(value).resolve()
        for path in doomed:
            if used == path.resolve() or path.resolve() in used.parents:
                raise ValueError(f"--overwrite would delete {path}, which this run reads as --{name.replace('_', '-')} "
                                 f"({value}). Move it out of {cfg.output} or choose another --output.")


def _discard_leftovers(out: Path) -> None:
    """Temporary files and copies of killed writes in the run directory and its run-owned directories."""
    directories = [out] + [out / name for name in RUN_FILES if (out / name).is_dir() and not (out / name).is_symlink()]
    checkpoints = out / "checkpoints"
    if checkpoints.is_dir() and not checkpoints.is_symlink():
        directories += [p for p in checkpoints.iterdir() if p.is_dir() and not p.is_symlink()]
    for directory in directories:
        atomic.discard_leftovers(directory)
