"""The import rules between the packages, read from the source with `ast` (function-level imports
included): the engine imports no web, database or worker code; the worker never imports the web
app; services hold no model code; routers no torch; no test module imports another (shared code
is in tests/conftest.py and tests/helpers.py)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

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


SHARED = ("tests.helpers",)
"""The only module of the suite a file under tests/ may import (conftest.py's fixtures reach a
test by name, never by import)."""


def suite_imports(source: str, package: list[str]) -> list[tuple[int, str]]:
    """The imports in `source` of a test module, or of any module of the suite but `SHARED`."""
    found = []
    for line, module in imports(source, package):
        inside = _within(module, "tests") and module != "tests"
        named = any(part.startswith("test_") for part in module.split("."))
        if (inside or named) and not any(_within(module, shared) for shared in SHARED):
            found.append((line, module))
    return found


def test_no_test_module_imports_another() -> None:
    """Helpers that several test modules use live in tests/helpers.py (fixtures in conftest.py,
    which no module imports), so that a test module can move or go without breaking another."""
    assert suite_imports(
        "from tests.conftest import IsolatedSettings\n"
        "from tests.helpers import FAST\n"
        "from tests import helpers\n"
        "from tests.training.test_training import start\n"
        "from .test_roles import routes\n"
        "def f():\n"
        "    import tests.test_poisoning\n",
        ["tests", "api"],
    ) == [
        (1, "tests.conftest"),
        (1, "tests.conftest.IsolatedSettings"),
        (4, "tests.training.test_training"),
        (4, "tests.training.test_training.start"),
        (5, "tests.api.test_roles"),
        (5, "tests.api.test_roles.routes"),
        (7, "tests.test_poisoning"),
    ]
    found = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for line, module in suite_imports(path.read_text(), _package_of(path)):
            found.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert found == []


VERSION_STATUS_WRITER = "app/services/versions.py"
"""The one module that writes a model version's status (publication, activation, refusal)."""


def version_status_writes(source: str) -> list[int]:
    """Lines that write a version's status: an assignment of a `VersionStatus` member or of a
    `status_reason`, or a `status=VersionStatus.…` argument (a row built, an UPDATE's values)."""

    def names_a_version_status(node: ast.AST) -> bool:
        return any(
            isinstance(sub, ast.Attribute)
            and isinstance(sub.value, ast.Name)
            and sub.value.id == "VersionStatus"
            for sub in ast.walk(node)
        )

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            attrs = {
                sub.attr for t in targets for sub in ast.walk(t) if isinstance(sub, ast.Attribute)
            }
            if "status_reason" in attrs or (
                "status" in attrs and node.value is not None and names_a_version_status(node.value)
            ):
                found.append(node.lineno)
        elif (
            isinstance(node, ast.keyword)
            and node.arg == "status"
            and names_a_version_status(node.value)
        ):
            found.append(node.value.lineno)
    return sorted(set(found))


def test_only_the_versions_service_writes_a_version_status() -> None:
    """Every write of a version's status is in app/services/versions.py: the worker publishes
    through `publish_version`, the hot swap refuses through `refuse` (docs/architecture.md)."""
    assert version_status_writes(
        "row.status = VersionStatus.refused\n"
        "row.status, row.status_reason = VersionStatus.rejected, why\n"
        "run.status = RunStatus.failed\n"
        "ModelVersion(name=n, status=VersionStatus.candidate)\n"
        "update(ModelVersion).values(status=VersionStatus.retired)\n"
        "transition(session, run_id=1, expected=RunStatus.running, status=RunStatus.failed)\n"
        "ModelVersionPublic(status=row.status, status_reason=row.status_reason)\n"
    ) == [1, 2, 4, 5]
    found = []
    for folder in ("app", "worker"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.relative_to(ROOT).as_posix() == VERSION_STATUS_WRITER:
                continue
            for line in version_status_writes(path.read_text()):
                found.append(f"{path.relative_to(ROOT)}:{line}")
    assert found == []
    assert version_status_writes((ROOT / VERSION_STATUS_WRITER).read_text())
