"""Memory arithmetic of a store under a compute dtype: what the residency planner is fed."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from offspec.models.registry import kv_layout, load_config
from offspec.runtime.device import pick_compute_dtype, resolve_device
from offspec.runtime.kv_cache import layout_bytes_per_token
from offspec.runtime.plan import ResidencyPlan, plan_residency
from offspec.store.manifest import Manifest, read_manifest

# The largest pass the workspace is sized for unless a larger fixed tree budget is asked for: the largest `auto`
# tree budget (256, the largest tree the pass-time curve measures) plus its root.
DEFAULT_TREE_TOKENS = 257
HEAD_ROWS = 64  # rows of hidden states the head turns into logits at a time (runtime/model.py)
PREFILL_TOKENS = 512  # prompt tokens per prefill pass (speculative/drafters.prefill; logits of the last one only)


def upcast_plan(entries: dict, compute: torch.dtype) -> tuple[dict[str, int], int]:
    """Element offsets of each float tensor to convert into a flat `compute` buffer, and its length."""
    from offspec.store.manifest import DTYPES

    offsets, n = {}, 0
    for name, e in entries.items():
        dt = DTYPES[e.dtype]
        if e.quant is None and dt.is_floating_point and dt != compute and not name.endswith(".absmax"):
            offsets[name] = n
            n += math.prod(e.shape) if e.shape else 1
            n = (n + 15) // 16 * 16  # keep every tensor 64-byte aligned
    return offsets, n


def upcast_factor(manifest: Manifest, compute: torch.dtype) -> float:
    """Memory bytes per stored byte of the decoder layers once float tensors are held in `compute`
    (NF4 packed weights stay packed, so a 4-bit store grows far less than a bf16 one)."""
    ratio = compute.itemsize / manifest.torch_dtype.itemsize
    if ratio <= 1:
        return 1.0
    total = float_bytes = 0
    for blob in manifest.layers:
        total += blob.size
        offsets, _ = upcast_plan(blob.tensors, compute)
        float_bytes += sum(blob.tensors[n].nbytes for n in offsets)
    return 1.0 + (ratio - 1.0) * (float_bytes / total if total else 1.0)


def workspace_bytes(manifest: Manifest, config, compute: torch.dtype, tree_tokens: int, cache_tokens: int) -> int:
    """Memory one forward of `tree_tokens` tokens computes in, beside the weights and the KV cache: the float32 logits
    of every row (the head runs HEAD_ROWS at a time in the compute dtype), the activations of the widest layer
    for tree_tokens or a prefill chunk of PREFILL_TOKENS, whichever is more (hidden states, MLP, attention scores
    against the whole cache, in float32 at worst) and one dequantization
    buffer per NF4 weight shape (models/nf4.py). An upper bound: a pass keeps at most one layer's activations."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    head = manifest.resident.tensors.get("lm_head.weight") or manifest.resident.tensors.get("model.embed_tokens.weight")
    vocab = int(getattr(text, "vocab_size", 0) or (head.shape[0] if head is not None else 0))
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    inner = int(getattr(text, "intermediate_size", 0) or 4 * hidden)
    heads = int(getattr(text, "num_attention_heads", 0) or 1)
    t, size = tree_tokens, compute.itemsize
    logits = t * vocab * 4 + min(t, HEAD_ROWS) * vocab * size
    a = max(t, PREFILL_TOKENS)
    activations = a * (8 * hidden + 4 * inner) * 4 + heads * a * (cache_tokens + a) * (4 + size)
    shapes = {tuple(e.quant.shape) for blob in manifest.layers for e in blob.tensors.values() if e.quant is not None}
    scratch = sum(math.prod(shape) * size for shape in shapes)
    return int(logits + activations + scratch)


