"""NF4 linear layer whose packed weight is a view into a streamed or resident blob."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from offspec.store.manifest import QuantInfo


class NF4Linear(nn.Module):
    """y = x W^T + b with W held as bitsandbytes NF4 (packed uint8 + float32 absmax), dequantized per call."""

    def __init__(self, in_features: int, out_features: int, bias: bool, info: QuantInfo) -> None:
        super().__init__()
        self.in_features, self.out_features, self.info = in_features, out_features, info
        self.weight: torch.Tensor | None = None  # packed uint8 view
        self.absmax: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.has_bias = bias

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in], unpacked straight into `dtype` (default: the stored dtype)."""
        from offspec.store.manifest import DTYPE_NAMES
        from offspec.store.nf4 import dequantize_nf4

        info = self.info if dtype is None else replace(self.info, dtype=DTYPE_NAMES[dtype])
        return dequantize_nf4(self.weight, self.absmax, info)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(x.dtype), self.bias)


def swap_nf4_linears(layer: nn.Module, quant: dict[str, QuantInfo]) -> None:
    """Replace each nn.Linear whose '<name>.weight' is NF4 in the store by an NF4Linear (meta, no memory)."""
    for wname, info in quant.items():
        mod_name = wname.rsplit(".", 1)[0]
        *path, leaf = mod_name.split(".")
        parent = layer
        for p in path:
            parent = getattr(parent, p)
        old = getattr(parent, leaf)
        setattr(parent, leaf, NF4Linear(old.in_features, old.out_features, old.bias is not None, info))


def assign_layer_tensors(layer: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Point every weight of a decoder layer at the given views (NF4 absmax included)."""
    for name, t in tensors.items():
        mod_name, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        if leaf == "absmax":  # "<module>.weight.absmax"
            mod_name = mod_name.rsplit(".", 1)[0]
        mod = layer.get_submodule(mod_name) if mod_name else layer
        if isinstance(mod, NF4Linear):
            setattr(mod, "absmax" if leaf == "absmax" else leaf, t)
        elif leaf in mod._parameters:
            mod._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        else:
            mod._buffers[leaf] = t
