"""Which ratings the batch being computed on holds. Training and the gate report each batch of
ratings before they compute on it, and report None once it is done; a round that fails (or is
declared lost) meanwhile charges a failure to those ratings only, and one that fails outside any
batch (loading a model, the gate's fixed prompts, publishing, the database) charges none."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from app.services.datasets import KtoRow, PairRow

RatingIds = dict[str, list[int]]
"""Feedback and comparison ids, under `feedback` and `comparisons` (as on the run)."""

OnBatch = Callable[[RatingIds | None], None]
"""Told the ratings of a batch before it is computed on, and None once it is done; it may
raise (`RoundLost`) to stop the round."""


def no_batches(ratings: RatingIds | None) -> None:
    """An `OnBatch` that records nothing."""


def ratings_of(rows: Iterable[KtoRow | PairRow]) -> RatingIds:
    """The ratings `rows` come from: a KTO row's feedback, a pair's comparison or correction."""
    feedback: set[int] = set()
    comparisons: set[int] = set()
    for row in rows:
        if isinstance(row, KtoRow):
            feedback.add(row.feedback_id)
        elif row.source == "comparison":
            comparisons.add(row.source_id)
        else:
            feedback.add(row.source_id)
    return {"feedback": sorted(feedback), "comparisons": sorted(comparisons)}
