"""Automatic evaluations of versions: stored once per version and suite, read for the pages."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Evaluation


def evaluation_of(session: Session, *, version_id: int, digest: str) -> Evaluation | None:
    """The version's evaluation on this revision of the suite, if it has one."""
    return session.scalar(
        select(Evaluation).where(Evaluation.version_id == version_id, Evaluation.digest == digest)
    )


def record_evaluation(
    session: Session,
    *,
    version_id: int,
    digest: str,
    run_id: int | None,
    metrics: dict[str, Any],
    examples: list[dict[str, str]],
) -> Evaluation:
    """Add a version's evaluation (the caller commits)."""
    evaluation = Evaluation(
        version_id=version_id, digest=digest, run_id=run_id, metrics=metrics, examples=examples
    )
    session.add(evaluation)
    return evaluation


def latest_evaluations(session: Session) -> dict[int, Evaluation]:
    """Each version's newest evaluation, by version id."""
    latest: dict[int, Evaluation] = {}
    for evaluation in session.scalars(select(Evaluation).order_by(Evaluation.id)):
        latest[evaluation.version_id] = evaluation
    return latest
