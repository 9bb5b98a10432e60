"""Mixtures of experts streamed by expert: transformers' own greedy output under every residency of the experts,
and a pass reads exactly the blobs of the experts its tokens route to."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from offspec.generate import Engine, GenerationConfig, generate
from offspec.runtime.model import OffloadedModel
from offspec.runtime.plan import DEVICE, DISK, ResidencyPlan, minimum_budget_bytes, plan_residency
from offspec.store.convert import convert_model
from offspec.store.manifest import read_manifest
from tests.conftest import TINY_MOE_FAMILIES

PROMPT = [5, 17, 33, 90, 12, 7, 64, 3, 41]
NEW_TOKENS = 6
DEFAULT = ["qwen3_moe", "gpt_oss", "deepseek_v3", "granitemoe"]  # dense first layer, biases, groups, fused source
SLOW = [f for f in TINY_MOE_FAMILIES if f not in DEFAULT]


def _store(make_tiny_model, tmp_path_factory, family: str, bits: int = 16):
    src = make_tiny_model(family, num_layers=4)
    out = tmp_path_factory.mktemp(f"moe-{family}-{bits}") / "store"
    return src, convert_model(src, out, bits=bits, dtype="float32", progress=False)


def _reference_greedy(src, **load) -> list[int]:
    """transformers' greedy continuation of PROMPT from its own float32 load of src (load: e.g. gguf_file=...)."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **load).eval()
    with torch.no_grad():
        out = ref.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


def _plans(store) -> dict[str, ResidencyPlan]:
    man = read_manifest(store)
    b, r = man.layer_bytes, man.resident.size
    mixed = tuple(DISK if i % 2 == 0 else DEVICE for i in range(len(b)))
    return {"every layer on disk": plan_residency(b, r, minimum_budget_bytes(b, r, 0, 0)),
            "mixed": ResidencyPlan(mixed, tuple(b), r, 0, 0, 2, max(b))}


def check_family(family, make_tiny_model, tmp_path_factory) -> None:
    src, store = _store(make_tiny_model, tmp_path_factory, family)
    assert read_manifest(store).is_moe
    want = _reference_greedy(src)
    # every expert cached; two slots per layer (evictions); one slot (each pass routes past it: one call per expert)
    for name, plan in _plans(store).items():
        for slots in (None, 2, 1):
            model = OffloadedModel(store, plan, cache_tokens=32, expert_slots=slots)
            try:
                got = generate(Engine(model), PROMPT, GenerationConfig(max_new_tokens=NEW_TOKENS, spec=False))
                assert got.token_ids == want, f"{family}, {name}, {slots} slots"
                if slots == 2:
                    assert model.experts.total.reads > 8, "a two-slot cache must have evicted and read again"
            finally:
                model.close()


