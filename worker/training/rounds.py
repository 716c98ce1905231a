"""One training round from start to finish: data, training, gate, publication.

A round is a state machine on its run's row: only the worker whose compare-and-set moved it from
`queued` to `running` runs it, every later change is conditional on `running`, and a thread beats
its heartbeat through every phase. A round that finds itself no longer `running` (declared lost
by someone else) stops, publishes nothing and removes only its own files.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db import utcnow
from app.engine.checkpoints import (
    CorruptCheckpoint,
    read_manifest,
    remove_partials,
    write_checkpoint,
)
from app.engine.loading import base_model_dir
from app.models import (
    Comparison,
    Feedback,
    ModelVersion,
    RunStatus,
    TrainingRun,
    VersionKind,
)
from app.models.training_run import LIVE_STATUSES
from app.services.evaluations import evaluation_of, record_evaluation
from app.services.notify import announce_activation
from app.services.training import (
    add_to_reason,
    charge_failure,
    claim,
    fail_if_stale,
    finish,
    transition,
)
from app.services.versions import Published, active_version, next_name, publish_version
from app.training_config import GateConfig, RewardModelConfig, TokenBudget, TrainConfig
from worker.training.batches import RatingIds, ratings_of
from worker.training.dataset import RoundData, build_round_data
from worker.training.evaluation import (
    SUITE_DIR,
    Evaluation,
    Suite,
    degeneration,
    evaluate_model,
    load_suite,
)
from worker.training.gate import device_of, evaluate
from worker.training.train import train_adapter

log = logging.getLogger(__name__)


class RoundLost(Exception):
    """The run is no longer `running`: someone else declared it lost."""


class RoundTimedOut(RuntimeError):
    """The round ran past TRAINING_MAX_SECONDS: it stops and publishes nothing."""


class RatingsUsed(RuntimeError):
    """Some of the round's ratings were used by another round meanwhile."""


class DiskFull(RuntimeError):
    """The version's files did not fit on the versions directory's filesystem."""


