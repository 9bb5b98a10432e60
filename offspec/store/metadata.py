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
from collections.abc import Callable
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
    # per decoder layer: {expert: {name in the layer: one expert's slice of a fused experts parameter}} (MoE layers)
    experts: tuple[dict[int, dict[str, TensorSpec]], ...] = ()
    unpacked: tuple[frozenset[str], ...] = ()  # per decoder layer: 2-D weights an NF4 store keeps 16-bit (routers)

    def layer_source_bytes(self, i: int) -> int:
        """Source bytes of decoder layer i, its experts included."""
        dense = sum(t.source_bytes for t in self.layers[i].values())
        experts = self.experts[i] if i < len(self.experts) else {}
        return dense + sum(t.source_bytes for ex in experts.values() for t in ex.values())

    def layer_tensor_count(self, i: int) -> int:
        experts = self.experts[i] if i < len(self.experts) else {}
        return len(self.layers[i]) + sum(len(ex) for ex in experts.values())

    @property
    def source_bytes(self) -> int:
        return sum(self.layer_source_bytes(i) for i in range(len(self.layers))) + sum(
            t.source_bytes for t in self.resident.values())

    @property
    def tensor_count(self) -> int:
        return sum(self.layer_tensor_count(i) for i in range(len(self.layers))) + len(self.resident)


@dataclass(frozen=True)
class Layout:
    """Where a checkpoint keeps its text decoder: the prefix of its decoder layers (`{stack}{i}.rest`), and which
    tensor names belong to the text model, renamed to what the text model's causal LM calls them."""

    stack: str  # e.g. "model.layers."
    keep: tuple[tuple[str, str], ...] = (("", ""),)  # (checkpoint prefix, the text model's prefix); others dropped
    what: str = ""

    def text_name(self, name: str) -> str | None:
        """The text model's name of a checkpoint tensor; None for a tensor of another part (a vision tower)."""
        for src, dst in self.keep:
            if name.startswith(src):
                return dst + name[len(src):]
        return None


# The per-layout path map. Tensors outside the decoder stack are kept under their own names (a checkpoint saved
# without the base model's prefix, e.g. GPT-2's "h.0.", is bound under that prefix when the model is built).
LAYOUTS: tuple[Layout, ...] = (
    Layout("model.layers.", what="model.layers (Llama-style decoders)"),
    Layout("model.language_model.layers.", (("model.language_model.", "model."), ("lm_head.", "lm_head.")),
           "model.language_model.layers (the text part of a multimodal checkpoint)"),
    Layout("language_model.model.layers.", (("language_model.", ""),),
           "language_model.model.layers (the text part of a multimodal checkpoint)"),
    Layout("transformer.h.", what="transformer.h (GPT-2, GPT-J, BLOOM, Falcon, CodeGen)"),
    Layout("h.", what="h (GPT-2-style, saved without its prefix)"),
    Layout("gpt_neox.layers.", what="gpt_neox.layers (GPT-NeoX, Pythia)"),
    Layout("layers.", what="layers (saved without its prefix)"),
    Layout("model.decoder.layers.", what="model.decoder.layers (OPT)"),
    Layout("decoder.layers.", what="decoder.layers (OPT, saved without its prefix)"),
    Layout("transformer.blocks.", what="transformer.blocks (MPT)"),
    Layout("biogpt.layers.", what="biogpt.layers (BioGPT)"),
    Layout("gpt_neox_japanese.layers.", what="gpt_neox_japanese.layers (GPT-NeoX Japanese)"),
)  # fmt: skip
_INDEX_RE = re.compile(r"^(\d+)\.(.+)$")


def split_layer_name(name: str, layout: Layout = LAYOUTS[0]) -> tuple[int, str] | None:
    """(layer index, relative name) for "{layout.stack}{i}.rest", else None."""
    if not name.startswith(layout.stack):
        return None
    m = _INDEX_RE.match(name[len(layout.stack):])
    return (int(m.group(1)), m.group(2)) if m else None


