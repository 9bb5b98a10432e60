"""The baseline users would pick: transformers + accelerate offload (`device_map="auto"` with a CPU budget).

How it behaves in the installed versions (transformers 5.x, accelerate 1.x), read from their source:
- `from_pretrained(..., device_map="auto", max_memory={"cpu": B}, offload_folder=D)` works on a CPU-only
  machine: modules that do not fit in B are mapped to "disk" and get accelerate `AlignDevicesHook`s
  that load their weights before each forward and drop them (back to meta) after it.
- `offload_state_dict` is silently ignored by transformers 5.
- For a safetensors checkpoint nothing is written to D: the offload index points at the checkpoint's
  own safetensors files, which are memory-mapped (`safe_open(...).get_tensor`) at every forward. So the
  page cache, not the offload folder, is what makes a second token fast; a cold run must evict the
  checkpoint files. Here they are evicted before every generated token, as offspec's cold streaming
  re-reads every streamed layer each pass.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
from pathlib import Path

import torch

from offspec.errors import ModelError
from offspec.runtime.streamer import drop_page_cache

PEER_NAMES = ("accelerate",)


def _dtype(name: str) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def peer_model_dir(store: Path, dtype: str, home: Path | None = None, progress: bool = True) -> Path:
    """A safetensors Hugging Face folder of the store's model: its source folder, or a one-time export of a GGUF."""
    from offspec.store.manifest import read_manifest

    source = read_manifest(store).source
    src = Path(source) if source else None
    if src is not None and src.is_dir() and any(src.glob("*.safetensors")):
        return src
    if src is not None and src.is_file() and src.suffix.lower() == ".gguf":
        return _export_gguf(src, dtype, home, progress)
    raise ModelError(
        f"the peer needs the model's source (a safetensors folder or a .gguf file); "
        f"the store {store} records '{source}', which is not there"
    )


def _export_gguf(src: Path, dtype: str, home: Path | None, progress: bool) -> Path:
    """Dequantize a GGUF once with transformers and save it as safetensors under OFFSPEC_HOME/peer/."""
    from offspec.paths import offspec_home
    from offspec.store.convert import source_key

    out = (home or offspec_home()) / "peer" / f"{src.stem}-{dtype}-{source_key(src, 16, dtype)[:12]}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    from transformers import AutoModelForCausalLM

    if progress:
        from rich.console import Console

        Console(stderr=True).print(f"peer: exporting {src.name} to safetensors once (slow) -> {out}")
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=_dtype(dtype))
    model.hf_quantizer = None  # a dequantized GGUF must save as a plain checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    del model
    gc.collect()
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


class _TokenClock:
    """A transformers streamer that timestamps every generated token (put #0 is the prompt)."""

    def __init__(self, evict: list[Path] | None = None) -> None:
        self.times: list[float] = []
        self.evict = evict or []
        self.evict_s = 0.0
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        t0 = time.perf_counter()
        for p in self.evict:  # the next token must read its offloaded weights from disk again
            drop_page_cache(p)
        self.evict_s += time.perf_counter() - t0

    def end(self) -> None:
        pass


def _offload_files(model, model_dir: Path, offload_dir: Path) -> list[Path]:
    """Every file offloaded weights are read from: the offload index's safetensors, the folder's files."""
    files: set[Path] = set(Path(model_dir).glob("*.safetensors"))
    files.update(p for p in Path(offload_dir).rglob("*") if p.is_file())
    for mod in model.modules():
        hook = getattr(mod, "_hf_hook", None)
        wmap = getattr(hook, "weights_map", None)
        loader = getattr(wmap, "dataset", wmap)
        for info in (getattr(loader, "index", None) or {}).values():
            if isinstance(info, dict) and info.get("safetensors_file"):
                files.add(Path(info["safetensors_file"]))
    return sorted(files)


