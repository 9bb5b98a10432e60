"""Fixtures for the benchmark tests: a tiny random Llama target and draft sharing a small offline tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = (
    "def main print return import class self for in if else while the a of to and is it you that was on are "
    "with as be at one have this from write function python code list sort story sky blue why how what "
    "user assistant system"
).split()
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
PUNCT = list("():=+-*/,.'\"`[]{}<>!?_#")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def bench_tokenizer():
    """A WordLevel fast tokenizer on a few dozen words, with eos and a ChatML-like chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(set(WORDS)) + PUNCT)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _save_llama(path: Path, num_layers: int, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = bench_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).to(torch.bfloat16).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def bench_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(target folder: 6-layer Llama, draft folder: 3-layer Llama), bf16 safetensors, same tokenizer."""
    root = tmp_path_factory.mktemp("bench-models")
    return _save_llama(root / "target", 6, 0), _save_llama(root / "draft", 3, 1)


@pytest.fixture(scope="session")
def bench_home(tmp_path_factory: pytest.TempPathFactory):
    """OFFSPEC_HOME pointed at a session temp folder (stores and curves land there)."""
    home = tmp_path_factory.mktemp("offspec-home")
    old = os.environ.get("OFFSPEC_HOME")
    os.environ["OFFSPEC_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("OFFSPEC_HOME", None)
    else:
        os.environ["OFFSPEC_HOME"] = old


@pytest.fixture(scope="session")
def streaming_budget(bench_models, bench_home) -> str:
    """A device budget (bytes, as a string) that holds resident parts, KV, the draft and a 2-slot ring only,
    so every target layer streams from disk."""
    return str(_streaming_budget(bench_models, with_draft=True))


@pytest.fixture(scope="session")
def streaming_budget_no_draft(bench_models, bench_home) -> str:
    """The same without room for a draft (for runs that load none)."""
    return str(_streaming_budget(bench_models, with_draft=False))


def _streaming_budget(bench_models, with_draft: bool) -> int:
    """The runtime's own minimum budget (resident parts, KV cache, draft reserve, a 2-slot ring)."""
    from offspec.runtime.sizing import model_bytes, plan_for_store
    from offspec.store.manifest import read_manifest
    from offspec.store.resolve import resolve_model

    target, draft = bench_models
    t_store = resolve_model(str(target), 16, "bfloat16", progress=False)
    d_store = resolve_model(str(draft), 16, "bfloat16", progress=False)
    cache_tokens = 4096  # load_engine's default
    reserved = model_bytes(d_store, cache_tokens, "cpu") if with_draft else 0
    _plan, minimum = plan_for_store(t_store, read_manifest(t_store), "cpu", 1 << 40, 0, reserved, cache_tokens)
    return minimum


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster, and steadier on a shared 2-core machine, with one torch thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



@pytest.fixture(scope="session")
def bench_tok():
    """The tiny models' tokenizer."""
    return bench_tokenizer()
