"""The target's own low-bit copy as its draft: kept resident in a fast CPU kernel's layout, sharing whatever the
target keeps resident (embeddings, norm, memory-resident layers)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from offspec.errors import ConfigError, ModelError
from offspec.models.nf4 import NF4Linear
from offspec.runtime.model import OffloadedModel
from offspec.runtime.plan import DEVICE, ResidencyPlan

# What the copy holds (models/qlinear.py): w8a8 = int8 weights per channel times 8-bit activations (fbgemm's dynamic
# linear, integer accumulation), int8 = int8 weights only, int4 = 4-bit groups of 64 (torch's int4 pack), nf4 = the
# NF4 store of the target's source (bitsandbytes). Measured side by side in scripts/bench_kernels.py.
SELF_FORMATS = ("w8a8", "int8", "int4", "nf4")


def default_self_format(device: torch.device | str = "cpu") -> str:
    """w8a8 on CPUs where torch has fbgemm (x86): the fastest of the formats for every tree width but one row, and
    closer to the target than 4-bit formats; NF4 elsewhere (CUDA, or a CPU without fbgemm)."""
    from offspec.models.qlinear import cpu_kernels

    if torch.device(device).type != "cpu":
        return "nf4"
    return "w8a8" if cpu_kernels().fbgemm else "nf4"


def check_self_format(fmt: str) -> str:
    if fmt not in SELF_FORMATS:
        raise ConfigError(f"bad --draft self:{fmt}: the self-draft holds one of {', '.join(SELF_FORMATS)}")
    return fmt


def _own_small_tensors(layer: nn.Module) -> None:
    """Copy what is left of a layer's stored tensors (norms, biases) so the layer's blob can be freed."""
    for mod in layer.modules():
        for table in (mod._parameters, mod._buffers):
            for name, t in table.items():
                if t is not None:
                    c = t.detach().clone()
                    table[name] = nn.Parameter(c, requires_grad=False) if isinstance(t, nn.Parameter) else c


def open_self_draft(target: OffloadedModel, fmt: str = "nf4", nf4_store: str | Path | None = None,
                    cache_tokens: int = 2048, verify: bool = True) -> OffloadedModel:
    """A fully resident low-bit copy of the target with one KV cache of its own. Layers the target keeps in memory
    are the target's own (the same tensors); the others are quantized into `fmt` from the target's 16-bit store, one
    layer at a time, or, for nf4, read from the NF4 store of the target's source. The copy's lm_head is its own
    low-bit copy of the target's (the head is the largest single matrix a draft forward reads)."""
    check_self_format(fmt)
    if fmt == "nf4":
        if nf4_store is None:
            raise ModelError("the nf4 self-draft needs the NF4 store of the target's source")
        return _open_nf4(target, Path(nf4_store), cache_tokens, verify)
    from offspec.models.qlinear import quantize_linear, quantize_linears

    def prepare(_i: int, layer: nn.Module) -> None:
        quantize_linears(layer, fmt)
        _own_small_tensors(layer)

    man = target.manifest
    plan = ResidencyPlan(tuple([DEVICE] * man.num_layers), tuple(man.layer_bytes), 0, 0, 0, 0, 0, target.device.type)
    draft = OffloadedModel(target.store_dir, plan, target.device, cache_tokens=cache_tokens, manifest=man,
                           config=target.config, share=target, prepare_layer=prepare,
                           expert_slots=_expert_slots(target, man))
    draft.lm_head = quantize_linear(target.lm_head, fmt)
    return draft


def _expert_slots(target: OffloadedModel, manifest) -> int | None:
    """A mixture of experts: the copy caches a few experts per layer of its own (sizing.self_draft_expert_slots)."""
    if not manifest.is_moe:
        return None
    from offspec.runtime.sizing import self_draft_expert_slots

    return self_draft_expert_slots(manifest, target.dtype, target.config)


def _open_nf4(target: OffloadedModel, nf4_store: Path, cache_tokens: int, verify: bool) -> OffloadedModel:
    if verify:
        from offspec.store.integrity import ensure_verified

        manifest = ensure_verified(nf4_store)
    else:
        from offspec.store.manifest import read_manifest

        manifest = read_manifest(nf4_store)
    if manifest.num_layers != target.num_layers or manifest.model_type != target.manifest.model_type:
        raise ModelError(f"{nf4_store} is not an NF4 copy of {target.store_dir}: "
                         f"{manifest.model_type} with {manifest.num_layers} layers vs "
                         f"{target.manifest.model_type} with {target.num_layers}")
    n = manifest.num_layers
    plan = ResidencyPlan(tuple([DEVICE] * n), tuple(manifest.layer_bytes), 0, 0, 0, 0, 0, target.device.type)
    draft = OffloadedModel(nf4_store, plan, target.device, cache_tokens=cache_tokens, manifest=manifest, share=target,
                           expert_slots=_expert_slots(target, manifest))
    if draft.dtype == torch.bfloat16:  # resident for good: repack once for the fused CPU kernel where there is one
        shared = set(target.memory_resident_layers())
        for i, layer in enumerate(draft.layers):
            if i not in shared:
                for mod in layer.modules():
                    if isinstance(mod, NF4Linear):
                        mod.pack_for_cpu()
    return draft
