"""Shared fixtures: tiny random models saved as Hugging Face folders (nothing is downloaded)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Tiny models gain nothing from a second thread, and OpenMP barriers stall badly on a busy 2-core machine.
torch.set_num_threads(1)

TINY_VOCAB = 256
TINY_HIDDEN = 64  # a multiple of 64 so NF4 blocks (64 elements) tile every weight
TINY_INTERMEDIATE = 128
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    """A character-level fast tokenizer with exactly TINY_VOCAB entries and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    chars = ["\n", "\t"] + [chr(c) for c in range(32, 127)]
    tokens = specials + chars
    tokens += [f"<extra_{i}>" for i in range(TINY_VOCAB - len(tokens))]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


# Tiny configs of every supported family; the extra arguments exercise each family's quirks.
TINY_FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "llama3": ("llama", {"rope_parameters": {  # Llama 3.x rope scaling
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    "mistral": ("mistral", {"sliding_window": 5}),  # one window on every layer
    "qwen2": ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2}),  # mixed
    "qwen3": ("qwen3", {}),  # q/k norms
    "gemma2": ("gemma2", {"final_logit_softcapping": 0.5, "attn_logit_softcapping": 2.0, "sliding_window": 4,
                          "query_pre_attn_scalar": 16, "hidden_activation": "gelu_pytorch_tanh"}),
    "gemma3_text": ("gemma3_text", {"sliding_window": 4, "sliding_window_pattern": 2, "query_pre_attn_scalar": 16,
                                    "final_logit_softcapping": None}),  # windowed layers with their own rotary
    "phi3": ("phi3", {"partial_rotary_factor": 0.5}),  # fused qkv / gate_up, partial rotary
    "olmo2": ("olmo2", {}),  # q/k norms, norms after attention and MLP
    "granite": ("granite", {"embedding_multiplier": 3.0, "residual_multiplier": 0.5, "attention_multiplier": 0.3,
                            "logits_scaling": 4.0}),
    "smollm3": ("smollm3", {"no_rope_layer_interval": 2}),  # layers without rotary
    "starcoder2": ("starcoder2", {"use_bias": True, "sliding_window": 6, "norm_epsilon": 1e-5}),  # biases, LayerNorm
    "gemma": ("gemma", {"hidden_activation": "gelu_pytorch_tanh"}),  # embedding scaling
    "glm": ("glm", {}),  # partial rotary, interleaved
    "glm4": ("glm4", {}),  # sandwich norms, attention biases
    "cohere": ("cohere", {"logit_scale": 0.5}),  # parallel attention/MLP, logit scale
    "cohere2": ("cohere2", {"logit_scale": 0.5, "sliding_window": 4, "sliding_window_pattern": 2}),
    "ministral": ("ministral", {"sliding_window": 4}),
    "exaone4": ("exaone4", {"sliding_window": 4, "sliding_window_pattern": 2}),
    "olmo": ("olmo", {}),  # LayerNorm without parameters
    "olmo3": ("olmo3", {"sliding_window": 4}),
    "phi": ("phi", {"partial_rotary_factor": 0.5, "qk_layernorm": True}),  # parallel block, lm_head bias
    "helium": ("helium", {}),
    "arcee": ("arcee", {}),  # ReLU^2 MLP
    "seed_oss": ("seed_oss", {}),
}


_MLA = {"kv_lora_rank": 16, "q_lora_rank": None, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
        "head_dim": 8, "num_key_value_heads": 4}  # multi-latent attention: rotary over qk_rope_head_dim
# Tiny mixtures of experts (8 experts, 2 per token), each with its routing quirks.
TINY_MOE_FAMILIES: dict[str, tuple[str, dict]] = {
    "mixtral": ("mixtral", {"num_local_experts": 8, "num_experts_per_tok": 2}),
    "qwen2_moe": ("qwen2_moe", {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                "shared_expert_intermediate_size": 48}),  # a gated shared expert
    "qwen3_moe": ("qwen3_moe", {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                "norm_topk_prob": True, "mlp_only_layers": [0]}),  # a dense first layer
    "olmoe": ("olmoe", {"num_experts": 8, "num_experts_per_tok": 2}),
    "granitemoe": ("granitemoe", {"num_local_experts": 8, "num_experts_per_tok": 2,  # fused experts in checkpoints
                                  "embedding_multiplier": 3.0, "residual_multiplier": 0.5}),
    "phimoe": ("phimoe", {"num_local_experts": 8, "num_experts_per_tok": 2}),  # sparsemixer routing
    "gpt_oss": ("gpt_oss", {"num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": 4,
                            "layer_types": ["sliding_attention", "full_attention"] * 2}),  # biases, clamped SwiGLU
    "deepseek_v2": ("deepseek_v2", {"n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                    "first_k_dense_replace": 1, "n_shared_experts": 1, "n_group": 1,
                                    "topk_group": 1, **_MLA}),  # latent attention, shared experts, dense first layer
    "deepseek_v3": ("deepseek_v3", {"n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                    "first_k_dense_replace": 1, "n_shared_experts": 1, "n_group": 2,
                                    "topk_group": 1, **_MLA}),  # group-limited routing with a score bias
}


def _tiny_config(family: str, num_layers: int, tie: bool):
    from transformers import AutoConfig

    families = {**TINY_FAMILIES, **TINY_MOE_FAMILIES}
    if family not in families:
        raise ValueError(f"tiny models support {sorted(families)}, not {family!r}")
    model_type, extra = families[family]
    base = dict(vocab_size=TINY_VOCAB, hidden_size=TINY_HIDDEN, intermediate_size=TINY_INTERMEDIATE,
                num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=TINY_HIDDEN // 4,
                max_position_embeddings=512, tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return AutoConfig.for_model(model_type, **{**base, **extra})


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: make_tiny_model(family, num_layers=4, tie=False, dtype=float32, seed=0, shard_size=None,
    tokenizer=True) -> folder with a random CausalLM saved by save_pretrained (cached per arguments)."""
    cache: dict[tuple, Path] = {}

    def make(
        model_type: str = "llama",
        num_layers: int = 4,
        tie: bool = False,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        shard_size: str | None = None,
        tokenizer: bool = True,
    ) -> Path:
        key = (model_type, num_layers, tie, dtype, seed, shard_size, tokenizer)
        if key not in cache:
            from transformers import AutoModelForCausalLM

            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(_tiny_config(model_type, num_layers, tie)).to(dtype).eval()
            name = f"tiny-{model_type}-{num_layers}l{'-tied' if tie else ''}-{str(dtype).split('.')[-1]}-s{seed}"
            path = tmp_path_factory.mktemp(name + (f"-shard{shard_size}" if shard_size else ""))
            kwargs = {"max_shard_size": shard_size} if shard_size else {}
            model.save_pretrained(path, **kwargs)
            if tokenizer:
                tiny_tokenizer().save_pretrained(path)
            cache[key] = path
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(make_tiny_model: Callable[..., Path]) -> Path:
    """A random 4-layer Llama (hidden 64, 4 heads / 2 kv heads, vocab 256) with a tokenizer, float32."""
    return make_tiny_model("llama", num_layers=4)


@pytest.fixture(scope="session")
def tiny_llama_draft_dir(make_tiny_model: Callable[..., Path]) -> Path:
    """A random 2-layer Llama sharing tiny_llama_dir's vocab and tokenizer (a draft for it)."""
    return make_tiny_model("llama", num_layers=2, seed=1)
