"""NF4 packing: our helpers equal bitsandbytes, and the layout matches a pure-torch reference."""

from __future__ import annotations

import pytest
import torch

from offspec.errors import StoreError
from offspec.store.manifest import QuantInfo
from offspec.store.nf4 import dequantize_nf4, nf4_code, quantize_nf4


def reference_unpack(packed: torch.Tensor, absmax: torch.Tensor, info: QuantInfo) -> torch.Tensor:
    """Pure-torch NF4 unpack: high nibble first, one absmax per block of `blocksize` elements."""
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1).long()
    values = nf4_code("cpu").float()[codes]
    n = torch.Size(info.shape).numel()
    scales = absmax.float().repeat_interleave(info.blocksize)[:n]
    return (values[:n] * scales).reshape(info.shape)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("shape", [(128, 64), (64, 192), (3, 100)])
def test_round_trip_matches_bitsandbytes(shape, dtype):
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    w = torch.randn(shape).to(getattr(torch, dtype))
    packed, absmax = quantize_nf4(w)
    ref_packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert packed.dtype == torch.uint8 and packed.numel() == (w.numel() + 1) // 2
    assert torch.equal(packed, ref_packed) and torch.equal(absmax, state.absmax)
    info = QuantInfo("nf4", 64, tuple(shape), dtype)
    out = dequantize_nf4(packed, absmax, info)
    assert out.shape == w.shape and out.dtype == w.dtype
    assert torch.equal(out, bnbf.dequantize_4bit(ref_packed, state))
    torch.testing.assert_close(out.float(), reference_unpack(packed, absmax, info), rtol=1e-2, atol=1e-2)
    rel = (out.float() - w.float()).norm() / w.float().norm()
    assert rel < 0.15  # NF4 keeps a Gaussian weight to ~10% relative error


def test_dequantize_from_views_of_a_buffer():
    w = torch.randn(64, 128, dtype=torch.bfloat16)
    packed, absmax = quantize_nf4(w)
    buf = torch.zeros(8192 + absmax.numel() * 4, dtype=torch.uint8)
    buf[: packed.numel()].copy_(packed.reshape(-1))
    buf[8192:].copy_(absmax.view(torch.uint8))
    p_view = buf[: packed.numel()].view(packed.shape)
    a_view = buf[8192:].view(torch.float32)
    info = QuantInfo("nf4", 64, (64, 128), "bfloat16")
    assert torch.equal(dequantize_nf4(p_view, a_view, info), dequantize_nf4(packed, absmax, info))


def test_rejects_other_types():
    with pytest.raises(StoreError):
        quantize_nf4(torch.zeros(64, 64, dtype=torch.int8))
    packed, absmax = quantize_nf4(torch.randn(64, 64))
    with pytest.raises(StoreError, match="unsupported quantization type"):
        dequantize_nf4(packed, absmax, QuantInfo("fp4", 64, (64, 64), "float32"))
