"""Run one documentation page's code blocks in order, as a reader would (used by tests/test_docs.py).

    python tests/docs_driver.py PAGE.md WORKDIR

Python blocks share one namespace (later blocks use what earlier ones defined); shell blocks marked
``<!-- run -->`` run with bash in the same working directory, with ``dorakit`` and ``python`` taken
from this interpreter's environment. Fixtures named on the page (``<!-- fixtures: ... -->``) are built
first, from the tiny models and data of tests/train_assets.py: what a command calls MODEL_DIR is then a
tiny LLaMA directory, and train.jsonl a small learnable text/label file. The working directory stands
for a clone of the project: its examples/ and benchmarks/ are linked into it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from docs_blocks import page_blocks  # noqa: E402
from train_assets import colour_records, make_model_dir, write_jsonl  # noqa: E402

FIXTURES = {
    "tiny-llama": lambda path: make_model_dir(path),
    "tiny-classifier": lambda path: make_model_dir(path, kind="classifier"),
    "colours": lambda path: write_jsonl(path, colour_records(64, seed=hash(path.name) % 1000)),
}


def build_fixtures(fixtures: dict[str, str], root: Path) -> None:
    for name, kind in fixtures.items():
        if kind not in FIXTURES:
            raise SystemExit(f"unknown fixture kind {kind!r} (known: {', '.join(FIXTURES)})")
        FIXTURES[kind](root / name)


def main() -> int:
    page, workdir = Path(sys.argv[1]), Path(sys.argv[2])
    fixtures, blocks = page_blocks(page)
    os.chdir(workdir)
    for folder in ("examples", "benchmarks"):
        (workdir / folder).symlink_to(REPO / folder, target_is_directory=True)
    build_fixtures(fixtures, workdir)
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    namespace: dict = {"__name__": "__main__"}
    for block in blocks:
        if block.skip_reason is not None:
            continue
        where = f"{page.name}:{block.line} ({block.language})"
        print(f"--- {where}", flush=True)
        if block.language == "python":
            try:
                exec(compile(block.code, where, "exec"), namespace)
            except BaseException:
                traceback.print_exc()
                print(f"FAILED: the Python block at {where}", flush=True)
                return 1
        else:
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], env=env)
            if done.returncode != 0:
                print(f"FAILED: the shell block at {where} exited {done.returncode}", flush=True)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
