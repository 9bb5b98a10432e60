"""The layer store: convert a model once into per-layer blobs, verify them, find or build a store."""

from offspec.paths import offspec_home
from offspec.store.cache import list_stores
from offspec.store.convert import convert_model
from offspec.store.integrity import ensure_verified, verify_store
from offspec.store.manifest import Manifest, read_manifest
from offspec.store.resolve import resolve_model

__all__ = [
    "Manifest",
    "convert_model",
    "ensure_verified",
    "list_stores",
    "offspec_home",
    "read_manifest",
    "resolve_model",
    "verify_store",
]
