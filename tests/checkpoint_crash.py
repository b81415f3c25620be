"""Run by tests/test_train_checkpoint.py in a subprocess: write checkpoints of a tiny adapted model and kill
the writer (os._exit in a forked child: no clean-up runs, as with kill -9) at chosen points.

    python -m tests.checkpoint_crash OUTPUT MODE [MODE ...]

Step 1 is written whole; step k+1 is written by a child that dies as MODE says:
    between-renames   just before the finished copy is renamed to checkpoint/ (the previous one moved aside)
    while-writing     just before the first file inside the temporary copy is put in place
Every step fills lora_B with its step number, so a restored checkpoint tells which step it holds.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch


def main(out: Path, modes: list[str]) -> None:
    torch.set_num_threads(1)  # no thread pool exists when the children are forked
    import dorakit
    from dorakit.train.checkpoint import Progress, save_checkpoint
    from dorakit.train.options import TrainConfig
    from dorakit.train.schedule import make_scheduler

    from .conftest import seeded, tiny_llama

    model = dorakit.inject_adapters(seeded(tiny_llama), dorakit.DoraConfig(r=2, target_modules=["q_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = make_scheduler(optimizer, warmup=0, total=10, kind="linear")
    config = TrainConfig(output=str(out), data="train.jsonl", model="model").to_dict()
    target = out / "checkpoint"

    def save(step: int) -> None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.fill_(step)
        save_checkpoint(target, model, optimizer, scheduler, Progress(step=step), config)

    save(1)
    real = os.replace
    for step, mode in enumerate(modes, start=2):
        pid = os.fork()
        if pid == 0:
            def dying(src, dst, *args, **kwargs):
                into_place = Path(dst) == target
                inside_copy = any(p.name.startswith(".checkpoint.") for p in Path(dst).parents)
                if (mode == "between-renames" and into_place) or (mode == "while-writing" and inside_copy):
                    os._exit(9)
                return real(src, dst, *args, **kwargs)

            os.replace = dying
            save(step)
            os._exit(0)
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
