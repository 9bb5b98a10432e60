"""GGUF files read tensor by tensor: a fast header reader, split files, the default store precision, and the
streaming source the converter writes layer blobs from.

The header (metadata and tensor table) is parsed straight from a memory map, skipping the tokenizer's
string arrays, so sizing a GGUF takes milliseconds. Tensor data is never read until a tensor is converted:
then its bytes are dequantized with the `gguf` library, fixed for the model family by transformers'
tensor processor (through `offspec.transformers_contract`), cast, written and dropped.

A mixture-of-experts GGUF merges each projection of a layer's experts into one tensor (`blk.N.ffn_gate_exps`,
[n_expert, rows, cols]). The source presents it as a Hugging Face checkpoint of the family does, one tensor per
expert (`model.layers.N.mlp.experts.{e}.gate_proj.weight`), each read from its own slice of the merged tensor.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from offspec.errors import ModelError

_SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_FIXED = {0: "<B", 1: "<b", 7: "<?", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 10: "<Q", 11: "<q", 12: "<d"}
_F32, _F16, _BF16, _Q8_0 = 0, 1, 30, 8
# llama.cpp file types (general.file_type) whose weights hold 8 bits or more: these become 16-bit stores.
_WIDE_FILE_TYPES = {0: "F32", 1: "F16", 7: "Q8_0", 32: "BF16"}
_WIDE_TENSOR_TYPES = {_F32, _F16, _BF16, _Q8_0}
CHUNK_BYTES = 16 << 20  # float32 bytes dequantized at once (gguf-py needs several times that while it works)


@dataclass(frozen=True)
class GgufTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (rows first)
    ggml_type: int
    part: int  # index into GgufHeader.parts
    offset: int  # absolute file offset of the tensor data
    nbytes: int

    @property
    def type_name(self) -> str:
        import gguf

        try:
            return gguf.GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return str(self.ggml_type)


@dataclass(frozen=True)
class GgufHeader:
    """Metadata (string arrays replaced by their length) and the tensor table of a GGUF, over all its parts."""

    parts: tuple[Path, ...]
    metadata: dict
    tensors: tuple[GgufTensorInfo, ...]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def file_type(self) -> int | None:
        ft = self.metadata.get("general.file_type")
        return int(ft) if isinstance(ft, int) else None

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def gguf_parts(path: Path) -> tuple[Path, ...]:
    """All parts of a split GGUF (`…-00001-of-0000N.gguf`), in order, given any of them; else (path,)."""
    m = _SPLIT_RE.match(path.name)
    if not m:
        return (path,)
    count = int(m.group("count"))
    parts = tuple(path.with_name(f"{m.group('stem')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1))
    for p in parts:
        if not p.is_file():
            raise ModelError(f"{path}: part {p.name} of this split GGUF is missing")
    return parts


def _string(buf, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    pos += 8
    return bytes(buf[pos : pos + n]).decode("utf-8", errors="replace"), pos + n


def _value(buf, pos: int, vtype: int):
    if vtype in _FIXED:
        fmt = _FIXED[vtype]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if vtype == 8:
        return _string(buf, pos)
    if vtype == 9:
        etype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if etype in _FIXED:
            width = struct.calcsize(_FIXED[etype])
            if count > 64:  # token scores, types...: only their length matters here
                return count, pos + count * width
            return list(struct.unpack_from(f"<{count}{_FIXED[etype][1]}", buf, pos)), pos + count * width
        if etype == 8:
            for _ in range(count):
                (n,) = struct.unpack_from("<Q", buf, pos)
                pos += 8 + n
            return count, pos
        raise ValueError(f"array of type {etype}")
    raise ValueError(f"value type {vtype}")


def _read_part(path: Path, part: int) -> tuple[dict, list[GgufTensorInfo]]:
    import gguf

    try:
        buf = np.memmap(path, mode="r", dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read GGUF file ({exc})") from None
    try:
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("no GGUF magic bytes")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported")
        pos, meta = 24, {}
        for _ in range(n_kv):
            key, pos = _string(buf, pos)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            meta[key], pos = _value(buf, pos + 4, vtype)
        entries = []
        for _ in range(n_tensors):
            name, pos = _string(buf, pos)
            (ndim,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{ndim}Q", buf, pos + 4)
            ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * ndim)
            pos += 4 + 8 * ndim + 12
            entries.append((name, tuple(int(d) for d in reversed(dims)), int(ggml_type), int(offset)))
        align = int(meta.get("general.alignment", 32))
        data_start = (pos + align - 1) // align * align
        tensors = []
        for name, shape, ggml_type, offset in entries:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
            n = int(np.prod(shape)) if shape else 1
            nbytes = n // block * type_size
            if data_start + offset + nbytes > len(buf):
                raise ValueError(f"tensor {name} lies beyond the end of the file (truncated?)")
            tensors.append(GgufTensorInfo(name, shape, ggml_type, part, data_start + offset, nbytes))
    except (ValueError, struct.error, KeyError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: cannot load GGUF file ({exc})") from None
    return meta, tensors


def read_gguf_header(path: str | Path) -> GgufHeader:
    """The header of a GGUF file (all parts of a split one); ModelError if it is not a readable GGUF."""
    parts = gguf_parts(Path(path))
    metadata: dict = {}
    tensors: list[GgufTensorInfo] = []
    for i, part in enumerate(parts):
        meta, infos = _read_part(part, i)
        if i == 0:
            metadata = meta
        tensors += infos
    if "general.architecture" not in metadata:
        raise ModelError(f"{parts[0]}: cannot load GGUF file (no general.architecture in its metadata)")
    return GgufHeader(parts, metadata, tuple(tensors))


def default_bits(header: GgufHeader) -> tuple[int, str]:
    """(bits, why): NF4 for files quantized below 8 bits, 16-bit for F32/F16/BF16/Q8_0 files.

    Decided by general.file_type (GGUFs mix tensor types: a Q4_K_M file holds Q6_K and F32 tensors too);
    without it, by the types of the file's 2-D weights."""
    import gguf

    ft = header.file_type
    if ft is not None:
        try:
            name = gguf.LlamaFileType(ft).name.replace("MOSTLY_", "").replace("ALL_", "")
        except ValueError:
            name = f"file type {ft}"
        if ft in _WIDE_FILE_TYPES:
            return 16, f"the GGUF is {name} (8 bits or more per weight)"
        if ft != 1024:  # GUESSED: fall through to the tensors
            return 4, f"the GGUF is {name} (below 8 bits per weight)"
    narrow = [t.type_name for t in header.tensors if len(t.shape) == 2 and t.ggml_type not in _WIDE_TENSOR_TYPES]
    if narrow:
        return 4, f"the GGUF holds {narrow[0]} weights (below 8 bits per weight)"
    return 16, "the GGUF's weights have 8 bits or more"


