"""Choosing each row's next token: temperature, top-p over a few candidates, its own generator."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from app.engine.batch import Row

CANDIDATES = 256
"""Tokens first sorted per row for top-p; rows whose nucleus is wider get 8 times more, and so
on up to the whole vocabulary."""


def _sample(logits: torch.Tensor, rows: list[Row]) -> list[int]:
    """One token per row, with each row's temperature, top-p and generator (greedy at 0)."""
    # A copy (worked on in place below) in fp32: bf16's argmax and softmax are several times
    # slower on CPU.
    logits = logits.to(torch.float32, copy=True)
    sampling = [i for i, row in enumerate(rows) if row.stream.params.temperature > 0]
    picked = torch.zeros(len(rows), dtype=torch.long)
    if len(sampling) < len(rows):
        picked = logits.argmax(dim=-1)
    if not sampling:
        return [int(t) for t in picked]
    index = torch.tensor(sampling)
    temperature = torch.tensor([rows[i].stream.params.temperature for i in sampling])
    top_p = torch.tensor([rows[i].stream.params.top_p for i in sampling])
    chosen_logits = logits if len(sampling) == len(rows) else logits[index]
    probs = torch.softmax(chosen_logits.div_(temperature[:, None]), dim=-1)
    # One uniform draw per row from its own generator, so a seeded row's tokens do not depend
    # on the rows beside it; the token is where the draw falls in the row's nucleus.
    draws = torch.stack([torch.rand((), generator=rows[i].generator) for i in sampling])
    chosen = torch.empty(len(sampling), dtype=torch.long)
    # top_p 1 (OpenAI's default) is the whole distribution: no nucleus to find, nothing to sort.
    whole = top_p >= 1.0
    if bool(whole.any()):
        cumulative = probs[whole].cumsum(dim=-1)
        threshold = draws[whole][:, None] * cumulative[:, -1:]
        choice = torch.searchsorted(cumulative, threshold, right=True)
        chosen[whole] = choice.clamp(max=probs.shape[-1] - 1).squeeze(1)
    # Sorting the whole vocabulary for every row costs more than the rest of a step; the
    # nucleus almost always lies in the most likely few hundred tokens. Rows whose candidates
    # do not hold their top_p mass get 8 times more, alone, so one flat distribution does not
    # widen the whole batch; the result stays exactly top-p.
    pending, k = torch.arange(len(sampling))[~whole], CANDIDATES
    while pending.numel():
        k = min(k, probs.shape[-1])
        candidates, order = probs[pending].topk(k, dim=-1)
        covered = candidates.sum(dim=-1) >= top_p[pending]
        if k == probs.shape[-1]:
            covered[:] = True
        done = pending[covered]
        chosen[done] = _draw(candidates[covered], order[covered], top_p[done], draws[done])
        pending, k = pending[~covered], 8 * k
    picked[index] = chosen
    return [int(t) for t in picked]


def _draw(
    candidates: torch.Tensor, order: torch.Tensor, top_p: torch.Tensor, draws: torch.Tensor
) -> torch.Tensor:
    """The token where each row's draw falls in its nucleus: the smallest prefix of its
    candidates (most likely first) whose mass reaches top_p, always at least one token."""
    outside = candidates.cumsum(dim=-1) - candidates > top_p[:, None]
    cumulative = candidates.masked_fill(outside, 0.0).cumsum(dim=-1)
    threshold = (draws * cumulative[:, -1])[:, None]
    choice = torch.searchsorted(cumulative, threshold, right=True)
    choice = choice.clamp(max=candidates.shape[-1] - 1)
    return order.gather(1, choice).squeeze(1)
