"""Oracles for the low-bit CPU kernels: each format's output equals its own exact reference (the dequantized weight
times the input as the kernel sees it), on the linear shapes of every supported family and odd ones.

Tolerance, per output element: |y - ref| <= tol * (sum_k |x_k| |w_k| + |b|), with ref computed in float64.
- tol = 1e-5 where the kernel computes in float32 (float32 input to int4 / int8, and w8a8 always): float32
  accumulation of up to 8960 products in another order than the reference, far below any quantization step;
- tol = 2**-7 where the kernel works in bf16 (bf16 input, or NF4's fused kernel, which rounds its input to bf16):
  the output is rounded to bf16 (2**-9 relative), and so may be the input and the dequantized weight (2**-9 each).
The bound scales with sum |x||w| rather than |y| so that outputs near zero through cancellation are judged fairly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from offspec.models.qlinear import (
    FORMATS,
    QuantLinear,
    cpu_kernels,
    linear_weight,
    quantize_linear,
    quantize_linears,
)
from tests.conftest import TINY_FAMILIES, _tiny_config

ROWS = (1, 3, 17, 64)
# Qwen2.5-1.5B's MLP (both directions) and its lm_head cut to a few thousand rows; then odd sizes: in_features not
# a multiple of the group size, out_features not a multiple of 32 or 64.
REAL_SHAPES = [(8960, 1536), (1536, 8960), (2000, 1536)]
ODD_SHAPES = [(70, 100), (33, 96), (130, 200), (7, 5)]


def family_linear_shapes() -> list[tuple[int, int, bool]]:
    """(out, in, bias) of every linear layer in a tiny model of every supported family."""
    from transformers import AutoModelForCausalLM

    shapes = set()
    for family in TINY_FAMILIES:
        model = AutoModelForCausalLM.from_config(_tiny_config(family, 1, False))
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                shapes.add((mod.out_features, mod.in_features, mod.bias is not None))
    return sorted(shapes)


def tolerance(fmt: str, dtype: torch.dtype) -> float:
    bf16_kernel = dtype != torch.float32 or (fmt == "nf4" and cpu_kernels().avx512_bf16)
    return 2.0 ** -7 if bf16_kernel else 1e-5


def check_against_reference(layer: QuantLinear, rows: int, dtype: torch.dtype, seed: int = 0,
                            weight: torch.Tensor | None = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, layer.in_features, generator=gen).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (rows, layer.out_features)
    weight = layer.dequantized().double() if weight is None else weight
    ref = layer.reference(x, weight)
    bound = x.double().abs() @ weight.abs().t()
    if layer.bias is not None:
        bound += layer.bias.double().abs()
    err = (y.double() - ref).abs()
    tol = tolerance(layer.fmt, dtype)
    worst = (err / bound.clamp_min(1e-30)).max().item()
    assert worst <= tol, f"{layer.fmt} {layer.path_for(rows, dtype)} rows={rows} {dtype}: {worst:.2e} > {tol:.0e}"


def check_reference_weight(layer: QuantLinear, w: torch.Tensor) -> None:
    """The reference weight is a quantization of w (not anything that happens to match the kernel)."""
    deq = layer.dequantized()
    assert deq.shape == w.shape and deq.dtype == torch.float32
    rel = ((deq - w).norm() / w.norm()).item()
    assert rel < (0.15 if layer.fmt in ("int4", "nf4") else 0.01), f"{layer.fmt}: relative weight error {rel:.3f}"
    if layer.fmt in ("int8", "w8a8"):  # per row: integer multiples of one scale, at most 127 of them each way
        scale = deq.abs().amax(1, keepdim=True) / 127
        codes = deq / scale
        assert (codes - codes.round()).abs().max() < 1e-3


def make_weight(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=gen) * in_f ** -0.5


def run_shape(out_f: int, in_f: int, bias: bool, fmts=FORMATS, rows=ROWS, seed: int = 0) -> None:
    w = make_weight(out_f, in_f, seed)
    b = torch.randn(out_f, generator=torch.Generator().manual_seed(seed + 1)) if bias else None
    for fmt in fmts:
        layer = QuantLinear.from_weight(w, b, fmt)
        check_reference_weight(layer, w)
        weight = layer.dequantized().double()
        for r in rows:
            for dtype in (torch.float32, torch.bfloat16):
                check_against_reference(layer, r, dtype, seed=r, weight=weight)


def test_family_shapes_equal_their_reference():
    shapes = family_linear_shapes()
    assert len(shapes) >= 5 and any(b for *_, b in shapes)  # q/k/v/o, MLP, lm_head; biases (qwen2, starcoder2...)
    for out_f, in_f, bias in shapes:
        run_shape(out_f, in_f, bias)
        if not bias:
            run_shape(out_f, in_f, True, rows=(3,))


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_odd_shapes_are_padded_and_equal_their_reference(shape):
    run_shape(*shape, bias=True)
    run_shape(*shape, bias=False, rows=(17,))
    layer = QuantLinear.from_weight(make_weight(*shape, 0), None, "int4", group_size=32)
    check_against_reference(layer, 3, torch.bfloat16)


@pytest.mark.parametrize("shape", REAL_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_real_shapes_equal_their_reference(shape):
    run_shape(*shape, bias=False, rows=(1, 17))


def test_every_path_of_a_format_equals_its_reference():
    """Row-count dispatch picks among exact kernels: each of them, forced, equals the reference at any row count."""
    w = make_weight(192, 128, 3)
    for fmt in FORMATS:
        layer = QuantLinear.from_weight(w, None, fmt)
        for path in layer.kernel.paths():
            x = torch.randn(5, 128).to(torch.bfloat16)
            y = layer(x, path=path)
            ref = layer.reference(x)
            bound = x.double().abs() @ layer.dequantized().double().abs().t()
            assert ((y.double() - ref).abs() / bound).max() <= 2 ** -7, (fmt, path)
        with pytest.raises(ValueError, match="not 'nope'"):
            layer(torch.randn(2, 128), path="nope")


def test_int8_dispatch_by_rows():
    layer = QuantLinear.from_weight(make_weight(128, 64, 0), None, "int8")
    assert layer.path_for(1) == "int8pack" and layer.path_for(64) == "dequant"


def test_int8_dequant_path_works_in_chunks(monkeypatch):
    """A weight larger than the conversion buffer is converted and multiplied a chunk of rows at a time."""
    import offspec.models.qlinear as ql

    monkeypatch.setattr(ql, "CHUNK_BYTES", 64 * 96 * 2)  # one 64-row chunk of bf16 at a time
    for fmt in ("int8", "nf4"):
        layer = QuantLinear.from_weight(make_weight(300, 96, 1), torch.randn(300), fmt)
        for dtype in (torch.float32, torch.bfloat16):
            check_against_reference(layer, 17, dtype)


def test_w8a8_with_seven_bit_activations_is_exact_too():
    """Without VNNI fbgemm needs 7-bit activations (reduce_range); that mode equals its reference as well."""
    layer = QuantLinear.from_weight(make_weight(256, 192, 4), torch.randn(256), "w8a8")
    layer.kernel.reduce_range = True
    for rows in (1, 17):
        check_against_reference(layer, rows, torch.float32)


def test_w8a8_quantizes_each_row_on_its_own():
    """A row of tiny values next to a row of huge ones keeps its precision (per-row scale, not per tensor)."""
    layer = QuantLinear.from_weight(make_weight(64, 64, 5), None, "w8a8")
    x = torch.randn(2, 64)
    x[0] *= 1e-4
    x[1] *= 1e4
    y, exact = layer(x).double(), x.double() @ layer.dequantized().double().t()
    assert ((y - exact).norm(dim=1) / exact.norm(dim=1)).max() < 0.02


def test_nbytes_counts_the_kernel_layout():
    w = make_weight(4096, 1536, 0)
    sizes = {fmt: QuantLinear.from_weight(w, None, fmt).nbytes for fmt in FORMATS}
    n = w.numel()
    assert n // 2 < sizes["int4"] < n * 0.6 and n // 2 < sizes["nf4"] < n * 0.6  # 4 bits + scales
    assert n <= sizes["int8"] < n * 1.05 and n <= sizes["w8a8"] < n * 1.05


def test_bad_input_is_refused_with_a_clear_error():
    w = make_weight(64, 64, 0)
    with pytest.raises(ValueError, match="unknown low-bit format 'int3'"):
        QuantLinear.from_weight(w, None, "int3")
    with pytest.raises(ValueError, match="group size"):
        QuantLinear.from_weight(w, None, "int4", group_size=48)
    with pytest.raises(ValueError, match="2-D float weight"):
        QuantLinear.from_weight(w.to(torch.int32), None, "int8")
    with pytest.raises(ValueError, match="expected input with 64 features, got 65"):
        QuantLinear.from_weight(w, None, "int8")(torch.randn(2, 65))


def test_any_leading_shape_and_half_precision():
    layer = QuantLinear.from_weight(make_weight(96, 64, 0), torch.randn(96), "int4")
    x = torch.randn(2, 3, 64)
    y = layer(x)
    assert y.shape == (2, 3, 96)
    assert torch.allclose(y.double(), layer.reference(x), atol=1e-4)
    assert layer(x.half()).dtype == torch.float16


# ---- replacing the linears of a model ------------------------------------------------------------------------

def nf4_linear(w: torch.Tensor, fused: bool):
    from offspec.models.nf4 import NF4Linear
    from offspec.store.manifest import QuantInfo
    from offspec.store.nf4 import nf4_quant_state, quantize_nf4

    info = QuantInfo(type="nf4", shape=list(w.shape), dtype="bfloat16", blocksize=64)
    packed, absmax = quantize_nf4(w.to(torch.bfloat16))
    mod = NF4Linear(w.shape[1], w.shape[0], info)
    mod.bind(packed, nf4_quant_state(absmax, info))
    want = mod.dequantized().float()
    if fused:
        assert mod.pack_for_cpu()
    return mod, want


@pytest.mark.parametrize("fused", [False, True])
def test_linear_weight_of_an_nf4_linear_is_its_dequantized_weight(fused):
    if fused and not cpu_kernels().avx512_bf16:
        pytest.skip("bitsandbytes' fused NF4 kernel needs AVX512-BF16")
    mod, want = nf4_linear(make_weight(128, 192, 0), fused)
    weight, bias = linear_weight(mod)
    # the fused kernel keeps bf16 block scales: its weight is the stored one up to that rounding
    assert bias is None and torch.allclose(weight.float(), want, rtol=2 ** -8, atol=0)
    layer = quantize_linear(mod, "int8")  # re-quantized from that weight: within half an int8 step of it
    step = weight.float().abs().amax(1, keepdim=True) / 127
    assert ((layer.dequantized() - weight.float()).abs() <= step / 2 * 1.01).all()


def tiny_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[0].float()


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_linears_keeps_a_tiny_model_close_to_float(make_tiny_model, fmt):
    """Every decoder layer's linears and the lm_head replaced: the logits stay close to the float model's."""
    from transformers import AutoModelForCausalLM

    src = make_tiny_model("qwen2", num_layers=2, tokenizer=False)  # attention biases too
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    # a random model's logits are nearly flat; sharpen them so top-1 means something
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    ids = torch.randint(3, 256, (1, 48), generator=torch.Generator().manual_seed(0))
    want = tiny_logits(model, ids)
    n_linears = sum(isinstance(m, nn.Linear) for m in model.model.layers.modules())
    names = quantize_linears(model.model.layers, fmt)
    assert len(names) == n_linears == 2 * 7
    model.lm_head = quantize_linear(model.lm_head, fmt)
    assert not any(isinstance(m, nn.Linear) and not isinstance(m, QuantLinear) for m in model.model.layers.modules())
    got = tiny_logits(model, ids)
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                    reduction="batchmean").item()
    # measured: int8 / w8a8 agree on all 48 positions (KL < 1e-3), int4 / nf4 on 38 and 41 (KL 0.08)
    assert top1 >= (0.95 if fmt in ("int8", "w8a8") else 0.7), f"{fmt}: top-1 agreement {top1:.2f}"
    assert kl < (0.005 if fmt in ("int8", "w8a8") else 0.15), f"{fmt}: KL {kl:.4f}"


def test_quantize_linears_skips_by_glob(make_tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model("llama", num_layers=2, tokenizer=False),
                                                 dtype=torch.float32).eval()
    names = quantize_linears(model, "int8", skip=["lm_head", "*.mlp.down_proj"])
    assert "lm_head" not in names and not any(n.endswith("down_proj") for n in names)
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    assert isinstance(model.model.layers[1].mlp.down_proj, nn.Linear)


# ---- machines without AVX-512 (or without AVX2) --------------------------------------------------------------

LOWER_CAPABILITY_CHECK = """
import torch
from offspec.models.qlinear import FORMATS, QuantLinear, cpu_kernels, _int4_block_n
caps = cpu_kernels()
assert caps.capability == {cap!r}, caps
assert not caps.avx512_bf16  # no fused NF4 without AVX-512 dispatch
for fmt in FORMATS:
    for out_f, in_f in ((128, 64), (70, 100)):
        w = torch.randn(out_f, in_f) / 10
        layer = QuantLinear.from_weight(w, torch.randn(out_f), fmt)
        assert ((layer.dequantized() - w).norm() / w.norm()) < 0.15
        for rows in (1, 17):
            x = torch.randn(rows, in_f)
            y, ref = layer(x).double(), layer.reference(x)
            bound = x.double().abs() @ layer.dequantized().double().abs().t() + layer.bias.double().abs()
            assert ((y - ref).abs() / bound).max() < 1e-5, (fmt, rows)
print("ok", _int4_block_n(), [QuantLinear.from_weight(torch.randn(64, 64), None, f).kernel.paths() for f in FORMATS])
"""


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_kernels_run_and_equal_their_reference_without_avx512(capability):
    """torch dispatches to AVX2 (or plain) code when told so; every format still runs and equals its reference."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, OMP_NUM_THREADS="1")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", LOWER_CAPABILITY_CHECK.format(cap=capability.upper())],
                          capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("ok")
    if capability == "avx2":
        assert line.startswith("ok 32") and "'dequant'" in line and "'fbgemm'" in line
    else:
        assert line.startswith("ok 0") and "'float32'" in line
