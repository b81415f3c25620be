"""The documentation cannot rot (issue 20): its code runs, its links resolve, its API page is complete.

Every Python block of README.md and docs/*.md runs as written (blocks of one page in order, sharing
names), and so does every shell block marked ``<!-- run -->``, on tiny models built in the test; a block
that cannot run says why with ``<!-- not-run: reason -->`` (tests/docs_blocks.py has the markers).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .docs_blocks import page_blocks

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
RUNNABLE = [p for p in PAGES if any(b.skip_reason is None for b in page_blocks(p)[1])]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_the_runnable_pages_were_found():
    assert any(p.name == "README.md" for p in RUNNABLE) and len(RUNNABLE) >= 3


@pytest.mark.parametrize("page", RUNNABLE, ids=page_id)
def test_code_blocks_run(page, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "docs_driver.py"), str(page), str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, f"{page_id(page)}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # links inside code are code
    missing = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{page_id(page)} links to missing files: {missing}"


def test_api_reference_lists_every_public_name():
    import dorakit

    documented = set(re.findall(r"^::: dorakit\.(\w+)", (DOCS / "api.md").read_text(encoding="utf-8"), flags=re.M))
    assert set(dorakit.__all__) - documented == set(), "add these to docs/api.md"


def _nav_files(node) -> set[str]:
    if isinstance(node, str):
        return {node}
    if isinstance(node, list):
        return set().union(*(_nav_files(n) for n in node)) if node else set()
    if isinstance(node, dict):
        return set().union(*(_nav_files(v) for v in node.values()))
    return set()


def test_every_page_is_in_the_site_navigation():
    nav = _nav_files(yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"])
    pages = {p.name for p in DOCS.glob("*.md")}
    assert pages - nav == set(), "add these pages to mkdocs.yml's nav"
    assert nav - pages == set(), "mkdocs.yml's nav names pages that do not exist"


def test_the_site_home_is_the_readme():
    """docs/index.md is the README with its links made relative to docs/, so the two cannot drift."""
    expected = (ROOT / "README.md").read_text(encoding="utf-8").replace("](docs/", "](")
    assert (DOCS / "index.md").read_text(encoding="utf-8") == expected, (
        "docs/index.md differs from README.md; regenerate it: sed 's#](docs/#](#g' README.md > docs/index.md")
