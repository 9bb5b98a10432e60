"""Helpers for store tests: read blobs back as tensors, load a source folder's tensors."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from offspec.store.manifest import BlobEntry, read_manifest, tensor_views


def read_blob(store: Path, blob: BlobEntry) -> dict[str, torch.Tensor]:
    """The tensors of one blob, as views into its bytes."""
    buf = torch.frombuffer(bytearray((store / blob.file).read_bytes()), dtype=torch.uint8)
    return tensor_views(blob.tensors, buf)


def store_state_dict(store: Path) -> dict[str, torch.Tensor]:
    """Every stored tensor under its full HF name (layers prefixed with model.layers.{i}.)."""
    m = read_manifest(store)
    out = dict(read_blob(store, m.resident))
    for i, blob in enumerate(m.layers):
        out.update({f"model.layers.{i}.{k}": v for k, v in read_blob(store, blob).items()})
    return out


def source_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors folder."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out
