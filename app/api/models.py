"""Model versions."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.deps import CurrentKey, SessionDep
from app.schemas.models import ModelList, ModelVersionPublic
from app.services.versions import list_versions

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelList)
def models(_: CurrentKey, session: SessionDep, request: Request) -> ModelList:
    """Every model version, the first base model first, and which one this process serves."""
    registry = request.app.state.registry
    serving_id = registry.active.id if registry.ready else None
    return ModelList(
        data=[
            ModelVersionPublic(
                name=v.name,
                kind=v.kind,
                base_model=v.base_model,
                status=v.status,
                status_reason=v.status_reason,
                serving=v.id == serving_id,
                created_at=v.created_at,
                activated_at=v.activated_at,
            )
            for v in list_versions(session)
        ]
    )
