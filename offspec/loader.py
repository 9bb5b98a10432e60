"""From user-level options to a ready Engine: resolve models into stores, plan, open, check tokenizers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from offspec.config import RuntimeConfig
from offspec.errors import ConfigError, ModelError
from offspec.generate import Engine

PROBE_TEXT = "def main():\n    print('Hello, world!')  # Über 100 tokens? 日本語 ✓\n"


@dataclass
class Loaded:
    engine: Engine
    target_store: Path
    draft_store: Path | None
    tokenizer: object

    def close(self) -> None:
        """Stop the reader threads of both models."""
        for m in (self.engine.target, self.engine.draft):
            if m is not None:
                m.close()


def load_tokenizer(store: Path):
    """The tokenizer saved beside a store's config (offline only)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(store, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{store}: no usable tokenizer ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def check_same_tokenizer(target_tok, draft_tok, target_name: str, draft_name: str) -> None:
    """The draft must map the same text to the same ids as the target; otherwise speculation is meaningless."""
    same_vocab = target_tok.get_vocab() == draft_tok.get_vocab()
    same_ids = target_tok.encode(PROBE_TEXT) == draft_tok.encode(PROBE_TEXT)
    if not (same_vocab and same_ids):
        raise ModelError(
            f"draft {draft_name} does not share the target's tokenizer ({target_name}): "
            "speculative decoding needs the same vocabulary and token ids"
        )


END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>")  # ChatML/Qwen, GPT-style, Llama 3: each ends a text


def stop_ids(tokenizer, config=None) -> tuple[int, ...]:
    """End-of-text ids: the tokenizer's eos, the model config's, and the end-of-turn tokens the vocabulary has."""
    ids: set[int] = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        ids.update(int(vocab[name]) for name in END_OF_TURN if name in vocab)
    return tuple(sorted(ids))


def generation_eos(store: Path) -> tuple[int, ...]:
    """eos ids from generation_config.json, if any."""
    import json

    path = store / "generation_config.json"
    if not path.is_file():
        return ()
    eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def check_budget_fits_machine(rc: RuntimeConfig) -> None:
    """ConfigError when --device-memory asks for more than the machine has (the plan would promise memory that
    is not there)."""
    if rc.device_memory_bytes is None:
        return
    from offspec.runtime.device import resolve_device
    from offspec.runtime.memory import machine_memory
    from offspec.runtime.plan import format_bytes

    total, what = machine_memory(resolve_device(rc.device))
    if rc.device_memory_bytes > total:
        raise ConfigError(f"bad --device-memory {format_bytes(rc.device_memory_bytes)}: this machine has "
                          f"{format_bytes(total)} of {what} (omit it to fit the budget to free memory)")


def load_engine(model: str | None, draft: str | None = None, spec: bool = True,
                rc: RuntimeConfig = RuntimeConfig(), cache_tokens: int = 4096, progress: bool = True,
                budget_auto: bool = True) -> Loaded:
    """Resolve target (and draft), open them under the budgets, and wire an Engine.

    cache_tokens (--ctx-size) sizes both KV caches, capped at the target's context; the engine stops there."""
    from offspec.runtime.model import open_model
    from offspec.store.resolve import resolve_model

    check_budget_fits_machine(rc)
    if model is None:
        from offspec.store.demo import demo_draft, demo_target

        target_store = demo_target(rc.bits, rc.dtype, progress=progress)
        if draft is None and spec:
            draft_store: Path | None = demo_draft(rc.dtype, progress=progress)
        else:  # the demo's own draft is not used: do not convert it
            draft_store = resolve_model(draft, 16, rc.dtype, progress=progress) if (draft and spec) else None
    else:
        target_store = resolve_model(model, rc.bits, rc.dtype, progress=progress)
        draft_store = resolve_model(draft, 16, rc.dtype, progress=progress) if (draft and spec) else None
    from offspec.runtime.sizing import context_tokens

    cache_tokens = context_tokens(target_store, cache_tokens)
    tokenizer = load_tokenizer(target_store)
    draft_model = None
    reserved = 0
    if draft_store is not None:
        draft_tok = load_tokenizer(draft_store)
        check_same_tokenizer(tokenizer, draft_tok, str(target_store.name), str(draft_store.name))
        from offspec.runtime.sizing import model_bytes

        d_total = model_bytes(draft_store, cache_tokens, rc.device)
        draft_model = open_model(draft_store, rc.device, device_memory_bytes=d_total + 1, cache_tokens=cache_tokens,
                                 warm=True)
        reserved = d_total
    target = open_model(target_store, rc.device, rc.device_memory_bytes, rc.host_memory_bytes,
                        reserved_bytes=reserved, cache_tokens=cache_tokens, warm=rc.warm,
                        device_memory_over_min=rc.device_memory_over_min)
    planner = None
    if draft_model is not None and budget_auto:
        from offspec.speculative.tree_size import make_planner

        planner = make_planner(target)
    eos = set(stop_ids(tokenizer, target.config)) | set(generation_eos(target_store))
    engine = Engine(target, draft_model, tokenizer, planner, context_tokens=cache_tokens, eos_ids=eos)
    return Loaded(engine, target_store, draft_store, tokenizer)
