"""A tiny copy of a model's config: the same family and quirks, a few small layers, windows shorter than a prompt.

The contract check builds a random model of it to compare offspec's streamed forward with transformers' own, and
the tests build every family transformers ships from it. The layers kept are the first of each kind the config
describes per layer (attention type, per-layer sizes, KV sharing), so every kind runs.
"""

from __future__ import annotations

import copy
import re

from offspec.transformers_contract import text_config

TINY_HIDDEN = 64
TINY_INTERMEDIATE = 128
TINY_HEADS = 4
TINY_HEAD_DIM = 16
TINY_VOCAB = 256
TINY_WINDOW = 4  # shorter than the check's prompt, so windowed masks are exercised
MAX_LAYERS = 8
WINDOW_KEY = re.compile(r"window(_size|_len)?$")
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id",
              "decoder_start_token_id")  # fmt: skip


def _get(cfg, key: str):
    try:
        return getattr(cfg, key, None)
    except Exception:  # noqa: BLE001 - a per-layer attribute of a heterogeneous config (Gemma 4)
        return None


def _has(cfg, key: str) -> bool:
    """The config has the attribute (None counts: a default that transformers derives, or fails on)."""
    try:
        return hasattr(cfg, key)
    except Exception:  # noqa: BLE001 - a per-layer attribute of a heterogeneous config
        return False


def _set(cfg, key: str, value) -> None:
    try:
        setattr(cfg, key, value)
    except AttributeError:  # a property computed from others (Falcon's head_dim)
        pass


def _kept_layers(text, n: int, overrides: dict[int, dict]) -> list[int]:
    """The first layer of each distinct per-layer description (at least two layers)."""
    per_layer = {k: v for k, v in vars(text).items() if isinstance(v, list) and len(v) == n and k != "architectures"}
    shared_from = n - int(getattr(text, "num_kv_shared_layers", 0) or 0)
    seen, keep = set(), []
    for i in range(n):
        sig = (tuple(repr(v[i]) for v in per_layer.values()), i >= shared_from, repr(overrides.get(i)))
        if sig not in seen:
            seen.add(sig)
            keep.append(i)
    for i in range(n):
        if len(keep) >= 2:
            break
        if i not in keep:
            keep.append(i)
    return sorted(keep[:MAX_LAYERS])


def _per_layer_overrides(text) -> dict[int, dict]:
    """A heterogeneous config's explicit per-layer overrides (Gemma 4: other head sizes on its global layers)."""
    if not getattr(text, "is_heterogeneous", False):
        return {}
    return {int(k): v for k, v in (text.to_dict().get("per_layer_config") or {}).items()}


def _shrink_text(text) -> None:
    n = int(text.num_hidden_layers)
    overrides = _per_layer_overrides(text)
    keep = _kept_layers(text, n, overrides)
    if overrides:
        text.per_layer_config = None
    for key, value in list(vars(text).items()):
        if isinstance(value, list) and len(value) == n and key != "architectures":
            setattr(text, key, [value[i] for i in keep])
    if getattr(text, "num_kv_shared_layers", 0):
        text.num_kv_shared_layers = sum(1 for i in keep if i >= n - text.num_kv_shared_layers)
    text.num_hidden_layers = len(keep)
    if overrides:
        text.per_layer_config = {j: overrides[i] for j, i in enumerate(keep) if i in overrides}
    heads = int(_get(text, "num_attention_heads") or TINY_HEADS)
    kv = _get(text, "num_key_value_heads")
    sizes = {"hidden_size": TINY_HIDDEN, "num_attention_heads": TINY_HEADS, "vocab_size": TINY_VOCAB,
             "hidden_size_per_layer_input": TINY_HEAD_DIM, "vocab_size_per_layer_input": TINY_VOCAB}
    if _has(text, "num_key_value_heads"):  # None: as many as the query heads
        sizes["num_key_value_heads"] = 1 if kv == 1 else TINY_HEADS if kv in (None, heads) else 2
    if _has(text, "head_dim") and not _get(text, "qk_rope_head_dim"):  # multi-latent attention derives it
        sizes["head_dim"] = TINY_HEAD_DIM
    if _get(text, "rotary_dim"):  # GPT-J, CodeGen: rotary over the first rotary_dim of each head
        sizes["rotary_dim"] = TINY_HEAD_DIM // 2
    for key, value in sizes.items():
        if _has(text, key):
            _set(text, key, value)
    inter = _get(text, "intermediate_size")
    if isinstance(inter, list):
        text.intermediate_size = [TINY_INTERMEDIATE] * len(inter)
    elif inter:
        text.intermediate_size = TINY_INTERMEDIATE
    _shrink_experts(text)
    for key, value in list(vars(text).items()):  # sliding_window, window_size (GPT-Neo), ...
        if WINDOW_KEY.search(key) and isinstance(value, int) and not isinstance(value, bool) and value > TINY_WINDOW:
            _set(text, key, TINY_WINDOW)
    if (_get(text, "max_position_embeddings") or 512) < 64:
        text.max_position_embeddings = 64


