"""A batch's KV cache: buffers per layer, grown by doubling, room made a layer at a time."""

from __future__ import annotations

import torch

ROW_SLACK = 4
"""A KV cache that grows to hold n rows makes room for n // ROW_SLACK more (few copies as
requests join, at most a quarter more memory than its rows need)."""
ROOM = 64
"""Columns a cache keeps beyond the most its rows can reach, so that moving its used columns to
the front happens once every ROOM steps at most."""


def _rows_for(rows: int) -> int:
    return rows + rows // ROW_SLACK


class KVCache:
    """Keys and values of a batch's rows, per layer, in buffers of `dtype` (float32, or
    bfloat16 where the CPU computes it natively: see KV_CACHE_DTYPE).

    Buffers are [row capacity, kv heads, column capacity, head dim]. Row r holds its tokens in
    columns `start[r]` to `length - 1`; the columns before are masked. Every row's latest token
    is in column `length - 1`, so a decode step writes each row's next token in column
    `length`. Buffers start zeroed, so masked columns never hold NaN (0 x NaN would leak into
    attention).

    Each row says how many columns it can ever use (`reach`: its prompt plus its most new
    tokens). Columns grow by doubling up to the largest reach plus ROOM, rows by ROW_SLACK, so
    `footprint` bounds the memory a batch can take before a request joins it; buffers shrink
    again when the rows that needed them leave.
    """

    def __init__(
        self, layers: int, kv_heads: int, head_dim: int, limit: int,
        dtype: torch.dtype = torch.float32,
    ) -> None:  # fmt: skip
        self.shape = (layers, kv_heads, head_dim)
        self.dtype = dtype
        self.limit = limit
        """Columns never grow past this (the model's context: no row needs more)."""
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.start = torch.zeros(0, dtype=torch.long)
        self.reach: list[int] = []
        """Per row, the most columns it can ever use."""
        self.length = 0

    @property
    def rows(self) -> int:
        """Rows in the batch."""
        return int(self.start.shape[0])

    @property
    def first(self) -> int:
        """The first column any row uses; attention reads from here."""
        return int(self.start.min()) if self.rows else self.length

    @property
    def bytes_per_column(self) -> int:
        """Bytes one row's keys and values take per token, all layers together."""
        layers, kv_heads, head_dim = self.shape
        return 2 * layers * kv_heads * head_dim * self.dtype.itemsize

    def _capacity(self) -> tuple[int, int]:
        return (self.keys[0].shape[0], self.keys[0].shape[2]) if self.keys else (0, 0)

    def _column_cap(self, reach: list[int]) -> int:
        return min(self.limit, max(reach, default=0) + ROOM)

    def footprint(self, reach: list[int] | None = None) -> int:
        """The most bytes this cache can take with its rows, plus new rows of these reaches."""
        all_reach = [*self.reach, *(reach or [])]
        row_cap, col_cap = self._capacity()
        rows = max(row_cap, _rows_for(len(all_reach)))
        columns = max(col_cap, self._column_cap(all_reach)) if all_reach else col_cap
        return rows * columns * self.bytes_per_column

    def _grown(self, rows: int, columns: int, reach: list[int]) -> tuple[int, int] | None:
        """The buffers' size for `rows` rows and `columns` more columns (`reach`: the new rows'
        reaches), or None where they already have room."""
        row_cap, col_cap = self._capacity()
        used = self.length - self.first
        if rows <= row_cap and self.length + columns <= col_cap:
            return None
        cap = self._column_cap([*self.reach, *reach])
        doubled = max(2 * col_cap if used + columns > col_cap else col_cap, 64)
        return max(row_cap, _rows_for(rows)), max(used + columns, min(doubled, max(cap, col_cap)))

    def make_room(self, rows: int, columns: int, reach: list[int] | None = None) -> None:
        """Capacity for `rows` rows and `columns` more columns (`reach`: the new rows' reaches
        when rows are added); growing or compacting moves the used columns to the front (so
        `start` and `length` change)."""
        size = self._grown(rows, columns, reach or [])
        if size is not None:
            self._resize(*size)

    def _resize(self, new_rows: int, new_cols: int) -> None:
        """Buffers of this size holding the used columns at the front, one layer at a time (so
        a resize never holds two copies of the whole cache)."""
        Room(self, new_rows, new_cols, 0).make()

    def room(self, rows: int, span: int, reach: list[int]) -> Room:
        """Room for new rows (of these reaches) up to `rows` in all whose tokens span `span`
        columns ending where the batch's rows end: the buffers grow, or the rows' tokens move
        right, once `Room.make` (or each layer's `Room.layer`) has run."""
        used = self.length - self.first
        size = self._grown(rows, max(0, span - used), reach)
        if size is None:
            return Room(self, *self._capacity(), self.first + max(0, span - self.length))
        return Room(self, *size, max(0, span - used))

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows, in this order; buffers shrink when the rest need much less."""
        if not rows:
            self.keys, self.values, self.reach = [], [], []
            self.start, self.length = torch.zeros(0, dtype=torch.long), 0
            return
        if rows != list(range(len(rows))):
            first, index = self.first, torch.tensor(rows)
            for buffer in (*self.keys, *self.values):
                buffer[: len(rows), :, first : self.length] = buffer[index, :, first : self.length]
        self.start = self.start[rows]
        self.reach = [self.reach[i] for i in rows]
        row_cap, col_cap = self._capacity()
        need_rows, need_cols = _rows_for(len(rows)), self._column_cap(self.reach)
        if row_cap > 2 * need_rows or col_cap > 2 * need_cols:
            self._resize(need_rows, max(need_cols, self.length - self.first))


class Room:
    """A cache's buffers at a new size, with its rows' used columns moved to start at column
    `to`, made a layer at a time (`layer`, so that the copies can go between other work) or
    whole (`make`). Until every layer is made, nothing else may read or change the cache."""

    def __init__(self, cache: KVCache, rows: int, columns: int, to: int) -> None:
        self.cache, self.size, self.to = cache, (rows, columns), to
        self._from = (cache.first, cache.length)
        self._made: set[int] = set()
        self.length = to + cache.length - cache.first
        """The cache's `length` once made: where its rows' tokens end."""

    def layer(self, index: int) -> None:
        """Make one layer's buffers (keys and values); once every layer is made, the cache's
        `start` and `length` say where its rows are."""
        cache, (first, length) = self.cache, self._from
        if index in self._made:
            return
        n, used = cache.rows, length - first
        layers, kv_heads, head_dim = cache.shape
        if not cache.keys:
            cache.keys, cache.values = [torch.empty(0)] * layers, [torch.empty(0)] * layers
        for buffers in (cache.keys, cache.values):
            buffer = buffers[index]
            if tuple(buffer.shape[::2]) != self.size:
                # Made during a forward pass too: a normal tensor, which later steps may change.
                with torch.inference_mode(False):
                    grown = torch.zeros(
                        self.size[0], kv_heads, self.size[1], head_dim, dtype=cache.dtype
                    )
                if n:
                    grown[:n, :, self.to : self.to + used] = buffer[:n, :, first:length]
                buffers[index] = grown
            elif self.to != first:
                buffer[:n, :, self.to : self.to + used] = buffer[:n, :, first:length].clone()
        self._made.add(index)
        if len(self._made) == layers:
            cache.start = cache.start - first + self.to
            cache.length = self.length

    def make(self) -> None:
        """Make every layer not made yet."""
        for index in range(self.cache.shape[0]):
            self.layer(index)
