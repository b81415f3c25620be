"""``python -m dorakit``: the same command line as ``dorakit``."""

from .cli import main

main()
