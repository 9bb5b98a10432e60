"""Oracles: the streamed forward equals the transformers forward, whatever the residency plan."""

import pytest
import torch

from offspec.runtime.masks import tree_mask
from offspec.runtime.model import OffloadedModel
from offspec.runtime.plan import DEVICE, DISK, ResidencyPlan, minimum_budget_bytes, plan_residency
from offspec.store.convert import convert_model
from offspec.store.manifest import read_manifest

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


def build_hf(model_type: str, layers: int = 4, tie: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        model_type, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=ARCHS)
def arch_store(request, tmp_path_factory):
    model = build_hf(request.param, tie=request.param == "qwen3")
    src = tmp_path_factory.mktemp(f"hf-{request.param}")
    model.save_pretrained(src)
    store = convert_model(src, tmp_path_factory.mktemp("stores") / request.param, bits=16, dtype="float32",
                          progress=False)
    return model, store


def plans(store):
    man = read_manifest(store)
    b, r = man.layer_bytes, man.resident.size
    smallest = plan_residency(b, r, minimum_budget_bytes(b, r, 0, 0))
    mixed = ResidencyPlan((DISK, DEVICE, DISK, DEVICE), tuple(b), r, 0, 0, 2, max(b))
    resident = plan_residency(b, r, 1 << 34)
    return {"all-streamed": smallest, "mixed": mixed, "all-resident": resident}


def test_streamed_logits_equal_transformers(arch_store):
    model, store = arch_store
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    for name, plan in plans(store).items():
        om = OffloadedModel(store, plan, cache_tokens=32)
        try:
            assert (name != "all-streamed") or set(plan.tiers) == {DISK}
            got = om.forward(ids)
            assert (got - ref).abs().max().item() < 1e-4, name
            # second pass through the same ring (prefetch wrapped around) gives the same answer
            om.reset()
            assert (om.forward(ids) - ref).abs().max().item() < 1e-4, name
        finally:
            om.close()


def test_prefill_then_decode_equals_one_forward(arch_store):
    model, store = arch_store
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
    om = OffloadedModel(store, plans(store)["all-streamed"], cache_tokens=4)  # cache grows as needed
    try:
        parts = [om.forward(ids[:, :6])] + [om.forward(ids[:, i : i + 1]) for i in range(6, 10)]
        assert (torch.cat(parts, 1) - ref).abs().max().item() < 1e-4
    finally:
        om.close()


def test_keep_subset_then_decode_equals_fresh_run(arch_store):
    model, store = arch_store
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    om = OffloadedModel(store, plans(store)["mixed"], cache_tokens=32)
    try:
        om.forward(ids[:, :4])
        # a small tree of five nodes after the prefix: 0 and 1 at depth 0, 2 under 0, 3 under 1, 4 under 3
        parents = [-1, -1, 0, 1, 3]
        anc = torch.zeros(5, 5, dtype=torch.bool)
        depth = []
        for i, p in enumerate(parents):
            anc[i, i] = True
            if p >= 0:
                anc[i] |= anc[p]
            depth.append(0 if p < 0 else depth[p] + 1)
        pos = torch.tensor([depth]) + 4
        om.forward(ids[:, 4:9], pos, tree_mask(4, anc, om.dtype))
        om.cache.keep(4, torch.tensor([1, 3]))  # keep the path 1 -> 3
        kept = torch.cat([ids[:, :4], ids[:, 5:6], ids[:, 7:8]], 1)
        nxt = torch.tensor([[17]])
        got = om.forward(nxt)
        with torch.no_grad():
            ref = model(torch.cat([kept, nxt], 1)).logits[:, -1:]
        assert (got - ref).abs().max().item() < 1e-4
    finally:
        om.close()