def _out_of_space(exc: BaseException | None) -> bool:
    """Whether `exc`, or what caused it, is the filesystem full (or over quota); safetensors
    reports it in the text of its own error."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if f"os error {errno.ENOSPC}" in str(exc) or f"os error {errno.EDQUOT}" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _free_bytes(path: Path) -> int | str:
    """Bytes free for `path` (or its nearest existing parent), or `unknown`."""
    for directory in (path, *path.parents):
        try:
            return shutil.disk_usage(directory).free
        except OSError:
            continue
    return "unknown"


@dataclass
class Progress:
    """Where a round is, for its failure handler."""

    phase: str = "data"
    batch: RatingIds | None = None
    """The ratings of the batch it is computing on (also on the run, `batch_ids`); None between
    batches."""


class BatchLog:
    """Records on the run which ratings the batch being computed on holds (`OnBatch`): before
    the batch, and None after it, each a conditional write committed before the round goes on,
    so that whoever declares the round lost charges the batch it was really in. `check` (the
    heartbeat's) runs first: a round lost or past its time limit computes no further batch."""

    def __init__(
        self,
        session: Session,
        run_id: int,
        progress: Progress,
        check: Callable[[], None] = lambda: None,
    ) -> None:
        self.session = session
        self.run_id = run_id
        self.progress = progress
        self.check = check
        self._written: RatingIds | None = None

    def __call__(self, ratings: RatingIds | None) -> None:
        # No batch until the write landed: a failure of the write itself charges nobody.
        self.progress.batch = None
        if ratings is not None:
            self.check()
        if ratings != self._written:
            _while_running(self.session, self.run_id, batch_ids=ratings, heartbeat_at=utcnow())
            self.session.commit()
            self._written = ratings
        self.progress.batch = ratings


class Heartbeat:
    """Beats a running round's heartbeat from a thread until stopped; notes when it is lost.

    It beats for `max_seconds` at most (TRAINING_MAX_SECONDS): a round still running then has
    hung or is far too slow, and once its heartbeat is stale it is declared lost by the usual
    path, so that it blocks no later round; the round itself, if it is still making progress,
    stops at its next check."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        run_id: int,
        interval: float,
        max_seconds: float = float("inf"),
    ) -> None:
        self.sessions = sessions
        self.run_id = run_id
        self.interval = interval
        self.max_seconds = max_seconds
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{run_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def expired(self) -> bool:
        """Whether the round has run for longer than `max_seconds`."""
        return time.monotonic() - self._started > self.max_seconds

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()

    def check(self) -> None:
        """Raise RoundLost once a beat found the run no longer running, and RoundTimedOut once
        the round has run for longer than `max_seconds`."""
        if self.lost.is_set():
            raise RoundLost(f"training run {self.run_id} is no longer running")
        if self.expired():
            raise RoundTimedOut(
                f"the round ran for more than {self.max_seconds:g} s (TRAINING_MAX_SECONDS); "
                "it stopped and published nothing"
            )

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            if self.expired():
                log.error(
                    "training run %s has run for more than %g s (TRAINING_MAX_SECONDS): its "
                    "heartbeat stops, so that it is declared lost once stale",
                    self.run_id, self.max_seconds,
                )  # fmt: skip
                return
            try:
                with self.sessions() as session:
                    alive = transition(
                        session, run_id=self.run_id, expected=RunStatus.running,
                        heartbeat_at=utcnow(),
                    )  # fmt: skip
                    session.commit()
            except Exception as exc:  # a database blip: the next beat retries; staleness decides
                log.warning("heartbeat of training run %s failed: %s", self.run_id, exc)
                continue
            if not alive:
                log.warning("training run %s is no longer running; stopping it", self.run_id)
                self.lost.set()
                return


def run_round(sessions: sessionmaker[Session], settings: Settings, run_id: int) -> RunStatus:
    """Run a queued round and return its final status; a copy of the task that finds the round
    taken or finished exits at once with the status it found."""
    with sessions() as session:
        run = session.get(TrainingRun, run_id)
        if run is None:
            return RunStatus.failed
        if run.status is RunStatus.running:
            # A redelivery after its worker died, or a duplicate of a live round: never a second
            # run of it; a stale one is declared lost, so that the next round can start.
            fail_if_stale(
                session, run=run, stale_after=settings.training_stale_after,
                max_row_failures=settings.training_max_row_failures,
            )  # fmt: skip
        if not claim(session, run_id):
            session.refresh(run)
            log.info("training run %s is %s, not queued: not running it", run_id, run.status)
            return run.status
    progress = Progress()
    interval = min(settings.training_stale_after / 4, 30.0)
    heartbeat = Heartbeat(sessions, run_id, interval, settings.training_max_seconds)
    with heartbeat, sessions() as session:
        try:
            return _run(session, settings, run_id, heartbeat, progress)
        except RoundLost:
            session.rollback()
            log.warning("training run %s was declared lost; it published nothing", run_id)
            status = session.scalar(select(TrainingRun.status).where(TrainingRun.id == run_id))
            return status or RunStatus.failed
        except Exception as exc:
            log.exception("training round %s failed in %s", run_id, progress.phase)
            session.rollback()
            return _fail(session, settings, run_id, exc, progress)


def _fail(
    session: Session, settings: Settings, run_id: int, exc: Exception, progress: Progress
) -> RunStatus:
    reason = f"{type(exc).__name__} in {progress.phase}: {exc}"
    if not finish(
        session, run_id=run_id, expected=RunStatus.running, status=RunStatus.failed,
        reason=reason,
    ):  # fmt: skip
        session.rollback()  # declared lost meanwhile: whoever did so charged the batch
        log.warning("training run %s was no longer running: not recording %r", run_id, reason)
        return RunStatus.failed
    # Only the batch it was computing on can have caused it; outside one, nobody is charged.
    # A round that ran out of time while still making progress was slow, not stopped by one
    # batch: nobody is charged (one that hung in a batch is declared lost, and that is charged).
    batch = None if isinstance(exc, RoundTimedOut) else progress.batch
    note = charge_failure(
        session, run_id=run_id, batch=batch, limit=settings.training_max_row_failures
    )
    if note:
        add_to_reason(session, run_id=run_id, status=RunStatus.failed, reason=reason, note=note)
    session.commit()
    return RunStatus.failed


def _while_running(session: Session, run_id: int, **values: Any) -> None:
    """Record `values` on the run, or raise RoundLost if it is no longer running."""
    if not transition(session, run_id=run_id, expected=RunStatus.running, **values):
        raise RoundLost(f"training run {run_id} is no longer running")


def _run(
    session: Session, settings: Settings, run_id: int, heartbeat: Heartbeat, progress: Progress
) -> RunStatus:
    run = session.get(TrainingRun, run_id)
    assert run is not None
    parent = active_version(session)
    if parent is None:
        raise RuntimeError("no active model version to train from")
    train_config = TrainConfig(**run.config.get("train", {}))
    gate_config = GateConfig(**run.config.get("gate", {}))
    reward_config = RewardModelConfig(**run.config.get("reward_model", {}))
    budget = TokenBudget.from_settings(settings)
    _remove_orphans(session, settings.versions_dir, run_id)
    _remove_stale_reward_models(session, settings.reward_models_dir, run_id)
    data = build_round_data(session, settings)
    config = {"train": train_config.to_dict(), "gate": gate_config.to_dict()}
    if settings.training_reward_model:
        config["reward_model"] = reward_config.to_dict()
    _while_running(
        session, run_id, parent_version_id=parent.id, counts=data.counts(), config=config,
        data_ids=taken_ids(data), batch_ids=None,
    )  # fmt: skip
    session.commit()
    if data.train_size < settings.training_min_items:
        too_few = (
            f"only {data.train_size} new usable ratings to train on; the minimum is "
            f"{settings.training_min_items} (TRAINING_MIN_ITEMS)"
        )
        if not finish(
            session, run_id=run_id, expected=RunStatus.running, status=RunStatus.skipped,
            reason=too_few,
        ):  # fmt: skip
            raise RoundLost(f"training run {run_id} is no longer running")
        session.commit()
        return RunStatus.skipped

    from transformers import AutoTokenizer  # heavy: only when a round really trains

    base_path = base_model_dir(settings)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    batches = BatchLog(session, run_id, progress, heartbeat.check)
    reward: dict[str, Any] = {}
    if settings.training_reward_model:
        progress.phase = "reward model"
        heartbeat.check()
        reward = _train_reward_model(
            settings, run_id=run_id, base_path=base_path, data=data, config=reward_config,
            tokenizer=tokenizer, budget=budget, heartbeat=heartbeat, batches=batches,
        )  # fmt: skip
        _while_running(session, run_id, metrics=reward)
        session.commit()

    progress.phase = "training"
    heartbeat.check()
    parent_adapter = Path(parent.path) if parent.kind is VersionKind.adapter else None
    trained = train_adapter(
        base_path, parent_adapter, data.train_kto, data.train_pairs, train_config, tokenizer,
        lambda step: heartbeat.check(), budget, batches,
    )  # fmt: skip
    batches(None)

    # The curves are on the run while it gates (and stay there if the gate fails).
    _while_running(session, run_id, metrics={**reward, **trained.metrics}, history=trained.history)
    session.commit()

    progress.phase = "evaluation"
    heartbeat.check()
    active_model = None
    if parent_adapter is not None:
        from peft import PeftModel

        from worker.training.train import load_base

        active_model = PeftModel.from_pretrained(load_base(base_path), parent_adapter).eval()
    evaluation, references = _evaluate(
        session, run_id=run_id, parent=parent, candidate=trained.model, active=active_model,
        tokenizer=tokenizer, gate_config=gate_config, budget=budget,
        suite=load_suite(settings.evaluation_dir or SUITE_DIR),
    )  # fmt: skip

    progress.phase = "gate"
    heartbeat.check()
    verdict = evaluate(
        trained.model, active_model, tokenizer, data.heldout_kto, data.heldout_pairs, gate_config,
        budget, batches,
    )  # fmt: skip
    batches(None)
    # The evaluation's bounds join the gate's: a candidate that breaks any is rejected.
    reasons = [*verdict.reasons, *degeneration(evaluation.metrics, references, gate_config)]
    metrics: dict[str, Any] = {
        **reward, **trained.metrics, **verdict.metrics, "passed": not reasons,
        "evaluation": evaluation.metrics, "evaluation_references": references,
    }  # fmt: skip

    progress.phase = "publishing"
    heartbeat.check()
    name = next_name(session)
    # No transaction (nor its connection) held open while the files are written: the one that
    # publishes starts on a connection checked when it is taken, which survives a database
    # restart during the write.
    session.commit()
    feedback_ids, comparison_ids = data.used_ids()
    manifest = {
        "name": name,
        "kind": "adapter",
        "base_model": settings.model,
        "parent": parent.name,
        "training_run": run_id,
        "hyperparameters": train_config.to_dict(),
        "data": {"feedback_ids": sorted(feedback_ids), "comparison_ids": sorted(comparison_ids)},
        "metrics": metrics,
    }
    try:
        path = write_checkpoint(
            settings.versions_dir, version_directory(name, run_id),
            lambda d: trained.model.save_pretrained(str(d)), manifest,
        )  # fmt: skip
    except Exception as exc:  # write_checkpoint removed its partial directory
        if _out_of_space(exc):
            raise DiskFull(
                f"no space left on the device of {settings.versions_dir} "
                f"({_free_bytes(settings.versions_dir)} bytes free) to write version {name}, so "
                f"nothing was published ({exc}); once there is room, the next round publishes"
            ) from exc
        raise
    committing = False
    try:
        heartbeat.check()  # its time may have run out while it wrote
        # One transaction: the version, the used ratings and the run's outcome land together or
        # not at all.
        published, status = _publish(
            session, settings=settings, run_id=run_id, parent=parent, name=name, path=path,
            manifest=manifest, gate_reasons=reasons, data=data, evaluation=evaluation,
        )  # fmt: skip
        # Read before the commit: nothing after it needs the database.
        version_id, activated = published.version.id, published.promoted
        _while_running(
            session, run_id, status=status, reason=published.reason, finished_at=utcnow(),
            live=None, version_id=version_id, metrics=metrics, history=trained.history,
        )  # fmt: skip
        committing = True
        session.commit()
    except BaseException:
        # A commit that raised may have landed all the same (the connection died after the
        # server committed): then the directory is a published version's, and stays.
        landed = _landed(session, run_id, version_id) if committing else False
        if landed is not True:
            session.rollback()
            if landed is False:  # (unknown: kept, the next round's clean-up decides)
                shutil.rmtree(path, ignore_errors=True)  # its own: no other round writes there
            raise
        log.warning("training run %s: its commit raised, but it landed", run_id)
    if activated:
        announce_activation(settings.redis_url, version_id)
    return status


def _landed(session: Session, run_id: int, version_id: int) -> bool | None:
    """Whether the publication that raised committed anyway (the run names its version), as
    the database says now; None when it cannot tell (still unreachable)."""
    try:
        session.rollback()
        found = session.scalar(select(TrainingRun.version_id).where(TrainingRun.id == run_id))
        session.rollback()
    except Exception as exc:
        log.warning("training run %s: cannot tell whether its publication landed: %s", run_id, exc)
        session.rollback()
        return None
    return found == version_id


def _publish(
    session: Session,
    *,
    settings: Settings,
    run_id: int,
    parent: ModelVersion,
    name: str,
    path: Path,
    manifest: dict[str, Any],
    gate_reasons: list[str],
    data: RoundData,
    evaluation: Evaluation,
) -> tuple[Published, RunStatus]:
    """Mark the round's ratings used and publish its version (`publish_version`: rejected, or
    promoted if the active version is still its parent), while the run is still running; the
    run's status to record with it (the caller commits)."""
    # The run's row first: it stays locked until the commit, so nobody declares the round lost
    # halfway (the same order as fail_if_stale: the run, then the ratings).
    _while_running(session, run_id, heartbeat_at=utcnow())
    mark_used(session, *data.used_ids(), run_id)
    published = publish_version(
        session, name=name, base_model=settings.model, path=path, parent=parent,
        manifest=manifest, gate_reasons=gate_reasons,
    )  # fmt: skip
    session.flush()  # the version's id, for its evaluation
    record_evaluation(
        session, version_id=published.version.id, digest=evaluation.digest, run_id=run_id,
        metrics=evaluation.metrics, examples=evaluation.examples,
    )  # fmt: skip
    return published, RunStatus.rejected if published.rejected else RunStatus.succeeded


