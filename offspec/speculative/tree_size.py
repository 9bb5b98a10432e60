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


def step_seconds(budget: int, pass_s: Mapping[int, float], draft_s: float | Callable[[int], float]) -> float:
    """Seconds of one speculative step: target pass over budget + 1 tokens plus drafting (seconds, or a callable of
    the budget)."""
    draft = float(draft_s(budget)) if callable(draft_s) else float(draft_s)
    return interpolate_pass_s(pass_s, budget + 1) + draft


def pick_budget(
    pass_s: Mapping[int, float],
    draft_s: float | Callable[[int], float],
    expected_tokens: Callable[[int], float],
    candidates: Iterable[int],
) -> int:
    """The candidate budget with the most expected tokens per second (ties go to the smaller budget).

    pass_s: measured target pass seconds keyed by tokens in the pass (budget + 1, root included). draft_s: a
    callable(budget) -> draft seconds, or a constant per step. expected_tokens(budget): committed tokens per step,
    bonus token included.
    """
    best, _ = best_budget(pass_s, draft_s, expected_tokens, candidates)
    return best


def best_budget(pass_s: Mapping[int, float], draft_s: float | Callable[[int], float],
                expected_tokens: Callable[[int], float], candidates: Iterable[int]) -> tuple[int, float]:
    """(budget, expected tokens per second) of the best candidate (ties go to the smaller budget)."""
    best, best_rate = -1, -math.inf
    for budget in sorted(set(candidates)):
        seconds = step_seconds(budget, pass_s, draft_s)
        rate = expected_tokens(budget) / seconds if seconds > 0 else math.inf
        if rate > best_rate:
            best, best_rate = budget, rate
    if best < 0:
        raise ConfigError("pick_budget needs at least one candidate budget")
    return best, best_rate


def _node_probs(tree: DraftTree, rank_p: Sequence[float] | None) -> torch.Tensor:
    """Float [N]: estimated P(node accepted) = prod of rank_p[rank] on its path, or the draft's exp(cumulative logprob)."""
    if rank_p is None:
        return tree.logprobs.double().exp()
    p = torch.tensor(list(rank_p) + [0.0], dtype=torch.float64, device=tree.device)
    logp = p[tree.ranks.clamp_max(len(rank_p))].clamp_min(1e-300).log()  # [N]
    logp[0] = 0.0  # the root is given
    return (tree.ancestors.double() @ logp).exp()  # product over each node's path


def expected_tokens_by_budget(tree: DraftTree, rank_p: Sequence[float] | None = None) -> list[float]:
    """[b] = expected committed tokens (bonus included) of the tree's top-b nodes by cumulative logprob, b = 0..budget."""
    reach = _node_probs(tree, rank_p)
    return [1.0] + (1.0 + reach[tree.best_nodes()].cumsum(0)).tolist()


CANDIDATE_BUDGETS = (0, 8, 16, 32, 64, 128, 256, 512, 1024)  # 0 = a plain step (no draft)
PROBE_EVERY = 8  # after this many plain steps, draft one tree again to refresh the estimates
REVISIT_EVERY = 24  # with several drafters, one that was not chosen for this many steps drafts one tree again


