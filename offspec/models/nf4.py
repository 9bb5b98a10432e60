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

    def __init__(self, in_features: int, out_features: int, info: QuantInfo, transposed: bool = False) -> None:
        """transposed: the stored weight is [in, out] (GPT-2's Conv1D): y = x W + b."""
        super().__init__()
        self.in_features, self.out_features, self.info = in_features, out_features, info
        self.transposed = transposed
        self.weight: torch.Tensor | None = None  # packed uint8 view
        self.state = None  # bitsandbytes QuantState over the absmax view, dequantizing to the compute dtype
        self.bias: torch.Tensor | None = None
        self._fused: tuple[torch.Tensor, object] | None = None  # bitsandbytes' CPU-packed weight and state

    def bind(self, packed: torch.Tensor, state) -> None:
        self.weight, self.state = packed, state

    def pack_for_cpu(self) -> bool:
        """Repack a resident weight once for bitsandbytes' fused AVX512-BF16 CPU kernel (bf16 activations):
        no per-call dequantization. False (unchanged) where that kernel is missing or the shape does not tile."""
        import copy

        from offspec.store.nf4 import _bnb_functional

        bnbf = _bnb_functional()
        if self.weight is None or self.weight.device.type != "cpu" or not bnbf.has_avx512bf16() or self.transposed:
            return False
        if self.info.shape[0] % 32 or self.info.shape[1] % 2:
            return False
        packed, state = bnbf._convert_weight_packed_for_cpu(self.weight, copy.copy(self.state))
        self._fused = (packed, state)
        self.weight = self.state = None  # the blob views go; the packed copy replaces them
        return True

    def dequantized(self) -> torch.Tensor:
        """The weight [out, in] in the compute dtype (into a reused buffer on CUDA)."""
        from offspec.store.nf4 import _bnb_functional

        out = _scratch(tuple(self.info.shape), self.state.dtype, self.weight.device)
        return _bnb_functional().dequantize_4bit(self.weight, self.state, out=out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused is not None:
            from offspec.store.nf4 import _bnb_functional

            packed, state = self._fused
            out = _bnb_functional().gemv_4bit(x.to(torch.bfloat16), packed, state=state).to(x.dtype)
            return out + self.bias if self.bias is not None else out
        weight = self.dequantized()
        return F.linear(x, weight.t() if self.transposed else weight, self.bias)


def swap_nf4_linears(layer: nn.Module, quant: dict[str, QuantInfo]) -> None:
    """Replace each nn.Linear (or GPT-2-style Conv1D) whose '<name>.weight' is NF4 in the store by an NF4Linear
    (no memory); ModelError for a 2-D weight of any other module."""
    from offspec.errors import ModelError

    for wname, info in quant.items():
        mod_name = wname.rsplit(".", 1)[0]
        parent_name, _, leaf = mod_name.rpartition(".")
        parent = layer.get_submodule(parent_name) if parent_name else layer
        old = getattr(parent, leaf)
        if isinstance(old, nn.Linear):
            new = NF4Linear(old.in_features, old.out_features, info)
        elif type(old).__name__ == "Conv1D" and hasattr(old, "nf"):  # transformers.pytorch_utils.Conv1D
            new = NF4Linear(info.shape[0], old.nf, info, transposed=True)
        else:
            raise ModelError(f"NF4 weights for {type(old).__name__} modules ({wname}) are not supported: "
                             "convert with --bits 16")
        setattr(parent, leaf, new)
