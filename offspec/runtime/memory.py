"""Default memory budgets from the machine (psutil, and torch.cuda.mem_get_info on CUDA)."""

from __future__ import annotations

import psutil
import torch


def default_budgets(device: torch.device) -> tuple[int, int]:
    """(device_budget_bytes, host_budget_bytes): leave headroom for activations and the OS."""
    avail = psutil.virtual_memory().available
    host = int(avail * 0.6)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.85), host
    return host, host
