"""ORM tables. Importing this package registers every table on `Base.metadata`."""

from app.models.api_key import ApiKey, Role
from app.models.evaluation import Evaluation
from app.models.feedback import Comparison, Feedback, Thumbs, Winner
from app.models.generation import Generation, Task
from app.models.idempotency import IdempotencyRecord
from app.models.model_version import ModelVersion, VersionKind, VersionStatus
from app.models.training_run import RunStatus, TrainingRun

__all__ = [
    "ApiKey",
    "Comparison",
    "Evaluation",
    "Feedback",
    "Generation",
    "IdempotencyRecord",
    "ModelVersion",
    "Role",
    "RunStatus",
    "Task",
    "Thumbs",
    "TrainingRun",
    "VersionKind",
    "VersionStatus",
    "Winner",
]
