"""Level-batched growth (one draft forward per tree level, tensor bookkeeping) against the node-by-node growth it
replaced, and a count of what growth reads back to the host: per level, never per node."""

from __future__ import annotations

import random

import pytest
import torch
from torch.overrides import TorchFunctionMode

from offspec.speculative import specexec
from offspec.speculative.drafters import extend_with_ngrams
from offspec.speculative.ngram import NgramIndex
from offspec.speculative.sampling import SamplingParams, TreeSampler
from offspec.speculative.sequoia import TreeShape, fill_tree, optimal_tree_shape
from offspec.speculative.specexec import grow_tree
from offspec.speculative.tree import DraftTree

from . import node_by_node
from .fakes import FakeLM, prefill

CTX = [1, 3, 0, 2, 4]
RANKINGS = {  # how children are ranked: the draft's own logits, or the target's rule and noise
    "draft": None,
    "seeded": SamplingParams(0.8, top_k=4),
    "penalties": SamplingParams(0.0, repeat_penalty=1.6, frequency_penalty=0.4),
}


def _rank(name: str, ctx: list[int]):
    params = RANKINGS[name]
    return None if params is None else TreeSampler(params, 7, ctx[:-1], len(ctx) - 1).rank_logits


def _paths(tree: DraftTree) -> dict[tuple[int, ...], tuple[float, int]]:
    """Each drafted node's token path -> (cumulative score, rank among its siblings)."""
    ranks = tree.ranks.tolist()
    return {tuple(tree.path_tokens(i)[1:]): (round(float(tree.logprobs[i]), 5), ranks[i]) for i in range(1, tree.size)}


def _draft(seed: int) -> FakeLM:
    draft = FakeLM(vocab=6, seed=seed, scale=1.5)
    prefill(draft, CTX[:2])
    return draft


@pytest.mark.parametrize("ranking", list(RANKINGS))
@pytest.mark.parametrize("budget,branch,depth,seed", [(1, 3, 4, 0), (9, 2, 6, 1), (40, 4, 5, 2), (150, 6, 4, 3)])
def test_specexec_levels_build_the_node_by_node_tree(ranking, budget, branch, depth, seed):
    new = grow_tree(_draft(seed), CTX[2:], budget, branch=branch, max_depth=depth, rank_logits=_rank(ranking, CTX))
    old = node_by_node.grow_tree(_draft(seed), CTX[2:], budget, expand=3, branch=branch, max_depth=depth,
                                 rank_logits=_rank(ranking, CTX))
    got, want = _paths(new.tree), _paths(old)
    assert set(got) == set(want)
    assert {p: s for p, (s, _) in got.items()} == {p: s for p, (s, _) in want.items()}
    assert new.rounds == 1 + max(len(p) for p in got) - (len(max(got, key=len)) == depth)  # one forward per level


@pytest.mark.parametrize("ranking", list(RANKINGS))
@pytest.mark.parametrize("p,budget,depth", [((0.6, 0.2, 0.1), 12, 4), ((0.4, 0.3, 0.2, 0.1), 40, 5),
                                            ((0.9,), 6, 6)])
def test_sequoia_levels_build_the_node_by_node_tree(ranking, p, budget, depth):
    shape = optimal_tree_shape(p, budget, depth)
    new = fill_tree(_draft(5), CTX[2:], shape, _rank(ranking, CTX)).tree
    old = node_by_node.fill_tree(_draft(5), CTX[2:], shape, _rank(ranking, CTX))
    assert _paths(new) == _paths(old)
    assert new.parents.tolist() == old.parents.tolist()  # the same nodes in the same order


def _index(seed: int, max_n: int = 4) -> NgramIndex:
    rng = random.Random(seed)
    index = NgramIndex(max_n=max_n)
    index.add_datastore([rng.randrange(6) for _ in range(400)])
    return index


@pytest.mark.parametrize("seed,budget", [(0, 5), (1, 30), (2, 120)])
def test_ngram_extension_builds_the_node_by_node_tree(seed, budget):
    index = _index(seed)
    base = grow_tree(_draft(seed), CTX[2:], 6, branch=2, max_depth=3).tree
    a, _ = base.select(torch.arange(base.size))
    b, _ = base.select(torch.arange(base.size))
    added = extend_with_ngrams(a, index, CTX, budget + 6, max_depth=8, min_n=1, branch=3)
    want = node_by_node.extend_with_ngrams(b, index, CTX, budget + 6, max_depth=8, min_n=1, branch=3)
    assert added == want > 0
    assert _paths(a) == _paths(b)


