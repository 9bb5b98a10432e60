"""Convert a Hugging Face folder or a GGUF file into a layer store, atomically and resumably.

Work goes into `<out>.partial/`; a journal there records each finished layer blob, so an interrupted
conversion resumes where it stopped. The finished folder is renamed to `<out>` in one step.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch

from offspec.models.registry import check_supported
from offspec.errors import ConfigError, ModelError, StoreError
from offspec.store.manifest import (
    DTYPES,
    FORMAT_VERSION,
    MANIFEST,
    RESIDENT_FILE,
    BlobEntry,
    Manifest,
    QuantInfo,
    _blob_from_dict,
    layout_blob,
    read_manifest,
)
from offspec.store.nf4 import NF4_BLOCKSIZE, quantize_nf4

FLOAT_DTYPES = ("bfloat16", "float16", "float32")
JOURNAL = "journal.json"
CONVERT_INFO = "convert.json"  # key, source and options of a finished store
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def check_options(bits: int, dtype: str) -> None:
    """ConfigError unless bits is 4 or 16 and dtype a float dtype name."""
    if bits not in (4, 16):
        raise ConfigError(f"--bits must be 4 or 16, got {bits}")
    if dtype not in FLOAT_DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")


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
    """The files whose content defines a source: the .gguf itself, or the folder's top-level files."""
    if src.is_file():
        return [src]
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


def split_layer_name(name: str) -> tuple[int, str] | None:
    """(layer index, relative name) for "model.layers.{i}.rest", else None."""
    m = _LAYER_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def prepare_tensors(
    tensors: dict[str, torch.Tensor], dtype: str, bits: int
) -> tuple[dict[str, torch.Tensor], dict[str, QuantInfo]]:
    """Cast float tensors to dtype (sorted by name); with bits=4 pack every 2-D weight as NF4 + absmax."""
    out: dict[str, torch.Tensor] = {}
    quant: dict[str, QuantInfo] = {}
    torch_dtype = DTYPES[dtype]
    for name in sorted(tensors):
        t = tensors[name]
        if t.is_floating_point():
            t = t.to(torch_dtype)
        if bits == 4 and t.ndim == 2 and name.endswith(".weight") and t.is_floating_point():
            packed, absmax = quantize_nf4(t)
            out[name] = packed
            out[name + ".absmax"] = absmax
            quant[name] = QuantInfo("nf4", NF4_BLOCKSIZE, tuple(t.shape), dtype)
        else:
            out[name] = t.contiguous()
    return out, quant


