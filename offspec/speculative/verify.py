"""The target's tree pass and the three verifications: greedy, sample-and-match (SpecExec), without replacement (Sequoia)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from offspec.runtime.masks import tree_mask
from offspec.speculative.sampling import SamplingParams, probs, sample, sample_probs, uniform
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


def _result(tree: DraftTree, accepted: list[int], ranks: list[int], next_token: int, stopped_inner: bool) -> VerifyResult:
    tokens = [tree.token(i) for i in accepted] + [int(next_token)]
    return VerifyResult(accepted, int(next_token), tokens, ranks, len(accepted) + int(stopped_inner))


def _child_by_token(tree: DraftTree, node: int, token: int) -> tuple[int, int]:
    """(child, rank) of node holding token, or (-1, -1)."""
    for rank, child in enumerate(tree.children(node)):
        if tree.token(child) == token:
            return child, rank
    return -1, -1


def _follow(tree: DraftTree, choose) -> VerifyResult:
    """Walk from the root: take the target's chosen token at each node while it is a child."""
    node, accepted, ranks = 0, [], []
    while True:
        token = choose(node)
        child, rank = _child_by_token(tree, node, token)
        if child < 0:
            return _result(tree, accepted, ranks, token, bool(tree.children(node)))
        accepted.append(child)
        ranks.append(rank)
        node = child


def verify_greedy(tree: DraftTree, logits: torch.Tensor | TreeLogits) -> VerifyResult:
    """Follow the target's argmax through the tree while it is a child."""
    return _follow(tree, lambda node: int(logits[node].argmax()))


def verify_sample_match(
    tree: DraftTree, logits: torch.Tensor | TreeLogits, sampling: SamplingParams,
    generator: torch.Generator | None = None,
) -> VerifyResult:
    """SpecExec: at each node draw one token from the target; follow it if it is a child, else it is next_token."""
    if sampling.greedy:
        return verify_greedy(tree, logits)
    return _follow(tree, lambda node: int(sample(logits[node], sampling, generator)))


def verify_without_replacement(
    tree: DraftTree, logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None = None
) -> VerifyResult:
    """Sequoia: try a node's children (sampled w/o replacement from tree.draft_probs[node]) in order against the residual.

    Accept child x with prob min(1, r(x)/q(x)) (r starts as the target p); on rejection r <- norm(max(r - q, 0)) and
    q <- q without x, renormalised; if every child is rejected, next_token ~ r. Lossless only for sampled trees.
    """
    node, accepted, ranks = 0, [], []
    while True:
        p = probs(logits[node], sampling)  # [V]
        kids = tree.children(node)
        if not kids:
            return _result(tree, accepted, ranks, int(sample_probs(p, generator)), False)
        if node not in tree.draft_probs:
            raise ValueError(f"node {node} has children but no draft_probs: build the tree with fill_tree(sample=True)")
        q = tree.draft_probs[node].to(device=p.device, dtype=torch.float32).clone()  # [V]
        r = p
        chosen = -1
        for rank, child in enumerate(kids):
            x = tree.token(child)
            qx, rx = float(q[x]), float(r[x])
            if qx <= 0.0:  # not a draw from q: skip it
                continue
            if uniform(generator) * qx < rx:  # accept with prob min(1, r(x)/q(x))
                chosen = child
                break
            residual = (r - q).clamp_min(0.0)
            total = float(residual.sum())
            r = residual / total if total > 0 else r
            q[x] = 0.0
            q_total = float(q.sum())
            q = q / q_total if q_total > 0 else q
        if chosen < 0:
            return _result(tree, accepted, ranks, int(sample_probs(r, generator)), True)
        accepted.append(chosen)
        ranks.append(rank)
        node = chosen