EXPERT_COUNT = re.compile(r"^(num|n)_(local_|routed_)?experts$|^moe_num_experts$")
TINY_EXPERTS = 8
TINY_TOP_K = 2
TINY_MOE_INTERMEDIATE = 32


def _shrink_experts(text) -> None:
    """A mixture of experts: a few small experts, two per token, every group of experts eligible."""
    for key, value in list(vars(text).items()):
        if EXPERT_COUNT.match(key) and isinstance(value, int) and value > TINY_EXPERTS:
            _set(text, key, TINY_EXPERTS)
    for key, value in (("num_experts_per_tok", TINY_TOP_K), ("moe_topk", TINY_TOP_K), ("n_group", 1),
                       ("topk_group", 1), ("first_k_dense_replace", 1), ("moe_layer_start_index", 1)):
        if isinstance(_get(text, key), int) and _get(text, key) > value:
            _set(text, key, value)
    if _has(text, "num_experts_per_tok") and _get(text, "num_experts_per_tok") is None and any(
            EXPERT_COUNT.match(k) for k in vars(text)):
        _set(text, "num_experts_per_tok", TINY_TOP_K)  # a default config that leaves it to the checkpoint
    for key in ("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size"):
        if isinstance(_get(text, key), int) and _get(text, key) > TINY_MOE_INTERMEDIATE:
            _set(text, key, TINY_MOE_INTERMEDIATE)


def _shrink_other(sub) -> None:
    """A non-text part (a vision tower): as small as it builds, it never runs."""
    for key, value in (("num_hidden_layers", 1), ("hidden_size", 32), ("intermediate_size", 64),
                       ("num_attention_heads", 2), ("depth", 1)):
        if isinstance(getattr(sub, key, None), int):
            setattr(sub, key, value)


def _clamp_token_ids(cfg, vocab: int) -> None:
    for key in _TOKEN_IDS:
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value >= vocab:
            setattr(cfg, key, min(value, 2) if key != "pad_token_id" else 0)
        elif isinstance(value, list):
            setattr(cfg, key, [v if v < vocab else 2 for v in value])


# transformers' default configs of these model types do not build a model as they are; what completes them
# (only for enumerating families from their defaults: a checkpoint's own config has these set).
DEFAULT_FIXES: dict[str, dict] = {
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}},
}


def default_config(model_type: str):
    """transformers' default config of a model type, completed where it does not build a model as it is."""
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **DEFAULT_FIXES.get(model_type, {}))


def tiny_config(config):
    """A copy of config (text or multimodal) with a few small layers, small widths and TINY_WINDOW windows."""
    cfg = copy.deepcopy(config)
    text = text_config(cfg)
    _shrink_text(text)
    for value in list(vars(cfg).values()):  # vision or audio towers (of a multimodal config, or of the text one)
        if value is not text and hasattr(value, "to_dict") and hasattr(value, "model_type"):
            _shrink_other(value)
    if text is not cfg and getattr(cfg, "vocab_size", None):
        cfg.vocab_size = text.vocab_size
    for c in {id(cfg): cfg, id(text): text}.values():
        _clamp_token_ids(c, text.vocab_size)
    return cfg
