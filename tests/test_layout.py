"""The package keeps its shape (docs/architecture.md): the core imports no wing, formats import no
integration. Read from the source with ``ast``, so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "dorakit"
CORE = {"functional", "functional_experts", "config", "fields", "targets", "inject", "layers", "atomic", "modules_to_save", "norm_cache"}
WINGS = {"formats", "integrations", "analysis", "kernels", "train", "cli", "usage", "demo", "assets", "figures"}


def _dorakit_imports(path: Path) -> set[str]:
    """The top-level dorakit modules/packages that ``path`` imports (absolute or relative)."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - (node.level - 1)])
                target = base + (node.module.split(".") if node.module else [])
                names = [target[0]] if target else [alias.name for alias in node.names]
            elif node.module and node.module.split(".")[0] == "dorakit":
                target = node.module.split(".")[1:]
                names = [target[0]] if target else [alias.name for alias in node.names]
            else:
                continue
            found.update(names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("dorakit."))
    return found


def _modules(top: str) -> list[Path]:
    folder = PACKAGE / top
    return sorted(folder.rglob("*.py")) if folder.is_dir() else [PACKAGE / f"{top}.py"]


def test_the_core_imports_no_wing():
    bad = {str(p.relative_to(PACKAGE)): sorted(_dorakit_imports(p) & WINGS) for top in CORE for p in _modules(top)}
    assert {k: v for k, v in bad.items() if v} == {}


def test_formats_import_no_integration():
    bad = {str(p.relative_to(PACKAGE)): sorted(_dorakit_imports(p) & {"integrations", "train", "analysis", "cli"})
           for p in _modules("formats")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_every_module_is_in_a_known_place():
    tops = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if not p.name.startswith("__")}
    tops -= {"__pycache__"}
    assert tops - CORE - WINGS == set(), "a new top-level module: put it in a wing or add it to the core on purpose"
