"""Convert a Hugging Face folder or a GGUF file into a layer store, atomically, resumably, tensor by tensor.

Work goes into `<out>.partial/`; a journal there records each finished layer blob, so an interrupted
conversion resumes where it stopped. The finished folder is renamed to `<out>` in one step. Tensors are
loaded one at a time (safetensors views, or one dequantized GGUF tensor) and streamed into their blob, so
memory stays near one layer's size whatever the model's size. Before anything is written, the store's size
is computed from the source's metadata and checked against the free disk space.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from offspec.config import check_bits_dtype
from offspec.errors import ModelError, StoreError
from offspec.store.locks import exclusive
from offspec.store.manifest import (
    ALIGN,
    DTYPE_NAMES,
    DTYPES,
    FORMAT_VERSION,
    MANIFEST,
    RESIDENT_FILE,
    BlobEntry,
    Manifest,
    QuantInfo,
    TensorEntry,
    _blob_from_dict,
    align_up,
    read_manifest,
)
from offspec.store.metadata import (
    SourceMetadata,
    checkpoint_naming,
    estimate_manifest,
    group_names,
    num_layers_of,
    read_config,
    read_source_metadata,
    safetensors_files,
    split_layer_name,
    ExpertSlice,
    dense_parameters,
    expert_file,
    nf4_packs,
    split_experts,
    store_bytes,
    ties_embeddings,
)
from offspec.store.nf4 import NF4_BLOCKSIZE, quantize_nf4

JOURNAL = "journal.json"
CONVERT_INFO = "convert.json"  # key, source and options of a finished store
Loader = Callable[..., torch.Tensor]  # loader(dtype=None): the tensor (a GGUF source may cast it as it goes)
__all__ = ["convert_model", "layer_file", "split_layer_name", "source_key", "write_blob"]


def check_source(src: str | Path) -> Path:
    """The absolute source path; ModelError if missing or neither a folder nor a .gguf file."""
    path = Path(src).expanduser()
    if not path.exists():
        raise ModelError(f"model path not found: {src}")
    path = path.resolve()
    if path.is_file() and path.suffix.lower() != ".gguf":
        raise ModelError(f"{path}: not a model folder, .gguf file or offspec store")
    return path


def source_files(src: Path) -> list[Path]:
    """The files whose content defines a source: the .gguf (all parts if split), or the folder's top-level files."""
    if src.is_file():
        from offspec.store.gguf import gguf_parts

        return list(gguf_parts(src))
    return sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith("."))


def source_key(src: str | Path, bits: int, dtype: str) -> str:
    """sha256 over the absolute source path, its files' sizes and mtimes, bits, dtype and format."""
    src = Path(src).expanduser().resolve()
    files = []
    for p in source_files(src):
        st = p.stat()  # follows symlinks (hub snapshots link into blobs/)
        files.append([p.name, st.st_size, st.st_mtime_ns])
    blob = json.dumps({"source": str(src), "files": files, "bits": bits, "dtype": dtype, "format": FORMAT_VERSION})
    return hashlib.sha256(blob.encode()).hexdigest()


def layer_file(i: int) -> str:
    """The blob path of decoder layer i, relative to the store folder."""
    return f"layers/layer_{i:03d}.bin"


def choose_bits(meta: SourceMetadata, bits: int | None) -> int:
    """bits as asked, else the source's default (NF4 for GGUFs quantized below 8 bits, else 16)."""
    return meta.default_bits if bits is None else bits


def describe_store(bits: int, dtype: str) -> str:
    """What a store holds, in words: 'NF4 weights (bfloat16 for the rest)' or 'bfloat16 weights'."""
    return f"NF4 weights ({dtype} for the rest)" if bits == 4 else f"{dtype} weights"


def prepared(loaders: dict[str, Loader], dtype: str, bits: int, expert: bool = False,
             unpacked: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor, QuantInfo | None]]:
    """(name, tensor, quant) in store order, loading one tensor at a time: floats cast to dtype; with bits=4
    every 2-D weight (every 2-D matrix of an expert) packed as NF4 (followed by its float32 "<name>.absmax"),
    but those `unpacked` names (weights of modules other than linear layers, such as routers)."""
    torch_dtype = DTYPES[dtype]
    for name in sorted(loaders):
        t = loaders[name](torch_dtype)
        if t.is_floating_point():
            t = t.to(torch_dtype)
        if bits == 4 and nf4_packs(name, t.ndim, expert) and t.is_floating_point() and name not in unpacked:
            shape = tuple(t.shape)
            packed, absmax = quantize_nf4(t)
            del t
            yield name, packed, QuantInfo("nf4", NF4_BLOCKSIZE, shape, dtype)
            del packed  # hold nothing across a yield: the writer frees each tensor once written
            yield name + ".absmax", absmax, None
            del absmax
        else:
            yield name, t.contiguous(), None
            del t


