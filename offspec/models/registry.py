"""Supported decoder-only architectures and how to build their skeleton without allocating weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from offspec.errors import ModelError


@dataclass(frozen=True)
class Skeleton:
    """transformers modules for one model, built on the meta device (weights assigned later)."""

    config: object
    embed: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Module
    rotary: nn.Module  # real (CPU) buffers: rotary inv_freq is computed, not stored


# model_type -> attribute path of the decoder stack inside the CausalLM
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def check_supported(model_type: str) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"unsupported architecture '{model_type}'; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def build_skeleton(config, dtype: torch.dtype, device: torch.device | str = "cpu") -> Skeleton:
    """Instantiate the model class on meta (no memory), return its parts with a real rotary embedding."""
    from transformers import AutoModelForCausalLM

    check_supported(config.model_type)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    inner = model.model
    rotary = type(inner.rotary_emb)(config=config).to(device)
    return Skeleton(config, inner.embed_tokens, inner.layers, inner.norm, model.lm_head, rotary)