@pytest.mark.parametrize("family", DEFAULT)
def test_moe_greedy_equals_transformers_with_experts_streamed(family, make_tiny_model, tmp_path_factory):
    check_family(family, make_tiny_model, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("family", SLOW)
def test_every_moe_family_greedy_equals_transformers(family, make_tiny_model, tmp_path_factory):
    check_family(family, make_tiny_model, tmp_path_factory)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize("file_type", ["F32", "Q8_0"])
def test_a_gguf_converted_by_expert_streams_transformers_greedy(model_type, file_type, tmp_path):
    """End to end from a llama.cpp file: the GGUF's merged expert tensors become one blob per expert per MoE layer,
    and the store, streamed layer by layer with an expert cache too small for a layer's experts, decodes what
    transformers decodes from its own load of the same GGUF."""
    from offspec.store.convert import convert
    from tests.store._gguf import tiny_moe_model, write_gguf

    path = write_gguf(tiny_moe_model(model_type), tmp_path / f"tiny-{model_type}.gguf", file_type)
    store = convert(path, tmp_path / "store", bits=16, dtype="float32", progress=False).path
    man = read_manifest(store)
    assert [len(x) for x in man.experts] == [4, 4]
    assert len({b.file for layer in man.experts for b in layer}) == 8
    assert all("experts" not in name for layer in man.layers for name in layer.tensors)
    want = _reference_greedy(path.parent, gguf_file=path.name)
    model = OffloadedModel(store, _plans(store)["every layer on disk"], cache_tokens=32, expert_slots=2)
    try:
        got = generate(Engine(model), PROMPT, GenerationConfig(max_new_tokens=NEW_TOKENS, spec=False))
        assert got.token_ids == want
        assert model.experts.total.reads > 2 * 4, "two slots of four experts: some expert evicted and read again"
    finally:
        model.close()


def _routed_by_transformers(src, ids) -> dict[int, set[int]]:
    """{layer: experts routed to} in transformers' own forward of ids (its experts modules' inputs)."""
    from transformers import AutoModelForCausalLM

    from offspec.transformers_contract import experts_module

    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    routed: dict[int, set[int]] = {}
    for i, layer in enumerate(ref.model.layers):
        found = experts_module(layer)
        if found is not None:
            layer.get_submodule(found.path).register_forward_pre_hook(
                lambda _m, args, i=i: routed.setdefault(i, set()).update(args[1].flatten().tolist()))
    with torch.no_grad():
        ref(ids)
    return routed


def test_a_pass_reads_exactly_the_routed_experts(make_tiny_model, tmp_path_factory):
    src, store = _store(make_tiny_model, tmp_path_factory, "qwen3_moe")
    ids = torch.tensor([PROMPT[:3]])
    want = _routed_by_transformers(src, ids)
    model = OffloadedModel(store, _plans(store)["every layer on disk"], cache_tokens=32)
    try:
        model.forward(ids)
        got: dict[int, set[int]] = {}
        for layer, e in model.stats.experts.read_log:
            assert e not in got.get(layer, set()), "an expert read twice in one pass"
            got.setdefault(layer, set()).add(e)
        assert got == want
        assert model.stats.experts.reads == sum(len(v) for v in want.values())
        assert model.stats.experts.prefetched == 0
        model.forward(ids[:, -1:])  # the experts of the last token are cached now
        assert model.stats.experts.hits > 0
    finally:
        model.close()


def test_closing_gives_the_expert_slabs_back_without_the_garbage_collector(make_tiny_model, tmp_path_factory):
    """The wrapped experts forward and its module refer to each other: close() breaks that, so the slabs go as soon
    as the model does (opening model after model in one process otherwise grew it until it was killed)."""
    import gc
    import weakref

    _, store = _store(make_tiny_model, tmp_path_factory, "qwen3_moe")
    model = OffloadedModel(store, _plans(store)["every layer on disk"], cache_tokens=32)
    model.forward(torch.tensor([PROMPT[:3]]))
    lay = next(iter(model.experts.layers.values()))
    module = lay.wrapped
    slabs = [weakref.ref(t) for t in lay.slab.values()]
    gc.disable()
    try:
        model.close()
        del model, lay
        assert "forward" not in module.__dict__  # transformers' own forward again
        assert all(ref() is None for ref in slabs)
    finally:
        gc.enable()


def test_nf4_experts_equal_transformers_with_the_dequantized_weights(make_tiny_model, tmp_path_factory):
    """An NF4 store packs every expert's matrices; the oracle is transformers' model with them dequantized."""
    from transformers import AutoModelForCausalLM

    from offspec.store.manifest import tensor_views
    from offspec.store.nf4 import dequantize_nf4

    src, store = _store(make_tiny_model, tmp_path_factory, "qwen3_moe", bits=4)
    man = read_manifest(store)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    packed = 0
    for i, blobs in enumerate(man.experts):
        for e, blob in enumerate(blobs):
            buf = torch.frombuffer(bytearray((store / blob.file).read_bytes()), dtype=torch.uint8)
            views = tensor_views(blob.tensors, buf)
            for name, entry in blob.tensors.items():
                if entry.quant is not None:
                    ref.model.layers[i].get_parameter(name).data[e].copy_(
                        dequantize_nf4(views[name], views[name + ".absmax"], entry.quant))
                    packed += 1
        for name, entry in man.layers[i].tensors.items():
            if entry.quant is not None:
                buf = torch.frombuffer(bytearray((store / man.layers[i].file).read_bytes()), dtype=torch.uint8)
                views = tensor_views(man.layers[i].tensors, buf)
                ref.model.layers[i].get_parameter(name).data.copy_(
                    dequantize_nf4(views[name], views[name + ".absmax"], entry.quant))
    assert packed >= 3 * 8 * 2
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT])).logits
    model = OffloadedModel(store, _plans(store)["every layer on disk"], cache_tokens=32, expert_slots=3)
    try:
        assert (model.forward(torch.tensor([PROMPT])) - want).abs().max().item() < 1e-3
    finally:
        model.close()


