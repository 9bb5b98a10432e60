"""NF4 linear layer whose packed weight is a view into a streamed or resident blob."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from offspec.store.manifest import QuantInfo

# One dequantization buffer per (shape, dtype, device), shared by every NF4Linear: layers run one at a
# time, so a buffer is free again once its matmul has been issued (CUDA; bitsandbytes' `out=` fails on CPU).
_SCRATCH: dict[tuple, torch.Tensor] = {}


def _scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    if device.type != "cuda":
        return None
    key = (shape, dtype, device)
    if key not in _SCRATCH:
        _SCRATCH[key] = torch.empty(shape, dtype=dtype, device=device)
    return _SCRATCH[key]


class NF4Linear(nn.Module):
    """y = x W^T + b with W held as bitsandbytes NF4 (packed uint8 + float32 absmax), dequantized per call.

    `bind` points it at a packed view and a QuantState prepared once per (layer, buffer) by the caller."""

    def __init__(self, in_features: int, out_features: int, info: QuantInfo) -> None:
        super().__init__()
        self.in_features, self.out_features, self.info = in_features, out_features, info
        self.weight: torch.Tensor | None = None  # packed uint8 view
        self.state = None  # bitsandbytes QuantState over the absmax view, dequantizing to the compute dtype
        self.bias: torch.Tensor | None = None

    def bind(self, packed: torch.Tensor, state) -> None:
        self.weight, self.state = packed, state

    def dequantized(self) -> torch.Tensor:
        """The weight [out, in] in the compute dtype (into a reused buffer on CUDA)."""
        from offspec.store.nf4 import _bnb_functional

        out = _scratch(tuple(self.info.shape), self.state.dtype, self.weight.device)
        return _bnb_functional().dequantize_4bit(self.weight, self.state, out=out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(), self.bias)


def swap_nf4_linears(layer: nn.Module, quant: dict[str, QuantInfo]) -> None:
    """Replace each nn.Linear whose '<name>.weight' is NF4 in the store by an NF4Linear (no memory)."""
    for wname, info in quant.items():
        mod_name = wname.rsplit(".", 1)[0]
        parent_name, _, leaf = mod_name.rpartition(".")
        parent = layer.get_submodule(parent_name) if parent_name else layer
        old = getattr(parent, leaf)
        setattr(parent, leaf, NF4Linear(old.in_features, old.out_features, info))
