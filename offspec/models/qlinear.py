"""Low-bit linear layers for resident weights on the CPU, each held in its kernel's own layout.

Formats (`QuantLinear.from_weight(w, bias, fmt)`):
- "int4": 4-bit codes with an asymmetric bf16 scale and zero per group of `group_size` inputs, in torch's
  packed int4 CPU layout, multiplied by `aten._weight_int4pack_mm_for_cpu` (weight-only).
- "int8": int8 per output channel with a bf16-exact scale (weight-only): `aten._weight_int8pack_mm` for a
  few rows, else each chunk of the weight converted into a reused buffer and one dense matmul.
- "w8a8": int8 per channel times the activations quantized to 8 bits per row on the fly (fbgemm's dynamic
  linear, integer accumulation); without fbgemm the same arithmetic in float32.
- "nf4": bitsandbytes NF4 (blocks of 64), its fused AVX512-BF16 kernel where the CPU has one, else
  dequantized per call (in chunks) and one dense matmul.

`dequantized()` is the exact weight the kernel multiplies by; `reference(x)` is the exact product the kernel
approximates (for "w8a8" it quantizes x as the kernel does). int4 and nf4 weights are zero-padded to
whole tiles (out_features to 64, in_features to the group size) and x is padded to match per call.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

FORMATS = ("int4", "int8", "w8a8", "nf4")
GROUP_SIZES = (32, 64, 128, 256)
NF4_BLOCKSIZE = 64
OUT_TILE = 64  # int4's packed layout and bitsandbytes' fused layout tile output rows by 64 and 32

# Up to this many rows `_weight_int8pack_mm` beats converting the weight to bf16 and one dense matmul
# (scripts/bench_kernels.py, "paths" table: at 1 row the pack kernel wins, from 4 rows the dense matmul).
INT8_PACK_MAX_ROWS = 2
# Dequantizing paths convert at most this many weight bytes at a time (a chunk stays in the L2/L3 caches
# for its matmul, and no buffer grows with the vocabulary).
CHUNK_BYTES = 4 << 20

_SCRATCH: dict[tuple, torch.Tensor] = {}  # one conversion buffer per (numel, dtype): layers run one at a time


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    key = (numel, dtype)
    if key not in _SCRATCH:
        _SCRATCH[key] = torch.empty(numel, dtype=dtype)
    return _SCRATCH[key]


@dataclass(frozen=True)
class CpuKernels:
    """What this CPU and this torch build offer the low-bit kernels."""

    capability: str  # torch's dispatch level: "AVX512", "AVX2", "DEFAULT" (ATEN_CPU_CAPABILITY lowers it)
    avx512_bf16: bool  # bitsandbytes' fused NF4 kernel (only used with AVX512 dispatch)
    vnni: bool  # 8-bit dot products without int16 saturation: fbgemm may use all 8 activation bits
    fbgemm: bool  # torch's quantized engine for the dynamic int8 linear


@lru_cache(maxsize=None)
def cpu_kernels() -> CpuKernels:
    capability = torch.backends.cpu.get_cpu_capability()
    avx512 = capability.startswith("AVX512")
    bf16 = False
    if avx512:
        with contextlib.suppress(Exception):
            from offspec.store.nf4 import _bnb_functional

            bf16 = bool(_bnb_functional().has_avx512bf16())
    vnni = bool(getattr(torch.cpu, "_is_vnni_supported", lambda: False)())
    fbgemm = capability != "DEFAULT" and "fbgemm" in torch.backends.quantized.supported_engines
    return CpuKernels(capability, bf16, vnni, fbgemm)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized.*deprecated.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch(\..*)?")
        yield


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _chunk_rows(k: int, elt: int) -> int:
    return max(OUT_TILE, CHUNK_BYTES // (k * elt) // OUT_TILE * OUT_TILE)


class _Kernel:
    """One format's weight in its kernel's layout: multiply, and say which weight it multiplies by."""

    name: str
    n: int  # rows of the held (possibly padded) weight
    k: int

    def matmul(self, x: torch.Tensor, path: str) -> torch.Tensor:  # x [M, k] -> [M, n] in x's dtype
        raise NotImplementedError

    def path_for(self, rows: int, dtype: torch.dtype) -> str:
        return self.paths()[0]

    def paths(self) -> tuple[str, ...]:
        raise NotImplementedError

    def dequantized(self) -> torch.Tensor:  # float32 [n, k]
        raise NotImplementedError

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:  # float64 [M, k]: what the weight meets
        return x.double()

    def nbytes(self) -> int:
        raise NotImplementedError


# ---- int4: torch's packed layout with bf16 scale and zero per group -------------------------------------------

@lru_cache(maxsize=None)
def _int4_block_n() -> int:
    """Rows per block of torch's packed int4 CPU layout on this dispatch level ([n/B, k, B/2] bytes, low nibble
    = first half of the block's rows): 64 with AVX512, 32 with AVX2; 0 if neither model fits."""
    probe = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    for block in (64, 32):
        if packed.shape == (128, 32) and torch.equal(_unpack_int4(packed, 128, 64, block).int(), probe):
            return block
    return 0


