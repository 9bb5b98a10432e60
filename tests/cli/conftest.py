"""CLI fixtures: tiny random Llama folders with a small real tokenizer, an isolated OFFSPEC_HOME, a CliRunner."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Speculative decoding drafts many tokens and the target verifies them in one pass.",
    "Layers stream from disk when the model does not fit in memory.",
    "Hello, how are you today? I am fine, thank you.",
    "def add(a, b):\n    return a + b\n",
    "A small model guesses; a large model checks.",
]
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(vocab_size: int = 320, chat_template: bool = True):
    """A byte-level BPE trained offline on a few sentences, wrapped as a fast tokenizer with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def save_llama(folder: Path, tokenizer, num_layers: int, seed: int, max_positions: int = 512) -> Path:
    """A random LlamaForCausalLM (hidden 64, 4 heads, 2 KV heads) saved with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        initializer_range=0.2,  # sharper logits than the default: greedy choices far from ties
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class TinyModels:
    """Paths of the model folders the CLI tests pass as --model / --draft."""

    def __init__(self, root: Path) -> None:
        tok = build_tokenizer()
        other = build_tokenizer(vocab_size=290)
        self.target = save_llama(root / "target", tok, num_layers=4, seed=0)
        self.draft = save_llama(root / "draft", tok, num_layers=2, seed=1)
        self.short = save_llama(root / "short-context", tok, num_layers=2, seed=2, max_positions=64)
        self.other_draft = save_llama(root / "other-tokenizer-draft", other, num_layers=2, seed=3)
        self.not_a_model = root / "not-a-model"
        self.not_a_model.mkdir()
        (self.not_a_model / "README.md").write_text("no config.json here\n")
        self.truncated = root / "truncated"
        shutil.copytree(self.target, self.truncated)
        weights = self.truncated / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        self.other_arch = root / "tiny-other-arch"
        self._save_encoder(self.other_arch, tok)

    @staticmethod
    def _save_encoder(folder: Path, tok) -> None:
        """A BERT-style encoder run as a decoder by transformers: not a decoder-only stack offspec streams."""
        import torch
        from transformers import BertConfig, BertLMHeadModel

        torch.manual_seed(4)
        cfg = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, is_decoder=True)
        BertLMHeadModel(cfg).save_pretrained(folder)
        tok.save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("cli-models"))


@pytest.fixture(scope="session")
def session_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One OFFSPEC_HOME for the CLI tests, so each tiny model is converted once."""
    return tmp_path_factory.mktemp("offspec-home")


@pytest.fixture(autouse=True)
def offspec_home(session_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OFFSPEC_HOME", str(session_home))
    monkeypatch.delenv("OFFSPEC_DEBUG", raising=False)
    return session_home


@pytest.fixture
def runner():
    """typer's CliRunner keeps stdout and stderr apart (result.stdout / result.stderr)."""
    from typer.testing import CliRunner

    return CliRunner()


@pytest.fixture(scope="session")
def cli_app():
    from offspec.cli import app

    return app
