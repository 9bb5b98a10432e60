"""Drafters on fake models: sampling keeps the target distribution on n-gram and hybrid trees; the shape cache."""

from __future__ import annotations

import logging
import random

import pytest
import torch

from offspec.speculative.drafters import GrowOptions, HybridDrafter, ModelDrafter, NgramDrafter, ShapeCache
from offspec.speculative.ngram import NgramIndex
from offspec.speculative.sampling import SamplingParams, probs
from offspec.speculative.verify import forward_tree, verify_sample_match

from .fakes import FakeLM, prefill
from .test_verify import chi2_pvalue

VOCAB = 6
PROMPT = [2, 5, 1, 3, 2, 5, 1]
TRIALS = 1500


def _datastore() -> NgramIndex:
    rng = random.Random(3)
    index = NgramIndex(max_n=4)
    index.add_datastore([rng.randrange(VOCAB) for _ in range(300)])  # every short context has several continuations
    return index


def _tree(kind: str, ctx: list[int]):
    if kind == "ngram":
        drafter = NgramDrafter(_datastore(), min_n=1)
    else:
        draft = FakeLM(vocab=VOCAB, seed=21, scale=1.0).perturbed(1.5, seed=5)
        drafter = HybridDrafter(ModelDrafter(draft), NgramDrafter(_datastore(), min_n=1), ngram_share=0.5)
    drafter.start(ctx)
    return drafter.grow(8, GrowOptions(expand=2, branch=3, max_depth=3)).tree


@pytest.mark.parametrize("kind", ["ngram", "hybrid"])
def test_sample_match_on_drafter_trees_keeps_target_distribution(kind: str) -> None:
    params = SamplingParams(0.9, top_k=5)
    steps = {}
    for ctx in [PROMPT] + [PROMPT + [a] for a in range(VOCAB)]:
        target = FakeLM(vocab=VOCAB, seed=21, scale=1.0)
        prefill(target, ctx[:-1])
        tree = _tree(kind, ctx)
        assert tree.size > 3
        steps[tuple(ctx)] = (tree, forward_tree(target, tree))
    target = FakeLM(vocab=VOCAB, seed=21, scale=1.0)
    p1 = probs(target.next_logits(PROMPT), params)
    p2 = torch.stack([probs(target.next_logits(PROMPT + [a]), params) for a in range(VOCAB)])
    want = (p1[:, None] * p2).reshape(-1)
    g = torch.Generator().manual_seed(99)
    counts = torch.zeros(VOCAB * VOCAB)
    deep = 0
    for _ in range(TRIALS):
        tokens = verify_sample_match(*steps[tuple(PROMPT)], params, g).tokens
        if len(tokens) < 2:
            tokens = tokens + verify_sample_match(*steps[tuple(PROMPT + tokens)], params, g).tokens
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