def write_blob(store_dir: Path, rel: str, tensors: dict[str, torch.Tensor], quant: dict[str, QuantInfo]) -> BlobEntry:
    """Lay tensors out with layout_blob and write them with one sequential write (tmp + rename)."""
    entries, size = layout_blob(tensors, quant)
    buf = torch.zeros(size, dtype=torch.uint8)
    for name, t in tensors.items():
        e = entries[name]
        buf[e.offset : e.offset + e.nbytes].copy_(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8))
    data = memoryview(buf.numpy())
    digest = hashlib.sha256(data).hexdigest()
    path = store_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return BlobEntry(rel, size, digest, entries)


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


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on `.<out>.lock` so two processes never convert into one folder."""
    lock = out.with_name(f".{out.name}.lock")
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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


def _open_journal(partial: Path, key: str) -> dict:
    """The journal of an interrupted conversion with the same key, or a fresh one (partial cleared)."""
    path = partial / JOURNAL
    try:
        journal = json.loads(path.read_text())
        if journal.get("key") == key:
            return journal
    except (OSError, ValueError):
        pass
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    journal = {"key": key, "layers": {}, "resident": None}
    _write_json_atomic(path, journal)
    return journal


def _done(partial: Path, entry: dict | None) -> BlobEntry | None:
    """The journaled blob if its file is still there with the recorded size."""
    if not entry:
        return None
    blob = _blob_from_dict(entry)
    path = partial / blob.file
    return blob if path.is_file() and path.stat().st_size == blob.size else None


def _progress(enabled: bool, unit: str = "layers"):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not enabled,
    )


class ModelSource(contextlib.AbstractContextManager):
    """What the converter needs from a source: facts, tensors by layer, and the files to copy."""

    model_type: str
    num_layers: int
    tie_word_embeddings: bool

    def layer_tensors(self, i: int) -> dict[str, torch.Tensor]:
        """Tensors of decoder layer i, by name relative to the layer."""
        raise NotImplementedError

    def resident_tensors(self) -> dict[str, torch.Tensor]:
        """Every non-layer tensor by full name (lm_head left out when tied)."""
        raise NotImplementedError

    def write_metadata(self, dest: Path) -> None:
        """Write config.json, generation config and tokenizer files into dest."""
        raise NotImplementedError

    def __exit__(self, *exc: object) -> None:
        return None


def _group_names(names: list[str], num_layers: int, where: str) -> tuple[dict[int, dict[str, str]], list[str]]:
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


def _num_layers(config: dict, where: str) -> int:
    n = config.get("num_hidden_layers", (config.get("text_config") or {}).get("num_hidden_layers"))
    if not isinstance(n, int) or n < 1:
        raise ModelError(f"{where}: config.json has no valid num_hidden_layers")
    return n


COPY_PATTERNS = (
    "generation_config.json", "tokenizer*.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "vocab.txt",
    "merges.txt", "*.tiktoken", "spiece.model", "LICENSE*",
)  # fmt: skip


class FolderSource(ModelSource):
    """A Hugging Face folder read lazily, one layer at a time, with safetensors.safe_open."""

    def __init__(self, src: Path) -> None:
        self.src = src
        cfg_path = src / "config.json"
        if not cfg_path.is_file():
            raise ModelError(f"{src}: no config.json, not a Hugging Face model folder")
        try:
            self.config = json.loads(cfg_path.read_text())
        except ValueError as exc:
            raise ModelError(f"{cfg_path}: not valid JSON ({exc})") from None
        self.model_type = str(self.config.get("model_type") or "")
        if not self.model_type:
            raise ModelError(f"{cfg_path}: no model_type")
        check_supported(self.model_type)
        self.num_layers = _num_layers(self.config, str(src))
        self._stack = contextlib.ExitStack()
        try:
            self._where = self._open_shards()
            self._layers, self._resident = _group_names(list(self._where), self.num_layers, str(src))
        except BaseException:
            self._stack.close()
            raise
        tie = self.config.get("tie_word_embeddings")
        self.tie_word_embeddings = bool(tie) or "lm_head.weight" not in self._where
        if self.tie_word_embeddings and "lm_head.weight" in self._resident:
            self._resident.remove("lm_head.weight")

    def _open(self, file: Path):
        from safetensors import safe_open

        try:
            return self._stack.enter_context(safe_open(str(file), framework="pt"))
        except Exception as exc:  # safetensors raises its own SafetensorError
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelError(f"{file}: unreadable safetensors file ({msg}); it may be truncated or corrupt") from None

    def _open_shards(self) -> dict[str, tuple[object, Path]]:
        """Map every tensor name to (open handle, file); follows model.safetensors.index.json if present."""
        index = self.src / "model.safetensors.index.json"
        where: dict[str, tuple[object, Path]] = {}
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ModelError(f"{index}: corrupt index ({type(exc).__name__}: {exc})") from None
            for fname in sorted(set(weight_map.values())):
                file = self.src / fname
                if not file.is_file():
                    raise ModelError(f"{self.src}: shard {fname} (listed in {index.name}) is missing")
                handle = self._open(file)
                for k in handle.keys():
                    where[k] = (handle, file)
            for name, fname in weight_map.items():
                if name not in where:
                    raise ModelError(f"{self.src / fname}: tensor {name} (listed in {index.name}) is missing")
            return where
        files = sorted(self.src.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{self.src}: no *.safetensors files (only safetensors folders and .gguf files are supported)")
        for file in files:
            handle = self._open(file)
            for k in handle.keys():
                where[k] = (handle, file)
        return where

    def _get(self, name: str) -> torch.Tensor:
        handle, file = self._where[name]
        try:
            return handle.get_tensor(name)
        except Exception as exc:
            raise ModelError(f"{file}: cannot read tensor {name} ({exc}); the file may be corrupt") from None

    def layer_tensors(self, i: int) -> dict[str, torch.Tensor]:
        return {rel: self._get(full) for rel, full in self._layers[i].items()}

    def resident_tensors(self) -> dict[str, torch.Tensor]:
        return {name: self._get(name) for name in self._resident}

    def write_metadata(self, dest: Path) -> None:
        config = dict(self.config)
        if config.get("tie_word_embeddings") != self.tie_word_embeddings:
            config["tie_word_embeddings"] = self.tie_word_embeddings
        _write_json_atomic(dest / "config.json", config)
        for pattern in COPY_PATTERNS:
            for p in self.src.glob(pattern):
                if p.is_file():
                    shutil.copyfile(p, dest / p.name)
        extra = self.src / "additional_chat_templates"
        if extra.is_dir():
            shutil.copytree(extra, dest / extra.name, dirs_exist_ok=True)

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


@contextlib.contextmanager
def _gguf_reading(on_tensor: Callable[[int], None] | None = None) -> Iterator[None]:
    """transformers quiet while it loads a GGUF file; its reader's bare tqdm calls on_tensor(total) per tensor."""
    from offspec.console import quiet_transformers

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils

        real_tqdm = gguf_utils.tqdm
    except (ImportError, AttributeError):
        gguf_utils, real_tqdm = None, None

    def counting_tqdm(iterable=None, *args, **kwargs):
        if iterable is None or on_tensor is None:
            return real_tqdm(iterable, *args, **{**kwargs, "disable": True})
        total = len(iterable) if hasattr(iterable, "__len__") else 0

        def counted():
            for item in iterable:
                on_tensor(total)
                yield item

        return counted()

    if gguf_utils is not None:
        gguf_utils.tqdm = counting_tqdm
    try:
        with quiet_transformers():
            yield
    finally:
        if gguf_utils is not None:
            gguf_utils.tqdm = real_tqdm


