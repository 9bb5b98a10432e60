"""Binding blob views to transformers modules: parameters built once per (layer, buffer), bound by reference."""

from __future__ import annotations

import torch
from torch import nn

from offspec.models.nf4 import NF4Linear


class LayerBinding:
    """The weights of one module over one buffer, prepared once: `bind()` is a handful of dict assignments.

    Float tensors become nn.Parameters (or buffers) of their module; NF4 weights get their packed view and a
    bitsandbytes QuantState (absmax view, shape, code, compute dtype) built here, not per forward."""

    def __init__(self, module: nn.Module, tensors: dict[str, torch.Tensor], compute_dtype: torch.dtype) -> None:
        self.params: list[tuple[dict, str, torch.Tensor]] = []  # (module._parameters or _buffers, leaf, value)
        self.nf4: list[tuple[NF4Linear, torch.Tensor, object]] = []
        for name, t in tensors.items():
            if name.endswith(".absmax"):
                continue
            mod_name, _, leaf = name.rpartition(".")
            mod = module.get_submodule(mod_name) if mod_name else module
            if isinstance(mod, NF4Linear) and leaf == "weight":
                from offspec.store.nf4 import nf4_quant_state

                state = nf4_quant_state(tensors[name + ".absmax"], mod.info)
                state.dtype = compute_dtype  # unpack straight into the compute dtype
                self.nf4.append((mod, t, state))
            elif isinstance(mod, NF4Linear) or leaf not in mod._parameters:
                self.params.append((mod.__dict__ if isinstance(mod, NF4Linear) else mod._buffers, leaf, t))
            else:
                self.params.append((mod._parameters, leaf, nn.Parameter(t, requires_grad=False)))

    def bind(self) -> None:
        for where, leaf, value in self.params:
            where[leaf] = value
        for mod, packed, state in self.nf4:
            mod.bind(packed, state)
