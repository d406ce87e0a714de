"""The package's shape: no import cycles (module-level or deferred, package `__init__`s included), no file outside
the model folder over 500 lines, the model folder importing nothing from the rest of the package, and the card
template people edit at the top level being the one the package ships."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_sparse"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """hf_sparse modules that `path` imports anywhere (functions included), with the packages that importing them
    runs (`a.b.c` runs `a/__init__` and `a/b/__init__`), except `path`'s own enclosing packages."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        for target in targets:
            parts = target.split(".")
            for end in range(1, len(parts) + 1):
                candidate = ".".join(parts[:end])
                # A module's own enclosing packages are already importing when it runs: not an edge.
                if candidate.startswith("hf_sparse") and candidate != name and not name.startswith(candidate + "."):
                    found.add(candidate)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {target for target in imports_of(path) if target in modules} for name, path in modules.items()}


def test_no_import_cycles():
    edges = graph()
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_model_folder_is_self_contained():
    for path in (PACKAGE / "models" / "sparse_vit").glob("*.py"):
        outside = {target for target in imports_of(path) if not target.startswith("hf_sparse.models.sparse_vit")}
        assert not outside - {"hf_sparse", "hf_sparse.models"}, (path.name, outside)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda path: str(path.relative_to(ROOT)))
def test_files_outside_the_model_folder_stay_short(path):
    if "models" in path.relative_to(PACKAGE).parts:
        return
    assert len(path.read_text(encoding="utf-8").splitlines()) <= 500


def test_the_top_level_card_template_is_the_shipped_one():
    top, shipped = ROOT / "model_cards" / "model_card.md", PACKAGE / "model_cards" / "model_card.md"
    assert top.read_text(encoding="utf-8") == shipped.read_text(encoding="utf-8")
