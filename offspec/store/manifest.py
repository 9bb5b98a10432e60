"""The layer store's on-disk format: manifest, blob layout and zero-copy tensor views.

A store folder holds:
  manifest.json          format version, model facts, one BlobEntry per decoder layer + one resident blob
  resident.bin           embeddings, final norm, lm_head (full HF names, e.g. "model.embed_tokens.weight")
  layers/layer_NNN.bin   every tensor of decoder layer NNN (names relative to the layer, e.g. "mlp.up_proj.weight")
                         but its routed experts' (mixture-of-experts layers)
  layers/layer_NNN/expert_EEE.bin  expert EEE's slice of each fused experts parameter of layer NNN
                         (e.g. "mlp.experts.gate_up_proj" [2 * moe_intermediate, hidden])
  config.json, tokenizer files, generation_config.json (copied from the source)

Each tensor starts at a multiple of ALIGN bytes inside its blob and blobs are padded to ALIGN, so a
whole layer arrives with one read into a staging buffer and its tensors are views into that buffer.
NF4 linear weights are stored as the packed uint8 data (entry.quant set) plus a float32 "<name>.absmax".
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from offspec.errors import StoreError

FORMAT_VERSION = 1
ALIGN = 4096
MANIFEST = "manifest.json"
RESIDENT_FILE = "resident.bin"

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "uint8": torch.uint8,
    "int8": torch.int8,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class QuantInfo:
    """How a packed NF4 weight unpacks: bitsandbytes layout, blocksize, original shape and dtype."""

    type: str  # "nf4"
    blocksize: int
    shape: tuple[int, ...]  # original [out, in]
    dtype: str  # original/compute dtype name


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    quant: QuantInfo | None = None


@dataclass(frozen=True)
class BlobEntry:
    file: str  # relative to the store folder
    size: int  # bytes on disk (padded to ALIGN)
    sha256: str
    tensors: dict[str, TensorEntry] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    format_version: int
    model_type: str
    bits: int  # 16 (plain float weights) or 4 (NF4 linear weights in decoder layers)
    dtype: str  # compute / storage dtype of the float tensors
    num_layers: int
    source: str
    layers: tuple[BlobEntry, ...]
    resident: BlobEntry
    tie_word_embeddings: bool = False
    # per decoder layer: one blob per routed expert (its slice of each fused experts parameter); () for dense models
    experts: tuple[tuple[BlobEntry, ...], ...] = ()

    def layer_experts(self, i: int) -> tuple[BlobEntry, ...]:
        """The expert blobs of decoder layer i (empty for a dense layer)."""
        return self.experts[i] if i < len(self.experts) else ()

    @property
    def is_moe(self) -> bool:
        return any(self.experts)

    @property
    def layer_bytes(self) -> list[int]:
        return [b.size for b in self.layers]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def _tensor_from_dict(d: dict) -> TensorEntry:
    q = d.get("quant")
    quant = QuantInfo(q["type"], int(q["blocksize"]), tuple(q["shape"]), q["dtype"]) if q else None
    return TensorEntry(d["name"], d["dtype"], tuple(d["shape"]), int(d["offset"]), int(d["nbytes"]), quant)


def _blob_from_dict(d: dict) -> BlobEntry:
    tensors = {k: _tensor_from_dict(v) for k, v in d["tensors"].items()}
    return BlobEntry(d["file"], int(d["size"]), d["sha256"], tensors)


def read_manifest(store_dir: str | Path) -> Manifest:
    """Parse store_dir/manifest.json; StoreError with a clear line if missing or malformed."""
    path = Path(store_dir) / MANIFEST
    if not path.is_file():
        raise StoreError(f"{store_dir}: not an offspec store (no {MANIFEST})")
    try:
        d = json.loads(path.read_text())
        if d.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{store_dir}: store format {d.get('format_version')} is not supported "
                f"(expected {FORMAT_VERSION}); convert the model again"
            )
        return Manifest(
            format_version=d["format_version"],
            model_type=d["model_type"],
            bits=int(d["bits"]),
            dtype=d["dtype"],
            num_layers=int(d["num_layers"]),
            source=d.get("source", ""),
            layers=tuple(_blob_from_dict(b) for b in d["layers"]),
            resident=_blob_from_dict(d["resident"]),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            experts=tuple(tuple(_blob_from_dict(b) for b in layer) for layer in d.get("experts") or ()),
        )
    except StoreError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"{store_dir}: corrupt {MANIFEST} ({type(exc).__name__}: {exc})") from None


def layout_entries(
    specs: list[tuple[str, str, tuple[int, ...], int, QuantInfo | None]],
) -> tuple[dict[str, TensorEntry], int]:
    """ALIGN-aligned entries for (name, dtype name, shape, nbytes, quant) in order, and the padded blob size."""
    entries: dict[str, TensorEntry] = {}
    offset = 0
    for name, dtype, shape, nbytes, quant in specs:
        entries[name] = TensorEntry(name, dtype, tuple(shape), offset, nbytes, quant)
        offset = align_up(offset + nbytes)
    return entries, max(offset, ALIGN)


def layout_blob(tensors: dict[str, torch.Tensor], quant: dict[str, QuantInfo] | None = None) -> tuple[dict[str, TensorEntry], int]:
    """Assign ALIGN-aligned offsets to tensors in insertion order; return entries and padded blob size."""
    quant = quant or {}
    return layout_entries([(name, DTYPE_NAMES[t.dtype], tuple(t.shape), t.numel() * t.element_size(), quant.get(name))
                           for name, t in tensors.items()])


def tensor_views(entries: dict[str, TensorEntry], buf: torch.Tensor) -> dict[str, torch.Tensor]:
    """Zero-copy views of each tensor inside a uint8 buffer holding the blob."""
    out: dict[str, torch.Tensor] = {}
    for name, e in entries.items():
        raw = buf[e.offset : e.offset + e.nbytes]
        out[name] = raw.view(DTYPES[e.dtype]).view(e.shape)
    return out
