"""Training rounds."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status

from app.deps import RATE_LIMITED, AdminKey, CurrentKey, QueueDep, SessionDep, SettingsDep
from app.models import Role
from app.schemas.training import TrainingRunCreate, TrainingRunPublic
from app.services import training

router = APIRouter(prefix="/v1/training", tags=["training"])


@router.post(
    "/runs",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TrainingRunPublic,
    responses={200: {"model": TrainingRunPublic, "description": "A round is already live."}},
)
def start_run(
    key: AdminKey,
    session: SessionDep,
    settings: SettingsDep,
    queue: QueueDep,
    response: Response,
    body: TrainingRunCreate | None = None,
) -> TrainingRunPublic:
    """Start a training round now (202); while one is live, that one is returned (200)."""
    config = {}
    if body is not None and body.train is not None:
        config["train"] = body.train.to_dict()
    if body is not None and body.gate is not None:
        config["gate"] = body.gate.to_dict()
    run, created = training.start_run(
        session, queue=queue, requested_by_id=key.id, config=config,
        stale_after=settings.training_stale_after,
        max_row_failures=settings.training_max_row_failures,
    )  # fmt: skip
    if not created:
        response.status_code = status.HTTP_200_OK
    return TrainingRunPublic.of(run)


@router.get("/runs", response_model=list[TrainingRunPublic], responses=RATE_LIMITED)
def list_runs(
    key: CurrentKey, session: SessionDep, limit: Annotated[int, Query(ge=1, le=200)] = 50
) -> list[TrainingRunPublic]:
    """Training rounds, newest first (the raters each left out: admin keys only)."""
    per_rater = key.role is Role.admin
    runs = training.list_runs(session, limit)
    return [TrainingRunPublic.of(run, per_rater=per_rater) for run in runs]


@router.get("/runs/{run_id}", response_model=TrainingRunPublic, responses=RATE_LIMITED)
def get_run(
    run_id: Annotated[int, Path(ge=1, le=2**31 - 1)], key: CurrentKey, session: SessionDep
) -> TrainingRunPublic:
    """One training round (the raters it left out: admin keys only)."""
    run = training.get_run(session, run_id)
    return TrainingRunPublic.of(run, per_rater=key.role is Role.admin)
