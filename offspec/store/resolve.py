"""Turn what the user passed as --model (store, HF folder, .gguf file or hub id) into a store folder."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

from offspec.paths import offspec_home
from offspec.errors import ModelError, StoreError
from offspec.store.convert import check_options, convert_model, source_key
from offspec.store.manifest import MANIFEST, read_manifest

HUB_HOST = ("huggingface.co", 443)
HUB_TIMEOUT_S = 3.0
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt", "*.tiktoken"]


def stores_dir(home: Path | None = None) -> Path:
    """Where converted stores are cached."""
    return (home or offspec_home()) / "stores"


def is_store(path: Path) -> bool:
    """True if path is a folder holding a manifest.json."""
    return path.is_dir() and (path / MANIFEST).is_file()


def cached_store_path(src: Path, bits: int, dtype: str, home: Path | None = None, name: str | None = None) -> Path:
    """The cache folder a source converts into: <name>-<bits>bit-<dtype>-<key12>."""
    name = name or (src.stem if src.is_file() else src.name)
    return stores_dir(home) / f"{name}-{bits}bit-{dtype}-{source_key(src, bits, dtype)[:12]}"


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
    model: str, bits: int = 16, dtype: str = "bfloat16", home: Path | None = None, progress: bool = True
) -> Path:
    """A store folder for model: the store itself, or a cached conversion of a folder, .gguf or hub id."""
    check_options(bits, dtype)
    path = Path(model).expanduser()
    name = None
    if not path.exists():
        if _HUB_ID.match(model) and not model.startswith((".", "~")):
            path, name = _hub_snapshot(model), model.replace("/", "--")
        else:
            raise ModelError(f"model path not found: {model}")
    path = path.resolve()
    if is_store(path):
        return path
    if path.is_file() and path.suffix.lower() != ".gguf":
        raise ModelError(f"{model}: not a model folder, .gguf file or offspec store")
    out = cached_store_path(path, bits, dtype, home, name)
    return convert_model(path, out, bits=bits, dtype=dtype, progress=progress)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_cache(home: Path | None = None) -> list[dict]:
    """The finished stores in the cache: name, path, source, bits, dtype, size_bytes, layers."""
    root = stores_dir(home)
    if not root.is_dir():
        return []
    out = []
    for path in sorted(root.iterdir()):
        if not is_store(path) or path.name.endswith(".partial"):
            continue
        try:
            m = read_manifest(path)
        except StoreError:
            continue
        out.append(
            {
                "name": path.name,
                "path": str(path),
                "source": m.source,
                "bits": m.bits,
                "dtype": m.dtype,
                "size_bytes": _dir_bytes(path),
                "layers": m.num_layers,
            }
        )
    return out
