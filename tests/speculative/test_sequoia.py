"""Sequoia DP vs brute force, shape cache, fill_tree."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from offspec.speculative import sequoia
from offspec.speculative.sampling import SamplingParams, TreeSampler, gumbel_noise, process_logits
from offspec.speculative.sequoia import (
    TreeShape,
    expected_accepted,
    fill_tree,
    load_shapes,
    optimal_tree_shape,
    save_shapes,
)
from offspec.speculative.verify import verify_greedy

from .fakes import FakeLM
from .oracles import speculative_generate
from .test_specexec import plain_greedy

Forest = tuple["Forest", ...]


def forests(m: int, depth: int, width: int, roots: int | None = None) -> Iterator[Forest]:
    """Every ordered forest of m nodes (children are ranks 0..c-1), depth <= depth, at most `roots` (width) roots."""
    roots = width if roots is None else roots
    if m == 0:
        yield ()
        return
    if depth == 0 or roots == 0:
        return
    for j in range(1, m + 1):
        for first in forests(j - 1, depth - 1, width):
            for rest in forests(m - j, depth, width, roots - 1):
                yield (first, *rest)


def forest_value(f: Forest, p: list[float]) -> float:
    return sum(p[k] * (1.0 + forest_value(child, p)) for k, child in enumerate(f))


def brute_best(p: list[float], budget: int, depth: int) -> float | None:
    values = [forest_value(f, p) for f in forests(budget, depth, len(p))]
    return max(values) if values else None


P_VECTORS = [
    [0.6, 0.2, 0.1],
    [0.35, 0.3, 0.2, 0.1],
    [0.9],
    [0.1, 0.4, 0.3],  # not sorted
    [0.5, 0.0, 0.3],  # a useless rank
    [0.25, 0.25, 0.25, 0.25],
]


@pytest.mark.parametrize("p", P_VECTORS)
@pytest.mark.parametrize("depth", [1, 2, 3, 7])
def test_dp_equals_brute_force(p: list[float], depth: int) -> None:
    for budget in range(7, -1, -1):  # one DP table for 7, the smaller budgets read off it
        shape = optimal_tree_shape(p, budget, depth)
        best = brute_best(p, budget, depth)
        if best is None:  # more nodes than width/depth allow: the shape holds as many as fit
            assert shape.budget < budget
            assert brute_best(p, shape.budget, depth) == pytest.approx(expected_accepted(shape, p))
            continue
        assert shape.budget == budget
        assert max(shape.depths) <= depth and max(shape.num_children) <= len(p)
        assert expected_accepted(shape, p) == pytest.approx(best, abs=1e-9)
        assert sequoia._SHAPES[sequoia._key(p, budget, depth)][0] == pytest.approx(best, abs=1e-9)


def test_expected_value_non_decreasing_in_budget() -> None:
    p = [0.45, 0.2, 0.1, 0.05, 0.02]
    values = [expected_accepted(optimal_tree_shape(p, b, 6), p) for b in range(0, 60)]
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))
    assert values[-1] > values[10] > values[1] == pytest.approx(0.45)
    chain = optimal_tree_shape([0.8], 5, 10)
    assert chain.parents == (-1, 0, 1, 2, 3, 4)
    assert expected_accepted(chain, [0.8]) == pytest.approx(sum(0.8**k for k in range(1, 6)))


def test_shape_is_bfs_and_validated() -> None:
    shape = optimal_tree_shape([0.5, 0.3, 0.1], 30, 5)
    ps = shape.parents
    assert ps[0] == -1 and all(ps[i - 1] <= ps[i] < i for i in range(2, len(ps)))
    with pytest.raises(ValueError):
        TreeShape((-1, 0, 1, 0))
    assert TreeShape((-1, 0, 0, 1)).ranks == [0, 0, 1, 0]


def test_shape_cache_roundtrip(tmp_path: Path) -> None:
    p = [0.5, 0.25, 0.125]
    shapes = {b: optimal_tree_shape(p, b, 4) for b in (5, 9)}
    path = tmp_path / "shapes.json"
    assert save_shapes(path) >= 2
    saved = dict(sequoia._SHAPES)
    sequoia._SHAPES.clear()
    try:
        assert load_shapes(path) == len(saved)
        assert sequoia._SHAPES == saved
        for b, shape in shapes.items():
            assert optimal_tree_shape(p, b, 4) == shape
    finally:
        sequoia._SHAPES.update(saved)


def test_fill_tree_greedy_follows_shape_and_draft_ranks() -> None:
    ctx = [1, 0, 2]
    draft = FakeLM(vocab=6, seed=7)
    shape = TreeShape((-1, 0, 0, 0, 1, 1, 2, 4, 4, 7))
    grown = fill_tree(draft, ctx, shape)
    tree = grown.tree
    assert tree.parents.tolist() == list(shape.parents)
    assert grown.rounds == 4  # pending, then the levels at depth 1, 2, 3 that have children
    for i in range(tree.size):
        kids = tree.children(i)
        if kids:
            ranked = draft.next_logits(ctx + tree.path_tokens(i)[1:]).topk(len(kids)).indices.tolist()
            assert [tree.token(k) for k in kids] == ranked
            logq = torch.log_softmax(draft.next_logits(ctx + tree.path_tokens(i)[1:]), -1)
            for k in kids:
                assert float(tree.logprobs[k]) == pytest.approx(float(tree.logprobs[i] + logq[tree.token(k)]), abs=1e-5)
    assert grown.cached_nodes == [1, 2, 4, 7]
    assert draft.cache.tokens.tolist() == ctx + [tree.token(n) for n in grown.cached_nodes]


def test_fill_tree_ranks_children_by_the_given_rule() -> None:
    """With the target's sampling rule, children are the draft's perturbed top-k; impossible tokens are not drafted."""
    draft = FakeLM(vocab=6, seed=7)
    shape = TreeShape((-1, 0, 0, 0, 0, 0, 0, 1, 1))
    params = SamplingParams(temperature=0.8, top_k=4)
    sampler = TreeSampler(params, 11, [3], 1)
    tree = fill_tree(draft, [3, 4], shape, sampler.rank_logits).tree
    assert len(tree.children(0)) == 4  # top-k=4 leaves only 4 possible tokens
    perturbed = process_logits(draft.next_logits([3, 4]), params) + gumbel_noise(11, [2], 6)[0]
    assert [tree.token(k) for k in tree.children(0)] == perturbed.topk(4).indices.tolist()
    assert len(tree.children(tree.children(0)[0])) == 2


def test_speculative_greedy_with_sequoia_shape_equals_greedy() -> None:
    target = FakeLM(vocab=9, seed=4)
    draft = target.perturbed(1.0, seed=2)
    shape = optimal_tree_shape([0.6, 0.2, 0.1], 12, 5)
    out = speculative_generate(target, draft, [2, 7], 30, lambda d, pend: fill_tree(d, pend, shape), verify_greedy)
    assert out == plain_greedy(target, [2, 7], 30)
