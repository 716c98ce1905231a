"""The data of one round: unused ratings, capped per rater, split by time into train/held-out."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from app.services.datasets import KtoRow, PairRow, kto_rows, pair_rows

Item = KtoRow | PairRow


@dataclass
class RoundData:
    """Training and held-out rows of one round, and how many of each."""

    train_kto: list[KtoRow] = field(default_factory=list)
    train_pairs: list[PairRow] = field(default_factory=list)
    heldout_kto: list[KtoRow] = field(default_factory=list)
    heldout_pairs: list[PairRow] = field(default_factory=list)
    dropped_by_rater_cap: int = 0

    @property
    def train_size(self) -> int:
        """Rows the round trains on."""
        return len(self.train_kto) + len(self.train_pairs)

    def used_ids(self) -> tuple[set[int], set[int]]:
        """(feedback ids, comparison ids) the round trains on; held-out rows stay unused."""
        feedback = {row.feedback_id for row in self.train_kto}
        feedback |= {row.source_id for row in self.train_pairs if row.source == "correction"}
        comparisons = {row.source_id for row in self.train_pairs if row.source == "comparison"}
        return feedback, comparisons

    def counts(self) -> dict[str, Any]:
        """Counts recorded on the run."""
        return {
            "train_kto": len(self.train_kto),
            "train_kto_desirable": sum(row.label for row in self.train_kto),
            "train_pairs": len(self.train_pairs),
            "heldout_kto": len(self.heldout_kto),
            "heldout_pairs": len(self.heldout_pairs),
            "dropped_by_rater_cap": self.dropped_by_rater_cap,
        }


def build_round_data(session: Session, max_per_rater: int, holdout_fraction: float) -> RoundData:
    """Collect the ratings no earlier round used, keep each rater's newest `max_per_rater`, and
    hold out the newest `holdout_fraction` for the gate (time order, so it measures the future)."""
    items: list[Item] = [
        *kto_rows(session, unused_only=True),
        *pair_rows(session, unused_only=True),
    ]
    by_rater: dict[int, list[Item]] = defaultdict(list)
    for item in items:
        by_rater[item.rater_id].append(item)
    kept: list[Item] = []
    data = RoundData()
    for rater_items in by_rater.values():
        rater_items.sort(key=lambda item: item.created_at)
        kept += rater_items[-max_per_rater:]
        data.dropped_by_rater_cap += max(0, len(rater_items) - max_per_rater)
    kept.sort(key=lambda item: item.created_at)
    holdout = math.ceil(len(kept) * holdout_fraction) if len(kept) >= 2 else 0
    split = len(kept) - holdout
    for index, item in enumerate(kept):
        heldout = index >= split
        if isinstance(item, KtoRow):
            (data.heldout_kto if heldout else data.train_kto).append(item)
        else:
            (data.heldout_pairs if heldout else data.train_pairs).append(item)
    return data
