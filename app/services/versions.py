"""Model versions in the database: the base version, publication and which one is active.

Every write of a version's status is here: `publish_version` (a round's candidate, rejected or
promoted), `promote` (the compare-and-set every activation goes through), `activate` and
`activate_by_name` (an admin's choice), `refuse` (files that cannot be served).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import utcnow
from app.engine.checkpoints import CorruptCheckpoint, verify_checkpoint
from app.models import ModelVersion, VersionKind, VersionStatus
from app.services.errors import Conflict, NotFound


def list_versions(session: Session) -> list[ModelVersion]:
    """Every version, oldest (the first base) first."""
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.id)))


def active_version(session: Session) -> ModelVersion | None:
    """The version new requests should be served by."""
    return session.scalar(select(ModelVersion).where(ModelVersion.status == VersionStatus.active))


def promote(
    session: Session, *, version: ModelVersion, expected_id: int | None
) -> ModelVersion | None:
    """Compare-and-set, the one way a version becomes active (an admin's activation, a round's
    promotion, the base at start-up): make `version` active if `expected_id` still is (None: if
    none is); else return the version active instead and change nothing (the caller commits).

    None means `version` is active now. When `expected_id` is no longer active and no other
    version is either (a process refused it meanwhile), no choice would be overwritten: `version`
    becomes active, as it would have for `expected_id` None.
    """
    session.flush()
    if expected_id is not None and expected_id != version.id:
        # On PostgreSQL this waits for a concurrent activation to commit, then sees its outcome.
        retired = _update(
            session, [ModelVersion.id == expected_id, ModelVersion.status == VersionStatus.active],
            status=VersionStatus.retired,
        )  # fmt: skip
        if not retired and (current := active_version(session)) is not None:
            return current
    elif expected_id is None and (current := active_version(session)) is not None:
        return current
    # A race the checks above cannot see ends here: the unique index refuses a second active row.
    if not _update(
        session, [ModelVersion.id == version.id],
        status=VersionStatus.active, status_reason=None, activated_at=utcnow(),
    ):  # fmt: skip
        raise NotFound(f"model version {version.name!r} does not exist")
    return None


def activate(session: Session, version: ModelVersion) -> ModelVersion:
    """Make `version` active in place of the version active now, as a compare-and-set (commits);
    Conflict when another activation changed it meanwhile."""
    current = active_version(session)
    try:
        winner = promote(session, version=version, expected_id=current.id if current else None)
        if winner is None:
            session.commit()
            return version
    except IntegrityError:
        winner = None
    session.rollback()
    now = f" ({winner.name} is active now)" if winner else ""
    raise Conflict(f"the active version changed at the same moment{now}; try again")


@dataclass(frozen=True)
class Published:
    """What `publish_version` did with a new version."""

    version: ModelVersion
    promoted: bool
    """Whether it is the active version now."""
    rejected: bool
    """Whether it failed the gate (its status is `rejected`)."""
    reason: str | None
    """Why it is not active: the gate's reasons, or the admin's activation that won; None when
    promoted."""


def publish_version(
    session: Session,
    *,
    name: str,
    base_model: str,
    path: Path,
    parent: ModelVersion,
    manifest: dict[str, Any],
    gate_reasons: Sequence[str],
) -> Published:
    """Add a trained adapter version on `parent`, whose files are at `path` with `manifest`
    (the row keeps it less the ids of the ratings used), and settle its status (the caller
    commits): `rejected`, with the gate's reasons, when it failed the gate; else promoted by
    the same compare-and-set as an admin's activation, against `parent`. An admin's choice made
    since `parent` was read wins: the version stays a `candidate` and its reason (returned too)
    says so."""
    parent_id, parent_name = parent.id, parent.name
    version = ModelVersion(
        name=name,
        kind=VersionKind.adapter,
        base_model=base_model,
        path=str(path.resolve()),
        parent_id=parent_id,
        status=VersionStatus.candidate,
        manifest={k: v for k, v in manifest.items() if k != "data"},
    )
    session.add(version)
    session.flush()
    if gate_reasons:
        reason = "; ".join(gate_reasons)
        version.status, version.status_reason = VersionStatus.rejected, reason
        return Published(version, promoted=False, rejected=True, reason=reason)
    winner = promote(session, version=version, expected_id=parent_id)
    if winner is None:
        return Published(version, promoted=True, rejected=False, reason=None)
    reason = (
        f"not promoted: an admin activated {winner.name} during the round (it started from "
        f"{parent_name}); {name} stays a candidate"
    )
    version.status_reason = reason
    return Published(version, promoted=False, rejected=False, reason=reason)


def refuse(session: Session, *, version: ModelVersion, reason: str) -> None:
    """Mark a version whose files cannot be served `refused`, with why (flushed; the caller
    commits). A refused version is never active: the caller activates another if it was."""
    version.status = VersionStatus.refused
    version.status_reason = reason
    session.flush()


def _update(session: Session, where: list[Any], **values: Any) -> bool:
    """One conditional UPDATE of model_versions; True when it changed a row."""
    result = session.execute(
        update(ModelVersion).where(*where).values(**values),
        execution_options={"synchronize_session": False},
    )
    for row in session.identity_map.values():  # what the database now says, on next access
        if isinstance(row, ModelVersion):
            session.expire(row)
    return cast(CursorResult[Any], result).rowcount > 0


def activate_by_name(session: Session, *, name: str, base_model: str) -> ModelVersion:
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
            refuse(session, version=version, reason=str(exc))
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


def ensure_base_version(session: Session, *, base_model: str, path: str) -> ModelVersion:
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
    except (IntegrityError, Conflict):  # another process registered or activated at that moment
        session.rollback()
        return ensure_base_version(session, base_model=base_model, path=path)
    return base
