"""Sequoia: the optimal tree shape for positional acceptance rates (dynamic program), filling it, and calibration."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from offspec.errors import ConfigError
from offspec.speculative.specexec import (CausalLM, GrowResult, RankLogits, expand_nodes, forward_pending, model_device,
                                         ranked_topk)
from offspec.speculative.tree import DraftTree


@dataclass(frozen=True)
class TreeShape:
    """A tree in BFS order (root 0, parents[0] = -1); each node's children are consecutive, ranks 0..c-1."""

    parents: tuple[int, ...]

    def __post_init__(self) -> None:
        ps = self.parents
        bfs = all(0 <= ps[i] < i for i in range(1, len(ps))) and all(ps[i - 1] <= ps[i] for i in range(2, len(ps)))
        if not ps or ps[0] != -1 or not bfs:
            raise ValueError("TreeShape parents must be in BFS order: [-1, 0, ...], non-decreasing, parent < node")

    @property
    def size(self) -> int:
        return len(self.parents)

    @property
    def budget(self) -> int:
        """Drafted nodes (root excluded)."""
        return len(self.parents) - 1

    @property
    def ranks(self) -> list[int]:
        out, seen = [0], [0] * len(self.parents)
        for p in self.parents[1:]:
            out.append(seen[p])
            seen[p] += 1
        return out

    @property
    def depths(self) -> list[int]:
        out = [0]
        for p in self.parents[1:]:
            out.append(out[p] + 1)
        return out

    @property
    def num_children(self) -> list[int]:
        out = [0] * len(self.parents)
        for p in self.parents[1:]:
            out[p] += 1
        return out


def expected_accepted(shape: TreeShape, p: Sequence[float]) -> float:
    """Expected accepted drafted nodes (root excluded, bonus token excluded): sum over nodes of prod p[rank] on the path."""
    reach = [1.0] * shape.size
    total = 0.0
    for i, (parent, rank) in enumerate(zip(shape.parents, shape.ranks)):
        if i == 0:
            continue
        reach[i] = reach[parent] * (p[rank] if rank < len(p) else 0.0)
        total += reach[i]
    return total


_SHAPES: dict[tuple[tuple[float, ...], int, int], tuple[float, tuple[int, ...]]] = {}


@dataclass
class _Table:
    """The DP solved for every budget up to n: best[m] = best value with m drafted nodes (-inf if none fits)."""

    n: int
    depth: int
    best: np.ndarray  # [n + 1]
    picks: list[list[np.ndarray]]  # picks[d][k][m]: nodes given to the rank-k child's subtree (0 = none)


_TABLES: dict[tuple[tuple[float, ...], int], _Table] = {}


def _key(p: Sequence[float], budget: int, max_depth: int) -> tuple[tuple[float, ...], int, int]:
    return tuple(round(max(0.0, float(x)), 4) for x in p), int(budget), int(max_depth)


def optimal_tree_shape(p: Sequence[float], budget: int, max_depth: int) -> TreeShape:
    """The shape with min(budget, capacity) drafted nodes, depth <= max_depth, width <= len(p), maximising expected_accepted.

    p[k] = probability that the rank-k child is the accepted one (rounded to 4 decimals; results cached in memory).
    """
    if budget < 0 or max_depth < 0:
        raise ConfigError("budget and max_depth must be >= 0")
    key = _key(p, budget, max_depth)
    if key not in _SHAPES:
        table = _table(key[0], budget, max_depth)
        m = int(np.flatnonzero(np.isfinite(table.best[: budget + 1])).max())
        _SHAPES[key] = float(table.best[m]), _shape_from(table, m)
    return TreeShape(_SHAPES[key][1])


def _table(p: tuple[float, ...], budget: int, max_depth: int) -> _Table:
    """The cached DP table for (p, max_depth) if it covers budget, else a new one solved up to budget."""
    table = _TABLES.get((p, max_depth))
    if table is None or table.n < budget:
        table = _solve(p, budget, max_depth)
        _TABLES[(p, max_depth)] = table
    return table


def _solve(p: tuple[float, ...], budget: int, max_depth: int) -> _Table:
    """O(depth * width * budget^2) dynamic program over (depth left, child rank, nodes left); numpy max-plus steps.

    A smaller budget's optimum is read off the same table: its depth and width caps can never bind harder.
    """
    n, width, depth = budget, min(len(p), budget), min(max_depth, budget)
    m = np.arange(n + 1)
    neg = -np.inf
    # best[d][m]: best value of a subtree whose root has exactly m descendants within depth d; -inf if impossible
    best = [np.where(m == 0, 0.0, neg)]
    if width == 0 or depth == 0:
        return _Table(n, 0, best[0], [[]])
    rest = m[:, None] - np.arange(1, n + 1)[None, :]  # [n+1, n]: nodes left for ranks > k if child k takes j
    valid, rest_c = rest >= 0, rest.clip(min=0)
    picks: list[list[np.ndarray]] = [[]]
    for d in range(1, depth + 1):
        sub = best[d - 1][:n]  # [n]: sub[j - 1] = subtree value with j - 1 descendants
        finite = np.isfinite(sub)
        g = np.where(m == 0, 0.0, neg)  # no children ranked >= width
        level: list[np.ndarray] = [np.zeros(0)] * width
        for k in range(width - 1, -1, -1):
            gain = np.full(n, neg)  # [n]: value of a rank-k child whose subtree has j nodes, at j - 1
            gain[finite] = p[k] * (1.0 + sub[finite])
            cand = np.where(valid, gain[None, :] + g[rest_c], neg)  # [n+1, n]
            arg = cand.argmax(axis=1)
            val = cand[m, arg]
            pick = np.where(np.isfinite(val), arg + 1, 0)
            val[0], pick[0] = 0.0, 0
            level[k], g = pick, val
        best.append(g)
        picks.append(level)
    return _Table(n, depth, best[depth], picks)


