"""SpecExec tree growth: the budget most probable drafted nodes under the draft's cumulative probabilities, one
batched draft forward per tree level."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from offspec.errors import ConfigError
from offspec.runtime.masks import visibility_mask
from offspec.speculative.tree import DraftTree


class KVCache(Protocol):
    @property
    def length(self) -> int: ...

    def keep(self, start: int, indices: torch.Tensor) -> None: ...

    def crop(self, length: int) -> None: ...


class CausalLM(Protocol):
    """What spec/ needs from a model (the runtime's OffloadedModel, or a test fake)."""

    dtype: torch.dtype
    cache: KVCache

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> torch.Tensor: ...


@dataclass
class GrowResult:
    """A drafted tree and where its expanded nodes sit in the draft cache."""

    tree: DraftTree
    cached_nodes: list[int]  # tree node held by draft cache slot cache_start + s
    cache_start: int  # draft cache length right after the pending tokens (the root is at cache_start - 1)
    rounds: int  # draft forwards, the pending one included
    draft_s: float
    level_rows: list[int] = field(default_factory=list)  # rows of each draft forward after the pending one
    level_s: list[float] = field(default_factory=list)  # seconds of each of those forwards, ranking included


def model_device(model: Any) -> torch.device:
    """The device inputs go to: model.device when the model has one, else CPU."""
    return torch.device(getattr(model, "device", "cpu"))


def forward_pending(draft: CausalLM, pending: list[int]) -> torch.Tensor:
    """Append the pending tokens (causal) to the draft cache; float32 logits [V] after the last one."""
    if not pending:
        raise ValueError("pending must hold at least the root token")
    device = model_device(draft)
    start = draft.cache.length
    ids = torch.tensor([pending], dtype=torch.long, device=device)  # [1, P]
    pos = torch.arange(start, start + len(pending), device=device)[None]  # [1, P]
    kwargs = {"last_only": True} if getattr(draft, "supports_logit_rows", False) else {}
    return draft.forward(ids, pos, None, **kwargs)[0, -1].float()


def _node_inputs(draft: CausalLM, tree: DraftTree, nodes: torch.Tensor, slots: torch.Tensor,
                 cache_start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [1, E], positions [1, E] and the additive mask [1, 1, E, L + E] of a forward over tree nodes."""
    device = model_device(draft)
    length = draft.cache.length
    e = nodes.shape[0]
    visible = torch.zeros(e, length + e, dtype=torch.bool, device=tree.device)  # [E, L + E]
    visible[:, :cache_start] = True
    if slots.numel():
        visible[:, cache_start:length] = tree.mask_rows(nodes, slots)
    visible[:, length:] = tree.mask_rows(nodes, nodes)
    ids = tree.tokens[nodes][None].to(device)  # [1, E]
    pos = (cache_start - 1 + tree.depths[nodes])[None].to(device)  # [1, E]
    return ids, pos, visibility_mask(visible.to(device), draft.dtype)


def forward_nodes(draft: CausalLM, tree: DraftTree, nodes: torch.Tensor, slots: torch.Tensor,
                  cache_start: int) -> torch.Tensor:
    """Append tree nodes (Long [E]) to the draft cache in one forward; float32 logits [E, V].

    Each node sees the pre-tree cache (root included), the cached slots (Long [S], tree node per slot, -1 for a
    dropped one) that are its ancestors, and itself.
    """
    ids, pos, mask = _node_inputs(draft, tree, nodes, slots, cache_start)
    return draft.forward(ids, pos, mask)[0].float()


RankLogits = Callable[[DraftTree, torch.Tensor, torch.Tensor], torch.Tensor]
LOGIT_ROWS = 64  # rows of vocabulary logits ranked at a time (a wide level's logits would take [E, V] floats at once)


def ranked_topk(logits: torch.Tensor, tree: DraftTree, nodes: torch.Tensor, k: int,
                rank_logits: RankLogits | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [E, k] clamped to <= 0, tokens [E, k]) of each node's k best children, best first, ranked by
    rank_logits(tree, nodes, logits) (default: the draft's own logits)."""
    if rank_logits is not None:
        logits = rank_logits(tree, nodes, logits)
    logq = torch.log_softmax(logits.float(), dim=-1)  # [E, V]
    vals, toks = logq.topk(min(k, logq.shape[-1]), dim=-1)  # [E, k], best first
    return vals.clamp_max(0.0).to(tree.device), toks.to(tree.device)  # clamp: a child never outscores its parent


def expand_nodes(draft: CausalLM, tree: DraftTree, nodes: torch.Tensor, slots: torch.Tensor, cache_start: int,
                 k: int, rank_logits: RankLogits | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One draft forward over tree nodes (appended to the draft cache) and their k best children: (log-probs,
    tokens), each [E, k]. A model that can give logits for chosen rows (an OffloadedModel) ranks them LOGIT_ROWS at
    a time, so a wide level never holds [E, V] float logits at once."""
    ids, pos, mask = _node_inputs(draft, tree, nodes, slots, cache_start)
    e = nodes.shape[0]
    if e <= LOGIT_ROWS or not getattr(draft, "supports_logit_rows", False):
        return ranked_topk(draft.forward(ids, pos, mask)[0], tree, nodes, k, rank_logits)
    draft.forward(ids, pos, mask, logit_rows=torch.zeros(0, dtype=torch.long, device=ids.device))
    parts = [ranked_topk(draft.logits_at(torch.arange(s, min(s + LOGIT_ROWS, e), device=ids.device)), tree,
                         nodes[s : s + LOGIT_ROWS], k, rank_logits) for s in range(0, e, LOGIT_ROWS)]
    return torch.cat([v for v, _ in parts]), torch.cat([t for _, t in parts])


def add_best_children(tree: DraftTree, parents: torch.Tensor, vals: torch.Tensor, toks: torch.Tensor,
                      budget: int) -> tuple[DraftTree, torch.Tensor, torch.Tensor]:
    """Cut the tree plus the candidate children (vals/toks [E, k] under parents [E]) to the `budget` most probable
    drafted nodes: (tree, old -> new node index (-1 dropped), the new children's indices). Tensor operations only,
    and one read of the kept count; ties go to the older node, so the kept set is ancestor-closed (a child never
    outscores its parent)."""
    k = vals.shape[1]
    cum = (tree.logprobs[parents][:, None] + vals).reshape(-1)  # [E * k], creation order
    par = parents.repeat_interleave(k)
    n_old = tree.size - 1
    scores = torch.cat([tree.logprobs[1:], cum])
    top = torch.sort(scores, descending=True, stable=True).indices[:budget]
    top = top[torch.isfinite(scores[top])]  # tokens the ranking makes impossible are never drafted
    fresh = top[top >= n_old] - n_old
    kept = top[top < n_old] + 1
    if kept.shape[0] < n_old:  # nodes outside the top-budget never re-enter it: drop them
        keep = torch.cat([torch.zeros(1, dtype=torch.long, device=tree.device), kept.sort().values])
        tree, remap = tree._subset(keep, 0, room=fresh.shape[0])
    else:
        remap = torch.arange(tree.size, device=tree.device)
    fresh = fresh.sort().values  # creation order
    idx = tree.append(remap[par[fresh]], toks.reshape(-1)[fresh], cum[fresh])
    return tree, remap, idx


def grow_tree(
    draft: CausalLM,
    pending: list[int],
    budget: int,
    branch: int = 8,
    max_depth: int = 32,
    rank_logits: RankLogits | None = None,
) -> GrowResult:
    """Grow the `budget` most probable drafted nodes (draft cumulative probability) under the root pending[-1],
    one batched draft forward per tree level.

    Level d expands every depth-d node in the current top-budget at once (each node's `branch` best children), then
    the tree is cut back to the top-budget: a node in the final top-budget is never cut (fewer nodes can outrank it
    in any subset), and its parent always ranks above it, so the result is the exact top-budget of the
    branch-capped tree, the same as best-first search, in depth + 1 draft forwards.

    rank_logits(tree, nodes, logits [E, V]) -> [E, V]: what children are ranked by (default: the draft's logits);
    the engine passes the target's sampling rule (penalties, temperature, truncation, the position's noise).
    The draft cache ends holding the pending tokens, then one slot per cached (expanded, kept) node.
    """
    if budget < 0 or branch < 1 or max_depth < 0:
        raise ConfigError("grow_tree needs budget >= 0, branch >= 1, max_depth >= 0")
    t0 = time.perf_counter()
    root_logits = forward_pending(draft, pending)
    cache_start = draft.cache.length
    tree = DraftTree(pending[-1], capacity=min(2 * budget + 2, 4096), device=model_device(draft))
    slots = torch.zeros(0, dtype=torch.long, device=tree.device)  # tree node per draft slot, -1 once dropped
    rounds, level_rows, level_s = 1, [], []
    if budget > 0 and max_depth > 0:
        frontier = torch.zeros(1, dtype=torch.long, device=tree.device)
        vals, toks = ranked_topk(root_logits[None], tree, frontier, branch, rank_logits)
        depth = 1
        while True:
            tree, remap, frontier = add_best_children(tree, frontier, vals, toks, budget)
            if slots.numel():
                slots = torch.where(slots >= 0, remap[slots.clamp_min(0)], slots)
            if depth >= max_depth or frontier.shape[0] == 0:
                break
            t1 = time.perf_counter()
            vals, toks = expand_nodes(draft, tree, frontier, slots, cache_start, branch, rank_logits)
            slots = torch.cat([slots, frontier])
            rounds += 1
            level_rows.append(int(frontier.shape[0]))
            level_s.append(time.perf_counter() - t1)
            depth += 1
    live = slots >= 0
    kept = torch.nonzero(live).reshape(-1)
    if kept.shape[0] < slots.shape[0]:
        _keep(draft.cache, cache_start, kept)
    return GrowResult(tree, slots[kept].tolist(), cache_start, rounds, time.perf_counter() - t0, level_rows, level_s)


def _keep(cache: KVCache, start: int, slots: torch.Tensor) -> None:
    if slots.numel():
        cache.keep(start, slots)
    else:
        cache.crop(start)


def advance_draft(draft: CausalLM, grown: GrowResult, accepted: list[int], next_token: int) -> list[int]:
    """After verification, keep the accepted cached nodes in the draft cache; returns the next pending tokens."""
    slot_of = {node: s for s, node in enumerate(grown.cached_nodes)}
    kept: list[int] = []
    for node in accepted:
        if node not in slot_of:
            break
        kept.append(slot_of[node])
    _keep(draft.cache, grown.cache_start, torch.tensor(kept, dtype=torch.long))
    rest = accepted[len(kept):]
    tokens = grown.tree.tokens[torch.tensor(rest, dtype=torch.long, device=grown.tree.device)].tolist() if rest else []
    return tokens + [int(next_token)]