def find_layout(names: list[str], num_layers: int, where: str) -> Layout:
    """The layout whose decoder stack holds layers 0..num_layers-1; ModelError naming the known ones otherwise."""
    for layout in LAYOUTS:
        found = {split[0] for split in (split_layer_name(n, layout) for n in names) if split is not None}
        if num_layers and set(range(num_layers)) <= found:
            return layout
    known = ", ".join(lay.stack.rstrip(".") for lay in LAYOUTS)
    raise ModelError(f"{where}: no decoder layer stack of {num_layers} layers at a known path ({known}); "
                     "offspec streams decoder-only models laid out like these")


def group_names(names: list[str], num_layers: int, where: str, layout: Layout | None = None,
                expected: frozenset[str] | None = None,
                known: frozenset[str] | None = None) -> tuple[dict[int, dict[str, str]], dict[str, str]]:
    """Split full tensor names into {layer: {relative: full}} and {text-model name: full} for the other tensors
    of the text model (a multimodal checkpoint's other parts are left out); ModelError on gaps.

    expected: the parameter names of the model the checkpoint is for; a layer missing one of them is an error
    (without them, a tensor that both neighbouring layers have is). known: every name the model loads; a tensor
    it would not load (e.g. key projections a KV-sharing layer does not have) is left out, as transformers does."""
    if known is not None:
        names = [n for n in names if n in known]
    layout = layout or find_layout(names, num_layers, where)
    layers: dict[int, dict[str, str]] = {i: {} for i in range(num_layers)}
    resident: dict[str, str] = {}
    for name in names:
        split = split_layer_name(name, layout)
        if split is None:
            text = layout.text_name(name)
            if text is not None:
                resident[text] = name
        elif split[0] < num_layers:  # extra layers (e.g. multi-token-prediction heads) are unused by HF too
            layers[split[0]][split[1]] = name
    if not resident:
        raise ModelError(f"{where}: no embeddings (no tensor outside the decoder layers)")
    for i in range(num_layers):
        if not layers[i]:
            raise ModelError(f"{where}: layer {i} has no tensors (config says {num_layers} layers)")
        if expected is not None:
            prefix = f"{layout.stack}{i}."
            missing = {n[len(prefix):] for n in expected if n.startswith(prefix)} - set(layers[i])
        elif 0 < i < num_layers - 1:  # layers may differ in kind (KV-sharing layers without key projections)
            missing = (set(layers[i - 1]) & set(layers[i + 1])) - set(layers[i])
        else:
            missing = set()
        if missing:
            raise ModelError(f"{where}: tensor {layout.stack}{i}.{sorted(missing)[0]} is missing")
    return layers, resident


@dataclass(frozen=True)
class CheckpointNaming:
    """How a checkpoint's tensor names become its model's: `rename` (transformers' own load-time renames, see
    transformers_contract.CheckpointNames), and the parameter names that model has (None if unknown)."""

    rename: Callable[[str], str]
    parameters: frozenset[str] | None = None
    state: frozenset[str] | None = None  # every name the model loads; others are left out, as transformers does
    expert_piece: Callable[[str], tuple[str, int, int, int] | None] = lambda name: None  # CheckpointNames.expert_piece
    expert_params: dict[str, tuple[int, str]] = field(default_factory=dict)  # fused parameter -> (layer, name in it)
    num_experts: dict[int, int] = field(default_factory=dict)  # MoE layer -> its number of routed experts
    not_linear: frozenset[str] = frozenset()  # 2-D layer weights of modules other than nn.Linear (kept 16-bit)


_NAMINGS: dict[tuple[str, int], CheckpointNaming] = {}


