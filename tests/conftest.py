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


def _tiny_config(model_type: str, num_layers: int, tie: bool):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
    if model_type not in classes:
        raise ValueError(f"tiny models support {sorted(classes)}, not {model_type!r}")
    return classes[model_type](
        vocab_size=TINY_VOCAB,
        hidden_size=TINY_HIDDEN,
        intermediate_size=TINY_INTERMEDIATE,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=TINY_HIDDEN // 4,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: make_tiny_model(model_type, num_layers=4, tie=False, dtype=float32, seed=0, shard_size=None,
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
