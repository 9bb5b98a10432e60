"""Write a random-weight Hugging Face folder of a real model's shape, for timing (acceptance is meaningless).

usage: python scripts/make_random.py OUT SHAPE TOKDIR [--dtype bfloat16|float32] [--device cuda|cpu]
  SHAPE: qwen05b | qwen7b | qwen14b | qwen32b (Qwen2.5 shapes; vocabulary 151,936)
  TOKDIR: a folder holding a Qwen2.5 tokenizer (tokenizer*.json ...), e.g. a converted demo store

A pass's time, copy bandwidth and draft cost depend on the model's shapes, not its weights, so a machine
without network can be measured on random weights of the right shapes. Weights are drawn on the GPU when
there is one (a 7B takes ~20 s), else on the CPU, and written as safetensors shards with an index.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    "qwen05b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2, tie_word_embeddings=True),
    "qwen7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                   num_key_value_heads=4, tie_word_embeddings=False),
    "qwen14b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                    num_key_value_heads=8, tie_word_embeddings=False),
    "qwen32b": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                    num_key_value_heads=8, tie_word_embeddings=False),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "generation_config.json", "added_tokens.json")
SHARD_BYTES = 4 << 30


def qwen_config(shape: str, dtype: str):
    from transformers import Qwen2Config

    cfg = Qwen2Config(vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                      hidden_act="silu", bos_token_id=151643, eos_token_id=151645, **SHAPES[shape])
    cfg.torch_dtype = dtype
    return cfg


def tensor_shapes(cfg) -> dict[str, torch.Size]:
    """Every parameter name and shape of the model, without allocating it (meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {n: p.shape for n, p in model.state_dict().items()}


def make_random(out: Path, shape: str, tokdir: Path, dtype: str = "bfloat16", device: str | None = None) -> int:
    """Write the folder; returns its weight bytes."""
    from safetensors.torch import save_file

    if shape not in SHAPES:
        raise SystemExit(f"unknown shape '{shape}' (use {', '.join(SHAPES)})")
    tok_files = [tokdir / f for f in TOKENIZER_FILES if (tokdir / f).is_file()]
    if not any(f.name == "tokenizer.json" for f in tok_files):
        raise SystemExit(f"{tokdir}: no tokenizer.json (give a folder with a Qwen2.5 tokenizer, e.g. a converted store)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    out.mkdir(parents=True, exist_ok=True)
    cfg = qwen_config(shape, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, index, k, total = 0, {}, 0, 0

    def flush() -> None:
        nonlocal shard, shard_bytes, k
        if shard:
            name = f"model-{k:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            index.update({n: name for n in shard})
            k += 1
            shard, shard_bytes = {}, 0

    for name, s in tensor_shapes(cfg).items():
        if name.endswith("norm.weight"):
            t = torch.ones(s, dtype=tdtype)
        else:  # weights and biases: small normal values, as an initialised model has
            t = (torch.randn(s, generator=g, device=device) * 0.02).to(tdtype).cpu()
        shard[name] = t
        nbytes = t.numel() * t.element_size()
        shard_bytes += nbytes
        total += nbytes
        if shard_bytes > SHARD_BYTES:
            flush()
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": index}))
    cfg.save_pretrained(out)
    for f in tok_files:
        if f.name != "generation_config.json":  # ours (from the config) stays
            shutil.copy(f, out / f.name)
    return total


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("tokdir", type=Path)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--device", default=None, help="where to draw the weights (default: cuda if present)")
    a = ap.parse_args(argv)
    t0 = time.time()
    total = make_random(a.out, a.shape, a.tokdir, a.dtype, a.device)
    print(f"{a.shape}: {total / 1e9:.2f} GB of {a.dtype} in {time.time() - t0:.1f} s -> {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
