"""The data of one round: unused ratings from raters in good standing, capped per rater, split by
time into train/held-out.

Poisoning defences, in order: ratings from revoked keys are left out; a rater who often votes
against the majority of the other raters of the same generations (the consensus rule below) is
left out; each remaining rater keeps their newest `TRAINING_MAX_PER_RATER`; and no rater may hold
more than `TRAINING_MAX_RATER_SHARE` of a round that others rated too.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import ApiKey, Comparison, Feedback, Winner
from app.services.datasets import KtoRow, PairRow, desirability, kto_rows, pair_rows

Item = KtoRow | PairRow
Vote = tuple[Hashable, int, Hashable]
"""(what was rated, rater id, the rater's label)."""


@dataclass(frozen=True)
class Agreement:
    """How one rater's labels compare with the majority of the other raters of the same items."""

    tested: int
    """Items with at least `min_others` other raters whose majority was not a tie."""
    disagreed: int
    """Of those, the items where the rater voted against that majority."""


@dataclass
class RoundData:
    """Training and held-out rows of one round, and how many of each."""

    train_kto: list[KtoRow] = field(default_factory=list)
    train_pairs: list[PairRow] = field(default_factory=list)
    heldout_kto: list[KtoRow] = field(default_factory=list)
    heldout_pairs: list[PairRow] = field(default_factory=list)
    dropped_by_rater_cap: int = 0
    dropped_by_rater_share: int = 0
    dropped_revoked: int = 0
    dropped_by_consensus: int = 0
    revoked_raters: list[int] = field(default_factory=list)
    """Raters whose unused ratings were left out because their key is revoked."""
    dissenting_raters: dict[int, Agreement] = field(default_factory=dict)
    """Raters left out by the consensus rule, with the figures that decided it."""

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
        """Counts recorded on the run, with the raters left out and why."""
        return {
            "train_kto": len(self.train_kto),
            "train_kto_desirable": sum(row.label for row in self.train_kto),
            "train_pairs": len(self.train_pairs),
            "heldout_kto": len(self.heldout_kto),
            "heldout_pairs": len(self.heldout_pairs),
            "dropped_by_rater_cap": self.dropped_by_rater_cap,
            "dropped_by_rater_share": self.dropped_by_rater_share,
            "dropped_revoked": self.dropped_revoked,
            "dropped_by_consensus": self.dropped_by_consensus,
            "excluded_raters": {
                "revoked": self.revoked_raters,
                "consensus": sorted(self.dissenting_raters),
            },
            # JSON object keys are strings; the figures show why each rater was left out.
            "consensus": {
                str(rater): {"tested": agreement.tested, "disagreed": agreement.disagreed}
                for rater, agreement in sorted(self.dissenting_raters.items())
            },
        }


def build_round_data(session: Session, settings: Settings) -> RoundData:
    """Collect the ratings no earlier round used, leave out revoked keys and dissenting raters,
    cap each rater, and hold out the newest share for the gate (time order, so it measures the
    future)."""
    revoked = set(session.scalars(select(ApiKey.id).where(ApiKey.revoked_at.is_not(None))))
    agreements = agreement(_votes(session), settings.training_consensus_min_others)
    dissenting = {
        rater: figures
        for rater, figures in agreements.items()
        if figures.tested >= settings.training_consensus_min_items
        and figures.disagreed > settings.training_consensus_max_disagreement * figures.tested
    }
    data = RoundData()
    by_rater: dict[int, list[Item]] = defaultdict(list)
    revoked_seen: set[int] = set()
    items: list[Item] = [
        *kto_rows(session, unused_only=True),
        *pair_rows(session, unused_only=True),
    ]
    for item in items:
        if item.rater_id in revoked:
            data.dropped_revoked += 1
            revoked_seen.add(item.rater_id)
        elif item.rater_id in dissenting:
            data.dropped_by_consensus += 1
            data.dissenting_raters[item.rater_id] = dissenting[item.rater_id]
        else:
            by_rater[item.rater_id].append(item)
    data.revoked_raters = sorted(revoked_seen)
    for rater_items in by_rater.values():
        rater_items.sort(key=lambda item: item.created_at)
        data.dropped_by_rater_cap += max(0, len(rater_items) - settings.training_max_per_rater)
        del rater_items[: -settings.training_max_per_rater]
    data.dropped_by_rater_share = _cap_share(by_rater, settings.training_max_rater_share)
    kept = sorted(
        (item for rater_items in by_rater.values() for item in rater_items),
        key=lambda item: item.created_at,
    )
    holdout = math.ceil(len(kept) * settings.training_holdout_fraction) if len(kept) >= 2 else 0
    split = len(kept) - holdout
    for index, item in enumerate(kept):
        heldout = index >= split
        if isinstance(item, KtoRow):
            (data.heldout_kto if heldout else data.train_kto).append(item)
        else:
            (data.heldout_pairs if heldout else data.train_pairs).append(item)
    return data


def agreement(votes: Iterable[Vote], min_others: int) -> dict[int, Agreement]:
    """Per rater, the items that at least `min_others` other raters labelled with a clear majority
    (ties say nothing), and how many of those the rater labelled against that majority."""
    labels: dict[Hashable, dict[int, Hashable]] = defaultdict(dict)
    for item, rater, label in votes:
        labels[item][rater] = label
    tested: Counter[int] = Counter()
    disagreed: Counter[int] = Counter()
    for by_rater in labels.values():
        others = len(by_rater) - 1
        if others < min_others:
            continue
        tally = Counter(by_rater.values())
        for rater, label in by_rater.items():
            agreeing = tally[label] - 1
            # Labels are binary (desirable or not; this or that side wins): the rest are against.
            against = others - agreeing
            if agreeing != against:
                tested[rater] += 1
                disagreed[rater] += against > agreeing
    return {rater: Agreement(tested[rater], disagreed[rater]) for rater in tested}


def _votes(session: Session) -> Iterator[Vote]:
    """Every rating from a key in good standing, used or not: the more history, the surer the
    rule. Thumbs/stars label a generation; a comparison's winner labels the unordered pair.
    Corrections are free text that nobody else writes the same, so they vote on nothing."""
    active = select(ApiKey.id).where(ApiKey.revoked_at.is_(None))
    feedback = select(Feedback.generation_id, Feedback.api_key_id, Feedback.thumbs, Feedback.stars)
    for generation_id, rater, thumbs, stars in session.execute(
        feedback.where(Feedback.api_key_id.in_(active))
    ):
        label = desirability(thumbs, stars)
        if label is not None:
            yield ("generation", generation_id), rater, label
    comparisons = select(
        Comparison.low_generation_id,
        Comparison.high_generation_id,
        Comparison.generation_a_id,
        Comparison.generation_b_id,
        Comparison.winner,
        Comparison.api_key_id,
    ).where(Comparison.winner != Winner.tie, Comparison.api_key_id.in_(active))
    for low, high, side_a, side_b, winner, rater in session.execute(comparisons):
        yield ("pair", low, high), rater, side_a if winner is Winner.a else side_b


def _cap_share(by_rater: dict[int, list[Item]], share: float) -> int:
    """Trim the largest rater to `share` of the round (their newest kept) when others rated too;
    return the rows dropped. With share >= 0.5 only the largest can exceed it, and trimming it
    leaves every other rater's share at most 1 - share <= share."""
    if share >= 1 or len(by_rater) < 2:
        return 0
    top = max(by_rater, key=lambda rater: len(by_rater[rater]))
    others = sum(len(rows) for rows in by_rater.values()) - len(by_rater[top])
    # The epsilon keeps float rounding (0.6 / 0.4 = 1.4999...) from costing a row.
    limit = math.floor(others * share / (1 - share) + 1e-9)
    dropped = max(0, len(by_rater[top]) - limit)
    del by_rater[top][:dropped]
    return dropped
