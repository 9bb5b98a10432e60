"""Test helpers shared across test folders (oracle references and fault injection)."""

from __future__ import annotations

from pathlib import Path

import torch


def load_dequantized_nf4(hf_model, store: Path) -> int:
    """Copy each NF4 weight of `store`, dequantized, into transformers' model (the NF4 oracle); returns the count."""
    from offspec.store.manifest import read_manifest, tensor_views
    from offspec.store.nf4 import dequantize_nf4
    from offspec.transformers_contract import decoder_layer_stack

    quantized = 0
    manifest = read_manifest(store)
    _, layers = decoder_layer_stack(hf_model, manifest.num_layers)
    for i, entry in enumerate(manifest.layers):
        buf = torch.frombuffer(bytearray((Path(store) / entry.file).read_bytes()), dtype=torch.uint8)
        views = tensor_views(entry.tensors, buf)
        for name, e in entry.tensors.items():
            if e.quant is not None:
                w = dequantize_nf4(views[name], views[name + ".absmax"], e.quant)
                layers[i].get_parameter(name).data.copy_(w)
                quantized += 1
    return quantized


def interrupt_layer(monkeypatch, layer, times: int) -> None:
    """Make `layer`'s first `times` forwards raise KeyboardInterrupt (an interrupted pass), then run normally."""
    real = layer.forward
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] <= times:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(layer, "forward", flaky)
