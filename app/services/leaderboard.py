"""Bradley-Terry strengths from pairwise outcomes, with percentile-bootstrap intervals (numpy only).

The model: P(i beats j) = sigmoid(theta_i - theta_j), a tie counting half a win for each side. It
is fitted by Newton's method on the log posterior with a Gaussian (L2) prior on theta; the prior
keeps the optimum unique and finite even for a player that never loses, and makes
sum(theta) = 0 there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

PRIOR = 1.0
"""L2 precision on theta (natural-log odds): a prior standard deviation of 1, so a few unanimous
comparisons move a version by a few hundred points, not by a thousand; a few hundred comparisons
outweigh it."""

ELO_PER_NAT = 400 / math.log(10)
"""Score points per unit of theta: 400 * log10(strength) with strength = exp(theta)."""

SEED = 20240601
"""Fixed bootstrap seed: the same comparisons always give the same intervals."""

_MAX_ITER = 200
_TOL = 1e-9
_MAX_HALVINGS = 40
_BATCH_ELEMENTS = 2_000_000
"""Bound on samples * players**2 per bootstrap batch, to keep memory small."""


@dataclass(frozen=True)
class Outcomes:
    """Distinct outcomes and how often each happened.

    Category k: `count[k]` times, player `first[k]` met player `second[k]` and scored
    `result[k]` (1.0 a win, 0.0 a loss, 0.5 a tie).
    """

    first: IntArray
    second: IntArray
    result: FloatArray
    count: FloatArray
    players: int

    def wins(self, counts: FloatArray | None = None) -> FloatArray:
        """Win matrices W[..., i, j] (i's wins over j) for counts shaped (..., categories)."""
        counts = self.count if counts is None else np.asarray(counts, dtype=np.float64)
        n = self.players
        batch = counts.shape[:-1]
        flat = counts.reshape(-1, counts.shape[-1])
        offsets = (np.arange(flat.shape[0]) * n * n)[:, None]
        # Each category adds its wins to (first, second) and its losses to (second, first).
        index = np.concatenate(
            [offsets + self.first * n + self.second, offsets + self.second * n + self.first],
            axis=1,
        )
        weights = np.concatenate([flat * self.result, flat * (1.0 - self.result)], axis=1)
        total = np.bincount(index.ravel(), weights.ravel(), minlength=flat.shape[0] * n * n)
        matrices: FloatArray = total.astype(np.float64).reshape(*batch, n, n)
        return matrices


def log_posterior(theta: FloatArray, wins: FloatArray, prior: float = PRIOR) -> FloatArray:
    """The log posterior (up to a constant) of theta shaped (..., n) given wins (..., n, n)."""
    diff = theta[..., :, None] - theta[..., None, :]
    log_p = -np.logaddexp(0.0, -diff)
    value: FloatArray = (wins * log_p).sum(axis=(-2, -1)) - 0.5 * prior * (theta**2).sum(-1)
    return value


def fit(wins: FloatArray, prior: float = PRIOR) -> FloatArray:
    """Bradley-Terry theta (natural log of strength) for win matrices shaped (..., n, n)."""
    wins = np.asarray(wins, dtype=np.float64)
    games = wins + np.swapaxes(wins, -1, -2)
    theta = np.zeros(wins.shape[:-1])
    eye = np.eye(wins.shape[-1])
    current = log_posterior(theta, wins, prior)
    for _ in range(_MAX_ITER):
        p = 1.0 / (1.0 + np.exp(theta[..., None, :] - theta[..., :, None]))
        gradient = (wins - games * p).sum(-1) - prior * theta
        weight = games * p * (1.0 - p)
        # The negative Hessian is a weighted graph Laplacian plus the prior: positive definite.
        hessian = eye * (weight.sum(-1)[..., None] + prior) - weight
        step = np.linalg.solve(hessian, gradient[..., None])[..., 0]
        # Newton can overshoot when a player nearly always wins: halve the step, per problem,
        # until the posterior does not fall.
        scale = np.ones(theta.shape[:-1])
        candidate = theta + step
        value = log_posterior(candidate, wins, prior)
        slack = 1e-12 * (1.0 + np.abs(current))
        for _ in range(_MAX_HALVINGS):
            worse = value < current - slack
            if not worse.any():
                break
            scale = np.where(worse, scale / 2, scale)
            candidate = theta + scale[..., None] * step
            value = log_posterior(candidate, wins, prior)
        else:
            candidate = np.where(worse[..., None], theta, candidate)
            value = np.where(worse, current, value)
        moved = float(np.abs(candidate - theta).max(initial=0.0))
        theta, current = candidate, value
        if moved < _TOL:
            break
    return theta


def scores(theta: FloatArray) -> FloatArray:
    """Elo-like scores: 400 * log10(strength), shifted so that the mean over players is 1000."""
    elo = theta * ELO_PER_NAT
    shifted: FloatArray = elo - elo.mean(-1, keepdims=True) + 1000.0
    return shifted


def bootstrap_scores(outcomes: Outcomes, samples: int, seed: int = SEED) -> FloatArray:
    """Scores of `samples` refits, each on the comparisons resampled with replacement.

    Resampling N comparisons with replacement is a multinomial draw over the distinct outcome
    categories, so the cost does not grow with the number of comparisons.
    """
    rng = np.random.default_rng(seed)
    total = int(outcomes.count.sum())
    if samples <= 0 or total == 0:
        return np.zeros((0, outcomes.players))
    draws = rng.multinomial(total, outcomes.count / total, size=samples).astype(np.float64)
    batch = max(1, _BATCH_ELEMENTS // outcomes.players**2)
    parts = [
        scores(fit(outcomes.wins(draws[start : start + batch])))
        for start in range(0, samples, batch)
    ]
    return np.concatenate(parts)
