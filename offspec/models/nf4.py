"""NF4 linear layer whose packed weight is a view into a streamed or resident blob."""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from offspec.store.manifest import QuantInfo

# One dequantization buffer per (shape, dtype, device) and thread, shared by every NF4Linear a thread runs: layers
# run one at a time, so a buffer is free again once its matmul has been issued. Reused, the weight-sized buffers
# never churn the allocator (on the CPU, a fresh one per call fragments the heap by hundreds of MiB a generation).
_SCRATCH = threading.local()


def _scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    key = (shape, dtype, device)
    if key not in bufs:
        bufs[key] = torch.empty(shape, dtype=dtype, device=device)
    return bufs[key]


def scratch_bytes() -> int:
    """Bytes of the dequantization buffers the calling thread holds."""
    return sum(t.nbytes for t in getattr(_SCRATCH, "bufs", {}).values())


def _dequantize_cpu_into(packed: torch.Tensor, state, out: torch.Tensor) -> bool:
    """bitsandbytes' CPU NF4 kernel, writing into `out` (its `out=` op has no CPU kernel); False where that kernel
    does not apply (the caller then takes bitsandbytes' allocating path)."""
    import ctypes

    from offspec.store.nf4 import _bnb_functional

    bnbf = _bnb_functional()
    fn = {torch.bfloat16: "cdequantize_blockwise_cpu_nf4_bf16", torch.float32: "cdequantize_blockwise_cpu_nf4_fp32",
          torch.float16: "cdequantize_blockwise_cpu_nf4_fp16"}.get(out.dtype)
    lib = getattr(bnbf, "lib", None)
    absmax = state.absmax
    shape = tuple(state.shape)
    if (fn is None or lib is None or not hasattr(lib, fn) or state.nested or state.quant_type != "nf4"
            or state.blocksize >= 2048 or len(shape) != 2 or shape[-1] % 2 or packed.dtype != torch.uint8
            or absmax.dtype != torch.float32 or not (packed.is_contiguous() and absmax.is_contiguous())):
        return False
    getattr(lib, fn)(bnbf.get_ptr(packed), bnbf.get_ptr(absmax), bnbf.get_ptr(out), ctypes.c_longlong(state.blocksize),
                     ctypes.c_longlong(shape[0]), ctypes.c_longlong(shape[1]))
    return True


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
        """The weight [out, in] in the compute dtype, in this thread's reused buffer for its shape."""
        from offspec.store.nf4 import _bnb_functional

        out = _scratch(tuple(self.info.shape), self.state.dtype, self.weight.device)
        if self.weight.device.type == "cpu":
            if _dequantize_cpu_into(self.weight, self.state, out):
                return out
            return _bnb_functional().dequantize_4bit(self.weight, self.state)
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
