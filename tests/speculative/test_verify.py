"""Verification: greedy on hand-built trees, self-draft acceptance, and losslessness of seeded sampling (chi-square)."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from offspec.speculative.sampling import SamplingParams, TreeSampler, gumbel_topk, probs
from offspec.speculative.sequoia import TreeShape, fill_tree
from offspec.speculative.specexec import grow_tree
from offspec.speculative.tree import DraftTree
from offspec.speculative.verify import VerifyResult, forward_tree, verify_greedy, verify_tree

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
    grown = grow_tree(FakeLM(vocab=8, seed=6), prompt, budget=40, branch=4, max_depth=8)
    logits = forward_tree(target, grown.tree)
    chain, node = [], 0
    while grown.tree.children(node):
        node = grown.tree.children(node)[0]
        chain.append(node)
    result = verify_greedy(grown.tree, logits)
    assert result.accepted == chain and len(chain) >= 3
    assert result.next_token == int(logits[chain[-1]].argmax())
    sampler = TreeSampler(SamplingParams(0.0), None, prompt[:-1], len(prompt) - 1)
    assert verify_tree(grown.tree, lambda n, path: sampler.choose(logits[n], path)).accepted == chain


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
TRIALS = 500  # seeds per case; a verification that drifts from the target (e.g. noise keyed by draw order) fails
CASES = {
    "t0.8-p0.95-k4": SamplingParams(0.8, top_p=0.95, top_k=4),
    "min-p0.2": SamplingParams(1.2, min_p=0.2),
    "penalties": SamplingParams(1.0, repeat_penalty=1.8, presence_penalty=0.5, frequency_penalty=0.5),
}


def pair_distribution(target: FakeLM, params: SamplingParams) -> torch.Tensor:
    """[V * V] exact target probabilities of the first two generated tokens (penalties see each path)."""
    p1 = probs(target.next_logits(PROMPT), params, [PROMPT])
    p2 = torch.stack([probs(target.next_logits(PROMPT + [a]), params, [PROMPT + [a]]) for a in range(VOCAB)])
    return (p1[:, None] * p2).reshape(-1)


def models() -> tuple[FakeLM, FakeLM]:
    target = FakeLM(vocab=VOCAB, seed=21, scale=1.0)
    return target, target.perturbed(1.5, seed=5)  # a poor draft: many rejections


def test_gumbel_topk_samples_without_replacement() -> None:
    q = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0])
    draws = gumbel_topk(q.log().expand(20000, -1), 2, torch.Generator().manual_seed(7))  # [20000, 2]
    first = q[:, None]
    second = q[None, :] / (1 - q[:, None])
    second.fill_diagonal_(0)
    pair = (first * second).reshape(-1)
    counts = torch.bincount(draws[:, 0] * 5 + draws[:, 1], minlength=25).float()
    assert chi2_pvalue(counts, pair) > 0.001


def seeded_step(draft: FakeLM, targets: dict, ctx: list[int], params: SamplingParams, seed: int, tree: str) -> VerifyResult:
    """One engine step on fakes: the draft ranks by the target's rule and noise, the target verifies its choice."""
    sampler = TreeSampler(params, seed, ctx[:-1], len(ctx) - 1)
    draft.cache.crop(0)
    if tree == "sequoia":
        grown = fill_tree(draft, ctx, TreeShape((-1, 0, 0, 0, 1, 1, 2)), sampler.rank_logits)
    else:
        grown = grow_tree(draft, ctx, budget=6, branch=3, max_depth=3, rank_logits=sampler.rank_logits)
    t = targets[tuple(ctx)]
    logits = forward_tree(t, grown.tree)
    t.cache.crop(len(ctx) - 1)
    return verify_tree(grown.tree, lambda node, path: sampler.choose(logits[node], path))


@pytest.mark.parametrize("tree,case", [("specexec", "t0.8-p0.95-k4"), ("specexec", "min-p0.2"),
                                       ("specexec", "penalties"), ("sequoia", "penalties")])
def test_seeded_tree_verification_keeps_target_distribution(tree: str, case: str) -> None:
    """Over seeds, the first two tokens of tree verification with position-keyed noise follow the target (chi-square)."""
    params = CASES[case]
    target, draft = models()
    targets = {}  # context -> target holding the context minus its root
    for ctx in [PROMPT] + [PROMPT + [a] for a in range(VOCAB)]:
        t, _ = models()
        prefill(t, ctx[:-1])
        targets[tuple(ctx)] = t
    counts = torch.zeros(VOCAB * VOCAB)
    deep = 0
    for seed in range(TRIALS):
        tokens = seeded_step(draft, targets, PROMPT, params, seed, tree).tokens
        if len(tokens) < 2:
            tokens = tokens + seeded_step(draft, targets, PROMPT + tokens, params, seed, tree).tokens
        else:
            deep += 1
        counts[tokens[0] * VOCAB + tokens[1]] += 1
    assert deep > TRIALS // 10  # the tree really supplied the second token often
    assert chi2_pvalue(counts, pair_distribution(target, params)) > 0.001


def test_seeded_tree_verification_equals_plain_sampling() -> None:
    """With the same seed, the tree's tokens are those plain decoding picks position by position."""
    params = CASES["penalties"]
    target, draft = models()
    for seed in range(30):
        t, _ = models()
        prefill(t, PROMPT[:-1])
        targets = {tuple(PROMPT): t}
        got = seeded_step(draft, targets, PROMPT, params, seed, "specexec").tokens
        ctx = list(PROMPT)
        for tok in got:
            assert TreeSampler(params, seed, ctx[:-1], len(ctx) - 1).choose(target.next_logits(ctx), ctx[-1:] and
                                                                            [ctx[-1]]) == tok
            ctx.append(tok)
