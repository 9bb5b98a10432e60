"""The target's tree pass, committing the accepted path, and verification (follow the target's choice through the tree)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from offspec.runtime.masks import tree_mask
from offspec.speculative.specexec import CausalLM, model_device
from offspec.speculative.tree import DraftTree


@dataclass
class VerifyResult:
    """Accepted drafted nodes (root excluded, depth order) and the target's token after them (the new root)."""

    accepted: list[int]
    next_token: int
    tokens: list[int] = field(default_factory=list)  # committed this pass: accepted tokens + next_token
    ranks: list[int] = field(default_factory=list)  # sibling rank of each accepted node
    tries: int = 0  # nodes with children where the target chose (len(accepted), +1 if it stopped at a non-leaf)


class TreeLogits:
    """Target logits of a tree pass, row by row: rows of nodes with children come from the pass itself;
    a leaf's row (needed only when the accepted path ends there) is computed on demand from the pass's
    final hidden states, so the lm_head runs over the few internal nodes instead of the whole tree."""

    def __init__(self, rows: dict[int, torch.Tensor], compute_row) -> None:
        self.rows, self.compute_row = rows, compute_row

    def __getitem__(self, node: int) -> torch.Tensor:
        if node not in self.rows:
            self.rows[node] = self.compute_row(node)
        return self.rows[node]


def forward_tree(target: CausalLM, tree: DraftTree) -> torch.Tensor | TreeLogits:
    """One target pass over all tree nodes (root included) at positions cache.length + depth.

    Returns float32 logits [N, V], or a TreeLogits (same row indexing) when the model can compute
    logits for chosen rows only (`logit_rows`), which skips the lm_head for leaves.
    """
    device = model_device(target)
    prefix_len = target.cache.length
    ids = tree.tokens[None].to(device)  # [1, N]
    pos = (prefix_len + tree.depths)[None].to(device)  # [1, N]
    mask = tree_mask(prefix_len, tree.ancestors.to(device), target.dtype)  # [1, 1, N, prefix_len + N]
    if not getattr(target, "supports_logit_rows", False):
        return target.forward(ids, pos, mask)[0].float()
    parents = tree.parents
    internal = torch.unique(torch.cat([torch.zeros(1, dtype=torch.long), parents[parents >= 0]]))  # sorted
    out = target.forward(ids, pos, mask, logit_rows=internal.to(device))[0].float()  # [R, V]
    rows = dict(zip(internal.tolist(), out))
    return TreeLogits(rows, lambda node: target.logits_at(torch.tensor([node], device=device))[0].float())


def commit_target(target: CausalLM, prefix_len: int, result: VerifyResult) -> None:
    """Keep the root and the accepted path in the target cache (drop the rest of the tree)."""
    target.cache.keep(prefix_len, torch.tensor([0, *result.accepted], dtype=torch.long))


def verify_tree(tree: DraftTree, choose: Callable[[int, list[int]], int]) -> VerifyResult:
    """Follow the target's choice at each node (choose(node, path tokens from the root to it) -> token) while it is
    a child. The tree's structure is read to the host once.

    Sampling is deterministic given the context (position-keyed Gumbel noise, see sampling.py), so this one walk
    verifies greedy and sampled decoding alike and keeps the target's output exactly.
    """
    lists = tree.lists()
    kids = lists.children()
    node, accepted, ranks, path = 0, [], [], [lists.tokens[0]]
    while True:
        token = int(choose(node, path))
        rank = next((r for r, c in enumerate(kids[node]) if lists.tokens[c] == token), -1)
        if rank < 0:
            return VerifyResult(accepted, token, path[1:] + [token], ranks, len(accepted) + int(bool(kids[node])))
        node = kids[node][rank]
        accepted.append(node)
        ranks.append(rank)
        path.append(token)


def verify_greedy(tree: DraftTree, logits: torch.Tensor | TreeLogits) -> VerifyResult:
    """Follow the target's argmax through the tree while it is a child."""
    return verify_tree(tree, lambda node, _path: int(logits[node].argmax()))
