"""Verification: greedy on hand-built trees, self-draft acceptance, and losslessness of sampling (chi-square)."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from offspec.speculative.sampling import SamplingParams, gumbel_topk, probs, process_logits
from offspec.speculative.sequoia import TreeShape, fill_tree
from offspec.speculative.specexec import grow_tree
from offspec.speculative.tree import DraftTree
from offspec.speculative.verify import (
    VerifyResult,
    forward_tree,
    verify_greedy,
    verify_sample_match,
    verify_without_replacement,
)

from .fakes import FakeLM, prefill


def hand_tree() -> DraftTree:
    tree = DraftTree(9)
    tree.add(0, [5, 6], [-0.1, -0.2])  # 1, 2
    tree.add(1, [1, 2], [-0.3, -0.4])  # 3, 4
    return tree


def peaked(rows: list[int], vocab: int = 10) -> torch.Tensor:
    out = torch.zeros(len(rows), vocab)
    out[torch.arange(len(rows)), torch.tensor(rows)] = 5.0
    return out


def test_verify_greedy_hand_built() -> None:
    tree = hand_tree()
    r = verify_greedy(tree, peaked([6, 0, 3, 0, 0]))
    assert (r.accepted, r.next_token, r.tokens, r.ranks, r.tries) == ([2], 3, [6, 3], [1], 1)
    r = verify_greedy(tree, peaked([5, 2, 0, 0, 7]))
    assert (r.accepted, r.next_token, r.tokens, r.ranks, r.tries) == ([1, 4], 7, [5, 2, 7], [0, 1], 2)
    r = verify_greedy(tree, peaked([8, 0, 0, 0, 0]))
    assert (r.accepted, r.next_token, r.tokens, r.tries) == ([], 8, [8], 1)
    r = verify_greedy(tree, peaked([5, 4, 0, 0, 0]))
    assert (r.accepted, r.next_token, r.tries) == ([1], 4, 2)  # rejected at node 1, which has children


def test_target_as_its_own_draft_accepts_its_argmax_chain() -> None:
    prompt = [3, 0, 4]
    target = FakeLM(vocab=8, seed=6)
    prefill(target, prompt[:-1])
    grown = grow_tree(FakeLM(vocab=8, seed=6), prompt, budget=40, expand=8, branch=4, max_depth=8)
    logits = forward_tree(target, grown.tree)
    chain, node = [], 0
    while grown.tree.children(node):
        node = grown.tree.children(node)[0]
        chain.append(node)
    result = verify_greedy(grown.tree, logits)
    assert result.accepted == chain and len(chain) >= 3
    assert result.next_token == int(logits[chain[-1]].argmax())
    assert verify_sample_match(grown.tree, logits, SamplingParams(0.0)).accepted == chain


def test_without_replacement_greedy_params_equals_greedy() -> None:
    target = FakeLM(vocab=6, seed=1)
    prefill(target, [1, 2])
    draft = target.perturbed(1.0, seed=3)
    g = torch.Generator().manual_seed(0)
    shape = TreeShape((-1, 0, 0, 0, 1, 1, 2, 4))
    for _ in range(20):
        draft.cache.crop(0)
        grown = fill_tree(draft, [1, 2, 3], shape, sample=True, sampling=SamplingParams(1.0), generator=g)
        logits = forward_tree(target, grown.tree)
        target.cache.crop(2)
        assert verify_without_replacement(grown.tree, logits, SamplingParams(0.0), g) == verify_greedy(grown.tree, logits)
    with pytest.raises(ValueError):
        verify_without_replacement(hand_tree(), peaked([5, 0, 0, 0, 0]), SamplingParams(1.0), g)


def chi2_pvalue(counts: torch.Tensor, p: torch.Tensor) -> float:
    """Chi-square p-value of counts against probabilities p (cells with expected < 5 merged into one)."""
    n = float(counts.sum())
    assert int(counts[p == 0].sum()) == 0, "sampled a token the target gives probability 0"
    counts, expected = counts[p > 0].double(), p[p > 0].double() * n
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]]).tolist()
    exp = torch.cat([expected[~small], expected[small].sum()[None]]).tolist()
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    exp = [e * sum(obs) / sum(exp) for e in exp]
    return float(chisquare(obs, exp).pvalue)


PROMPT = [2, 5, 1]
VOCAB = 6
TRIALS = 1500  # at this size a residual or draft-renormalisation bug gives p < 1e-15
TRIALS_E2E = 800
PARAMS = [SamplingParams(1.0), SamplingParams(0.8, top_p=0.95, top_k=4)]


def pair_distribution(target: FakeLM, params: SamplingParams) -> torch.Tensor:
    """[V * V] exact target probabilities of the first two generated tokens."""
    p1 = probs(target.next_logits(PROMPT), params)
    p2 = torch.stack([probs(target.next_logits(PROMPT + [a]), params) for a in range(VOCAB)])
    return (p1[:, None] * p2).reshape(-1)


def models() -> tuple[FakeLM, FakeLM]:
    target = FakeLM(vocab=VOCAB, seed=21, scale=1.0)
    return target, target.perturbed(1.5, seed=5)  # a poor draft: many rejections exercise the residuals


@pytest.mark.parametrize("params", PARAMS, ids=["t1", "t0.8-p0.95-k4"])
def test_sample_match_keeps_target_distribution(params: SamplingParams) -> None:
    target, _ = models()
    steps = {}  # context -> (tree, target logits); trees are deterministic given the context
    for ctx in [PROMPT] + [PROMPT + [a] for a in range(VOCAB)]:
        t, d = models()
        prefill(t, ctx[:-1])
        tree = grow_tree(d, ctx, budget=6, expand=2, branch=3, max_depth=3).tree
        steps[tuple(ctx)] = (tree, forward_tree(t, tree))
    g = torch.Generator().manual_seed(1234)
    counts = torch.zeros(VOCAB * VOCAB)
    deep = 0
    for _ in range(TRIALS):
        tokens = verify_sample_match(*steps[tuple(PROMPT)], params, g).tokens
        if len(tokens) < 2:
            tokens = tokens + verify_sample_match(*steps[tuple(PROMPT + tokens)], params, g).tokens
        else:
            deep += 1
        counts[tokens[0] * VOCAB + tokens[1]] += 1
    assert deep > TRIALS // 10  # the tree really supplied the second token often
    assert chi2_pvalue(counts, pair_distribution(target, params)) > 0.001


def test_gumbel_topk_samples_without_replacement() -> None:
    q = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0])
    draws = gumbel_topk(q.log().expand(20000, -1), 2, torch.Generator().manual_seed(7))  # [20000, 2]
    first = q[:, None]
    second = q[None, :] / (1 - q[:, None])
    second.fill_diagonal_(0)
    pair = (first * second).reshape(-1)
    counts = torch.bincount(draws[:, 0] * 5 + draws[:, 1], minlength=25).float()
    assert chi2_pvalue(counts, pair) > 0.001


class PathTables:
    """Draft and target logits after any continuation of PROMPT, memoised (the fakes' reference function)."""

    def __init__(self, target: FakeLM, draft: FakeLM) -> None:
        self.target, self.draft = target, draft
        self.rows: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, ctx: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        if ctx not in self.rows:
            self.rows[ctx] = (self.draft.next_logits(list(ctx)), self.target.next_logits(list(ctx)))
        return self.rows[ctx]


def sampled_tree(
    tables: PathTables, ctx: list[int], shape: TreeShape, params: SamplingParams, g: torch.Generator
) -> tuple[DraftTree, torch.Tensor]:
    """What fill_tree(sample=True) builds, without models: (tree, target logits [N, V])."""
    tree = DraftTree(ctx[-1])
    to_tree = {0: 0}
    for s in range(shape.size):
        kids = [c for c in range(1, shape.size) if shape.parents[c] == s]
        if not kids or s not in to_tree:  # s is missing when q had fewer tokens than its parent's children
            continue
        node = to_tree[s]
        draft_logits, _ = tables(tuple(ctx + tree.path_tokens(node)[1:]))
        q = process_logits(draft_logits, params).softmax(-1)
        toks = gumbel_topk(q.log(), min(len(kids), int((q > 0).sum())), g)
        tree.draft_probs[node] = q
        for c, t in zip(kids, tree.add(node, toks, torch.zeros(toks.shape[0])).tolist()):
            to_tree[c] = t
    logits = torch.stack([tables(tuple(ctx + tree.path_tokens(i)[1:]))[1] for i in range(tree.size)])
    return tree, logits


@pytest.mark.parametrize("params", PARAMS, ids=["t1", "t0.8-p0.95-k4"])
def test_without_replacement_keeps_target_distribution(params: SamplingParams) -> None:
    target, draft = models()
    tables = PathTables(target, draft)
    shape = TreeShape((-1, 0, 0, 0, 1, 1, 2))
    g = torch.Generator().manual_seed(4321)
    counts = torch.zeros(VOCAB * VOCAB)
    deep = 0
    for _ in range(TRIALS):
        tokens = verify_without_replacement(*sampled_tree(tables, PROMPT, shape, params, g), params, g).tokens
        if len(tokens) < 2:
            tokens = tokens + verify_without_replacement(*sampled_tree(tables, PROMPT + tokens, shape, params, g), params, g).tokens
        else:
            deep += 1
        counts[tokens[0] * VOCAB + tokens[1]] += 1
    assert deep > TRIALS // 10
    assert chi2_pvalue(counts, pair_distribution(target, params)) > 0.001


def test_fill_tree_without_replacement_end_to_end() -> None:
    """The same check through fill_tree and a target tree pass (fewer trials: models in the loop)."""
    params = PARAMS[1]
    target, draft = models()
    targets = {}  # context -> target holding the context minus its root
    for ctx in [PROMPT] + [PROMPT + [a] for a in range(VOCAB)]:
        t, _ = models()
        prefill(t, ctx[:-1])
        targets[tuple(ctx)] = t
    shape = TreeShape((-1, 0, 0, 0, 1, 1, 2))
    g = torch.Generator().manual_seed(99)

    def step(ctx: list[int]) -> VerifyResult:
        draft.cache.crop(0)
        tree = fill_tree(draft, ctx, shape, sample=True, sampling=params, generator=g).tree
        t = targets[tuple(ctx)]
        logits = forward_tree(t, tree)
        t.cache.crop(len(ctx) - 1)
        return verify_without_replacement(tree, logits, params, g)

    counts = torch.zeros(VOCAB * VOCAB)
    for _ in range(TRIALS_E2E):
        tokens = step(PROMPT).tokens
        if len(tokens) < 2:
            tokens = tokens + step(PROMPT + tokens).tokens
        counts[tokens[0] * VOCAB + tokens[1]] += 1
    assert chi2_pvalue(counts, pair_distribution(target, params)) > 0.001
