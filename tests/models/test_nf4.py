"""NF4Linear dequantizes into a buffer reused per shape and thread: the same values as bitsandbytes' own
(allocating) dequantization, and no weight-sized allocation per call."""

from __future__ import annotations

import threading

import pytest
import torch

from offspec.models.nf4 import NF4Linear, scratch_bytes
from offspec.store.manifest import QuantInfo
from offspec.store.nf4 import NF4_BLOCKSIZE, dequantize_nf4, nf4_quant_state, quantize_nf4


def _nf4_linear(out_f: int, in_f: int, dtype: torch.dtype) -> tuple[NF4Linear, QuantInfo, torch.Tensor, torch.Tensor]:
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(out_f * in_f)).to(dtype)
    packed, absmax = quantize_nf4(w)
    info = QuantInfo("nf4", NF4_BLOCKSIZE, (out_f, in_f), str(dtype).removeprefix("torch."))
    lin = NF4Linear(in_f, out_f, info)
    lin.bind(packed, nf4_quant_state(absmax, info))
    return lin, info, packed, absmax


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(64, 32), (96, 130), (33, 64), (7, 6)])
def test_dequantized_equals_bitsandbytes_and_reuses_its_buffer(shape, dtype):
    lin, info, packed, absmax = _nf4_linear(*shape, dtype)
    first = lin.dequantized()
    assert torch.equal(first, dequantize_nf4(packed, absmax, info))  # bit for bit
    ptr = first.data_ptr()
    assert lin.dequantized().data_ptr() == ptr  # the same buffer, call after call
    x = torch.randn(3, shape[1]).to(dtype)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, dequantize_nf4(packed, absmax, info)))


def test_each_thread_has_its_own_buffer():
    """The draft-ahead thread and the main thread may dequantize at the same time: never into one buffer."""
    lin, *_ = _nf4_linear(64, 64, torch.float32)
    here = lin.dequantized().data_ptr()
    there = []
    t = threading.Thread(target=lambda: there.append((lin.dequantized().data_ptr(), scratch_bytes())))
    t.start()
    t.join()
    assert there[0][0] != here and there[0][1] == 64 * 64 * 4
