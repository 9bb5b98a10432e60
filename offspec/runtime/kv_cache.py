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
        self.layout = tuple(layout) if layout is not None else ((num_kv_heads, head_dim, num_kv_heads, head_dim),) * num_layers
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