def test_nf4_store_equals_transformers_with_dequantized_weights(tmp_path):
    from tests.helpers import load_dequantized_nf4

    model = build_hf("qwen2", layers=3)
    src = tmp_path / "hf"
    model.save_pretrained(src)
    store = convert_model(src, tmp_path / "nf4", bits=4, dtype="float32", progress=False)
    man = read_manifest(store)
    assert man.bits == 4
    # Reference: transformers' model with each linear weight replaced by the dequantized NF4 data.
    load_dequantized_nf4(model, store)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids).logits
    for plan in (plans(store)["all-streamed"], plans(store)["all-resident"]):
        om = OffloadedModel(store, plan, cache_tokens=32)
        try:
            assert (om.forward(ids) - ref).abs().max().item() < 1e-4
        finally:
            om.close()


def test_bf16_store_computes_in_float32_when_asked(tmp_path, monkeypatch):
    """CPUs without native bf16 upcast streamed bf16 weights into float32 slot buffers in the reader thread."""
    monkeypatch.setenv("OFFSPEC_COMPUTE_DTYPE", "float32")
    model = build_hf("qwen2", layers=3)
    src = tmp_path / "hf"
    model.save_pretrained(src)
    store = convert_model(src, tmp_path / "bf16", bits=16, dtype="bfloat16", progress=False)
    ref_model = model.to(torch.bfloat16).to(torch.float32)  # the same rounded weights, float32 math
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = ref_model(ids).logits
    for name in ("all-streamed", "all-resident"):
        om = OffloadedModel(store, plans(store)[name], cache_tokens=32)
        try:
            assert om.dtype == torch.float32 and om.store_dtype == torch.bfloat16
            assert (om.forward(ids) - ref).abs().max().item() < 1e-4, name
            om.reset()
            assert (om.forward(ids) - ref).abs().max().item() < 1e-4, name
        finally:
            om.close()


def test_an_interrupted_pass_hands_its_slot_back(arch_store, monkeypatch):
    from tests.helpers import interrupt_layer

    _, store = arch_store
    om = OffloadedModel(store, plans(store)["all-streamed"], cache_tokens=32)
    try:
        interrupt_layer(monkeypatch, om.layers[1], 3)
        for _ in range(3):  # more interrupts than ring slots
            with pytest.raises(KeyboardInterrupt):
                om.forward(torch.tensor([[1, 2, 3]]))
        om.reset()
        assert om.forward(torch.tensor([[1, 2, 3]])).shape == (1, 3, 256)
    finally:
        om.close()


def test_streamed_weights_are_bound_once_per_ring_slot(arch_store):
    """Parameters of a streamed layer are built once per ring slot and reused, not rebuilt every pass."""
    _, store = arch_store
    plan = plans(store)["all-streamed"]
    om = OffloadedModel(store, plan, cache_tokens=32)
    try:
        layer = om.layers[1]
        seen = []  # held, so ids are never recycled
        layer.register_forward_pre_hook(lambda m, a: seen.append(m.mlp.down_proj.weight))  # after the binding hook
        passes = 3 * plan.ring_slots
        for _ in range(passes):
            om.reset()
            om.forward(torch.tensor([[1, 2, 3]]))
        assert len(seen) == passes and len({id(p) for p in seen}) <= plan.ring_slots
    finally:
        om.close()


def test_head_in_chunks_equals_transformers_over_a_wide_pass(arch_store):
    """More rows than the head runs at once (HEAD_ROWS): the chunked float32 logits equal transformers' own."""
    from offspec.runtime.sizing import HEAD_ROWS

    model, store = arch_store
    ids = torch.randint(0, 256, (1, 2 * HEAD_ROWS + 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
    om = OffloadedModel(store, plans(store)["all-streamed"], cache_tokens=2 * HEAD_ROWS + 8)
    try:
        got = om.forward(ids)
        assert got.dtype == torch.float32 and got.shape == ref.shape
        assert (got - ref).abs().max().item() < 1e-4
        rows = torch.arange(3, 3 + HEAD_ROWS + 2)
        assert (om.logits_at(rows) - ref[0, rows]).abs().max().item() < 1e-4
    finally:
        om.close()
