"""The import rules between the packages, read from the source with `ast` (function-level imports
included): the engine imports no web, database or worker code; the worker never imports the web
app; services hold no model code; routers no torch."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

RULES = {
    "app/engine": (
        "app.api", "app.web", "app.db", "app.models", "app.services", "app.schemas", "app.deps",
        "app.main", "app.cli", "worker", "fastapi", "starlette", "sqlalchemy", "celery", "redis",
    ),
    "worker": ("app.api", "app.web", "app.main", "app.deps"),
    "app/services": ("torch", "transformers", "peft", "fastapi", "starlette"),
    "app/api": ("torch",),
}  # fmt: skip
"""Per folder (all of it, subfolders too): the modules its files may not import, nor anything
inside them."""


def _package_of(path: Path) -> list[str]:
    """The package a file's relative imports start from."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1]  # a module's package; for __init__.py, its own


def imports(source: str, package: list[str]) -> Iterator[tuple[int, str]]:
    """Every module a source imports, with its line: `import a.b` gives a.b, `from a import b`
    gives a and a.b (b may be a module), relative imports resolved from `package`."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            yield node.lineno, base
            for alias in node.names:
                if alias.name != "*":
                    yield node.lineno, f"{base}.{alias.name}"


def _within(module: str, forbidden: str) -> bool:
    return module == forbidden or module.startswith(forbidden + ".")


def violations(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    """`file:line imports module` for each forbidden import under `folder`."""
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        seen = set()
        for line, module in imports(path.read_text(), _package_of(path)):
            for name in forbidden:
                if _within(module, name) and (line, name) not in seen:
                    seen.add((line, name))
                    found.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return found


@pytest.mark.parametrize("folder", sorted(RULES))
def test_imports_follow_the_layout(folder: str) -> None:
    """No file under the folder imports what its layer may not (docs/architecture.md)."""
    assert (ROOT / folder).is_dir()
    assert violations(folder, RULES[folder]) == []


def test_the_rules_see_every_kind_of_import() -> None:
    """Plain, from, relative and function-level imports are all read."""
    source = (
        "import torch.nn\n"
        "from app import services\n"
        "from ..services import hotswap\n"
        "def f():\n"
        "    from sqlalchemy.orm import Session\n"
    )
    found = list(imports(source, ["app", "engine", "llama"]))
    assert (1, "torch.nn") in found
    assert (2, "app.services") in found
    assert (3, "app.engine.services.hotswap") in found
    assert (5, "sqlalchemy.orm") in found
    assert _within("app.services.hotswap", "app.services")
    assert not _within("app.servicesx", "app.services")