def _train_reward_model(
    settings: Settings,
    *,
    run_id: int,
    base_path: Path,
    data: RoundData,
    config: RewardModelConfig,
    tokenizer: Any,
    budget: TokenBudget,
    heartbeat: Heartbeat,
    batches: BatchLog,
) -> dict[str, Any]:
    """Train the round's reward model on its training ratings, measure it on the held-out ones,
    keep it as a verified checkpoint named after the round, and free it; its figures (the
    `rm_*` metrics, with `reward_model_path`)."""
    import gc

    from worker.training.reward_model import save_reward_model, train_reward_model

    trained = train_reward_model(
        base_path, train_kto=data.train_kto, train_pairs=data.train_pairs,
        heldout_kto=data.heldout_kto, heldout_pairs=data.heldout_pairs, config=config,
        tokenizer=tokenizer, budget=budget, on_step=lambda step: heartbeat.check(),
        on_batch=batches,
    )  # fmt: skip
    batches(None)
    path = save_reward_model(
        trained, settings.reward_models_dir, f"rm.run{run_id}",
        {"base_model": settings.model, "training_run": run_id},
    )  # fmt: skip
    metrics = {**trained.metrics, "reward_model_path": str(path)}
    del trained  # its weights and optimiser state, before the policy trains
    gc.collect()
    return metrics


