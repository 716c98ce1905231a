"""Model versions in the database: the base version and which one is active."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import utcnow
from app.ml.checkpoints import CorruptCheckpoint, verify_checkpoint
from app.models import ModelVersion, VersionKind, VersionStatus
from app.services.errors import Conflict, NotFound


def list_versions(session: Session) -> list[ModelVersion]:
    """Every version, oldest (the first base) first."""
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.id)))


def active_version(session: Session) -> ModelVersion | None:
    """The version new requests should be served by."""
    return session.scalar(select(ModelVersion).where(ModelVersion.status == VersionStatus.active))


def activate(session: Session, version: ModelVersion) -> ModelVersion:
    """Make `version` the active one and retire the previous active version (commits)."""
    current = active_version(session)
    if current is not None and current.id != version.id:
        current.status = VersionStatus.retired
        session.flush()
    version.status = VersionStatus.active
    version.status_reason = None
    version.activated_at = utcnow()
    session.commit()
    return version


def activate_by_name(session: Session, name: str, base_model: str) -> ModelVersion:
    """An admin's activation (or rollback): any version whose files verify, on the current base."""
    version = get_by_name(session, name)
    if version.base_model != base_model:
        raise Conflict(
            f"version {name!r} is built on {version.base_model!r}, not on the configured MODEL "
            f"{base_model!r}"
        )
    if version.kind is VersionKind.adapter:
        try:
            verify_checkpoint(Path(version.path))
        except CorruptCheckpoint as exc:
            version.status = VersionStatus.refused
            version.status_reason = str(exc)
            session.commit()
            raise Conflict(f"version {name!r} cannot be served: {exc}") from None
    return activate(session, version)


def get_by_name(session: Session, name: str) -> ModelVersion:
    """One version by name."""
    if "\x00" in name:  # no name holds NUL, and PostgreSQL refuses to compare text that does
        raise NotFound(f"model version {name!r} does not exist")
    version = session.scalar(select(ModelVersion).where(ModelVersion.name == name))
    if version is None:
        raise NotFound(f"model version {name!r} does not exist")
    return version


def base_of(session: Session, version: ModelVersion) -> ModelVersion:
    """The base version an adapter version was trained on (a base version is its own base)."""
    while version.kind is not VersionKind.base:
        parent = session.get(ModelVersion, version.parent_id) if version.parent_id else None
        if parent is None:
            raise NotFound(f"model version {version.name!r} has no base version")
        version = parent
    return version


def next_name(session: Session) -> str:
    """The name the next version gets."""
    count = session.scalar(select(func.count()).select_from(ModelVersion)) or 0
    return f"v{count}"


def ensure_base_version(session: Session, base_model: str, path: str) -> ModelVersion:
    """The active version built on `base_model`, registering and activating the base if needed.

    When the configured base model changed since the last start, its base version becomes active
    and the previous active version is retired.
    """
    current = active_version(session)
    if current is not None and current.base_model == base_model:
        return current
    base = session.scalar(
        select(ModelVersion).where(
            ModelVersion.kind == VersionKind.base, ModelVersion.base_model == base_model
        )
    )
    try:
        if base is None:
            base = ModelVersion(
                name=next_name(session),
                kind=VersionKind.base,
                base_model=base_model,
                path=path,
                status=VersionStatus.candidate,
                manifest={"base_model": base_model, "path": path},
            )
            session.add(base)
            session.flush()
        activate(session, base)
    except IntegrityError:  # another process registered it at the same moment
        session.rollback()
        return ensure_base_version(session, base_model, path)
    return base
