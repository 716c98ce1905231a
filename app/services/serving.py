"""What a serving process loads: the active version, built on the configured base model."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

from app.config import DEFAULT_MODEL, Settings
from app.ml.loading import DEFAULT_SOURCE, load_model, resolve_dtype
from app.ml.registry import ServingVersion
from app.services.versions import ensure_base_version


class ModelNotPrepared(RuntimeError):
    """The default model has not been downloaded and converted yet."""


def base_model_dir(settings: Settings) -> Path:
    """The directory of the configured base model."""
    if settings.model != DEFAULT_MODEL:
        return Path(settings.model).resolve()
    path = (settings.models_dir / DEFAULT_SOURCE.name).resolve()
    if not (path / "config.json").is_file():
        raise ModelNotPrepared(
            f"the default model is not prepared in {path}: run `python -m app.cli setup` first"
        )
    return path


def load_active_version(session: Session, settings: Settings) -> ServingVersion:
    """Register the base version if needed and load the active one."""
    path = base_model_dir(settings)
    version = ensure_base_version(session, settings.model, str(path))
    model, tokenizer = load_model(Path(version.path), resolve_dtype(settings.model_dtype))
    return ServingVersion(version.id, version.name, model, tokenizer)
