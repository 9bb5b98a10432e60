"""Sampling parameters and the target's processed next-token distribution (temperature, top-k, top-p)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from offspec.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[..., V] float32 logits scaled by 1/temperature with tokens outside top-k / top-p set to -inf."""
    out = logits.float()
    if params.greedy:
        return out
    out = out / params.temperature
    vocab = out.shape[-1]
    if 0 < params.top_k < vocab:
        kth = out.topk(params.top_k, dim=-1).values[..., -1:]  # [..., 1]
        out = out.masked_fill(out < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = out.sort(dim=-1, descending=True)  # [..., V]
        sorted_probs = sorted_logits.softmax(dim=-1)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly above each token
        drop_sorted = before >= params.top_p  # never drops the top token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[..., V] float32 target distribution after processing; one-hot on the argmax when greedy."""
    if params.greedy:
        index = logits.argmax(dim=-1, keepdim=True)
        return torch.zeros(logits.shape, dtype=torch.float32, device=logits.device).scatter_(-1, index, 1.0)
    return process_logits(logits, params).softmax(dim=-1)


def sample_probs(p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Long[...] one token per row of the distribution p [..., V]."""
    flat = p.reshape(-1, p.shape[-1])  # [R, V]
    if generator is not None and generator.device != flat.device:
        flat = flat.to(generator.device)
    out = torch.multinomial(flat, 1, generator=generator)  # [R, 1]
    return out.reshape(p.shape[:-1]).to(p.device)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Long[...] one token per row of logits [..., V] (argmax when greedy)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    return sample_probs(process_logits(logits, params).softmax(dim=-1), generator)


def uniform(generator: torch.Generator | None = None) -> float:
    """One uniform draw in [0, 1) from generator (on the generator's device)."""
    device = generator.device if generator is not None else "cpu"
    return float(torch.rand((), generator=generator, device=device))


def gumbel_topk(logq: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Long[..., k]: k tokens per row sampled without replacement from exp(logq) [..., V], in draw order."""
    device = generator.device if generator is not None else logq.device
    u = torch.rand(logq.shape, generator=generator, device=device).to(logq.device)
    exp1 = (-torch.log(u.clamp_min(1e-30))).clamp_min(1e-30)  # Exp(1) draws, > 0
    gumbel = -torch.log(exp1)
    return (logq.float() + gumbel).topk(k, dim=-1).indices
