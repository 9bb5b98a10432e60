"""Device and dtype policy: which torch device a flag names, and which dtype this machine multiplies fastest."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from offspec.errors import ConfigError


def resolve_device(device: str) -> torch.device:
    """'cpu', 'cuda' or 'auto' -> a torch device; cuda without CUDA is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but CUDA is not available on this machine")
        return torch.device(device)
    if device != "cpu":
        raise ConfigError(f"unknown device '{device}' (use cpu, cuda or auto)")
    return torch.device("cpu")


def cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` natively (AVX-512 BF16/FP16 or AMX); otherwise float32 is faster."""
    if dtype == torch.float32:
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return False
    want = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}
    return any(f in flags for f in want.get(dtype, ()))


def pick_compute_dtype(store_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype activations and weights are multiplied in (OFFSPEC_COMPUTE_DTYPE overrides)."""
    from offspec.store.manifest import DTYPES

    forced = os.environ.get("OFFSPEC_COMPUTE_DTYPE")
    if forced:
        if forced not in DTYPES or DTYPES[forced] not in (torch.bfloat16, torch.float16, torch.float32):
            raise ConfigError(f"bad OFFSPEC_COMPUTE_DTYPE '{forced}': use bfloat16, float16 or float32")
        return DTYPES[forced]
    if device.type == "cpu" and not cpu_has_native(store_dtype):
        return torch.float32
    return store_dtype