class DraftCost:
    """A drafter's cost curve, seconds against budget, learned from its own trees.

    A model draft grows a tree with one draft forward per level; a forward costs a fixed part (reading the draft's
    weights once, per-forward overhead) plus a part per row (compute), fitted by least squares over the level
    forwards seen (recent ones weigh more). A tree of b nodes takes levels(b) forwards over rows(b) rows in all,
    both learned from the trees (levels per power-of-two budget, rows per node), plus its own fixed seconds (the
    pending tokens' forward, the root's ranking, bookkeeping). A drafter without forwards (n-gram) costs seconds
    per node."""

    def __init__(self, max_depth: int = 32, decay: float = 0.95) -> None:
        self.max_depth, self.decay = max_depth, decay
        self._sums = [0.0] * 5  # decayed n, sum x, sum y, sum x^2, sum x*y over (rows, seconds) of level forwards
        self._levels: dict[int, float] = {}  # round(log2 budget) -> levels per tree
        self.rows_per_node: float | None = None
        self.tree_s: float | None = None  # seconds per tree outside the level forwards
        self.node_s: float | None = None

    @staticmethod
    def _ewma(old: float | None, new: float, w: float = 0.3) -> float:
        return new if old is None else (1 - w) * old + w * new

    def observe(self, draft_s: float, rounds: int, nodes: int, level_rows: Sequence[int] = (),
                level_s: Sequence[float] = ()) -> None:
        """Feed back one drafted tree: its seconds, its draft forwards (0: none), its drafted nodes, and the rows and
        seconds of each level's forward."""
        if rounds <= 0:
            self.node_s = self._ewma(self.node_s, draft_s / max(nodes, 1))
            return
        d = self.decay
        for x, y in zip(level_rows, level_s):
            n, sx, sy, sxx, sxy = self._sums
            self._sums = [d * n + 1, d * sx + x, d * sy + y, d * sxx + x * x, d * sxy + x * y]
        bucket = round(math.log2(max(nodes, 1)))
        self._levels[bucket] = self._ewma(self._levels.get(bucket), float(len(level_rows)))
        self.rows_per_node = self._ewma(self.rows_per_node, sum(level_rows) / max(nodes, 1))
        self.tree_s = self._ewma(self.tree_s, max(0.0, draft_s - sum(level_s)))

    def forward_s(self) -> tuple[float, float]:
        """(fixed seconds, seconds per row) of one draft forward, from the least-squares fit (0, 0 before any)."""
        n, sx, sy, sxx, sxy = self._sums
        if n <= 0:
            return 0.0, 0.0
        var = sxx / n - (sx / n) ** 2
        if var <= 1e-9 * max(1.0, (sx / n) ** 2):  # one row count seen: no slope to fit
            return sy / n, 0.0
        per_row = max(0.0, (sxy / n - (sx / n) * (sy / n)) / var)
        return max(0.0, sy / n - per_row * sx / n), per_row

    def levels(self, budget: int) -> float:
        """Draft forwards after the pending one for a tree of `budget` nodes: the nearest measured budget's, one more
        level per doubling beyond it (fewer below), within 1..max_depth."""
        b = math.log2(max(budget, 1))
        if not self._levels:
            return min(self.max_depth, 1 + b)
        near = min(self._levels, key=lambda k: (abs(k - b), k))
        return min(self.max_depth, max(1.0, self._levels[near] + (b - near)))

    def seconds(self, budget: int) -> float:
        if budget == 0:
            return 0.0
        if self.node_s is not None and self.rows_per_node is None:
            return self.node_s * budget
        fixed, per_row = self.forward_s()
        rows = (self.rows_per_node or 1.0) * budget
        return (self.tree_s or 0.0) + self.levels(budget) * fixed + rows * per_row


class _Estimate:
    """What the planner knows of one drafter: its cost curve, its latest tree's expected tokens by budget, how well
    such predictions matched, and how much of its drafting stays visible (not hidden behind a streamed pass)."""

    def __init__(self, cost: DraftCost) -> None:
        self.cost = cost
        self.curve: list[float] | None = None
        self.pred_sum = self.real_sum = 0.0
        self.visible = 1.0
        self.last_step = -1
        self.realized: float | None = None  # tokens per second its steps delivered (moving average)

    def realize(self, rate: float) -> None:
        self.realized = rate if self.realized is None else 0.7 * self.realized + 0.3 * rate

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
        return self.cost.seconds(budget) * self.visible


