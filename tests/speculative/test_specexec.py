"""grow_tree against exhaustive enumeration; draft cache contents; tree pass vs path decoding; engine loop."""

from __future__ import annotations

import pytest
import torch

from offspec.speculative import specexec
from offspec.speculative.specexec import GrowResult, advance_draft, grow_tree
from offspec.speculative.tree import DraftTree
from offspec.speculative.verify import verify_greedy

from .fakes import FakeLM, prefill
from .oracles import assert_tree_logits_match_paths, speculative_generate


def reference_top(model: FakeLM, ctx: list[int], budget: int, branch: int, max_depth: int) -> dict[tuple[int, ...], float]:
    """The budget most probable token paths under ctx[-1] (each token within its parent's top-branch), by enumeration."""
    v = model.vocab
    root_pos = len(ctx) - 1
    seqs: list[tuple[int, ...]] = [()]
    prev = torch.tensor([ctx[-2] if len(ctx) > 1 else v])
    cur = torch.tensor([ctx[-1]])
    cum = torch.zeros(1)
    paths: dict[tuple[int, ...], float] = {}
    for d in range(1, max_depth + 1):
        n = len(seqs)
        logits = model.logits_at(prev, cur, torch.full((n,), root_pos + d - 1), torch.full((n,), root_pos + d))
        logq = torch.log_softmax(logits.float(), dim=-1).clamp_max(0.0)  # [B, V]
        vals, toks = logq.topk(min(branch, v), dim=-1)  # [B, k]
        new_cum = (cum[:, None] + vals).reshape(-1)
        seqs = [s + (int(t),) for s, row in zip(seqs, toks) for t in row]
        prev = cur.repeat_interleave(toks.shape[1])
        cur = toks.reshape(-1)
        cum = new_cum
        paths.update(zip(seqs, cum.tolist()))
    ranked = sorted(paths.items(), key=lambda kv: -kv[1])
    return dict(ranked[:budget])


def tree_paths(tree: DraftTree) -> dict[tuple[int, ...], float]:
    return {tuple(tree.path_tokens(i)[1:]): float(tree.logprobs[i]) for i in range(1, tree.size)}


def check_draft_cache(draft: FakeLM, ctx: list[int], grown: GrowResult) -> None:
    tree = grown.tree
    root_pos = len(ctx) - 1
    assert grown.cache_start == len(ctx)
    assert draft.cache.tokens.tolist() == ctx + [tree.token(n) for n in grown.cached_nodes]
    assert draft.cache.positions.tolist() == list(range(len(ctx))) + [root_pos + int(tree.depths[n]) for n in grown.cached_nodes]
    assert len(set(grown.cached_nodes)) == len(grown.cached_nodes) and 0 not in grown.cached_nodes
    inner = {i for i in range(1, tree.size) if tree.children(i)}
    assert inner <= set(grown.cached_nodes)


@pytest.mark.parametrize("budget", [1, 5, 17, 60, 150])
def test_grow_tree_is_exact_top_budget(budget: int) -> None:
    ctx = [1, 3, 0, 2]
    draft = FakeLM(vocab=5, seed=3)
    prefill(draft, ctx[:2])  # part of the context already cached, the rest pending
    grown = grow_tree(draft, ctx[2:], budget=budget, branch=5, max_depth=4)
    ref = reference_top(draft, ctx, budget, branch=5, max_depth=4)
    got = tree_paths(grown.tree)
    assert grown.tree.size == budget + 1
    assert set(got) == set(ref)
    for path, lp in ref.items():
        assert got[path] == pytest.approx(lp, abs=1e-5)
    check_draft_cache(draft, ctx, grown)


@pytest.mark.parametrize("branch,max_depth,budget", [(2, 5, 30), (3, 2, 50), (5, 1, 3), (4, 3, 200)])
def test_grow_tree_branch_and_depth_caps(branch: int, max_depth: int, budget: int) -> None:
    ctx = [4, 4, 1]
    draft = FakeLM(vocab=5, seed=11)
    grown = grow_tree(draft, ctx, budget=budget, branch=branch, max_depth=max_depth)
    ref = reference_top(draft, ctx, budget, branch=branch, max_depth=max_depth)
    assert set(tree_paths(grown.tree)) == set(ref)
    assert int(grown.tree.depths.max()) <= max_depth
    check_draft_cache(draft, ctx, grown)


@pytest.mark.parametrize("seed", [0, 2])
def test_grow_tree_drops_displaced_expanded_nodes(seed: int) -> None:
    """Nodes expanded at one level and displaced by better nodes at the next leave dead cache slots, compacted away."""
    ctx = [2, 1]
    draft = FakeLM(vocab=6, seed=seed, scale=2.0)
    grown = grow_tree(draft, ctx, budget=10, branch=6, max_depth=5)
    assert grown.tree.size == 11 and grown.rounds > 2
    assert draft.cache.keeps == 1  # expanded nodes were displaced and compacted away
    assert set(tree_paths(grown.tree)) == set(reference_top(draft, ctx, 10, branch=6, max_depth=5))
    check_draft_cache(draft, ctx, grown)


def test_grow_tree_zero_budget_only_caches_pending() -> None:
    draft = FakeLM(vocab=5)
    grown = grow_tree(draft, [1, 2, 3], budget=0)
    assert grown.tree.size == 1 and grown.cached_nodes == [] and draft.cache.length == 3


def test_tree_pass_equals_path_decoding() -> None:
    target = FakeLM(vocab=7, seed=2)
    prefill(target, [3, 1, 4, 1])
    g = torch.Generator().manual_seed(0)
    tree = DraftTree(5)
    for _ in range(25):  # random tree, repeated sibling tokens allowed
        parent = int(torch.randint(tree.size, (1,), generator=g))
        tree.add(parent, torch.randint(7, (1,), generator=g), [0.0])
    assert_tree_logits_match_paths(target, tree)
    grown = grow_tree(FakeLM(vocab=7, seed=9), [3, 1, 4, 1, 5], budget=30, branch=3)
    assert_tree_logits_match_paths(target, grown.tree)


def test_advance_draft_keeps_accepted_cached_prefix() -> None:
    ctx = [0, 1]
    draft = FakeLM(vocab=5, seed=1)
    grown = grow_tree(draft, ctx, budget=12, branch=3, max_depth=5)
    tree = grown.tree
    leaf = max(range(tree.size), key=lambda i: int(tree.depths[i]))
    path = tree.path(leaf)[1:]
    cached = [n for n in path if n in grown.cached_nodes]
    pending = advance_draft(draft, grown, path, next_token=4)
    assert draft.cache.tokens.tolist() == ctx + [tree.token(n) for n in cached]
    assert pending == [tree.token(n) for n in path[len(cached):]] + [4]


def plain_greedy(model: FakeLM, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model.next_logits(seq).argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("noise", [0.0, 1.5])
def test_speculative_greedy_equals_greedy(noise: float) -> None:
    target = FakeLM(vocab=9, seed=4)
    draft = target.perturbed(noise, seed=8) if noise else FakeLM(vocab=9, seed=4)
    prompt = [1, 2, 3]
    lengths: list[int] = []

    def step(d: FakeLM, pending: list[int]) -> GrowResult:
        return grow_tree(d, pending, budget=16, branch=4, max_depth=6)

    out = speculative_generate(target, draft, prompt, 40, step, verify_greedy, lambda g, r: lengths.append(len(r.accepted)))
    assert out == plain_greedy(target, prompt, 40)
    if noise == 0.0:
        assert min(lengths) >= 1  # the target as its own draft accepts its own argmax chain