def dequantize(info: GgufTensorInfo, maps: list[np.ndarray]) -> np.ndarray:
    """One tensor's values as float32 (torch order), read from its part's memory map."""
    import gguf

    raw = maps[info.part][info.offset : info.offset + info.nbytes]
    rows = info.shape[:-1] if info.shape else ()
    raw = raw.reshape(*rows, -1) if info.shape else raw
    return gguf.dequantize(raw, gguf.GGMLQuantizationType(info.ggml_type)).reshape(info.shape)


def to_torch(weights: np.ndarray) -> torch.Tensor:
    """A float32 torch tensor of an array (copied only if it is a read-only view of the file)."""
    if not weights.flags.writeable or not weights.flags.c_contiguous:
        weights = np.array(weights, dtype=np.float32, order="C")
    return torch.from_numpy(weights)


def expert_slice(info: GgufTensorInfo, expert: int) -> GgufTensorInfo:
    """Expert `expert`'s slice of a merged expert tensor [n_expert, ...]: its shape and its own bytes."""
    n = info.shape[0]
    if not 0 <= expert < n or info.nbytes % n:
        raise ValueError(f"tensor {info.name}: {info.nbytes} bytes do not split into {n} experts")
    size = info.nbytes // n
    return GgufTensorInfo(info.name, info.shape[1:], info.ggml_type, info.part, info.offset + expert * size, size)


_MERGED_EXPERTS_RE = re.compile(r"^blk\.(\d+)\.(ffn_\w+_exps\.(?:weight|bias))$")


