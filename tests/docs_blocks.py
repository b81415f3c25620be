"""Find the code blocks of a Markdown page and what the page says about running them.

Markers are HTML comments, invisible on the rendered page:

- ``<!-- not-run: REASON -->`` on the line before a fence: the block is not run, for the reason given
  (a reason is required, so every skipped block says why);
- ``<!-- run -->`` on the line before a ``bash``/``sh``/``console`` fence: the shell block is run
  (shell blocks are shown only, unless marked; Python blocks always run unless marked ``not-run``);
- ``<!-- fixtures: NAME=KIND ... -->`` anywhere: files the page's commands expect, built before the
  first block (kinds: see tests/docs_driver.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

PYTHON = {"python", "py", "pycon"}
SHELL = {"bash", "sh", "shell"}
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.+?)\s*-->")
RUN = re.compile(r"<!--\s*run\s*-->")
FIXTURES = re.compile(r"<!--\s*fixtures:\s*(.+?)\s*-->")


@dataclass
class Block:
    language: str  # "python" or "bash"
    code: str
    line: int  # 1-based line of the opening fence
    skip_reason: str | None  # None: the block runs


def page_blocks(page: Path) -> tuple[dict[str, str], list[Block]]:
    """(fixtures {name: kind}, the Python and shell blocks in page order)."""
    lines = page.read_text(encoding="utf-8").split("\n")
    fixtures: dict[str, str] = {}
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        for spec in FIXTURES.findall(lines[i]):
            for item in spec.split():
                name, _, kind = item.partition("=")
                fixtures[name] = kind
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, language = match.groups()
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        code = "\n".join(line[len(indent):] for line in lines[i + 1:end])
        previous = lines[i - 1] if i > 0 else ""
        language = language.lower()
        skip = NOT_RUN.search(previous)
        if language in PYTHON:
            blocks.append(Block("python", code, i + 1, skip.group(1) if skip else None))
        elif language in SHELL:
            reason = skip.group(1) if skip else (None if RUN.search(previous) else "shell block not marked <!-- run -->")
            blocks.append(Block("bash", code, i + 1, reason))
        i = end + 1
    return fixtures, blocks
