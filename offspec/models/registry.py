"""Supported decoder-only families: one table of what differs between them, and the skeleton builder.

Everything else a family does (embedding scaling, per-layer-type rotary, sandwich norms, q/k norms,
residual and attention multipliers, biases) is done by transformers' own modules, run through the
model's public forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from offspec.errors import ModelError


@dataclass(frozen=True)
class Family:
    """What offspec has to know about a family beyond what transformers' modules do themselves."""

    model_type: str
    label: str  # the family as people name it
    masks_by_layer_type: bool = False  # the model forward takes {"full_attention": m, "sliding_attention": m}
    window_on_every_layer: bool = False  # config.sliding_window, when set, applies to every layer (one mask)
    logit_softcap: str | None = None  # config attribute c: logits = c * tanh(logits / c) (Gemma)
    logit_divisor: str | None = None  # config attribute d: logits = logits / d (Granite)
    logit_multiplier: str | None = None  # config attribute m: logits = logits * m (Cohere)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "Llama 1-3.x"),
    Family("mistral", "Mistral", window_on_every_layer=True),
    Family("qwen2", "Qwen2 / Qwen2.5", masks_by_layer_type=True),
    Family("qwen3", "Qwen3", masks_by_layer_type=True),
    Family("gemma2", "Gemma 2", masks_by_layer_type=True, logit_softcap="final_logit_softcapping"),
    Family("gemma3_text", "Gemma 3 text", masks_by_layer_type=True, logit_softcap="final_logit_softcapping"),
    Family("phi3", "Phi-3 / Phi-3.5 / Phi-4-mini", window_on_every_layer=True),
    Family("olmo2", "OLMo 2"),
    Family("granite", "Granite", logit_divisor="logits_scaling"),
    Family("smollm3", "SmolLM3", masks_by_layer_type=True),
    Family("starcoder2", "StarCoder2", window_on_every_layer=True),
    Family("gemma", "Gemma"),
    Family("glm", "GLM-4 (0414 and earlier)"),
    Family("glm4", "GLM-4-0414"),
    Family("cohere", "Command R", logit_multiplier="logit_scale"),
    Family("cohere2", "Command R7B / A", masks_by_layer_type=True, logit_multiplier="logit_scale"),
    Family("ministral", "Ministral", masks_by_layer_type=True),
    Family("exaone4", "EXAONE 4", masks_by_layer_type=True),
    Family("olmo", "OLMo"),
    Family("olmo3", "OLMo 3", masks_by_layer_type=True),
    Family("phi", "Phi-1 / Phi-2"),
    Family("helium", "Helium"),
    Family("arcee", "Arcee (AFM)"),
    Family("seed_oss", "Seed-OSS"),
)}  # fmt: skip

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def family_of(model_type: str) -> Family:
    """The family of a model_type; ModelError (one line naming the supported ones) otherwise."""
    fam = FAMILIES.get(model_type)
    if fam is None:
        raise ModelError(f"unsupported architecture '{model_type}' (only dense decoder-only families run); "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return fam


def family_label(model_type: str) -> str:
    """'model_type (Family name)' for display; the bare model_type when it is not supported."""
    fam = FAMILIES.get(model_type)
    return f"{model_type} ({fam.label})" if fam else model_type


def check_supported(model_type: str) -> None:
    family_of(model_type)


def load_config(store_dir: str | Path):
    """The transformers config of a store or HF folder, checked against the supported families once."""
    import json

    from transformers import AutoConfig

    path = Path(store_dir) / "config.json"
    try:
        model_type = json.loads(path.read_text()).get("model_type", "")
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read config.json ({exc})") from None
    family_of(str(model_type))
    try:
        config = AutoConfig.from_pretrained(Path(store_dir))
    except Exception as exc:  # noqa: BLE001 - any config failure is a model error for the user
        raise ModelError(f"{path}: cannot read config.json ({exc})") from None
    if getattr(config, "use_bidirectional_attention", False):
        raise ModelError(f"{path}: bidirectional attention (an embedding model) is not a causal decoder")
    return config


def layer_windows(config) -> tuple[int | None, ...]:
    """Per decoder layer: its sliding window (a query at p sees keys at q with p - q < window), or None."""
    fam = family_of(config.model_type)
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if fam.masks_by_layer_type:
        types = getattr(config, "layer_types", None) or ["full_attention"] * n
        return tuple(window if t == "sliding_attention" else None for t in types)
    return tuple([window if fam.window_on_every_layer else None] * n)


def kv_geometry(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of the KV cache."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


def final_logits(family: Family, config, logits: torch.Tensor) -> torch.Tensor:
    """What the family's ForCausalLM does after its lm_head (soft-capping, scaling)."""
    if family.logit_multiplier:
        logits = logits * getattr(config, family.logit_multiplier)
    if family.logit_divisor:
        logits = logits / getattr(config, family.logit_divisor)
    cap = getattr(config, family.logit_softcap, None) if family.logit_softcap else None
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@dataclass(frozen=True)
class Skeleton:
    """transformers modules for one model: parameters on the meta device (assigned later), buffers real."""

    family: Family
    config: object
    decoder: nn.Module  # the ForCausalLM's inner model: embeddings, rotary, layers, final norm
    lm_head: nn.Module

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers


def build_skeleton(config, dtype: torch.dtype, device: torch.device | str = "cpu") -> Skeleton:
    """Instantiate the family's CausalLM with parameters on meta (no memory) and computed buffers
    (rotary frequencies, embedding scales) real, on `device`."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    fam = family_of(config.model_type)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    device = torch.device(device)
    for mod in model.modules():
        for name, buf in mod._buffers.items():
            if buf is not None:
                mod._buffers[name] = buf.to(device)
    return Skeleton(fam, config, model.model, model.lm_head)
