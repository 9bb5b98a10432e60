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
    src = make_tiny_model(request.param, num_layers=4, tie=request.param in ("gemma3_text", "smollm3"),
                          tokenizer=False)
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
        "mixed": ResidencyPlan((DISK, DEVICE, DISK, DEVICE), tuple(b), r, 0, 0, 2, max(b)),
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