def _remove_stale_reward_models(session: Session, directory: Path, own_run: int | None) -> None:
    """Delete reward models of rounds that ended without publishing (failed, or lost), and
    partial writes: only those of finished rounds with a version, and of live ones other than
    `own_run` (which has written none yet: one there is another database's run of that id),
    are kept."""
    for partial in remove_partials(directory):
        log.warning("removed the partial reward model directory %s", partial)
    if not directory.is_dir():
        return
    kept = set(
        session.scalars(
            select(TrainingRun.id).where(
                TrainingRun.status.in_(LIVE_STATUSES) | TrainingRun.version_id.is_not(None)
            )
        )
    )
    for path in directory.iterdir():
        if path.is_dir() and ((writer := _writer(path)) not in kept or writer == own_run):
            log.warning("removed %s: its round published nothing", path)
            shutil.rmtree(path, ignore_errors=True)


def _evaluate(
    session: Session,
    *,
    run_id: int,
    parent: ModelVersion,
    candidate: Any,
    active: Any | None,
    tokenizer: Any,
    gate_config: GateConfig,
    budget: TokenBudget,
    suite: Suite,
) -> tuple[Evaluation, dict[str, dict[str, float]]]:
    """The candidate's evaluation, and the figures of the versions it is bounded against (the
    base's and the parent's, by a name for the gate's reasons), each evaluated and recorded now
    if it has none on this suite yet. `active` is the parent's model when it is an adapter;
    None: the base, which is the candidate with its adapter disabled."""

    @contextlib.contextmanager
    def as_base() -> Iterator[Any]:
        with candidate.disable_adapter():
            yield candidate

    def evaluated(model: Any) -> Evaluation:
        return evaluate_model(
            model, tokenizer, suite=suite, config=gate_config, budget=budget, as_base=as_base
        )

    def of_base() -> Evaluation:
        with as_base() as base:
            return evaluate_model(
                base, tokenizer, suite=suite, config=gate_config, budget=budget,
                as_base=lambda: contextlib.nullcontext(base),
            )  # fmt: skip

    root = parent
    while root.parent_id is not None and (above := session.get(ModelVersion, root.parent_id)):
        root = above
    bounded = [(root, "the base")] + ([(parent, "active")] if parent.id != root.id else [])
    references: dict[str, dict[str, float]] = {}
    for version, label in bounded:
        found = evaluation_of(session, version_id=version.id, digest=suite.digest)
        if found is not None:
            metrics = dict(found.metrics)
        elif version.id == root.id:
            metrics = _recorded(session, version, run_id, of_base())
        else:
            assert active is not None, "an adapter parent comes with its model"
            metrics = _recorded(
                session, version, run_id, evaluated(active.to(device_of(candidate)))
            )
        references[f"{version.name} ({label})"] = metrics
    return evaluated(candidate), references


