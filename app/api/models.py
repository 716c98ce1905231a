"""Model versions: list them, and activate one (which is also how to roll back)."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import (
    RATE_LIMITED,
    AdminKey,
    CurrentKey,
    FollowerDep,
    RegistryDep,
    SessionDep,
    SettingsDep,
)
from app.engine.registry import ModelRegistry
from app.models import Evaluation, ModelVersion
from app.schemas.models import EvaluationPublic, ModelList, ModelVersionPublic
from app.services.evaluations import latest_evaluations
from app.services.notify import announce_activation
from app.services.versions import activate_by_name, list_versions

router = APIRouter(prefix="/v1", tags=["models"])


def _public(
    version: ModelVersion, serving_id: int | None, evaluation: Evaluation | None = None
) -> ModelVersionPublic:
    return ModelVersionPublic(
        id=version.name,
        created=int(version.created_at.timestamp()),
        name=version.name,
        kind=version.kind,
        base_model=version.base_model,
        parent=version.manifest.get("parent"),
        status=version.status,
        status_reason=version.status_reason,
        serving=version.id == serving_id,
        metrics=version.manifest.get("metrics", {}),
        created_at=version.created_at,
        activated_at=version.activated_at,
        evaluation=None if evaluation is None else EvaluationPublic.model_validate(evaluation),
    )


def _serving_id(registry: ModelRegistry) -> int | None:
    return int(registry.active.id) if registry.ready else None


@router.get("/models", response_model=ModelList, responses=RATE_LIMITED)
def models(_: CurrentKey, session: SessionDep, registry: RegistryDep) -> ModelList:
    """Every model version, the first base model first, and which one this process serves."""
    serving_id = _serving_id(registry)
    evaluations = latest_evaluations(session)
    return ModelList(
        data=[_public(v, serving_id, evaluations.get(v.id)) for v in list_versions(session)]
    )


@router.post("/models/{name}/activate", response_model=ModelVersionPublic)
def activate(
    name: str, _: AdminKey, session: SessionDep, settings: SettingsDep, follower: FollowerDep
) -> ModelVersionPublic:
    """Make a version the active one (roll back by activating an earlier one); every API process
    serves it within seconds. A version whose files fail verification is refused (409)."""
    version = activate_by_name(session, name=name, base_model=settings.model)
    announce_activation(settings.redis_url, version.id)
    follower.wake()
    return _public(version, _serving_id(follower.registry))
