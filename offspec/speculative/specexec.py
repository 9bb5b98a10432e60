"""SpecExec tree growth: budgeted best-first search over the draft's cumulative probabilities, one batched forward a round."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from offspec.errors import ConfigError
from offspec.runtime.masks import visibility_mask
from offspec.speculative.tree import DraftTree


TRIM_FACTOR = 3  # drop nodes outside the top-budget once the tree holds more than TRIM_FACTOR * budget of them


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
    return draft.forward(ids, pos, None)[0, -1].float()


def forward_nodes(draft: CausalLM, tree: DraftTree, nodes: list[int], slots: list[int], cache_start: int) -> torch.Tensor:
    """Append tree nodes to the draft cache in one forward; float32 logits [E, V].

    Each node sees the pre-tree cache (root included), the cached slots that are its ancestors, and itself.
    """
    device = model_device(draft)
    rows = torch.tensor(nodes, dtype=torch.long)  # [E]
    length = draft.cache.length
    e = rows.shape[0]
    visible = torch.zeros(e, length + e, dtype=torch.bool)  # [E, L + E]
    visible[:, :cache_start] = True
    if slots:
        visible[:, cache_start:length] = tree.mask_rows(rows, torch.tensor(slots, dtype=torch.long))
    visible[:, length:] = tree.mask_rows(rows, rows)
    ids = tree.tokens[rows][None].to(device)  # [1, E]
    pos = (cache_start - 1 + tree.depths[rows])[None].to(device)  # [1, E]
    mask = visibility_mask(visible.to(device), draft.dtype)  # [1, 1, E, L + E]
    return draft.forward(ids, pos, mask)[0].float()


RankLogits = Callable[[DraftTree, list[int], torch.Tensor], torch.Tensor]


def _add_best_children(
    tree: DraftTree, parents: list[int], logits: torch.Tensor, branch: int, budget: int, rank_logits: RankLogits | None
) -> None:
    """Add each parent's top-branch children that would rank inside the current top-budget."""
    if rank_logits is not None:
        logits = rank_logits(tree, parents, logits)
    logq = torch.log_softmax(logits.float(), dim=-1)  # [E, V]
    k = min(branch, logq.shape[-1])
    vals, toks = logq.topk(k, dim=-1)  # [E, k], best first
    vals, toks = vals.clamp_max(0.0).cpu(), toks.cpu()  # clamp: a child never outscores its parent
    par = torch.tensor(parents, dtype=torch.long)
    cum = (tree.logprobs[par][:, None] + vals).reshape(-1)  # [E * k], creation order
    scores = torch.cat([tree.logprobs[1:], cum])
    top = torch.sort(scores, descending=True, stable=True).indices[:budget]
    top = top[torch.isfinite(scores[top])]  # tokens the ranking makes impossible are never drafted
    fresh = top[top >= tree.size - 1] - (tree.size - 1)
    fresh = fresh.sort().values  # keep creation order
    if fresh.numel():
        tree.add(par.repeat_interleave(k)[fresh], toks.reshape(-1)[fresh], cum[fresh])


def grow_tree(
    draft: CausalLM,
    pending: list[int],
    budget: int,
    expand: int = 32,
    branch: int = 8,
    max_depth: int = 32,
    rank_logits: RankLogits | None = None,
) -> GrowResult:
    """Grow the `budget` most probable drafted nodes (draft cumulative probability) under the root pending[-1].

    rank_logits(tree, nodes, logits [E, V]) -> [E, V]: what children are ranked by (default: the draft's logits);
    the engine passes the target's sampling rule (penalties, temperature, truncation, the position's noise).
    The draft cache ends holding the pending tokens, then one slot per cached (expanded, kept) node.
    """
    if budget < 0 or expand < 1 or branch < 1 or max_depth < 0:
        raise ConfigError("grow_tree needs budget >= 0, expand >= 1, branch >= 1, max_depth >= 0")
    t0 = time.perf_counter()
    root_logits = forward_pending(draft, pending)
    cache_start = draft.cache.length
    tree = DraftTree(pending[-1], capacity=min(2 * budget + 2, 4096))
    slots: list[int] = []  # tree node per draft slot, -1 once dropped from the tree
    expanded: set[int] = {0}
    rounds = 1
    if budget > 0 and max_depth > 0:
        _add_best_children(tree, [0], root_logits[None], branch, budget, rank_logits)
    while True:
        top = tree.best_nodes(budget).tolist()
        depths = tree.depths.tolist()
        chosen = [i for i in top if i not in expanded and depths[i] < max_depth][:expand]
        if not chosen:
            break
        logits = forward_nodes(draft, tree, chosen, slots, cache_start)
        slots.extend(chosen)
        expanded.update(chosen)
        rounds += 1
        _add_best_children(tree, chosen, logits, branch, budget, rank_logits)
        if tree.size > TRIM_FACTOR * budget + 1:  # nodes outside the top-budget never re-enter it: drop them
            tree, slots, expanded = _trim(tree, budget, slots, expanded)
    tree, slots, _ = _trim(tree, budget, slots, expanded)
    kept = [s for s, node in enumerate(slots) if node >= 0]
    if len(kept) < len(slots):
        _keep(draft.cache, cache_start, kept)
    cached_nodes = [slots[s] for s in kept]
    return GrowResult(tree, cached_nodes, cache_start, rounds, time.perf_counter() - t0)


def _trim(
    tree: DraftTree, budget: int, slots: list[int], expanded: set[int]
) -> tuple[DraftTree, list[int], set[int]]:
    """Keep the root and the top-budget nodes (ancestor-closed: ties go to the older node); remap slots."""
    keep = torch.cat([torch.zeros(1, dtype=torch.long), tree.best_nodes(budget).sort().values])
    if keep.shape[0] == tree.size:
        return tree, slots, expanded
    tree, remap = tree.select(keep)
    r = remap.tolist()
    new_slots = [r[n] if n >= 0 else -1 for n in slots]
    return tree, new_slots, {r[n] for n in expanded if r[n] >= 0}


def _keep(cache: KVCache, start: int, slots: list[int]) -> None:
    if slots:
        cache.keep(start, torch.tensor(slots, dtype=torch.long))
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
    _keep(draft.cache, grown.cache_start, kept)
    return [grown.tree.token(n) for n in accepted[len(kept) :]] + [int(next_token)]