def _unpack_int4(packed: torch.Tensor, n: int, k: int, block: int) -> torch.Tensor:
    b = packed.view(n // block, k, block // 2)
    return torch.cat([b & 15, b >> 4], -1).permute(0, 2, 1).reshape(n, k)  # uint8 codes [n, k]


class _Int4(_Kernel):
    name = "int4"

    def __init__(self, w: torch.Tensor, group_size: int) -> None:
        self.n, self.k, self.group = w.shape[0], w.shape[1], group_size
        g = w.float().reshape(self.n, self.k // group_size, group_size)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        # the kernel computes (q - 8) * scale + zero: scale and zero are rounded to bf16 first, codes fit them
        scale = ((hi - lo) / 15).clamp_min(1e-12).to(torch.bfloat16).float()
        zero = (lo + 8 * scale).to(torch.bfloat16).float()
        q = ((g - zero) / scale + 8).round_().clamp_(0, 15).to(torch.int32).reshape(self.n, self.k)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # uint8 [n, k/2]
        # [k/group, n, 2] (scale, zero) per dtype, bf16 always kept; others made on first use
        sz = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], -1).transpose(0, 1).contiguous()
        self.sz = {torch.bfloat16: sz.to(torch.bfloat16)}

    def paths(self) -> tuple[str, ...]:
        return ("int4pack",)

    def _scales(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self.sz:
            self.sz[dtype] = self.sz[torch.bfloat16].to(dtype)
        return self.sz[dtype]

    def matmul(self, x: torch.Tensor, path: str) -> torch.Tensor:
        dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
        x = x.to(dtype).contiguous()
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self._scales(dtype))

    def codes(self) -> torch.Tensor:
        block = _int4_block_n()
        if block and self.n % block == 0:
            return _unpack_int4(self.packed, self.n, self.k, block)
        # unknown layout: read the codes back through the kernel itself (float32, scale 1, zero 0 -> q - 8)
        sz = torch.zeros(self.k // self.group, self.n, 2)
        sz[..., 0] = 1
        eye = torch.eye(self.k)
        return (torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group, sz).t() + 8).round().to(
            torch.uint8)

    def dequantized(self) -> torch.Tensor:
        sz = self.sz[torch.bfloat16].float()  # [k/g, n, 2]
        scale, zero = sz[..., 0].t().unsqueeze(-1), sz[..., 1].t().unsqueeze(-1)  # [n, k/g, 1]
        q = self.codes().float().reshape(self.n, self.k // self.group, self.group)
        return ((q - 8) * scale + zero).reshape(self.n, self.k)

    def nbytes(self) -> int:
        return self.packed.numel() + self.sz[torch.bfloat16].numel() * 2


# ---- int8 weight-only, per output channel -----------------------------------------------------------------

def _int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes [n, k] and a float32 scale [n] that is exact in bf16."""
    w = w.float()
    scale = (w.abs().amax(1) / 127).clamp_min(1e-12).to(torch.bfloat16).float()
    q = (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


class _Int8(_Kernel):
    name = "int8"

    def __init__(self, w: torch.Tensor) -> None:
        self.n, self.k = w.shape
        self.q, scale = _int8_per_channel(w)
        self.scale = {torch.float32: scale, torch.bfloat16: scale.to(torch.bfloat16)}

    def paths(self) -> tuple[str, ...]:
        # `_weight_int8pack_mm` reads past the row end (and may crash) unless in_features is a multiple of 16
        return ("int8pack", "dequant") if self.k % 16 == 0 else ("dequant",)

    def path_for(self, rows: int, dtype: torch.dtype) -> str:
        return "int8pack" if rows <= INT8_PACK_MAX_ROWS and self.k % 16 == 0 else "dequant"

    def _scales(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self.scale:
            self.scale[dtype] = self.scale[torch.float32].to(dtype)
        return self.scale[dtype]

    def matmul(self, x: torch.Tensor, path: str) -> torch.Tensor:
        dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
        x = x.to(dtype).contiguous()
        if path == "int8pack":
            return torch.ops.aten._weight_int8pack_mm(x, self.q, self._scales(dtype))
        # codes are exact in any float dtype: y = (x @ q^T) * scale, a chunk of output rows at a time
        rows = _chunk_rows(self.k, x.element_size())
        if rows >= self.n:
            buf = _scratch(self.n * self.k, dtype)[: self.n * self.k].view(self.n, self.k)
            buf.copy_(self.q)
            return F.linear(x, buf).mul_(self._scales(dtype))
        out = torch.empty(x.shape[0], self.n, dtype=dtype)
        buf_flat = _scratch(rows * self.k, dtype)
        for n0 in range(0, self.n, rows):
            n1 = min(self.n, n0 + rows)
            buf = buf_flat[: (n1 - n0) * self.k].view(n1 - n0, self.k)
            buf.copy_(self.q[n0:n1])
            out[:, n0:n1] = F.linear(x, buf)
        return out.mul_(self._scales(dtype))

    def dequantized(self) -> torch.Tensor:
        return self.q.float() * self.scale[torch.float32][:, None]

    def nbytes(self) -> int:
        return self.q.numel() + self.n * 2


# ---- int8 weights times int8 activations (dynamic, per row) ---------------------------------------------------

class _W8A8(_Kernel):
    """fbgemm's dynamic linear quantizes its input per tensor (asymmetric uint8); each row is first divided by
    its absolute maximum, so the 8 bits serve every row, and the row scale is multiplied back afterwards."""

    name = "w8a8"

    def __init__(self, w: torch.Tensor) -> None:
        self.n, self.k = w.shape
        q, scale = _int8_per_channel(w)
        self.scale = scale
        caps = cpu_kernels()
        self.reduce_range = not caps.vnni  # without VNNI fbgemm's u8*s8 pairs saturate in int16: use 7 bits
        self.packed = None
        self.q = None
        if caps.fbgemm:
            with _quiet():
                zeros = torch.zeros(self.n, dtype=torch.int64)
                wq = torch._make_per_channel_quantized_tensor(q, scale.double(), zeros, 0)
                self.packed = torch.ops.quantized.linear_prepack(wq, None)
        else:
            self.q = q

    def paths(self) -> tuple[str, ...]:
        return ("fbgemm",) if self.packed is not None else ("float32",)

    @staticmethod
    def _row_scale(x: torch.Tensor) -> torch.Tensor:
        return x.abs().amax(-1, keepdim=True).clamp_min_(1e-30)

    def matmul(self, x: torch.Tensor, path: str) -> torch.Tensor:
        x32 = x.float()
        m = self._row_scale(x32)  # [M, 1]
        xn = x32 / m
        if self.packed is not None:
            y = torch.ops.quantized.linear_dynamic(xn, self.packed, self.reduce_range)
        else:
            y = F.linear(self._quantize(xn).float(), self.dequantized())
        return y.mul_(m).to(x.dtype)

    def _quantize(self, xn: torch.Tensor) -> torch.Tensor:
        """What fbgemm makes of the row-normalized input (float32): its per-tensor qparams, then the codes
        round(fma(x, 1/scale, zero)) in float32 (one rounding, as its fused multiply-add does; half to even),
        clamped, dequantized."""
        scale, zero = torch._choose_qparams_per_tensor(xn, self.reduce_range)
        scale32 = torch.tensor(scale, dtype=torch.float32)
        inv = (1 / scale32).double()
        codes = torch.round((xn.double() * inv + zero).float()).clamp_(0, 255)  # uint8, even with 7-bit qparams
        return (codes - zero) * scale32

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        m = self._row_scale(x32)
        return self._quantize(x32 / m).double() * m.double()

    def dequantized(self) -> torch.Tensor:
        if self.packed is not None:
            with _quiet():
                wq, _ = torch.ops.quantized.linear_unpack(self.packed)
                return wq.dequantize().float()
        return self.q.float() * self.scale[:, None]

    def nbytes(self) -> int:
        return self.n * self.k + self.n * 8  # codes, and fbgemm's scale and column sums


# ---- NF4 (bitsandbytes) -----------------------------------------------------------------------------------

def _nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size, dtype: torch.dtype,
                    blocksize: int = NF4_BLOCKSIZE) -> torch.Tensor:
    """bitsandbytes' NF4 codes (row-major pairs) times their float32 block absmax, as a [out, in] tensor in dtype."""
    from offspec.store.nf4 import _bnb_functional, nf4_code

    bnbf = _bnb_functional()
    out_dtype = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
    state = bnbf.QuantState(absmax=absmax.float(), shape=shape, code=nf4_code("cpu"), blocksize=blocksize,
                            quant_type="nf4", dtype=out_dtype)
    return bnbf.dequantize_4bit(packed.reshape(-1, 1), state).to(dtype)


class _NF4(_Kernel):
    name = "nf4"

    def __init__(self, w: torch.Tensor) -> None:
        from offspec.store.nf4 import _bnb_functional

        bnbf = _bnb_functional()
        self.n, self.k = w.shape
        packed, state = bnbf.quantize_4bit(w.float().contiguous(), blocksize=NF4_BLOCKSIZE, quant_type="nf4",
                                           compress_statistics=False)
        self.fused = cpu_kernels().avx512_bf16 and self.n % 32 == 0 and self.k % NF4_BLOCKSIZE == 0
        if self.fused:
            self.packed, self.state = bnbf._convert_weight_packed_for_cpu(packed, state)
        else:
            self.packed, self.state = packed, state

    def paths(self) -> tuple[str, ...]:
        return ("bnb-fused",) if self.fused else ("dequant",)

    def matmul(self, x: torch.Tensor, path: str) -> torch.Tensor:
        from offspec.store.nf4 import _bnb_functional

        bnbf = _bnb_functional()
        if self.fused:
            return bnbf.gemv_4bit(x.to(torch.bfloat16).contiguous(), self.packed, state=self.state).to(x.dtype)
        dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
        x = x.to(dtype)
        rows = _chunk_rows(self.k, x.element_size())
        if rows >= self.n or self.k % NF4_BLOCKSIZE:  # blocks straddle rows: dequantize all at once
            return F.linear(x, self._dequantize(0, self.n, dtype))
        out = torch.empty(x.shape[0], self.n, dtype=dtype)
        for n0 in range(0, self.n, rows):
            n1 = min(self.n, n0 + rows)
            out[:, n0:n1] = F.linear(x, self._dequantize(n0, n1, dtype))
        return out

    def _dequantize(self, n0: int, n1: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows n0:n1 of the weight in dtype (whole blocks when k is a multiple of the block size)."""
        from offspec.store.nf4 import _bnb_functional

        st = self.state
        if n0 == 0 and n1 == self.n:
            part, absmax, shape = self.packed, st.absmax, st.shape
        else:
            half, per_row = self.k // 2, self.k // NF4_BLOCKSIZE
            part = self.packed[n0 * half: n1 * half]
            absmax, shape = st.absmax[n0 * per_row: n1 * per_row], torch.Size((n1 - n0, self.k))
        return _nf4_dequantize(part, absmax, shape, dtype)

    def dequantized(self) -> torch.Tensor:
        from offspec.store.nf4 import _bnb_functional

        bnbf = _bnb_functional()
        if not self.fused:
            return self._dequantize(0, self.n, torch.float32)
        packed, state = bnbf._convert_weight_packed_for_cpu_inverse(self.packed, copy.deepcopy(self.state))
        # the fused kernel multiplies by the bf16-rounded absmax it was given; so does this reference
        absmax = self.state.absmax.float().t().reshape(-1)  # [k/64, n] -> row-major blocks
        return _nf4_dequantize(packed, absmax, torch.Size((self.n, self.k)), torch.float32)

    def nbytes(self) -> int:
        absmax = self.state.absmax
        return self.packed.numel() * self.packed.element_size() + absmax.numel() * absmax.element_size()


# ---- the module ---------------------------------------------------------------------------------------------

class QuantLinear(nn.Module):
    """y = x W^T + b with W held by a low-bit kernel (CPU); x of any float dtype, y in x's dtype.

    Build with `QuantLinear.from_weight`. The kernel used may depend on the number of rows (`path_for`)."""

    def __init__(self, kernel: _Kernel, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.kernel = kernel
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else bias.detach().float().clone()

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, fmt: str = "int4", *,
                    group_size: int = 64) -> QuantLinear:
        """Quantize a float weight [out, in] (and keep the bias in float32) into format `fmt`."""
        if fmt not in FORMATS:
            raise ValueError(f"unknown low-bit format {fmt!r}; choose one of {', '.join(FORMATS)}")
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"expected a 2-D float weight, got {tuple(weight.shape)} {weight.dtype}")
        if group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {GROUP_SIZES}, not {group_size}")
        out_features, in_features = weight.shape
        w = weight.detach().to("cpu", torch.float32)
        if fmt in ("int4", "nf4"):  # whole tiles: zero rows and columns, sliced off / met by zero inputs
            unit = group_size if fmt == "int4" else NF4_BLOCKSIZE
            pad_in, pad_out = _round_up(in_features, unit) - in_features, _round_up(out_features, OUT_TILE) - out_features
            w = F.pad(w, (0, pad_in, 0, pad_out))
        kernel = {"int4": lambda: _Int4(w, group_size), "int8": lambda: _Int8(w), "w8a8": lambda: _W8A8(w),
                  "nf4": lambda: _NF4(w)}[fmt]()
        return cls(kernel, in_features, out_features, bias)

    @property
    def fmt(self) -> str:
        return self.kernel.name

    @property
    def nbytes(self) -> int:
        """Bytes the weight (and bias) take in the kernel's layout."""
        return self.kernel.nbytes() + (0 if self.bias is None else self.bias.numel() * 4)

    def path_for(self, rows: int, dtype: torch.dtype = torch.bfloat16) -> str:
        """The kernel that runs for `rows` rows of input."""
        return self.kernel.path_for(rows, dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel multiplies by, float32 [out, in] (padding removed)."""
        return self.kernel.dequantized()[: self.out_features, : self.in_features]

    def reference(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The exact product the kernel computes up to rounding: in float64, the input as the kernel quantizes it
        (w8a8) or as given (weight-only formats) times `dequantized()` (pass it as `weight` if at hand), plus
        the bias."""
        x2 = self.kernel.quantize_input(x.reshape(-1, x.shape[-1]))
        w = (self.dequantized() if weight is None else weight).double()
        y = x2 @ w.t()
        if self.bias is not None:
            y = y + self.bias.double()
        return y.reshape(*x.shape[:-1], self.out_features)

    def _pad_input(self, x: torch.Tensor) -> torch.Tensor:
        extra = self.kernel.k - self.in_features
        return F.pad(x, (0, extra)) if extra else x

    def forward(self, x: torch.Tensor, path: str | None = None) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with {self.in_features} features, got {x.shape[-1]}")
        lead = x.shape[:-1]
        x2 = self._pad_input(x.reshape(-1, self.in_features))
        path = path or self.kernel.path_for(x2.shape[0], x.dtype)
        if path not in self.kernel.paths():
            raise ValueError(f"{self.fmt} has kernels {self.kernel.paths()}, not {path!r}")
        with torch.no_grad():
            y = self.kernel.matmul(x2, path)
            if self.kernel.n != self.out_features:
                y = y[:, : self.out_features]
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, "
                f"bias={self.bias is not None}, kernels={'/'.join(self.kernel.paths())}")


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear layer's float weight [out, in] and bias: nn.Linear as is, NF4Linear dequantized, QuantLinear's
    reference weight."""
    from offspec.models.nf4 import NF4Linear

    if isinstance(module, QuantLinear):
        return module.dequantized(), module.bias
    if isinstance(module, NF4Linear):
        return _nf4linear_weight(module), module.bias
    if isinstance(module, nn.Linear):
        return module.weight.detach(), None if module.bias is None else module.bias.detach()
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def _nf4linear_weight(mod) -> torch.Tensor:
    from offspec.store.nf4 import _bnb_functional

    bnbf = _bnb_functional()
    if mod._fused is not None:  # repacked for the fused kernel: undo the repacking on a copy
        packed, state = mod._fused
        n, k = mod.info.shape
        codes, _ = bnbf._convert_weight_packed_for_cpu_inverse(packed, copy.deepcopy(state))
        absmax = state.absmax.float().t().reshape(-1)
        return _nf4_dequantize(codes, absmax, torch.Size((n, k)), torch.float32, mod.info.blocksize)
    if mod.weight is None:
        raise ValueError("NF4Linear has no weight bound")
    return mod.dequantized()


def _is_linear(module: nn.Module) -> bool:
    from offspec.models.nf4 import NF4Linear

    return isinstance(module, (nn.Linear, NF4Linear)) and not isinstance(module, QuantLinear)


def quantize_linears(module: nn.Module, fmt: str, skip: Iterable[str] = (), *, group_size: int = 64) -> list[str]:
    """Replace every nn.Linear / NF4Linear inside `module` by a QuantLinear in `fmt`, built from its float (or
    dequantized) weight, except those whose qualified name matches a glob in `skip`; returns the names replaced.
    (For a lone layer, such as an lm_head, use `quantize_linear`.)"""
    skip = tuple(skip)
    names = [name for name, mod in module.named_modules() if name and _is_linear(mod)
             and not any(fnmatch.fnmatchcase(name, pat) for pat in skip)]
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, leaf, quantize_linear(getattr(parent, leaf), fmt, group_size=group_size))
    return names


def quantize_linear(linear: nn.Module, fmt: str, *, group_size: int = 64) -> QuantLinear:
    """One nn.Linear / NF4Linear (or QuantLinear, re-quantized from its reference weight) as a QuantLinear."""
    weight, bias = linear_weight(linear)
    return QuantLinear.from_weight(weight, bias, fmt, group_size=group_size)


def quantized_nbytes(out_features: int, in_features: int, fmt: str, *, group_size: int = 64) -> int:
    """Bytes a QuantLinear of this shape holds in `fmt`, its bias aside (what memory plans count, without building
    it)."""
    if fmt == "int4":
        n, k = _round_up(out_features, OUT_TILE), _round_up(in_features, group_size)
        return n * k // 2 + 4 * n * (k // group_size)
    if fmt == "int8":
        return out_features * in_features + 2 * out_features
    if fmt == "w8a8":
        return out_features * in_features + 8 * out_features
    if fmt == "nf4":  # the fused kernel's layout keeps the block scales in bf16
        n, k = _round_up(out_features, OUT_TILE), _round_up(in_features, NF4_BLOCKSIZE)
        return n * k // 2 + n * k // NF4_BLOCKSIZE * (2 if cpu_kernels().avx512_bf16 else 4)
    raise ValueError(f"unknown low-bit format {fmt!r}; choose one of {', '.join(FORMATS)}")
