"""The layer store: convert a model once into per-layer blobs, verify them, find or build a store."""

from offspec.store.convert import convert_model
from offspec.store.integrity import ensure_verified, verify_store
from offspec.store.manifest import Manifest, read_manifest
from offspec.store.resolve import list_cache, offspec_home, resolve_model

__all__ = [
    "Manifest",
    "convert_model",
    "ensure_verified",
    "list_cache",
    "offspec_home",
    "read_manifest",
    "resolve_model",
    "verify_store",
]