def _recorded(
    session: Session, version: ModelVersion, run_id: int, evaluation: Evaluation
) -> dict[str, float]:
    """Record an existing version's evaluation now, a fact about it whatever becomes of the
    round (a lost round that recorded it first recorded the same figures); its figures."""
    record_evaluation(
        session, version_id=version.id, digest=evaluation.digest, run_id=run_id,
        metrics=evaluation.metrics, examples=evaluation.examples,
    )  # fmt: skip
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
    return evaluation.metrics


def taken_ids(data: RoundData) -> RatingIds:
    """Every rating the round computes on, train and held-out (recorded on the run)."""
    return ratings_of([*data.train_kto, *data.heldout_kto, *data.train_pairs, *data.heldout_pairs])


def mark_used(
    session: Session, feedback_ids: set[int], comparison_ids: set[int], run_id: int
) -> None:
    """Mark the round's training ratings used, each only while no round has used it yet."""
    for model, ids in ((Feedback, feedback_ids), (Comparison, comparison_ids)):
        if not ids:
            continue
        result = session.execute(
            update(model)
            .where(model.id.in_(ids), model.used_in_run_id.is_(None))
            .values(used_in_run_id=run_id),
            execution_options={"synchronize_session": False},
        )
        marked = cast(CursorResult[Any], result).rowcount
        if marked != len(ids):
            raise RatingsUsed(
                f"{len(ids) - marked} of the round's {len(ids)} {model.__tablename__} ratings "
                "were used by another round meanwhile"
            )


