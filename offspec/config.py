"""Frozen run configurations and the parsing of user-given values; validation raises ConfigError."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from offspec.errors import ConfigError

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}
DTYPE_CHOICES = ("bfloat16", "float16", "float32")
BITS_CHOICES = (16, 4)


def check_bits_dtype(bits: int | None, dtype: str) -> None:
    """ConfigError unless bits is 16, 4 or None (chosen from the source) and dtype a float dtype name."""
    if bits is not None and bits not in BITS_CHOICES:
        raise ConfigError(f"bad --bits {bits}: use 16 or 4")
    if dtype not in DTYPE_CHOICES:
        raise ConfigError(f"bad --dtype '{dtype}': use one of {', '.join(DTYPE_CHOICES)}")


def parse_size(text: str) -> int:
    """'512MiB', '2GiB', '1.5G', '1000000' -> bytes; ConfigError on anything else."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise ConfigError(f"bad size '{text}': use a number with a unit such as 512MiB, 2GiB or 1.5GB")
    value = float(m.group(1)) * _UNITS[unit]
    if value <= 0:
        raise ConfigError(f"bad size '{text}': must be positive")
    return int(value)


def parse_device_memory(text: str | None) -> tuple[int | None, int | None]:
    """--device-memory: 'SIZE' -> (bytes, None); 'min' or 'min+SIZE' -> (None, bytes over the plan's minimum)."""
    if text is None:
        return None, None
    t = str(text).strip().lower().replace(" ", "")
    if t == "min":
        return None, 0
    if t.startswith("min+"):
        return None, parse_size(t[4:])
    return parse_size(text), None


def parse_budget(text: str) -> int | None:
    """'auto' -> None, else a positive int tree budget (1..4096)."""
    if str(text).strip().lower() == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        raise ConfigError(f"bad --budget '{text}': use auto or a number of tree tokens (1 to 4096)") from None
    if not 1 <= n <= 4096:
        raise ConfigError(f"bad --budget {n}: must be between 1 and 4096")
    return n


@dataclass(frozen=True)
class RuntimeConfig:
    """How to open a model: device, budgets, page-cache policy, store options."""

    device: str = "cpu"
    device_memory_bytes: int | None = None
    device_memory_over_min: int | None = None  # 'min+SIZE': the plan's minimum plus this much
    host_memory_bytes: int | None = None
    warm: bool = False
    bits: int | None = None  # None: chosen from the source (NF4 for GGUFs quantized below 8 bits, else 16)
    dtype: str = "bfloat16"
    expert_prefetch: str | None = None  # a mixture of experts: None, "previous" or "gate" (runtime/expert_prefetch)

    @classmethod
    def from_flags(cls, device: str = "cpu", device_memory: str | None = None, host_memory: str | None = None,
                   warm: bool = False, bits: int | None = None, dtype: str = "bfloat16",
                   expert_prefetch: str = "off") -> "RuntimeConfig":
        """Parse the command-line strings (sizes, 'min+SIZE') into a validated config."""
        dev_bytes, over_min = parse_device_memory(device_memory)
        prefetch = expert_prefetch.strip().lower()
        return cls(device=device.strip().lower(), device_memory_bytes=dev_bytes, device_memory_over_min=over_min,
                   host_memory_bytes=parse_size(host_memory) if host_memory is not None else None,
                   warm=warm, bits=bits, dtype=dtype, expert_prefetch=None if prefetch == "off" else prefetch)

    def __post_init__(self) -> None:
        check_bits_dtype(self.bits, self.dtype)
        if self.expert_prefetch not in (None, "previous", "gate"):
            raise ConfigError(f"bad --expert-prefetch '{self.expert_prefetch}': use off, previous or gate")


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen (the one home of their checks; messages name the command-line flags).

    Order of application: penalties over the last repeat_last_n tokens, then temperature, top-k, top-p, min-p.
    temperature 0 = greedy (penalties still apply); top_k 0, top_p 1, min_p 0, penalties 1/0/0 = off.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64  # -1 = the whole context, 0 = no penalties
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        def finite(flag: str, value: float) -> None:
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"bad {flag} {value}: must be a finite number")

        for flag, value in (("--temperature", self.temperature), ("--top-p", self.top_p), ("--min-p", self.min_p),
                            ("--repeat-penalty", self.repeat_penalty), ("--presence-penalty", self.presence_penalty),
                            ("--frequency-penalty", self.frequency_penalty)):
            finite(flag, value)
        if self.temperature < 0:
            raise ConfigError(f"bad --temperature {self.temperature}: must be 0 (greedy) or more")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"bad --top-p {self.top_p}: must be in (0, 1] (1 = off); "
                              "for the likeliest token alone use --top-k 1")
        if self.top_k < 0:
            raise ConfigError(f"bad --top-k {self.top_k}: must be 0 (off) or more")
        if not 0.0 <= self.min_p < 1.0:
            raise ConfigError(f"bad --min-p {self.min_p}: must be in [0, 1) (0 = off)")
        if self.repeat_penalty <= 0:
            raise ConfigError(f"bad --repeat-penalty {self.repeat_penalty}: must be more than 0 (1 = off)")
        if self.repeat_last_n < -1:
            raise ConfigError(f"bad --repeat-last-n {self.repeat_last_n}: must be -1 (whole context), 0 (off) or more")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether any penalty is on (and has a window to look at)."""
        on = self.repeat_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
        return on and self.repeat_last_n != 0