def expert_slices(header: GgufHeader) -> dict[int, dict[int, dict[str, GgufTensorInfo]]]:
    """{layer: {expert: {name in the layer, e.g. `ffn_gate_exps.weight`: that expert's slice}}} of a GGUF's merged
    expert tensors, from the header alone: the shape and bytes of each expert, for sizing a store by expert."""
    out: dict[int, dict[int, dict[str, GgufTensorInfo]]] = {}
    for info in header.tensors:
        m = _MERGED_EXPERTS_RE.match(info.name)
        if m is None or len(info.shape) < 2:
            continue
        try:
            for e in range(info.shape[0]):
                out.setdefault(int(m.group(1)), {}).setdefault(e, {})[m.group(2)] = expert_slice(info, e)
        except ValueError as exc:
            raise ModelError(f"{header.parts[0]}: {exc}") from None
    return out


# llama.cpp's expert sizes (GGUF metadata, under the architecture's prefix) -> the config attribute; transformers'
# GGUF config map leaves them out, so a model whose experts are not the family's default size would not build.
_EXPERT_SIZE_KEYS = {"expert_feed_forward_length": "moe_intermediate_size",
                     "expert_shared_feed_forward_length": "shared_expert_intermediate_size"}


def _set_expert_sizes(config, header: GgufHeader) -> None:
    for key, attr in _EXPERT_SIZE_KEYS.items():
        value = header.metadata.get(f"{header.architecture}.{key}")
        if isinstance(value, int) and value > 0 and hasattr(config, attr):
            setattr(config, attr, value)