def checkpoint_naming(src: Path) -> CheckpointNaming:
    """The naming of a folder's checkpoint; names as they are for a config transformers cannot build (the
    architecture check refuses it later with its own line)."""
    from offspec.transformers_contract import CheckpointNames, ContractError

    key = (str(src), (src / "config.json").stat().st_mtime_ns)
    if key not in _NAMINGS:
        try:
            from transformers import AutoConfig

            names = CheckpointNames(AutoConfig.from_pretrained(src))
        except ContractError as exc:
            raise ModelError(f"{src}: {exc}") from None
        except Exception:  # noqa: BLE001 - unknown model types, configs transformers rejects
            _NAMINGS[key] = CheckpointNaming(lambda name: name)
        else:
            def rename(name: str) -> str:
                try:
                    return names.name(name)
                except ContractError as exc:
                    raise ModelError(f"{src}: {exc}") from None

            _NAMINGS[key] = CheckpointNaming(rename, names.parameters, names.state, names.expert_piece,
                                             names.expert_params, {i: x.num_experts for i, x in names.experts.items()},
                                             names.not_linear)
    return _NAMINGS[key]


@dataclass(frozen=True)
class ExpertSlice:
    """Where one expert's slice of a fused experts parameter comes from: the parts, concatenated along their first
    dimension, each a whole checkpoint tensor (`index` None: per-expert checkpoints) or row `index` of a fused one."""

    parts: tuple[tuple[str, int | None], ...]  # (checkpoint key, expert row or None)


def split_experts(keys: list[str], naming: CheckpointNaming,
                  where: str) -> tuple[list[str], dict[int, dict[int, dict[str, ExpertSlice]]]]:
    """Separate the routed experts' tensors from the others: (the other keys, {layer: {expert: {name in the layer:
    its slice}}}). Per-expert checkpoint tensors (`experts.3.gate_proj.weight`, merged by transformers on load) and
    fused ones (`experts.gate_up_proj` [experts, ...], as transformers 5 saves them) both become one slice per
    expert of the model's fused parameters; ModelError if an expert lacks a part."""
    if not naming.expert_params:
        return keys, {}
    pieces: dict[tuple[str, int], dict[int, str]] = {}
    count: dict[str, int] = {}
    fused: dict[str, str] = {}
    rest = []
    for key in keys:
        piece = naming.expert_piece(key)
        if piece is not None:
            full, e, k, n = piece
            pieces.setdefault((full, e), {})[k] = key
            count[full] = n
            continue
        name = naming.rename(key)
        if name in naming.expert_params:
            fused[name] = key
        else:
            rest.append(key)
    out: dict[int, dict[int, dict[str, ExpertSlice]]] = {}
    for full, (i, rel) in naming.expert_params.items():
        n_exp = naming.num_experts[i]
        layer = out.setdefault(i, {})
        for e in range(n_exp):
            if full in fused:
                part: tuple[tuple[str, int | None], ...] = ((fused[full], e),)
            else:
                got = pieces.get((full, e), {})
                if not got or len(got) != count.get(full, 0):
                    raise ModelError(f"{where}: expert {e} of layer {i} has no tensor for {rel} in the checkpoint")
                part = tuple((got[k], None) for k in sorted(got))
            layer.setdefault(e, {})[rel] = ExpertSlice(part)
    return rest, out


def ties_embeddings(config: dict, resident: dict[str, str]) -> bool:
    """Whether the head reuses the input embeddings: the config says so (or its text part does), or the checkpoint
    has no lm_head of its own."""
    flag = config.get("tie_word_embeddings", (config.get("text_config") or {}).get("tie_word_embeddings"))
    return bool(flag) or "lm_head.weight" not in resident


LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")  # GPT-2, BLOOM, ... name it so