def _device_map_summary(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for where in (getattr(model, "hf_device_map", None) or {"": "cpu"}).values():
        counts[str(where)] = counts.get(str(where), 0) + 1
    return counts


def run_accelerate_peer(model_dir: Path, prompt_ids: list[list[int]], max_new_tokens: int, budget_bytes: int,
                        dtype: str = "bfloat16", device: str = "cpu", host_budget_bytes: int | None = None,
                        cold: bool = True, eos_ids: tuple[int, ...] = (), on_prompt=None) -> dict:
    """Greedy `generate` with accelerate offload under budget_bytes on each prompt; decode figures exclude prefill."""
    import accelerate
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers import GenerationConfig as HFGenerationConfig

    if max_new_tokens < 2:
        raise ModelError("the peer needs max_new_tokens >= 2 to time decoding apart from the prefill")
    offload_dir = Path(tempfile.mkdtemp(prefix="offspec-peer-"))
    if device.startswith("cuda"):
        max_memory: dict = {0: int(budget_bytes), "cpu": int(host_budget_bytes or budget_bytes)}
    else:
        max_memory = {"cpu": int(budget_bytes)}
    method = "from_pretrained(device_map='auto', max_memory, offload_folder)"
    t0 = time.perf_counter()
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, device_map="auto", max_memory=max_memory,
                                                         offload_folder=str(offload_dir), dtype=_dtype(dtype))
        except (ValueError, RuntimeError, NotImplementedError) as exc:  # fall back to full disk offload
            method = f"accelerate.disk_offload (device_map='auto' failed: {type(exc).__name__})"
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_dtype(dtype))
            model = accelerate.disk_offload(model, str(offload_dir))
        model.eval()
        load_s = time.perf_counter() - t0
        files = _offload_files(model, model_dir, offload_dir)
        eos = list(eos_ids) or None
        gen_cfg = HFGenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=eos, pad_token_id=(eos or [0])[0])
        exec_device = torch.device(device if device.startswith("cuda") else "cpu")
        records = []
        for k, ids in enumerate(prompt_ids):
            if on_prompt is not None:
                on_prompt(k)
            if cold:
                for p in files:
                    drop_page_cache(p)
            clock = _TokenClock(files if cold else None)
            x = torch.tensor([ids], device=exec_device)
            t_start = time.perf_counter()
            with torch.inference_mode():
                model.generate(x, attention_mask=torch.ones_like(x), generation_config=gen_cfg, streamer=clock)
            n = len(clock.times)
            decode_s = (clock.times[-1] - clock.times[0] - clock.evict_s) if n >= 2 else 0.0
            records.append({
                "prompt_tokens": len(ids), "tokens": n, "first_token_s": (clock.times[0] - t_start) if n else 0.0,
                "decode_tokens": max(n - 1, 0), "decode_s": decode_s,
                "tok_per_s": (n - 1) / decode_s if decode_s > 0 else 0.0,
            })
        dec_tokens = sum(r["decode_tokens"] for r in records)
        dec_s = sum(r["decode_s"] for r in records)
        return {
            "name": "accelerate",
            "method": method,
            "model_dir": str(model_dir),
            "budget_bytes": int(budget_bytes),
            "dtype": dtype,
            "device_map": _device_map_summary(model),
            "offload_files": len(files),
            "cold": cold,
            "cold_policy": "offloaded files evicted before the prompt and before every token" if cold else "warm",
            "load_s": load_s,
            "max_new_tokens": max_new_tokens,
            "tokens": dec_tokens,
            "decode_s": dec_s,
            "tok_per_s": dec_tokens / dec_s if dec_s > 0 else 0.0,
            "s_per_token": dec_s / dec_tokens if dec_tokens else 0.0,
            "versions": {"transformers": transformers.__version__, "accelerate": accelerate.__version__},
            "prompts": records,
        }
    finally:
        model = None
        gc.collect()
        shutil.rmtree(offload_dir, ignore_errors=True)


def run_peer(store: Path, kinds: list[str], prompt_ids: list[list[int]], *, store_dtype: str, compute_dtype: str,
             device: str, host_budget_bytes: int | None, budget_bytes: int, max_new: int, cold: bool,
             eos: tuple[int, ...], on_prompt, notes: list[str], progress: bool) -> dict | None:
    """`offspec bench --peer accelerate`: the baseline on the same model, prompts (of the given kinds) and weight
    memory, with figures by kind; None (noted) if it cannot run.

    Its checkpoint holds the weights in the store's dtype (as offspec's store does); it computes in the
    dtype the target computes in.
    """
    from offspec.console import quiet_transformers

    try:
        import accelerate  # noqa: F401
    except ImportError:
        notes.append("peer skipped: accelerate is not installed")
        return None
    model_dir = peer_model_dir(store, store_dtype, progress=progress)
    with quiet_transformers():
        rec = run_accelerate_peer(model_dir, prompt_ids, max_new, budget_bytes, compute_dtype, device,
                                  host_budget_bytes=host_budget_bytes, cold=cold, eos_ids=eos, on_prompt=on_prompt)
    for r, kind in zip(rec["prompts"], kinds):
        r["kind"] = kind
    by_kind = {}
    for kind in sorted(set(kinds)):
        rs = [r for r in rec["prompts"] if r["kind"] == kind]
        toks, secs = sum(r["decode_tokens"] for r in rs), sum(r["decode_s"] for r in rs)
        by_kind[kind] = {"tokens": toks, "decode_s": secs, "tok_per_s": toks / secs if secs > 0 else 0.0}
    rec["by_kind"] = by_kind
    return rec