class GgufSource:
    """A GGUF file (or split GGUF) as a converter source: names and lazy per-tensor loaders, in HF names."""

    def __init__(self, src: Path, header: GgufHeader | None = None) -> None:
        from offspec.store.metadata import group_names
        from offspec.transformers_contract import ContractError, GgufTensorMap, gguf_config

        self.src = src
        self.header = header or read_gguf_header(src)
        try:
            self.config = gguf_config(self.header.parts[0])
        except Exception as exc:  # transformers raises ValueError/OSError/KeyError for what it cannot read
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{src}: cannot load GGUF file ({msg})") from None
        self.model_type = str(self.config.model_type)  # the converter checks it is supported
        _set_expert_sizes(self.config, self.header)
        names = {t.name for t in self.header.tensors}
        self.tie_word_embeddings = "output.weight" not in names
        self.config.tie_word_embeddings = self.tie_word_embeddings
        try:
            self._map = GgufTensorMap(self.header.architecture, self.config)
        except ContractError as exc:
            raise ModelError(f"{src}: {exc}") from None
        self.num_layers = int(self.config.num_hidden_layers)
        self._by_hf: dict[str, GgufTensorInfo] = {}
        self._experts: set[str] = set()  # names of one expert's slice of a merged expert tensor
        for info in self.header.tensors:
            hf = self._map.hf_name(info.name)
            if hf is not None:
                self._by_hf[hf] = info
                continue
            try:
                experts = self._map.expert_names(info.name, info.shape[0]) if len(info.shape) > 1 else None
                for e, name in enumerate(experts or ()):
                    self._by_hf[name] = expert_slice(info, e)
                    self._experts.add(name)
            except (ContractError, ValueError) as exc:
                raise ModelError(f"{src}: {exc}") from None
        self._check_experts(names)  # the file's tensor names
        self._layers, resident = group_names(list(self._by_hf), self.num_layers, str(src))
        self._resident = {n: full for n, full in resident.items()
                          if not (n == "lm_head.weight" and self.tie_word_embeddings)}
        self._maps: list[np.ndarray] = [np.memmap(p, mode="r", dtype=np.uint8) for p in self.header.parts]

    def _check_experts(self, names: set[str]) -> None:
        """ModelError naming the first merged expert tensor that transformers maps but the file lacks."""
        merged = re.compile(r"^blk\.(\d+)\.ffn_\w+_exps$")
        for key in sorted(self._map.names):
            m = merged.match(key)
            if m and int(m.group(1)) < self.num_layers and f"{key}.weight" not in names:
                raise ModelError(f"{self.src}: tensor {key}.weight is missing (the merged experts of layer "
                                 f"{m.group(1)}; the file may be incomplete)")

    def _loader(self, hf_name: str) -> Callable[..., torch.Tensor]:
        info = self._by_hf[hf_name]
        if hf_name in self._experts:
            return self._expert_loader(info)

        def load(dtype: torch.dtype | None = None) -> torch.Tensor:
            from offspec.transformers_contract import ContractError

            try:
                if dtype is not None and len(info.shape) == 2 and info.shape[0] * info.shape[1] * 4 > CHUNK_BYTES:
                    out = self._load_in_row_chunks(info, dtype)
                    if out is not None:
                        return out
                weights = dequantize(info, self._maps)
                mapped, weights = self._map.process(info.name, weights)
            except ContractError as exc:
                raise ModelError(f"{self.src}: {exc}") from None
            except (ValueError, NotImplementedError) as exc:
                raise ModelError(
                    f"{self.src}: cannot dequantize tensor {info.name} ({info.type_name}: {exc})") from None
            if mapped != hf_name:
                raise ModelError(f"{self.src}: tensor {info.name} maps to {mapped}, expected {hf_name}")
            return to_torch(weights)

        return load

    def _expert_loader(self, info: GgufTensorInfo) -> Callable[..., torch.Tensor]:
        """One expert's slice of a merged expert tensor, read from its own bytes only (a few rows at a time when
        it is large and a dtype is given). transformers places the slice unchanged in its fused parameter
        (checked by `GgufTensorMap.expert_names`), so no per-family fix applies."""

        def load(dtype: torch.dtype | None = None) -> torch.Tensor:
            try:
                if dtype is not None and len(info.shape) == 2 and info.shape[0] * info.shape[1] * 4 > CHUNK_BYTES:
                    return self._load_in_row_chunks(info, dtype, fix=False)
                return to_torch(dequantize(info, self._maps))
            except (ValueError, NotImplementedError) as exc:
                raise ModelError(
                    f"{self.src}: cannot dequantize tensor {info.name} ({info.type_name}: {exc})") from None

        return load

    def _load_in_row_chunks(self, info: GgufTensorInfo, dtype: torch.dtype, fix: bool = True) -> torch.Tensor | None:
        """A large matrix (an embedding, a head, an expert) dequantized and cast a few rows at a time; None when
        the family's fix changes it (a fix may need the whole tensor at once).

        transformers picks its tensor fixes by name, so a fix that returns the first rows unchanged leaves
        the whole tensor unchanged."""
        rows, cols = info.shape
        step = max(1, CHUNK_BYTES // (cols * 4))
        out = torch.empty(rows, cols, dtype=dtype)
        row_bytes = info.nbytes // rows
        for start in range(0, rows, step):
            n = min(step, rows - start)
            part = GgufTensorInfo(info.name, (n, cols), info.ggml_type, info.part, info.offset + start * row_bytes,
                                  n * row_bytes)
            chunk = dequantize(part, self._maps)
            if start == 0 and fix:
                from offspec.transformers_contract import ContractError

                try:
                    mapped, fixed = self._map.process(info.name, chunk)
                except ContractError:  # e.g. a Q/K un-permute cannot work on a few rows
                    return None
                if fixed is not chunk or mapped != self._map.hf_name(info.name):
                    return None
            out[start : start + n] = to_torch(chunk)
        return out

    def tensor_bytes(self, hf_name: str) -> int:
        return self._by_hf[hf_name].nbytes

    def layer_tensors(self, i: int) -> dict[str, Callable[[], torch.Tensor]]:
        return {rel: self._loader(full) for rel, full in self._layers[i].items()}

    def resident_tensors(self) -> dict[str, Callable[[], torch.Tensor]]:
        return {name: self._loader(full) for name, full in self._resident.items()}

    def write_metadata(self, dest: Path) -> None:
        from transformers import GenerationConfig

        from offspec.transformers_contract import gguf_tokenizer

        config = self.config
        if "quantization_config" in config.__dict__:
            del config.quantization_config
        config.save_pretrained(str(dest))
        GenerationConfig.from_model_config(config).save_pretrained(str(dest))
        try:
            gguf_tokenizer(self.header.parts[0]).save_pretrained(str(dest))
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{self.src}: cannot read the tokenizer in the GGUF file ({msg})") from None

    def __enter__(self) -> "GgufSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self._maps = []
