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


def pad_mask(mask: torch.Tensor, span: int) -> torch.Tensor:
    """[1, 1, T, span]: an additive mask over the first columns, the unused cache slots after them blocked."""
    cols = mask.shape[-1]
    if cols == span:
        return mask
    out = torch.full((*mask.shape[:-1], span), torch.finfo(mask.dtype).min, dtype=mask.dtype, device=mask.device)
    out[..., :cols] = mask
    return out


def window_mask(mask: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """`mask` [1, 1, T, S] with keys outside a sliding window also blocked: a query at position p keeps
    the keys at positions q with p - q < window (q_pos [T], k_pos [S]; ancestors and prefix alike)."""
    outside = (q_pos[:, None] - k_pos[None, :]) >= window  # [T, S]
    return mask.masked_fill(outside, torch.finfo(mask.dtype).min)
