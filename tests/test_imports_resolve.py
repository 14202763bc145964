"""Every ``from fastface... import name`` in the repository, lazy ones inside functions included, names something that
exists: a moved helper otherwise breaks only the rarely run path that imports it (a full-size benchmark, say)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("fastface", "adapters", "samplers", "benchmarks", "tests")


def _imports() -> list[tuple[str, int, str, str]]:
    out = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("fastface"):
                    for alias in node.names:
                        if alias.name != "*":
                            out.append((str(path.relative_to(ROOT)), node.lineno, node.module, alias.name))
    return out


IMPORTS = _imports()


def test_the_scan_sees_lazy_imports() -> None:
    assert len(IMPORTS) > 300
    assert any(f.startswith("benchmarks/") for f, *_ in IMPORTS)


@pytest.mark.parametrize("module", sorted({m for _, _, m, _ in IMPORTS}))
def test_imported_names_exist(module: str) -> None:
    mod = importlib.import_module(module)
    missing = []
    for file, line, m, name in IMPORTS:
        if m != module or hasattr(mod, name):
            continue
        try:  # a submodule (from fastface import dcg)
            importlib.import_module(f"{module}.{name}")
        except ImportError:
            missing.append(f"{file}:{line} imports {name} from {module}")
    assert not missing, "\n".join(missing)
