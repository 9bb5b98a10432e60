"""Additive float attention masks (0 = visible, finfo.min = blocked) for causal and tree forwards."""

from __future__ import annotations

import torch


def causal_mask(cached_len: int, q_len: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """[1, 1, q_len, cached_len + q_len]: every query sees the cache and the queries up to itself."""
    return tree_mask(cached_len, torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril(), dtype)


def tree_mask(cached_len: int, ancestors: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[1, 1, T, cached_len + T] from a bool [T, T] matrix (row i: True where column j is i or an ancestor of i)."""
    t = ancestors.shape[0]
    mask = torch.full((1, 1, t, cached_len + t), torch.finfo(dtype).min, dtype=dtype, device=ancestors.device)
    mask[..., :cached_len] = 0
    mask[0, 0, :, cached_len:].masked_fill_(ancestors, 0)
    return mask


def visibility_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[1, 1, T, S] additive mask from a bool [T, S] matrix of visible key positions."""
    mask = torch.full(visible.shape, torch.finfo(dtype).min, dtype=dtype, device=visible.device)
    mask.masked_fill_(visible, 0)
    return mask[None, None]
