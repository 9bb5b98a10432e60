"""What a model source holds, read from its metadata alone: config.json and safetensors headers, or a GGUF
header. Nothing is converted and no tensor data is read.

One reader serves `offspec plan` (a dry run) and the disk-space check before a conversion: both size the
store a source would become with `estimate_manifest`, which lays the blobs out exactly as the converter does.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from offspec.errors import ModelError
from offspec.store.manifest import (
    DTYPE_NAMES,
    DTYPES,
    FORMAT_VERSION,
    RESIDENT_FILE,
    BlobEntry,
    Manifest,
    QuantInfo,
    layout_entries,
)

NF4_BLOCKSIZE = 64  # must match offspec.store.nf4 (kept import-free of bitsandbytes here)
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_GGUF_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
_ST_DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
              "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
              "BOOL": ("bool", 1), "F8_E4M3": ("float8", 1), "F8_E5M2": ("float8", 1)}


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    is_float: bool
    source_bytes: int
    dtype: str = ""  # the stored dtype name of a non-float tensor (kept as is)


@dataclass(frozen=True)
class SourceMetadata:
    """A source's model facts and tensors (by layer, and the resident ones) without their data."""

    path: Path
    kind: str  # "folder" or "gguf"
    model_type: str
    num_layers: int
    config: dict  # what sizing needs: num_attention_heads, num_key_value_heads, head_dim, hidden_size, context
    tie_word_embeddings: bool
    layers: tuple[dict[str, TensorSpec], ...]
    resident: dict[str, TensorSpec]
    default_bits: int = 16
    bits_reason: str = ""
    files: tuple[Path, ...] = field(default_factory=tuple)

    @property
    def source_bytes(self) -> int:
        return sum(t.source_bytes for layer in self.layers for t in layer.values()) + sum(
            t.source_bytes for t in self.resident.values())

    @property
    def tensor_count(self) -> int:
        return sum(len(layer) for layer in self.layers) + len(self.resident)


def split_layer_name(name: str) -> tuple[int, str] | None:
    """(layer index, relative name) for "model.layers.{i}.rest", else None."""
    m = _LAYER_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def group_names(names: list[str], num_layers: int, where: str) -> tuple[dict[int, dict[str, str]], list[str]]:
    """Split full tensor names into {layer: {relative: full}} and resident names; ModelError on gaps."""
    layers: dict[int, dict[str, str]] = {i: {} for i in range(num_layers)}
    resident: list[str] = []
    for name in names:
        split = split_layer_name(name)
        if split is None:
            resident.append(name)
        elif split[0] < num_layers:  # extra layers (e.g. multi-token-prediction heads) are unused by HF too
            layers[split[0]][split[1]] = name
    if "model.embed_tokens.weight" not in resident:
        raise ModelError(f"{where}: tensor model.embed_tokens.weight is missing")
    first = set(layers[0]) if num_layers else set()
    for i in range(num_layers):
        if not layers[i]:
            raise ModelError(f"{where}: layer {i} has no tensors (config says {num_layers} layers)")
        missing = first - set(layers[i])
        if missing and set(layers[i]) < first:
            raise ModelError(f"{where}: tensor model.layers.{i}.{sorted(missing)[0]} is missing")
    return layers, resident


def num_layers_of(config: dict, where: str) -> int:
    n = config.get("num_hidden_layers", (config.get("text_config") or {}).get("num_hidden_layers"))
    if not isinstance(n, int) or n < 1:
        raise ModelError(f"{where}: unsupported architecture '{config.get('model_type')}' "
                         "(its config.json has no num_hidden_layers)")
    return n


def read_config(src: Path) -> dict:
    """A HF folder's config.json; ModelError if missing or invalid."""
    path = src / "config.json"
    if not path.is_file():
        raise ModelError(f"{src}: no config.json, not a Hugging Face model folder")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None
    if not config.get("model_type"):
        raise ModelError(f"{path}: no model_type")
    return config


def safetensors_files(src: Path) -> list[Path]:
    """The weight files of a HF folder (from its index if present); ModelError if any is missing."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{index}: corrupt index ({type(exc).__name__}: {exc})") from None
        files = [src / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise ModelError(f"{src}: shard {f.name} (listed in {index.name}) is missing")
        return files
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{src}: no *.safetensors files (only safetensors folders and .gguf files are supported)")
    return files


def safetensors_header(file: Path) -> dict:
    """{name: {"dtype", "shape", "data_offsets"}} from a safetensors file's JSON header."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 << 20:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as exc:
        raise ModelError(f"{file}: unreadable safetensors file ({exc}); it may be truncated or corrupt") from None
    header.pop("__metadata__", None)
    return header


def _sizing_config(config: dict) -> dict:
    text = config.get("text_config") or {}
    get = lambda k: config.get(k, text.get(k))  # noqa: E731
    heads = get("num_attention_heads") or 1
    out = {"num_attention_heads": heads, "num_key_value_heads": get("num_key_value_heads") or heads,
           "hidden_size": get("hidden_size") or 0}
    for key in ("head_dim", "max_position_embeddings"):
        if get(key):
            out[key] = get(key)
    return out


