"""Version directories: written whole under a temporary name, verified by their manifest."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


class CorruptCheckpoint(RuntimeError):
    """A version directory is missing, incomplete or altered; the message says what is wrong."""


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checkpoint(
    root: Path, name: str, write_files: Callable[[Path], None], manifest: dict[str, Any]
) -> Path:
    """Write a version directory atomically: files, then a manifest of their hashes, then rename.

    A crash at any point leaves at most a `.tmp-*` directory, never a directory named `name`.
    """
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    if target.exists():
        raise FileExistsError(f"version directory {target} already exists")
    partial = root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    try:
        write_files(partial)
        files = sorted(p for p in partial.rglob("*") if p.is_file())
        manifest = {
            **manifest,
            "files": {str(p.relative_to(partial)): sha256_file(p) for p in files},
        }
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for path in [*files, partial / MANIFEST]:
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target


def read_manifest(path: Path) -> dict[str, Any]:
    """A version's manifest, unverified."""
    try:
        manifest: dict[str, Any] = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{path} has no {MANIFEST}") from None
    except json.JSONDecodeError as exc:
        raise CorruptCheckpoint(f"{path / MANIFEST} is not valid JSON: {exc}") from None
    return manifest


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check every file against the manifest's SHA-256; return the manifest or raise."""
    if not path.is_dir():
        raise CorruptCheckpoint(f"version directory {path} is missing")
    manifest = read_manifest(path)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CorruptCheckpoint(f"{path / MANIFEST} lists no files")
    for relative, expected in files.items():
        file = path / relative
        if not file.is_file():
            raise CorruptCheckpoint(f"{relative} is missing from {path}")
        if sha256_file(file) != expected:
            raise CorruptCheckpoint(
                f"{relative} in {path} does not match its sha256 in the manifest"
            )
    return manifest


def remove_partials(root: Path) -> list[Path]:
    """Delete `.tmp-*` leftovers of interrupted writes; return what was removed."""
    removed = [p for p in root.glob(".tmp-*") if p.is_dir()] if root.is_dir() else []
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed
