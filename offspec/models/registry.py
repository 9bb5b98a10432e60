"""What offspec knows of a model, read from its config and transformers' own causal-LM class, not from a table.

transformers' modules do everything a family does (embedding scaling, per-layer-type rotary, sandwich norms,
q/k norms, multipliers, biases, per-layer inputs, the head's soft-capping and scaling) when offspec runs the
model's public forward. What offspec itself must know comes from the config (`layer_types`, `sliding_window`,
the text part of a multimodal config) and from the class transformers builds for it (where its decoder layers
sit, where it keeps its routed experts). Structural refusals (encoder-decoders, experts offspec cannot stream by
expert, recurrent or linear-attention layers, a layer stack offspec cannot stream) are one line each; whether a family that passes
them really runs is the contract check's question (`runtime/family_check.py`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from offspec.errors import ModelError
from offspec.transformers_contract import (ContractError, HeadRunner, cache_arg_name, causal_lm_class_name,
                                           decoder_layer_stack, knows_model_type, text_config, tie_unbound_weights)

# The attention kinds offspec masks itself (a query at p sees keys at q <= p; windowed: p - q < window).
ATTENTION_TYPES = ("full_attention", "sliding_attention")

@dataclass(frozen=True)
class Family:
    """One model as offspec runs it: its text decoder's config and the attention kinds of its layers."""

    model_type: str  # the checkpoint's model_type (e.g. "gemma3" for a multimodal Gemma 3)
    label: str  # the transformers class that runs its text decoder, e.g. "Gemma3ForCausalLM"
    windows: tuple[int | None, ...]  # per decoder layer: its sliding window (None: full attention)
    layer_types: tuple[str, ...] | None  # per decoder layer, when the config names them

    @property
    def masks_by_layer_type(self) -> bool:
        """The model forward takes a dict {layer type: mask}: its layers do not all see the same keys."""
        return self.layer_types is not None and len(set(self.windows)) > 1


def family_label(model_type: str) -> str:
    """'model_type (its CausalLM class)' for display; the bare model_type when transformers has no causal LM for it."""
    name = causal_lm_class_name(model_type)
    return f"{model_type} ({name})" if name else model_type


def layer_windows(config) -> tuple[int | None, ...]:
    """Per decoder layer: its sliding window (a query at p sees keys at q with p - q < window), or None.

    From `layer_types` where the config names them; otherwise `sliding_window`, when set (and not switched off by
    `use_sliding_window`), covers every layer, as in Mistral, Phi-3 and StarCoder2."""
    text = text_config(config)
    n = int(text.num_hidden_layers)
    window = getattr(text, "sliding_window", None) or None
    types = getattr(text, "layer_types", None)
    if types:
        return tuple(window if t == "sliding_attention" else None for t in types[:n])
    if getattr(text, "use_sliding_window", True) is False:
        window = None
    return tuple([window] * n)


KVLayout = tuple[tuple[int, int, int, int] | None, ...]  # per layer: (key heads, key dim, value heads, value dim)
_KV_LAYOUTS: dict[str, KVLayout] = {}


def kv_layout(config) -> KVLayout:
    """Per decoder layer, the shape of what it writes to the KV cache per token: (key heads, key dim, value heads,
    value dim), or None for a layer that reuses another's keys and values (KV sharing).

    Read from transformers' own forward run on the meta device (so multi-latent attention, per-layer head sizes and
    KV sharing come out as the model does them); a config-like object without a model class (a plan sized from a
    GGUF header) gets the usual arithmetic."""
    if not hasattr(config, "to_json_string"):
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return tuple([(kv, dim, kv, dim)] * int(config.num_hidden_layers))
    text = text_config(config)
    key = text.to_json_string(use_diff=False)
    if key not in _KV_LAYOUTS:
        from offspec.transformers_contract import kv_shapes

        shapes = kv_shapes(_meta_causal_lm(text))
        _KV_LAYOUTS[key] = tuple((s[0][0], s[0][1], s[1][0], s[1][1]) if (s := shapes.get(i)) else None
                                 for i in range(int(text.num_hidden_layers)))
    return _KV_LAYOUTS[key]


def _refusal(config, why: str) -> ModelError:
    return ModelError(f"unsupported architecture '{config.model_type}': {why}")


def _check_config(config) -> None:
    """Refusals that the config alone decides."""
    if getattr(config, "is_encoder_decoder", False):
        raise _refusal(config, "an encoder-decoder model (offspec runs decoder-only models)")
    try:
        text = text_config(config)
    except ValueError as exc:
        raise _refusal(config, f"no single text decoder in its config ({exc})") from None
    if getattr(text, "use_bidirectional_attention", False):
        raise _refusal(config, "bidirectional attention (not a causal decoder)")
    others = sorted({t for t in getattr(text, "layer_types", None) or () if t not in ATTENTION_TYPES})
    if others:
        raise _refusal(config, f"layers of type {', '.join(others)} (offspec streams attention layers with a "
                               "KV cache: full or sliding-window attention)")


MOE_MODULE = re.compile(r"moe|experts?\b", re.IGNORECASE)
_STRUCTURE: dict[str, ModelError | None] = {}  # text config JSON -> the refusal, or None (checked once per process)


def _check_structure(config) -> None:
    """Refusals that the model class decides (built with 2 layers on the meta device): experts, layer stack."""
    text = text_config(config)
    key = f"{config.model_type}:{text.to_json_string(use_diff=False)}"
    if key not in _STRUCTURE:
        try:
            _STRUCTURE[key] = _structure_refusal(config, text)
        except ModelError as exc:
            _STRUCTURE[key] = exc
        except Exception as exc:  # noqa: BLE001 - transformers rejects the config: one line, not a traceback
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            _STRUCTURE[key] = _refusal(config, f"transformers cannot build a model of this config "
                                               f"({type(exc).__name__}: {msg[:120]})")
    if _STRUCTURE[key] is not None:
        raise _STRUCTURE[key]


EXPERT_COUNT = re.compile(r"^(num|n)_(local_|routed_)?experts$|^moe_num_experts$")


def _counts_experts(text) -> bool:
    """A config that counts experts (its first layers may still be dense)."""
    if getattr(text, "is_moe", None) is False:
        return False
    return any(EXPERT_COUNT.match(k) and isinstance(v, int) and v > 1 for k, v in vars(text).items())


def _has_experts(model: nn.Module) -> bool:
    return any(MOE_MODULE.search(type(mod).__name__) or MOE_MODULE.search(name.rsplit(".", 1)[-1])
               for name, mod in model.named_modules())


def _experts_by_module(layers: nn.ModuleList) -> bool:
    """Every decoder layer that routes tokens keeps its experts in one fused experts module (and some layer does)."""
    from offspec.transformers_contract import experts_module

    found = False
    for layer in layers:
        if experts_module(layer) is not None:
            found = True
        elif any(ROUTING_MODULE.search(type(mod).__name__) or name.rsplit(".", 1)[-1] == "experts"
                 for name, mod in layer.named_modules()):
            return False
    return found


ROUTING_MODULE = re.compile(r"(Experts|MoE|Moe|SparseMoeBlock|MoA)$")  # a module that routes (not a dense "MoeMLP")


