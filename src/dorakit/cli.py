"""The ``dorakit`` command line: ``dorakit <subcommand> --help`` documents every option.

    dorakit merge --base MODEL_DIR --adapter ADAPTER_DIR --out OUT_DIR

Subcommands are plain typed functions; jsonargparse builds the parser (and config-file support)
from their signatures and docstrings.
"""

from __future__ import annotations

import sys
import time

from .hf import DTypeName


def merge(base: str, adapter: str, out: str, dtype: DTypeName = "auto", overwrite: bool = False) -> None:
    """Fold an adapter into its base model and write a plain transformers checkpoint.

    The output loads with transformers alone; it also holds the adapter and the row norms that let
    dorakit.load_merged undo the merge exactly later.

    Args:
        base: Base model: a transformers checkpoint directory.
        adapter: Adapter directory (written by dorakit or by PEFT, LoRA or DoRA).
        out: Output directory for the merged checkpoint (written whole, then renamed into place).
        dtype: Dtype to load the base model in; "auto" keeps the checkpoint's.
        overwrite: Replace a non-empty output directory.
    """
    from .hf import load_pretrained, load_tokenizer
    from .inject import adapter_layers
    from .io import load_adapter
    from .merged import save_merged

    start = time.perf_counter()
    model = load_pretrained(base, dtype)
    load_adapter(model, adapter)
    layers = len(adapter_layers(model))
    save_merged(model, out, tokenizer=load_tokenizer(base), overwrite=overwrite)
    print(f"merged {layers} adapted layers of {base} with {adapter} into {out} in {time.perf_counter() - start:.1f} s")


COMMANDS = {"merge": merge}


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import auto_cli

    try:
        auto_cli(COMMANDS, args=argv, as_positional=False, prog="dorakit")
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, ImportError) as err:
        print(f"dorakit: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
