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


def machine_memory(device: torch.device) -> tuple[int, str]:
    """(total bytes, what they are) of the memory a --device-memory budget on device draws from."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory), f"memory on {device}"
    return int(psutil.virtual_memory().total), "RAM"
