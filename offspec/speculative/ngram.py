"""An n-gram index over token ids (prompt, output, history, a datastore) and the draft tree it proposes (pure Python).

For every n = 1..max_n the index maps each n-gram to the counts of the tokens that followed it. A context's
continuations are read at its longest suffix (>= min_n tokens) seen earlier with a next token. The proposed tree is
grown best-first by cumulative frequency: a node's children are the continuations of (context + path to it), each
scored count / total, so the tree holds the most frequent continuations under the budget. No model compute.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence

MAX_N = 8  # longest n-gram indexed
MIN_N = 2  # shortest suffix a proposal may rest on
MIN_PROB = 0.01  # nodes whose estimated path probability falls below this are not proposed (they cost pass compute)


class NgramIndex:
    """Counts of next tokens per n-gram (n = 1..max_n) over a growing token string, plus optional datastore strings."""

    def __init__(self, max_n: int = MAX_N) -> None:
        if max_n < 1:
            raise ValueError("max_n must be >= 1")
        self.max_n = max_n
        self.ids: list[int] = []  # the live string (context); datastore strings are counted but not kept
        self._next: dict[tuple[int, ...], dict[int, int]] = {}
        self.datastore_tokens = 0

    def __len__(self) -> int:
        return len(self.ids)

    def _count(self, ids: Sequence[int], pos: int, by: int) -> None:
        """Count ids[pos] as the continuation of every n-gram ending at pos - 1."""
        tok = ids[pos]
        for n in range(1, min(self.max_n, pos) + 1):
            key = tuple(ids[pos - n : pos])
            counts = self._next.get(key)
            if counts is None:
                counts = self._next[key] = {}
            c = counts.get(tok, 0) + by
            if c:
                counts[tok] = c
            else:
                del counts[tok]
                if not counts:
                    del self._next[key]

    def extend(self, tokens: Iterable[int]) -> None:
        """Append tokens to the live string."""
        for t in tokens:
            self.ids.append(int(t))
            self._count(self.ids, len(self.ids) - 1, 1)

    def truncate(self, length: int) -> None:
        """Drop the live string back to its first `length` tokens (a chat edit or a reset)."""
        while len(self.ids) > length:
            self._count(self.ids, len(self.ids) - 1, -1)
            self.ids.pop()

    def sync(self, ids: Sequence[int]) -> None:
        """Make the live string equal ids, keeping the common prefix (a chat turn appends; an edit truncates)."""
        n = min(len(self.ids), len(ids))
        i = 0
        while i < n and self.ids[i] == ids[i]:
            i += 1
        self.truncate(i)
        self.extend(ids[i:])

    def add_datastore(self, ids: Sequence[int]) -> None:
        """Count a separate token string (a corpus document); it never joins the live string."""
        ids = [int(t) for t in ids]
        for pos in range(1, len(ids)):
            self._count(ids, pos, 1)
        self.datastore_tokens += len(ids)

    def continuations(self, context: Sequence[int], min_n: int = 1) -> tuple[int, dict[int, int]]:
        """(n, counts): the longest suffix of context (n >= min_n) seen with a next token, and those next tokens' counts.

        (0, {}) when no suffix of at least min_n tokens was seen."""
        for n in range(min(self.max_n, len(context)), max(min_n, 1) - 1, -1):
            counts = self._next.get(tuple(context[len(context) - n :]))
            if counts:
                return n, counts
        return 0, {}


def propose(index: NgramIndex, context: Sequence[int], budget: int, max_depth: int = 32, min_n: int = MIN_N,
            branch: int = 8, min_prob: float = 0.0) -> tuple[list[int], list[int], list[float]]:
    """The top-`budget` continuation tree of context[-1]: (parents, tokens, cumulative log-frequencies) of the
    drafted nodes in creation order (parent -1 = the root context[-1], else an earlier drafted node).

    Best-first over cumulative log(count / total) (ties: the earlier-expanded parent, then the lower token id), at most
    `branch` children per node (the most frequent) and `max_depth` levels. Children never outscore their parent,
    so the result is ancestor-closed: exactly the `budget` most frequent continuations (fewer if the index runs out,
    or if the rest score below log(min_prob)).
    """
    parents: list[int] = []
    tokens: list[int] = []
    scores: list[float] = []
    if budget <= 0 or max_depth <= 0 or not context:
        return parents, tokens, scores
    tail = list(context[-index.max_n :])
    heap: list[tuple[float, int, int, int, int]] = []  # (-score, parent order, token, parent, depth)
    counter = 0

    def push(node: int, path: list[int], base: float, depth: int) -> None:
        nonlocal counter
        if depth >= max_depth:
            return
        ctx = (tail + path)[-index.max_n :]
        _, counts = index.continuations(ctx, min_n)
        if not counts:
            return
        total = sum(counts.values())
        best = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:branch]
        for tok, c in best:
            heapq.heappush(heap, (-(base + math.log(c / total)), counter, tok, node, depth + 1))
        counter += 1

    paths: list[list[int]] = []
    floor = math.log(min_prob) if min_prob > 0 else -math.inf
    push(-1, [], 0.0, 0)
    while heap and len(tokens) < budget:
        neg, _, tok, parent, depth = heapq.heappop(heap)
        if -neg < floor:
            break
        node = len(tokens)
        parents.append(parent)
        tokens.append(tok)
        scores.append(-neg)
        path = (paths[parent] if parent >= 0 else []) + [tok]
        paths.append(path[-index.max_n :])
        push(node, paths[-1], -neg, depth)
    return parents, tokens, scores