class BudgetPlanner:
    """Picks the drafter and tree budget that maximise expected tokens per second, re-estimated after every pass.

    Expected tokens for a budget come from the drafter's latest tree (the top-b nodes' cumulative draft
    probabilities), scaled by how well such predictions matched the tokens actually accepted so far; seconds are
    the target's pass-time curve plus the drafter's own cost curve (its visible part). Budget 0 is a plain step.
    """

    def __init__(self, pass_s: dict[int, float], cost: DraftCost | Mapping[str, DraftCost] | None = None,
                 candidates: tuple[int, ...] = CANDIDATE_BUDGETS, max_depth: int = 32) -> None:
        self.pass_s = dict(pass_s)
        self.candidates = candidates
        costs = cost if isinstance(cost, Mapping) else {"": cost if cost is not None else DraftCost(max_depth)}
        self.estimates = {name: _Estimate(c) for name, c in costs.items()}
        base = interpolate_pass_s(self.pass_s, 1)
        cheap = [b for b in candidates if interpolate_pass_s(self.pass_s, b + 1) <= 1.3 * base]
        self.budget = max(16, min(512, max(cheap, default=16)))  # the opening budget, before any tree
        self.opening = self.budget
        self.choice = next(iter(self.estimates))
        self.best_spec = (self.choice, self.budget)
        self.plain_steps = 0
        self.steps = 0

    @property
    def cost(self) -> DraftCost:
        """The cost curve of the drafter chosen now."""
        return self.estimates[self.choice].cost

    def _estimate(self, name: str) -> _Estimate:
        return self.estimates.get(name) or self.estimates[self.choice]

    def next_budget(self) -> int:
        """Tree budget for the next step; 0 means a plain step (speculation does not pay right now)."""
        return self.choose()[1]

    def choose(self, budget: int | None = None) -> tuple[str, int]:
        """(drafter, tree budget) for the next step; budget 0 is a plain step. A fixed `budget` only picks the
        drafter."""
        self.steps += 1
        unseen = [n for n, e in self.estimates.items() if e.curve is None and n != self.choice]
        if unseen and self.estimates[self.choice].curve is not None:
            self.choice = unseen[0]  # every drafter drafts once before the planner compares them
            return self.choice, budget if budget is not None else (self.budget or self.opening)
        stale = [n for n, e in self.estimates.items() if self.steps - e.last_step > REVISIT_EVERY]
        if len(self.estimates) > 1 and stale and budget is None:
            name = min(stale, key=lambda n: self.estimates[n].last_step)
            self.estimates[name].last_step = self.steps
            return name, self._best(name)[0] or self.best_spec[1]
        if budget is not None:
            self.choice = max(self.estimates, key=lambda n: self._rate(n, budget))
            return self.choice, budget
        if self.budget == 0 and self.plain_steps >= PROBE_EVERY:
            self.plain_steps = 0
            return self.best_spec  # a probe keeps the acceptance and draft estimates fresh
        return self.choice, self.budget

    def _rate(self, name: str, budget: int) -> float:
        e = self.estimates[name]
        return e.expected_tokens(budget) / step_seconds(budget, self.pass_s, e.draft_seconds)

    def _best(self, name: str, candidates: Iterable[int] | None = None) -> tuple[int, float]:
        e = self.estimates[name]
        return best_budget(self.pass_s, e.draft_seconds, e.expected_tokens,
                           candidates if candidates is not None else self.candidates)

    def expected_tokens(self, budget: int) -> float:
        return self.estimates[self.choice].expected_tokens(budget)

    def draft_seconds(self, budget: int) -> float:
        return self.estimates[self.choice].draft_seconds(budget)

    def choose_shared(self, sequences: int) -> tuple[str, int]:
        """(drafter, drafted nodes per tree) when `sequences` trees share one target pass (budget 0: plain steps):
        the budget with the most expected tokens per second when the pass carries sequences x (budget + 1)
        tokens; a probe now and then when plain steps win, as alone."""
        if sequences <= 1:
            return self.choose()
        self.steps += 1
        shared = {tokens / sequences: s / sequences for tokens, s in self.pass_s.items()}
        e = self.estimates[self.choice]
        # the pass carries every tree: no more tokens than the largest single tree (the memory plan's workspace)
        largest = max(self.candidates) + 1
        candidates = [b for b in self.candidates if sequences * (b + 1) <= largest] or [0]
        budget = best_budget(shared, e.draft_seconds, e.expected_tokens, candidates)[0]
        if budget == 0 and self.plain_steps >= PROBE_EVERY and any(candidates):  # keeps the estimates fresh
            self.plain_steps = 0
            budget = best_budget(shared, e.draft_seconds, e.expected_tokens, [b for b in candidates if b])[0]
        return self.choice, budget

    def observe_plain(self, pass_s: float, tokens: int = 1) -> None:
        """Feed back a plain step (one token, no draft; `tokens` when several sequences shared the pass)."""
        self.pass_s[tokens] = 0.7 * self.pass_s[tokens] + 0.3 * pass_s if tokens in self.pass_s else pass_s
        self.plain_steps += 1

    def observe(self, draft, tree_size: int, pass_s: float, accepted: int, pass_tokens: int | None = None) -> None:
        """Feed back one speculative step: the Draft (its drafter, tree, cost), the measured pass and the accepted
        length (pass_tokens: the tokens of the whole pass when other sequences shared it)."""
        key = pass_tokens or tree_size
        self.pass_s[key] = pass_s if key not in self.pass_s else 0.7 * self.pass_s[key] + 0.3 * pass_s
        e = self._estimate(getattr(draft, "drafter", "") or self.choice)
        e.last_step = self.steps
        grown = getattr(draft, "grown", None)
        e.cost.observe(draft.draft_s, draft.rounds, tree_size - 1, getattr(grown, "level_rows", ()),
                       getattr(grown, "level_s", ()))
        e.visible = 0.7 * e.visible + 0.3 * (0.0 if getattr(draft, "ahead", False) else 1.0)
        curve = expected_tokens_by_budget(draft.tree)
        e.pred_sum += curve[-1] - 1.0
        e.real_sum += accepted
        e.curve = curve
        e.realize((accepted + 1) / (pass_s + (0.0 if getattr(draft, "ahead", False) else draft.draft_s)))
        self._rechoose()

    def observe_empty(self, drafter: str) -> None:
        """Feed back a tree with nothing in it (an n-gram index with no match): the step was plain. With several
        drafters, that one now expects nothing (its latest tree) until it is revisited, so the planner goes back to
        the best of the others at once instead of asking it again step after step. Alone, a drafter keeps being
        asked (an empty n-gram lookup costs microseconds)."""
        e = self.estimates.get(drafter)
        if e is None or len(self.estimates) < 2:
            return
        e.last_step = self.steps
        e.curve = [1.0]
        e.realize(1.0 / max(self.pass_s.get(1, 1.0), 1e-9))  # a plain step's token
        self._rechoose()

    def _rechoose(self) -> None:
        """The drafter and budget for the next steps. One drafter: the budget with the most expected tokens per
        second. Several: the drafter that has delivered the most tokens per second of its steps (pass and visible
        drafting, averaged over its recent trees), then its best budget. A latest tree only says how easy the text
        was where it was drafted, so comparing drafters by their latest trees let one drafter's tree from an easy
        stretch long ago take over from another's fresh one on a hard stretch."""
        spec = [b for b in self.candidates if b > 0]
        seen = [n for n, e in self.estimates.items() if e.curve is not None]
        rated = [n for n in seen if self.estimates[n].realized is not None]
        best = {n: self._best(n) for n in seen}
        if rated and len(self.estimates) > 1:
            self.choice = max(rated, key=lambda n: self.estimates[n].realized)
        else:
            self.choice = max(best, key=lambda n: best[n][1])
        self.budget = best[self.choice][0]
        spec_best = {n: self._best(n, spec) for n in best}
        name = max(spec_best, key=lambda n: spec_best[n][1])
        self.best_spec = (name, spec_best[name][0])


def make_planner(target, cost: DraftCost | Mapping[str, DraftCost] | None = None) -> BudgetPlanner:
    """A planner fed with the target's measured (or cached) pass-time curve and the drafters' cost curves; it picks
    no tree larger than the target's memory plan sized its workspace for (plan.tree_tokens, root included)."""
    from offspec.runtime.pass_curve import load_or_measure_curve

    tokens = getattr(getattr(target, "plan", None), "tree_tokens", 0)
    candidates = tuple(b for b in CANDIDATE_BUDGETS if not tokens or b < tokens)
    return BudgetPlanner(load_or_measure_curve(target), cost=cost, candidates=candidates)
