"""The n-gram index against brute force on random token strings, and the tree it proposes."""

from __future__ import annotations

import math
import random

import pytest

from offspec.speculative.drafters import GrowOptions, NgramDrafter, extend_with_ngrams
from offspec.speculative.ngram import NgramIndex, propose
from offspec.speculative.tree import DraftTree


def brute_continuations(ids: list[int], context: list[int], max_n: int, min_n: int = 1) -> tuple[int, dict[int, int]]:
    """Longest suffix of context (<= max_n, >= min_n) occurring in ids with a next token; counts of those next tokens."""
    for n in range(min(max_n, len(context)), min_n - 1, -1):
        suffix = context[len(context) - n :]
        counts: dict[int, int] = {}
        for j in range(len(ids) - n):
            if ids[j : j + n] == suffix:
                counts[ids[j + n]] = counts.get(ids[j + n], 0) + 1
        if counts:
            return n, counts
    return 0, {}


def random_string(rng: random.Random, n: int, vocab: int) -> list[int]:
    # a few repeated motifs make long matches likely, as in code and edits
    motifs = [[rng.randrange(vocab) for _ in range(rng.randint(2, 6))] for _ in range(4)]
    out: list[int] = []
    while len(out) < n:
        out += rng.choice(motifs) if rng.random() < 0.6 else [rng.randrange(vocab)]
    return out[:n]


@pytest.mark.parametrize("seed", range(6))
def test_longest_match_and_counts_equal_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    ids = random_string(rng, 120, vocab=rng.choice([3, 5, 12]))
    index = NgramIndex(max_n=5)
    index.extend(ids)
    for _ in range(40):
        ctx = ids[: rng.randint(1, len(ids))] if rng.random() < 0.5 else random_string(rng, rng.randint(1, 8), 12)
        for min_n in (1, 2):
            assert index.continuations(ctx, min_n) == brute_continuations(ids, ctx, 5, min_n)


def test_adding_tokens_keeps_the_index_consistent() -> None:
    rng = random.Random(7)
    ids = random_string(rng, 200, vocab=6)
    grown = NgramIndex(max_n=4)
    for i in range(0, 200, 13):  # in pieces, as passes commit tokens
        grown.extend(ids[i : i + 13])
    grown.truncate(150)  # a chat edit drops the tail
    grown.sync(ids[:150] + [5, 5, 1])  # and a new turn appends
    fresh = NgramIndex(max_n=4)
    fresh.extend(ids[:150] + [5, 5, 1])
    assert grown._next == fresh._next and grown.ids == fresh.ids


def test_datastore_counts_join_but_not_the_live_string() -> None:
    index = NgramIndex(max_n=3)
    index.add_datastore([1, 2, 3, 1, 2, 4])
    index.extend([9, 1, 2])
    assert index.ids == [9, 1, 2]
    assert index.continuations([9, 1, 2]) == (2, {3: 1, 4: 1})


def brute_top_paths(index: NgramIndex, context: list[int], budget: int, depth: int, min_n: int,
                    branch: int) -> list[float]:
    """Scores of the `budget` best nodes among every path up to `depth` (children = top-`branch` continuations)."""
    scores: list[float] = []
    frontier = [([], 0.0)]
    for _ in range(depth):
        nxt = []
        for path, score in frontier:
            _, counts = index.continuations((context + path)[-index.max_n :], min_n)
            total = sum(counts.values())
            for tok, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:branch]:
                nxt.append((path + [tok], score + math.log(c / total)))
        scores += [s for _, s in nxt]
        frontier = nxt
    return sorted(scores, reverse=True)[:budget]


@pytest.mark.parametrize("seed,budget,branch", [(0, 5, 8), (1, 12, 2), (2, 30, 3), (3, 1, 8)])
def test_proposed_tree_holds_the_most_frequent_continuations(seed: int, budget: int, branch: int) -> None:
    rng = random.Random(seed)
    ids = random_string(rng, 150, vocab=5)
    index = NgramIndex(max_n=4)
    index.extend(ids)
    parents, tokens, scores = propose(index, ids, budget, max_depth=4, min_n=1, branch=branch)
    want = brute_top_paths(index, ids, budget, 4, 1, branch)
    assert sorted(scores, reverse=True) == pytest.approx(want)
    assert all(p < i for i, p in enumerate(parents))  # ancestor-closed, parents first
    for i, p in enumerate(parents):  # each node's score = its parent's + log(count / total) of its token
        path = []
        j = i
        while j >= 0:
            path.append(tokens[j])
            j = parents[j]
        path = path[::-1]
        _, counts = index.continuations((ids + path[:-1])[-4:], 1)
        base = scores[p] if p >= 0 else 0.0
        assert scores[i] == pytest.approx(base + math.log(counts[tokens[i]] / sum(counts.values())))
    _, _, kept = propose(index, ids, budget, max_depth=4, min_n=1, branch=branch, min_prob=0.2)
    assert kept == [s for s in scores if s >= math.log(0.2)]  # a probability floor cuts the tail, nothing else


def test_drafter_proposes_nothing_without_a_match_and_tracks_commits() -> None:
    drafter = NgramDrafter()
    drafter.start([1, 2, 3, 4])
    assert drafter.grow(16, GrowOptions()).tree.size == 1  # nothing seen twice: a plain step follows
    drafter.commit([1, 2])  # context 1 2 3 4 1 2: "1 2" was followed by 3
    d = drafter.grow(16, GrowOptions())
    assert d.tree.token(0) == 2 and d.rounds == 0
    assert d.tree.path_tokens(d.tree.size - 1)[:3] == [2, 3, 4]  # the chain 3 4 1 2 ... continues the match


def test_hybrid_extends_drafted_leaves_from_the_index() -> None:
    index = NgramIndex(max_n=4)
    ctx = [7, 1, 2, 3, 4, 5, 9, 1]
    index.extend(ctx)
    tree = DraftTree(1)
    tree.add(0, [2, 8], [-0.1, -1.0])  # the draft proposed 2 (matches the index) and 8 (unseen)
    added = extend_with_ngrams(tree, index, ctx, budget=5, max_depth=8, min_n=1)
    assert added == 3 and tree.budget == 5
    assert tree.path_tokens(tree.size - 1) == [1, 2, 3, 4, 5]  # leaf 2 extended along 3 4 5
    assert [tree.token(c) for c in tree.children(0)] == [2, 8]  # no duplicate child
