"""The node-by-node tree growth that level-batched growth replaced, kept as an oracle: SpecExec best-first rounds of
at most `expand` nodes, Sequoia filling with per-node bookkeeping, and the n-gram extension adding one node at a
time. Level-batched growth must build the same trees (same token paths, same scores)."""

from __future__ import annotations

import heapq
import math

import torch

from offspec.runtime.masks import visibility_mask
from offspec.speculative.ngram import MIN_N, NgramIndex
from offspec.speculative.sequoia import TreeShape
from offspec.speculative.specexec import forward_pending, model_device
from offspec.speculative.tree import DraftTree


def _forward_nodes(draft, tree: DraftTree, nodes: list[int], slots: list[int], cache_start: int) -> torch.Tensor:
    rows = torch.tensor(nodes, dtype=torch.long)
    length = draft.cache.length
    e = rows.shape[0]
    visible = torch.zeros(e, length + e, dtype=torch.bool)
    visible[:, :cache_start] = True
    if slots:
        visible[:, cache_start:length] = tree.mask_rows(rows, torch.tensor(slots, dtype=torch.long))
    visible[:, length:] = tree.mask_rows(rows, rows)
    ids = tree.tokens[rows][None].to(model_device(draft))
    pos = (cache_start - 1 + tree.depths[rows])[None].to(model_device(draft))
    return draft.forward(ids, pos, visibility_mask(visible, draft.dtype))[0].float()


def _add_best_children(tree, parents: list[int], logits, branch: int, budget: int, rank_logits) -> None:
    if rank_logits is not None:
        logits = rank_logits(tree, torch.tensor(parents, dtype=torch.long), logits)
    logq = torch.log_softmax(logits.float(), dim=-1)
    k = min(branch, logq.shape[-1])
    vals, toks = logq.topk(k, dim=-1)
    vals, toks = vals.clamp_max(0.0).cpu(), toks.cpu()
    par = torch.tensor(parents, dtype=torch.long)
    cum = (tree.logprobs[par][:, None] + vals).reshape(-1)
    scores = torch.cat([tree.logprobs[1:], cum])
    top = torch.sort(scores, descending=True, stable=True).indices[:budget]
    top = top[torch.isfinite(scores[top])]
    fresh = (top[top >= tree.size - 1] - (tree.size - 1)).sort().values
    if fresh.numel():
        tree.add(par.repeat_interleave(k)[fresh], toks.reshape(-1)[fresh], cum[fresh])


def grow_tree(draft, pending: list[int], budget: int, expand: int = 32, branch: int = 8, max_depth: int = 32,
              rank_logits=None) -> DraftTree:
    """Best-first: each round, one forward over the (at most `expand`) best unexpanded nodes in the top-budget."""
    root_logits = forward_pending(draft, pending)
    cache_start = draft.cache.length
    tree = DraftTree(pending[-1])
    slots: list[int] = []
    expanded = {0}
    if budget > 0 and max_depth > 0:
        _add_best_children(tree, [0], root_logits[None], branch, budget, rank_logits)
    while True:
        top = tree.best_nodes(budget).tolist()
        depths = tree.depths.tolist()
        chosen = [i for i in top if i not in expanded and depths[i] < max_depth][:expand]
        if not chosen:
            break
        logits = _forward_nodes(draft, tree, chosen, slots, cache_start)
        slots.extend(chosen)
        expanded.update(chosen)
        _add_best_children(tree, chosen, logits, branch, budget, rank_logits)
    keep = torch.cat([torch.zeros(1, dtype=torch.long), tree.best_nodes(budget).sort().values])
    return tree.select(keep)[0]


def fill_tree(draft, pending: list[int], shape: TreeShape, rank_logits=None) -> DraftTree:
    """A Sequoia shape filled level by level, its bookkeeping node by node."""
    root_logits = forward_pending(draft, pending)
    cache_start = draft.cache.length
    tree = DraftTree(pending[-1], capacity=shape.size)
    counts, depths = shape.num_children, shape.depths
    to_tree = [-1] * shape.size
    to_tree[0] = 0
    first_child = [0] * shape.size
    for i in range(shape.size - 1, 0, -1):
        first_child[shape.parents[i]] = i
    slots: list[int] = []
    for d in range(max(depths)):
        level = [s for s in range(shape.size) if depths[s] == d and counts[s] > 0 and to_tree[s] >= 0]
        if not level:
            break
        nodes = [to_tree[s] for s in level]
        logits = root_logits[None] if d == 0 else _forward_nodes(draft, tree, nodes, slots, cache_start)
        if d:
            slots.extend(nodes)
        if rank_logits is not None:
            logits = rank_logits(tree, torch.tensor(nodes, dtype=torch.long), logits)
        logq = torch.log_softmax(logits.float(), dim=-1)
        vals, toks = logq.topk(min(max(counts[s] for s in level), logq.shape[-1]), dim=-1)
        vals, toks = vals.clamp_max(0.0), toks
        support = torch.isfinite(vals).sum(dim=-1).tolist()
        par, tok, cum, kids = [], [], [], []
        for row, s in enumerate(level):
            c = min(counts[s], support[row])
            base = float(tree.logprobs[to_tree[s]])
            par += [to_tree[s]] * c
            tok += toks[row, :c].tolist()
            cum += (base + vals[row, :c]).tolist()
            kids += range(first_child[s], first_child[s] + c)
        for s, t in zip(kids, tree.add(torch.tensor(par, dtype=torch.long), tok, cum).tolist()):
            to_tree[s] = t
    return tree


def extend_with_ngrams(tree: DraftTree, index: NgramIndex, context: list[int], budget: int, max_depth: int,
                       min_n: int = MIN_N, branch: int = 8, min_prob: float = 0.0) -> int:
    """One node at a time, reading the tree node by node."""
    room = budget - tree.budget
    if room <= 0:
        return 0
    tail = list(context[-index.max_n:])
    heap: list = []
    paths: dict[int, list[int]] = {}
    order = 0

    def path_of(node: int) -> list[int]:
        if node not in paths:
            paths[node] = [] if node == 0 else (path_of(tree.parent(node)) + [tree.token(node)])[-index.max_n:]
        return paths[node]

    def push(node: int, base: float) -> None:
        nonlocal order
        if int(tree.depths[node]) >= max_depth:
            return
        _, counts = index.continuations((tail + path_of(node))[-index.max_n:], min_n)
        if not counts:
            return
        have = set(tree.tokens[tree.children_of(node)].tolist())
        total = sum(counts.values())
        for tok, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:branch]:
            if tok not in have:
                heapq.heappush(heap, (-(base + math.log(c / total)), order, tok, node))
        order += 1

    scores = tree.logprobs.tolist()
    for node in range(tree.size):
        push(node, scores[node])
    added = 0
    floor = math.log(min_prob) if min_prob > 0 else -math.inf
    while heap and added < room:
        neg, _, tok, parent = heapq.heappop(heap)
        if -neg < floor:
            break
        if bool((tree.tokens[tree.children_of(parent)] == tok).any()):
            continue
        node = int(tree.add(parent, [tok], [-neg])[0])
        added += 1
        push(node, -neg)
    return added
