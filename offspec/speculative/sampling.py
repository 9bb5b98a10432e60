"""The target's next-token choice: penalties, temperature, top-k, top-p, min-p, and position-keyed Gumbel noise.

A sampled token is argmax(processed logits + g), where the Gumbel noise g is a pure function of (seed, absolute
position, token id): a counter-based hash computed with integer tensor ops on the logits' device (no generator
state, no host round-trip). The token at each position is then a deterministic function of its context, so
verifying a draft tree is greedy verification on perturbed logits, and the same seed gives the same text with or
without speculation, at any tree size or shape. Each position's noise is independent of the others', so the
draws follow the processed distribution exactly (checked by chi-square in the tests).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from offspec.config import SamplingParams

__all__ = ["SamplingParams", "TreeSampler", "apply_penalties", "choose", "gumbel_noise", "gumbel_topk", "probs",
           "process_logits", "top_logprobs"]

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), in 16-bit halves so no int64 product overflows."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (lowbias32): every input bit flips about half the output bits."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    """_mix32 on a Python int (the seed's keys, computed once per call on the host)."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def gumbel_noise(seed: int, positions: torch.Tensor | Sequence[int], vocab: int,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Float32 [R, vocab]: standard Gumbel noise keyed by (seed, positions[r], token id), computed on device."""
    pos = torch.as_tensor(positions, dtype=torch.long, device=device).reshape(-1, 1) & _M32  # [R, 1]
    key_a = _mix32_int(seed ^ 0x5BD1E995)  # the seed's two halves feed two independent keys
    key_b = _mix32_int((seed >> 32) ^ 0x27D4EB2F)
    pa = _mix32(pos ^ key_a)  # [R, 1]
    pb = _mix32(pa ^ key_b)  # [R, 1]
    tokens = torch.arange(vocab, dtype=torch.long, device=pos.device)[None]  # [1, V]
    h = _mix32(_mix32(tokens ^ pa) ^ pb)  # [R, V], uniform 32-bit values
    u = ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))  # (0, 1), exact in float32
    return -torch.log(-torch.log(u))


def _windows(histories: Sequence[Sequence[int]], params: SamplingParams) -> list[Sequence[int]]:
    n = params.repeat_last_n
    return [h if n < 0 else (h[len(h) - n:] if len(h) > n else h) for h in histories]


def apply_penalties(logits: torch.Tensor, histories: Sequence[Sequence[int]] | None,
                    params: SamplingParams) -> torch.Tensor:
    """[R, V] logits with llama.cpp's penalties over each row's last repeat_last_n tokens of histories[r].

    repeat: positive logits divided by the penalty, negative ones multiplied; frequency: minus count * penalty;
    presence: minus the penalty once a token occurred.
    """
    if histories is None or not params.penalized:
        return logits
    rows, vocab = logits.shape
    windows = _windows(histories, params)
    row_idx = torch.tensor([r for r, w in enumerate(windows) for _ in w], dtype=torch.long)
    tok_idx = torch.tensor([t for w in windows for t in w], dtype=torch.long)
    if tok_idx.numel() == 0:
        return logits
    counts = torch.zeros(rows * vocab, dtype=torch.float32)  # built on the host from host-side histories
    counts.index_add_(0, row_idx * vocab + tok_idx, torch.ones(tok_idx.shape[0]))
    counts = counts.reshape(rows, vocab).to(logits.device)
    seen = counts > 0
    out = logits
    if params.repeat_penalty != 1.0:
        out = torch.where(seen, torch.where(out > 0, out / params.repeat_penalty, out * params.repeat_penalty), out)
    return out - counts * params.frequency_penalty - seen.float() * params.presence_penalty