def plan_for_store(store_dir: str | Path, manifest: Manifest, device_kind: str, device_memory_bytes: int,
                   host_memory_bytes: int = 0, reserved_bytes: int = 0, cache_tokens: int = 2048,
                   ring_slots: int = 3, over_min: int | None = None, config=None,
                   tree_tokens: int = DEFAULT_TREE_TOKENS) -> tuple[ResidencyPlan, int]:
    """The residency plan of a store under these budgets, and the minimum device budget that would run.

    over_min: plan with the minimum budget plus this many bytes (device_memory_bytes is then ignored);
    config: the model's transformers config (or any object with its attributes), e.g. sized
    from the metadata of a model not yet converted; read from the store otherwise. tree_tokens: the largest pass
    (tree nodes plus root) whose compute workspace the plan holds."""
    from offspec.runtime.plan import minimum_budget_bytes

    compute = pick_compute_dtype(manifest.torch_dtype, torch.device(device_kind))
    config = config if config is not None else load_config(store_dir)
    kv_bytes = kv_bytes_per_token(config, compute) * cache_tokens
    work = workspace_bytes(manifest, config, compute, tree_tokens, cache_tokens)
    upcast = upcast_factor(manifest, compute) if device_kind == "cpu" else 1.0
    # resident parts (embeddings, norm, head) are all float: they grow by the full dtype ratio
    resident_upcast = max(1.0, compute.itemsize / manifest.torch_dtype.itemsize) if device_kind == "cpu" else 1.0
    slot_bytes, num_experts, top_k = expert_sizes(manifest, compute, config if config is not None else
                                                  (load_config(store_dir) if manifest.is_moe else None))
    minimum = minimum_budget_bytes(manifest.layer_bytes, manifest.resident.size, kv_bytes, reserved_bytes, 2, upcast,
                                   resident_upcast, expert_bytes=top_k * sum(slot_bytes), workspace_bytes=work)
    if over_min is not None:
        device_memory_bytes = minimum + over_min
    plan = plan_residency(manifest.layer_bytes, manifest.resident.size, device_memory_bytes, host_memory_bytes,
                          kv_bytes=kv_bytes, reserved_bytes=reserved_bytes, device_kind=device_kind,
                          ring_slots=ring_slots, upcast=upcast, resident_upcast=resident_upcast,
                          expert_slot_bytes=slot_bytes, num_experts=num_experts, min_expert_slots=top_k,
                          workspace_bytes=work, tree_tokens=tree_tokens)
    return plan, minimum


def expert_sizes(manifest: Manifest, compute: torch.dtype, config=None) -> tuple[list[int], int, int]:
    """A mixture of experts' cache arithmetic: (per decoder layer, one cached expert's memory in the compute dtype
    (0 for dense layers); experts per MoE layer; experts per token). ([], 0, 0) for a dense model."""
    if not manifest.is_moe:
        return [], 0, 0
    from offspec.runtime.experts import expert_blob_bytes
    from offspec.transformers_contract import text_config

    slot = [expert_blob_bytes(manifest.layer_experts(i)[0], compute) if manifest.layer_experts(i) else 0
            for i in range(manifest.num_layers)]
    experts = max(len(manifest.layer_experts(i)) for i in range(manifest.num_layers))
    top_k = 1
    if config is not None:
        text = text_config(config) if hasattr(config, "to_dict") else config
        top_k = int(getattr(text, "num_experts_per_tok", None) or getattr(text, "moe_k", None) or 1)
    return slot, experts, min(top_k, experts)


def context_tokens(store_dir: str | Path | None, requested: int, config=None) -> int:
    """KV cache positions for a --ctx-size request: at most the model's own context (max_position_embeddings).

    config: a config object to read it from instead of store_dir/config.json."""
    import json

    if config is not None:
        limit = getattr(config, "max_position_embeddings", None)
        return min(requested, int(limit)) if limit else requested
    cfg = json.loads((Path(store_dir) / "config.json").read_text())
    limit = cfg.get("max_position_embeddings") or cfg.get("text_config", {}).get("max_position_embeddings")
    return min(requested, int(limit)) if limit else requested


def kv_bytes_per_token(config, compute: torch.dtype) -> int:
    """KV cache bytes per token of a model (every layer keeps its full KV), in the compute dtype."""
    return layout_bytes_per_token(kv_layout(config), compute)


def store_kv_bytes_per_token(store_dir: str | Path, device: str = "cpu") -> int:
    """KV cache bytes per token of a store's model in the dtype it computes in on `device`."""
    manifest = read_manifest(Path(store_dir))
    dev = torch.device(device) if device in ("cpu", "cuda") else resolve_device(device)
    return kv_bytes_per_token(load_config(store_dir), pick_compute_dtype(manifest.torch_dtype, dev))