def test_the_plan_holds_experts_in_the_budget_and_the_model_caches_that_many(make_tiny_model, tmp_path_factory):
    from offspec.runtime.sizing import plan_for_store

    _, store = _store(make_tiny_model, tmp_path_factory, "qwen3_moe")
    man = read_manifest(store)
    small, minimum = plan_for_store(store, man, "cpu", 0, cache_tokens=32, over_min=0)
    assert small.expert_slots == 2  # one token's experts (top-2) in every MoE layer
    assert small.device_bytes <= minimum
    roomy, _ = plan_for_store(store, man, "cpu", minimum + 3 * sum(small.expert_slot_bytes) + (8 << 20),
                              cache_tokens=32)
    assert roomy.expert_slots > small.expert_slots and roomy.device_bytes <= minimum + 3 * sum(
        small.expert_slot_bytes) + (8 << 20)
    everything, _ = plan_for_store(store, man, "cpu", 1 << 34, cache_tokens=32)
    assert everything.expert_slots == 8 and set(everything.tiers) == {DEVICE}
    model = OffloadedModel(store, small, cache_tokens=32)
    try:
        assert {lay.slots for lay in model.experts.layers.values()} == {2}
        model.forward(torch.tensor([PROMPT]))
        assert max(model.experts.resident_experts().values()) <= 2
    finally:
        model.close()


@pytest.mark.parametrize("predictor", ["previous", "gate"])
def test_prefetch_reads_ahead_counted_apart_and_changes_nothing(predictor, make_tiny_model, tmp_path_factory):
    """Prefetched blobs are counted apart from on-demand reads; every routed expert is a hit or one read."""
    src, store = _store(make_tiny_model, tmp_path_factory, "qwen3_moe")
    want = _reference_greedy(src)
    model = OffloadedModel(store, _plans(store)["every layer on disk"], cache_tokens=32, expert_slots=3,
                           expert_prefetch=predictor)
    try:
        engine = Engine(model)
        seen = []
        orig = model.forward

        def forward(*a, **k):
            out = orig(*a, **k)
            ex = model.stats.experts
            assert ex.routed == ex.hits + ex.reads
            assert ex.prefetch_used <= min(ex.prefetched, ex.hits)
            seen.append((ex.prefetched, ex.prefetch_used))
            return out

        model.forward = forward
        got = generate(engine, PROMPT, GenerationConfig(max_new_tokens=NEW_TOKENS, spec=False))
        assert got.token_ids == want
        assert sum(p for p, _ in seen) > 0 and model.experts.total.prefetched == sum(p for p, _ in seen)
        assert got.stats.experts_prefetched == sum(p for p, _ in seen[1:])  # decode passes (not the prefill)
    finally:
        model.close()


# ---------------------------------------------------------------------------------------------- speculation
def _comb_tree(last: int, depth: int = 5, width: int = 2):
    from offspec.speculative.tree import DraftTree

    tree = DraftTree(last, capacity=depth * width + 1)
    node = 0
    for d in range(depth):
        kids = tree.add(node, [(11 * d + 5 * j) % 200 + 3 for j in range(width)], [-1.0 * (d + 1)] * width)
        node = int(kids[0])
    return tree


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2"])
def test_a_tree_pass_equals_each_path_decoded_alone(family, make_tiny_model, tmp_path_factory):
    """A tree routes the union of its paths' experts; two slots per layer make it run in groups of two experts."""
    from tests.speculative.oracles import assert_tree_logits_match_paths

    _, store = _store(make_tiny_model, tmp_path_factory, family)
    model = OffloadedModel(store, _plans(store)["mixed"], cache_tokens=32, expert_slots=2)
    try:
        model.forward(torch.tensor([PROMPT[:-1]]))
        model.supports_logit_rows = False  # the oracle compares every row
        assert_tree_logits_match_paths(model, _comb_tree(PROMPT[-1]), atol=1e-4, rtol=1e-4)
    finally:
        model.close()


def _moe_engine(store, draft=None, slots=2, plan="every layer on disk", **model_kw):
    model = OffloadedModel(store, _plans(store)[plan], cache_tokens=64, expert_slots=slots, **model_kw)
    return Engine(model, draft)


