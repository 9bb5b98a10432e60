"""Oracles per family: offspec's greedy output equals transformers' own, whatever the residency plan."""

from __future__ import annotations

import pytest
import torch

from offspec.generate import Engine, GenerationConfig, generate
from offspec.runtime.model import OffloadedModel
from offspec.runtime.plan import DEVICE, DISK, ResidencyPlan, minimum_budget_bytes, plan_residency
from offspec.store.convert import convert_model
from offspec.store.manifest import read_manifest
from tests.conftest import TINY_FAMILIES

PROMPT = [5, 17, 33, 90, 12, 7, 64, 3, 41]  # longer than every tiny sliding window
NEW_TOKENS = 8


@pytest.fixture(scope="module", params=list(TINY_FAMILIES))
def family_store(request, make_tiny_model, tmp_path_factory):
    # untied: a tiny random model with tied embeddings mostly repeats its input, whatever the context
    src = make_tiny_model(request.param, num_layers=4, tokenizer=False)
    store = convert_model(src, tmp_path_factory.mktemp("family-stores") / request.param, bits=16, dtype="float32",
                          progress=False)
    return request.param, src, store


def hf_greedy(src, prompt: list[int], n: int) -> list[int]:
    """transformers' own greedy decoding (its generate, its DynamicCache), float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def plans(store) -> dict[str, ResidencyPlan]:
    man = read_manifest(store)
    b, r = man.layer_bytes, man.resident.size
    return {
        "all-streamed": plan_residency(b, r, minimum_budget_bytes(b, r, 0, 0)),
        "mixed": ResidencyPlan(tuple(DISK if i % 2 == 0 else DEVICE for i in range(len(b))), tuple(b), r, 0, 0, 2,
                               max(b)),
        "all-resident": plan_residency(b, r, 1 << 34),
    }


def test_greedy_equals_transformers_under_every_plan(family_store):
    family, src, store = family_store
    want = hf_greedy(src, PROMPT, NEW_TOKENS)
    for name, plan in plans(store).items():
        assert name != "all-streamed" or set(plan.tiers) == {DISK}
        model = OffloadedModel(store, plan, cache_tokens=32)
        try:
            got = generate(Engine(model), PROMPT, GenerationConfig(max_new_tokens=NEW_TOKENS, spec=False))
            assert got.token_ids == want, f"{family} {name}"
        finally:
            model.close()


def test_prompt_logits_equal_transformers_in_static_and_bucketed_caches(family_store):
    """The full-capacity (graph-capturable) cache and the bucketed one give transformers' logits."""
    from transformers import AutoModelForCausalLM

    family, src, store = family_store
    ref_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        ref = ref_model(ids).logits
    for static in (False, True):
        model = OffloadedModel(store, plans(store)["mixed"], cache_tokens=300, static_cache=static)
        try:
            got = torch.cat([model.forward(ids[:, :5]), model.forward(ids[:, 5:])], 1)
            assert (got - ref).abs().max().item() < 1e-4, f"{family} static={static}"
        finally:
            model.close()