def _structure_refusal(config, text) -> ModelError | None:
    from offspec.models.tiny import tiny_config
    from offspec.store.metadata import LAYOUTS

    moe = _refusal(config, "a mixture-of-experts model whose experts are not one fused experts module per layer "
                           "(offspec streams experts that transformers holds as [experts, ...] parameters and calls "
                           "with the routed indices)")
    if not isinstance(getattr(text, "num_hidden_layers", None), int):
        return _refusal(config, "its text config has no num_hidden_layers (not one stack of decoder layers)")
    small = text_config(tiny_config(config))
    model = _meta_causal_lm(small, str(config.model_type))
    if _counts_experts(text) or _has_experts(model):
        _, stack = decoder_layer_stack(model, int(small.num_hidden_layers))
        if stack is None or not _experts_by_module(stack):
            return moe
    try:
        cache_arg_name(type(model.base_model))
    except ContractError:
        return _refusal(config, f"{type(model.base_model).__name__} keeps no KV cache (its forward takes none)")
    path = decoder_layer_stack(model, int(small.num_hidden_layers))[0]
    if path is None:
        return _refusal(config, f"{type(model).__name__} has no stack of decoder layers offspec can stream")
    known = {lay.stack for lay in LAYOUTS}
    if path + "." not in known:
        return _refusal(config, f"its decoder layers sit at {path} in {type(model).__name__}, not in a decoder-only "
                                f"stack offspec streams ({', '.join(sorted(s.rstrip('.') for s in known))})")
    from offspec.transformers_contract import kv_shapes

    try:
        kv_shapes(model)
    except Exception as exc:  # noqa: BLE001 - whatever the forward raises, offspec cannot drive it
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return _refusal(config, f"{type(model.base_model).__name__}'s forward does not run over a prepared 4D "
                                f"attention mask and a KV cache ({type(exc).__name__}: {msg[:120]})")
    return None


def check_supported(config) -> Family:
    """The family of a config; ModelError (one line saying why) when offspec cannot stream it."""
    _check_config(config)
    _check_structure(config)
    text = text_config(config)
    types = getattr(text, "layer_types", None)
    n = int(text.num_hidden_layers)
    return Family(str(config.model_type), causal_lm_class_name(text.model_type) or type(text).__name__,
                  layer_windows(config), tuple(types[:n]) if types else None)


def load_config(store_dir: str | Path):
    """The transformers config of a store or HF folder, checked for what offspec can stream."""
    from transformers import AutoConfig

    path = Path(store_dir) / "config.json"
    try:
        model_type = json.loads(path.read_text()).get("model_type", "")
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read config.json ({exc})") from None
    if not knows_model_type(str(model_type)):
        raise ModelError(f"unsupported architecture '{model_type}': the installed transformers does not know it")
    try:
        config = AutoConfig.from_pretrained(Path(store_dir))
    except Exception as exc:  # noqa: BLE001 - any config failure is a model error for the user
        raise ModelError(f"{path}: cannot read config.json ({str(exc).strip().splitlines()[0]})") from None
    check_supported(config)
    return config


def _meta_causal_lm(text, model_type: str | None = None) -> nn.Module:
    """The text decoder's causal LM on the meta device; ModelError if transformers has none for its config."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):  # eager experts: the grouped kernels have no float32 meta implementation
            return AutoModelForCausalLM.from_config(text, experts_implementation="eager")
    except ValueError as exc:
        raise ModelError(f"unsupported architecture '{model_type or text.model_type}': transformers has no causal "
                         f"LM for its text decoder ({str(exc).splitlines()[0]})") from None


@dataclass(frozen=True)
class Skeleton:
    """transformers modules for one model: parameters on the meta device (assigned later), buffers real."""

    family: Family
    config: object
    causal_lm: nn.Module  # the text decoder's ForCausalLM
    decoder: nn.Module  # its base model: embeddings, rotary, layers, final norm
    layers: nn.ModuleList
    head: HeadRunner  # the ForCausalLM's own forward from final hidden states to logits

    def tie_weights(self) -> list[str]:
        """Bind the tied parameters still unbound (the head reusing the embeddings) as transformers ties them."""
        return tie_unbound_weights(self.causal_lm)


def build_skeleton(config, dtype: torch.dtype, device: torch.device | str = "cpu") -> Skeleton:
    """Instantiate the text decoder's CausalLM with parameters on meta (no memory) and computed buffers
    (rotary frequencies, embedding scales) real, on `device`."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    fam = check_supported(config)
    text = text_config(config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(text, dtype=dtype)
    model.eval()
    device = torch.device(device)
    for mod in model.modules():
        for name, buf in mod._buffers.items():
            if buf is not None:
                mod._buffers[name] = buf.to(device)
    _, layers = decoder_layer_stack(model, int(text.num_hidden_layers))
    return Skeleton(fam, config, model, model.base_model, layers, HeadRunner(model))
