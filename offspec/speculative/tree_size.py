"""Hardware-aware tree budget: maximise expected tokens per second of (target pass + drafting)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from offspec.errors import ConfigError
from offspec.speculative.tree import DraftTree


def interpolate_pass_s(pass_s: Mapping[int, float], tokens: int) -> float:
    """Target pass seconds for `tokens` tree tokens: piecewise linear in the measured points, last slope beyond them."""
    if not pass_s:
        raise ConfigError("pass_s needs at least one measured tree size")
    xs = sorted(pass_s)
    ys = [float(pass_s[x]) for x in xs]
    if len(xs) == 1:
        return ys[0]
    if tokens <= xs[0]:
        slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
        return max(0.0, ys[0] + slope * (tokens - xs[0]))
    for i in range(1, len(xs)):
        if tokens <= xs[i]:
            w = (tokens - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + w * (ys[i] - ys[i - 1])
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return max(0.0, ys[-1] + slope * (tokens - xs[-1]))


def step_seconds(
    budget: int,
    pass_s: Mapping[int, float],
    draft_round_s: float | Callable[[int], float],
    expand: int | None = None,
) -> float:
    """Seconds of one speculative step: target pass over budget + 1 tokens plus drafting (see pick_budget)."""
    if callable(draft_round_s):
        draft = float(draft_round_s(budget))
    elif expand:
        draft = float(draft_round_s) * (1 + math.ceil(budget / expand))
    else:
        draft = float(draft_round_s)
    return interpolate_pass_s(pass_s, budget + 1) + draft


def pick_budget(
    pass_s: Mapping[int, float],
    draft_round_s: float | Callable[[int], float],
    expected_tokens: Callable[[int], float],
    candidates: Iterable[int],
    expand: int | None = None,
) -> int:
    """The candidate budget with the most expected tokens per second (ties go to the smaller budget).

    pass_s: measured target pass seconds keyed by tokens in the pass (budget + 1, root included). draft_round_s: a
    callable(budget) -> draft seconds, or seconds per draft round (rounds = 1 + ceil(budget / expand); a constant
    per step when expand is None). expected_tokens(budget): committed tokens per step, bonus token included.
    """
    best, best_rate = -1, -math.inf
    for budget in sorted(set(candidates)):
        seconds = step_seconds(budget, pass_s, draft_round_s, expand)
        rate = expected_tokens(budget) / seconds if seconds > 0 else math.inf
        if rate > best_rate:
            best, best_rate = budget, rate
    if best < 0:
        raise ConfigError("pick_budget needs at least one candidate budget")
    return best


def _node_probs(tree: DraftTree, rank_p: Sequence[float] | None) -> torch.Tensor:
    """Float [N]: estimated P(node accepted) = prod of rank_p[rank] on its path, or the draft's exp(cumulative logprob)."""
    if rank_p is None:
        return tree.logprobs.double().exp()
    reach = [1.0] * tree.size
    for i in range(1, tree.size):
        rank = tree.rank(i)
        reach[i] = reach[tree.parent(i)] * (float(rank_p[rank]) if rank < len(rank_p) else 0.0)
    return torch.tensor(reach, dtype=torch.float64)


def expected_tokens_by_budget(tree: DraftTree, rank_p: Sequence[float] | None = None) -> list[float]:
    """[b] = expected committed tokens (bonus included) of the tree's top-b nodes by cumulative logprob, b = 0..budget."""
    reach = _node_probs(tree, rank_p)
    return [1.0] + (1.0 + reach[tree.best_nodes()].cumsum(0)).tolist()


CANDIDATE_BUDGETS = (0, 8, 16, 32, 64, 128, 256, 512, 1024)  # 0 = a plain step (no draft)
PROBE_EVERY = 8  # after this many plain steps, draft one tree again to refresh the estimates


class DraftCost:
    """A drafter's cost curve, seconds against budget, learned from its own trees: seconds per draft forward times
    the forwards a tree needs (deep confident chains need one per level), plus seconds per node for bookkeeping-only
    drafting (an n-gram tree needs no forward)."""

    def __init__(self, expand: int = 32, max_depth: int = 32) -> None:
        self.expand, self.max_depth = expand, max_depth
        self.round_s: float | None = None
        self.rounds_per_node: float | None = None  # draft rounds beyond the first, per drafted node
        self.node_s: float | None = None

    def observe(self, draft_s: float, rounds: int, nodes: int) -> None:
        """Feed back one drafted tree: its seconds, its draft forwards (0: none) and its drafted nodes."""
        if rounds <= 0:
            per = draft_s / max(nodes, 1)
            self.node_s = per if self.node_s is None else 0.7 * self.node_s + 0.3 * per
            return
        round_s = draft_s / rounds
        self.round_s = round_s if self.round_s is None else 0.7 * self.round_s + 0.3 * round_s
        per_node = max(rounds - 1, 0) / max(nodes, 1)
        self.rounds_per_node = per_node if self.rounds_per_node is None else 0.7 * self.rounds_per_node + 0.3 * per_node

    def rounds(self, budget: int) -> float:
        """Expected draft forwards for a tree of `budget` nodes: learned, else the breadth-first 1 + budget / expand."""
        if self.rounds_per_node is None:
            return 1 + math.ceil(budget / self.expand)
        return min(1 + self.rounds_per_node * budget, 1 + self.max_depth + math.ceil(budget / self.expand))

    def seconds(self, budget: int) -> float:
        if budget == 0:
            return 0.0
        return (self.round_s or 0.0) * self.rounds(budget) + (self.node_s or 0.0) * budget


