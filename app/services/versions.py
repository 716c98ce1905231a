"""Model versions in the database: the base version and which one is active."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import utcnow
from app.models import ModelVersion, VersionKind, VersionStatus


def list_versions(session: Session) -> list[ModelVersion]:
    """Every version, oldest (the first base) first."""
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.id)))


def active_version(session: Session) -> ModelVersion | None:
    """The version new requests should be served by."""
    return session.scalar(select(ModelVersion).where(ModelVersion.status == VersionStatus.active))


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
            count = session.scalar(select(func.count()).select_from(ModelVersion)) or 0
            base = ModelVersion(
                name=f"v{count}",
                kind=VersionKind.base,
                base_model=base_model,
                path=path,
                status=VersionStatus.candidate,
                manifest={"base_model": base_model, "path": path},
            )
            session.add(base)
            session.flush()
        if current is not None:
            current.status = VersionStatus.retired
            session.flush()
        base.status = VersionStatus.active
        base.activated_at = utcnow()
        session.commit()
    except IntegrityError:  # another process registered it at the same moment
        session.rollback()
        return ensure_base_version(session, base_model, path)
    return base