class HostReads(TorchFunctionMode):
    """Counts what reads tensor data back to the host (a device sync on CUDA): item, tolist, int/float/bool,
    numpy, nonzero, and indexing with a boolean mask. Model forwards are not counted (`paused`)."""

    READS = {"item", "tolist", "__int__", "__float__", "__bool__", "__index__", "numpy", "nonzero", "unique",
             "masked_select"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if not self.paused:
            if name in self.READS:
                self.count += 1
            elif name in ("__getitem__", "__setitem__") and len(args) > 1:
                index = args[1] if isinstance(args[1], tuple) else (args[1],)
                self.count += sum(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
        return func(*args, **(kwargs or {}))


def _uncounted_forwards(model: FakeLM, reads: HostReads) -> FakeLM:
    real = model.forward

    def forward(*a, **k):
        reads.paused = True
        try:
            return real(*a, **k)
        finally:
            reads.paused = False

    model.forward = forward
    return model


def _count(grow) -> tuple[int, object]:
    reads = HostReads()
    with reads:
        out = grow(reads)
    return reads.count, out


@pytest.mark.parametrize("ranking", ["draft", "penalties"])
def test_growth_reads_back_per_level_not_per_node(ranking):
    """Trees of the same depth, 16 and ~150 nodes: what SpecExec and Sequoia growth and the n-gram extension read
    back to the host does not grow with the nodes (the node-by-node versions read per node or per 32 nodes)."""
    def specexec_tree(budget):
        return lambda reads: grow_tree(_uncounted_forwards(_draft(3), reads), CTX[2:], budget, branch=6, max_depth=4,
                                       rank_logits=_rank(ranking, CTX))

    small, g_small = _count(specexec_tree(16))
    large, g_large = _count(specexec_tree(150))
    assert g_large.tree.size == 151 and int(g_large.tree.depths.max()) == int(g_small.tree.depths.max()) == 4
    assert large <= small + 2 and large <= 8 * g_large.rounds

    def full(width, depth):  # every node has `width` children, down to `depth`
        parents, level = [-1], [0]
        for _ in range(depth):
            nxt = []
            for node in level:
                for _ in range(width):
                    parents.append(node)
                    nxt.append(len(parents) - 1)
            level = nxt
        return TreeShape(tuple(parents))

    def sequoia_tree(width):
        return lambda reads: fill_tree(_uncounted_forwards(_draft(4), reads), CTX[2:], full(width, 3),
                                       _rank(ranking, CTX))

    small, g_small = _count(sequoia_tree(2))  # 14 nodes
    large, g_large = _count(sequoia_tree(5))  # 155 nodes
    assert g_large.tree.size == 156
    assert large <= small + 2

    def ngram_extension(budget):
        def run(reads):
            reads.paused = True
            tree = grow_tree(_draft(0), CTX[2:], 4, branch=2, max_depth=2).tree
            reads.paused = False
            return extend_with_ngrams(tree, _index(1, max_n=1), CTX, budget, max_depth=4, min_n=1, branch=6)
        return run

    small, added_small = _count(ngram_extension(16))
    large, added_large = _count(ngram_extension(150))
    assert added_large > 100 > added_small
    assert large <= small + 2


def test_wide_levels_rank_their_logits_a_few_rows_at_a_time(monkeypatch):
    """A model that gives logits for chosen rows is ranked LOGIT_ROWS rows at a time: the same tree."""
    class RowsLM:  # a FakeLM behind the row-selecting forward an OffloadedModel offers
        supports_logit_rows = True

        def __init__(self, inner: FakeLM) -> None:
            self.inner, self.dtype, self.cache, self.calls = inner, inner.dtype, inner.cache, 0

        def forward(self, input_ids, position_ids, attn_mask, logit_rows=None, last_only=False):
            logits = self.inner.forward(input_ids, position_ids, attn_mask)
            self.last = logits[0]
            if last_only:
                return logits[:, -1:]
            return logits if logit_rows is None else logits[:, logit_rows]

        def logits_at(self, rows):
            self.calls += 1
            return self.last[rows]

    monkeypatch.setattr(specexec, "LOGIT_ROWS", 4)
    rows = RowsLM(_draft(3))
    got = grow_tree(rows, CTX[2:], 80, branch=5, max_depth=4)
    want = grow_tree(_draft(3), CTX[2:], 80, branch=5, max_depth=4)
    assert rows.calls > got.rounds
    assert _paths(got.tree) == _paths(want.tree)
