"""DraftTree bookkeeping."""

from __future__ import annotations

import pytest
import torch

from offspec.speculative.tree import DraftTree


def build() -> DraftTree:
    #        0(t=9)
    #      /   \
    #    1(5)  2(6)
    #    / \     \
    #  3(1) 4(2)  5(3)
    #   |
    #  6(4)
    tree = DraftTree(9, capacity=2)
    assert tree.add(0, [5, 6], [-0.1, -0.5]).tolist() == [1, 2]
    assert tree.add(1, [1, 2], [-0.2, -0.9]).tolist() == [3, 4]
    assert tree.add(2, torch.tensor([3]), torch.tensor([-0.7])).tolist() == [5]
    assert tree.add(3, [4], [-0.4]).tolist() == [6]
    return tree


def test_structure_and_growth() -> None:
    tree = build()
    assert tree.size == 7 and tree.budget == 6
    assert tree.tokens.tolist() == [9, 5, 6, 1, 2, 3, 4]
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 2, 3]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert tree.logprobs.tolist() == pytest.approx([0.0, -0.1, -0.5, -0.2, -0.9, -0.7, -0.4])
    assert tree.children(0) == [1, 2] and tree.children(1) == [3, 4] and tree.children(6) == []
    assert tree.path(6) == [0, 1, 3, 6] and tree.path(0) == [0]
    assert tree.path_tokens(5) == [9, 6, 3]
    assert [tree.rank(i) for i in range(7)] == [0, 0, 1, 0, 1, 0, 0]


def test_ancestor_rows() -> None:
    tree = build()
    anc = tree.ancestors
    assert anc.shape == (7, 7)
    for i in range(tree.size):
        assert set(torch.nonzero(anc[i]).flatten().tolist()) == set(tree.path(i))
        p = tree.parent(i)
        if p >= 0:
            expect = anc[p].clone()
            expect[i] = True
            assert torch.equal(anc[i], expect)


def test_mask_rows_and_batch_add() -> None:
    tree = build()
    rows = torch.tensor([6, 5])
    cols = torch.tensor([1, -1, 3, 2])
    assert tree.mask_rows(rows, cols).tolist() == [[True, False, True, False], [False, False, False, True]]
    idx = tree.add(torch.tensor([6, 5, 6]), [7, 8, 0], [-1.0, -2.0, -3.0])
    assert idx.tolist() == [7, 8, 9]
    assert tree.children(6) == [7, 9] and tree.depths[7:].tolist() == [4, 3, 4]


def test_growth_beyond_capacity() -> None:
    tree = DraftTree(0, capacity=2)
    node = 0
    for d in range(1, 200):
        node = int(tree.add(node, [d % 11], [-float(d)])[0])
    assert tree.size == 200
    assert tree.depths[-1] == 199
    assert bool(tree.ancestors[199].all())
    assert tree.ancestors.sum() == 200 * 201 // 2
    with pytest.raises(IndexError):
        tree.add(500, [1], [0.0])


def test_select_keeps_ancestor_closed_sets() -> None:
    tree = build()
    small, remap = tree.select(torch.tensor([0, 1, 3, 6]))
    assert remap.tolist() == [0, 1, -1, 2, -1, -1, 3]
    assert small.tokens.tolist() == [9, 5, 1, 4]
    assert small.parents.tolist() == [-1, 0, 1, 2]
    assert small.ancestors.tolist() == torch.ones(4, 4, dtype=torch.bool).tril().tolist()
    with pytest.raises(ValueError):
        tree.select(torch.tensor([0, 3]))


def test_best_nodes_rank_by_logprob_then_age() -> None:
    tree = DraftTree(0)
    tree.add(0, [1, 2], [-1.0, -0.5])  # 1, 2
    tree.add(2, [3], [-0.5])  # 3 ties with its parent 2: the parent comes first
    assert tree.best_nodes().tolist() == [2, 3, 1]
    assert tree.best_nodes(2).tolist() == [2, 3]


def test_subtree_reroots_and_likeliest_path_follows_the_best_child() -> None:
    tree = DraftTree(9)
    tree.add(0, [5, 6], [-0.1, -0.2])  # 1, 2
    tree.add(1, [1, 2], [-0.3, -0.9])  # 3, 4
    tree.add(3, [7], [-0.5])  # 5
    assert tree.likeliest_path() == [1, 3, 5]
    sub, remap = tree.subtree(1)
    assert remap.tolist() == [-1, 0, -1, 1, 2, 3]
    assert sub.tokens.tolist() == [5, 1, 2, 7] and sub.parents.tolist() == [-1, 0, 0, 1]
    assert sub.depths.tolist() == [0, 1, 1, 2]
    assert sub.logprobs.tolist() == pytest.approx([0.0, -0.2, -0.8, -0.4])
    assert sub.ancestors.tolist() == [[True, False, False, False], [True, True, False, False],
                                      [True, False, True, False], [True, True, False, True]]
    assert sub.children(0) == [1, 2] and sub.path_tokens(3) == [5, 1, 7]


def test_tree_state_is_tensors_on_its_device_only():
    """No Python list mirrors the tensors (a graph-captured drafter can keep the tree on its device)."""
    tree = DraftTree(3, capacity=2, device="cpu")
    idx = tree.add(0, [4, 5], [-0.1, -0.2])
    tree.add(idx[:1], [6], [-0.3])
    for name, value in vars(tree).items():
        assert isinstance(value, (torch.Tensor, int, torch.device)), f"{name} is a {type(value).__name__}"
        if isinstance(value, torch.Tensor):
            assert value.device == tree.device
    assert tree.children(0) == [1, 2] and tree.path(3) == [0, 1, 3] and tree.path_tokens(3) == [3, 4, 6]
    assert tree.rank(2) == 1 and tree.likeliest_path() == [1, 3]
    sub, remap = tree.subtree(1)
    assert sub.tokens.tolist() == [4, 6] and remap.tolist() == [-1, 0, -1, 1]
