"""A static KV cache: per-layer buffers written at index positions, read over a fixed span (gpt-fast style)."""

from __future__ import annotations

import torch

from offspec.transformers_contract import CacheProtocol

SPAN_BUCKET = 256  # attention reads the cache in spans of this many slots; the mask hides the unused ones


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one cached position takes: keys and values of every layer."""
    return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize


def layout_bytes_per_token(layout, dtype: torch.dtype) -> int:
    """Bytes one cached position takes under a per-layer layout ((key heads, key dim, value heads, value dim) or
    None for a layer that writes nothing)."""
    return sum((kh * kd + vh * vd) * dtype.itemsize for kh, kd, vh, vd in (g for g in layout if g is not None))


class StaticKVCache(CacheProtocol):
    """Per-layer key/value buffers [1, H_kv, capacity, D]; `length` slots are committed.

    A forward first calls `begin(position_ids)`: the T new tokens will be written at slots
    [length, length + T) (an index tensor on the cache's device), their positions are recorded in
    `positions` (windowed masks need them), and `span` slots are read back by attention: a multiple of
    SPAN_BUCKET, or the whole capacity when `static` (fixed shapes for graph capture). transformers'
    attention modules then call `update(k, v, layer_idx)`; the model calls `advance(T)` at the end.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", static: bool = False,
                 layout: tuple | None = None) -> None:
        """layout: per layer (key heads, key dim, value heads, value dim), or None for a layer that writes no KV
        (it reuses another's); by default every layer has num_kv_heads x head_dim keys and values."""
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        uniform = ((num_kv_heads, head_dim, num_kv_heads, head_dim),) * num_layers
        self.layout = tuple(layout) if layout is not None else uniform
        self.dtype, self.device, self.static = dtype, torch.device(device), static
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)  # [capacity] position of each slot
        self.length = 0
        self.span = 0
        self._write_idx = torch.zeros(0, dtype=torch.long, device=self.device)
        self._reserve(capacity)

    @classmethod
    def for_layout(cls, layout, capacity: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                   static: bool = False) -> StaticKVCache:
        """A cache for a per-layer layout (models.registry.kv_layout)."""
        first = next((g for g in layout if g is not None), (1, 1, 1, 1))
        return cls(len(layout), first[0], first[1], capacity, dtype, device, static, layout)

    @property
    def bytes_per_token(self) -> int:
        return layout_bytes_per_token(self.layout, self.dtype)

    @property
    def nbytes(self) -> int:
        return self.bytes_per_token * self.capacity

    @torch.inference_mode(False)
    def _reserve(self, capacity: int) -> None:
        """Grow the buffers to hold `capacity` positions (copies only when growing)."""
        if capacity <= self.capacity:
            return
        def buf(heads: int, dim: int) -> torch.Tensor:
            return torch.zeros((1, heads, capacity, dim), dtype=self.dtype, device=self.device)

        keys = [buf(g[0], g[1]) if g else None for g in self.layout]
        values = [buf(g[2], g[3]) if g else None for g in self.layout]
        for old, new in zip(self.keys + self.values, keys + values):
            if new is not None:
                new[:, :, : self.length].copy_(old[:, :, : self.length])
        positions = torch.zeros(capacity, dtype=torch.long, device=self.device)
        positions[: self.length].copy_(self.positions[: self.length])
        self.keys, self.values, self.positions, self.capacity = keys, values, positions, capacity

    def ensure(self, extra: int) -> None:
        """Make room for `extra` more positions, growing geometrically."""
        need = self.length + extra
        if need > self.capacity:
            self._reserve(max(need, int(self.capacity * 1.5) + 64))

    def span_for(self, end: int) -> int:
        """Slots attention reads when `end` are filled: the capacity (static), else `end` rounded up to a bucket."""
        if self.static:
            return self.capacity
        return min(self.capacity, -(-end // SPAN_BUCKET) * SPAN_BUCKET)

    def begin(self, position_ids: torch.Tensor) -> int:
        """Prepare a forward of position_ids [1, T] (on the cache's device); returns the span it will read."""
        t = position_ids.shape[-1]
        self.ensure(t)
        self._write_idx = torch.arange(self.length, self.length + t, device=self.device)
        self.positions[self.length : self.length + t].copy_(position_ids.reshape(-1))
        self.span = self.span_for(self.length + t)
        return self.span

    # --- the transformers Cache protocol used by attention modules (update -> write) ---
    def write(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.keys[layer_idx], self.values[layer_idx]  # [1, H_kv, capacity, D]
        k.index_copy_(2, self._write_idx, key_states)  # key_states: [1, H_kv, T, D]
        v.index_copy_(2, self._write_idx, value_states)
        return k[:, :, : self.span], v[:, :, : self.span]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    # --- bookkeeping used by the runtime and the speculative engine ---
    def advance(self, t: int) -> None:
        self.length += t

    def crop(self, length: int) -> None:
        """Drop every position >= length."""
        self.length = max(0, min(length, self.length))

    @torch.inference_mode()
    def keep(self, start: int, indices: torch.Tensor) -> None:
        """Keep slots start + indices (ascending) among those >= start, compacted in place to start..start+K-1.

        Indices given on the host are checked there for the common already-compact case; indices on the
        device are used as they are (no host sync)."""
        k_len = int(indices.numel())
        if k_len and indices.device.type == "cpu" and torch.equal(indices, torch.arange(k_len, dtype=indices.dtype)):
            self.length = start + k_len
            return
        if k_len:
            src = indices.to(device=self.device, dtype=torch.long) + start
            for buf in self.keys + self.values:
                if buf is not None:
                    buf[:, :, start : start + k_len].copy_(buf.index_select(2, src))
            self.positions[start : start + k_len].copy_(self.positions.index_select(0, src))
        self.length = start + k_len

    def reset(self) -> None:
        self.length = 0


class BatchKVCache(CacheProtocol):
    """Key/value buffers of several sequences, one row each: [rows, H_kv, capacity + 1, D].

    Row r holds `lengths[r]` committed slots. A batched forward runs over some rows (`begin(rows, counts,
    position_ids)`): row rows[i]'s counts[i] new tokens are written at its slots [length, length + count);
    the padding positions of shorter rows all go to the last slot (scratch, never read unmasked or kept).
    Attention reads `span` slots of those rows: a view when the rows are 0..n-1, a gathered copy otherwise.
    Nothing is shared between rows: each sequence's keys, positions, `keep` and `crop` are its own.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, rows: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", layout: tuple | None = None) -> None:
        """layout: per layer (key heads, key dim, value heads, value dim) or None, as in StaticKVCache."""
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.rows, self.capacity, self.dtype, self.device = rows, capacity, dtype, torch.device(device)
        uniform = ((num_kv_heads, head_dim, num_kv_heads, head_dim),) * num_layers
        self.layout = tuple(layout) if layout is not None else uniform

        def buf(heads: int, dim: int) -> torch.Tensor:
            return torch.zeros((rows, heads, capacity + 1, dim), dtype=dtype, device=self.device)

        with torch.inference_mode(False):
            self.keys = [buf(g[0], g[1]) if g else None for g in self.layout]
            self.values = [buf(g[2], g[3]) if g else None for g in self.layout]
            self.positions = torch.zeros(rows, capacity + 1, dtype=torch.long, device=self.device)  # [rows, slots]
        self.lengths = [0] * rows
        self.span = 0
        self._rows = torch.zeros(0, dtype=torch.long, device=self.device)
        self._contiguous = True
        self._write_idx = torch.zeros(0, 0, dtype=torch.long, device=self.device)

    @classmethod
    def for_layout(cls, layout, rows: int, capacity: int, dtype: torch.dtype,
                   device: torch.device | str = "cpu") -> BatchKVCache:
        """A batch cache for a per-layer layout (models.registry.kv_layout)."""
        first = next((g for g in layout if g is not None), (1, 1, 1, 1))
        return cls(len(layout), first[0], first[1], rows, capacity, dtype, device, layout)

    @property
    def bytes_per_token(self) -> int:
        return layout_bytes_per_token(self.layout, self.dtype)

    @property
    def nbytes(self) -> int:
        return self.bytes_per_token * self.rows * (self.capacity + 1)

    def begin(self, rows: list[int], counts: list[int], position_ids: torch.Tensor) -> int:
        """Prepare a forward of position_ids [n, T] over `rows` (counts[i] real tokens in row i, the rest padding);
        returns the span attention reads."""
        t = position_ids.shape[-1]
        for r, c in zip(rows, counts):
            if not 1 <= c <= t or self.lengths[r] + c > self.capacity:
                raise ValueError(f"row {r}: {c} tokens after {self.lengths[r]} do not fit {self.capacity} slots")
        lengths = torch.tensor([self.lengths[r] for r in rows], dtype=torch.long, device=self.device)[:, None]
        cols = torch.arange(t, device=self.device)[None]  # [1, T]
        real = cols < torch.tensor(counts, dtype=torch.long, device=self.device)[:, None]  # [n, T]
        self._write_idx = torch.where(real, lengths + cols, self.capacity)  # padding -> the scratch slot
        self._rows = torch.tensor(rows, dtype=torch.long, device=self.device)
        self._contiguous = list(rows) == list(range(len(rows)))
        self.positions[self._rows[:, None], self._write_idx] = position_ids.to(self.device)
        end = max(self.lengths[r] + c for r, c in zip(rows, counts))
        self.span = min(self.capacity, -(-end // SPAN_BUCKET) * SPAN_BUCKET)
        return self.span

    def key_positions(self) -> torch.Tensor:
        """[n, span]: the position held by each slot the current forward's rows read."""
        return self.positions[self._rows, : self.span]

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.keys[layer_idx], self.values[layer_idx]  # [rows, H_kv, capacity + 1, D]
        rows = self._rows[:, None]  # [n, 1]
        k[rows, :, self._write_idx] = key_states.transpose(1, 2)  # key_states: [n, H_kv, T, D] -> [n, T, H_kv, D]
        v[rows, :, self._write_idx] = value_states.transpose(1, 2)
        if self._contiguous:
            n = self._rows.shape[0]
            return k[:n, :, : self.span], v[:n, :, : self.span]
        return k[:, :, : self.span].index_select(0, self._rows), v[:, :, : self.span].index_select(0, self._rows)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max((self.lengths[r] for r in self._rows.tolist()), default=0)

    # --- per-row bookkeeping (the engine's) ---
    def advance(self, rows: list[int], counts: list[int]) -> None:
        for r, c in zip(rows, counts):
            self.lengths[r] += c

    def crop(self, row: int, length: int) -> None:
        """Drop row's slots >= length."""
        self.lengths[row] = max(0, min(length, self.lengths[row]))

    @torch.inference_mode()
    def keep(self, row: int, start: int, indices: torch.Tensor) -> None:
        """Keep row's slots start + indices (ascending) among those >= start, compacted to start..start+K-1."""
        k_len = int(indices.numel())
        if k_len and not (indices.device.type == "cpu"
                          and torch.equal(indices, torch.arange(k_len, dtype=indices.dtype))):
            src = indices.to(device=self.device, dtype=torch.long) + start
            for buf in self.keys + self.values:
                if buf is not None:
                    buf[row, :, start : start + k_len].copy_(buf[row].index_select(1, src))
            self.positions[row, start : start + k_len].copy_(self.positions[row].index_select(0, src))
        self.lengths[row] = start + k_len