class GgufSource(ModelSource):
    """A .gguf file, loaded and dequantized to torch_dtype by transformers (whole model in memory)."""

    def __init__(self, src: Path, torch_dtype: torch.dtype, progress: bool = True) -> None:
        self.src = src
        with _progress(progress, unit="tensors") as bar:
            task = bar.add_task(f"loading {src.name}", total=None)

            def on_tensor(total: int) -> None:
                bar.update(task, total=total or None, advance=1)

            with _gguf_reading(on_tensor):
                self.model, self.tokenizer = self._load(src, torch_dtype)
        self.config = self.model.config
        self.model_type = str(self.config.model_type)
        check_supported(self.model_type)
        self.num_layers = _num_layers(self.config.to_dict(), str(src))
        self.state = self.model.state_dict()
        self._layers, resident = _group_names(list(self.state), self.num_layers, str(src))
        self.tie_word_embeddings = bool(getattr(self.config, "tie_word_embeddings", False)) or "lm_head.weight" not in self.state
        self._resident = [n for n in resident if not (n == "lm_head.weight" and self.tie_word_embeddings)]

    @staticmethod
    def _load(src: Path, torch_dtype: torch.dtype):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs: dict = {}
        try:
            from transformers import GgufConfig

            kwargs["quantization_config"] = GgufConfig(dequantize=True)  # plain nn.Linear weights, no kernels
        except ImportError:
            pass
        try:
            model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch_dtype, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{src}: cannot load GGUF file ({msg})") from None
        return model, tokenizer

    def layer_tensors(self, i: int) -> dict[str, torch.Tensor]:
        return {rel: self.state[full] for rel, full in self._layers[i].items()}

    def resident_tensors(self) -> dict[str, torch.Tensor]:
        return {name: self.state[name] for name in self._resident}

    def write_metadata(self, dest: Path) -> None:
        config = self.config
        if "quantization_config" in config.__dict__:
            del config.quantization_config
        config.tie_word_embeddings = self.tie_word_embeddings
        config.save_pretrained(str(dest))
        if getattr(self.model, "generation_config", None) is not None:
            self.model.generation_config.save_pretrained(str(dest))
        self.tokenizer.save_pretrained(str(dest))

    def __exit__(self, *exc: object) -> None:
        self.state = {}
        self.model = None


