"""Reusable oracles over any model with the spec/ protocol (fakes here; the runtime's OffloadedModel later)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from offspec.speculative.specexec import CausalLM, GrowResult, advance_draft, model_device
from offspec.speculative.tree import DraftTree
from offspec.speculative.verify import VerifyResult, commit_target, forward_tree


def decode_path_logits(model: CausalLM, tokens: list[int]) -> torch.Tensor:
    """[V] logits after tokens decoded alone (causal) on top of the cache; the cache is restored."""
    start = model.cache.length
    device = model_device(model)
    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    pos = torch.arange(start, start + len(tokens), device=device)[None]
    out = model.forward(ids, pos, None)[0, -1].float().cpu()
    model.cache.crop(start)
    return out


def assert_tree_logits_match_paths(model: CausalLM, tree: DraftTree, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """One tree pass equals decoding each node's path alone (checks tree masks and positions); restores the cache."""
    prefix_len = model.cache.length
    logits = forward_tree(model, tree).cpu()  # [N, V]
    assert model.cache.length == prefix_len + tree.size
    model.cache.crop(prefix_len)
    for i in range(tree.size):
        ref = decode_path_logits(model, tree.path_tokens(i))
        assert torch.allclose(logits[i], ref, atol=atol, rtol=rtol), f"node {i} (path {tree.path(i)}) differs"


def speculative_generate(
    target: CausalLM,
    draft: CausalLM,
    prompt: list[int],
    n_tokens: int,
    draft_step: Callable[[CausalLM, list[int]], GrowResult],
    verify: Callable[[DraftTree, torch.Tensor], VerifyResult],
    on_pass: Callable[[GrowResult, VerifyResult], None] | None = None,
) -> list[int]:
    """The engine loop on fresh caches: prefill target with prompt[:-1], then (draft tree -> target pass -> commit)*."""
    device = model_device(target)
    if len(prompt) > 1:
        ids = torch.tensor([prompt[:-1]], device=device)
        target.forward(ids, torch.arange(len(prompt) - 1, device=device)[None], None)
    pending = list(prompt)  # the draft cache starts empty; pending[-1] is the root
    out: list[int] = []
    while len(out) < n_tokens:
        grown = draft_step(draft, pending)
        prefix_len = target.cache.length
        result = verify(grown.tree, forward_tree(target, grown.tree))
        commit_target(target, prefix_len, result)
        pending = advance_draft(draft, grown, result.accepted, result.next_token)
        out += result.tokens
        if on_pass is not None:
            on_pass(grown, result)
    return out[:n_tokens]