@pytest.fixture(scope="module")
def moe_stores(make_tiny_model, tmp_path_factory):
    _, target = _store(make_tiny_model, tmp_path_factory, "qwen3_moe")
    draft_src = make_tiny_model("qwen3_moe", num_layers=2, seed=1)
    draft = convert_model(draft_src, tmp_path_factory.mktemp("moe-draft") / "d", bits=16, dtype="float32",
                          progress=False)
    _, nf4 = _store(make_tiny_model, tmp_path_factory, "qwen3_moe", bits=4)
    return target, draft, nf4


def _drafter(kind: str, engine: Engine, stores):
    from offspec.runtime.model import open_model
    from offspec.runtime.self_draft import open_self_draft
    from offspec.speculative.drafters import ModelDrafter, NgramDrafter

    target, draft, nf4 = stores
    if kind == "ngram":
        return NgramDrafter(min_n=1)
    if kind == "draft":
        return ModelDrafter(open_model(draft, cache_tokens=64))
    if kind in ("self", "self-mixed"):  # the NF4 copy of the same source, its experts cached in the draft
        return ModelDrafter(open_self_draft(engine.target, "nf4", nf4, cache_tokens=64), name="self")
    return ModelDrafter(open_self_draft(engine.target, "int8", cache_tokens=64), name="self")


@pytest.mark.parametrize("kind", ["ngram", "draft", "self", "self-mixed", "int8-self"])
def test_speculative_greedy_and_seeded_sampling_equal_plain_decoding(kind, moe_stores):
    """self-mixed: the target keeps some layers in memory, which a self-draft of a dense model would share (a
    draft of an MoE does not: it drafts ahead, in a thread, while the target runs its experts)."""
    target, _, _ = moe_stores
    plain = _moe_engine(target)
    prompt = [5, 17, 33, 5, 17, 33, 5, 17]  # repeats, so n-grams propose something
    for cfg in (GenerationConfig(max_new_tokens=12), GenerationConfig(max_new_tokens=12, temperature=1.0, seed=4)):
        plain.reset()
        want = generate(plain, prompt, replace(cfg, spec=False))
        spec = _moe_engine(target, plan="mixed" if kind == "self-mixed" else "every layer on disk")
        spec.drafter = _drafter(kind, spec, moe_stores)
        got = generate(spec, prompt, replace(cfg, budget=8, max_depth=4))
        assert got.token_ids == want.token_ids, (kind, cfg.temperature)
        assert got.stats.experts_routed > 0


def test_the_pass_curve_counts_the_experts_a_tree_reads(moe_stores):
    from offspec.runtime.pass_curve import measure_pass_curve

    target, _, _ = moe_stores
    engine = _moe_engine(target, slots=None)
    reads: dict[int, int] = {}
    curve = measure_pass_curve(engine.target, sizes=(1, 4, 16), prefix=4, experts_read=reads)
    assert set(curve) == set(reads) == {1, 4, 16}
    # from an empty cache: one token reads its top-2 per MoE layer, a tree reads the union of its tokens' experts
    assert reads[1] == 2 * 3 and reads[1] <= reads[4] <= reads[16] <= 8 * 3 and reads[16] > reads[1]


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def moe_store_copy(make_tiny_model, tmp_path_factory, tmp_path):
    import shutil

    _, store = _store(make_tiny_model, tmp_path_factory, "qwen3_moe")
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    (copy / ".verified").unlink(missing_ok=True)
    return copy


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_damaged_expert_blob_is_one_line_at_open_and_in_a_pass(damage, moe_store_copy):
    from offspec.errors import StoreError
    from offspec.runtime.model import open_model

    blob = moe_store_copy / read_manifest(moe_store_copy).experts[1][5].file
    data = blob.read_bytes()
    if damage == "missing":
        blob.unlink()
    else:
        blob.write_bytes(data[:100])
    with pytest.raises(StoreError) as err:  # the integrity check at open names the blob
        open_model(moe_store_copy, cache_tokens=32)
    msg = str(err.value)
    assert "\n" not in msg and "expert 5 of layer 1" in msg and ("missing" in msg or "truncated" in msg)
    # opened without the check, a pass that routes to it fails with one line and leaves nothing half-written
    model = OffloadedModel(moe_store_copy, _plans(moe_store_copy)["every layer on disk"], cache_tokens=32)
    try:
        with pytest.raises(StoreError) as err:
            for t in range(0, 200, 8):  # some token routes to expert 5 of layer 1
                model.forward(torch.arange(t, t + 8)[None] % 256)
        assert "\n" not in str(err.value) and "expert 5 of layer 1" in str(err.value)
        assert 5 not in model.experts.layers[1].where
        blob.write_bytes(data)  # repaired: the same model reads it
        model.reset()
        model.forward(torch.arange(0, 200)[None] % 256)
        assert 5 in model.experts.layers[1].where
    finally:
        model.close()


