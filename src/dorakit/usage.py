"""What the command line says when something is wrong (issue 19): one error-reporting path for every
subcommand, and the checks of option values that the subcommands' typed signatures cannot express.

``explain`` turns an exception into (exit code, one-line message) or None for a bug, whose traceback is
then shown: exit 2 for bad input and what the environment refused (a missing, foreign or damaged file,
a read-only or full disk: the system's message with the path and the fix), 1 for a run stopped by a
failure or out of memory, 130 for Ctrl-C.
"""

from __future__ import annotations

import errno
import math
from pathlib import Path


def explain(err: BaseException) -> tuple[int, str] | None:
    """(exit code, one-line message) for an error the user can act on, None for a bug (see the module doc)."""
    from .train.loop import TrainingError

    if isinstance(err, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(err, TrainingError):
        return 1, str(err)
    if isinstance(err, MemoryError) or "OutOfMemoryError" in type(err).__name__ or (
            isinstance(err, RuntimeError) and "can't allocate memory" in str(err)):
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return 1, (f"out of memory ({first[:200]}). Lower --batch-size or --micro-batch-size, --max-length or the "
                   "rank, or use a machine with more memory.")
    if type(err).__name__ == "SafetensorError":  # a safetensors file dorakit did not route through its readers
        from .formats.tensor_files import as_os_error

        converted = as_os_error(err, "a safetensors file")
        if converted is err:
            return 2, f"a safetensors file could not be read or written ({err})"
        err = converted
    if isinstance(err, OSError):
        return 2, os_message(err)
    if isinstance(err, (ValueError, ImportError)):
        return 2, str(err)
    return None


OS_FIXES = {
    errno.ENOSPC: "Free disk space (or write elsewhere) and run the command again.",
    errno.EDQUOT: "Free disk space within your quota (or write elsewhere) and run the command again.",
    errno.EROFS: "The file system is read-only: choose a writable location.",
    errno.EACCES: "Check the permissions, or choose a location you can use.",
    errno.EPERM: "Check the permissions, or choose a location you can use.",
}


def os_message(err: OSError) -> str:
    """A file-system error in one line: what the system said, the path, and the fix."""
    if err.strerror is None:  # dorakit's own messages, which name the file and the fix
        return str(err)
    where = f": {err.filename}" if err.filename else ""
    if err.filename2:
        where += f" -> {err.filename2}"
    fix = OS_FIXES.get(err.errno, "")
    return f"{err.strerror}{where}." + (f" {fix}" if fix else "")


def at_least(minimum: int, *ranks: int, **options) -> None:
    """Refuse option values below ``minimum`` (ValueError naming the option).

    Args:
        minimum: the smallest value allowed.
        ranks: values of --ranks/--vera-ranks.
        options: option name -> value (None: unset, not checked); NaN is refused too.
    """
    for value in ranks:
        if value < minimum:
            raise ValueError(f"Ranks must be at least {minimum}, got {value}.")
    for name, value in options.items():
        if value is not None and not value >= minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}.")


def above_zero(**options) -> None:
    """Refuse option values (None: unset) that are not positive finite numbers."""
    for name, value in options.items():
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number, got {value}.")


def not_empty(**options) -> None:
    """Refuse list options given without a value."""
    for name, value in options.items():
        if not value:
            raise ValueError(f"--{name.replace('_', '-')} needs at least one value.")


def usable_directory(path: str, flag: str) -> None:
    """An output directory that is not a file (created later, by whoever writes into it)."""
    if Path(path).exists() and not Path(path).is_dir():
        raise NotADirectoryError(f"{flag} {path} is a file; give a directory.")
