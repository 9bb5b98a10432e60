"""Write tiny GGUF files from random transformers models, as llama.cpp's converter would lay them out.

Float and Q8_0 tensors are written with the `gguf` library. It cannot quantize to K-quants, so Q4_K and Q6_K
blocks are written here directly: random codes and scales under valid float16 super-block scales, which the
`gguf` library (and so transformers) dequantizes like any llama.cpp file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 256, 512, 4, 2, 64  # rows of 256 values: K-quant blocks tile them
FILE_TYPES = {"F32": 0, "F16": 1, "Q8_0": 7, "Q4_K_M": 15, "BF16": 32}
# llama.cpp's architecture names of the families written here (transformers' model_type -> GGUF architecture)
GGUF_ARCHS = {"llama": "llama", "gemma3_text": "gemma3", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}


def tiny_hf_model(arch: str, num_layers: int = 2, seed: int = 0, hidden: int = HIDDEN, vocab: int = 260):
    """A random CausalLM of the family behind a GGUF architecture name (llama or gemma3), float32."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=hidden // HEADS,
                  max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    if arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "gemma3":
        config = Gemma3TextConfig(**common, sliding_window=64, query_pre_attn_scalar=hidden // HEADS)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms away from their init (all ones / zeros) so the per-family fix shows
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if arch == "gemma3" else 1.0))
    return model


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation (what transformers' llama processor undoes)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _k_blocks(rows: int, cols: int, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """Random valid Q4_K (144 B) or Q6_K (210 B) super-blocks of 256 values, as a [rows, bytes per row] array."""
    n = rows * cols // 256
    scale = rng.uniform(0.002, 0.02, size=n).astype(np.float16).view(np.uint8).reshape(n, 2)
    if qtype == "Q4_K":
        dmin = rng.uniform(0.0, 0.01, size=n).astype(np.float16).view(np.uint8).reshape(n, 2)
        body = rng.integers(0, 256, size=(n, 140), dtype=np.uint8)
        blocks = np.concatenate([scale, dmin, body], axis=1)
    else:
        body = rng.integers(0, 256, size=(n, 208), dtype=np.uint8)
        blocks = np.concatenate([body, scale], axis=1)
    return blocks.reshape(rows, -1)


def write_gguf(model, path: Path, file_type: str, seed: int = 0) -> Path:
    """Write model as a GGUF of file_type F16, Q8_0 or Q4_K_M (Q4_K/Q6_K blocks, F32 norms)."""
    import gguf
    from gguf.quants import quantize

    cfg = model.config
    arch = GGUF_ARCHS[cfg.model_type]
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_file_type(FILE_TYPES[file_type])
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    if arch == "gemma3":
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_sliding_window(cfg.sliding_window)
    else:
        w.add_rope_dimension_count(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    if arch == "qwen3moe":
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if arch.endswith("moe"):
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if getattr(cfg, "shared_expert_intermediate_size", 0):
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = ["<pad>", "<s>", "</s>", "<unk>"] + list(bytes_to_unicode().values())
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([3, 3, 3, 2] + [1] * (len(tokens) - 4))
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_id, cfg.num_hidden_layers)
    for name, a in _gguf_tensors(model, name_map):
        if arch == "llama" and name.endswith("attn_q.weight"):
            a = _permute(a, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith("attn_k.weight"):
            a = _permute(a, cfg.num_key_value_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            a = a + 1.0  # llama.cpp stores Gemma's norms as 1 + w
        if a.ndim == 1 or file_type == "F32":
            w.add_tensor(name, a.astype(np.float32))
        elif file_type == "F16":
            w.add_tensor(name, a.astype(np.float16))
        elif file_type in ("Q8_0", "BF16") or a.shape[-1] % 256:  # rows K-quant blocks cannot tile: Q8_0, as llama.cpp
            qtype = getattr(gguf.GGMLQuantizationType, "Q8_0" if file_type == "Q4_K_M" else file_type)
            q = quantize(a, qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
        else:
            kind = "Q6_K" if ("ffn_down" in name or name == "output.weight") else "Q4_K"
            q = _k_blocks(int(np.prod(a.shape[:-1])), a.shape[-1], kind, rng).reshape(*a.shape[:-1], -1)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _gguf_tensors(model, name_map):
    """(GGUF name, float32 array in torch order) of each tensor, as llama.cpp's converter names and lays them out:
    the experts of a layer merged into one [n_expert, ...] tensor per projection (transformers 5 keeps them fused
    too, with gate and up concatenated), a shared expert's gate as a vector."""
    for hf_name, t in model.state_dict().items():
        a = t.float().numpy().copy()
        if hf_name.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H]: gate rows first
            block = name_map.get_name(hf_name.replace("experts.gate_up_proj", "experts.down_proj"))
            half = a.shape[1] // 2
            yield block.replace("ffn_down_exps", "ffn_gate_exps") + ".weight", np.ascontiguousarray(a[:, :half])
            yield block.replace("ffn_down_exps", "ffn_up_exps") + ".weight", np.ascontiguousarray(a[:, half:])
        elif hf_name.endswith("mlp.experts.down_proj"):  # [E, H, I]
            yield name_map.get_name(hf_name) + ".weight", a
        else:
            base, suffix = hf_name.rsplit(".", 1)
            name = name_map.get_name(base) + "." + suffix
            yield name, (a[0] if name.endswith("ffn_gate_inp_shexp.weight") else a)


def tiny_moe_model(model_type: str, num_layers: int = 2, seed: int = 0, num_experts: int = 4, hidden: int = 64,
                   **sizes):
    """A random qwen2_moe or qwen3_moe CausalLM, float32. Unless `sizes` says otherwise (moe_intermediate_size,
    shared_expert_intermediate_size), its experts have the family's default sizes: transformers assumes them when it
    reads a GGUF (it does not read the expert sizes from the file's metadata)."""
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(vocab_size=260, hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, max_position_embeddings=256, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, num_experts=num_experts, num_experts_per_tok=2)
    if model_type == "qwen2_moe":
        config = Qwen2MoeConfig(**common, intermediate_size=2 * hidden, **sizes)
    elif model_type == "qwen3_moe":
        config = Qwen3MoeConfig(**common, intermediate_size=2 * hidden, head_dim=hidden // HEADS, norm_topk_prob=True,
                                **sizes)
    else:
        raise ValueError(model_type)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # experts apart from each other, norms away from their init (all ones)
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 and "norm" in name else 0.0))
    return model


def transformers_state_dict(path: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """transformers' own dequantized load of a GGUF (the oracle)."""
    from transformers import AutoModelForCausalLM, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                 quantization_config=GgufConfig(dequantize=True))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