def num_layers_of(config: dict, where: str) -> int:
    text = config.get("text_config") or {}
    n = next((c[k] for c in (config, text) for k in LAYER_COUNT_KEYS if isinstance(c.get(k), int)), None)
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
    raw: dict[str, TensorSpec] = {}
    files = safetensors_files(src)
    naming = checkpoint_naming(src)
    for file in files:
        for key, h in safetensors_header(file).items():
            dtype, size = _ST_DTYPES.get(h.get("dtype"), (str(h.get("dtype")).lower(), 1))
            shape = tuple(int(d) for d in h["shape"])
            nbytes = math.prod(shape) * size
            raw[key] = TensorSpec(shape, dtype.startswith("float") or dtype == "bfloat16", nbytes,
                                  "" if dtype.startswith("float") or dtype == "bfloat16" else dtype)
    keys, experts = split_experts(list(raw), naming, str(src))
    specs = {naming.rename(key): raw[key] for key in keys}
    layers, resident = group_names(list(specs), n, str(src), expected=dense_parameters(naming), known=naming.state)
    tie = ties_embeddings(config, resident)
    return SourceMetadata(
        src, "folder", str(config["model_type"]), n, _sizing_config(config), tie,
        tuple({rel: specs[full] for rel, full in layers[i].items()} for i in range(n)),
        {name: specs[full] for name, full in resident.items() if not (tie and name == "lm_head.weight")},
        files=tuple(files),
        experts=tuple({e: {rel: expert_spec(sl, raw) for rel, sl in ex.items()} for e, ex in experts.get(i, {}).items()}
                      for i in range(n)),
        unpacked=tuple(frozenset(rel for rel, full in layers[i].items() if full in naming.not_linear)
                       for i in range(n)))


def dense_parameters(naming: CheckpointNaming) -> frozenset[str] | None:
    """The model's parameters a checkpoint's layer blobs must hold (the routed experts' go to expert blobs)."""
    if naming.parameters is None:
        return None
    return naming.parameters - set(naming.expert_params)