def open_source(src: Path, dtype: str, progress: bool = True) -> ModelSource:
    """A reader for a HF folder (lazy, per layer) or a GGUF file (loaded and dequantized by transformers)."""
    return GgufSource(src, DTYPES[dtype], progress) if src.is_file() else FolderSource(src)


def convert_model(src: str | Path, out: str | Path, bits: int = 16, dtype: str = "bfloat16", progress: bool = True) -> Path:
    """Convert src (HF folder or .gguf) into the store folder out; returns out (reused if already done)."""
    check_options(bits, dtype)
    src = check_source(src)
    out = Path(out).expanduser().absolute()
    key = source_key(src, bits, dtype)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(out):
            if _check_out_free(out, key, src, bits, dtype):
                return out
            with open_source(src, dtype, progress) as source:
                partial = out.with_name(out.name + ".partial")
                journal = _open_journal(partial, key)
                _convert(source, partial, journal, bits, dtype, progress)
                manifest = Manifest(
                    format_version=FORMAT_VERSION,
                    model_type=source.model_type,
                    bits=bits,
                    dtype=dtype,
                    num_layers=source.num_layers,
                    source=str(src),
                    layers=tuple(_blob_from_dict(journal["layers"][str(i)]) for i in range(source.num_layers)),
                    resident=_blob_from_dict(journal["resident"]),
                    tie_word_embeddings=source.tie_word_embeddings,
                )
                source.write_metadata(partial)
            info = {"key": key, "source": str(src), "bits": bits, "dtype": dtype, "created": time.time()}
            _write_json_atomic(partial / CONVERT_INFO, info)
            _write_json_atomic(partial / MANIFEST, manifest.to_json())
            (partial / JOURNAL).unlink()
            _fsync_dir(partial / "layers")
            _fsync_dir(partial)
            if out.exists():
                out.rmdir()  # an empty folder (checked above)
            os.replace(partial, out)
            _fsync_dir(out.parent)
    except OSError as exc:
        raise StoreError(f"cannot write the store {out}: {exc.strerror or exc}") from None
    return out


def _convert(source: ModelSource, partial: Path, journal: dict, bits: int, dtype: str, progress: bool) -> None:
    """Write every missing layer blob and the resident blob, journaling each one."""
    n = source.num_layers
    todo = [i for i in range(n) if _done(partial, journal["layers"].get(str(i))) is None]
    with _progress(progress) as bar:
        task = bar.add_task("converting", total=n, completed=n - len(todo))
        for i in todo:
            tensors, quant = prepare_tensors(source.layer_tensors(i), dtype, bits)
            entry = write_blob(partial, layer_file(i), tensors, quant)
            journal["layers"][str(i)] = asdict(entry)
            _write_json_atomic(partial / JOURNAL, journal)
            bar.advance(task)
        if _done(partial, journal.get("resident")) is None:
            tensors, quant = prepare_tensors(source.resident_tensors(), dtype, 16)
            journal["resident"] = asdict(write_blob(partial, RESIDENT_FILE, tensors, quant))
            _write_json_atomic(partial / JOURNAL, journal)
