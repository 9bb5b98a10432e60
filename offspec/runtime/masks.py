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
    the keys at positions q with p - q < window (q_pos [T], k_pos [S]; ancestors and prefix alike).
    A batch: mask [B, 1, T, S] with q_pos [B, T] and k_pos [B, S]."""
    outside = (q_pos[..., :, None] - k_pos[..., None, :]) >= window  # [T, S] or [B, T, S]
    if outside.dim() == 3:
        outside = outside[:, None]
    return mask.masked_fill(outside, torch.finfo(mask.dtype).min)


def batch_mask(lengths: list[int], ancestors: list[torch.Tensor], q_len: int, span: int, dtype: torch.dtype,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, 1, q_len, span] for B sequences in one forward, each in its own cache row: sequence i's query j
    (j < T_i, ancestors[i] a bool [T_i, T_i] as in tree_mask) sees its committed slots [0, lengths[i]) and
    its new slots lengths[i] + k where ancestors[i][j, k]; a padding query (j >= T_i) sees slot 0 only."""
    visible = torch.zeros(len(lengths), q_len, span, dtype=torch.bool, device=device)
    for i, (length, anc) in enumerate(zip(lengths, ancestors)):
        t = anc.shape[0]
        visible[i, :t, :length] = True
        visible[i, :t, length : length + t] = anc.to(device)
        visible[i, t:, 0] = True
    mask = torch.full(visible.shape, torch.finfo(dtype).min, dtype=dtype, device=device)
    return mask.masked_fill_(visible, 0)[:, None]
