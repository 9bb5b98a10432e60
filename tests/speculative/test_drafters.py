"""Drafters on fake models: seeded verification keeps the target distribution on n-gram and hybrid trees; the
shape cache."""

from __future__ import annotations

import logging
import random

import pytest
import torch

from offspec.speculative.drafters import GrowOptions, HybridDrafter, ModelDrafter, NgramDrafter, ShapeCache
from offspec.speculative.ngram import NgramIndex
from offspec.speculative.sampling import SamplingParams, TreeSampler, probs
from offspec.speculative.verify import forward_tree, verify_tree

from .fakes import FakeLM, prefill
from .test_verify import chi2_pvalue

VOCAB = 6
PROMPT = [2, 5, 1, 3, 2, 5, 1]
TRIALS = 500  # seeds


def _datastore() -> NgramIndex:
    rng = random.Random(3)
    index = NgramIndex(max_n=4)
    index.add_datastore([rng.randrange(VOCAB) for _ in range(300)])  # every short context has several continuations
    return index


def _tree(kind: str, ctx: list[int], rank_logits):
    if kind == "ngram":
        drafter = NgramDrafter(_datastore(), min_n=1)
    else:
        draft = FakeLM(vocab=VOCAB, seed=21, scale=1.0).perturbed(1.5, seed=5)
        drafter = HybridDrafter(ModelDrafter(draft), NgramDrafter(_datastore(), min_n=1), ngram_share=0.5)
    drafter.start(ctx)
    return drafter.grow(8, GrowOptions(branch=3, max_depth=3, rank_logits=rank_logits)).tree


def _step(kind: str, targets: dict, ctx: list[int], params: SamplingParams, seed: int) -> list[int]:
    """One engine step on fakes: the drafter's tree (a model part ranks by the target's rule and noise), verified
    by following the target's seeded choice."""
    sampler = TreeSampler(params, seed, ctx[:-1], len(ctx) - 1)
    tree = _tree(kind, ctx, sampler.rank_logits)
    assert tree.size > 3
    target = targets[tuple(ctx)]
    logits = forward_tree(target, tree)
    target.cache.crop(len(ctx) - 1)
    return verify_tree(tree, lambda node, path: sampler.choose(logits[node], path)).tokens


@pytest.mark.parametrize("kind", ["ngram", "hybrid"])
def test_seeded_verification_of_drafter_trees_keeps_target_distribution(kind: str) -> None:
    """Over seeds, the first two tokens follow the target (chi-square) although n-gram children are no draws from
    any model: verification follows the target's choice through whatever tree it gets."""
    params = SamplingParams(0.9, top_k=5)
    targets = {}  # context -> target holding the context minus its root
    for ctx in [PROMPT] + [PROMPT + [a] for a in range(VOCAB)]:
        target = FakeLM(vocab=VOCAB, seed=21, scale=1.0)
        prefill(target, ctx[:-1])
        targets[tuple(ctx)] = target
    target = FakeLM(vocab=VOCAB, seed=21, scale=1.0)
    p1 = probs(target.next_logits(PROMPT), params, [PROMPT])
    p2 = torch.stack([probs(target.next_logits(PROMPT + [a]), params, [PROMPT + [a]]) for a in range(VOCAB)])
    want = (p1[:, None] * p2).reshape(-1)
    counts = torch.zeros(VOCAB * VOCAB)
    deep = 0
    for seed in range(TRIALS):
        tokens = _step(kind, targets, PROMPT, params, seed)
        if len(tokens) < 2:
            tokens = tokens + _step(kind, targets, PROMPT + tokens, params, seed)
        else:
            deep += 1
        counts[tokens[0] * VOCAB + tokens[1]] += 1
    assert deep > TRIALS // 10
    assert chi2_pvalue(counts, want) > 0.001


def test_shape_cache_persists_and_warns_once_when_read_only(tmp_path, caplog) -> None:
    from offspec.speculative import sequoia

    saved = dict(sequoia._SHAPES)
    try:
        sequoia._SHAPES.clear()
        path = tmp_path / "sequoia" / "t--d.json"
        cache = ShapeCache(path)
        cache.load()
        shape = sequoia.optimal_tree_shape([0.5, 0.2], 9, 4)
        cache.save()
        assert path.is_file()
        sequoia._SHAPES.clear()
        ShapeCache(path).load()  # a new process reads the shapes instead of solving the DP again
        assert sequoia._key([0.5, 0.2], 9, 4) in sequoia._SHAPES
        assert sequoia.optimal_tree_shape([0.5, 0.2], 9, 4) == shape
        blocker = tmp_path / "not-a-folder"
        blocker.write_text("x")
        blocked = ShapeCache(blocker / "sequoia" / "x.json")  # cannot be created: like a read-only home
        blocked.load()
        sequoia.optimal_tree_shape([0.5, 0.3], 7, 4)
        with caplog.at_level(logging.WARNING, logger="offspec"):
            blocked.save()
            sequoia.optimal_tree_shape([0.5, 0.3], 8, 4)
            blocked.save()
        assert len([r for r in caplog.records if "not saving Sequoia shapes" in r.getMessage()]) == 1
    finally:
        sequoia._SHAPES.clear()
        sequoia._SHAPES.update(saved)