def version_directory(name: str, run_id: int) -> str:
    """The directory a round writes its version `name` in: named after the round too, so that
    no two rounds ever write, or remove, the same directory (a round declared lost and the next
    one may both write a `v7`, the name being free until one publishes)."""
    return f"{name}.run{run_id}"


def _remove_orphans(session: Session, versions_dir: Path, own_run: int | None = None) -> None:
    """Delete partial writes, and version directories no database row knows unless a live run
    other than `own_run` (which has written nothing yet) wrote them: a crash's leftovers."""
    # Partials cannot name their run; only the one live round calls this, before it writes, so
    # every partial is a run's that is no longer live.
    for partial in remove_partials(versions_dir):
        log.warning("removed the partial version directory %s", partial)
    if not versions_dir.is_dir():
        return
    # Known by its directory's name, not its whole path, so that a data directory moved since
    # (or mounted elsewhere) keeps its versions; older versions' directories are their names.
    known = set()
    for name, path in session.execute(select(ModelVersion.name, ModelVersion.path)):
        known |= {name, Path(path).name}
    live = set(session.scalars(select(TrainingRun.id).where(TrainingRun.status.in_(LIVE_STATUSES))))
    for directory in versions_dir.iterdir():
        if not directory.is_dir() or directory.name in known:
            continue
        writer = _writer(directory)
        if writer in live and writer != own_run:
            log.info("kept %s: live training run %s is publishing it", directory, writer)
            continue
        log.warning("removed %s: no model version refers to it", directory)
        shutil.rmtree(directory, ignore_errors=True)


def _writer(directory: Path) -> int | None:
    """The training run a version directory's manifest names, if any."""
    try:
        run = read_manifest(directory).get("training_run")
    except (CorruptCheckpoint, OSError):
        return None
    return run if isinstance(run, int) else None