def _folder_metadata(src: Path) -> SourceMetadata:
    config = read_config(src)
    n = num_layers_of(config, str(src))
    specs: dict[str, TensorSpec] = {}
    files = safetensors_files(src)
    for file in files:
        for name, h in safetensors_header(file).items():
            dtype, size = _ST_DTYPES.get(h.get("dtype"), (str(h.get("dtype")).lower(), 1))
            shape = tuple(int(d) for d in h["shape"])
            nbytes = math.prod(shape) * size
            specs[name] = TensorSpec(shape, dtype.startswith("float") or dtype == "bfloat16", nbytes,
                                     "" if dtype.startswith("float") or dtype == "bfloat16" else dtype)
    layers, resident = group_names(list(specs), n, str(src))
    tie = bool(config.get("tie_word_embeddings")) or "lm_head.weight" not in specs
    resident = [r for r in resident if not (tie and r == "lm_head.weight")]
    return SourceMetadata(
        src, "folder", str(config["model_type"]), n, _sizing_config(config), tie,
        tuple({rel: specs[full] for rel, full in layers[i].items()} for i in range(n)),
        {name: specs[name] for name in resident}, files=tuple(files))


def _gguf_metadata(src: Path) -> SourceMetadata:
    from offspec.store.gguf import default_bits, read_gguf_header

    header = read_gguf_header(src)
    md, arch = header.metadata, header.architecture
    get = lambda k, d=None: md.get(f"{arch}.{k}", d)  # noqa: E731
    n = get("block_count")
    if not isinstance(n, int) or n < 1:
        raise ModelError(f"{src}: the GGUF metadata has no {arch}.block_count")
    kv = get("attention.head_count_kv", get("attention.head_count", 1))
    heads = get("attention.head_count", 1)
    config = {"num_attention_heads": max(heads) if isinstance(heads, list) else heads,
              "num_key_value_heads": max(kv) if isinstance(kv, list) else kv,
              "hidden_size": get("embedding_length", 0)}
    if get("attention.key_length"):
        config["head_dim"] = get("attention.key_length")
    if get("context_length"):
        config["max_position_embeddings"] = get("context_length")
    layers: list[dict[str, TensorSpec]] = [{} for _ in range(n)]
    resident: dict[str, TensorSpec] = {}
    for t in header.tensors:
        spec = TensorSpec(t.shape, True, t.nbytes)
        m = _GGUF_LAYER_RE.match(t.name)
        if m is None:
            resident[t.name] = spec
        elif int(m.group(1)) < n:
            layers[int(m.group(1))][m.group(2)] = spec
    if "token_embd.weight" not in resident:
        raise ModelError(f"{src}: the GGUF has no token_embd.weight tensor")
    tie = "output.weight" not in resident
    bits, why = default_bits(header)
    return SourceMetadata(src, "gguf", arch, n, config, tie, tuple(layers), resident, bits, why, header.parts)


def read_source_metadata(src: str | Path) -> SourceMetadata:
    """The metadata of a HF folder or a .gguf file (all parts of a split GGUF)."""
    path = Path(src).expanduser()
    if not path.exists():
        raise ModelError(f"model path not found: {src}")
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{path}: not a model folder, .gguf file or offspec store")
        return _gguf_metadata(path)
    return _folder_metadata(path)


def _specs(tensors: dict[str, TensorSpec], dtype: str, bits: int) -> list:
    """What the converter writes for these tensors: (name, dtype, shape, nbytes, quant), in its order."""
    out = []
    size = DTYPES[dtype].itemsize
    for name in sorted(tensors):
        t = tensors[name]
        n = math.prod(t.shape) if t.shape else 1
        if not t.is_float:
            out.append((name, t.dtype if t.dtype in DTYPES else "uint8", t.shape, t.source_bytes, None))
        elif bits == 4 and len(t.shape) == 2 and name.endswith(".weight"):
            quant = QuantInfo("nf4", NF4_BLOCKSIZE, t.shape, dtype)
            out.append((name, "uint8", ((n + 1) // 2, 1), (n + 1) // 2, quant))
            blocks = -(-n // NF4_BLOCKSIZE)
            out.append((name + ".absmax", DTYPE_NAMES[DTYPES["float32"]], (blocks,), 4 * blocks, None))
        else:
            out.append((name, dtype, t.shape, n * size, None))
    return out


def estimate_manifest(meta: SourceMetadata, bits: int, dtype: str) -> Manifest:
    """The manifest the converter would write (blob sizes and layouts exact; no checksums)."""
    layers = []
    for i, tensors in enumerate(meta.layers):
        entries, size = layout_entries(_specs(tensors, dtype, bits))
        layers.append(BlobEntry(f"layers/layer_{i:03d}.bin", size, "", entries))
    entries, size = layout_entries(_specs(meta.resident, dtype, 16))
    return Manifest(FORMAT_VERSION, meta.model_type, bits, dtype, meta.num_layers, str(meta.path), tuple(layers),
                    BlobEntry(RESIDENT_FILE, size, "", entries), meta.tie_word_embeddings)


def store_bytes(manifest: Manifest) -> int:
    """Bytes of a store's blobs (metadata files not counted)."""
    return manifest.resident.size + sum(manifest.layer_bytes)
