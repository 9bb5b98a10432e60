"""NF4 packing of linear weights with bitsandbytes: quantize once at conversion, unpack at run time.

Layout (bitsandbytes 0.4x-0.5x, blocksize 64, no double quantization): a [out, in] weight becomes a
packed uint8 tensor of shape [ceil(out*in/2), 1] (two 4-bit codes per byte, high nibble first) and a
float32 absmax with one scale per block of 64 consecutive row-major elements.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import torch

from offspec.errors import StoreError
from offspec.store.manifest import DTYPES, QuantInfo

NF4_BLOCKSIZE = 64

# bitsandbytes logs a harmless "Failed to load CPU gemm_4bit_forward from kernels-community" at import.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _bnb_functional():  # imported lazily: bitsandbytes is slow to import and only 4-bit paths need it
    import bitsandbytes.functional as bnbf

    return bnbf


@lru_cache(maxsize=None)
def nf4_code(device: str = "cpu") -> torch.Tensor:
    """The 16-entry NF4 lookup table on device."""
    return _bnb_functional().get_4bit_type("nf4", device=torch.device(device))


def quantize_nf4(w: torch.Tensor, blocksize: int = NF4_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float weight to NF4; returns (packed uint8 [n/2, 1], absmax float32 [n/blocksize])."""
    if w.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise StoreError(f"cannot quantize a {w.dtype} tensor to NF4")
    packed, state = _bnb_functional().quantize_4bit(
        w.contiguous(), blocksize=blocksize, quant_type="nf4", compress_statistics=False
    )
    return packed, state.absmax.to(torch.float32)


def nf4_quant_state(absmax: torch.Tensor, info: QuantInfo):
    """A bitsandbytes QuantState for a stored weight (for dequantize_4bit or matmul_4bit)."""
    if info.type != "nf4":
        raise StoreError(f"unsupported quantization type {info.type!r} (expected nf4)")
    bnbf = _bnb_functional()
    return bnbf.QuantState(
        absmax=absmax,
        shape=torch.Size(info.shape),
        code=nf4_code(str(absmax.device)),
        blocksize=info.blocksize,
        quant_type="nf4",
        dtype=DTYPES[info.dtype],
    )


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, info: QuantInfo) -> torch.Tensor:
    """Unpack an NF4 weight to its original shape and dtype (a new tensor on packed's device)."""
    # bitsandbytes' `out=` does not work on CPU, so this always allocates.
    return _bnb_functional().dequantize_4bit(packed, nf4_quant_state(absmax, info))
