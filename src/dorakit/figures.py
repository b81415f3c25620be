"""Figures as files: matplotlib without a display, PNGs written whole (matplotlib is optional)."""

from __future__ import annotations

import os

from . import atomic


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed). Raises ImportError."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | os.PathLike) -> None:
    """Write ``fig`` to ``path`` atomically and release it."""
    atomic.write_file(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    pyplot().close(fig)
