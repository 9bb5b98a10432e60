"""pick_budget on synthetic pass-time curves; expected tokens of a tree."""

from __future__ import annotations

import math

import pytest

from offspec.errors import ConfigError
from offspec.speculative.tree_size import (
    expected_tokens_by_budget,
    interpolate_pass_s,
    pick_budget,
    step_seconds,
)
from offspec.speculative.tree import DraftTree

CANDIDATES = [8, 16, 32, 64, 128, 256, 512, 1024, 2048]


def saturating(b: int) -> float:
    """Expected tokens per step that grows with the budget and saturates (as trees do)."""
    return 1.0 + 5.0 * (1.0 - math.exp(-b / 400.0))


def test_interpolation_is_piecewise_linear_with_last_slope() -> None:
    curve = {1: 1.0, 9: 2.0, 17: 4.0}
    assert interpolate_pass_s(curve, 5) == pytest.approx(1.5)
    assert interpolate_pass_s(curve, 17) == pytest.approx(4.0)
    assert interpolate_pass_s(curve, 33) == pytest.approx(8.0)
    assert interpolate_pass_s({10: 0.3}, 1000) == pytest.approx(0.3)
    with pytest.raises(ConfigError):
        interpolate_pass_s({}, 3)


def test_flat_curve_picks_a_large_budget() -> None:
    disk_bound = {1: 2.0, 64: 2.01, 256: 2.03, 1024: 2.12}  # streaming weights dominates
    assert pick_budget(disk_bound, 0.005, saturating, CANDIDATES) >= 1024


def test_steep_curve_picks_a_small_budget() -> None:
    compute_bound = {1: 0.02, 64: 0.05, 256: 0.2, 1024: 0.8}
    assert pick_budget(compute_bound, 0.005, saturating, CANDIDATES) <= 64


def test_draft_time_forms() -> None:
    curve = {1: 1.0, 100: 1.0}
    assert step_seconds(64, curve, 0.1) == pytest.approx(1.1)
    assert step_seconds(64, curve, lambda b: b / 100) == pytest.approx(1.64)
    # drafting that grows fast with the budget pulls the choice down even on a flat curve
    assert pick_budget(curve, lambda b: b / 50, saturating, CANDIDATES) < 256
    with pytest.raises(ConfigError):
        pick_budget(curve, 0.1, saturating, [])


def small_tree() -> DraftTree:
    tree = DraftTree(0)
    tree.add(0, [1, 2], [math.log(0.5), math.log(0.25)])  # 1, 2
    tree.add(1, [3], [math.log(0.5 * 0.8)])  # 3
    return tree


def test_expected_tokens_by_budget() -> None:
    tree = small_tree()
    assert expected_tokens_by_budget(tree)[-1] == pytest.approx(1 + 0.5 + 0.25 + 0.4)
    p = [0.6, 0.3]
    curve = expected_tokens_by_budget(tree, p)
    assert curve == pytest.approx([1.0, 1.6, 1.96, 2.26])  # nodes by logprob: 1, 3, 2


def test_draft_cost_fits_fixed_and_per_row_seconds_per_level() -> None:
    """Level forwards that cost 0.04 s + 2 ms a row, 6 levels a tree at budget 64: the curve recovers both parts."""
    from offspec.speculative.tree_size import DraftCost

    cost = DraftCost()
    for rows in ([8, 30, 12, 6, 4, 4], [8, 26, 16, 8, 4, 2]):
        secs = [0.04 + 0.002 * r for r in rows]
        cost.observe(sum(secs) + 0.01, len(rows) + 1, 64, rows, secs)
    fixed, per_row = cost.forward_s()
    assert fixed == pytest.approx(0.04, rel=1e-6) and per_row == pytest.approx(0.002, rel=1e-6)
    assert cost.levels(64) == pytest.approx(6)
    assert cost.levels(256) == pytest.approx(8)  # one more level per doubling
    assert cost.seconds(64) == pytest.approx(6 * 0.04 + 64 * 0.002 + 0.01)
    assert cost.seconds(0) == 0.0
    ngram = DraftCost()
    ngram.observe(0.002, 0, 20)
    assert ngram.seconds(40) == pytest.approx(0.004)


class _Draft:
    """What the planner reads of a drafted tree."""

    def __init__(self, drafter: str, tree: DraftTree, level_rows: list[int], level_s: list[float]) -> None:
        from types import SimpleNamespace

        self.drafter, self.tree, self.ahead = drafter, tree, False
        self.rounds = len(level_rows) + 1 if level_rows else 0
        self.draft_s = sum(level_s) if level_rows else level_s[0]
        self.grown = SimpleNamespace(level_rows=level_rows, level_s=level_s) if level_rows else None


def _chain(n: int, p: float) -> DraftTree:
    """A chain of n nodes, each accepted with probability p."""
    tree = DraftTree(0, capacity=n + 1)
    for i in range(n):
        tree.add(i, [i + 1], [(i + 1) * math.log(p)])
    return tree