def _shape_from(table: _Table, total: int) -> tuple[int, ...]:
    """BFS parent list of the optimal tree with `total` drafted nodes, read off the DP picks."""
    parents = [-1]
    queue = [(0, total, table.depth)]
    for node, left, d in queue:
        k = 0
        while left > 0:
            j = int(table.picks[d][k][left])
            parents.append(node)
            queue.append((len(parents) - 1, j - 1, d - 1))
            left -= j
            k += 1
    return tuple(parents)


def cached_shapes() -> int:
    """How many optimal shapes this process holds (computed or loaded)."""
    return len(_SHAPES)


def save_shapes(path: str | Path) -> int:
    """Write the in-memory shape cache as JSON; returns the number of shapes."""
    rows = [
        {"p": list(k[0]), "budget": k[1], "max_depth": k[2], "value": v, "parents": list(s)}
        for k, (v, s) in _SHAPES.items()
    ]
    Path(path).write_text(json.dumps({"version": 1, "shapes": rows}))
    return len(rows)


def load_shapes(path: str | Path) -> int:
    """Merge a JSON shape cache written by save_shapes into memory; returns the number of shapes read."""
    data = json.loads(Path(path).read_text())
    for row in data["shapes"]:
        _SHAPES[_key(row["p"], row["budget"], row["max_depth"])] = (float(row["value"]), tuple(row["parents"]))
    return len(data["shapes"])


def fill_tree(
    draft: CausalLM,
    pending: list[int],
    shape: TreeShape,
    rank_logits: RankLogits | None = None,
) -> GrowResult:
    """Grow a tree of the given shape level by level (one batched draft forward per level, tensor bookkeeping).

    Each node's rank-k child is the k-th best token of rank_logits(tree, nodes, logits) (default: the draft's
    logits); with the engine's sampling rule that is the draft's perturbed top-k under the position's noise.
    Tokens the ranking makes impossible (-inf) are not drafted: their subtrees are dropped.
    """
    t0 = time.perf_counter()
    root_logits = forward_pending(draft, pending)
    cache_start = draft.cache.length
    dev = model_device(draft)
    tree = DraftTree(pending[-1], capacity=shape.size, device=dev)
    counts_list, depths = shape.num_children, shape.depths
    first = [0] * shape.size
    for i in range(shape.size - 1, 0, -1):
        first[shape.parents[i]] = i
    counts = torch.tensor(counts_list, dtype=torch.long, device=dev)  # [S] children per shape node
    first_child = torch.tensor(first, dtype=torch.long, device=dev)  # [S] its first child's shape index
    to_tree = torch.full((shape.size,), -1, dtype=torch.long, device=dev)  # shape node -> tree node
    to_tree[0] = 0
    slots = torch.zeros(0, dtype=torch.long, device=dev)
    rounds, level_rows, level_s = 1, [], []
    for d in range(max(depths)):
        level = torch.tensor([s for s in range(shape.size) if depths[s] == d and counts_list[s] > 0],
                             dtype=torch.long, device=dev)  # shape nodes with children at this depth
        level = level[to_tree[level] >= 0]  # whose node was drafted
        if level.shape[0] == 0:
            break
        nodes = to_tree[level]
        c_max = int(counts[level].max())
        if d == 0:
            vals, toks = ranked_topk(root_logits[None], tree, nodes, c_max, rank_logits)
        else:
            t1 = time.perf_counter()
            vals, toks = expand_nodes(draft, tree, nodes, slots, cache_start, c_max, rank_logits)  # [E, c_max]
            slots = torch.cat([slots, nodes])
            rounds += 1
            level_rows.append(int(nodes.shape[0]))
            level_s.append(time.perf_counter() - t1)
        ranks = torch.arange(vals.shape[1], device=dev)[None]  # [1, c_max]
        # fewer children than the shape says only where the ranking leaves fewer tokens possible
        take = (ranks < counts[level][:, None]) & torch.isfinite(vals)  # [E, c_max]
        cum = tree.logprobs[nodes][:, None] + vals
        idx = tree.append(nodes[:, None].expand_as(take)[take], toks[take], cum[take])
        to_tree[(first_child[level][:, None] + ranks).expand_as(take)[take]] = idx
    return GrowResult(tree, slots.tolist(), cache_start, rounds, time.perf_counter() - t0, level_rows, level_s)