def model_bytes(store_dir: str | Path | None, cache_tokens: int, device: str = "cpu", manifest: Manifest | None = None,
                config=None) -> int:
    """Memory a fully resident model takes (weights in their compute dtype, its KV cache and the workspace of a pass of
    DEFAULT_TREE_TOKENS tokens): a draft's reserve.

    A device kind ('cpu', 'cuda') is sized without checking that the device is here (for plans)."""
    manifest = manifest or read_manifest(Path(store_dir))
    dev = torch.device(device) if device in ("cpu", "cuda") else resolve_device(device)
    compute = pick_compute_dtype(manifest.torch_dtype, dev)
    upcast = upcast_factor(manifest, compute) if dev.type == "cpu" else 1.0
    resident_upcast = max(1.0, compute.itemsize / manifest.torch_dtype.itemsize) if dev.type == "cpu" else 1.0
    experts = sum(b.size for ex in manifest.experts for b in ex)  # a mixture of experts: every expert resident
    weights = manifest.resident.size * resident_upcast + (sum(manifest.layer_bytes) + experts) * upcast
    config = config if config is not None else load_config(store_dir)
    return (int(weights) + kv_bytes_per_token(config, compute) * cache_tokens
            + workspace_bytes(manifest, config, compute, DEFAULT_TREE_TOKENS, cache_tokens))


def self_draft_bytes(store_dir: str | Path | None, manifest: Manifest, cache_tokens: int, device: str = "cpu",
                     config=None, fmt: str = "nf4") -> int:
    """Memory of a store's resident low-bit copy (its self-draft, runtime/self_draft.py), sized from the manifest
    without building it: every 2-D float layer weight in `fmt` (models/qlinear.quantized_nbytes; nf4 as the NF4
    store packs it: half a byte per element plus a float32 scale per 64), the other layer tensors in the compute
    dtype, the copy's own low-bit lm_head (not for nf4, which uses the target's), its own KV cache and the workspace
    of its passes (it drafts in a thread of its own, beside the target's pass). Its
    embeddings and norm are the target's (not counted). config: a config object to read instead of
    store_dir/config.json (a source planned before conversion)."""
    from offspec.models.qlinear import quantized_nbytes
    from offspec.store.manifest import DTYPES

    compute = pick_compute_dtype(manifest.torch_dtype, resolve_device(device))

    def weight_bytes(shape) -> int:
        if fmt == "nf4":
            n = math.prod(shape)
            return (n + 1) // 2 + (n + 63) // 64 * 4
        return quantized_nbytes(shape[0], shape[1], fmt)

    total = 0
    low_bit: set[tuple[int, ...]] = set()  # shapes of the low-bit weights (an nf4 copy dequantizes each per call)
    for blob in manifest.layers:
        for name, e in blob.tensors.items():
            if name.endswith(".absmax"):
                continue
            shape = tuple(e.quant.shape) if e.quant is not None else tuple(e.shape)
            if e.quant is not None or (len(shape) == 2 and name.endswith(".weight") and DTYPES[e.dtype].is_floating_point):
                total += weight_bytes(shape)
                low_bit.add(shape)
            else:
                n = math.prod(shape) if shape else 1
                total += n * (compute.itemsize if DTYPES[e.dtype].is_floating_point else DTYPES[e.dtype].itemsize)
    if fmt != "nf4":
        head = manifest.resident.tensors.get("lm_head.weight") or manifest.resident.tensors.get("model.embed_tokens.weight")
        if head is not None:
            total += quantized_nbytes(head.shape[0], head.shape[1], fmt)
    config = config if config is not None else load_config(Path(store_dir))
    if manifest.is_moe:  # its experts, unpacked into a cache of its own (self_draft_expert_slots per MoE layer)
        slot_bytes, _, _ = expert_sizes(manifest, compute, config)
        total += self_draft_expert_slots(manifest, compute, config) * sum(slot_bytes)
    scratch = sum(math.prod(shape) for shape in low_bit) * compute.itemsize if fmt == "nf4" and manifest.bits != 4 else 0
    return (total + kv_bytes_per_token(config, compute) * cache_tokens + scratch
            + workspace_bytes(manifest, config, compute, DEFAULT_TREE_TOKENS, cache_tokens))


def self_draft_expert_slots(manifest: Manifest, compute: torch.dtype, config=None) -> int:
    """Experts per MoE layer the self-draft caches: two tokens' worth (a draft step routes a few tokens; the
    others are read from the store as routed, like the target's)."""
    _, experts, top_k = expert_sizes(manifest, compute, config)
    return min(experts, 2 * top_k)
