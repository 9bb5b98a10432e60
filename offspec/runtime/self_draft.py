"""The target's own NF4 copy as its draft: kept resident, sharing whatever the target keeps resident."""

from __future__ import annotations

from pathlib import Path

import torch

from offspec.errors import ModelError
from offspec.models.nf4 import NF4Linear
from offspec.runtime.model import OffloadedModel
from offspec.runtime.plan import DEVICE, ResidencyPlan


def open_self_draft(target: OffloadedModel, nf4_store: str | Path, cache_tokens: int = 2048,
                    verify: bool = True) -> OffloadedModel:
    """A fully resident model over the NF4 store of the target's source: its NF4 layers where the target streams,
    the target's own modules (embeddings, norm, lm_head, memory-resident layers) everywhere else, one KV cache
    of its own."""
    nf4_store = Path(nf4_store)
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
    draft = OffloadedModel(nf4_store, plan, target.device, cache_tokens=cache_tokens, manifest=manifest, share=target)
    if draft.dtype == torch.bfloat16:  # resident for good: repack once for the fused CPU kernel where there is one
        shared = set(target.memory_resident_layers())
        for i, layer in enumerate(draft.layers):
            if i not in shared:
                for mod in layer.modules():
                    if isinstance(mod, NF4Linear):
                        mod.pack_for_cpu()
    return draft
