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
    assert pick_budget(disk_bound, 0.005, saturating, CANDIDATES, expand=32) >= 1024


def test_steep_curve_picks_a_small_budget() -> None:
    compute_bound = {1: 0.02, 64: 0.05, 256: 0.2, 1024: 0.8}
    assert pick_budget(compute_bound, 0.005, saturating, CANDIDATES, expand=32) <= 64


def test_draft_time_forms() -> None:
    curve = {1: 1.0, 100: 1.0}
    assert step_seconds(64, curve, 0.1) == pytest.approx(1.1)
    assert step_seconds(64, curve, 0.1, expand=32) == pytest.approx(1.3)  # 1 + 2 rounds
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


def test_a_shared_pass_splits_the_budget_and_still_probes():
    from offspec.speculative.tree_size import PROBE_EVERY, BudgetPlanner

    flat = {1: 1.0, 16: 1.05, 64: 1.2, 256: 2.0, 1024: 8.0}  # a streamed pass: flat until compute takes over
    alone = BudgetPlanner(flat)
    alone.curve = [1.0 + 3.0 * (1 - 0.9 ** b) for b in range(1025)]  # expected tokens by budget
    one = alone.next_budget_shared(1)
    eight = alone.next_budget_shared(8)
    assert 0 < eight < one  # eight trees share the flat part of the pass
    costly = BudgetPlanner(flat)
    costly.curve = alone.curve
    costly.cost.round_s, costly.cost.rounds_per_node = 5.0, 0.1  # a slow draft, per sequence
    assert costly.next_budget_shared(8) == 0
    for _ in range(PROBE_EVERY):
        costly.observe_plain(1.1, tokens=8)
    assert costly.next_budget_shared(8) > 0  # a probe refreshes the estimates
    assert costly.next_budget_shared(8) == 0
