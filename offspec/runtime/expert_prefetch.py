"""Expert prefetch: while MoE layer i computes, read the experts that layer i+1 is likely to route to.

Two predictors:
- "previous": the experts layer i+1 routed to on the previous pass (consecutive tokens often share experts);
- "gate": layer i+1's router applied early to the hidden states layer i's experts see (its router weights as bound
  on an earlier pass: top-k of the router logits per token). It ignores the attention of layer i+1 and the
  router's own refinements (group limits, bias corrections), so it is a guess, like the other one.
Prefetched reads are counted apart from on-demand reads; `ExpertStats.prefetch_accuracy` says how many were used.
"""

from __future__ import annotations

import torch
from torch import nn

PREDICTORS = ("previous", "gate")


def router_of(block: nn.Module, num_experts: int) -> nn.Module | None:
    """The module in an MoE block whose weight [num_experts, hidden] scores the experts (its router)."""
    for name, mod in block.named_modules():
        w = mod._parameters.get("weight")
        if name and "expert" not in name and w is not None and w.ndim == 2 and w.shape[0] == num_experts:
            return mod
    return None


class ExpertPrefetcher:
    """Hooks into the expert cache's routing calls and asks it to read the next MoE layer's predicted experts."""

    def __init__(self, model, predictor: str) -> None:
        if predictor not in PREDICTORS:
            raise ValueError(f"expert prefetch must be one of {PREDICTORS}, not {predictor!r}")
        self.model, self.predictor = model, predictor
        cache = model.experts
        self.order = sorted(cache.layers)
        self.next = {a: b for a, b in zip(self.order, self.order[1:])}
        self.top_k = int(getattr(model.config.get_text_config(), "num_experts_per_tok", 0) or 1)
        self._router_w: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # layer -> router weight, bias

    def _remember_router(self, layer: int) -> None:
        lay = self.model.experts.layers[layer]
        block_path = lay.module.path.rpartition(".")[0]
        block = self.model.layers[layer].get_submodule(block_path) if block_path else self.model.layers[layer]
        router = router_of(block, lay.module.num_experts)
        if router is None or router.weight.is_meta:
            return
        bias = router._parameters.get("bias")
        self._router_w[layer] = (router.weight.detach().clone(),
                                 bias.detach().clone() if isinstance(bias, torch.Tensor) else None)

    def predict(self, layer: int, hidden: torch.Tensor) -> list[int]:
        """The experts that MoE layer `layer` is predicted to route these hidden states [N, H] to."""
        cache = self.model.experts
        if self.predictor == "previous":
            return cache.last_routed.get(layer, [])
        got = self._router_w.get(layer)
        if got is None:
            return cache.last_routed.get(layer, [])
        w, b = got
        logits = torch.nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]).to(w.dtype), w, b)
        k = min(self.top_k, logits.shape[-1])
        return torch.unique(logits.topk(k, dim=-1).indices).tolist()

    def on_routed(self, layer: int, routed: list[int], hidden: torch.Tensor) -> None:
        if self.predictor == "gate" and layer not in self._router_w:
            self._remember_router(layer)
        nxt = self.next.get(layer)
        if nxt is None:
            return
        self.model.experts.prefetch(nxt, self.predict(nxt, hidden))