def write_blob(store_dir: Path, rel: str, tensors: Iterable[tuple[str, torch.Tensor, QuantInfo | None]]) -> BlobEntry:
    """Stream tensors into a blob, each ALIGN-aligned, hashing as it goes (tmp file + fsync + rename)."""
    path = store_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    digest = hashlib.sha256()
    entries: dict[str, TensorEntry] = {}
    offset = 0
    with open(tmp, "wb") as f:
        for name, t, quant in tensors:
            data = memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            entries[name] = TensorEntry(name, DTYPE_NAMES[t.dtype], tuple(t.shape), offset, len(data), quant)
            f.write(data)
            digest.update(data)
            end = align_up(offset + len(data))
            pad = bytes(end - offset - len(data))
            f.write(pad)
            digest.update(pad)
            offset = end
            del data, t
        if offset == 0:
            f.write(bytes(ALIGN))
            digest.update(bytes(ALIGN))
            offset = ALIGN
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return BlobEntry(rel, offset, digest.hexdigest(), entries)


def _write_json_atomic(path: Path, obj: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def store_key(store_dir: Path) -> str | None:
    """The source key a finished store was converted with, or None."""
    try:
        return json.loads((store_dir / CONVERT_INFO).read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def _check_out_free(out: Path, key: str, src: Path, bits: int, dtype: str) -> bool:
    """True if out already is the finished store for key; StoreError if out holds something else."""
    if not out.exists():
        return False
    if (out / MANIFEST).is_file() and store_key(out) == key:
        read_manifest(out)  # raises StoreError if the manifest is unreadable
        return True
    if out.is_dir() and not any(out.iterdir()):
        return False
    if (out / MANIFEST).is_file():
        try:
            m = read_manifest(out)
            same = (m.source, m.bits, m.dtype) == (str(src), bits, dtype)
            what = f"a conversion of {src} made before it changed" if same else f"a store of {m.source} (bits={m.bits}, dtype={m.dtype})"
        except StoreError:
            what = "a broken store"
        raise StoreError(f"{out} already holds {what}; remove it or choose another output folder")
    raise StoreError(f"{out} already exists and is not an offspec store; remove it or choose another output folder")


def _read_journal(partial: Path, key: str) -> dict | None:
    try:
        journal = json.loads((partial / JOURNAL).read_text())
        return journal if journal.get("key") == key else None
    except (OSError, ValueError):
        return None


def _open_journal(partial: Path, key: str) -> dict:
    """The journal of an interrupted conversion with the same key, or a fresh one (partial cleared)."""
    journal = _read_journal(partial, key)
    if journal is not None:
        return journal
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    journal = {"key": key, "layers": {}, "resident": None}
    _write_json_atomic(partial / JOURNAL, journal)
    return journal


def _done(partial: Path, entry: dict | None) -> BlobEntry | None:
    """The journaled blob if its file is still there with the recorded size."""
    if not entry:
        return None
    blob = _blob_from_dict(entry)
    path = partial / blob.file
    return blob if path.is_file() and path.stat().st_size == blob.size else None


def _layer_done(partial: Path, journal: dict, i: int) -> bool:
    """Layer i's blob and all its expert blobs are journaled and still there."""
    if _done(partial, journal["layers"].get(str(i))) is None:
        return False
    return all(_done(partial, e) is not None for e in journal.get("experts", {}).get(str(i), []))


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding path (tests replace this function)."""
    return shutil.disk_usage(path).free


def format_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def _check_disk_space(out: Path, partial: Path, expected: Manifest, journal: dict | None) -> None:
    """StoreError (one line) if the filesystem of out lacks room for what is still to be written."""
    done = 0
    if journal is not None:
        done = sum(b.size for b in (_done(partial, e) for e in journal["layers"].values()) if b is not None)
        done += sum(b.size for ex in journal.get("experts", {}).values() for b in (_done(partial, e) for e in ex)
                    if b is not None)
        if _done(partial, journal.get("resident")) is not None:
            done += expected.resident.size
    needed = store_bytes(expected) - done + (64 << 20)  # metadata files, tokenizer, journal
    free = free_bytes(out.parent)
    if free < needed:
        raise StoreError(f"not enough disk space for the store {out}: it needs {format_size(needed)}, "
                         f"{format_size(free)} free on {out.parent}")


class FolderSource:
    """A Hugging Face folder read lazily, one tensor at a time, with safetensors.safe_open."""

    COPY_PATTERNS = (
        "generation_config.json", "tokenizer*.json", "tokenizer.model", "special_tokens_map.json",
        "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "vocab.txt",
        "merges.txt", "*.tiktoken", "spiece.model", "LICENSE*",
    )  # fmt: skip

    def __init__(self, src: Path) -> None:
        self.src = src
        self.config = read_config(src)
        self.model_type = str(self.config["model_type"])
        self.num_layers = num_layers_of(self.config, str(src))
        self._stack = contextlib.ExitStack()
        try:
            naming = checkpoint_naming(src)
            self._where, self._experts = self._open_shards(naming)
            self._layers, self._resident = group_names(list(self._where), self.num_layers, str(src),
                                                       expected=dense_parameters(naming), known=naming.state)
        except BaseException:
            self._stack.close()
            raise
        self.tie_word_embeddings = ties_embeddings(self.config, self._resident)
        if self.tie_word_embeddings:
            self._resident.pop("lm_head.weight", None)

    def _open(self, file: Path):
        from safetensors import safe_open

        try:
            return self._stack.enter_context(safe_open(str(file), framework="pt"))
        except Exception as exc:  # safetensors raises its own SafetensorError
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelError(f"{file}: unreadable safetensors file ({msg}); it may be truncated or corrupt") from None

    def _open_shards(self, naming) -> tuple[dict[str, tuple[object, Path, str]], dict]:
        """Map every tensor's model name to (open handle, file, checkpoint name), routed experts' tensors apart
        ({layer: {expert: {name: ExpertSlice}}}); follows model.safetensors.index.json if present."""
        index = self.src / "model.safetensors.index.json"
        keys: dict[str, tuple[object, Path]] = {}
        for file in safetensors_files(self.src):
            handle = self._open(file)
            for k in handle.keys():
                keys[k] = (handle, file)
        if index.is_file():
            for name, fname in json.loads(index.read_text())["weight_map"].items():
                if name not in keys:
                    raise ModelError(f"{self.src / fname}: tensor {name} (listed in {index.name}) is missing")
        self._keys = keys
        rest, experts = split_experts(list(keys), naming, str(self.src))
        return {naming.rename(k): (*keys[k], k) for k in rest}, experts

    def _loader(self, name: str) -> Loader:
        def load(dtype: torch.dtype | None = None) -> torch.Tensor:  # a view of the file; cast by the caller
            handle, file, key = self._where[name]
            try:
                return handle.get_tensor(key)
            except Exception as exc:
                raise ModelError(f"{file}: cannot read tensor {name} ({exc}); the file may be corrupt") from None

        return load

    def layer_tensors(self, i: int) -> dict[str, Loader]:
        """Loaders of decoder layer i's tensors but its routed experts', by name relative to the layer."""
        return {rel: self._loader(full) for rel, full in self._layers[i].items()}

    def expert_tensors(self, i: int) -> dict[int, dict[str, Loader]]:
        """Loaders of each routed expert's slices of layer i's fused experts parameters ({} for a dense layer)."""
        return {e: {rel: self._slice_loader(sl) for rel, sl in ex.items()} for e, ex in self._experts.get(i, {}).items()}

    def _slice_loader(self, sl: ExpertSlice) -> Loader:
        def load(dtype: torch.dtype | None = None) -> torch.Tensor:  # one expert's rows only, then its parts joined
            parts = []
            for key, row in sl.parts:
                handle, file = self._keys[key]
                try:
                    parts.append(handle.get_tensor(key) if row is None else handle.get_slice(key)[row])
                except Exception as exc:
                    raise ModelError(f"{file}: cannot read tensor {key} ({exc}); the file may be corrupt") from None
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

        return load

    def resident_tensors(self) -> dict[str, Loader]:
        """Loaders of the text model's other tensors by their text-model names (lm_head left out when tied)."""
        return {name: self._loader(full) for name, full in self._resident.items()}

    def write_metadata(self, dest: Path) -> None:
        """Write config.json, generation config and tokenizer files into dest."""
        config = dict(self.config)
        if config.get("tie_word_embeddings") != self.tie_word_embeddings:
            config["tie_word_embeddings"] = self.tie_word_embeddings
        _write_json_atomic(dest / "config.json", config)
        for pattern in self.COPY_PATTERNS:
            for p in self.src.glob(pattern):
                if p.is_file():
                    shutil.copyfile(p, dest / p.name)
        extra = self.src / "additional_chat_templates"
        if extra.is_dir():
            shutil.copytree(extra, dest / extra.name, dirs_exist_ok=True)

    def __enter__(self) -> "FolderSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def open_source(src: Path):
    """A lazy reader: a HF folder (safetensors views) or a GGUF file (one dequantized tensor at a time)."""
    if src.is_file():
        from offspec.store.gguf import GgufSource

        return GgufSource(src)
    return FolderSource(src)


class ConversionInterrupted(KeyboardInterrupt):
    """Ctrl-C during a conversion; its message says what was done and that rerunning resumes."""


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    bits: int
    dtype: str
    size_bytes: int
    converted: bool  # False: an existing finished store was reused


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
        TextColumn("{task.fields[tensors]}/{task.fields[of]} tensors"), TimeElapsedColumn(),
        console=Console(stderr=True), transient=True, disable=not enabled,
    )  # fmt: skip


def convert_model(src: str | Path, out: str | Path, bits: int | None = None, dtype: str = "bfloat16",
                  progress: bool = True, on_choice: Callable[[str], None] | None = None) -> Path:
    """Convert src (HF folder or .gguf) into the store folder out; returns out (reused if already done).

    bits None: NF4 for GGUFs quantized below 8 bits, else 16; on_choice(line) is told what was chosen and why."""
    return convert(src, out, bits, dtype, progress, on_choice).path


def convert(src: str | Path, out: str | Path, bits: int | None = None, dtype: str = "bfloat16",
            progress: bool = True, on_choice: Callable[[str], None] | None = None,
            meta: SourceMetadata | None = None) -> ConvertResult:
    """convert_model with the details: the chosen bits, the store size, and whether anything was converted."""
    check_bits_dtype(bits, dtype)
    src = check_source(src)
    out = Path(out).expanduser().absolute()
    meta = meta or read_source_metadata(src)
    chosen = choose_bits(meta, bits)
    expected = estimate_manifest(meta, chosen, dtype)
    if bits is None and meta.kind == "gguf" and on_choice is not None:
        other = 16 if chosen == 4 else 4
        on_choice(f"store: {describe_store(chosen, dtype)}, because {meta.bits_reason}; "
                  f"{format_size(store_bytes(expected))} (--bits {other} for {describe_store(other, dtype)})")
    key = source_key(src, chosen, dtype)
    partial = out.with_name(out.name + ".partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(out):
            if _check_out_free(out, key, src, chosen, dtype):
                return ConvertResult(out, chosen, dtype, store_bytes(read_manifest(out)), False)
            _check_disk_space(out, partial, expected, _read_journal(partial, key))
            from offspec.console import phase

            with phase(f"reading {src.name} (config and tokenizer)", enabled=progress):
                source = open_source(src)
            with source:
                journal = _open_journal(partial, key)
                try:
                    _convert(source, partial, journal, chosen, dtype, progress, meta)
                except KeyboardInterrupt:
                    done = sum(1 for i in range(source.num_layers) if _layer_done(partial, journal, i))
                    raise ConversionInterrupted(
                        f"{done} of {source.num_layers} layers of {out.name} converted (in {partial}); "
                        "run the same command again to resume") from None
                manifest = Manifest(
                    format_version=FORMAT_VERSION,
                    model_type=source.model_type,
                    bits=chosen,
                    dtype=dtype,
                    num_layers=source.num_layers,
                    source=str(src),
                    layers=tuple(_blob_from_dict(journal["layers"][str(i)]) for i in range(source.num_layers)),
                    resident=_blob_from_dict(journal["resident"]),
                    tie_word_embeddings=source.tie_word_embeddings,
                    experts=_journaled_experts(journal, source.num_layers),
                )
                source.write_metadata(partial)
            info = {"key": key, "source": str(src), "bits": chosen, "dtype": dtype, "created": time.time()}
            _write_json_atomic(partial / CONVERT_INFO, info)
            _write_json_atomic(partial / MANIFEST, manifest.to_json())
            (partial / JOURNAL).unlink()
            for sub in [partial / "layers", *(p for p in (partial / "layers").iterdir() if p.is_dir())]:
                _fsync_dir(sub)
            _fsync_dir(partial)
            if out.exists():
                out.rmdir()  # an empty folder (checked above)
            os.replace(partial, out)
            _fsync_dir(out.parent)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            shutil.rmtree(partial, ignore_errors=True)  # a half-written store would only keep the disk full
            raise StoreError(f"the disk filled up while writing the store {out} "
                             f"(needs {format_size(store_bytes(expected))}); free some space and run again") from None
        raise StoreError(f"cannot write the store {out}: {exc.strerror or exc}") from None
    return ConvertResult(out, chosen, dtype, store_bytes(manifest), True)


def _layer_parts(source, i: int, meta: SourceMetadata) -> tuple[dict[str, Loader], dict[int, dict[str, Loader]],
                                                                  frozenset[str]]:
    """Layer i of a source as the converter writes it: (its tensors but the routed experts', {expert: its slices
    of the fused experts parameters}, the 2-D weights an NF4 store keeps 16-bit).

    A folder source splits its experts itself; another source (a GGUF) names one tensor per expert as a Hugging
    Face checkpoint of its family does, and they are joined per expert here as transformers joins them on load."""
    unpacked = meta.unpacked[i] if i < len(meta.unpacked) else frozenset()
    if hasattr(source, "expert_tensors"):
        return source.layer_tensors(i), source.expert_tensors(i), unpacked
    loaders = source.layer_tensors(i)
    names = _checkpoint_names(source)
    if names is None:
        return loaders, {}, unpacked
    prefix = f"model.layers.{i}."
    unpacked = unpacked | {n[len(prefix):] for n in names.not_linear if n.startswith(prefix)}
    if not names.expert_params:
        return loaders, {}, unpacked
    dense: dict[str, Loader] = {}
    pieces: dict[tuple[str, int], dict[int, Loader]] = {}
    for rel, load in loaders.items():
        piece = names.expert_piece(prefix + rel)
        if piece is None:
            dense[rel] = load
            continue
        full, e, k, _ = piece
        pieces.setdefault((names.expert_params[full][1], e), {})[k] = load
    experts: dict[int, dict[str, Loader]] = {}
    for (rel, e), parts in pieces.items():
        ordered = [parts[k] for k in sorted(parts)]
        experts.setdefault(e, {})[rel] = (ordered[0] if len(ordered) == 1 else
                                          lambda dtype=None, ordered=ordered: torch.cat([ld(dtype) for ld in ordered]))
    return dense, experts, unpacked


_NAMES: dict[int, object] = {}


def _checkpoint_names(source):
    """transformers' checkpoint naming of a source's config (None for a source without a transformers config)."""
    config = getattr(source, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    if id(source) not in _NAMES:
        from offspec.transformers_contract import CheckpointNames, ContractError

        try:
            _NAMES.clear()
            _NAMES[id(source)] = CheckpointNames(config)
        except ContractError:
            return None
    return _NAMES[id(source)]


def _journaled_experts(journal: dict, n: int) -> tuple[tuple[BlobEntry, ...], ...]:
    """The manifest's expert blobs per layer (() for a dense model)."""
    experts = tuple(tuple(_blob_from_dict(b) for b in journal.get("experts", {}).get(str(i), [])) for i in range(n))
    return experts if any(experts) else ()


def _convert(source, partial: Path, journal: dict, bits: int, dtype: str, progress: bool,
             meta: SourceMetadata) -> None:
    """Write every missing layer blob and the resident blob, journaling each one."""
    n = source.num_layers
    done = [i for i in range(n) if _layer_done(partial, journal, i)]
    layer_src = [meta.layer_source_bytes(i) for i in range(n)]
    with _progress(progress) as bar:
        task = bar.add_task("converting", total=meta.source_bytes, completed=sum(layer_src[i] for i in done),
                            tensors=sum(meta.layer_tensor_count(i) for i in done), of=meta.tensor_count)
        for i in range(n):
            if i in done:
                continue
            dense, experts, unpacked = _layer_parts(source, i, meta)
            blobs = [asdict(write_blob(partial, expert_file(i, e), prepared(experts[e], dtype, bits, expert=True)))
                     for e in sorted(experts)]
            entry = write_blob(partial, layer_file(i), prepared(dense, dtype, bits, unpacked=unpacked))
            journal["layers"][str(i)] = asdict(entry)
            journal.setdefault("experts", {})[str(i)] = blobs
            _write_json_atomic(partial / JOURNAL, journal)
            bar.update(task, advance=layer_src[i], tensors=bar.tasks[0].fields["tensors"] + meta.layer_tensor_count(i))
        if _done(partial, journal.get("resident")) is None:
            resident = write_blob(partial, RESIDENT_FILE, prepared(source.resident_tensors(), dtype, 16))
            journal["resident"] = asdict(resident)
            _write_json_atomic(partial / JOURNAL, journal)
