"""A preallocated KV cache that appends in place and keeps a chosen subset of new positions (no concat per step)."""

from __future__ import annotations

import torch

from offspec.transformers_contract import CacheProtocol


class StaticKVCache(CacheProtocol):
    """Per-layer key/value buffers [1, H_kv, capacity, D]; `length` positions are valid.

    transformers' attention modules call `update(k, v, layer_idx)` during a forward: the new T
    positions are written at [length, length + T) and the valid prefix plus them is returned.
    The owning model advances `length` once every layer has run (`advance`).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length = 0
        self._reserve(capacity)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    @property
    def nbytes(self) -> int:
        return self.bytes_per_token * self.capacity

    @torch.inference_mode(False)
    def _reserve(self, capacity: int) -> None:
        """Grow the buffers to hold `capacity` positions (copies only when growing)."""
        if capacity <= self.capacity:
            return
        shape = (1, self.num_kv_heads, capacity, self.head_dim)
        keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        for old, new in zip(self.keys + self.values, keys + values):
            new[:, :, : self.length].copy_(old[:, :, : self.length])
        self.keys, self.values, self.capacity = keys, values, capacity

    def ensure(self, extra: int) -> None:
        """Make room for `extra` more positions, growing geometrically."""
        need = self.length + extra
        if need > self.capacity:
            self._reserve(max(need, int(self.capacity * 1.5) + 64))

    # --- the transformers Cache protocol used by decoder layers (update -> write) ---
    def write(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = key_states.shape[-2]  # key_states: [1, H_kv, T, D]
        end = self.length + t
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k[:, :, self.length : end].copy_(key_states)
        v[:, :, self.length : end].copy_(value_states)
        return k[:, :, :end], v[:, :, :end]

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
        """Keep positions start + indices (ascending) among those >= start, compacted to start..start+K-1."""
        indices = indices.to(device=self.device, dtype=torch.long)
        k_len = int(indices.numel())
        src = indices + start
        if k_len and not torch.equal(src, torch.arange(start, start + k_len, device=self.device)):
            for buf in self.keys + self.values:
                buf[:, :, start : start + k_len].copy_(buf.index_select(2, src))
        self.length = start + k_len

    def reset(self) -> None:
        self.length = 0
