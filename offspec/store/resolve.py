"""Turn what the user passed as a model (store, store name, HF folder, .gguf file or hub id) into a store folder."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from offspec import console
from offspec.config import check_bits_dtype
from offspec.errors import ModelError, StoreError
from offspec.paths import home_is_writable, offspec_home
from offspec.store.convert import choose_bits, convert, format_size, source_key, store_key
from offspec.store.locks import hold_shared
from offspec.store.manifest import MANIFEST, Manifest, read_manifest
from offspec.store.metadata import read_source_metadata

HUB_HOST = ("huggingface.co", 443)
HUB_TIMEOUT_S = 3.0
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt", "*.tiktoken"]
_SHORT_DTYPE = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


def stores_dir(home: Path | None = None) -> Path:
    """Where converted stores are cached."""
    return (home or offspec_home()) / "stores"


def is_store(path: Path) -> bool:
    """True if path is a folder holding a manifest.json."""
    return path.is_dir() and (path / MANIFEST).is_file()


def store_tag(bits: int, dtype: str) -> str:
    """What a store holds, for its name: 'nf4-bf16' (NF4 weights, bf16 rest) or 'bf16' / 'f16' / 'f32'."""
    short = _SHORT_DTYPE.get(dtype, dtype)
    return f"nf4-{short}" if bits == 4 else short


def cached_store_path(src: Path, bits: int, dtype: str, home: Path | None = None, name: str | None = None) -> Path:
    """The cache folder a source converts into: <name>-<nf4-bf16|bf16|f16|f32>-<key12>."""
    name = name or (src.stem if src.is_file() else src.name)
    return stores_dir(home) / f"{name}-{store_tag(bits, dtype)}-{source_key(src, bits, dtype)[:12]}"


def find_named(model: str, home: Path | None = None) -> Path | None:
    """A path for a name printed by `offspec models`: a store in stores/, or a file or folder under the home."""
    if not model or model.startswith(("/", "~", ".")) or "\x00" in model:
        return None
    for candidate in (stores_dir(home) / model, (home or offspec_home()) / model):
        if candidate.exists():
            return candidate
    return None


def locate_store(model: str, home: Path | None = None) -> Path | None:
    """The existing path a model argument names (a path or a name from `offspec models`), without the hub."""
    path = Path(model).expanduser()
    if path.exists():
        return path.resolve()
    named = find_named(model, home)
    return named.resolve() if named is not None else None


def locate_model(model: str, home: Path | None = None) -> tuple[Path, str | None]:
    """(existing path, cache name or None) for a path, a name from `offspec models` or a hub id."""
    path = Path(model).expanduser()
    if path.exists():
        return path.resolve(), None
    named = find_named(model, home)
    if named is not None:
        return named.resolve(), None
    if _HUB_ID.match(model) and not model.startswith((".", "~")):
        return _hub_snapshot(model), model.replace("/", "--")
    raise ModelError(f"model path not found: {model}")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout_s: float = HUB_TIMEOUT_S) -> bool:
    """True if a TCP connection to huggingface.co:443 opens within timeout_s."""
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout_s):
            return True
    except OSError:
        return False


def _hub_snapshot(model_id: str) -> Path:
    """A local snapshot of a hub repo: from the HF cache, else downloaded if the hub is reachable."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelError(f"{model_id} is not a local path and huggingface_hub is not installed") from None
    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:
        pass  # not cached (LocalEntryNotFoundError) or an unusable cache entry
    if _offline() or not hub_reachable():
        raise ModelError(
            f"{model_id} is not a local path and the hub cannot be reached (offline); "
            "pass a local folder, .gguf file or store"
        )
    try:
        return Path(snapshot_download(model_id, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot download {model_id} from the hub: {msg}") from None


def resolve_model(
    model: str, bits: int | None = None, dtype: str = "bfloat16", home: Path | None = None, progress: bool = True
) -> Path:
    """A store folder for model: the store itself, or a cached conversion of a folder, .gguf or hub id.

    bits None: chosen from the source (NF4 for GGUFs quantized below 8 bits, else 16). A complete store is
    read under a shared lock, so `offspec rm` / `prune` leave it alone while this process runs."""
    check_bits_dtype(bits, dtype)
    path, name = locate_model(model, home)
    if is_store(path):
        hold_shared(path)
        return path
    if path.is_file() and path.suffix.lower() != ".gguf":
        raise ModelError(f"{model}: not a model folder, .gguf file or offspec store")
    meta = read_source_metadata(path)
    chosen = choose_bits(meta, bits)
    out = cached_store_path(path, chosen, dtype, home, name)
    if is_store(out) and store_key(out) == source_key(path, chosen, dtype):
        hold_shared(out)  # already converted: needs no write access to the cache
        return out
    root = home or offspec_home()
    if not home_is_writable(root):
        raise StoreError(f"{model} has no converted store in {root}, which is read-only; convert it elsewhere "
                         f"with `offspec convert {model} OUT` and pass OUT, or set OFFSPEC_HOME to a writable folder")
    root_stores = stores_dir(home)
    others = [p for p in sorted(root_stores.iterdir()) if p != out and is_store(p) and _store_source(p) == str(path)
              ] if root_stores.is_dir() else []
    if others:
        from offspec.store.metadata import estimate_manifest, store_bytes

        names = ", ".join(p.name for p in others)
        size = format_size(store_bytes(estimate_manifest(meta, chosen, dtype)))
        console.status_line(f"note: {path.name} is already in the cache as {names}; these options "
                            f"({store_tag(chosen, dtype)}) make another full copy of {size}")
    result = convert(path, out, bits=bits, dtype=dtype, progress=progress, on_choice=console.status_line, meta=meta)
    if result.converted:
        console.status_line(f"converted {path.name} into {out} ({format_size(result.size_bytes)}); later runs reuse it")
    hold_shared(out)
    return out


def _store_source(store: Path) -> str | None:
    try:
        return read_manifest(store).source
    except StoreError:
        return None


@dataclass(frozen=True)
class PlanInputs:
    """What `offspec plan` sizes: a store's manifest, or the one a source would convert into."""

    name: str
    manifest: Manifest
    what: str  # "store", or "not converted yet" and why its bits were chosen
    store_dir: Path | None = None  # a store: sizing reads its config
    config: object = None  # a source: an object with the config attributes sizing reads


def plan_inputs(model: str, bits: int | None = None, dtype: str = "bfloat16", home: Path | None = None) -> PlanInputs:
    """Plan a model without converting it: a store as it is, or a folder or GGUF sized from its metadata
    (config.json and safetensors headers, or the GGUF header). Writes nothing."""
    from types import SimpleNamespace

    from offspec.store.metadata import estimate_manifest

    check_bits_dtype(bits, dtype)
    path, _ = locate_model(model, home)
    if is_store(path):
        return PlanInputs(path.name, read_manifest(path), "store", store_dir=path)
    meta = read_source_metadata(path)
    chosen = choose_bits(meta, bits)
    why = f"; {meta.bits_reason}" if bits is None and meta.kind == "gguf" else ""
    config = _source_config(path) or SimpleNamespace(**meta.config, num_hidden_layers=meta.num_layers)
    return PlanInputs(path.name, estimate_manifest(meta, chosen, dtype), f"not converted yet{why}", config=config)


def _source_config(path: Path):
    """The transformers config of a folder or GGUF file, or None where transformers cannot read it (sizing then
    falls back to the metadata's numbers)."""
    try:
        if path.is_file():
            from offspec.transformers_contract import gguf_config

            return gguf_config(path)
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path)
    except Exception:  # noqa: BLE001 - an unknown model type: the architecture check says so elsewhere
        return None