def test_an_unsupported_mixture_of_experts_is_refused_in_one_line(tmp_path):
    from transformers import AutoConfig

    from offspec.errors import ModelError
    from offspec.models.registry import load_config

    AutoConfig.for_model("jetmoe", num_hidden_layers=2, hidden_size=64, num_attention_heads=4).save_pretrained(tmp_path)
    with pytest.raises(ModelError) as err:
        load_config(tmp_path)
    assert "\n" not in str(err.value) and "mixture-of-experts" in str(err.value)


def test_a_source_naming_one_tensor_per_expert_converts_by_expert(make_tiny_model, tmp_path, monkeypatch):
    """A source other than a folder (a GGUF) names each expert's tensors as a per-expert checkpoint does
    (`mlp.experts.3.gate_proj.weight`): the converter joins them per expert and keeps the router 16-bit in NF4."""
    from safetensors import safe_open
    from transformers import AutoConfig

    import offspec.store.convert as conv

    src = make_tiny_model("qwen3_moe", num_layers=4)

    class PerExpertSource:  # layer tensors under the checkpoint's own names, experts included (no expert_tensors)
        def __init__(self, path):
            self.inner = conv.FolderSource(path)
            self.config = AutoConfig.from_pretrained(path)
            self.model_type, self.num_layers = self.inner.model_type, self.inner.num_layers
            self.tie_word_embeddings = self.inner.tie_word_embeddings
            self.resident_tensors, self.write_metadata = self.inner.resident_tensors, self.inner.write_metadata
            self._file = next(path.glob("*.safetensors"))

        def layer_tensors(self, i):
            prefix = f"model.layers.{i}."
            with safe_open(str(self._file), "pt") as h:
                keys = [k for k in h.keys() if k.startswith(prefix)]
            return {k[len(prefix):]: (lambda dtype=None, k=k: safe_open(str(self._file), "pt").get_tensor(k))
                    for k in keys}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.inner.__exit__(*exc)

    monkeypatch.setattr(conv, "open_source", PerExpertSource)
    for bits in (16, 4):
        store = conv.convert_model(src, tmp_path / f"s{bits}", bits=bits, dtype="float32", progress=False)
        man = read_manifest(store)
        assert [len(x) for x in man.experts] == [0, 8, 8, 8]
        assert man.layers[1].tensors["mlp.gate.weight"].quant is None
        if bits == 16:
            want = _reference_greedy(src)
            model = OffloadedModel(store, _plans(store)["every layer on disk"], cache_tokens=32, expert_slots=2)
            try:
                got = generate(Engine(model), PROMPT, GenerationConfig(max_new_tokens=NEW_TOKENS, spec=False))
                assert got.token_ids == want
            finally:
                model.close()


def test_the_estimate_of_a_gguf_sized_per_expert_plans_an_expert_cache():
    """A GGUF's merged expert tensors, sized one per expert (`ffn_gate_exps.3.weight`), are estimated as expert
    blobs, so a plan made before converting holds an expert cache rather than whole layers."""
    from offspec.store.metadata import SourceMetadata, TensorSpec, estimate_manifest

    def layer():
        specs = {"attn_q.weight": TensorSpec((64, 64), True, 64 * 64 * 2),
                 "ffn_gate_inp.weight": TensorSpec((8, 64), True, 8 * 64 * 2)}
        for e in range(8):
            for part in ("gate", "up", "down"):
                specs[f"ffn_{part}_exps.{e}.weight"] = TensorSpec((32, 64), True, 32 * 64 * 2)
        return specs

    meta = SourceMetadata(Path("x.gguf"), "gguf", "qwen3_moe", 2, {}, False, (layer(), layer()),
                          {"token_embd.weight": TensorSpec((256, 64), True, 256 * 64 * 2)})
    man = estimate_manifest(meta, 16, "bfloat16")
    assert man.is_moe and [len(x) for x in man.experts] == [8, 8]
    assert set(man.experts[0][0].tensors) == {"ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight"}
    assert set(man.layers[0].tensors) == {"attn_q.weight", "ffn_gate_inp.weight"}
