"""Reading and writing safetensors files with errors that name the file and the fix (issue 19).

safetensors raises its own ``SafetensorError`` both for a damaged file and for a failed write (a full
disk comes back as "I/O error: No space left on device (os error 28)"). Here a damaged or foreign file
becomes a ``ValueError`` that names it and says what to do, a failed write an ``OSError`` with the
system's error number (so the command line reports a full disk like any other), and what is read is
checked cheaply: floating-point tensors only (an int32 "adapter" is not one), all finite.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import torch
from torch import Tensor

SHOWN = 3  # offending tensors named per message


def read_tensors(path: str | os.PathLike, *, fix: str, floating: bool = True, finite: bool = True) -> dict[str, Tensor]:
    """All tensors of a safetensors file, checked. Never unpickles anything.

    Args:
        path: the file.
        fix: what the user should do about a damaged file (ends the message), e.g. "Save the adapter again."
        floating: refuse tensors that are not floating point.
        finite: refuse NaN and infinite values.
    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable safetensors file (truncated, corrupt, not safetensors), or a
            tensor that is not floating point or not finite.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist." if not path.exists() else f"{path} is not a file.")
    try:
        tensors = load_file(str(path))
    except OSError:
        raise
    except Exception as err:  # safetensors' own error type for truncated headers and data
        raise ValueError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err}); it may be "
                         f"truncated or corrupt. {fix}") from None
    check_tensors(tensors, str(path), fix, floating=floating, finite=finite)
    return tensors


def check_tensors(tensors: dict[str, Tensor], source: str, fix: str, *, floating: bool = True,
                  finite: bool = True) -> None:
    """Raise ValueError naming the first tensors that are not floating point or hold NaN/Inf."""
    if floating:
        wrong = [f"{k} ({str(v.dtype).replace('torch.', '')})" for k, v in tensors.items() if not v.is_floating_point()]
        if wrong:
            raise ValueError(f"{source} holds {len(wrong)} tensor(s) that are not floating point: {_first(wrong)}. "
                             f"Adapter weights and norms are floats; this file was not written as one. {fix}")
    if finite:
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise ValueError(f"{source} holds NaN or infinite values in {len(bad)} tensor(s): {_first(bad)}. "
                             f"Loading it would make every output it touches non-finite. {fix}")


def write_tensors(tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, with a failed write raised as ``OSError`` (errno, message, path)."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except OSError:
        raise
    except Exception as err:
        raise as_os_error(err, path) from None


def save_whole_model(model, path: str | os.PathLike) -> None:
    """``safetensors.torch.save_model`` (tied weights stored once), failures as in ``write_tensors``."""
    from safetensors.torch import save_model

    try:
        save_model(model, str(path))
    except OSError:
        raise
    except Exception as err:
        raise as_os_error(err, path) from None


def as_os_error(err: Exception, path: str | os.PathLike) -> Exception:
    """An ``OSError`` for safetensors' "I/O error: ... (os error N)", else ``err`` itself."""
    match = re.search(r"os error (\d+)", str(err))
    if match is None:
        return err
    number = int(match.group(1))
    return OSError(number, os.strerror(number) if number in errno.errorcode else str(err), str(path))


def _first(items: list[str]) -> str:
    return ", ".join(items[:SHOWN]) + (f", ... ({len(items) - SHOWN} more)" if len(items) > SHOWN else "")
