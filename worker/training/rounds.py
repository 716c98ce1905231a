"""One training round from start to finish: data, training, gate, publication."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db import utcnow
from app.ml.checkpoints import remove_partials, write_checkpoint
from app.ml.training_config import GateConfig, TrainConfig
from app.models import (
    Comparison,
    Feedback,
    ModelVersion,
    RunStatus,
    TrainingRun,
    VersionKind,
    VersionStatus,
)
from app.models.training_run import LIVE_STATUSES
from app.services.notify import announce_activation
from app.services.serving import base_model_dir
from app.services.training import finish
from app.services.versions import activate, active_version, next_name
from worker.training.dataset import build_round_data
from worker.training.gate import evaluate
from worker.training.train import train_adapter

log = logging.getLogger(__name__)


def run_round(sessions: sessionmaker[Session], settings: Settings, run_id: int) -> RunStatus:
    """Run a queued round (or restart one whose worker was lost) and return its final status."""
    with sessions() as session:
        run = session.get(TrainingRun, run_id)
        if run is None or run.status not in LIVE_STATUSES:
            return run.status if run else RunStatus.failed
        try:
            return _run(session, settings, run)
        except Exception as exc:
            log.exception("training round %s failed", run_id)
            session.rollback()
            run = session.get(TrainingRun, run_id)
            assert run is not None
            finish(run, RunStatus.failed, f"{type(exc).__name__}: {exc}")
            session.commit()
            return RunStatus.failed


def _run(session: Session, settings: Settings, run: TrainingRun) -> RunStatus:
    run.status = RunStatus.running
    run.started_at = run.heartbeat_at = utcnow()
    parent = active_version(session)
    if parent is None:
        raise RuntimeError("no active model version to train from")
    run.parent_version_id = parent.id
    train_config = TrainConfig(**run.config.get("train", {}))
    gate_config = GateConfig(**run.config.get("gate", {}))
    run.config = {"train": train_config.to_dict(), "gate": gate_config.to_dict()}
    _remove_orphans(session, settings.versions_dir)
    data = build_round_data(session, settings)
    run.counts = data.counts()
    session.commit()
    if data.train_size < settings.training_min_items:
        finish(
            run,
            RunStatus.skipped,
            f"only {data.train_size} new usable ratings to train on; the minimum is "
            f"{settings.training_min_items} (TRAINING_MIN_ITEMS)",
        )
        session.commit()
        return RunStatus.skipped

    from transformers import AutoTokenizer  # heavy: only when a round really trains

    base_path = base_model_dir(settings)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    parent_adapter = Path(parent.path) if parent.kind is VersionKind.adapter else None

    def beat(step: int) -> None:
        session.execute(
            update(TrainingRun).where(TrainingRun.id == run.id).values(heartbeat_at=utcnow())
        )
        session.commit()

    trained = train_adapter(
        base_path, parent_adapter, data.train_kto, data.train_pairs, train_config, tokenizer, beat
    )
    active_model = None
    if parent_adapter is not None:
        from peft import PeftModel

        from worker.training.train import load_base

        active_model = PeftModel.from_pretrained(load_base(base_path), parent_adapter).eval()
    verdict = evaluate(
        trained.model, active_model, tokenizer, data.heldout_kto, data.heldout_pairs, gate_config
    )
    beat(-1)
    metrics: dict[str, Any] = {**trained.metrics, **verdict.metrics, "passed": verdict.passed}

    name = next_name(session)
    feedback_ids, comparison_ids = data.used_ids()
    manifest = {
        "name": name,
        "kind": "adapter",
        "base_model": settings.model,
        "parent": parent.name,
        "training_run": run.id,
        "hyperparameters": train_config.to_dict(),
        "data": {"feedback_ids": sorted(feedback_ids), "comparison_ids": sorted(comparison_ids)},
        "metrics": metrics,
    }
    path = write_checkpoint(
        settings.versions_dir, name, lambda d: trained.model.save_pretrained(str(d)), manifest
    )
    # One transaction: the version, the used feedback and the run's outcome land together or not
    # at all; the checkpoint directory without its row is an orphan the next round removes.
    version = ModelVersion(
        name=name,
        kind=VersionKind.adapter,
        base_model=settings.model,
        path=str(path.resolve()),
        parent_id=parent.id,
        status=VersionStatus.candidate,
        manifest={k: v for k, v in manifest.items() if k != "data"},
    )
    session.add(version)
    session.flush()
    _mark_used(session, feedback_ids, comparison_ids, run.id)
    run.version_id = version.id
    run.metrics = metrics
    run.history = trained.history
    if verdict.passed:
        finish(run, RunStatus.succeeded)
        activate(session, version)  # commits
        announce_activation(settings.redis_url, version.id)
        return RunStatus.succeeded
    reason = "; ".join(verdict.reasons)
    version.status = VersionStatus.rejected
    version.status_reason = reason
    finish(run, RunStatus.rejected, reason)
    session.commit()
    return RunStatus.rejected


def _mark_used(
    session: Session, feedback_ids: set[int], comparison_ids: set[int], run_id: int
) -> None:
    if feedback_ids:
        session.execute(
            update(Feedback).where(Feedback.id.in_(feedback_ids)).values(used_in_run_id=run_id)
        )
    if comparison_ids:
        session.execute(
            update(Comparison)
            .where(Comparison.id.in_(comparison_ids))
            .values(used_in_run_id=run_id)
        )


def _remove_orphans(session: Session, versions_dir: Path) -> None:
    """Delete partial writes and version directories no database row knows (a crash's leftovers)."""
    for partial in remove_partials(versions_dir):
        log.warning("removed the partial version directory %s", partial)
    if not versions_dir.is_dir():
        return
    known = set(session.scalars(select(ModelVersion.name)))
    for directory in versions_dir.iterdir():
        if directory.is_dir() and directory.name not in known:
            log.warning("removed %s: no model version refers to it", directory)
            shutil.rmtree(directory, ignore_errors=True)