@pytest.fixture(scope="module")
def gemma3_pair(make_tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("gemma3-pair")
    # untied: a tiny random model with tied embeddings mostly repeats its input, whatever the context
    target = convert_model(make_tiny_model("gemma3_text", num_layers=4, tokenizer=False), out / "t",
                           dtype="float32", progress=False)
    draft = convert_model(make_tiny_model("gemma3_text", num_layers=2, seed=1, tokenizer=False), out / "d",
                          dtype="float32", progress=False)
    return target, draft


@pytest.mark.parametrize("budget,branch,tree", [(8, 2, "specexec"), (40, 3, "specexec"), (24, 4, "sequoia")])
def test_gemma3_speculative_greedy_equals_plain_greedy_with_trees_deeper_than_the_window(
        gemma3_pair, budget, branch, tree):
    """Sliding window 4; trees up to 8 deep: windowed tree masks in both the target and the draft."""
    from offspec.runtime.model import open_model

    target_store, draft_store = gemma3_pair
    prompt = list(range(40, 52))
    plain = Engine(open_model(target_store, device_memory_over_min=0, cache_tokens=64))
    want = generate(plain, prompt, GenerationConfig(max_new_tokens=20, spec=False)).token_ids
    spec = Engine(open_model(target_store, device_memory_over_min=0, cache_tokens=64),
                  open_model(draft_store, cache_tokens=64))
    cfg = GenerationConfig(max_new_tokens=20, budget=budget, branch=branch, max_depth=8, tree=tree)
    got = generate(spec, prompt, cfg)
    assert got.token_ids == want


def comb_tree(depth: int, width: int):
    """A chain `depth` deep with `width - 1` extra leaves per level, added level by level: the chain's
    node at depth d sits d * width slots after the root, far from its position root + d."""
    from offspec.speculative.tree import DraftTree

    tree = DraftTree(7, capacity=depth * width + 1)
    node = 0
    for d in range(depth):
        kids = tree.add(node, [(11 * d + 5 * j) % 250 + 3 for j in range(width)], [-1.0 * (d + 1)] * width)
        node = int(kids[0])
    return tree


@pytest.mark.parametrize("family", ["gemma3_text", "qwen2", "starcoder2"])
def test_tree_pass_equals_each_path_decoded_alone_with_windows(make_tiny_model, tmp_path, family):
    """Tree deeper than the sliding window, nodes far from their positions: each node sees its ancestors and
    the prefix within its window by position, as decoding its path alone does."""
    from tests.speculative.oracles import assert_tree_logits_match_paths

    store = convert_model(make_tiny_model(family, num_layers=4, tokenizer=False), tmp_path / "s", dtype="float32",
                          progress=False)
    model = OffloadedModel(store, plans(store)["mixed"], cache_tokens=64)
    try:
        model.forward(torch.tensor([PROMPT]))
        model.supports_logit_rows = False  # the oracle compares every row
        assert_tree_logits_match_paths(model, comb_tree(depth=8, width=3), atol=1e-4, rtol=1e-4)
    finally:
        model.close()


@pytest.mark.parametrize("family", ["gemma2"])
def test_nf4_store_equals_transformers_with_dequantized_weights(make_tiny_model, tmp_path, family):
    """NF4 state prepared once per (layer, slot): a 4-bit store equals transformers on the dequantized weights."""
    from transformers import AutoModelForCausalLM

    from tests.helpers import load_dequantized_nf4

    src = make_tiny_model(family, num_layers=4, tokenizer=False)
    store = convert_model(src, tmp_path / "nf4", bits=4, dtype="float32", progress=False)
    assert read_manifest(store).bits == 4
    ref_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    quantized = load_dequantized_nf4(ref_model, store)
    assert quantized >= 4 * 4
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        ref = ref_model(ids).logits
    for name, plan in plans(store).items():
        model = OffloadedModel(store, plan, cache_tokens=32)
        try:
            for _ in range(2):  # the second pass reuses each slot's prepared bindings
                model.reset()
                assert (model.forward(ids) - ref).abs().max().item() < 1e-4, f"{family} {name}"
        finally:
            model.close()


def test_nf4_conv1d_weights_equal_transformers_with_dequantized_weights(tmp_path):
    """GPT-2 keeps its linear weights [in, out] in Conv1D modules: packed as NF4, they are applied transposed."""
    from transformers import AutoModelForCausalLM

    from offspec.models.tiny import default_config, tiny_config
    from tests.helpers import load_dequantized_nf4

    torch.manual_seed(0)
    ref_model = AutoModelForCausalLM.from_config(tiny_config(default_config("gpt2"))).eval()
    ref_model.save_pretrained(tmp_path / "src")
    store = convert_model(tmp_path / "src", tmp_path / "nf4", bits=4, dtype="float32", progress=False)
    assert load_dequantized_nf4(ref_model, store) >= 4 * 2
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        ref = ref_model(ids).logits
    for name, plan in plans(store).items():
        model = OffloadedModel(store, plan, cache_tokens=32)
        try:
            assert (model.forward(ids) - ref).abs().max().item() < 1e-4, name
        finally:
            model.close()


@pytest.mark.parametrize("model_type,why", [
    ("jetmoe", "mixture-of-experts"),  # experts in attention too, not one fused experts module per layer
    ("bert", "bert.encoder.layer"), ("bart", "encoder-decoder"), ("mamba", "linear_attention"),
    ("llama4_text", "chunked_attention"), ("bloom", "4D attention mask"), ("openai-gpt", "no KV cache"),
])
def test_unsupported_model_type_fails_with_one_line_saying_why(tmp_path, model_type, why):
    """A config offspec cannot stream is refused when it is read, with one line naming the reason."""
    from transformers import AutoConfig

    from offspec.errors import ModelError
    from offspec.models.registry import load_config

    AutoConfig.for_model(model_type).save_pretrained(tmp_path)
    with pytest.raises(ModelError) as err:
        load_config(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and f"'{model_type}'" in msg and why in msg


def test_a_model_type_transformers_does_not_know_is_refused_in_one_line(tmp_path):
    import json

    from offspec.errors import ModelError
    from offspec.models.registry import load_config

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_family", "num_hidden_layers": 2}))
    with pytest.raises(ModelError, match=r"^unsupported architecture 'no_such_family': the installed transformers "
                                         r"does not know it$"):
        load_config(tmp_path)


def test_family_label_names_the_class_transformers_runs():
    from offspec.models.registry import family_label

    assert family_label("gemma3_text") == "gemma3_text (Gemma3ForCausalLM)"
    assert family_label("no_such_family") == "no_such_family"