def expert_spec(sl: ExpertSlice, raw: dict[str, TensorSpec]) -> TensorSpec:
    """The spec of one expert's slice (its parts concatenated along the first dimension)."""
    shapes = [raw[key].shape[1:] if row is not None else raw[key].shape for key, row in sl.parts]
    first = sum(s[0] for s in shapes) if shapes[0] else 0
    shape = (first, *shapes[0][1:]) if shapes[0] else ()
    src = raw[sl.parts[0][0]]
    per = sum(raw[key].source_bytes // (raw[key].shape[0] if row is not None else 1) for key, row in sl.parts)
    return TensorSpec(shape, src.is_float, per, src.dtype)


def _gguf_metadata(src: Path) -> SourceMetadata:
    from offspec.store.gguf import default_bits, expert_slices, read_gguf_header

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
    experts = expert_slices(header)  # a merged expert tensor is converted as one tensor per expert
    for t in header.tensors:
        spec = TensorSpec(t.shape, True, t.nbytes)
        m = _GGUF_LAYER_RE.match(t.name)
        if m is None:
            resident[t.name] = spec
        elif int(m.group(1)) < n:
            i, rel = int(m.group(1)), m.group(2)
            per_expert = {e: ex[rel] for e, ex in experts.get(i, {}).items() if rel in ex}
            if not per_expert:
                layers[i][rel] = spec
            for e, s in per_expert.items():  # rel is ffn_*_exps.weight: named ffn_*_exps.E.weight (size only)
                base, suffix = rel.rsplit(".", 1)
                layers[i][f"{base}.{e}.{suffix}"] = TensorSpec(s.shape, True, s.nbytes)
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


def nf4_packs(name: str, ndim: int, expert: bool = False) -> bool:
    """Whether an NF4 store packs this float tensor: every 2-D linear weight, and one expert's 2-D matrices."""
    return ndim == 2 and (expert or name.endswith(".weight"))


def expert_file(i: int, e: int) -> str:
    """The blob path of expert e of decoder layer i, relative to the store folder."""
    return f"layers/layer_{i:03d}/expert_{e:03d}.bin"


def _specs(tensors: dict[str, TensorSpec], dtype: str, bits: int, expert: bool = False,
           unpacked: frozenset[str] = frozenset()) -> list:
    """What the converter writes for these tensors: (name, dtype, shape, nbytes, quant), in its order."""
    out = []
    size = DTYPES[dtype].itemsize
    for name in sorted(tensors):
        t = tensors[name]
        n = math.prod(t.shape) if t.shape else 1
        if not t.is_float:
            out.append((name, t.dtype if t.dtype in DTYPES else "uint8", t.shape, t.source_bytes, None))
        elif bits == 4 and nf4_packs(name, len(t.shape), expert) and name not in unpacked:
            quant = QuantInfo("nf4", NF4_BLOCKSIZE, t.shape, dtype)
            out.append((name, "uint8", ((n + 1) // 2, 1), (n + 1) // 2, quant))
            blocks = -(-n // NF4_BLOCKSIZE)
            out.append((name + ".absmax", DTYPE_NAMES[DTYPES["float32"]], (blocks,), 4 * blocks, None))
        else:
            out.append((name, dtype, t.shape, n * size, None))
    return out


_PER_EXPERT = re.compile(r"^(.*_exps)\.(\d+)\.(weight|bias)$")  # a GGUF's merged experts sized per expert


def _experts_of(meta: SourceMetadata, i: int) -> tuple[dict[str, TensorSpec], dict[int, dict[str, TensorSpec]]]:
    """Layer i's tensors but its routed experts', and {expert: its tensors}: from `meta.experts`, or from a GGUF's
    merged expert tensors listed one per expert (`ffn_gate_exps.3.weight`; names for sizing only)."""
    experts = {e: dict(t) for e, t in (meta.experts[i] if i < len(meta.experts) else {}).items()}
    dense = {}
    for name, spec in meta.layers[i].items():
        m = _PER_EXPERT.match(name)
        if m is None:
            dense[name] = spec
        else:
            experts.setdefault(int(m.group(2)), {})[f"{m.group(1)}.{m.group(3)}"] = spec
    return dense, experts


def estimate_manifest(meta: SourceMetadata, bits: int, dtype: str) -> Manifest:
    """The manifest the converter would write (blob sizes and layouts exact for a folder; no checksums)."""
    layers = []
    split = [_experts_of(meta, i) for i in range(meta.num_layers)]
    for i, (tensors, experts_i) in enumerate(split):
        unpacked = meta.unpacked[i] if i < len(meta.unpacked) else frozenset()
        if meta.kind == "gguf" and experts_i:  # its router ([experts, hidden], not a linear layer) stays 16-bit
            unpacked = unpacked | {n for n, t in tensors.items() if len(t.shape) == 2 and len(experts_i) in t.shape}
        entries, size = layout_entries(_specs(tensors, dtype, bits, unpacked=unpacked))
        layers.append(BlobEntry(f"layers/layer_{i:03d}.bin", size, "", entries))
    experts = []
    for i in range(meta.num_layers):
        blobs = []
        for e, tensors in sorted(split[i][1].items()):
            entries, size = layout_entries(_specs(tensors, dtype, bits, expert=True))
            blobs.append(BlobEntry(expert_file(i, e), size, "", entries))
        experts.append(tuple(blobs))
    entries, size = layout_entries(_specs(meta.resident, dtype, 16))
    return Manifest(FORMAT_VERSION, meta.model_type, bits, dtype, meta.num_layers, str(meta.path), tuple(layers),
                    BlobEntry(RESIDENT_FILE, size, "", entries), meta.tie_word_embeddings,
                    tuple(experts) if any(experts) else ())


def store_bytes(manifest: Manifest) -> int:
    """Bytes of a store's blobs (metadata files not counted)."""
    return manifest.resident.size + sum(manifest.layer_bytes) + sum(b.size for ex in manifest.experts for b in ex)
