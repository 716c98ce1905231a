"""Prompts' keys and values: recent ones kept for reuse (the prefix store), long ones in chunks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

PREFIX_CACHE_BYTES = 128 * 2**20
"""Memory per version for the keys and values of recent prompts (about 2,800 tokens of the
default model's)."""
MIN_REUSE = 8
"""Fewest prompt tokens worth taking from the prefix store instead of computing."""


@dataclass(eq=False)
class Prefix:
    """A prompt's keys and values, [layers, kv heads, tokens, head dim] each."""

    tokens: list[int]
    keys: torch.Tensor
    values: torch.Tensor


@dataclass(eq=False)
class Partial:
    """A long prompt being prefilled a chunk at a time: the keys and values of its first
    `done` tokens, [layers, kv heads, tokens, head dim] each (room for all but its last)."""

    prompt: torch.Tensor
    reach: int
    keys: torch.Tensor
    values: torch.Tensor
    done: int = 0

    @property
    def left(self) -> int:
        """Tokens still to compute."""
        return len(self.prompt) - self.done

    @property
    def nbytes(self) -> int:
        """Bytes its keys and values take."""
        return self.keys.nbytes + self.values.nbytes


def shared_start(a: list[int], b: list[int]) -> int:
    """How many tokens two sequences share from their start."""
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


class PrefixStore:
    """The keys and values of recent prompts, so that a prompt starting like one of them (the
    chat template's system prompt, an earlier turn of the conversation, the same prompt again)
    computes only the rest. Least recently used first out, within a budget of tokens.

    A key or value depends only on the tokens up to it, so a stored one is what prefilling would
    compute again, up to the order of floating-point sums.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        """Most tokens held."""
        self._entries: list[Prefix] = []  # least recently used first
        self.tokens = 0

    def longest(self, prompt: list[int]) -> tuple[Prefix | None, int]:
        """The stored prompt sharing the longest start with `prompt`, and how many tokens they
        share (fewer than the whole prompt: its last token is always computed)."""
        best, shared = None, 0
        for entry in self._entries:
            n = shared_start(entry.tokens, prompt[:-1])
            if n > shared:
                best, shared = entry, n
        if best is None or shared < MIN_REUSE:
            return None, 0
        self._entries.remove(best)
        self._entries.append(best)
        return best, shared

    def add(self, prompt: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep a prompt's keys and values, dropping stored prompts it starts with."""
        if len(prompt) > self.budget:
            return
        for entry in list(self._entries):
            if entry.tokens == prompt[: len(entry.tokens)]:
                self._entries.remove(entry)
                self.tokens -= len(entry.tokens)
        self._entries.append(Prefix(prompt, keys, values))
        self.tokens += len(prompt)
        while self.tokens > self.budget:
            self.tokens -= len(self._entries.pop(0).tokens)

    def covers(self, prompt: list[int]) -> bool:
        """Whether a stored prompt starts with all of `prompt`."""
        return any(e.tokens[: len(prompt)] == prompt for e in self._entries)