def _feed(planner, strong_level_s: float, steps: int = 6) -> None:
    """A strong drafter (chains the target accepts at 0.95, 16 levels a tree) and a weak, nearly free one (0.3)."""
    for _ in range(steps):
        name, budget = planner.choose()
        b = max(budget, 8)
        if name == "strong":
            rows = [max(1, b // 16)] * min(16, b)
            d = _Draft("strong", _chain(b, 0.95), rows, [strong_level_s] * len(rows))
            accepted = min(b, 16)
        else:
            d = _Draft("weak", _chain(b, 0.3), [], [1e-4])
            accepted = 0
        planner.observe(d, b + 1, planner.pass_s.get(b + 1, planner.pass_s[1]), accepted)


@pytest.mark.parametrize("level_s,want", [(0.01, "strong"), (2.0, "weak")])
def test_planner_picks_the_drafter_with_more_tokens_per_second(level_s, want) -> None:
    """One target pass costs 1 s: a drafter accepting long chains wins while its levels are cheap, and loses to a
    nearly free weak one (or plain steps) when 16 levels of it cost more than what its tokens save."""
    from offspec.speculative.tree_size import BudgetPlanner, DraftCost

    planner = BudgetPlanner({1: 1.0, 65: 1.05, 257: 1.2}, cost={"strong": DraftCost(), "weak": DraftCost()})
    _feed(planner, level_s)
    name, budget = planner.choose()
    if want == "strong":
        assert (name, budget > 0) == ("strong", True)
    else:
        assert name == "weak" or budget == 0


def test_an_empty_tree_sends_the_planner_back_to_the_best_drafter() -> None:
    """An n-gram index with no match proposes nothing (a plain step): with several drafters the planner goes back
    to the best one at once instead of asking the empty one again step after step, and still explores a drafter
    it has not seen with a real budget; alone, the n-gram drafter keeps being asked."""
    from offspec.speculative.tree_size import BudgetPlanner, DraftCost

    planner = BudgetPlanner({1: 1.0, 65: 1.05, 257: 1.2},
                            cost={"strong": DraftCost(), "ngram": DraftCost(), "other": DraftCost()})
    name, budget = planner.choose()
    assert name == "strong" and budget > 0
    planner.observe(_Draft("strong", _chain(budget, 0.95), [1] * 16, [0.01] * 16), budget + 1, 1.05, 16)
    name, budget = planner.choose()
    assert name == "ngram" and budget > 0  # explored once
    planner.observe_plain(1.0)
    planner.observe_empty("ngram")
    name, budget = planner.choose()
    assert name == "other" and budget > 0  # the next unseen drafter, with a budget that drafts
    planner.observe(_Draft("other", _chain(budget, 0.3), [1] * 4, [0.01] * 4), budget + 1, 1.05, 1)
    assert planner.choose() == ("strong", planner.budget) and planner.budget > 0
    alone = BudgetPlanner({1: 1.0, 65: 1.05, 257: 1.2})
    before = alone.choose()
    alone.observe_plain(1.0)
    alone.observe_empty("")
    assert alone.choose() == before


def test_a_stale_tree_of_another_drafter_does_not_take_over_until_it_is_revisited() -> None:
    """Drafter a's fresh tree on a hard stretch is not compared with drafter b's tree from an easy stretch long
    ago: a keeps drafting until b is revisited, and b takes over only if its fresh tree is better."""
    from offspec.speculative.tree_size import REVISIT_EVERY, BudgetPlanner, DraftCost, expected_tokens_by_budget

    planner = BudgetPlanner({1: 1.0, 65: 1.05, 257: 1.2}, cost={"a": DraftCost(), "b": DraftCost()})
    b = planner.estimates["b"]
    b.curve, b.last_step = expected_tokens_by_budget(_chain(64, 0.97)), 0  # easy text, long ago
    planner.steps = REVISIT_EVERY - 2
    planner.observe(_Draft("a", _chain(64, 0.6), [4] * 16, [0.01] * 16), 65, 1.05, 1)
    assert planner.choice == "a"
    name, budget = planner.choose()
    assert name == "a" and budget > 0
    for _ in range(3):
        name, budget = planner.choose()
        if name == "b":
            break
        planner.observe(_Draft("a", _chain(64, 0.6), [4] * 16, [0.01] * 16), 65, 1.05, 1)
    assert name == "b"  # revisited
    planner.observe(_Draft("b", _chain(64, 0.97), [4] * 16, [0.01] * 16), 65, 1.05, 30)
    assert planner.choose()[0] == "b"


def test_a_shared_pass_splits_the_budget_and_still_probes():
    from offspec.speculative.tree_size import PROBE_EVERY, BudgetPlanner

    flat = {1: 1.0, 16: 1.05, 64: 1.2, 256: 2.0, 1024: 8.0}  # a streamed pass: flat until compute takes over
    curve = [1.0 + 3.0 * (1 - 0.9 ** b) for b in range(1025)]  # expected tokens by budget
    alone = BudgetPlanner(flat)
    alone.estimates[""].curve = curve
    alone.budget = alone._best("")[0]
    one = alone.choose_shared(1)[1]
    eight = alone.choose_shared(8)[1]
    assert 0 < eight < one  # eight trees share the flat part of the pass
    costly = BudgetPlanner(flat)
    costly.estimates[""].curve = curve
    costly.estimates[""].cost.node_s = 0.5  # a slow draft, drafting once per sequence
    assert costly.choose_shared(8)[1] == 0
    for _ in range(PROBE_EVERY):
        costly.observe_plain(1.1, tokens=8)
    assert costly.choose_shared(8)[1] > 0  # a probe refreshes the estimates
    assert costly.choose_shared(8)[1] == 0
