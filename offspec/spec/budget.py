"""Hardware-aware tree budget: maximise expected tokens per second of (target pass + drafting)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from offspec.errors import ConfigError
from offspec.spec.tree import DraftTree


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


def expected_tokens_from_tree(tree: DraftTree, rank_p: Sequence[float] | None = None) -> float:
    """Expected committed tokens of a tree: 1 + sum over drafted nodes of their estimated acceptance probability.

    With rank_p (e.g. AcceptanceStats.acceptance_p) a node counts prod rank_p[rank] along its path; without it, the
    draft's own cumulative probability exp(logprob) (calibrated only as far as the draft matches the target).
    """
    return 1.0 + float(_node_probs(tree, rank_p)[1:].sum())