def process_logits(logits: torch.Tensor, params: SamplingParams,
                   histories: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """[..., V] float32: penalties (when histories are given, one per row), then, unless greedy, 1/temperature and
    the tokens outside top-k, top-p and min-p set to -inf."""
    shape = logits.shape
    out = apply_penalties(logits.float().reshape(-1, shape[-1]), histories, params)
    if params.greedy:
        return out.reshape(shape)
    out = out / params.temperature
    vocab = out.shape[-1]
    if 0 < params.top_k < vocab:
        kth = out.topk(params.top_k, dim=-1).values[..., -1:]  # [R, 1]
        out = out.masked_fill(out < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = out.sort(dim=-1, descending=True)  # [R, V]
        sorted_probs = sorted_logits.softmax(dim=-1)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly above each token
        drop_sorted = before >= params.top_p  # never drops the top token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    if params.min_p > 0.0:
        floor = out.max(dim=-1, keepdim=True).values + math.log(params.min_p)  # [R, 1]
        out = out.masked_fill(out < floor, float("-inf"))
    return out.reshape(shape)


def probs(logits: torch.Tensor, params: SamplingParams,
          histories: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """[..., V] float32 distribution that choose() samples from; one-hot on the argmax when greedy."""
    x = process_logits(logits, params, histories)
    if params.greedy:
        index = x.argmax(dim=-1, keepdim=True)
        return torch.zeros(x.shape, dtype=torch.float32, device=x.device).scatter_(-1, index, 1.0)
    return x.softmax(dim=-1)


def choose(logits: torch.Tensor, params: SamplingParams, seed: int, positions: torch.Tensor | Sequence[int],
           histories: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Long[R]: the token at positions[r] given logits [R, V] (argmax of processed logits, plus Gumbel noise when
    sampling). histories[r]: the tokens before positions[r] (only the penalty window is read)."""
    x = process_logits(logits.reshape(-1, logits.shape[-1]), params, histories)
    if not params.greedy:
        x = x + gumbel_noise(seed, positions, x.shape[-1], x.device)
    return x.argmax(dim=-1)


def top_logprobs(logits: torch.Tensor, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """The raw distribution's log-probability of token and its n likeliest (token, logprob), from logits [V]."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    vals, idx = lp.topk(min(n, lp.shape[-1]))
    return float(lp[token]), list(zip(idx.tolist(), vals.tolist()))


def gumbel_topk(logq: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Long[..., k]: k tokens per row sampled without replacement from exp(logq) [..., V], in draw order."""
    device = generator.device if generator is not None else logq.device
    u = torch.rand(logq.shape, generator=generator, device=device).to(logq.device)
    exp1 = (-torch.log(u.clamp_min(1e-30))).clamp_min(1e-30)  # Exp(1) draws, > 0
    gumbel = -torch.log(exp1)
    return (logq.float() + gumbel).topk(k, dim=-1).indices


class TreeSampler:
    """The target's sampling rule at the positions after one root (at root_index, after the committed tokens):
    choose() picks the target's token after a path from the root, rank_logits() lets the draft rank children by
    the same rule and the same noise, so it proposes what the target will choose."""

    def __init__(self, params: SamplingParams, seed: int | None, committed: Sequence[int], root_index: int) -> None:
        self.params, self.seed, self.root_index = params, seed or 0, root_index
        n = params.repeat_last_n
        self.window = (list(committed) if n < 0 else list(committed[len(committed) - n:] if n else [])
                       ) if params.penalized else []

    def _history(self, path: Sequence[int]) -> list[int] | None:
        return self.window + list(path) if self.params.penalized else None

    def choose(self, logits: torch.Tensor, path: Sequence[int]) -> int:
        """The token after path (root first) given the target's logits [V] there."""
        hist = self._history(path)
        pos = [self.root_index + len(path)]
        return int(choose(logits[None], self.params, self.seed, pos, None if hist is None else [hist])[0])

    @property
    def ranks_draft(self) -> bool:
        """Whether drafting should rank by rank_logits (greedy without penalties: the draft's own logits do)."""
        return not self.params.greedy or self.params.penalized

    def rank_logits(self, tree, nodes: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """[E, V]: the draft's logits at tree nodes (Long [E]), processed like the target's and perturbed by the noise
        of each child's position (the paths are read once for the whole level, only when penalties need them)."""
        nodes = torch.as_tensor(nodes, dtype=torch.long).to(tree.device)
        hist = [self._history(p) for p in tree.paths_tokens(nodes)] if self.params.penalized else None
        x = process_logits(logits, self.params, hist)
        if self.params.greedy:
            return x
        positions = self.root_index + 1 + tree.depths[nodes]  # [E]
        return x + gumbel_noise(self.seed, positions.to(x.device), x.shape[-1], x.device)