class BudgetPlanner:
    """Picks the tree budget that maximises expected tokens per second, re-estimated after every pass.

    Expected tokens for a budget come from the latest drafted tree (the top-b nodes' cumulative draft
    probabilities), scaled by how well such predictions matched the tokens actually accepted so far.
    """

    def __init__(self, pass_s: dict[int, float], expand: int = 32,
                 candidates: tuple[int, ...] = CANDIDATE_BUDGETS, max_depth: int = 32,
                 cost: DraftCost | None = None) -> None:
        self.pass_s = dict(pass_s)
        self.candidates = candidates
        self.cost = cost if cost is not None else DraftCost(expand, max_depth)  # the drafter's curve
        base = interpolate_pass_s(self.pass_s, 1)
        cheap = [b for b in candidates if interpolate_pass_s(self.pass_s, b + 1) <= 1.3 * base]
        self.budget = max(16, min(512, max(cheap, default=16)))
        self.best_spec_budget = self.budget
        self.plain_steps = 0
        self.curve: list[float] | None = None  # expected tokens by budget from the latest tree
        self.pred_sum = 0.0
        self.real_sum = 0.0

    def next_budget(self) -> int:
        """Tree budget for the next step; 0 means a plain step (speculation does not pay right now)."""
        if self.budget == 0 and self.plain_steps >= PROBE_EVERY:
            self.plain_steps = 0
            return self.best_spec_budget  # a probe keeps the acceptance and draft estimates fresh
        return self.budget

    def next_budget_shared(self, sequences: int) -> int:
        """Drafted nodes per sequence when `sequences` trees share one target pass (0 = plain steps): the budget
        with the most expected tokens per second when the pass carries sequences x (budget + 1) tokens."""
        if sequences <= 1:
            return self.next_budget()
        shared = {tokens / sequences: s / sequences for tokens, s in self.pass_s.items()}
        budget = pick_budget(shared, self.draft_seconds, self.expected_tokens, self.candidates)
        if budget == 0 and self.plain_steps >= PROBE_EVERY:  # a probe keeps the estimates fresh, as alone
            self.plain_steps = 0
            return pick_budget(shared, self.draft_seconds, self.expected_tokens, [b for b in self.candidates if b])
        return budget

    def observe_plain(self, pass_s: float, tokens: int = 1) -> None:
        """Feed back a plain step (one token, no draft; `tokens` when several sequences shared the pass)."""
        self.pass_s[tokens] = 0.7 * self.pass_s[tokens] + 0.3 * pass_s if tokens in self.pass_s else pass_s
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

    def draft_seconds(self, budget: int) -> float:
        return self.cost.seconds(budget)

    def observe(self, grown, tree_size: int, pass_s: float, accepted: int, pass_tokens: int | None = None) -> None:
        """Feed back one speculative step: the tree, the measured times and the accepted length (pass_tokens: the
        tokens of the whole pass when other sequences shared it)."""
        key = pass_tokens or tree_size
        self.pass_s[key] = pass_s if key not in self.pass_s else 0.7 * self.pass_s[key] + 0.3 * pass_s
        self.cost.observe(grown.draft_s, grown.rounds, tree_size - 1)
        curve = expected_tokens_by_budget(grown.tree)
        self.pred_sum += curve[-1] - 1.0
        self.real_sum += accepted
        self.curve = curve
        self.budget = pick_budget(self.pass_s, self.draft_seconds, self.expected_tokens, self.candidates)
        spec = [b for b in self.candidates if b > 0]
        self.best_spec_budget = pick_budget(self.pass_s, self.draft_seconds, self.expected_tokens, spec)


def make_planner(target, expand: int = 32, cost: DraftCost | None = None) -> BudgetPlanner:
    """A planner fed with the target's measured (or cached) pass-time curve and the drafter's cost curve."""
    from offspec.runtime.pass_curve import load_or_measure_curve

    return BudgetPlanner(load_or_measure_curve(target), expand=expand, cost=cost)
