"""Measure the target's pass time against tree size (cached per store, plan and machine) and plan budgets from it."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from offspec.spec.budget import expected_tokens_by_budget, interpolate_pass_s, pick_budget

CURVE_SIZES = (1, 16, 64, 256)  # larger trees: extrapolated with the last slope
CANDIDATE_BUDGETS = (0, 8, 16, 32, 64, 128, 256, 512, 1024)  # 0 = a plain step (no draft)
PROBE_EVERY = 8  # after this many plain steps, draft one tree again to refresh the estimates


def _home() -> Path:
    return Path(os.environ.get("OFFSPEC_HOME", Path.home() / ".cache" / "offspec"))


def curve_key(model) -> str:
    """Store, residency plan, page-cache policy, dtype and machine: what the pass-time curve depends on."""
    warm = bool(model.streamer and model.streamer.warm)
    parts = [str(Path(model.store_dir).resolve()), ",".join(model.plan.tiers), str(warm), str(model.dtype),
             platform.node(), platform.processor() or platform.machine(), str(os.cpu_count()),
             str(torch.get_num_threads()), str(model.device)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


@torch.inference_mode()
def measure_pass_curve(model, sizes: tuple[int, ...] = CURVE_SIZES, prefix: int = 32,
                       seed: int = 0) -> dict[int, float]:
    """Seconds of one forward of T tokens (after `prefix` cached tokens) for each T; leaves the cache as found."""
    start = model.cache.length
    g = torch.Generator().manual_seed(seed)
    vocab = model.vocab_size
    limit = model.max_context - start - prefix - 1
    out: dict[int, float] = {}
    try:
        model.forward(torch.randint(0, vocab, (1, prefix), generator=g), last_only=True)
        base = model.cache.length
        for t in sizes:
            if t > limit:
                break
            ids = torch.randint(0, vocab, (1, t), generator=g)
            t0 = time.perf_counter()
            model.forward(ids)
            out[t] = time.perf_counter() - t0
            model.cache.crop(base)
    finally:
        model.cache.crop(start)
    return out


def load_or_measure_curve(model, sizes: tuple[int, ...] = CURVE_SIZES) -> dict[int, float]:
    """The cached curve for this model/plan/machine, measured once if absent."""
    path = _home() / "curves" / f"{curve_key(model)}.json"
    if path.is_file():
        try:
            return {int(k): float(v) for k, v in json.loads(path.read_text())["pass_s"].items()}
        except (ValueError, KeyError, TypeError):
            pass
    curve = measure_pass_curve(model, sizes)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"store": str(model.store_dir), "tiers": list(model.plan.tiers), "pass_s": curve}))
    os.replace(tmp, path)
    return curve


class BudgetPlanner:
    """Picks the tree budget that maximises expected tokens per second, re-estimated after every pass.

    Expected tokens for a budget come from the latest drafted tree (the top-b nodes' cumulative draft
    probabilities), scaled by how well such predictions matched the tokens actually accepted so far.
    """

    def __init__(self, pass_s: dict[int, float], expand: int = 32,
                 candidates: tuple[int, ...] = CANDIDATE_BUDGETS, max_depth: int = 32) -> None:
        self.pass_s = dict(pass_s)
        self.expand = expand
        self.max_depth = max_depth
        self.candidates = candidates
        base = interpolate_pass_s(self.pass_s, 1)
        cheap = [b for b in candidates if interpolate_pass_s(self.pass_s, b + 1) <= 1.3 * base]
        self.budget = max(16, min(512, max(cheap, default=16)))
        self.best_spec_budget = self.budget
        self.plain_steps = 0
        self.round_s: float | None = None
        self.rounds_per_node: float | None = None  # draft rounds beyond the first, per drafted node
        self.curve: list[float] | None = None  # expected tokens by budget from the latest tree
        self.pred_sum = 0.0
        self.real_sum = 0.0

    def next_budget(self) -> int:
        """Tree budget for the next step; 0 means a plain step (speculation does not pay right now)."""
        if self.budget == 0 and self.plain_steps >= PROBE_EVERY:
            self.plain_steps = 0
            return self.best_spec_budget  # a probe keeps the acceptance and draft estimates fresh
        return self.budget

    def observe_plain(self, pass_s: float) -> None:
        """Feed back a plain step (one token, no draft)."""
        self.pass_s[1] = 0.7 * self.pass_s[1] + 0.3 * pass_s if 1 in self.pass_s else pass_s
        self.plain_steps += 1

    def expected_tokens(self, budget: int) -> float:
        """Calibrated expected committed tokens at `budget` (extrapolated past the latest tree's size)."""
        curve = self.curve or [1.0]
        n = len(curve) - 1
        if budget <= n:
            e = curve[budget]
        else:  # beyond the tree we have: continue the tail's slope, halving per doubling of budget
            tail = curve[n] - curve[max(0, n // 2)]
            e = curve[n] + 0.5 * tail * math.log2(budget / max(n, 1)) if n else 1.0
        scale = self.real_sum / self.pred_sum if self.pred_sum > 0 else 1.0
        return 1.0 + (e - 1.0) * scale

    def draft_rounds(self, budget: int) -> float:
        """Expected draft forwards for a tree of `budget` nodes: learned from past trees (deep confident
        chains need one round per level), else the breadth-first bound 1 + budget / expand."""
        if self.rounds_per_node is None:
            return 1 + math.ceil(budget / self.expand)
        return min(1 + self.rounds_per_node * budget, 1 + self.max_depth + math.ceil(budget / self.expand))

    def draft_seconds(self, budget: int) -> float:
        return 0.0 if budget == 0 else (self.round_s or 0.0) * self.draft_rounds(budget)

    def observe(self, grown, tree_size: int, pass_s: float, accepted: int) -> None:
        """Feed back one speculative step: the tree, the measured times and the accepted length."""
        self.pass_s[tree_size] = pass_s if tree_size not in self.pass_s else 0.7 * self.pass_s[tree_size] + 0.3 * pass_s
        round_s = grown.draft_s / max(grown.rounds, 1)
        self.round_s = round_s if self.round_s is None else 0.7 * self.round_s + 0.3 * round_s
        per_node = max(grown.rounds - 1, 0) / max(tree_size - 1, 1)
        self.rounds_per_node = per_node if self.rounds_per_node is None else 0.7 * self.rounds_per_node + 0.3 * per_node
        curve = expected_tokens_by_budget(grown.tree)
        self.pred_sum += curve[-1] - 1.0
        self.real_sum += accepted
        self.curve = curve
        self.budget = pick_budget(self.pass_s, self.draft_seconds, self.expected_tokens, self.candidates)
        spec = [b for b in self.candidates if b > 0]
        self.best_spec_budget = pick_budget(self.pass_s, self.draft_seconds, self.expected_tokens, spec)


def make_planner(target, draft, expand: int = 32) -> BudgetPlanner:
    """A planner fed with the target's measured (or cached) pass-time curve."""
    return BudgetPlanner(load_or_measure_curve(target), expand=expand)
